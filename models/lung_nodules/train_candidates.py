"""Train the nodule-candidate classifier (``models/candidates.pt``) on generated phantoms (CPU).

    nice -n 15 python -m models.lung_nodules.train_candidates     # about 40 min on 2 cores

Seeded and reproducible. Phantoms: :func:`phantoms.chest_phantom.make_chest_phantom`
with seeds 600-719 (3-8 nodules of 4-30 mm each, random scanner geometry) and 720-979
(the same, at 2.5, 3 or 5 mm slices, where thick vessel segments look most like
nodules), which no other training stage and no evaluation uses (``evaluate.py``: 9000+).
Each phantom goes through the bundle's own preprocessing (``train.bundle_preprocessing``);
its candidates are found exactly as at inference (:func:`candidates.find_candidates` on
the lung gate of :func:`transforms.lung_region`). A candidate is a positive when the
patch's centre (its thickest point) lies within ``POSITIVE_MM`` of a nodule of the ground
truth. A candidate whose core touches a nodule but whose centre lies farther away (a
vessel or the chest wall merged with the nodule's core) is left out up to
``AMBIGUOUS_MM`` and a negative beyond. All positives, every thick or large negative
(thickness >= 3 mm or core >= 20 mm^3: the vessel segments and branchings that look like
nodules) and 80 other negatives per phantom are kept. The patches of each phantom are
cached in ``--work`` so that an interrupted run resumes; ``--jobs`` generates phantoms
in parallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from scipy import ndimage

from models.lung_nodules.bundle_runner import BUNDLE_ROOT, make_metatensor
from models.lung_nodules.candidates import build_classifier, find_candidates, patches, quantised
from models.lung_nodules.train import EVAL_SEED_MIN, bundle_preprocessing
from models.lung_nodules.transforms import lung_region
from phantoms.chest_phantom import make_chest_phantom

LOG = logging.getLogger("train_candidates")
SEEDS = range(600, 720)
THICK_SEEDS = range(720, 980)
THICK_SLICES_MM = (2.5, 3.0, 5.0)
POSITIVE_MM = 1.0
AMBIGUOUS_MM = 5.0
EASY_NEGATIVES = 80
BATCH = 64
POSITIVE_SHARE = 0.25  # of each batch
LOG_FORMAT = "%(asctime)s %(message)s"


def phantom_patches(seed: int, prep: object) -> tuple[np.ndarray, np.ndarray]:
    """(patches uint8 (N, X, Y, Z), labels (N,)) of phantom ``seed``'s candidates."""
    assert seed < EVAL_SEED_MIN, "training must never use evaluation seeds"
    rng = np.random.default_rng(seed)
    n_nodules = int(rng.integers(3, 9))
    slice_mm = float(rng.choice(THICK_SLICES_MM)) if seed in THICK_SEEDS else None
    ph = make_chest_phantom(seed, n_nodules=n_nodules, slice_spacing_mm=slice_mm)
    affine = ph.ras_affine()
    assert ph.lung_zyx is not None
    data = prep({  # type: ignore[operator]
        "image": make_metatensor(ph.image_xyz(), affine),
        "label": make_metatensor(ph.labels_xyz().astype(np.float32), affine),
        "lung": make_metatensor(ph.lung_zyx.transpose(2, 1, 0).astype(np.float32), affine),
    })
    image = data["image"][0].numpy().astype(np.float32)
    label = data["label"][0].numpy() >= 0.5
    spacing = np.asarray(affine_to_spacing(np.asarray(data["image"].affine, dtype=np.float64), r=3))
    cands = find_candidates(image, spacing, lung_region(image, step=2), step=2)
    touches = np.zeros(cands.count + 1, dtype=bool)
    touches[np.unique(cands.cores[label[cands.box]])] = True
    far = ndimage.distance_transform_edt(~label, sampling=spacing)[tuple(cands.centres.T)]
    positive = far <= POSITIVE_MM
    ambiguous = ~positive & touches[1:] & (far <= AMBIGUOUS_MM)
    ids = np.arange(1, cands.count + 1)
    size_mm3 = np.bincount(cands.cores.ravel(), minlength=cands.count + 1)[1:] * float(np.prod(spacing))
    negative = ~positive & ~ambiguous
    hard = negative & ((cands.thickness_mm >= 3.0) | (size_mm3 >= 20.0))
    easy = ids[negative & ~hard]
    pick = np.concatenate([ids[positive | hard],
                           rng.choice(easy, size=min(len(easy), EASY_NEGATIVES), replace=False)])
    pick.sort()
    return patches(quantised(image), cands.centres[pick - 1]), positive[pick - 1].astype(np.uint8)


