"""Where the analysis of a real chest CT spends its time, on this machine's CPU.

    .venv/bin/python -m bench.real_ct_timing [FOLDER] [--rounds 3] [--threads N] [--json PATH]

``FOLDER`` defaults to ``../shared/fixtures/real_ct`` (not part of the repository; when
it is absent the benchmark says so and exits 0). For each series folder under it
(``annotations/`` excluded) the shipped lung-nodule plugin runs on the CPU, loaded once,
on the volume the node would build (series criteria opened as in :mod:`bench.real_ct`:
the series have 8 mm slices or are a DERIVED crop). Per round it records:

* the plugin's stages (preprocessing, inference, postprocessing, measure) and the
  process's CPU seconds for the whole analysis (wall time on a shared machine is noisy;
  CPU time less so);
* each postprocessing transform's wall time, and inside the candidate stage
  (``ClassifyCandidatesd.profile``) the lung gate, finding the candidates, the
  classifier, the merge and the finding scores;
* the number of candidates, the classifier views evaluated, and the cost per candidate
  (candidate finding and classifier seconds divided by the candidates).

Printed: one markdown table per series (first round, then the median and range of the
others). All rounds go to ``bench/out/real-ct-timing.json`` (or ``--json``).

``--stand-in SLICES,MM`` (for example ``64,5``) times, instead of each series as it is, a
stand-in of that size built from it (:func:`stand_in`): the slices interpolated to
``MM`` apart and the stack mirrored at both ends until it has ``SLICES`` slices. The
issue's size, a 64-slice 5 mm chest CT, covers 320 mm where the shared 8 mm series cover
240; the stand-in has a real chest's working grid and vessel count at that size, but
its extra 80 mm repeat anatomy (the apices and bases mirrored): a measure of cost, never
of findings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import OUT
from bench.real_ct import REAL_CT, series_folders

LOG = logging.getLogger("bench.real_ct_timing")
STAGES = ("preprocessing", "inference", "postprocessing", "measure")
CANDIDATE_STEPS = ("lung_gate", "candidates", "classifier", "merge", "finding_scores")


class _Timed:
    """A postprocessing transform that records its wall time under its class name."""

    def __init__(self, inner: Any, laps: dict[str, float]) -> None:
        self.inner, self.laps = inner, laps
        self.name = type(inner).__name__

    def __call__(self, data: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner(data)
        finally:
            self.laps[self.name] = self.laps.get(self.name, 0.0) + time.perf_counter() - started


def load(threads: int | None) -> tuple[Any, dict[str, float], Any]:
    """The shipped plugin on the CPU with each postprocessing transform timed; returns
    (plugin, the laps it fills, the candidate transform or None)."""
    from plugin.registry import load_plugin

    options: dict[str, Any] = {"device": "cpu"}
    if threads:
        options["num_threads"] = threads
    plugin = load_plugin("lung_nodules", options=options)
    laps: dict[str, float] = {}
    transforms = plugin.postprocessing.transforms
    classify = next((t for t in transforms if type(t).__name__ == "ClassifyCandidatesd"), None)
    plugin.postprocessing.transforms = [_Timed(t, laps) for t in transforms]
    return plugin, laps, classify


def volume_of(folder: Path, criteria: Any) -> Any:
    """The volume the node builds from ``folder``, criteria opened (evaluation series)."""
    from dicom_node.series import build_volume, select_series

    files = sorted(p for p in folder.iterdir() if p.is_file())
    opened = replace(criteria, min_slices=1, slice_spacing_mm=(0.0, 20.0), image_type_required=())
    try:
        selection = select_series(files, opened)
    except Exception:  # a DERIVED crop: accept its own ImageType, as bench.real_ct does
        selection = select_series(files, replace(opened, image_type_required=("DERIVED", "SECONDARY")))
    return build_volume(selection.paths, headers=selection.headers)


def stand_in(volume: Any, slices: int, step_mm: float) -> Any:
    """A ``slices``-slice volume ``step_mm`` apart built from ``volume``: each slice linearly
    interpolated between the source slices at its position, positions beyond either end
    of the stack mirrored back into it (so the anatomy at the ends repeats), centred on
    the source stack. Same in-plane grid; the affine's slice axis scaled and shifted. For
    timing only: it has no source images (``slices`` is empty), so no results can be
    encoded from it."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from plugin.types import Volume

    source = torch.as_tensor(volume.image)
    count, spacing = source.shape[-1], float(volume.spacing_mm[2])
    length = (count - 1) * spacing
    start = length / 2.0 - (slices - 1) * step_mm / 2.0
    position = start + step_mm * np.arange(slices)
    if length > 0:
        folded = position % (2.0 * length)  # mirrored at both ends: period 2 x length
        index = np.where(folded > length, 2.0 * length - folded, folded) / spacing
    else:
        index = np.zeros(slices)
    below = np.clip(np.floor(index).astype(np.int64), 0, count - 1)
    above = np.clip(below + 1, 0, count - 1)
    weight = torch.as_tensor(index - below, dtype=source.dtype)
    image = source[..., below] * (1 - weight) + source[..., above] * weight
    affine = np.array(volume.image.affine, dtype=np.float64)
    affine[:3, 3] += affine[:3, 2] * (start / spacing)
    affine[:3, 2] *= step_mm / spacing
    plain = torch.as_tensor(image).contiguous()  # none of the source's metadata (its shape, spacing)
    return Volume(image=MetaTensor(plain, affine=torch.as_tensor(affine)), slices=[],
                  study_instance_uid=volume.study_instance_uid, series_instance_uid=volume.series_instance_uid,
                  frame_of_reference_uid=volume.frame_of_reference_uid,
                  spacing_mm=(volume.spacing_mm[0], volume.spacing_mm[1], step_mm))


