"""The training script's data plan (models/lung_nodules/train.py), without training."""

from __future__ import annotations

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


def test_stage_7_is_not_in_the_default_run() -> None:
    """Stage 7 was tried and not shipped (README, "Ground-glass and part-solid nodules")."""
    assert train.DEFAULT_STAGES == (1, 2, 3, 4, 5, 6)
    assert 7 in train.MINED_STAGES and 7 not in train.MASS_STAGES  # it fine-tunes the nodule network
