"""Evaluate the lung-nodule bundle on held-out chest-CT phantoms.

    python -m models.lung_nodules.evaluate                   # seeds 10000..10019
    python -m models.lung_nodules.evaluate --seeds 10000 10001 --json out.json
    python -m models.lung_nodules.evaluate --seeds $(seq 9000 9019)   # validation

Run from the repository root. Real CT series are evaluated by ``python -m bench.real_ct``
(it runs the node's own series selection and encoders, which a model never imports).

The phantoms come from seeds that training never uses (training: below 9000). Seeds
9000-9999 are the validation set (used to choose postprocessing settings); seeds
10000 and up are the held-out test set, reported in the README and never tuned on. Each is run
through the bundle in memory the way the generic MONAI bundle plugin runs it (see
``bundle_runner.py``): a (1, X, Y, Z) MetaTensor in HU with an RAS affine built from
the phantom geometry; the bundle's preprocessing, network, inferer and postprocessing;
a label map on the source grid. Per scan it reports:

* sensitivity for nodules >= 6 mm (detected = some kept predicted component overlaps it);
* false positives (kept predicted components that overlap no nodule at all);
* false findings (reported findings whose voxels overlap no nodule at all; unlike the
  component count, a false finding that touches a true one counts);
* long-axis error (mm) of each detected nodule >= 6 mm: the longest in-plane extent on
  the axial slice of largest area, for the prediction and the ground truth alike;
* Dice of each detected nodule >= 6 mm (ground truth vs the predicted components
  that overlap it);
* the reported measurements against the truth, for detected spherical nodules >= 6 mm
  that do not touch the pleura (their truth is analytic: ``4/3 pi r^3`` and the
  nodule's HU): volume error (%) and mean-attenuation error (HU), or "not measured"
  where the finding is too thin for a core (see ``plugin/lesion_measure.py``);
* the same for detected juxtapleural nodules >= 6 mm on slices of 2.5 mm or less,
  whose truth is the generator's label (the part on the lung's side of the pleura,
  counted in voxels: too coarse on thicker slices).

Predicted components smaller than the manifest's ``min_volume_mm3`` are dropped first,
as the plugin does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import ndimage
from scipy.spatial.distance import pdist

from models.lung_nodules.bundle_runner import BUNDLE_ROOT, BundleRunner, make_metatensor
from phantoms.chest_phantom import ChestPhantom, Nodule, make_chest_phantom
from plugin.types import Findings, Volume

EVAL_SEEDS = tuple(range(10000, 10020))
LOG = logging.getLogger("evaluate")
MIN_DIAMETER_MM = 6.0
MAX_PLEURAL_SLICE_MM = 2.5
STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


@dataclass
class ScanResult:
    """Metrics of one evaluated scan."""

    seed: int
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    nodules: int
    nodules_ge6: int
    detected_ge6: int
    false_positives: int
    false_findings: int | None = None  # None: no findings to count (the local runner)
    duplicate_findings: int | None = None  # findings beyond the first on one nodule or mass
    long_axis_errors_mm: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    missed_diameters_mm: list[float] = field(default_factory=list)
    inference_s: float = 0.0
    # (diameter mm, slice mm, reported / true volume - 1) per measured nodule
    volume_errors: list[tuple[float, float, float]] = field(default_factory=list)
    # (diameter mm, slice mm, reported - true mean HU, or None: not measured)
    hu_errors: list[tuple[float, float, float | None]] = field(default_factory=list)
    # the same two for juxtapleural nodules (truth: the label's voxels)
    pleural_volume_errors: list[tuple[float, float, float]] = field(default_factory=list)
    pleural_hu_errors: list[tuple[float, float, float | None]] = field(default_factory=list)
    # (diameter mm, found, reported as a mass) per nodule of 30 mm or more
    masses: list[tuple[float, bool, bool]] = field(default_factory=list)
    noise_hu: float = 0.0  # the phantom's noise (standard deviation, HU)
    # per nodule >= 6 mm under 30 mm: (diameter mm, density, found, reported mean HU or None,
    # reported composition or None, reported / true volume - 1 or None (spherical, not
    # juxtapleural), reported - true solid-component long axis mm or None (part-solid))
    densities: list[tuple[float, str, bool, float | None, str | None, float | None, float | None]] = field(
        default_factory=list)


def min_volume_mm3(bundle_root: Path = BUNDLE_ROOT) -> float:
    manifest = yaml.safe_load((bundle_root / "manifest.yaml").read_text())
    return float(manifest["labels"][1].get("min_volume_mm3", 0))


def eval_phantom(seed: int, masses: bool = False, noise_hu: float | None = None,
                 subsolid: bool = False) -> ChestPhantom:
    """Held-out phantom ``seed``: random geometry, 2-6 nodules of 4-30 mm; with
    ``masses``, one lobulated mass of 30-80 mm and 1-4 such nodules. ``noise_hu`` fixes
    the noise (drawn from 5-40 HU otherwise); the generator then draws the rest of the
    phantom differently, so a fixed-noise run is another set of held-out scans. With
    ``subsolid`` the same scan as without, its nodules made ground glass (40 %),
    part-solid (40 %) or left solid, and the fissures drawn."""
    rng = np.random.default_rng(seed)
    if subsolid:
        draw = np.random.default_rng([seed, 2])
        densities = [str(d) for d in draw.choice(["ground_glass", "part_solid", "solid"], size=8, p=[0.4, 0.4, 0.2])]
        return make_chest_phantom(seed, n_nodules=int(rng.integers(2, 7)), noise_hu=noise_hu,
                                  nodule_densities=densities, fissures=True)
    if not masses:
        return make_chest_phantom(seed, n_nodules=int(rng.integers(2, 7)), noise_hu=noise_hu)
    nodules = list(np.exp(rng.uniform(np.log(4.0), np.log(30.0), size=int(rng.integers(1, 5)))))
    return make_chest_phantom(seed, nodule_diameters_mm=[float(rng.uniform(30.0, 80.0)), *nodules],
                              nodule_kinds=["irregular"] + ["spherical"] * len(nodules), noise_hu=noise_hu)


def predicted_components(
    pred_zyx: np.ndarray, voxel_mm3: float, min_mm3: float
) -> tuple[np.ndarray, int]:
    """Connected components of the prediction, small ones removed (renumbered 1..n)."""
    comp, n = ndimage.label(pred_zyx > 0, structure=STRUCTURE)
    if n == 0:
        return comp, 0
    sizes = np.bincount(comp.ravel(), minlength=n + 1) * voxel_mm3
    keep = np.flatnonzero(sizes >= min_mm3)
    keep = keep[keep > 0]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[comp], len(keep)


def long_axis_mm(
    mask_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> float:
    """Longest in-plane extent (mm) on the axial slice where the mask is largest."""
    areas = mask_zyx.reshape(mask_zyx.shape[0], -1).sum(axis=1)
    if areas.max() == 0:
        return 0.0
    sl = mask_zyx[int(np.argmax(areas))]
    edge = sl & ~ndimage.binary_erosion(sl)
    pts = np.argwhere(edge).astype(np.float64) * np.array(spacing_zyx[1:])
    if len(pts) < 2:
        return float(max(spacing_zyx[1:]))
    return float(pdist(pts).max())


def score(phantom: ChestPhantom, pred_zyx: np.ndarray, min_mm3: float,
          findings: Findings | None = None) -> ScanResult:
    """Compare a predicted label map (Z, Y, X) with the phantom's ground truth; with the
    plugin's ``findings`` (whose label map ``pred_zyx`` is) also their measurements."""
    spacing = phantom.spacing_zyx
    comp, n_pred = predicted_components(pred_zyx, float(np.prod(spacing)), min_mm3)
    gt, n_gt = ndimage.label(phantom.labels_zyx > 0, structure=STRUCTURE)
    diameters = _gt_diameters(phantom, gt, n_gt)
    res = ScanResult(
        phantom.seed,
        tuple(pred_zyx.shape),
        spacing,
        n_gt,
        int(sum(d >= MIN_DIAMETER_MM for d in diameters.values())),
        0,
        0,
    )
    matched: set[int] = set()
    boxes = ndimage.find_objects(gt)
    for g in range(1, n_gt + 1):
        box = _grow(boxes[g - 1], gt.shape, 8)
        gmask = gt[box] == g
        hits = np.unique(comp[box][gmask])
        hits = hits[hits > 0]
        matched.update(int(h) for h in hits)
        if diameters[g] < MIN_DIAMETER_MM:
            continue
        if len(hits) == 0:
            res.missed_diameters_mm.append(round(diameters[g], 1))
            continue
        res.detected_ge6 += 1
        pmask = np.isin(comp[box], hits)
        inter = float(np.logical_and(gmask, pmask).sum())
        res.dice.append(2 * inter / float(gmask.sum() + pmask.sum()))
        res.long_axis_errors_mm.append(
            abs(long_axis_mm(pmask, spacing) - long_axis_mm(gmask, spacing))
        )
    res.false_positives = n_pred - len(matched)
    res.noise_hu = round(float(phantom.params.get("noise_hu", 0.0)), 1)
    if findings is not None:
        reported = [f.label for f in findings.findings if f.role != "structure"]
        res.false_findings = false_findings(pred_zyx, gt, reported)
        res.duplicate_findings = duplicate_findings(pred_zyx, gt, reported)
        _score_measurements(phantom, pred_zyx, gt, findings, res)
        _score_masses(phantom, pred_zyx, gt, findings, res)
        _score_densities(phantom, pred_zyx, gt, findings, res)
    return res


