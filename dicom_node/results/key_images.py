"""Pixels of the key images: what a reader sees first, in any viewer (PIL, no DICOM).

Every image is an RGB canvas of :data:`WIDTH` x :data:`HEIGHT` pixels:

* **Summary** (shown first): the analysis and its version, the series analysed, "NOT
  FOR DIAGNOSTIC USE" unless the plugin is cleared for clinical use, and the findings
  table (or, with no findings, that none was detected).
* **One image per finding**: a caption band (:data:`CAPTION_HEIGHT` pixels) over two
  panels of :data:`PANEL` pixels: on the left the whole axial key slice (the slice of
  the finding's largest extent) in lung window, with the outline and the long axis, and
  on the right a zoomed view of the finding with the same overlays. Both panels carry
  orientation markers (R/L, A/P) taken from the slice's Image Orientation (Patient).

The geometry is public (:class:`PanelMap`), so that a test can map the source image's
pixels onto the key image and check the overlays against the SEG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)
PANEL = 512  # side of each image panel
WIDTH = 2 * PANEL
CAPTION_HEIGHT = 112
HEIGHT = CAPTION_HEIGHT + PANEL
FONT_SIZE = 22
LINE_HEIGHT = 32
MARGIN = 12
OUTLINE = (255, 60, 60)
AXIS = (255, 230, 0)
BOX = (0, 190, 255)
TEXT = (255, 255, 255)
WARNING = (255, 140, 0)
MUTED = (190, 190, 190)
NOT_MEASURED = "attenuation not measured"
ZOOM_MIN_PX = 24.0  # the zoomed view shows at least this many source pixels around a finding

FontType = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True)
class Measures:
    """A finding's numbers as the caption and the summary table show them (NaN: none)."""

    name: str
    long_axis_mm: float = math.nan
    short_axis_mm: float = math.nan
    volume_mm3: float = math.nan
    mean_hu: float = math.nan
    score_percent: float = math.nan
    size_mm: tuple[float, float, float] | None = None  # a box's width, depth, height


@dataclass(frozen=True)
class KeyView:
    """What one key image shows: a finding's overlays on its key slice."""

    measures: Measures
    slice_index: int
    outlines: Sequence[np.ndarray] = field(default_factory=list)  # (N, 2) column, row
    axis: tuple[tuple[float, float], tuple[float, float]] | None = None
    header: str = ""  # first caption line (finding, analysis)
    where: str = ""  # third caption line (image, position, series)


