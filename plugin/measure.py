"""Turn a label map into findings: components, volumes, axes and outlines.

Conventions
-----------
* Arrays are indexed ``[x, y, z]`` (x = DICOM column, y = DICOM row, z = slice), as in
  :mod:`plugin.types`. Output pixel coordinates (outlines, axis end points) are
  ``(column, row)`` in the DICOM SCOORD convention (PS3.3 C.18.6.1.2): the top-left
  corner of the top-left pixel is ``(0, 0)``, so pixel ``[x, y]`` covers ``x .. x + 1``
  and its centre is ``(x + 0.5, y + 0.5)``. They can go straight into an SR SCOORD.
* Connected components use **26-connectivity** in 3D (voxels touching by a face, an
  edge or a corner belong together). In 2D outlines the foreground is 8-connected.
* Outlines are the 0.5 iso-line of the binary slice (marching squares): vertices lie
  half-way between an inside and an outside pixel centre, i.e. in the middle of the
  pixel edge they share; corners are cut diagonally.
  Holes are filled first, so every outline is an outer boundary. Collinear vertices
  are removed; each outline is closed (last vertex == first) with a positive shoelace
  area in (column, row) (clockwise on screen, where rows point down).
* Lengths are in mm using the column and row spacings from the affine (the norms of
  its first two columns), which assumes orthogonal row and column directions (true for
  DICOM images).
* Long axis: the longest distance between two outline vertices on the key slice (the
  exact diameter of the outline polygon). Short axis: the longest chord *exactly*
  perpendicular to the long axis (angular tolerance 0): lines perpendicular to the
  long axis are swept through every outline vertex and the extent of the outline on
  each line is measured; the chord runs between the extreme intersections. For
  concave or split outlines this chord may cross outside the finding.
* Volume: voxel count times ``|det(affine[:3, :3])|``, or for a label with
  ``boundary: half_maximum`` the partial-volume corrected volume of the mask moved to the
  lesion's half-maximum edge (:mod:`plugin.lesion_measure`). Centroid: the mean voxel
  index mapped through the LPS affine.
* Attenuation of a finding (mean, standard deviation, maximum HU): over its core, the
  voxels at least 1 mm inside its boundary (:mod:`plugin.lesion_measure`); of a
  structure (an organ): over all its voxels.
* Composition ("solid", "part_solid", "ground_glass") and a part-solid finding's solid
  component (:mod:`plugin.lesion_measure`): its volume (voxel count) and its long axis on
  its own axial slice of largest extent.
* A label's ``min_volume_mm3`` applies twice: to the model's component (its voxels in the
  label map) and to the finding's measured volume, the one the report gives. A
  component refined to a half-maximum edge smaller than that is not reported.
* One lesion, one finding: components of a ``per_component`` label whose measured
  masks overlap or share a face are one finding, measured again from the union of their
  model masks. The model's mask can part a lesion (a lobulated mass on
  thick slices) into pieces that their half-maximum edges join; listed apart, the report
  would give one mass as "Mass 1", "Mass 2" and "Nodule 1". Masks that meet only at an
  edge or a corner (a vessel beside a nodule) or have a gap between them stay apart.
* A finding whose long axis reaches the label's ``mass.min_long_axis_mm`` is named and
  coded as the mass (e.g. "Mass 1", SCT 4147007) instead of the label's type.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydicom.sr.coding import Code
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull, QhullError

from plugin.lesion_measure import Attenuation, margin_voxels, measure_lesion
from plugin.manifest import LabelSpec
from plugin.types import Axis, Finding, Findings, SegmentCodes

logger = logging.getLogger(__name__)

CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
FACE_CONNECTIVITY_3D = ndimage.generate_binary_structure(3, 1)  # 6-connectivity: faces only

# Marching squares: cell corners a=(i,j) b=(i+1,j) c=(i+1,j+1) d=(i,j+1); code = a+2b+4c+8d.
# Edges: 0 = a-b, 1 = b-c, 2 = c-d, 3 = d-a. Saddles keep the inside diagonal connected.
_CASES: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((3, 0),),
    2: ((0, 1),),
    3: ((3, 1),),
    4: ((1, 2),),
    5: ((0, 1), (2, 3)),
    6: ((0, 2),),
    7: ((3, 2),),
    8: ((2, 3),),
    9: ((0, 2),),
    10: ((3, 0), (1, 2)),
    11: ((1, 2),),
    12: ((1, 3),),
    13: ((0, 1),),
    14: ((3, 0),),
}
# Edge midpoints in doubled cell coordinates, offsets from (2i, 2j).
_EDGE_OFFSETS = np.array([[1, 0], [2, 1], [1, 2], [0, 1]], dtype=np.int64)


@dataclass
class _Component:
    label: int  # manifest label value
    spec: LabelSpec
    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, inside ``box``
    count: int
    centroid_index: np.ndarray  # (x, y, z) mean voxel index
    volume_mm3: float
    attenuation: Attenuation
    composition: str = "solid"
    solid_mask: np.ndarray | None = None  # a part-solid lesion's solid component, like ``mask``
    touch_mask: np.ndarray | None = None  # what another finding touches, like ``mask`` (None: ``mask``)


def measure_findings(
    labels: np.ndarray,
    hu: np.ndarray,
    lps_affine: np.ndarray,
    label_specs: Mapping[int, LabelSpec],
    *,
    procedure: Code | None = None,
) -> Findings:
    """Measure every finding in ``labels`` (X, Y, Z) and relabel them 1..N, largest first.

    Label values not in ``label_specs`` are ignored (and absent from the result).
    """
    if labels.shape != hu.shape or labels.ndim != 3:
        raise ValueError(f"labels {labels.shape} and hu {hu.shape} must be the same 3D shape")
    affine = np.asarray(lps_affine, dtype=np.float64)
    spacing3 = tuple(float(np.linalg.norm(affine[:3, a])) for a in range(3))
    spacing = (spacing3[0], spacing3[1])
    components = _components(labels, hu, label_specs, spacing3)  # type: ignore[arg-type]
    components.sort(key=lambda c: (-c.volume_mm3, *np.round(c.centroid_index[::-1], 6), c.label))
    out = np.zeros(labels.shape, dtype=np.uint8 if len(components) < 256
                   else np.uint16 if len(components) < 65536 else np.int32)
    findings: list[Finding] = []
    per_name: dict[str, int] = {}
    for value, comp in enumerate(components, start=1):
        out[comp.box][comp.mask] = value
        finding = _finding(value, comp.spec.name, comp, affine, spacing, float(np.prod(spacing3)))
        _name_by_size(finding, comp.spec, per_name)
        findings.append(finding)
    summary = ", ".join(f"{f.name} {f.volume_mm3:.0f} mm3" for f in findings) or "no findings"
    result = Findings(label_map=out, findings=findings, summary=summary)
    if procedure is not None:
        result.procedure = procedure
    logger.debug("measured %d findings", len(findings))
    return result


def _name_by_size(finding: Finding, spec: LabelSpec, per_name: dict[str, int]) -> None:
    """Name (and code, for a mass) ``finding``, numbered per name: "Nodule 2", "Mass 1"."""
    name = spec.name
    if spec.mass is not None and finding.long_axis.length_mm >= spec.mass.min_long_axis_mm:
        name = spec.mass.name
        codes = finding.codes
        finding.codes = SegmentCodes(codes.category, spec.mass.type.code(), codes.site,
                                     codes.color_rgb, codes.modifier)
    per_name[name] = per_name.get(name, 0) + 1
    finding.name = f"{name} {per_name[name]}" if spec.per_component else name


def _components(
    labels: np.ndarray,
    hu: np.ndarray,
    label_specs: Mapping[int, LabelSpec],
    spacing: tuple[float, float, float],
) -> list[_Component]:
    unknown = _unknown_values(labels, set(label_specs))
    if unknown:
        logger.warning("ignoring label values not in the manifest: %s", sorted(unknown))
    found: list[_Component] = []
    regions = _label_boxes(labels, max(label_specs, default=0))
    for value, spec in sorted(label_specs.items()):
        before = len(found)
        region = regions.get(value)
        if region is None:
            continue
        mask = labels[region] == value  # components are found in the box around the label only
        if spec.per_component:
            comp_map, n = ndimage.label(mask, structure=CONNECTIVITY_3D)
        else:
            comp_map, n = mask.astype(np.int32), 1
        boxes = ndimage.find_objects(comp_map)
        kept: list[tuple[_Component, tuple[slice, slice, slice], np.ndarray]] = []
        for index, local_box in enumerate(boxes, start=1):
            if local_box is None:
                continue
            local = comp_map[local_box] == index
            if float(local.sum()) * float(np.prod(spacing)) < spec.min_volume_mm3:
                continue  # the model's component, before any refinement
            x, y, z = (slice(r.start + b.start, r.start + b.stop) for r, b in zip(region, local_box))
            measured = _measured(value, spec, (x, y, z), local, labels, hu, spacing)
            if measured.volume_mm3 < spec.min_volume_mm3:
                continue  # what the report would give: refined to the lesion's edge, too small
            kept.append((measured, (x, y, z), local))
        merged = _merge_touching(value, spec, kept, labels, hu, spacing) if spec.per_component else kept
        found.extend(component for component, _, _ in merged)
        logger.debug("label %d: %d component(s), %d kept, %d after joining touching ones",
                     value, n, len(kept), len(found) - before)
    return found


def _merge_touching(
    value: int,
    spec: LabelSpec,
    kept: list[tuple[_Component, tuple[slice, slice, slice], np.ndarray]],
    labels: np.ndarray,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
) -> list[tuple[_Component, tuple[slice, slice, slice], np.ndarray]]:
    """One finding for components whose measured masks overlap or share a face:
    refined to the lesion's edge they are one lesion, which the report must not list
    twice (the model's mask can part a lesion on thick slices). A group is measured again
    from the union of its model masks; a component alone is left as it is."""
    groups = _touching_groups([component for component, _, _ in kept])
    out = []
    for group in groups:
        if len(group) == 1:
            out.append(kept[group[0]])
            continue
        x, y, z = (slice(min(kept[i][1][a].start for i in group), max(kept[i][1][a].stop for i in group))
                   for a in range(3))
        box = (x, y, z)
        union = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
        for i in group:
            union[tuple(slice(m.start - b.start, m.stop - b.start) for m, b in zip(kept[i][1], box))] |= kept[i][2]
        joined = _measured(value, spec, box, union, labels, hu, spacing)
        logger.debug("label %d: %d touching findings measured as one", value, len(group))
        if joined.volume_mm3 >= spec.min_volume_mm3:
            out.append((joined, box, union))
    return out


def _touching_groups(components: list[_Component]) -> list[list[int]]:
    """Indices of ``components`` grouped by :func:`_touch`, transitively (the connected
    components of the touch graph), each group in ascending order."""
    n = len(components)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if _touch(components[i], components[j])]
    rows, cols = [i for i, _ in pairs], [j for _, j in pairs]
    graph = coo_matrix((np.ones(len(pairs), dtype=bool), (rows, cols)), shape=(n, n))
    _, group_of = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, group in enumerate(group_of.tolist()):
        groups.setdefault(group, []).append(i)
    return list(groups.values())


def _touch(a: _Component, b: _Component) -> bool:
    """Whether the masks of ``a`` and ``b`` share a voxel or a face. Pieces of one lesion
    share faces; a structure that only meets a lesion's mask at an edge or a corner (a
    vessel beside a nodule, on thick slices) is left a finding of its own. A mask whose
    stumps were cut touches with what it was before the cut (``touch_mask``)."""
    mask_a = a.mask if a.touch_mask is None else a.touch_mask
    mask_b = b.mask if b.touch_mask is None else b.touch_mask
    low = [max(sa.start - 1, sb.start) for sa, sb in zip(a.box, b.box)]
    high = [min(sa.stop + 1, sb.stop) for sa, sb in zip(a.box, b.box)]
    if any(h <= lo for lo, h in zip(low, high)):
        return False
    padded = np.pad(mask_a, 1)  # ``a`` in its box grown by one voxel, then its 6 face neighbours
    near = ndimage.binary_dilation(padded, structure=FACE_CONNECTIVITY_3D)
    in_a = tuple(slice(lo - (sa.start - 1), h - (sa.start - 1)) for lo, h, sa in zip(low, high, a.box))
    in_b = tuple(slice(lo - sb.start, h - sb.start) for lo, h, sb in zip(low, high, b.box))
    return bool(np.any(near[in_a] & mask_b[in_b]))


def _measured(
    value: int,
    spec: LabelSpec,
    box: tuple[slice, slice, slice],
    mask: np.ndarray,
    labels: np.ndarray,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
) -> _Component:
    """One component measured on the source grid: a structure by its voxels, a finding
    by :func:`plugin.lesion_measure.measure_lesion` (its mask refined to the
    half-maximum edge when the label asks for it)."""
    voxel_mm3 = float(np.prod(spacing))
    composition, solid, touch = "solid", None, None
    if spec.role == "structure":
        values = hu[box][mask].astype(np.float64)
        att = Attenuation(float(values.mean()), float(values.std()), float(values.max()),
                          int(values.size), from_core=False)
        volume = float(mask.sum()) * voxel_mm3
    else:
        margin = margin_voxels(spacing)
        grown = tuple(slice(max(0, s.start - m), min(n, s.stop + m))
                      for s, m, n in zip(box, margin, labels.shape))
        inner = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown))
        local = np.zeros(tuple(g.stop - g.start for g in grown), dtype=bool)
        local[inner] = mask
        others = (labels[grown] != 0) & ~local
        result = measure_lesion(hu[grown], local, spacing,
                                half_maximum=spec.boundary == "half_maximum", others=others)
        tight = _bounding_box(result.mask if result.uncut_mask is None else result.uncut_mask)
        assert tight is not None  # measure_lesion never returns an empty mask
        box = tuple(slice(g.start + t.start, g.start + t.stop) for g, t in zip(grown, tight))  # type: ignore[assignment]
        mask = result.mask[tight]
        touch = None if result.uncut_mask is None else result.uncut_mask[tight]
        att, volume = result.attenuation, result.volume_mm3
        composition = result.composition
        if composition == "part_solid" and result.solid_mask is not None:
            solid = result.solid_mask[tight]
    count = int(mask.sum())
    offset = np.array([s.start for s in box], dtype=np.float64)
    centroid = _mean_index(mask, count) + offset
    return _Component(value, spec, box, mask, count, centroid, volume, att, composition, solid, touch)


def _mean_index(mask: np.ndarray, count: int) -> np.ndarray:
    """The mean voxel index of ``mask`` (``count`` true voxels), from its three axis
    projections: no index list of every voxel (a whole organ holds millions)."""
    means = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        profile = mask.sum(axis=others, dtype=np.int64)
        means.append(float(np.dot(np.arange(profile.size, dtype=np.float64), profile)) / count)
    return np.array(means, dtype=np.float64)


def _label_boxes(labels: np.ndarray, highest: int) -> dict[int, tuple[slice, ...]]:
    """The bounding box of each label value 1..``highest`` present in ``labels``, found
    in one pass over the map (``ndimage.find_objects``) instead of one per label: a
    104-label whole-body map costs one pass, not 104."""
    if labels.size == 0 or highest < 1:
        return {}
    if labels.dtype.kind not in "ui" or labels.min() < 0:
        boxes = {}
        for value in range(1, highest + 1):
            box = _bounding_box(labels == value)
            if box is not None:
                boxes[value] = box
        return boxes
    found = ndimage.find_objects(labels, max_label=highest)
    return {value: box for value, box in enumerate(found, start=1) if box is not None}


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every true voxel of ``mask``, or None if it is empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _unknown_values(labels: np.ndarray, known: set[int]) -> set[int]:
    """Nonzero label values in the map that are not in ``known``.

    When every value from 1 to the maximum is known, none can be unknown: the full
    count of values is skipped (one pass over the map instead of a bincount).
    """
    if labels.size == 0:
        return set()
    if labels.dtype.kind in "ui":
        low, high = int(labels.min()), int(labels.max())
        if low >= 0 and set(range(1, high + 1)) <= known:
            return set()
    return _present_values(labels) - known - {0}


def _present_values(labels: np.ndarray) -> set[int]:
    """Label values in the map (a bincount is much faster than unique on big maps)."""
    if labels.size == 0:
        return set()
    if labels.dtype.kind in "ui" and labels.min() >= 0 and labels.max() < 1 << 16:
        counts = np.zeros(int(labels.max()) + 1, dtype=np.int64)
        # By slabs (bincount copies its input to intp), across the first axis of a
        # C-ordered map so that each slab is one block, else across the last.
        axis = 0 if labels.flags.c_contiguous else labels.ndim - 1
        step = max(1, (8 << 20) // max(1, labels.size // max(1, labels.shape[axis])))
        for start in range(0, labels.shape[axis], step):
            index = [slice(None)] * labels.ndim
            index[axis] = slice(start, start + step)
            counts += np.bincount(labels[tuple(index)].ravel(), minlength=counts.size)
        return set(np.flatnonzero(counts).tolist())
    return set(np.unique(labels).tolist())


def _finding(
    value: int,
    name: str,
    comp: _Component,
    affine: np.ndarray,
    spacing: tuple[float, float],
    voxel_mm3: float,
) -> Finding:
    x0, y0, z0 = (s.start for s in comp.box)
    areas = comp.mask.sum(axis=(0, 1))
    candidates = np.flatnonzero(areas == areas.max())
    key_local = int(candidates[np.argmin(np.abs(candidates + z0 - comp.centroid_index[2]))])
    key_slice = z0 + key_local
    # a structure (organ) is outlined on its key slice only: its report gives its volume
    outlined = [key_local] if comp.spec.role == "structure" else range(comp.mask.shape[2])
    contours: dict[int, list[np.ndarray]] = {}
    for k in outlined:
        plane = comp.mask[:, :, k]
        if plane.any():
            contours[z0 + k] = [c + (x0, y0) for c in outlines(plane)]
    long_axis, short_axis = axes(contours[key_slice], spacing)
    centroid = affine @ np.append(comp.centroid_index, 1.0)
    return Finding(
        label=value,
        name=name,
        codes=comp.spec.segment_codes(),
        centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        volume_mm3=comp.volume_mm3,
        mean_hu=comp.attenuation.mean,
        sd_hu=comp.attenuation.sd,
        max_hu=comp.attenuation.maximum,
        attenuation_from_core=comp.attenuation.from_core,
        attenuation_voxels=comp.attenuation.voxels,
        key_slice=key_slice,
        long_axis=long_axis,
        short_axis=short_axis,
        contours=contours,
        role=comp.spec.role,
        composition=comp.composition,
        solid_volume_mm3=None if comp.solid_mask is None else float(comp.solid_mask.sum()) * voxel_mm3,
        solid_long_axis_mm=None if comp.solid_mask is None else _solid_long_axis(comp.solid_mask, spacing),
    )


def _solid_long_axis(solid: np.ndarray, spacing: tuple[float, float]) -> float:
    """The long axis (mm) of a solid component on its axial slice of largest extent."""
    areas = solid.sum(axis=(0, 1))
    polygons = outlines(solid[:, :, int(np.argmax(areas))])
    return axes(polygons, spacing)[0].length_mm


def outlines(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed outer outlines of a 2D mask indexed ``[column, row]``.

    Returns (N, 2) float arrays of (column, row); see the module conventions.
    """
    filled = np.asarray(ndimage.binary_fill_holes(mask2d), dtype=bool)
    if not filled.any():
        return []
    xs, ys = np.nonzero(filled)
    x0, y0 = int(xs.min()), int(ys.min())
    padded = np.pad(filled[x0 : xs.max() + 1, y0 : ys.max() + 1], 1).astype(np.int64)
    starts, ends = _segments(padded)
    shift = np.array([x0 - 0.5, y0 - 0.5], dtype=np.float64)  # padding, then SCOORD +0.5
    result = []
    for loop in _chain(starts, ends):
        loop = _drop_collinear(loop)
        if _signed_area(loop) < 0:
            loop = loop[::-1]
        closed = np.vstack([loop, loop[:1]]).astype(np.float64) / 2.0 + shift
        result.append(closed)
    return result