def false_findings(labels_zyx: np.ndarray, gt: np.ndarray, reported: list[int]) -> int:
    """How many of the ``reported`` findings' labels have no voxel of ``labels_zyx`` in a
    ground-truth nodule or mass (``gt`` > 0)."""
    true = set(np.unique(labels_zyx[gt > 0]).tolist())
    return sum(1 for label in reported if label not in true)


def duplicate_findings(labels_zyx: np.ndarray, gt: np.ndarray, reported: list[int]) -> int:
    """How many of the ``reported`` findings are a second (third, ...) finding on one
    ground-truth nodule or mass (``gt``: its connected components 1..n): a lesion the
    report lists twice, as a reader would count it."""
    inside = (gt > 0) & np.isin(labels_zyx, reported)
    pairs = np.unique(np.stack([gt[inside].astype(np.int64), labels_zyx[inside].astype(np.int64)]), axis=1)
    lesions = np.unique(pairs[0])
    return int(pairs.shape[1] - lesions.size)


def _score_densities(phantom: ChestPhantom, labels_zyx: np.ndarray, gt: np.ndarray,
                     findings: Findings, res: ScanResult) -> None:
    """Per nodule of 6-30 mm: its density, found, and what the report gives the largest
    finding overlapping it: mean attenuation (None where not measured), composition,
    volume error (spherical nodules off the pleura) and the solid component's long-axis
    error (part-solid nodules)."""
    by_label = {f.label: f for f in findings.findings}
    for nod in phantom.nodules:
        if not MIN_DIAMETER_MM <= nod.diameter_mm < 30.0:
            continue
        component = _gt_component(nod, gt)
        if not component:
            continue
        hits = [by_label[h] for h in set(np.unique(labels_zyx[gt == component]).tolist()) - {0} if h in by_label]
        best = max(hits, key=lambda f: f.volume_mm3, default=None)
        hu = round(best.mean_hu, 1) if best is not None and best.attenuation_from_core else None
        composition = volume = solid_axis = None
        if best is not None:
            composition = best.composition
            if nod.kind == "spherical" and not nod.juxtapleural:
                volume = round(best.volume_mm3 / (np.pi / 6.0 * nod.diameter_mm**3) - 1.0, 4)
            if nod.solid_diameter_mm is not None and best.solid_long_axis_mm is not None:
                solid_axis = round(best.solid_long_axis_mm - nod.solid_diameter_mm, 2)
        res.densities.append((round(nod.diameter_mm, 1), nod.density, bool(hits), hu, composition, volume, solid_axis))


