"""Seeded synthetic chest-CT phantoms with solid lung nodules and their ground truth.

A phantom is an analytic chest: a body ellipse (fat, muscle), ribs, spine, sternum,
aorta, heart, trachea, an optional table, two lungs whose size and shape vary along
the z axis, branching vessel trees inside the lungs and solid nodules (spherical or
lobulated, some touching the pleura or a vessel). Everything is drawn with numpy on
the voxel grid of a CT series, so ``hu_zyx`` can be written as DICOM with
:func:`phantoms.ct_writer.write_ct_series` using the returned layout.

Coordinates: ``hu_zyx[k, j, i]`` is slice ``k`` (z increases with ``k``, towards the
head), row ``j`` (posterior with ``j``) and column ``i`` (patient left with ``i``), as
in DICOM patient coordinates (LPS) with an axial orientation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series


@dataclass(frozen=True)
class Nodule:
    """Ground truth of one nodule (its label value in ``labels_zyx`` is 1)."""

    index: int
    centre_voxel_zyx: tuple[float, float, float]
    centre_mm_lps: tuple[float, float, float]
    diameter_mm: float
    kind: str  # "spherical" or "irregular"
    juxtapleural: bool
    juxtavascular: bool
    hu: float  # the nodule's attenuation; a part-solid nodule's ground-glass part
    density: str = "solid"  # "solid", "ground_glass" or "part_solid"
    solid_diameter_mm: float | None = None  # a part-solid nodule's solid core
    solid_hu: float | None = None


@dataclass
class ChestPhantom:
    """A generated chest CT, its nodule mask and the series layout it implies."""

    hu_zyx: np.ndarray  # float32 (Z, rows, columns) Hounsfield units
    labels_zyx: np.ndarray  # uint8 (Z, rows, columns), 1 = nodule
    nodules: list[Nodule]
    layout: SeriesLayout
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    lung_zyx: np.ndarray | None = None  # bool (Z, rows, columns), the lung fields

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column)."""
        row, col = self.layout.pixel_spacing_mm
        return (float(self.layout.slice_spacing_mm), float(row), float(col))

    def lps_affine(self) -> np.ndarray:
        """Index (column, row, slice) -> DICOM patient coordinates (LPS, mm)."""
        return lps_affine(self.layout)

    def ras_affine(self) -> np.ndarray:
        """Index (column, row, slice) -> RAS world, as MONAI's ITKReader gives it."""
        affine: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(self.layout)
        return affine

    def image_xyz(self) -> np.ndarray:
        """The HU volume as (X, Y, Z) = (column, row, slice), the node's layout."""
        return np.ascontiguousarray(self.hu_zyx.transpose(2, 1, 0))

    def labels_xyz(self) -> np.ndarray:
        """The nodule mask as (X, Y, Z)."""
        return np.ascontiguousarray(self.labels_zyx.transpose(2, 1, 0))


def lps_affine(layout: SeriesLayout) -> np.ndarray:
    """Voxel index (column, row, slice) -> LPS mm for an axial ``layout``."""
    row_dir = np.asarray(layout.orientation[:3], dtype=np.float64)
    col_dir = np.asarray(layout.orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    row_step, col_step = layout.pixel_spacing_mm
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_step
    affine[:3, 1] = col_dir * row_step
    affine[:3, 2] = normal * layout.slice_spacing_mm
    affine[:3, 3] = layout.origin_mm
    return affine


# ----------------------------------------------------------------------------- sampling


@dataclass
class _Geometry:
    """Sampled acquisition geometry."""

    slices: int
    rows: int
    cols: int
    pixel_mm: float
    slice_mm: float
    thickness_mm: float
    noise_hu: float
    signed: bool
    bits_stored: int


def _sample_geometry(rng: np.random.Generator, kw: dict[str, Any]) -> _Geometry:
    pixel = kw.get("pixel_spacing_mm") or float(rng.uniform(0.5, 1.0))
    slice_mm = kw.get("slice_spacing_mm") or float(
        rng.choice([0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0])
    )
    slices = kw.get("slices")
    if slices is None:
        coverage = rng.uniform(250.0, 380.0)
        slices = int(np.clip(round(coverage / slice_mm), 64, 600))
    thickness = kw.get("slice_thickness_mm") or slice_mm
    noise = kw.get("noise_hu")
    noise = float(rng.uniform(5.0, 40.0)) if noise is None else float(noise)
    signed = kw.get("signed")
    signed = bool(rng.random() < 0.5) if signed is None else bool(signed)
    bits = kw.get("bits_stored") or int(rng.choice([12, 16]))
    rows = int(kw.get("rows", 512))
    cols = int(kw.get("columns") or rows)
    return _Geometry(
        slices,
        rows,
        cols,
        float(pixel),
        float(slice_mm),
        float(thickness),
        noise,
        signed,
        bits,
    )


@dataclass
class _Grid:
    x: np.ndarray  # (C,) mm, patient left positive
    y: np.ndarray  # (R,) mm, posterior positive
    z: np.ndarray  # (Z,) mm, superior positive
    spacing_zyx: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)


