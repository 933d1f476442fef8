"""Train the nodule-candidate classifier (``models/candidates.pt``) on generated phantoms (CPU).

    nice -n 15 python models/lung_nodules/train_candidates.py     # about 30 min on 2 cores

Seeded and reproducible. Phantoms: :func:`dicom_node.synthetic.chest_phantom.make_chest_phantom`
with seeds 600-719 (3-8 nodules of 4-30 mm each, random scanner geometry), which no
other training stage and no evaluation uses (``evaluate.py``: 9000+). Each phantom goes
through the bundle's own preprocessing (``train.bundle_preprocessing``); its candidates
are found exactly as at inference (:func:`candidates.find_candidates` on the lung gate of
:func:`transforms.lung_region`). A candidate whose core touches a nodule of the ground
truth is a positive. All positives, every thick or large negative (thickness >= 3 mm or
core >= 20 mm^3: the vessel segments and branchings that look like nodules) and 80
other negatives per phantom are kept. The patches of each phantom are cached in
``--work`` so that an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import affine_to_spacing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_runner import BUNDLE_ROOT, make_metatensor
from candidates import build_classifier, find_candidates, patches, quantised
from train import EVAL_SEED_MIN, bundle_preprocessing
from transforms import lung_region

from dicom_node.synthetic.chest_phantom import make_chest_phantom

LOG = logging.getLogger("train_candidates")
SEEDS = range(600, 720)
EASY_NEGATIVES = 80
BATCH = 64
POSITIVE_SHARE = 0.25  # of each batch


def phantom_patches(seed: int, prep: object) -> tuple[np.ndarray, np.ndarray]:
    """(patches uint8 (N, X, Y, Z), labels (N,)) of phantom ``seed``'s candidates."""
    assert seed < EVAL_SEED_MIN, "training must never use evaluation seeds"
    rng = np.random.default_rng(seed)
    ph = make_chest_phantom(seed, n_nodules=int(rng.integers(3, 9)))
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
    positive = np.zeros(cands.count + 1, dtype=bool)
    positive[np.unique(cands.cores[label[cands.box]])] = True
    positive[0] = False
    ids = np.arange(1, cands.count + 1)
    size_mm3 = np.bincount(cands.cores.ravel(), minlength=cands.count + 1)[1:] * float(np.prod(spacing))
    hard = ~positive[1:] & ((cands.thickness_mm >= 3.0) | (size_mm3 >= 20.0))
    easy = ids[~positive[1:] & ~hard]
    pick = np.concatenate([ids[positive[1:] | hard],
                           rng.choice(easy, size=min(len(easy), EASY_NEGATIVES), replace=False)])
    pick.sort()
    return patches(quantised(image), cands.centres[pick - 1]), positive[pick].astype(np.uint8)


def collect(seeds: range, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """All phantoms' patches and labels, generated once per seed into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    prep = bundle_preprocessing()
    xs, ys = [], []
    for seed in seeds:
        path = work / f"{seed}.npz"
        if not path.exists():
            t0 = time.perf_counter()
            x, y = phantom_patches(seed, prep)
            np.savez(path, x=x, y=y)
            LOG.info("seed %d: %d candidates kept, %d positive (%.1f s)", seed, len(y), int(y.sum()),
                     time.perf_counter() - t0)
        with np.load(path) as z:
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
    ap.add_argument("--first-seed", type=int, default=SEEDS.start)
    ap.add_argument("--last-seed", type=int, default=SEEDS.stop - 1)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lung_nodules_candidates"))
    ap.add_argument("--out", type=Path, default=BUNDLE_ROOT / "models" / "candidates.pt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    x, y = collect(range(args.first_seed, args.last_seed + 1), args.work)
    LOG.info("%d patches, %d positive (%.0f s)", len(y), int(y.sum()), time.perf_counter() - t0)
    net, losses = train(x, y, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), args.out)
    stats = {"seeds": [args.first_seed, args.last_seed], "patches": int(len(y)), "positives": int(y.sum()),
             "epochs": args.epochs, "losses": losses, "wall_s": round(time.perf_counter() - t0)}
    args.out.with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    LOG.info("wrote %s: %s", args.out, json.dumps(stats))


if __name__ == "__main__":
    main()