def _score_masses(phantom: ChestPhantom, labels_zyx: np.ndarray, gt: np.ndarray,
                  findings: Findings, res: ScanResult) -> None:
    """Per nodule of 30 mm or more: found (a finding overlaps it) and named "Mass"."""
    names = {f.label: f.name for f in findings.findings}
    for nod in phantom.nodules:
        if nod.diameter_mm < 30.0:
            continue
        component = _gt_component(nod, gt)
        if not component:
            continue
        hits = set(np.unique(labels_zyx[gt == component]).tolist()) - {0}
        res.masses.append((round(nod.diameter_mm, 1), bool(hits),
                           any(names.get(int(h), "").startswith("Mass") for h in hits)))


def _score_measurements(phantom: ChestPhantom, labels_zyx: np.ndarray, gt: np.ndarray,
                        findings: Findings, res: ScanResult) -> None:
    """Reported volume and mean HU against the analytic truth (see the module docstring)."""
    by_label = {f.label: f for f in findings.findings}
    slice_mm = float(phantom.spacing_zyx[0])
    for nod in phantom.nodules:
        if nod.diameter_mm < MIN_DIAMETER_MM or nod.kind != "spherical":
            continue
        if nod.juxtapleural and slice_mm > MAX_PLEURAL_SLICE_MM:
            continue
        component = _gt_component(nod, gt)
        if not component:
            continue
        region = gt == component
        hits = np.bincount(labels_zyx[region].astype(np.int64).ravel())
        hits[0] = 0
        if hits.max() == 0:
            continue  # missed
        finding = by_label.get(int(np.argmax(hits)))
        if finding is None:
            continue
        if nod.juxtapleural:
            truth = float(region.sum()) * float(np.prod(phantom.spacing_zyx))
            volumes, hus = res.pleural_volume_errors, res.pleural_hu_errors
        else:
            truth = np.pi / 6.0 * nod.diameter_mm**3
            volumes, hus = res.volume_errors, res.hu_errors
        volumes.append((round(nod.diameter_mm, 1), slice_mm, round(finding.volume_mm3 / truth - 1, 4)))
        if nod.density == "solid":  # a part-solid nodule has no one attenuation to compare
            hus.append((round(nod.diameter_mm, 1), slice_mm,
                        round(finding.mean_hu - nod.hu, 1) if finding.attenuation_from_core else None))


