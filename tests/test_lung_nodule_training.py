"""The training script's data plan (models/lung_nodules/train.py), without training."""

from __future__ import annotations

import torch

from models.lung_nodules import train
from phantoms.chest_phantom import DENSITIES


def test_no_stage_draws_an_evaluation_seed() -> None:
    """Stages use seeds from their base upwards (at most 100 cases each); evaluation
    starts at 9000."""
    bases = sorted(train.STAGE_SEEDS.values())
    assert bases[-1] + 100 <= train.EVAL_SEED_MIN
    assert set(train.STAGE_SEEDS) == set(range(1, 8))


def test_stage_7_chests_have_subsolid_nodules_and_fissures() -> None:
    kinds = set()
    for seed in range(train.STAGE7_SEED_BASE, train.STAGE7_SEED_BASE + 10):
        kw = train.phantom_kwargs_subsolid(seed)
        assert kw["fissures"] is True
        assert set(kw["nodule_densities"]) <= set(DENSITIES)
        assert len(kw["nodule_densities"]) >= len(kw["nodule_diameters_mm"])
        kinds.update(kw["nodule_densities"][: len(kw["nodule_diameters_mm"])])
    assert kinds == set(DENSITIES)


def test_each_stage_trains_its_network_and_the_bundle_packs_all_three() -> None:
    """Stages 1-4 train the nodule network, 5-6 the mass network, 7 the subsolid network
    (all in the default run); the packed state dict loads into the bundle's network."""
    assert train.DEFAULT_STAGES == (1, 2, 3, 4, 5, 6, 7)
    assert [train.network_of(s) for s in train.DEFAULT_STAGES] == ["nodule"] * 4 + ["mass"] * 2 + ["subsolid"]
    assert 7 in train.MINED_STAGES
    one = {"w": torch.zeros(1)}
    packed = train.pack(one, {"w": torch.ones(1)}, {"w": torch.full((1,), 2.0)})
    assert sorted(packed) == ["mass.w", "nodule.w", "subsolid.w"]
    assert {k: float(v) for k, v in train.unpack(packed)["subsolid"].items()} == {"w": 2.0}
    assert sorted(train.pack(one, one)) == ["mass.w", "nodule.w"]
