"""PNG previews of findings: the key slice of each, with outline and long axis.

Drawn from what the radiologist receives: the outlines and the long-axis line come
from the SR (read back with highdicom), the image from the source slice. Each
finding gets one row: the whole slice with a box around the finding, and a zoomed
view with the outline (red) and the long axis (yellow).
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread

from dicom_node.results.readback import ReportedFinding

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width
ZOOM_PX = 512  # side of the zoomed view
OUTLINE = (255, 60, 60)
AXIS = (255, 230, 0)


def _windowed(path: Path, window: tuple[float, float]) -> Image.Image:
    ds = dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))
    low = window[0] - window[1] / 2
    grey = np.clip((hu - low) / window[1] * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def hu_text(mean_hu: float) -> str:
    """The mean attenuation as the report gives it; NaN when the SR has none (a finding
    too thin for a core, see plugin.lesion_measure)."""
    return "attenuation not measured" if math.isnan(mean_hu) else f"mean {mean_hu:.0f} HU"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _box(finding: ReportedFinding, width: int, height: int) -> tuple[float, float, float, float]:
    points = np.concatenate(finding.outlines.get(finding.key_image_uid, []) or
                            [finding.long_axis_points if finding.long_axis_points is not None
                             else np.array([[width / 2, height / 2]])])
    (c0, r0), (c1, r1) = points.min(axis=0), points.max(axis=0)
    half = max(c1 - c0, r1 - r0, 24.0) * 0.9 + 8
    cc, rc = (c0 + c1) / 2, (r0 + r1) / 2
    return cc - half, rc - half, cc + half, rc + half


def render_finding(source: Path, finding: ReportedFinding) -> Image.Image:
    """One row: the slice with a box, and the zoomed view with outline and long axis."""
    image = _windowed(source, LUNG_WINDOW)
    left, top, right, bottom = _box(finding, image.width, image.height)
    scale = ZOOM_PX / (right - left)
    zoom = image.crop((int(left), int(top), int(left) + int(right - left), int(top) + int(bottom - top)))
    zoom = zoom.resize((ZOOM_PX, ZOOM_PX), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(zoom)

    def to_zoom(c: float, r: float) -> tuple[float, float]:
        return (c - int(left)) * scale, (r - int(top)) * scale

    for outline in finding.outlines.get(finding.key_image_uid, []):
        points = [to_zoom(float(c), float(r)) for c, r in outline]
        draw.line(points + points[:1], fill=OUTLINE, width=3)
    if finding.long_axis_points is not None:
        (c0, r0), (c1, r1) = finding.long_axis_points[:2]
        draw.line([to_zoom(c0, r0), to_zoom(c1, r1)], fill=AXIS, width=3)
    full = image.copy()
    ImageDraw.Draw(full).rectangle([left, top, right, bottom], outline=OUTLINE, width=2)
    row = Image.new("RGB", (full.width + ZOOM_PX, max(full.height, ZOOM_PX) + 36))
    row.paste(full, (0, 36))
    row.paste(zoom, (full.width, 36))
    label = (f"{finding.name}: long axis {finding.long_axis_mm:.1f} mm, short {finding.short_axis_mm:.1f} mm, "
             f"volume {finding.volume_mm3:.0f} mm3, " + hu_text(finding.mean_hu))
    ImageDraw.Draw(row).text((8, 8), label, fill=(255, 255, 255), font=_font(20))
    return row


def write_preview(sources: dict[str, Path], findings: Sequence[ReportedFinding], out: Path) -> Path:
    """All findings, one row each, in one PNG; ``sources`` maps image UIDs to files."""
    rows = [render_finding(sources[f.key_image_uid], f) for f in findings if f.key_image_uid in sources]
    if not rows:
        raise ValueError("no finding has a key image among the sources")
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