def _gt_component(nodule: Nodule, gt: np.ndarray) -> int:
    """The ground-truth component at ``nodule``'s centre voxel (0: none, or outside)."""
    idx = tuple(round(c) for c in nodule.centre_voxel_zyx)
    return int(gt[idx]) if all(0 <= i < n for i, n in zip(idx, gt.shape)) else 0


def _gt_diameters(phantom: ChestPhantom, gt: np.ndarray, n_gt: int) -> dict[int, float]:
    """Nominal diameter of each ground-truth component (from the nodule records)."""
    out = {g: 0.0 for g in range(1, n_gt + 1)}
    for nod in phantom.nodules:
        g = _gt_component(nod, gt)
        if g:
            out[g] = max(out[g], nod.diameter_mm)
    for g, d in out.items():  # a component without a record: equivalent diameter
        if d == 0.0:
            vol = float((gt == g).sum()) * float(np.prod(phantom.spacing_zyx))
            out[g] = float((6 * vol / np.pi) ** (1 / 3))
    return out


def _grow(box: tuple[slice, ...], shape: tuple[int, ...], m: int) -> tuple[slice, ...]:
    return tuple(
        slice(max(s.start - m, 0), min(s.stop + m, n)) for s, n in zip(box, shape)
    )


def make_runner(kind: str = "plugin", weights: Path | None = None, bundle: Path = BUNDLE_ROOT) -> Any:
    """The generic plugin (``kind="plugin"``, on the bundle folder ``bundle``) or this
    folder's minimal in-memory runner."""
    if kind == "plugin" and weights is None:
        from plugin.monai_bundle import MonaiBundlePlugin

        return MonaiBundlePlugin(bundle, device="cpu")
    return BundleRunner(weights=weights)