def _segments(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marching-squares segments as doubled-coordinate end points."""
    code = p[:-1, :-1] + 2 * p[1:, :-1] + 4 * p[1:, 1:] + 8 * p[:-1, 1:]
    starts, ends = [], []
    for case, pairs in _CASES.items():
        cells = np.argwhere(code == case) * 2
        if len(cells) == 0:
            continue
        for e1, e2 in pairs:
            starts.append(cells + _EDGE_OFFSETS[e1])
            ends.append(cells + _EDGE_OFFSETS[e2])
    return np.concatenate(starts), np.concatenate(ends)


def _chain(starts: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """Join segments (every end point is shared by exactly two) into closed loops."""
    at: dict[tuple[int, int], list[int]] = {}
    for index, (s, e) in enumerate(zip(map(tuple, starts.tolist()), map(tuple, ends.tolist()))):
        at.setdefault(s, []).append(index)
        at.setdefault(e, []).append(index)
    used = np.zeros(len(starts), dtype=bool)
    loops = []
    for first in range(len(starts)):
        if used[first]:
            continue
        used[first] = True
        origin = tuple(starts[first].tolist())
        points = [origin]
        current, segment = tuple(ends[first].tolist()), first
        while current != origin:
            points.append(current)
            segment = next(s for s in at[current] if s != segment)
            used[segment] = True
            s, e = tuple(starts[segment].tolist()), tuple(ends[segment].tolist())
            current = e if s == current else s
        loops.append(np.array(points, dtype=np.int64))
    return loops


def _drop_collinear(loop: np.ndarray) -> np.ndarray:
    before = loop - np.roll(loop, 1, axis=0)
    after = np.roll(loop, -1, axis=0) - loop
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return np.asarray(loop[cross != 0])


def _signed_area(loop: np.ndarray) -> float:
    x, y = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def axes(polygons: list[np.ndarray], spacing: tuple[float, float]) -> tuple[Axis, Axis]:
    """Long and short axis of the outlines of one slice (pixel coordinates, mm lengths)."""
    scale = np.asarray(spacing, dtype=np.float64)
    points = np.vstack([p[:-1] for p in polygons]) * scale
    a, b = _diameter(points)
    long_len = float(np.linalg.norm(b - a))
    long_axis = Axis(_pixel(a, scale), _pixel(b, scale), long_len)
    if long_len == 0.0:
        return long_axis, long_axis
    v = (b - a) / long_len
    u = np.array([-v[1], v[0]])
    c, d = _widest_perpendicular([p * scale for p in polygons], v, u)
    short_axis = Axis(_pixel(c, scale), _pixel(d, scale), float(np.linalg.norm(d - c)))
    return long_axis, short_axis


def _pixel(point_mm: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    col, row = point_mm / scale
    return (float(col), float(row))


def _diameter(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two points farthest apart (searched on the convex hull when it exists)."""
    candidates = points
    if len(points) > 3:
        try:
            candidates = points[ConvexHull(points).vertices]
        except QhullError:  # all points collinear: the full set is small enough
            candidates = points
    diff = candidates[:, None, :] - candidates[None, :, :]
    dist = np.einsum("ijk,ijk->ij", diff, diff)
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return candidates[i], candidates[j]


def _widest_perpendicular(
    polygons: list[np.ndarray], v: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """End points (mm) of the longest chord along ``u`` (perpendicular to ``v``)."""
    starts = np.vstack([p[:-1] for p in polygons])
    ends = np.vstack([p[1:] for p in polygons])
    ta, tb, sa, sb = starts @ v, ends @ v, starts @ u, ends @ u
    lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
    best = (-1.0, 0.0, 0.0, 0.0)
    chunk = max(1, 2_000_000 // max(len(ta), 1))
    sweeps = np.unique(ta)
    for begin in range(0, len(sweeps), chunk):
        t = sweeps[begin : begin + chunk, None]
        hit = (lo <= t) & (t <= hi)
        flat = tb == ta
        frac = np.where(flat, 0.0, (t - ta) / np.where(flat, 1.0, tb - ta))
        s = sa + frac * (sb - sa)
        s_max = np.where(hit, np.maximum(s, np.where(flat, sb, s)), -np.inf).max(axis=1)
        s_min = np.where(hit, np.minimum(s, np.where(flat, sb, s)), np.inf).min(axis=1)
        width = s_max - s_min
        k = int(np.argmax(width))
        if width[k] > best[0]:
            best = (float(width[k]), float(t[k, 0]), float(s_min[k]), float(s_max[k]))
    _, t_best, s0, s1 = best
    return t_best * v + s0 * u, t_best * v + s1 * u
