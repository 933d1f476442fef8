"""Train the lung-nodule bundle from scratch on generated chest-CT phantoms (CPU).

    nice -n 15 python -m models.lung_nodules.train            # writes models/model.pt
    python -m models.lung_nodules.train --stages 5 6 --init models/lung_nodules/models/model.pt --out m.pt

Seeded and reproducible (fixed seeds, fixed iteration count, 2 torch threads). Stages
1-4 train the nodule network, stages 5-6 fine-tune a copy of it into the mass network,
stage 7 fine-tunes a copy of it into the subsolid network, on ground-glass and
part-solid nodules labelled whole; ``models/model.pt`` holds all three (:mod:`networks`).
The training phantoms come from :mod:`phantoms.chest_phantom` with seeds ``TRAIN_SEED_BASE + i`` (i <
``--cases``), 100.. (stage 2), 200.. (stage 3), 300.. (stage 4), 400.. (stage 5: a
mass of 30-80 mm in every chest), 600.. (stage 6: every other chest with a mass,
negatives mined with the stage-5 network) and 1000.. (stage 7: subsolid nodules and
fissures);
``evaluate.py`` uses seeds 9000-9999 (validation) and 10000.. (held-out test), which
training never touches. Each phantom is drawn at a random acquisition geometry,
then put through the bundle's own preprocessing (read from configs/inference.json),
so the network learns at the bundle's working resolution from varied source grids.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    CropForegroundd,
    Orientationd,
    ScaleIntensityRanged,
)
from scipy import ndimage

from models.lung_nodules.bundle_runner import BUNDLE_ROOT, load_parser, make_metatensor
from phantoms.chest_phantom import make_chest_phantom
from plugin.transforms import ZoomSpacingd

LOG = logging.getLogger("train")
TRAIN_SEED_BASE = 0  # training phantoms use seeds 0 .. cases-1; evaluation uses 10000+
EVAL_SEED_MIN = 9000  # 9000-9999 validation, 10000+ held-out test
KEYS = ["image", "label", "lung"]
BODY_LEVEL = 500 / 1400  # -500 HU on the bundle's [-1000, 400] HU scale
# Patch centre mix per stage: nodule, dense near lung, lung, anywhere, body (soft
# tissue), mined hard negatives (where the stage-2 network fires without a nodule)
STAGE1_MIX = (0.45, 0.25, 0.18, 0.12, 0.0, 0.0)
STAGE2_MIX = (0.40, 0.20, 0.10, 0.0, 0.30, 0.0)
STAGE3_MIX = (0.40, 0.10, 0.05, 0.0, 0.10, 0.35)
STAGE4_MIX = (0.45, 0.10, 0.10, 0.0, 0.10, 0.25)
STAGE5_MIX = STAGE4_MIX
STAGE6_MIX = STAGE3_MIX  # stage 3's weight on mined negatives
STAGE7_MIX = STAGE4_MIX
NODULE_SHIFT = {4: 0.5, 5: 0.5, 6: 0.5}  # per stage: share of patches whose nodules change attenuation
STAGE2_SEED_BASE = 100  # stage-2 phantoms: seeds 100..; all full-coverage chests
STAGE3_SEED_BASE = 200  # stage-3 phantoms: seeds 200..; whole chests, mostly thick slices
STAGE4_SEED_BASE = 300  # stage-4 phantoms: seeds 300..; whole chests, nodules 4-30 mm
STAGE5_SEED_BASE = 400  # stage-5 phantoms: seeds 400..; whole chests, a mass of 30-80 mm and nodules
STAGE6_SEED_BASE = 600  # stage-6 phantoms: seeds 600..; whole chests, every other one with a mass
STAGE7_SEED_BASE = 1000  # stage-7 phantoms: seeds 1000..; whole chests, ground-glass and part-solid nodules, fissures
STAGE_SEEDS = {
    1: TRAIN_SEED_BASE,
    2: STAGE2_SEED_BASE,
    3: STAGE3_SEED_BASE,
    4: STAGE4_SEED_BASE,
    5: STAGE5_SEED_BASE,
    6: STAGE6_SEED_BASE,
    7: STAGE7_SEED_BASE,
}
MINED_STAGES = {3, 4, 5, 6, 7}  # stages that first mine hard negatives with the network so far
MASS_STAGES = {5, 6}  # stages that fine-tune the nodule network into the mass network
SUBSOLID_STAGES = {7}  # stages that fine-tune the nodule network into the subsolid network
DEFAULT_STAGES = (1, 2, 3, 4, 5, 6, 7)  # the shipped model's
MINE_LEVEL = 0.3  # a voxel the network scores above this, away from nodules, is a hard negative


@dataclass
class Case:
    """One preprocessed training phantom at the working resolution."""

    image: np.ndarray  # float16 (X, Y, Z), scaled to [0, 1]
    label: np.ndarray  # uint8 (X, Y, Z)
    fg: np.ndarray  # (N, 3) nodule voxel indices (subsampled)
    lung: np.ndarray  # (M, 3) lung voxel indices (subsampled)
    hard: (
        np.ndarray
    )  # (K, 3) dense non-nodule voxels at or near the lungs (vessels, walls)
    body: np.ndarray  # (L, 3) voxels inside the body (HU > -500)
    comps: list[np.ndarray] = field(default_factory=list)  # voxels of each nodule
    mined: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))


def bundle_preprocessing() -> Compose:
    """The bundle's preprocessing for image + label (label resampled then thresholded)."""
    parser = load_parser()
    steps = {t["_target_"].rsplit(".", 1)[-1]: t for t in parser["preprocessing"]["transforms"]}

    def step(*names: str) -> dict:
        return next(steps[n] for n in names if n in steps)

    scale = step("ScaleIntensityRanged", "ScaleIntensityRangeFusedd")
    crop = step("CropForegroundd", "OrientCropForegroundd")
    return Compose(
        [
            Orientationd(keys=KEYS, axcodes=step("Orientationd", "OrientCropForegroundd")["axcodes"]),
            CropForegroundd(
                keys=KEYS,
                source_key="image",
                select_fn=lambda x: x > -500,
                margin=crop["margin"],
                allow_smaller=True,
            ),
            ZoomSpacingd(keys=KEYS, pixdim=parser.get_parsed_content("pixdim")),
            ScaleIntensityRanged(
                keys="image",
                a_min=scale["a_min"],
                a_max=scale["a_max"],
                b_min=scale["b_min"],
                b_max=scale["b_max"],
                clip=True,
            ),
        ]
    )