def _cache_path(work: Path, seed: int) -> Path:
    return work / f"{seed}-blobs.npz"  # "-blobs": cores split into blobs, labelled by the centre's distance


def _generator_init() -> None:
    """A generating process: its own log output, one torch thread (the processes share the cores)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    torch.set_num_threads(1)


def _generate(seed: int, work: Path) -> None:
    t0 = time.perf_counter()
    x, y = phantom_patches(seed, bundle_preprocessing())
    path = _cache_path(work, seed)
    np.savez(path.with_suffix(".tmp.npz"), x=x, y=y)
    path.with_suffix(".tmp.npz").replace(path)
    LOG.info("seed %d: %d candidates kept, %d positive (%.1f s)", seed, len(y), int(y.sum()),
             time.perf_counter() - t0)


def collect(seeds: list[int], work: Path, jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All phantoms' patches and labels, generated once per seed into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    missing = [seed for seed in seeds if not _cache_path(work, seed).exists()]
    if jobs > 1 and missing:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_generator_init) as pool:
            list(pool.map(_generate, missing, [work] * len(missing)))
    else:
        for seed in missing:
            _generate(seed, work)
    xs, ys = [], []
    for seed in seeds:
        with np.load(_cache_path(work, seed)) as z:
            xs.append(z["x"])
            ys.append(z["y"])
    return np.concatenate(xs), np.concatenate(ys)


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips on every axis and a quarter turn in the axial plane."""
    for axis in range(3):
        if rng.random() < 0.5:
            x = np.flip(x, axis)
    return np.ascontiguousarray(np.rot90(x, k=int(rng.integers(4)), axes=(0, 1)))


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    """Balanced minibatches (a quarter positives), AdamW with a one-cycle schedule."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_classifier()
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos = int(BATCH * POSITIVE_SHARE)
    steps = (len(neg) + 3 * len(pos)) // BATCH
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for epoch in range(epochs):
        net.train()
        total, t0 = 0.0, time.perf_counter()
        for _ in range(steps):
            idx = np.concatenate([rng.choice(pos, n_pos), rng.choice(neg, BATCH - n_pos)])
            batch = np.stack([augment(x[i], rng) for i in idx]).astype(np.float32) / 255.0
            batch = batch * rng.uniform(0.95, 1.05, (len(idx), 1, 1, 1)) + rng.normal(0, 0.01, batch.shape)
            xb = torch.from_numpy(batch.astype(np.float32))[:, None]
            yb = torch.from_numpy(y[idx].astype(np.float32))[:, None]
            loss = loss_fn(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.item())
        losses.append(round(total / steps, 4))
        LOG.info("epoch %d: loss %.4f (%.0f s)", epoch, losses[-1], time.perf_counter() - t0)
    net.eval()
    return net, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="phantoms generated in parallel")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lung_nodules_candidates"))
    ap.add_argument("--out", type=Path, default=BUNDLE_ROOT / "models" / "candidates.pt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    seeds = [*SEEDS, *THICK_SEEDS]
    x, y = collect(seeds, args.work, args.jobs)
    LOG.info("%d patches, %d positive (%.0f s)", len(y), int(y.sum()), time.perf_counter() - t0)
    net, losses = train(x, y, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out)
    stats = {"seeds": [[SEEDS.start, SEEDS.stop - 1], [THICK_SEEDS.start, THICK_SEEDS.stop - 1]],
             "positive_mm": POSITIVE_MM, "ambiguous_mm": AMBIGUOUS_MM, "patches": int(len(y)), "positives": int(y.sum()),
             "epochs": args.epochs, "losses": losses, "wall_s": round(time.perf_counter() - t0)}
    args.out.with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    LOG.info("wrote %s: %s", args.out, json.dumps(stats))


if __name__ == "__main__":
    main()
