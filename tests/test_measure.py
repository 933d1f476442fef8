"""measure_findings on analytic shapes with known volumes, axes and positions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plugin.manifest import CodeSpec, LabelSpec
from plugin.lesion_measure import Attenuation
from plugin.measure import _Component, _touch, measure_findings, outlines

NODULE = LabelSpec(
    name="Nodule",
    per_component=True,
    min_volume_mm3=15,
    category=CodeSpec(scheme="SCT", value="49755003", meaning="Morphologically abnormal structure"),
    type=CodeSpec(scheme="SCT", value="27925004", meaning="Nodule"),
    site=CodeSpec(scheme="SCT", value="39607008", meaning="Lung"),
    color=(255, 64, 64),
)
SPLEEN = LabelSpec(
    name="Spleen",
    category=CodeSpec(scheme="SCT", value="91723000", meaning="Anatomical Structure"),
    type=CodeSpec(scheme="SCT", value="78961009", meaning="Spleen"),
)


def lps_affine(
    spacing: tuple[float, float, float], origin: tuple[float, float, float]
) -> np.ndarray:
    """An axial LPS affine (rows along +x, columns along +y, slices along +z)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def grid_mm(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World (LPS) coordinates of every voxel centre, shape (3, X, Y, Z)."""
    idx = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return np.asarray(world.reshape(3, *shape))


def test_sphere_on_anisotropic_grid() -> None:
    spacing = (0.7, 0.8, 1.5)
    shape = (64, 60, 30)
    affine = lps_affine(spacing, (-20.0, -30.0, 100.0))
    centre = np.array([2.3, -6.1, 122.4])
    radius = 10.0
    world = grid_mm(shape, affine)
    sphere = np.sum((world - centre[:, None, None, None]) ** 2, axis=0) <= radius**2
    labels = sphere.astype(np.int16)
    hu = np.where(sphere, 35.0, -800.0)

    result = measure_findings(labels, hu, affine, {1: NODULE})

    assert len(result.findings) == 1
    f = result.findings[0]
    assert f.name == "Nodule 1" and f.label == 1
    assert f.volume_mm3 == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.05)
    assert f.mean_hu == pytest.approx(35.0)
    assert np.allclose(f.centroid_mm, centre, atol=0.5)
    expected_key = round((centre[2] - 100.0) / 1.5)
    assert f.key_slice == expected_key
    assert f.long_axis.length_mm == pytest.approx(2 * radius, abs=0.8)
    assert f.short_axis.length_mm == pytest.approx(f.long_axis.length_mm, abs=0.8)
    assert f.codes.type.value == "27925004"
    assert np.array_equal(result.label_map > 0, sphere)


def test_rotated_ellipse_axes_are_2a_and_2b() -> None:
    spacing = (0.6, 0.6, 1.0)
    shape = (90, 90, 16)
    affine = lps_affine(spacing, (0.0, 0.0, 0.0))
    world = grid_mm(shape, affine)
    a, b, c = 12.0, 5.0, 4.0
    theta = np.deg2rad(30.0)
    dx, dy, dz = world[0] - 27.0, world[1] - 27.0, world[2] - 8.0
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    ellipsoid = (u / a) ** 2 + (v / b) ** 2 + (dz / c) ** 2 <= 1
    result = measure_findings(ellipsoid.astype(np.uint8), np.zeros(shape), affine, {1: NODULE})

    f = result.findings[0]
    assert f.key_slice == 8
    assert f.long_axis.length_mm == pytest.approx(2 * a, abs=0.6)
    assert f.short_axis.length_mm == pytest.approx(2 * b, abs=0.6)
    # the long axis follows the 30 degree direction; the axes are perpendicular (in mm)
    sx, sy = spacing[:2]
    la = np.subtract(f.long_axis.end, f.long_axis.start) * (sx, sy)
    sa = np.subtract(f.short_axis.end, f.short_axis.start) * (sx, sy)
    assert abs(np.dot(la, sa)) / (np.linalg.norm(la) * np.linalg.norm(sa)) < 1e-9
    angle = np.degrees(np.arctan2(la[1], la[0])) % 180
    assert angle == pytest.approx(30.0, abs=3.0)
    # the long axis is centred on index (45, 45), i.e. (45.5, 45.5) in SCOORD coordinates;
    # the short axis crosses near it (the width of an ellipse is flat near its centre)
    centre = np.array([45.5, 45.5])
    assert np.allclose(np.add(f.long_axis.start, f.long_axis.end) / 2, centre, atol=0.5)
    assert np.linalg.norm(np.add(f.short_axis.start, f.short_axis.end) / 2 - centre) < 3.0
    # end points are (column, row) pixel coordinates on the key slice, inside the image
    for point in (f.long_axis.start, f.long_axis.end, f.short_axis.start, f.short_axis.end):
        assert 0 <= point[0] < shape[0] and 0 <= point[1] < shape[1]


def test_centroid_follows_a_flipped_affine() -> None:
    shape = (20, 20, 10)
    affine = np.array(
        [[0.0, -0.9, 0.0, 50.0], [0.9, 0.0, 0.0, -40.0], [0.0, 0.0, -2.0, 300.0], [0, 0, 0, 1]]
    )
    labels = np.zeros(shape, dtype=np.int32)
    labels[4:7, 10:14, 2:5] = 1  # mean index (5, 11.5, 3)
    result = measure_findings(labels, np.zeros(shape), affine, {1: SPLEEN})
    expected = affine @ np.array([5.0, 11.5, 3.0, 1.0])
    assert np.allclose(result.findings[0].centroid_mm, expected[:3])
    assert result.findings[0].volume_mm3 == pytest.approx(36 * 0.9 * 0.9 * 2.0)


def _blob(labels: np.ndarray, centre: tuple[int, int, int], half: int, value: int = 1) -> None:
    x, y, z = centre
    labels[x - half : x + half + 1, y - half : y + half + 1, z - half : z + half + 1] = value


def test_components_ordered_largest_first_and_small_ones_dropped() -> None:
    shape = (60, 60, 20)
    affine = lps_affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = np.zeros(shape, dtype=np.int16)
    _blob(labels, (10, 10, 10), 1)  # 27 mm3
    _blob(labels, (30, 30, 10), 3)  # 343 mm3
    _blob(labels, (50, 10, 10), 2)  # 125 mm3
    labels[50, 50, 5] = 1  # 1 mm3: below min_volume_mm3 = 15
    labels[50, 50, 15] = 7  # not in the manifest: ignored
    hu = np.full(shape, -700.0)
    hu[labels == 1] = 10.0

    result = measure_findings(labels, hu, affine, {1: NODULE})

    assert [f.name for f in result.findings] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    assert [f.volume_mm3 for f in result.findings] == [343.0, 125.0, 27.0]
    assert [f.label for f in result.findings] == [1, 2, 3]
    for f in result.findings:
        assert int(np.sum(result.label_map == f.label)) == f.volume_mm3
        assert f.mean_hu == pytest.approx(10.0)
    assert result.label_map[50, 50, 5] == 0 and result.label_map[50, 50, 15] == 0
    assert set(np.unique(result.label_map).tolist()) == {0, 1, 2, 3}
    assert result.findings[0].centroid_mm == pytest.approx((30.0, 30.0, 10.0))


def test_a_finding_whose_measured_volume_is_below_the_minimum_is_not_reported() -> None:
    """``min_volume_mm3`` holds for the volume the report gives: a 7 x 7 x 7 mm component
    (343 mm3 in the label map) around a 4 mm ball (34 mm3) measures the ball at its
    half-maximum edge and is dropped; the same component around a 7 mm ball is kept."""
    shape = (40, 20, 20)
    affine = lps_affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    centres = ((10, 10, 10), (28, 10, 10))
    mm = grid_mm(shape, affine)
    hu = np.full(shape, -850.0)
    for (x, y, z), diameter in zip(centres, (4.0, 7.0)):
        inside = (mm[0] - x) ** 2 + (mm[1] - y) ** 2 + (mm[2] - z) ** 2 <= (diameter / 2) ** 2
        hu[inside] = 40.0
    labels = np.zeros(shape, dtype=np.uint8)
    for centre in centres:
        _blob(labels, centre, 3)
    spec = NODULE.model_copy(update={"min_volume_mm3": 60.0, "boundary": "half_maximum"})

    result = measure_findings(labels, hu, affine, {1: spec})

    assert len(result.findings) == 1
    kept = result.findings[0]
    assert kept.centroid_mm == pytest.approx((28.0, 10.0, 10.0), abs=0.5)
    assert kept.volume_mm3 == pytest.approx(4 / 3 * math.pi * 3.5**3, rel=0.2)
    assert not result.label_map[5:16].any()  # the dropped one is not in the label map either


def test_26_connectivity_and_equal_volumes_are_ordered_by_centroid() -> None:
    shape = (20, 20, 20)
    affine = np.eye(4)
    spec = NODULE.model_copy(update={"min_volume_mm3": 0.0})
    labels = np.zeros(shape, dtype=np.int16)
    labels[2, 2, 2] = labels[3, 3, 3] = 1  # corner-touching: one component
    labels[10, 10, 12] = labels[11, 11, 13] = 1
    result = measure_findings(labels, np.zeros(shape), affine, {1: spec})
    assert len(result.findings) == 2
    assert result.findings[0].centroid_mm == pytest.approx((2.5, 2.5, 2.5))


def test_per_component_false_gives_one_named_finding_and_contours() -> None:
    shape = (40, 40, 12)
    affine = lps_affine((0.8, 0.8, 2.0), (-10.0, -10.0, -5.0))
    labels = np.zeros(shape, dtype=np.uint8)
    _blob(labels, (10, 10, 5), 3)
    _blob(labels, (30, 28, 6), 2)
    result = measure_findings(labels, np.zeros(shape), affine, {1: SPLEEN})

    assert [f.name for f in result.findings] == ["Spleen"]
    f = result.findings[0]
    assert f.codes.type.value == "78961009" and f.codes.category.value == "91723000"
    assert sorted(f.contours) == list(range(2, 9))
    assert len(f.contours[6]) == 2  # both pieces cut slice 6
    for polygons in f.contours.values():
        for poly in polygons:
            assert poly.ndim == 2 and poly.shape[1] == 2
            assert np.array_equal(poly[0], poly[-1])


def test_outline_uses_scoord_pixel_coordinates() -> None:
    mask = np.zeros((8, 6), dtype=bool)
    mask[2:5, 1:3] = True  # columns 2..4, rows 1..2: the area x 2..5, y 1..3 in SCOORD terms
    (poly,) = outlines(mask)
    assert poly[:, 0].min() == 2.0 and poly[:, 0].max() == 5.0
    assert poly[:, 1].min() == 1.0 and poly[:, 1].max() == 3.0
    single = np.zeros((4, 4), dtype=bool)
    single[1, 2] = True  # one pixel: a diamond around its centre (1.5, 2.5)
    (diamond,) = outlines(single)
    assert sorted(map(tuple, diamond[:-1].tolist())) == [
        (1.0, 2.5),
        (1.5, 2.0),
        (1.5, 3.0),
        (2.0, 2.5),
    ]


def test_empty_label_map_gives_no_findings() -> None:
    result = measure_findings(np.zeros((4, 4, 4), int), np.zeros((4, 4, 4)), np.eye(4), {1: NODULE})
    assert result.findings == [] and not result.label_map.any()


@pytest.mark.parametrize("axis", [0, 2])
def test_one_lesion_parted_by_the_model_is_one_finding(axis: int) -> None:
    """A 16 mm ball whose model mask (one voxel short of its edge) is cut in two by a
    plane of missing voxels: refined to the half-maximum edge, both halves grow into the
    plane and touch, so the report gives one finding measured whole, not the ball twice
    (each half counting the plane)."""
    shape = (40, 40, 40)
    affine = lps_affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    mm = grid_mm(shape, affine)
    r2 = (mm[0] - 20) ** 2 + (mm[1] - 20) ** 2 + (mm[2] - 20) ** 2
    hu = np.where(r2 <= 8.0**2, 40.0, -850.0)
    labels = (r2 <= 7.0**2).astype(np.uint8)
    cut = [slice(None)] * 3
    cut[axis] = slice(20, 21)
    labels[tuple(cut)] = 0
    spec = NODULE.model_copy(update={"min_volume_mm3": 60.0, "boundary": "half_maximum"})

    result = measure_findings(labels, hu, affine, {1: spec})

    assert [f.name for f in result.findings] == ["Nodule 1"]
    assert result.findings[0].volume_mm3 == pytest.approx(4 / 3 * math.pi * 8.0**3, rel=0.05)
    assert result.findings[0].centroid_mm == pytest.approx((20.0, 20.0, 20.0), abs=0.5)
    assert set(np.unique(result.label_map).tolist()) == {0, 1}


def test_two_lesions_apart_stay_two_findings() -> None:
    """Two 10 mm balls 4 mm apart, each refined to its own edge: two findings."""
    shape = (40, 30, 30)
    affine = lps_affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    mm = grid_mm(shape, affine)
    hu = np.full(shape, -850.0)
    labels = np.zeros(shape, dtype=np.uint8)
    for x in (12.0, 26.0):
        r2 = (mm[0] - x) ** 2 + (mm[1] - 15) ** 2 + (mm[2] - 15) ** 2
        hu[r2 <= 5.0**2] = 40.0
        labels[r2 <= 4.0**2] = 1
    spec = NODULE.model_copy(update={"min_volume_mm3": 60.0, "boundary": "half_maximum"})

    result = measure_findings(labels, hu, affine, {1: spec})

    assert [f.name for f in result.findings] == ["Nodule 1", "Nodule 2"]
    for finding in result.findings:
        assert finding.volume_mm3 == pytest.approx(4 / 3 * math.pi * 5.0**3, rel=0.08)


def _piece(box: tuple[slice, slice, slice]) -> _Component:
    mask = np.ones(tuple(s.stop - s.start for s in box), dtype=bool)
    return _Component(1, NODULE, box, mask, int(mask.sum()), np.zeros(3), float(mask.sum()),
                      Attenuation(0.0, 0.0, 0.0, 1, from_core=True))


def test_findings_join_on_a_shared_face_not_on_an_edge_or_corner() -> None:
    """Held-out phantom 10017: a 21 mm nodule's measured mask met a vessel's at one corner
    voxel, and joining them made it a 31.5 mm "Mass"; pieces of one lesion share faces."""
    a = _piece((slice(0, 3), slice(0, 3), slice(0, 3)))
    assert _touch(a, _piece((slice(3, 5), slice(0, 2), slice(0, 2))))  # a face
    assert _touch(a, _piece((slice(2, 5), slice(2, 5), slice(2, 5))))  # a shared voxel
    assert not _touch(a, _piece((slice(3, 5), slice(3, 5), slice(0, 2))))  # an edge
    assert not _touch(a, _piece((slice(3, 5), slice(3, 5), slice(3, 5))))  # a corner
    assert not _touch(a, _piece((slice(4, 6), slice(0, 3), slice(0, 3))))  # a gap


def test_findings_touch_with_their_masks_before_the_stump_cut() -> None:
    """The stump cut (plugin.stump_cut) changes what is measured, not which findings are
    reported: a finding whose stump reached another finding's mask still joins it (held-out
    phantom 10017: a false "Mass" would otherwise have become a mass and a nodule)."""
    a = _piece((slice(0, 4), slice(0, 3), slice(0, 3)))
    a.mask[3] = False  # the stump, cut from the measured mask
    b = _piece((slice(4, 6), slice(0, 3), slice(0, 3)))
    assert not _touch(a, b)
    a.touch_mask = np.ones_like(a.mask)  # before the cut
    assert _touch(a, b) and _touch(b, a)