def phantom_kwargs(seed: int) -> dict:
    """Varied acquisition and nodule parameters for training phantom ``seed``.

    Every third phantom covers the whole chest (lung apex to below the diaphragm);
    the others cover a 90-160 mm slab so that more of them fit in memory.
    """
    rng = np.random.default_rng(seed + 777)
    dz = float(rng.choice([0.625, 0.8, 1.0, 1.25, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
    coverage = rng.uniform(280, 380) if seed % 3 == 0 else rng.uniform(90, 160)
    if seed % 3 == 0:
        dz = max(dz, 1.25)
    count = int(rng.integers(3, 8))
    diam = np.exp(rng.uniform(np.log(3.5), np.log(30.0), size=count))
    return {
        "slices": max(round(coverage / dz), 20),
        "rows": int(rng.choice([384, 512, 512])),
        "pixel_spacing_mm": float(rng.uniform(0.5, 1.0)),
        "slice_spacing_mm": dz,
        "noise_hu": float(rng.uniform(3, 45)),
        "nodule_diameters_mm": [float(d) for d in diam],
    }


def phantom_kwargs_full(seed: int) -> dict:
    """Stage-2 phantoms: whole chests (apex to below the diaphragm), 1.25-5 mm slices."""
    kw = phantom_kwargs(seed)
    rng = np.random.default_rng(seed + 999)
    dz = float(rng.choice([1.25, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
    kw.update(slice_spacing_mm=dz, slices=max(round(rng.uniform(300, 400) / dz), 20))
    return kw


def _whole_chest_kwargs(
    seed: int, salt: int, slice_mm: list[float], max_diameter_mm: float
) -> dict:
    """A whole chest at one of ``slice_mm``, with 3-7 nodules of 4 to
    ``max_diameter_mm`` (log-uniform)."""
    kw = phantom_kwargs(seed)
    rng = np.random.default_rng(seed + salt)
    dz = float(rng.choice(slice_mm))
    count = int(rng.integers(3, 8))
    diam = np.exp(rng.uniform(np.log(4.0), np.log(max_diameter_mm), size=count))
    kw.update(
        slice_spacing_mm=dz,
        slices=max(round(rng.uniform(280, 400) / dz), 20),
        nodule_diameters_mm=[float(d) for d in diam],
    )
    return kw


def phantom_kwargs_thick(seed: int) -> dict:
    """Stage-3 phantoms: whole chests, two in three at 2.5-5 mm slices (where the
    stage-2 network made most of its false positives), nodules of 4-20 mm."""
    return _whole_chest_kwargs(seed, 555, [1.25, 2.0, 2.5, 3.0, 5.0, 5.0], 20.0)


def phantom_kwargs_mixed(seed: int) -> dict:
    """Stage-4 phantoms: whole chests at 1.25-5 mm slices, nodules of 4-30 mm (stage 3
    had none over 20 mm, and its network had started to miss large dense nodules)."""
    return _whole_chest_kwargs(seed, 333, [1.25, 1.25, 2.0, 2.5, 3.0, 5.0], 30.0)


def phantom_kwargs_masses(seed: int) -> dict:
    """Stage-5 phantoms: whole chests at 1.25-5 mm slices with one lobulated mass of
    30-80 mm (the earlier stages had none over 30 mm, and the stage-4 network missed
    phantom masses of 45-70 mm altogether) beside 2-5 nodules of 4-30 mm."""
    kw = _whole_chest_kwargs(seed, 444, [1.25, 1.25, 2.0, 2.5, 3.0, 5.0], 30.0)
    rng = np.random.default_rng(seed + 4444)
    mass = float(rng.uniform(30.0, 80.0))
    nodules = kw["nodule_diameters_mm"][: int(rng.integers(2, 6))]
    kw.update(nodule_diameters_mm=[mass, *nodules],
              nodule_kinds=["irregular", *("irregular" if rng.random() < 0.4 else "spherical" for _ in nodules)])
    return kw


def phantom_kwargs_review(seed: int) -> dict:
    """Stage-6 phantoms: whole chests at 1.25-5 mm slices, every other one with a mass
    (``phantom_kwargs_masses``), the rest with nodules only (``phantom_kwargs_mixed``):
    negatives are mined with the stage-5 network, which took the diaphragm domes and
    apices of ordinary chests for masses."""
    return phantom_kwargs_masses(seed) if seed % 2 == 0 else phantom_kwargs_mixed(seed)


def phantom_kwargs_subsolid(seed: int) -> dict:
    """Stage-7 phantoms: whole chests at 1.25-5 mm slices with the fissures drawn and
    3-7 nodules of 4-30 mm, each ground glass (35 %), part-solid (35 %) or solid (the
    stage-4 network found 6 of 20 ground-glass nodules on held-out scans and reported
    part-solid ones as their solid core)."""
    kw = _whole_chest_kwargs(seed, 777, [1.25, 1.25, 2.0, 2.5, 3.0, 5.0], 30.0)
    rng = np.random.default_rng(seed + 7777)
    densities = rng.choice(["ground_glass", "part_solid", "solid"], size=8, p=[0.35, 0.35, 0.3])
    kw.update(nodule_densities=[str(d) for d in densities], fissures=True)
    return kw


def _indices(
    mask: np.ndarray, rng: np.random.Generator, limit: int, step: int = 1
) -> np.ndarray:
    idx = np.argwhere(mask[::step, ::step, ::step]) * step
    return idx[rng.permutation(len(idx))[:limit]]


def make_case(seed: int, prep: Compose) -> Case:
    """Generate and preprocess training phantom ``seed``."""
    assert seed < EVAL_SEED_MIN, "training must never use evaluation seeds"
    if seed >= STAGE7_SEED_BASE:
        kwargs = phantom_kwargs_subsolid(seed)
    elif seed >= STAGE6_SEED_BASE:
        kwargs = phantom_kwargs_review(seed)
    elif seed >= STAGE5_SEED_BASE:
        kwargs = phantom_kwargs_masses(seed)
    elif seed >= STAGE4_SEED_BASE:
        kwargs = phantom_kwargs_mixed(seed)
    elif seed >= STAGE3_SEED_BASE:
        kwargs = phantom_kwargs_thick(seed)
    elif seed >= STAGE2_SEED_BASE:
        kwargs = phantom_kwargs_full(seed)
    else:
        kwargs = phantom_kwargs(seed)
    ph = make_chest_phantom(seed, **kwargs)
    affine = ph.ras_affine()
    assert ph.lung_zyx is not None
    data = prep(
        {
            "image": make_metatensor(ph.image_xyz(), affine),
            "label": make_metatensor(ph.labels_xyz().astype(np.float32), affine),
            "lung": make_metatensor(
                ph.lung_zyx.transpose(2, 1, 0).astype(np.float32), affine
            ),
        }
    )
    image = data["image"][0].numpy().astype(np.float16)
    label = (data["label"][0].numpy() >= 0.5).astype(np.uint8)
    lung = data["lung"][0].numpy() >= 0.5
    rng = np.random.default_rng(seed)
    near = ndimage.binary_dilation(lung[::2, ::2, ::2], iterations=3)
    dense = (image[::2, ::2, ::2] > 0.45) & (label[::2, ::2, ::2] == 0) & near
    comps, count = ndimage.label(label > 0)
    return Case(
        image,
        label,
        _indices(label > 0, rng, 20000),
        _indices(lung, rng, 50000, 2),
        _indices(dense, rng, 50000) * 2,
        _indices(image > BODY_LEVEL, rng, 50000, 2),
        [_indices(comps == c, rng, 2000) for c in range(1, count + 1)],
    )


def mine_hard_negatives(net: torch.nn.Module, cases: list[Case]) -> int:
    """Store, per case, voxels where ``net`` scores above ``MINE_LEVEL`` at least 3
    voxels away from any nodule (its false positives); returns their total count."""
    inferer = load_parser().get_parsed_content("inferer")
    net.eval()
    total = 0
    for case in cases:
        with torch.inference_mode():
            x = torch.from_numpy(case.image.astype(np.float32))[None, None]
            prob = torch.sigmoid(inferer(x, net))[0, 0].numpy()
        near = ndimage.binary_dilation(case.label > 0, iterations=3)
        hot = (prob > MINE_LEVEL) & ~near
        case.mined = _indices(hot, np.random.default_rng(int(hot.sum())), 20000)
        total += int(hot.sum())
    net.train()
    return total


def sample_patch(
    case: Case,
    size: tuple[int, int, int],
    rng: np.random.Generator,
    mix: tuple[float, ...] = STAGE1_MIX,
) -> tuple[np.ndarray, np.ndarray]:
    """A patch centred on a nodule, on dense tissue next to the lungs (vessels, walls,
    heart border), on lung, anywhere in the volume or anywhere in the body; ``mix``
    gives the probabilities in that order."""
    roll = rng.random()
    edges = np.cumsum(mix)
    shape = np.array(case.image.shape)
    if roll < edges[0] and case.comps:
        # every nodule equally often, whatever its size
        comp = case.comps[rng.integers(len(case.comps))]
        centre = comp[rng.integers(len(comp))] + rng.integers(-12, 13, size=3)
    elif roll < edges[0] and len(case.fg):
        centre = case.fg[rng.integers(len(case.fg))] + rng.integers(-12, 13, size=3)
    elif roll < edges[1] and len(case.hard):
        centre = case.hard[rng.integers(len(case.hard))]
    elif roll < edges[2] and len(case.lung):
        centre = case.lung[rng.integers(len(case.lung))]
    elif roll < edges[3] or not len(case.body):
        centre = rng.integers(0, shape)
    elif roll < edges[4] or not len(case.mined):
        centre = case.body[rng.integers(len(case.body))]
    else:
        centre = case.mined[rng.integers(len(case.mined))] + rng.integers(-8, 9, size=3)
    size_a = np.array(size)
    start = np.clip(centre - size_a // 2, 0, np.maximum(shape - size_a, 0))
    sl = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size_a))
    img = np.zeros(size, dtype=np.float32)
    lab = np.zeros(size, dtype=np.float32)
    part = case.image[sl]
    img[tuple(slice(0, n) for n in part.shape)] = part
    lab[tuple(slice(0, n) for n in part.shape)] = case.label[sl]
    return img, lab


def augment(
    img: np.ndarray,
    lab: np.ndarray,
    rng: np.random.Generator,
    nodule_shift: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Flips, in-plane 90-degree turns, intensity scale/shift, blur and noise; with
    probability ``nodule_shift``, the nodules' own attenuation is moved by -70 to
    +170 HU (through a softened mask, so the partial-volume rim follows): a network
    that tells nodules from vessels by brightness instead of shape misses dense
    nodules (+60 to +100 HU, as bright as unenhanced blood)."""
    if nodule_shift and lab.any() and rng.random() < nodule_shift:
        soft = ndimage.gaussian_filter(lab, sigma=1.0)
        img = np.clip(img + rng.uniform(-0.05, 0.12) * soft, 0.0, 1.0)
    for axis in range(3):
        if rng.random() < 0.5:
            img, lab = np.flip(img, axis), np.flip(lab, axis)
    if rng.random() < 0.5:
        img, lab = np.swapaxes(img, 0, 1), np.swapaxes(lab, 0, 1)
    img = np.ascontiguousarray(img)
    lab = np.ascontiguousarray(lab)
    if rng.random() < 0.25:
        img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.3, 1.0, size=3)).astype(
            np.float32
        )
    img = img * rng.uniform(0.88, 1.12) + rng.uniform(-0.05, 0.05)
    if rng.random() < 0.6:
        img = img + rng.normal(0, rng.uniform(0.0, 0.035), size=img.shape).astype(
            np.float32
        )
    return img.astype(np.float32), lab


def build_network() -> torch.nn.Module:
    """One UNet of the bundle (``unet_def``, random initialisation): trained as the
    nodule network, then fine-tuned into the mass network."""
    return load_parser().get_parsed_content("unet_def")


def load_cases(seeds: range, prep: Compose) -> list[Case]:
    cases = []
    for seed in seeds:
        cases.append(make_case(seed, prep))
        LOG.info(
            "case %d: shape %s, nodule voxels %d",
            seed,
            cases[-1].image.shape,
            int(cases[-1].label.sum()),
        )
    return cases


def run_stage(
    net: torch.nn.Module, cases: list[Case], args: argparse.Namespace, stage: int
) -> float:
    """One training stage (its own seeds, optimiser and one-cycle schedule)."""
    seed = args.seed + stage - 1
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    iters, lr, mix = {
        1: (args.iters, args.lr, STAGE1_MIX),
        2: (args.iters2, args.lr2, STAGE2_MIX),
        3: (args.iters3, args.lr3, STAGE3_MIX),
        4: (args.iters4, args.lr4, STAGE4_MIX),
        5: (args.iters5, args.lr5, STAGE5_MIX),
        6: (args.iters6, args.lr6, STAGE6_MIX),
        7: (args.iters7, args.lr7, STAGE7_MIX),
    }[stage]
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=iters, pct_start=0.05
    )
    loss_fn = DiceCELoss(sigmoid=True, batch=True, lambda_ce=1.0, lambda_dice=1.0)
    patch = tuple(args.patch)
    running, t0 = 0.0, time.time()
    for it in range(1, iters + 1):
        imgs, labs = [], []
        for _ in range(args.batch):
            case = cases[rng.integers(len(cases))]
            img, lab = augment(
                *sample_patch(case, patch, rng, mix), rng, NODULE_SHIFT.get(stage, 0.0)
            )
            imgs.append(img)
            labs.append(lab)
        x = torch.from_numpy(np.stack(imgs)[:, None])
        y = torch.from_numpy(np.stack(labs)[:, None])
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = 0.98 * running + 0.02 * value if it > 1 else value
        if it % 50 == 0 or it == iters:
            LOG.info(
                "stage %d iter %d/%d loss %.4f (%.0f s)",
                stage,
                it,
                iters,
                running,
                time.time() - t0,
            )
        if it % 250 == 0:
            save(net, args.out.with_suffix(".partial.pt"))
    return running


def train(args: argparse.Namespace) -> dict:
    """Run ``args.stages`` in order, each on its own phantoms (``STAGE_SEEDS``) with
    its own optimiser and schedule (see the README): 1, slabs and chests; 2, whole
    chests with more soft-tissue patches; 3 and 4, hard-negative fine-tuning (the
    nodule network); 5 and 6, a copy of it fine-tuned on chests with a mass (the
    mass network); 7, a copy fine-tuned on ground-glass and part-solid nodules and
    fissures (the subsolid network). ``args.out`` gets all three, packed for
    :class:`models.lung_nodules.networks.NoduleAndMassNet`. A run that starts after
    stage 1 starts from ``args.init`` (packed or one network: its nodule network), and
    a network none of its stages trains is taken from there."""
    torch.set_num_threads(args.threads)
    t0, c0 = time.time(), time.process_time()
    prep = bundle_preprocessing()
    torch.manual_seed(args.seed)
    net = build_network()
    init: dict[str, dict[str, torch.Tensor]] = {}
    if min(args.stages) > 1:
        init = unpack(torch.load(args.init, map_location="cpu", weights_only=True))
        first = min(args.stages)
        resumes_mass = first in MASS_STAGES and first > min(MASS_STAGES) and "mass" in init
        net.load_state_dict(init["mass" if resumes_mass else "nodule"])
    stats: dict = {
        "batch": args.batch,
        "patch": list(args.patch),
        "threads": args.threads,
        "seed": args.seed,
    }
    trained: dict[str, dict[str, torch.Tensor]] = {}
    previous = 0
    for stage in sorted(args.stages):
        if network_of(previous) != "nodule" and network_of(stage) != network_of(previous):
            # the stages so far fine-tuned a copy of the nodule network; start from the nodule network
            net.load_state_dict(trained.get("nodule") or init["nodule"])
        previous = stage
        started = time.time()
        suffix = "" if stage == 1 else str(stage)
        count = getattr(args, f"cases{suffix}")
        cases = load_cases(range(STAGE_SEEDS[stage], STAGE_SEEDS[stage] + count), prep)
        entry: dict = {"cases": count, "iters": getattr(args, f"iters{suffix}")}
        if stage in MINED_STAGES:
            entry["hard_negative_voxels"] = mine_hard_negatives(net, cases)
            LOG.info(
                "stage %d: %d hard-negative voxels mined",
                stage,
                entry["hard_negative_voxels"],
            )
        loss = run_stage(net, cases, args, stage)
        trained[network_of(stage)] = _state(net)
        save(net, args.out.with_suffix(f".stage{stage}.pt"))
        del cases
        stats[f"stage{stage}"] = {
            **entry,
            "final_loss": round(loss, 4),
            "wall_s": round(time.time() - started, 1),
        }
    nodule = trained.get("nodule") or init["nodule"]
    mass = trained.get("mass") or init.get("mass") or nodule
    subsolid = trained.get("subsolid") or init.get("subsolid")
    torch.save(pack(nodule, mass, subsolid), args.out)
    for stage in args.stages:
        args.out.with_suffix(f".stage{stage}.pt").unlink(missing_ok=True)
    args.out.with_suffix(".partial.pt").unlink(missing_ok=True)
    stats.update(
        wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1)
    )
    LOG.info("done: %s", stats)
    return stats


def network_of(stage: int) -> str:
    """The network a stage trains: "nodule", "mass" or "subsolid" (none before stage 1)."""
    return "mass" if stage in MASS_STAGES else "subsolid" if stage in SUBSOLID_STAGES else "nodule"


def pack(nodule: dict[str, torch.Tensor], mass: dict[str, torch.Tensor],
         subsolid: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One state dict for :class:`models.lung_nodules.networks.NoduleAndMassNet`."""
    networks = {"nodule": nodule, "mass": mass, **({"subsolid": subsolid} if subsolid is not None else {})}
    return {f"{name}.{k}": v for name, state in networks.items() for k, v in state.items()}


def unpack(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The networks of a packed state dict by name; a single network's is the nodule network."""
    if not any(k.startswith("nodule.") for k in state):
        return {"nodule": state}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, rest = key.split(".", 1)
        out.setdefault(name, {})[rest] = value
    return out


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def save(net: torch.nn.Module, out: Path) -> None:
    """One network's weights (a stage's checkpoint, next to the final file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_state(net), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=56)
    ap.add_argument("--cases2", type=int, default=24)
    ap.add_argument("--iters2", type=int, default=1200)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--cases3", type=int, default=30)
    ap.add_argument("--iters3", type=int, default=2000)
    ap.add_argument("--lr3", type=float, default=5e-4)
    ap.add_argument("--cases4", type=int, default=36)
    ap.add_argument("--iters4", type=int, default=2500)
    ap.add_argument("--lr4", type=float, default=3e-4)
    ap.add_argument("--cases5", type=int, default=30)
    ap.add_argument("--iters5", type=int, default=2000)
    ap.add_argument("--lr5", type=float, default=2e-4)
    ap.add_argument("--cases6", type=int, default=30)
    ap.add_argument("--iters6", type=int, default=1500)
    ap.add_argument("--lr6", type=float, default=1.5e-4)
    ap.add_argument("--cases7", type=int, default=30)
    ap.add_argument("--iters7", type=int, default=1500)
    ap.add_argument("--lr7", type=float, default=1.5e-4)
    ap.add_argument("--stages", type=int, nargs="+", default=list(DEFAULT_STAGES))
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="weights to start from when stage 1 is skipped",
    )
    ap.add_argument("--iters", type=int, default=4500)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs=3, default=[96, 96, 64])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=BUNDLE_ROOT / "models" / "model.pt")
    ap.add_argument("--stats", type=Path, default=BUNDLE_ROOT / "train_stats.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stats = train(args)
    args.stats.write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    main()