def one_round(plugin: Any, laps: dict[str, float], classify: Any, volume: Any) -> dict[str, Any]:
    """One analysis of ``volume``: stage, transform and candidate-step times."""
    laps.clear()
    cpu, started = time.process_time(), time.perf_counter()
    found = plugin.analyse(volume)
    row: dict[str, Any] = {"analyse_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                           "findings": len(found.findings), **{s: found.timings.get(s, 0.0) for s in STAGES},
                           "transforms": dict(laps)}
    profile = dict(getattr(classify, "profile", {}) or {})
    count = int(profile.pop("candidates_count", 0))
    row.update(candidates=count, views=int(profile.pop("views", 0)), steps=profile)
    if count:
        row["ms_per_candidate"] = 1000.0 * (profile.get("candidates", 0.0) + profile.get("classifier", 0.0)) / count
        row["classifier_ms_per_candidate"] = 1000.0 * profile.get("classifier", 0.0) / count
    return row


def _span(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def markdown(name: str, shape: tuple[int, ...], rounds: list[dict[str, Any]]) -> str:
    """Table of one series: first round, then the median (range) of the later ones."""
    later = rounds[1:] or rounds
    rows: list[tuple[str, list[float]]] = [(s, [r[s] for r in rounds]) for s in STAGES]
    names = sorted({k for r in rounds for k in r["transforms"]}, key=lambda k: -rounds[-1]["transforms"].get(k, 0))
    rows += [(f"postprocessing: {k}", [r["transforms"].get(k, 0.0) for r in rounds]) for k in names]
    rows += [(f"candidate stage: {k}", [r["steps"].get(k, 0.0) for r in rounds]) for k in CANDIDATE_STEPS]
    rows += [("**analyse (wall)**", [r["analyse_s"] for r in rounds]), ("analyse, CPU seconds", [r["cpu_s"] for r in rounds])]
    lines = [f"### {name}: {shape[0]} slices, {os.cpu_count()} cores, CPU", "",
             "| stage | first (s) | later: median (range) |", "|---|---|---|"]
    lines += [f"| {label} | {values[0]:.2f} | {_span(values[1:] or values)} |" for label, values in rows]
    last = later[-1]
    lines.append(f"| candidates; classifier views | {rounds[0]['candidates']}; {rounds[0]['views']} | "
                 f"{last['candidates']}; {last['views']} |")
    if last.get("candidates"):
        lines.append(f"| per candidate (finding + classifier), ms | {rounds[0]['ms_per_candidate']:.2f} | "
                     f"{_span([r['ms_per_candidate'] for r in later])} |")
    lines.append(f"| findings | {rounds[0]['findings']} | {last['findings']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time every series of the folder; print the tables."""
    parser = argparse.ArgumentParser(prog="python -m bench.real_ct_timing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=REAL_CT)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the plugin (default: all)")
    parser.add_argument("--series", default="", help="only the series whose folder name contains this")
    parser.add_argument("--json", type=Path, default=OUT / "real-ct-timing.json")
    parser.add_argument("--stand-in", default="", metavar="SLICES,MM",
                        help="time a stand-in of SLICES slices MM apart built from each series (e.g. 64,5)")
    args = parser.parse_args(argv)
    size: tuple[int, float] | None = None
    if args.stand_in:
        try:
            slices_text, mm_text = args.stand_in.split(",")
            size = (int(slices_text), float(mm_text))
        except ValueError:
            parser.error(f"--stand-in must be SLICES,MM (for example 64,5), got {args.stand_in!r}")
        if size[0] < 2 or size[1] <= 0:
            parser.error("--stand-in needs at least 2 slices and a positive spacing")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.folder.is_dir():
        print(f"bench.real_ct_timing: skipped, no real CT folder {args.folder}", file=sys.stderr)
        return 0
    folders = [f for f in series_folders(args.folder) if args.series in f.name]
    if not folders:
        print(f"bench.real_ct_timing: skipped, no series in {args.folder}", file=sys.stderr)
        return 0
    plugin, laps, classify = load(args.threads)
    results: dict[str, Any] = {}
    for folder in folders:
        volume = volume_of(folder, plugin.criteria)
        name = folder.name
        if size is not None:
            volume = stand_in(volume, *size)
            name = f"{folder.name}, stand-in {size[0]} slices of {size[1]:g} mm"
        rounds = []
        for n in range(args.rounds):
            rounds.append(one_round(plugin, laps, classify, volume))
            print(f"{name} round {n + 1}: analyse {rounds[-1]['analyse_s']:.2f} s, postprocessing "
                  f"{rounds[-1]['postprocessing']:.2f} s, {rounds[-1]['candidates']} candidates", file=sys.stderr)
        shape = tuple(int(n) for n in volume.image.shape[1:])
        results[name] = {"shape": shape, "rounds": rounds}
        print("\n" + markdown(name, shape[::-1], rounds) + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cores": os.cpu_count(), "series": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