def as_volume(phantom: ChestPhantom) -> Volume:
    """The phantom as the node would hand it to a plugin (no source files)."""
    image = make_metatensor(phantom.image_xyz(), phantom.ras_affine())
    dz, dy, dx = phantom.spacing_zyx
    return Volume(
        image=image,
        slices=[],
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        frame_of_reference_uid="2.25.3",
        spacing_mm=(dx, dy, dz),
    )


def run_bundle(runner: Any, phantom: ChestPhantom) -> tuple[np.ndarray, float, Findings | None]:
    """Label map (Z, Y, X) for ``phantom``, the analysis wall time and (from the plugin)
    the findings; the map holds each finding's label, or 1 from the local runner."""
    volume = as_volume(phantom)
    t0 = time.perf_counter()
    findings = None
    if isinstance(runner, BundleRunner):
        pred_xyz = runner(volume.image)
    else:
        findings = runner.analyse(volume)
        pred_xyz = findings.label_map
    return pred_xyz.transpose(2, 1, 0), time.perf_counter() - t0, findings


def summarise(results: list[ScanResult]) -> dict[str, float]:
    ge6 = sum(r.nodules_ge6 for r in results)
    det = sum(r.detected_ge6 for r in results)
    errs = [e for r in results for e in r.long_axis_errors_mm]
    dice = [d for r in results for d in r.dice]
    return {
        "scans": len(results),
        "nodules_ge6mm": ge6,
        "sensitivity_ge6mm": round(det / ge6, 3) if ge6 else float("nan"),
        "false_positives_per_scan": round(
            float(np.mean([r.false_positives for r in results])), 3
        ),
        **({"false_findings_per_scan": round(float(np.mean([r.false_findings for r in results])), 3)}
           if results and all(r.false_findings is not None for r in results) else {}),
        **({"duplicate_findings_per_scan": round(float(np.mean([r.duplicate_findings for r in results])), 3)}
           if results and all(r.duplicate_findings is not None for r in results) else {}),
        "median_long_axis_error_mm": round(float(np.median(errs)), 2)
        if errs
        else float("nan"),
        "mean_dice_ge6mm": round(float(np.mean(dice)), 3) if dice else float("nan"),
        "min_dice_ge6mm": round(float(np.min(dice)), 3) if dice else float("nan"),
        "fraction_dice_ge_0.70": round(float(np.mean(np.array(dice) >= 0.7)), 3)
        if dice
        else 0.0,
        "median_inference_s": round(
            float(np.median([r.inference_s for r in results])), 2
        ),
        **_measurement_summary(results),
    }