def _make_grid(geo: _Geometry, rng: np.random.Generator) -> _Grid:
    fov_x, fov_y = geo.cols * geo.pixel_mm, geo.rows * geo.pixel_mm
    x = (np.arange(geo.cols) - (geo.cols - 1) / 2) * geo.pixel_mm
    y = (np.arange(geo.rows) - (geo.rows - 1) / 2) * geo.pixel_mm
    x += rng.uniform(-0.03, 0.03) * fov_x
    y += rng.uniform(-0.03, 0.03) * fov_y
    z = np.arange(geo.slices) * geo.slice_mm
    return _Grid(
        x.astype(np.float32),
        y.astype(np.float32),
        z.astype(np.float32),
        (geo.slice_mm, geo.pixel_mm, geo.pixel_mm),
    )


def _smooth_wave(rng: np.random.Generator, t: np.ndarray, amp: float) -> np.ndarray:
    """A smooth random function of ``t`` (a few low-frequency sinusoids)."""
    out = np.zeros_like(t)
    for k in range(1, 4):
        out += (
            rng.uniform(-1, 1) / k * np.sin(np.pi * k * t + rng.uniform(0, 2 * np.pi))
        )
    return amp * out


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    """Per-slice shape parameters (arrays of shape (Z,)) in mm."""

    cx: float
    cy: np.ndarray
    ax: np.ndarray
    ay: np.ndarray
    fat: float
    lung_t: np.ndarray  # 0 at the diaphragm, 1 at the apex, nan outside the lungs
    lungs: list[dict[str, Any]]
    lung_hu: float
    lung_gradient: float
    contrast: bool


def _sample_anatomy(grid: _Grid, rng: np.random.Generator) -> _Anatomy:
    fov_x = float(grid.x[-1] - grid.x[0])
    fov_y = float(grid.y[-1] - grid.y[0])
    nz = grid.z.size
    t_z = np.linspace(0.0, 1.0, nz, dtype=np.float32)
    ax = min(fov_x * rng.uniform(0.36, 0.47), rng.uniform(150, 210))
    ay = min(ax * rng.uniform(0.6, 0.8), fov_y * 0.45)
    ax_z = ax * (1 + _smooth_wave(rng, t_z, 0.03))
    ay_z = ay * (1 + _smooth_wave(rng, t_z, 0.03))
    cy = rng.uniform(-0.08, 0.02) * fov_y + _smooth_wave(rng, t_z, 2.0)
    cx = float(rng.uniform(-0.03, 0.03) * fov_x)
    fat = float(rng.uniform(0.04, 0.14))
    # Lungs: height and position along z
    z_len = float(grid.z[-1] - grid.z[0]) + 1e-3
    height = rng.uniform(190, 290)
    if height < z_len:
        base = grid.z[0] + rng.uniform(-0.1, 0.4) * (z_len - height)
    else:
        base = grid.z[0] - rng.uniform(0.0, 1.0) * (height - z_len) * 0.8
    lung_t = (grid.z - base) / height
    lung_t = np.where((lung_t >= 0) & (lung_t <= 1), lung_t, np.nan).astype(np.float32)
    inner = 1 - fat - 0.12
    lungs = []
    for side in (-1.0, 1.0):  # -1: patient right (negative x), +1: patient left
        lungs.append(
            {
                "side": side,
                "u": side * rng.uniform(0.36, 0.45) * inner / 0.78,
                "v": rng.uniform(-0.08, 0.05),
                "su": rng.uniform(0.28, 0.36) * inner / 0.78,
                "sv": rng.uniform(0.52, 0.64) * inner / 0.78,
                "rot": rng.uniform(-0.3, 0.3) * side,
                "wave_u": _smooth_wave(rng, t_z, 0.05),
                "wave_v": _smooth_wave(rng, t_z, 0.05),
            }
        )
    contrast = bool(rng.random() < 0.4)
    return _Anatomy(
        cx,
        cy.astype(np.float32),
        ax_z.astype(np.float32),
        ay_z.astype(np.float32),
        fat,
        lung_t,
        lungs,
        float(rng.uniform(-900, -780)),
        float(rng.uniform(0, 90)),
        contrast,
    )


def _lung_profile(t: np.ndarray) -> np.ndarray:
    """Lung cross-section scale against height (0 diaphragm .. 1 apex)."""
    t = np.nan_to_num(t, nan=-1.0)
    apex = np.sqrt(np.clip(1 - np.clip(t, 0, 1) ** 2.2, 0, 1))
    base = np.sqrt(np.clip(t / 0.12, 0.25, 1.0))
    return np.where(t >= 0, apex * base, 0.0).astype(np.float32)


