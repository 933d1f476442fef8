"""Run the shipped analysis on real CT series and show every finding for a person to judge.

    .venv/bin/python -m bench.real_ct [FOLDER] [--out real-ct-eval] [--bundle DIR] [--threads 2]

``FOLDER`` defaults to ``../shared/fixtures/real_ct`` (not part of the repository). For
each series folder under it (``annotations/`` is read, not analysed) the series goes the
node's way: series selection, the volume builder, the generic MONAI bundle plugin, the SR
encoder, and the SR read back as a viewer reads it. Per series it prints the findings
(name, the model's score, long and short axis, volume, attenuation, position in LPS, and
whether the position lies in an annotated tumour box of ``annotations/boxes.csv``) and
writes ``<out>/<series>.png``: the key slice of every finding with its outline and long
axis, as the demo's preview.

It lives here, not in ``models/lung_nodules/``, because it runs the node's own series
selection and result encoders (``dicom_node``), which a model package never imports.

The folder's series have 8 mm slices (30 slices) or are a crop marked DERIVED: the
model's series criteria (64 or more ORIGINAL slices of 0.5-5 mm) refuse them. The
criteria are opened *for this evaluation only* (any slice count and spacing up to 20 mm,
the series' own ImageType accepted) and the output says so.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom import dcmread

from bench.common import REPO

LOG = logging.getLogger("bench.real_ct")
REAL_CT = REPO.parent / "shared" / "fixtures" / "real_ct"


@dataclass(frozen=True)
class TumourBox:
    """One annotated slice of a tumour: its box in patient (LPS) mm."""

    series: str
    centre: tuple[float, float, float]
    size: tuple[float, float]  # width (x), height (y) mm


def series_folders(root: Path) -> list[Path]:
    """The folders under ``root`` holding DICOM files (``annotations`` excluded)."""
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name != "annotations" and any(p.glob("*.dcm")))


def tumour_boxes(root: Path) -> list[TumourBox]:
    """The annotated tumour boxes (``annotations/boxes.csv``), none if absent."""
    path = root / "annotations" / "boxes.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [TumourBox(row["series_dir"],
                          (float(row["center_lps_x_mm"]), float(row["center_lps_y_mm"]),
                           float(row["center_lps_z_mm"])),
                          (float(row["width_mm"]), float(row["height_mm"])))
                for row in csv.DictReader(handle)]


def in_tumour(series: str, point: tuple[float, float, float], boxes: list[TumourBox],
              slice_mm: float) -> bool | None:
    """Whether ``point`` lies in an annotated box of ``series`` (None: none annotated)."""
    mine = [b for b in boxes if b.series == series]
    if not mine:
        return None
    for box in mine:
        if (abs(point[2] - box.centre[2]) <= slice_mm / 2
                and abs(point[0] - box.centre[0]) <= box.size[0] / 2
                and abs(point[1] - box.centre[1]) <= box.size[1] / 2):
            return True
    return False


def evaluate_real(root: Path, out: Path, bundle: Path | None = None) -> int:
    """Analyse every series under ``root`` with the bundle folder ``bundle`` (the shipped
    lung-nodule bundle by default); print findings, write PNGs to ``out``."""
    from dicom_node.preview import write_preview
    from dicom_node.results import encode_key_images, encode_sr
    from dicom_node.results.readback import read_findings
    from dicom_node.series import build_volume, select_series
    from models.lung_nodules.bundle_runner import BUNDLE_ROOT
    from plugin.monai_bundle import MonaiBundlePlugin

    if not root.is_dir():
        LOG.info(f"skipped: no real CT at {root} (it is not part of the repository; see the "
                 "model README, 'Real CT')")
        return 0
    plugin = MonaiBundlePlugin(bundle or BUNDLE_ROOT)
    criteria = plugin.criteria
    opened = replace(criteria, min_slices=1, slice_spacing_mm=(0.0, 20.0), image_type_required=())
    boxes = tumour_boxes(root)
    out.mkdir(parents=True, exist_ok=True)
    LOG.info(f"{plugin.info.display_name} {plugin.info.version} on {root}")
    LOG.info(f"series criteria OPENED for this evaluation (the manifest asks {criteria.min_slices}+ "
             f"{'/'.join(criteria.image_type_required)} slices of {criteria.slice_spacing_mm[0]:g}-"
             f"{criteria.slice_spacing_mm[1]:g} mm)")
    for folder in series_folders(root):
        files = sorted(folder.glob("*.dcm"))
        image_type = tuple(str(v) for v in dcmread(files[0], stop_before_pixels=True).get("ImageType", []))
        selection = select_series(files, replace(opened, image_type_required=image_type))  # a crop is DERIVED
        volume = build_volume(selection.paths, headers=selection.headers)
        findings = plugin.analyse(volume)
        first = dcmread(selection.paths[0], stop_before_pixels=True)
        slice_mm = float(volume.spacing_mm[2])
        LOG.info("")
        LOG.info(f"== {folder.name}: {len(selection.paths)} slices, {volume.shape[0]} x {volume.shape[1]}, "
                 f"{volume.spacing_mm[0]:.3f} mm pixels, {slice_mm:g} mm slices, kernel "
                 f"{first.get('ConvolutionKernel', '?')}; {findings.count} finding(s)")
        with tempfile.TemporaryDirectory() as tmp:
            sr_path = Path(tmp) / "sr.dcm"
            encode_sr(volume, findings, plugin.info, series_number=9002).save_as(sr_path, enforce_file_format=True)
            reported = read_findings(sr_path)
        for finding, shown in zip(findings.findings, reported):
            tumour = in_tumour(folder.name, finding.centroid_mm, boxes, slice_mm)
            spread = f" +/- {finding.sd_hu:3.0f}" if finding.has_spread else ""
            hu = (f"{finding.mean_hu:6.0f}{spread} (max {finding.max_hu:4.0f})"
                  if finding.attenuation_from_core else "not measured (too thin for a core)")
            where = ", ".join(f"{c:.0f}" for c in finding.centroid_mm)
            score = "-" if finding.score is None else f"{finding.score:.2f}"
            LOG.info(f"  {shown.name:9s} score {score}  long {finding.long_axis.length_mm:5.1f} mm  short "
                     f"{finding.short_axis.length_mm:5.1f} mm  volume {finding.volume_mm3:8.0f} mm3  HU {hu}  "
                     f"LPS ({where}) image {finding.key_slice + 1}"
                     + ("" if finding.composition == "solid" else f"  {finding.composition}")
                     + ("" if tumour is None else f"  in annotated tumour: {'yes' if tumour else 'no'}"))
        if reported:  # the key images the node would send, stacked
            png = write_preview(encode_key_images(volume, findings, plugin.info, series_number=9003),
                                out / f"{folder.name}.png")
            LOG.info(f"  preview: {png}")
        LOG.debug("series %s: %d findings", volume.series_instance_uid, findings.count)
    tumour_series = sorted({b.series for b in boxes})
    if tumour_series:
        LOG.info("")
        LOG.info(f"annotated tumour boxes: {', '.join(tumour_series)} "
                 f"(largest {max(max(b.size) for b in boxes):.0f} mm in-plane)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run :func:`evaluate_real` and return its exit status."""
    ap = argparse.ArgumentParser(prog="python -m bench.real_ct", description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, nargs="?", default=REAL_CT,
                    help=f"a folder of real CT series, one folder each (default: {REAL_CT})")
    ap.add_argument("--out", type=Path, default=Path("real-ct-eval"), help="where the PNGs go")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a copy of the lung-nodule bundle to run instead (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import torch

    torch.set_num_threads(args.threads)
    return evaluate_real(args.folder, args.out, args.bundle)


if __name__ == "__main__":
    sys.exit(main())