def _number(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def hu_text(mean_hu: float) -> str:
    """The mean attenuation as the report gives it; none for a finding too thin for a
    core (see :mod:`plugin.lesion_measure`)."""
    return NOT_MEASURED if math.isnan(mean_hu) else f"mean {mean_hu:.0f} HU"


def measures_text(m: Measures) -> str:
    """The caption's line of numbers: long and short axis, volume, mean HU, score."""
    parts = [f"long axis {_number(m.long_axis_mm, 1)} mm"]
    if not math.isnan(m.short_axis_mm):
        parts.append(f"short axis {m.short_axis_mm:.1f} mm")
    if m.size_mm is not None:
        parts.append("box {:.1f} x {:.1f} x {:.1f} mm".format(*m.size_mm))
    if not math.isnan(m.volume_mm3):
        parts += [f"volume {m.volume_mm3:.0f} mm3", hu_text(m.mean_hu)]
    if not math.isnan(m.score_percent):
        parts.append(f"score {m.score_percent:.0f} %")
    return ", ".join(parts)


def table_row(m: Measures) -> list[str]:
    """One row of the summary table (see :data:`TABLE_HEAD`)."""
    hu = "n.m." if math.isnan(m.mean_hu) and not math.isnan(m.volume_mm3) else _number(m.mean_hu, 0)
    return [m.name, _number(m.long_axis_mm, 1), _number(m.short_axis_mm, 1),
            _number(m.volume_mm3, 0), hu, _number(m.score_percent, 0)]


TABLE_HEAD = ["Finding", "Long axis mm", "Short axis mm", "Volume mm3", "Mean HU", "Score %"]
TABLE_X = [MARGIN, 260, 420, 590, 750, 880]


@lru_cache(maxsize=4)
def font(size: int = FONT_SIZE) -> FontType:
    """The caption font (Pillow's built-in FreeType font at ``size`` pixels)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: small, but still text
        return ImageFont.load_default()


def fit(text: str, width: float, size: int = FONT_SIZE) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels."""
    face = font(size)
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def wrap(text: str, width: float, size: int = FONT_SIZE) -> list[str]:
    """``text`` broken into lines of at most ``width`` pixels, at spaces."""
    face, lines, line = font(size), [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and face.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def windowed(hu: np.ndarray, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """An HU slice ``(rows, columns)`` as 8-bit grey in ``window`` (centre, width)."""
    low = window[0] - window[1] / 2
    grey: np.ndarray = np.clip((np.asarray(hu, dtype=np.float32) - low) / window[1] * 255.0, 0, 255)
    return grey.astype(np.uint8)


@dataclass(frozen=True)
class PanelMap:
    """Where a source image's pixels land on the key image: SCOORD ``(column, row)``
    to canvas ``(x, y)`` = ``(x0 + column * scale_x, y0 + row * scale_y)``."""

    x0: float
    y0: float
    scale_x: float
    scale_y: float

    def __call__(self, column: float, row: float) -> tuple[float, float]:
        return self.x0 + column * self.scale_x, self.y0 + row * self.scale_y


def slice_panel_map(rows: int, columns: int) -> tuple[PanelMap, tuple[int, int]]:
    """The whole-slice panel's map and its size in pixels (aspect kept, centred)."""
    scale = PANEL / max(rows, columns)
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    x0, y0 = (PANEL - width) // 2, CAPTION_HEIGHT + (PANEL - height) // 2
    return PanelMap(x0, y0, width / columns, height / rows), (width, height)


def zoom_box(view: KeyView, rows: int, columns: int) -> tuple[int, int, int]:
    """The square of source pixels the zoomed view shows: ``(left, top, side)``."""
    points = [np.asarray(o, dtype=float).reshape(-1, 2) for o in view.outlines]
    if view.axis is not None:
        points.append(np.asarray(view.axis, dtype=float))
    if not points:
        points = [np.array([[columns / 2, rows / 2]])]
    every = np.concatenate(points)
    (c0, r0), (c1, r1) = every.min(axis=0), every.max(axis=0)
    half = max(c1 - c0, r1 - r0, ZOOM_MIN_PX) * 0.9 + 8
    side = int(math.ceil(2 * half))
    return int(math.floor((c0 + c1) / 2 - half)), int(math.floor((r0 + r1) / 2 - half)), side


def zoom_panel_map(box: tuple[int, int, int]) -> PanelMap:
    """The zoomed panel's map for the source square ``box``."""
    left, top, side = box
    scale = PANEL / side
    return PanelMap(PANEL - left * scale, CAPTION_HEIGHT - top * scale, scale, scale)


def orientation_letters(orientation: Sequence[float]) -> tuple[str, str, str, str]:
    """Patient directions at the image's (left, right, top, bottom) edges, from Image
    Orientation (Patient): the dominant LPS axis of the row and column directions."""
    names = (("R", "L"), ("A", "P"), ("F", "H"))  # (negative, positive) along x, y, z

    def letter(vector: Sequence[float], sign: int) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return names[axis][int(sign * vector[axis] > 0)]

    row, column = list(orientation[:3]), list(orientation[3:6])
    return letter(row, -1), letter(row, 1), letter(column, -1), letter(column, 1)


def _markers(draw: ImageDraw.ImageDraw, area: tuple[int, int, int, int],
             letters: tuple[str, str, str, str]) -> None:
    """Orientation letters at the middle of each edge of ``area`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = area
    face = font(26)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    spots = ((x0 + 6, cy, "lm"), (x1 - 6, cy, "rm"), (cx, y0 + 6, "mt"), (cx, y1 - 6, "mb"))
    for (x, y, anchor), text in zip(spots, letters, strict=True):
        draw.text((x, y), text, fill=TEXT, font=face, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def _overlays(draw: ImageDraw.ImageDraw, view: KeyView, to_canvas: PanelMap, width: int) -> None:
    for outline in view.outlines:
        points = [to_canvas(float(c), float(r)) for c, r in np.asarray(outline, dtype=float).reshape(-1, 2)]
        draw.line([*points, points[0]], fill=OUTLINE, width=width, joint="curve")
    if view.axis is not None:
        (c0, r0), (c1, r1) = view.axis
        draw.line([to_canvas(c0, r0), to_canvas(c1, r1)], fill=AXIS, width=width)


def caption_lines(view: KeyView) -> list[str]:
    """The caption of a key image, top to bottom."""
    return [view.header, measures_text(view.measures), view.where]


def render_key_image(hu: np.ndarray, view: KeyView, orientation: Sequence[float],
                     warning: str = "") -> np.ndarray:
    """The key image of ``view`` on its slice ``hu`` (rows, columns): RGB ``(HEIGHT, WIDTH, 3)``."""
    rows, columns = hu.shape
    grey = Image.fromarray(windowed(hu)).convert("RGB")
    canvas = Image.new("RGB", (WIDTH, HEIGHT))
    whole, size = slice_panel_map(rows, columns)
    canvas.paste(grey.resize(size, Image.Resampling.BILINEAR), (int(whole.x0), int(whole.y0)))
    box = zoom_box(view, rows, columns)
    left, top, side = box
    zoom = grey.crop((left, top, left + side, top + side)).resize((PANEL, PANEL), Image.Resampling.LANCZOS)
    canvas.paste(zoom, (PANEL, CAPTION_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    corner0, corner1 = whole(left, top), whole(left + side, top + side)
    draw.rectangle([corner0, corner1], outline=BOX, width=1)
    _overlays(draw, view, whole, 2)
    _overlays(draw, view, zoom_panel_map(box), 3)
    letters = orientation_letters(orientation)
    _markers(draw, (0, CAPTION_HEIGHT, PANEL, HEIGHT), letters)
    _markers(draw, (PANEL, CAPTION_HEIGHT, WIDTH, HEIGHT), letters)
    draw.line([(PANEL, CAPTION_HEIGHT), (PANEL, HEIGHT)], fill=MUTED, width=1)
    canvas.paste(Image.fromarray(caption_band(caption_lines(view), warning)), (0, 0))
    return np.asarray(canvas)


def caption_band(lines: Sequence[str], warning: str = "") -> np.ndarray:
    """The caption band of a key image: three lines (:func:`caption_lines`), the third
    muted, and ``warning`` right-aligned beside it. RGB ``(CAPTION_HEIGHT, WIDTH, 3)``."""
    band = Image.new("RGB", (WIDTH, CAPTION_HEIGHT))
    draw = ImageDraw.Draw(band)
    for number, text in enumerate(lines):
        room = WIDTH - 2 * MARGIN - (WIDTH // 3 if number == 2 else 0)  # the warning's place
        draw.text((MARGIN, MARGIN + number * LINE_HEIGHT), fit(text, room),
                  fill=MUTED if number == 2 else TEXT, font=font())
    if warning:
        draw.text((WIDTH - MARGIN, MARGIN + 2 * LINE_HEIGHT), warning, fill=WARNING, font=font(), anchor="ra")
    return np.asarray(band)


@dataclass(frozen=True)
class SummaryText:
    """What the summary image says (see the module docstring)."""

    title: str
    lines: Sequence[str]  # model, series analysed, ...
    rows: Sequence[Measures]
    warning: str = ""  # "NOT FOR DIAGNOSTIC USE ..." or empty
    notes: Sequence[str] = ()  # below the table: summary, where to read more
    more: int = 0  # findings left out of the table


MAX_TABLE_ROWS = 10


def summary_lines(text: SummaryText) -> list[str]:
    """Every line of the summary image as plain text (also kept in Image Comments)."""
    lines = [text.title, *text.lines]
    if text.warning:
        lines.append(text.warning)
    if text.rows:
        lines.append(" | ".join(TABLE_HEAD))
        lines += [" | ".join(table_row(m)) for m in text.rows]
    if text.more:
        lines.append(f"... and {text.more} more (see the report)")
    return [*lines, *text.notes]


def render_summary(text: SummaryText) -> np.ndarray:
    """The summary image: RGB ``(HEIGHT, WIDTH, 3)``."""
    canvas = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    draw.text((MARGIN, y), fit(text.title, WIDTH - 2 * MARGIN, 32), fill=TEXT, font=font(32))
    y += 48
    for line in text.lines:
        draw.text((MARGIN, y), fit(line, WIDTH - 2 * MARGIN), fill=MUTED, font=font())
        y += LINE_HEIGHT
    if text.warning:
        draw.text((MARGIN, y), fit(text.warning, WIDTH - 2 * MARGIN), fill=WARNING, font=font())
        y += LINE_HEIGHT
    y += 8
    if text.rows:
        y = _table(draw, y, text.rows)
    if text.more:
        draw.text((MARGIN, y), f"... and {text.more} more (see the report)", fill=MUTED, font=font())
        y += LINE_HEIGHT
    for note in text.notes:
        for line in wrap(note, WIDTH - 2 * MARGIN):
            if y > HEIGHT - LINE_HEIGHT:
                return np.asarray(canvas)
            draw.text((MARGIN, y), line, fill=MUTED, font=font())
            y += LINE_HEIGHT
    return np.asarray(canvas)


def _table(draw: ImageDraw.ImageDraw, y: int, rows: Sequence[Measures]) -> int:
    for x, head in zip(TABLE_X, TABLE_HEAD, strict=True):
        draw.text((x, y), head, fill=MUTED, font=font(20))
    y += LINE_HEIGHT
    draw.line([(MARGIN, y - 4), (WIDTH - MARGIN, y - 4)], fill=MUTED, width=1)
    for m in rows:
        cells = table_row(m)
        widths = [b - a - 10 for a, b in zip(TABLE_X, [*TABLE_X[1:], WIDTH - MARGIN], strict=True)]
        for x, cell, width in zip(TABLE_X, cells, widths, strict=True):
            draw.text((x, y), fit(cell, width), fill=TEXT, font=font())
        y += LINE_HEIGHT
    return y + 8