def _body_uv(grid: _Grid, an: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Body-normalised coordinates u (Z,1,C) and v (Z,R,1)."""
    u = (grid.x[None, None, :] - an.cx) / an.ax[:, None, None]
    v = (grid.y[None, :, None] - an.cy[:, None, None]) / an.ay[:, None, None]
    return u.astype(np.float32), v.astype(np.float32)


def _lung_mask(u: np.ndarray, v: np.ndarray, an: _Anatomy) -> np.ndarray:
    prof = _lung_profile(an.lung_t)
    nz = prof.size
    mask = np.zeros((nz, v.shape[1], u.shape[2]), dtype=bool)
    for lung in an.lungs:
        su = lung["su"] * (1 + lung["wave_u"]) * prof + 1e-6
        sv = lung["sv"] * (1 + lung["wave_v"]) * prof + 1e-6
        c, s = np.float32(np.cos(lung["rot"])), np.float32(np.sin(lung["rot"]))
        for k in range(nz):
            if prof[k] <= 0:
                continue
            du, dv = u[k] - lung["u"], v[k] - lung["v"]  # (1, C), (R, 1)
            pu = (c * du + s * dv) / su[k]
            pv = (c * dv - s * du) / sv[k]
            mask[k] |= pu * pu + pv * pv <= 1.0
    return mask


def _draw_body(
    grid: _Grid, an: _Anatomy, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """HU of the body without vessels or nodules, and the lung mask."""
    u, v = _body_uv(grid, an)
    q2 = u * u + v * v
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    muscle = float(rng.uniform(35, 60))
    fat_hu = float(rng.uniform(-120, -80))
    hu[q2 <= 1.0] = fat_hu
    inner = (1 - an.fat) ** 2
    hu[q2 <= inner] = muscle
    _draw_ribs(hu, grid, an, q2, u, rng)
    lung = _lung_mask(u, v, an)
    _draw_mediastinum(hu, lung, grid, an, rng)
    parenchyma = an.lung_hu + an.lung_gradient * np.clip((v + 1) / 2, 0, 1)
    parenchyma = np.broadcast_to(parenchyma, grid.shape)
    hu[lung] = parenchyma[lung]
    return hu, lung


def _draw_ribs(
    hu: np.ndarray,
    grid: _Grid,
    an: _Anatomy,
    q2: np.ndarray,
    u: np.ndarray,
    rng: np.random.Generator,
) -> None:
    r_out = 1 - an.fat - 0.015
    r_in = r_out - rng.uniform(0.05, 0.08)
    period = rng.uniform(24, 34)
    slope = rng.uniform(0.3, 0.6)
    phase = grid.z[:, None] - slope * (grid.y[None, :] - an.cy[:, None])
    stripes = np.cos(2 * np.pi * phase / period + rng.uniform(0, 6.3)) > 0.45  # (Z, R)
    ring = (q2 <= r_out**2) & (q2 >= r_in**2) & (np.abs(u) > 0.18)
    ribs = ring & stripes[:, :, None]
    hu[ribs] = rng.uniform(450, 900)


def _disc(
    grid: _Grid, cx: np.ndarray | float, cy: np.ndarray | float, rx: float, ry: float
) -> np.ndarray:
    cxa = np.broadcast_to(np.asarray(cx, dtype=np.float32), grid.z.shape)
    cya = np.broadcast_to(np.asarray(cy, dtype=np.float32), grid.z.shape)
    dx = (grid.x[None, None, :] - cxa[:, None, None]) / rx
    dy = (grid.y[None, :, None] - cya[:, None, None]) / ry
    inside: np.ndarray = dx * dx + dy * dy <= 1.0
    return inside


def _draw_mediastinum(
    hu: np.ndarray,
    lung: np.ndarray,
    grid: _Grid,
    an: _Anatomy,
    rng: np.random.Generator,
) -> None:
    """Spine, aorta, heart, trachea and sternum; they carve out the lungs."""
    t = np.nan_to_num(an.lung_t, nan=-1.0)
    spine_y = an.cy + an.ay * rng.uniform(0.55, 0.68)
    vr = rng.uniform(15, 22)
    body = _disc(grid, an.cx, spine_y, vr, vr * 0.9)
    rim = body & ~_disc(grid, an.cx, spine_y, vr - 2.5, vr * 0.9 - 2.5)
    disc_z = np.cos(2 * np.pi * grid.z / rng.uniform(24, 30)) > 0.85
    hu[body] = rng.uniform(180, 320)
    hu[rim] = rng.uniform(600, 1100)
    hu[body & disc_z[:, None, None]] = 80.0
    canal = _disc(grid, an.cx, spine_y + vr + 8, 8, 7)
    hu[canal] = 20.0
    lung &= ~_disc(grid, an.cx, spine_y, vr + 3, vr + 3)
    blood = rng.uniform(150, 350) if an.contrast else rng.uniform(30, 55)
    ao_r = rng.uniform(10, 16)
    aorta = _disc(
        grid, an.cx + vr * 0.9 + ao_r * 0.6, spine_y - vr - ao_r * 0.4, ao_r, ao_r
    )
    hu[aorta] = blood
    lung &= ~_disc(
        grid,
        an.cx + vr * 0.9 + ao_r * 0.6,
        spine_y - vr - ao_r * 0.4,
        ao_r + 2,
        ao_r + 2,
    )
    heart_scale = np.clip(1 - ((t - 0.22) / 0.38) ** 2, 0, 1) ** 0.5 * (t >= -0.05)
    hx = an.ax * rng.uniform(0.25, 0.36) * heart_scale + 1e-3
    hy = an.ay * rng.uniform(0.35, 0.5) * heart_scale + 1e-3
    hcx = an.cx + float(np.mean(an.ax)) * rng.uniform(0.02, 0.12)
    hcy = an.cy - an.ay * rng.uniform(0.05, 0.2)
    heart = _ellipse_zvar(grid, hcx, hcy, hx, hy)
    hu[heart] = blood if rng.random() < 0.5 else rng.uniform(30, 50)
    lung &= ~heart
    med_half = an.ax * rng.uniform(0.06, 0.1)
    mid = np.abs(grid.x - an.cx)[None, None, :] < med_half[:, None, None]
    lung &= ~mid
    trachea_on = t > rng.uniform(0.55, 0.7)
    tr = _disc(grid, an.cx, an.cy - an.ay * 0.1, 9, 8) & trachea_on[:, None, None]
    wall = _disc(grid, an.cx, an.cy - an.ay * 0.1, 11, 10) & trachea_on[:, None, None]
    hu[wall] = 40.0
    hu[tr] = -990.0
    sternum = _disc(grid, an.cx, an.cy - an.ay * (1 - an.fat - 0.06), 12, 5)
    hu[sternum & (t > 0.1)[:, None, None]] = rng.uniform(300, 600)


def _ellipse_zvar(
    grid: _Grid, cx: float, cy: np.ndarray, rx: np.ndarray, ry: np.ndarray
) -> np.ndarray:
    dx = (grid.x[None, None, :] - cx) / rx[:, None, None]
    dy = (grid.y[None, :, None] - cy[:, None, None]) / ry[:, None, None]
    inside: np.ndarray = dx * dx + dy * dy <= 1.0
    return inside


# ----------------------------------------------------------------------------- tubes, blobs


@dataclass
class _Segment:
    p0: np.ndarray  # mm (z, y, x)
    p1: np.ndarray
    radius: float


def _bbox(
    grid: _Grid, lo: np.ndarray, hi: np.ndarray
) -> tuple[slice, slice, slice] | None:
    """Index slices covering the mm box [lo, hi] (z, y, x); None if outside."""
    out = []
    for axis, coords in enumerate((grid.z, grid.y, grid.x)):
        step = float(coords[1] - coords[0]) if coords.size > 1 else 1.0
        a = int(np.floor((lo[axis] - coords[0]) / step))
        b = int(np.ceil((hi[axis] - coords[0]) / step)) + 1
        a, b = max(a, 0), min(b, coords.size)
        if a >= b:
            return None
        out.append(slice(a, b))
    return out[0], out[1], out[2]


def _local_coords(
    grid: _Grid, box: tuple[slice, slice, slice]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        grid.z[box[0]][:, None, None],
        grid.y[box[1]][None, :, None],
        grid.x[box[2]][None, None, :],
    )


def _segment_distance(
    grid: _Grid, box: tuple[slice, slice, slice], seg: _Segment
) -> np.ndarray:
    zz, yy, xx = _local_coords(grid, box)
    d = (seg.p1 - seg.p0).astype(np.float32)
    length2 = float(d @ d) + 1e-6
    rz, ry, rx = zz - seg.p0[0], yy - seg.p0[1], xx - seg.p0[2]
    t = np.clip((rz * d[0] + ry * d[1] + rx * d[2]) / length2, 0.0, 1.0)
    ez, ey, ex = rz - t * d[0], ry - t * d[1], rx - t * d[2]
    distance: np.ndarray = np.sqrt(ez * ez + ey * ey + ex * ex)
    return distance


def _grow_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    depth: int,
    out: list[_Segment],
) -> None:
    if radius < 0.5 or depth > 7:
        return
    length = radius * rng.uniform(8, 15)
    direction = direction / (np.linalg.norm(direction) + 1e-9)
    end = start + direction * length
    out.append(
        _Segment(start.astype(np.float32), end.astype(np.float32), float(radius))
    )
    for _ in range(2):
        turn = rng.normal(0, 0.55, size=3)
        _grow_tree(
            rng, end, direction + turn, radius * rng.uniform(0.62, 0.8), depth + 1, out
        )


def _lung_centres(grid: _Grid, an: _Anatomy) -> list[tuple[np.ndarray, float]]:
    """Hilum point (z, y, x) in mm and side for each lung."""
    t = np.nan_to_num(an.lung_t, nan=-1.0)
    k = int(np.argmin(np.abs(t - 0.45)))
    out = []
    for lung in an.lungs:
        prof = float(_lung_profile(np.array([t[k]]))[0])
        x = an.cx + an.ax[k] * (lung["u"] - lung["side"] * lung["su"] * prof * 0.55)
        y = an.cy[k] + an.ay[k] * lung["v"]
        out.append((np.array([grid.z[k], y, x], dtype=np.float32), lung["side"]))
    return out


def _draw_vessels(
    hu: np.ndarray,
    lung: np.ndarray,
    grid: _Grid,
    an: _Anatomy,
    rng: np.random.Generator,
) -> list[_Segment]:
    segments: list[_Segment] = []
    scale = float(np.mean(an.ax)) / 170.0
    density = rng.uniform(0.7, 1.3)
    for hilum, side in _lung_centres(grid, an):
        for _ in range(int(rng.integers(10, 18) * density)):
            start = hilum + np.array(
                [rng.normal(0, 25), rng.normal(0, 8), 0], dtype=np.float32
            )
            direction = np.array(
                [
                    rng.normal(0, 1.3),
                    rng.normal(0, 0.6),
                    side * abs(rng.normal(0.8, 0.4)),
                ]
            )
            _grow_tree(
                rng,
                start,
                direction,
                rng.uniform(2.5, 5.0) * max(scale, 0.4),
                0,
                segments,
            )
    blood = rng.uniform(20, 60) if not an.contrast else rng.uniform(120, 300)
    edge = max(grid.spacing_zyx) * 0.7
    for seg in segments:
        lo = np.minimum(seg.p0, seg.p1) - seg.radius - edge
        hi = np.maximum(seg.p0, seg.p1) + seg.radius + edge
        box = _bbox(grid, lo, hi)
        if box is None:
            continue
        occ = np.clip(
            0.5 + (seg.radius - _segment_distance(grid, box, seg)) / edge, 0, 1
        )
        inside = lung[box]
        sub = hu[box]
        blend = sub + occ * (blood - sub)
        hu[box] = np.where(inside & (blend > sub), blend, sub)
    return segments


# ----------------------------------------------------------------------------- nodules


@dataclass
class _NoduleSpec:
    centre: np.ndarray  # mm (z, y, x)
    diameter: float
    kind: str
    pleural: bool
    vascular: bool
    hu: float
    lobes: list[tuple[np.ndarray, float]]  # (offset mm, radius mm), first is the core
    density: str = "solid"
    solid_diameter: float | None = None
    solid_hu: float | None = None


def _nodule_lobes(
    rng: np.random.Generator, diameter: float, kind: str
) -> list[tuple[np.ndarray, float]]:
    r = diameter / 2
    lobes = [(np.zeros(3, dtype=np.float32), r)]
    if kind == "irregular":
        for _ in range(int(rng.integers(3, 7))):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            lobes.append(
                (
                    (d * r * rng.uniform(0.45, 0.7)).astype(np.float32),
                    r * rng.uniform(0.35, 0.6),
                )
            )
    return lobes


def _signed_distance(
    grid: _Grid, box: tuple[slice, slice, slice], spec: _NoduleSpec
) -> np.ndarray:
    zz, yy, xx = _local_coords(grid, box)
    out: np.ndarray | None = None
    for offset, radius in spec.lobes:
        c = spec.centre + offset
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) - radius
        out = d if out is None else np.minimum(out, d)
    assert out is not None
    return out


def _random_lung_point(
    rng: np.random.Generator, lung: np.ndarray, grid: _Grid, margin_mm: float
) -> np.ndarray | None:
    """A random voxel centre (mm) inside the lungs at least ``margin_mm`` from walls."""
    step = max(1, round(4.0 / grid.spacing_zyx[1]))
    zstep = max(1, round(4.0 / grid.spacing_zyx[0]))
    sub = lung[::zstep, ::step, ::step]
    if not sub.any():
        return None
    iters = max(1, round(margin_mm / 4.0))
    core = ndimage.binary_erosion(sub, iterations=iters) if iters > 0 else sub
    idx = np.argwhere(core if core.any() else sub)
    k = idx[rng.integers(len(idx))]
    return np.array(
        [grid.z[k[0] * zstep], grid.y[k[1] * step], grid.x[k[2] * step]],
        dtype=np.float32,
    )


def _pleural_point(
    rng: np.random.Generator, lung: np.ndarray, grid: _Grid, radius: float
) -> np.ndarray | None:
    """A point inside the lung about ``0.7 radius`` from the pleura."""
    p = _random_lung_point(rng, lung, grid, radius + 4)
    if p is None:
        return None
    direction = np.array([0.0, rng.normal(0, 1), rng.normal(0, 1)], dtype=np.float32)
    direction /= np.linalg.norm(direction) + 1e-9
    step = grid.spacing_zyx[1]
    pos = p.copy()
    for _ in range(2000):
        nxt = pos + direction * step
        ijk = _to_index(grid, nxt)
        if ijk is None or not lung[ijk]:
            break
        pos = nxt
    point: np.ndarray = (pos - direction * radius * rng.uniform(0.45, 0.8)).astype(np.float32)
    return point


def _to_index(grid: _Grid, p: np.ndarray) -> tuple[int, int, int] | None:
    out = []
    for axis, coords in enumerate((grid.z, grid.y, grid.x)):
        step = float(coords[1] - coords[0]) if coords.size > 1 else 1.0
        i = round((p[axis] - coords[0]) / step)
        if i < 0 or i >= coords.size:
            return None
        out.append(i)
    return out[0], out[1], out[2]


def _vascular_point(
    rng: np.random.Generator,
    segments: list[_Segment],
    lung: np.ndarray,
    grid: _Grid,
    radius: float,
) -> np.ndarray | None:
    candidates = [s for s in segments if s.radius >= 1.0]
    for _ in range(30):
        if not candidates:
            return None
        seg = candidates[int(rng.integers(len(candidates)))]
        p = seg.p0 + (seg.p1 - seg.p0) * rng.uniform(0.2, 0.8)
        axis = seg.p1 - seg.p0
        perp = np.cross(axis, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-9
        c: np.ndarray = (p + perp * (radius + seg.radius) * rng.uniform(0.6, 0.9)).astype(np.float32)
        if _inside_lung(lung, grid, c, radius * 0.8):
            return c
    return None


def _inside_lung(lung: np.ndarray, grid: _Grid, c: np.ndarray, radius: float) -> bool:
    for d in (
        [0, 0, 0],
        [1, 0, 0],
        [-1, 0, 0],
        [0, 1, 0],
        [0, -1, 0],
        [0, 0, 1],
        [0, 0, -1],
    ):
        ijk = _to_index(grid, c + np.asarray(d, dtype=np.float32) * radius)
        if ijk is None or not lung[ijk]:
            return False
    return True


def _sample_nodules(
    rng: np.random.Generator,
    lung: np.ndarray,
    grid: _Grid,
    segments: list[_Segment],
    kw: dict[str, Any],
) -> list[_NoduleSpec]:
    diameters = kw.get("nodule_diameters_mm")
    if diameters is None:
        count = kw.get("n_nodules")
        count = int(rng.integers(1, 6)) if count is None else int(count)
        diameters = list(np.exp(rng.uniform(np.log(4.0), np.log(30.0), size=count)))
    kinds = kw.get("nodule_kinds")
    specs: list[_NoduleSpec] = []
    for n, diameter in enumerate(diameters):
        kind = (
            kinds[n] if kinds else ("irregular" if rng.random() < 0.4 else "spherical")
        )
        spec = _place_nodule(rng, lung, grid, segments, float(diameter), kind, specs)
        if spec is not None:
            specs.append(spec)
    return specs


def _place_nodule(
    rng: np.random.Generator,
    lung: np.ndarray,
    grid: _Grid,
    segments: list[_Segment],
    diameter: float,
    kind: str,
    placed: list[_NoduleSpec],
) -> _NoduleSpec | None:
    r = diameter / 2
    for _ in range(40):
        roll = rng.random()
        pleural, vascular = roll < 0.25, 0.25 <= roll < 0.5
        if pleural:
            c = _pleural_point(rng, lung, grid, r)
        elif vascular:
            c = _vascular_point(rng, segments, lung, grid, r)
        else:
            c = _random_lung_point(rng, lung, grid, r + 3)
        if c is None or not _inside_lung(lung, grid, c, 0.0):
            continue
        if any(
            np.linalg.norm(c - p.centre) < (r + p.diameter / 2) * 1.3 + 5
            for p in placed
        ):
            continue
        return _NoduleSpec(
            c,
            diameter,
            kind,
            pleural,
            vascular,
            float(rng.uniform(-100, 100)),
            _nodule_lobes(rng, diameter, kind),
        )
    return None


def _draw_nodules(
    hu: np.ndarray,
    labels: np.ndarray,
    lung: np.ndarray,
    grid: _Grid,
    specs: list[_NoduleSpec],
) -> None:
    edge = max(grid.spacing_zyx) * 0.7
    for spec in specs:
        reach = max(float(np.linalg.norm(o)) + rr for o, rr in spec.lobes) + edge + 1
        box = _bbox(grid, spec.centre - reach, spec.centre + reach)
        if box is None:
            continue
        sd = _signed_distance(grid, box, spec)
        occ = np.clip(0.5 - sd / edge, 0, 1)
        inside = lung[box]
        sub = hu[box]
        hu[box] = np.where(inside, sub + occ * (spec.hu - sub), sub)
        if spec.solid_diameter is not None and spec.solid_hu is not None:
            zz, yy, xx = _local_coords(grid, box)
            c = spec.centre
            core = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) - spec.solid_diameter / 2
            solid = np.clip(0.5 - core / edge, 0, 1)
            sub = hu[box]
            hu[box] = np.where(inside, sub + solid * (spec.solid_hu - sub), sub)
        labels[box] |= (inside & (sd <= 0)).astype(np.uint8)


DENSITIES = ("solid", "ground_glass", "part_solid")


def _set_densities(specs: list[_NoduleSpec], densities: Sequence[str], rng: np.random.Generator) -> None:
    """Make ``specs`` ground glass (-750 to -350 HU) or part-solid (a ground-glass
    nodule with a solid core of 30-60 % of its diameter, -50 to +50 HU), one density
    per nodule in order; "solid" leaves a nodule as drawn."""
    for spec, density in zip(specs, densities):
        spec.density = density
        if density == "solid":
            continue
        spec.hu = float(rng.uniform(-750, -350) if density == "ground_glass" else rng.uniform(-650, -400))
        if density == "part_solid":
            spec.solid_diameter = float(spec.diameter * rng.uniform(0.3, 0.6))
            spec.solid_hu = float(rng.uniform(-50, 50))


def _draw_fissures(hu: np.ndarray, lung: np.ndarray, grid: _Grid, rng: np.random.Generator) -> None:
    """An oblique fissure in each lung and a horizontal one in the right: a slightly
    curved sheet about 1 mm thick at -300 to -100 HU, drawn only inside the lungs (the
    slice-thickness blur then dilutes it as a thick slice does)."""
    yy = grid.y[:, None]
    xx = grid.x[None, :]
    mid_x, mid_y = float(np.mean(grid.x)), float(np.mean(grid.y))
    z0, z1 = float(grid.z[0]), float(grid.z[-1])
    oblique = []
    for side in (-1.0, 1.0):  # from high behind to low in front
        tilt, y_mid, bend = rng.uniform(0.6, 1.2), mid_y + rng.uniform(-20, 20), rng.uniform(-0.002, 0.002)
        half = rng.uniform(0.5, 0.8)
        oblique.append((tilt, y_mid, bend, half, (xx - mid_x) * side > 0))
    z_horizontal = z0 + rng.uniform(0.55, 0.7) * (z1 - z0)
    half_h = rng.uniform(0.5, 0.8)
    values = rng.uniform(-300, -100, size=3)
    right = np.broadcast_to((xx - mid_x) < 0, (yy.shape[0], xx.shape[1]))
    for k, z in enumerate(grid.z):
        in_lung = lung[k]
        if not in_lung.any():
            continue
        for (tilt, y_mid, bend, half, lung_side), value in zip(oblique, values[:2]):
            dist = ((yy - y_mid) + tilt * (z - (z0 + z1) / 2) + bend * (xx - mid_x) ** 2) / np.sqrt(1 + tilt ** 2)
            hu[k][(np.abs(dist) <= half) & lung_side & in_lung] = value
        horizontal = (z - z_horizontal) + 0.1 * (yy - mid_y)
        hu[k][(np.abs(horizontal) <= half_h) & right & in_lung] = values[2]


# ----------------------------------------------------------------------------- finishing


def _blur_inplane(hu: np.ndarray) -> None:
    """A cheap [1 2 1]/4 blur along rows and columns, in place, a few slices at a time."""
    for k in range(0, hu.shape[0], 8):
        block = hu[k : k + 8]
        for axis in (1, 2):
            a = np.swapaxes(block, 0, axis)
            mid = a[1:-1] * 0.5
            mid += 0.25 * a[:-2]
            mid += 0.25 * a[2:]
            a[1:-1] = mid


def _add_noise(hu: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
    for k in range(hu.shape[0]):
        hu[k] += rng.standard_normal(hu.shape[1:], dtype=np.float32) * sigma


def _thickness_blur(hu: np.ndarray, geo: _Geometry) -> None:
    if geo.thickness_mm > geo.slice_mm * 1.05:
        sigma = (geo.thickness_mm / 2.355) / geo.slice_mm
        ndimage.gaussian_filter1d(hu, sigma, axis=0, output=hu, mode="nearest")


def _layout(geo: _Geometry, grid: _Grid, seed: int) -> SeriesLayout:
    origin = (
        float(grid.x[0]),
        float(grid.y[0]),
        float(grid.z[0]) - 0.5 * float(grid.z[-1]),
    )
    return SeriesLayout(
        pixel_spacing_mm=(geo.pixel_mm, geo.pixel_mm),
        slice_spacing_mm=geo.slice_mm,
        slice_thickness_mm=geo.thickness_mm,
        origin_mm=origin,
        signed=geo.signed,
        bits_stored=geo.bits_stored,
        series_description=f"Chest CT phantom {geo.thickness_mm:g}mm (seed {seed})",
    )


def _nodule_records(
    specs: list[_NoduleSpec], grid: _Grid, layout: SeriesLayout
) -> list[Nodule]:
    out = []
    z0 = layout.origin_mm[2] - float(grid.z[0])
    for n, s in enumerate(specs):
        kz, ky, kx = (
            float((s.centre[a] - c[0]) / grid.spacing_zyx[a])
            for a, c in enumerate((grid.z, grid.y, grid.x))
        )
        vox = (kz, ky, kx)
        mm = (float(s.centre[2]), float(s.centre[1]), float(s.centre[0]) + z0)
        out.append(
            Nodule(n + 1, vox, mm, s.diameter, s.kind, s.pleural, s.vascular, s.hu,
                   s.density, s.solid_diameter, s.solid_hu)
        )
    return out


def make_chest_phantom(
    seed: int,
    *,
    slices: int | None = None,
    rows: int = 512,
    columns: int | None = None,
    pixel_spacing_mm: float | None = None,
    slice_spacing_mm: float | None = None,
    slice_thickness_mm: float | None = None,
    noise_hu: float | None = None,
    n_nodules: int | None = None,
    nodule_diameters_mm: Sequence[float] | None = None,
    nodule_kinds: Sequence[str] | None = None,
    nodule_densities: Sequence[str] | None = None,
    fissures: bool = False,
    signed: bool | None = None,
    bits_stored: int | None = None,
    table: bool | None = None,
) -> ChestPhantom:
    """Generate a chest CT phantom; every unset parameter is drawn from ``seed``.

    ``nodule_diameters_mm`` fixes the nodules (their kinds from ``nodule_kinds``,
    "spherical" or "irregular"); otherwise ``n_nodules`` (default 1-5) nodules of
    4-30 mm are drawn. A nodule that cannot be placed in the lungs is skipped, so
    ``len(phantom.nodules)`` may be smaller than asked for on tiny grids.

    ``nodule_densities`` makes the nodules, in order, "solid", "ground_glass" or
    "part_solid" (solid by default), and ``fissures`` draws the interlobar fissures.
    Both draw from a stream of their own, so a seed's anatomy, nodule places and noise
    are the same with them as without.
    """
    unknown = sorted(set(nodule_densities or ()) - set(DENSITIES))
    if unknown:  # before anything is drawn, and whether or not every nodule finds a place
        raise ValueError(f"unknown nodule density {unknown[0]!r}: one of {', '.join(DENSITIES)}")
    rng = np.random.default_rng(seed)
    kw = {
        "slices": slices,
        "rows": rows,
        "columns": columns,
        "pixel_spacing_mm": pixel_spacing_mm,
        "slice_spacing_mm": slice_spacing_mm,
        "slice_thickness_mm": slice_thickness_mm,
        "noise_hu": noise_hu,
        "signed": signed,
        "bits_stored": bits_stored,
    }
    geo = _sample_geometry(rng, kw)
    grid = _make_grid(geo, rng)
    an = _sample_anatomy(grid, rng)
    hu, lung = _draw_body(grid, an, rng)
    draw_table = bool(rng.random() < 0.6) if table is None else table
    if draw_table:
        _draw_table(hu, grid, an, rng)
    segments = _draw_vessels(hu, lung, grid, an, rng)
    extra = np.random.default_rng([seed, 1])  # densities and fissures: the main stream stays as it was
    if fissures:
        _draw_fissures(hu, lung, grid, extra)
    specs = _sample_nodules(
        rng,
        lung,
        grid,
        segments,
        {
            "n_nodules": n_nodules,
            "nodule_diameters_mm": nodule_diameters_mm,
            "nodule_kinds": nodule_kinds,
        },
    )
    if nodule_densities is not None:
        _set_densities(specs, nodule_densities, extra)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    _draw_nodules(hu, labels, lung, grid, specs)
    _blur_inplane(hu)
    _thickness_blur(hu, geo)
    _add_noise(hu, geo.noise_hu, rng)
    np.clip(hu, -1024.0, 3000.0, out=hu)
    layout = _layout(geo, grid, seed)
    params = {
        "noise_hu": geo.noise_hu,
        "contrast": an.contrast,
        "table": draw_table,
        "lung_hu": an.lung_hu,
    }
    return ChestPhantom(
        hu, labels, _nodule_records(specs, grid, layout), layout, seed, params, lung
    )


def _draw_table(
    hu: np.ndarray, grid: _Grid, an: _Anatomy, rng: np.random.Generator
) -> None:
    top = float(np.max(an.cy + an.ay)) + rng.uniform(3, 20)
    thick = rng.uniform(5, 15)
    curve = rng.uniform(0.0, 0.0006)
    yy = grid.y[:, None] - (top + curve * (grid.x[None, :] - an.cx) ** 2)
    plate = (
        (yy >= 0)
        & (yy <= thick)
        & (np.abs(grid.x[None, :] - an.cx) < rng.uniform(180, 240))
    )
    if plate.any():
        hu[:, plate] = rng.uniform(-400, 150)


def write_chest_phantom(
    out_dir: Path | str, seed: int, *, study: StudyIdentity | None = None, **kw: Any
) -> tuple[list[Path], ChestPhantom]:
    """Generate a phantom with :func:`make_chest_phantom` and write it as a CT series."""
    phantom = make_chest_phantom(seed, **kw)
    paths = write_ct_series(
        phantom.hu_zyx, Path(out_dir), study=study, layout=phantom.layout
    )
    return paths, phantom