def _measurement_summary(results: list[ScanResult]) -> dict[str, float]:
    pleural = np.array([e for r in results for _, _, e in r.pleural_volume_errors])
    pleural_hu = np.array([e for r in results for d, _, e in r.pleural_hu_errors if d >= 8.0 and e is not None])
    pleural_summary: dict[str, float] = {
        "juxtapleural_measured": int(pleural.size),
        "juxtapleural_median_abs_volume_error": round(float(np.median(np.abs(pleural))), 3),
        "juxtapleural_volume_within_20_percent": round(float(np.mean(np.abs(pleural) <= 0.2)), 3),
        "juxtapleural_max_abs_hu_error_ge8mm": round(float(np.max(np.abs(pleural_hu))), 1) if pleural_hu.size else float("nan"),
    } if pleural.size else {}
    volume = np.array([e for r in results for _, _, e in r.volume_errors])
    hu = [(d, e) for r in results for d, _, e in r.hu_errors]
    measured = np.array([e for d, e in hu if d >= 8.0 and e is not None])
    density_summary: dict[str, float] = {}
    for density in ("solid", "ground_glass", "part_solid"):
        rows = [d for r in results for d in r.densities if d[1] == density]
        if rows and any(d[1] != "solid" for r in results for d in r.densities):
            density_summary[f"{density}_ge6mm"] = len(rows)
            density_summary[f"{density}_found"] = sum(d[2] for d in rows)
            reported = [d[3] for d in rows if d[2] and d[3] is not None]
            density_summary[f"{density}_median_reported_hu"] = round(float(np.median(reported)), 1) if reported else float("nan")
            found = [d for d in rows if d[2]]
            density_summary[f"{density}_composition_right"] = sum(d[4] == density for d in found)
            volumes = np.array([d[5] for d in found if d[5] is not None])
            if volumes.size:
                density_summary[f"{density}_median_volume_error"] = round(float(np.median(volumes)), 3)
                density_summary[f"{density}_volume_within_20_percent"] = round(float(np.mean(np.abs(volumes) <= 0.2)), 3)
            solid = np.array([d[6] for d in found if d[6] is not None])
            if solid.size:
                density_summary[f"{density}_median_solid_axis_error_mm"] = round(float(np.median(solid)), 2)
                density_summary[f"{density}_solid_axis_within_2mm"] = round(float(np.mean(np.abs(solid) <= 2.0)), 3)
    masses = [m for r in results for m in r.masses]
    mass_summary: dict[str, float] = {"masses": len(masses), "masses_found": sum(m[1] for m in masses),
                    "masses_named_mass": sum(m[2] for m in masses)} if masses else {}
    if volume.size == 0:
        return {**mass_summary, **pleural_summary, **density_summary}
    return {
        **mass_summary,
        **density_summary,
        **pleural_summary,
        "measured_nodules": int(volume.size),
        "median_abs_volume_error": round(float(np.median(np.abs(volume))), 3),
        "max_abs_volume_error": round(float(np.max(np.abs(volume))), 3),
        "volume_within_20_percent": round(float(np.mean(np.abs(volume) <= 0.2)), 3),
        "hu_ge8mm_measured": int(measured.size),
        "hu_ge8mm_not_measured": sum(1 for d, e in hu if d >= 8.0 and e is None),
        "max_abs_hu_error_ge8mm": round(float(np.max(np.abs(measured))), 1) if measured.size else float("nan"),
        "median_hu_error_ge8mm": round(float(np.median(measured)), 1) if measured.size else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(EVAL_SEEDS))
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runner", choices=("plugin", "local"), default="plugin")
    ap.add_argument("--bundle", type=Path, default=BUNDLE_ROOT,
                    help="a copy of this bundle to evaluate instead (e.g. with candidate weights)")
    ap.add_argument("--masses", action="store_true",
                    help="phantoms with one mass of 30-80 mm and 1-4 nodules (seeds 9500-9599 validate)")
    ap.add_argument("--subsolid", action="store_true",
                    help="the same phantoms with ground-glass and part-solid nodules and fissures")
    ap.add_argument("--noise", type=float, default=None,
                    help="fix the phantoms' noise (HU standard deviation; drawn from 5-40 otherwise)")
    ap.add_argument("--real", type=Path, default=None, help="moved: python -m bench.real_ct FOLDER --out DIR")
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.real is not None:
        more = (f" --out {args.out}" if args.out else "") + (f" --bundle {args.bundle}" if args.bundle != BUNDLE_ROOT else "")
        ap.exit(2, "the real-CT evaluation runs the node's series selection and encoders and moved to bench/: "
                   f"python -m bench.real_ct {args.real}{more}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    runner = make_runner(args.runner, args.weights, args.bundle)
    min_mm3 = min_volume_mm3()
    results = []
    for seed in args.seeds:
        if seed < 9000:
            raise SystemExit(
                "evaluation seeds start at 9000 (lower seeds are for training)"
            )
        phantom = eval_phantom(seed, args.masses, args.noise, args.subsolid)
        pred, seconds, findings = run_bundle(runner, phantom)
        res = score(phantom, pred, min_mm3, findings)
        res.inference_s = round(seconds, 2)
        results.append(res)
        LOG.info(json.dumps(asdict(res)))
    summary = summarise(results)
    LOG.info(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"summary": summary, "scans": [asdict(r) for r in results]}, indent=2
            )
        )


if __name__ == "__main__":
    main()
