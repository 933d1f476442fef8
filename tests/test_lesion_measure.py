"""Measurement conventions on analytic lesions (plugin.lesion_measure, plugin.measure).

The lesions are rendered as a scanner sees them (tests/lesion_phantoms.py): each voxel
the fraction of its box the shape fills, an in-plane point spread, noise. The truth is
analytic, so these tests measure the conventions' error, not the model's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.sr.codedict import codes
from scipy import ndimage

from plugin.lesion_measure import (
    SUBSOLID_MIN_CORE_MM3,
    attenuation,
    brighter_attachment,
    core,
    is_subsolid,
    measure_lesion,
)
from plugin.manifest import parse_manifest
from plugin.measure import axes, measure_findings, outlines
from plugin.pleural_cut import beyond_pleura
from tests.lesion_phantoms import RenderedLesion, render_ellipsoid

ANISOTROPIC = (0.6, 0.85)  # pixel spacing (x, y) mm
SLICES = (0.625, 1.25, 2.5, 5.0)


def _volume_error(diameter: float, slice_mm: float, *, semi: tuple[float, float, float] | None = None,
                  angle: float = 0.0, seed: int = 0, model: str = "truth") -> float:
    rng = np.random.default_rng(seed)
    lesion = render_ellipsoid(semi or (diameter / 2,) * 3, (*ANISOTROPIC, slice_mm), angle_deg=angle,
                              offset_voxels=tuple(rng.uniform(-0.5, 0.5, 3)), noise_hu=25.0, seed=seed)
    mask = lesion.truth
    if model == "eroded in-plane":  # the model's edge one pixel inside the lesion's
        mask = ndimage.binary_erosion(mask, structure=np.ones((3, 3, 1), dtype=bool))
    result = measure_lesion(lesion.hu, mask, lesion.spacing, half_maximum=True)
    assert result.half_maximum
    return result.volume_mm3 / lesion.volume_mm3 - 1.0


@pytest.mark.parametrize("slice_mm", SLICES)
def test_volume_of_spheres_6_to_30_mm_within_8_percent(slice_mm: float) -> None:
    """Every sphere of 6-30 mm within 8 % (the issue's target: 20 %, median 8 %), on
    every slice spacing, where a voxel count is off by up to 37 % on 5 mm slices."""
    errors = [_volume_error(d, slice_mm, seed=i) for i, d in enumerate((6.0, 7.0, 9.0, 14.0, 22.0, 30.0))]
    assert max(abs(e) for e in errors) <= 0.08, errors
    assert float(np.median(np.abs(errors))) <= 0.03, errors


@pytest.mark.parametrize("angle", [0.0, 30.0, 75.0])
def test_volume_of_ellipsoids_within_8_percent(angle: float) -> None:
    for slice_mm in (0.625, 2.5, 5.0):
        error = _volume_error(0.0, slice_mm, semi=(9.0, 5.0, 6.0), angle=angle, seed=int(angle))
        assert abs(error) <= 0.08, (slice_mm, error)


def test_volume_when_the_models_edge_lies_a_pixel_inside() -> None:
    """The half-maximum edge is found from a model mask one pixel too small in-plane."""
    for slice_mm in (0.625, 2.5):
        for diameter in (8.0, 16.0):
            error = _volume_error(diameter, slice_mm, model="eroded in-plane", seed=3)
            assert abs(error) <= 0.08, (diameter, slice_mm, error)


def test_small_lesions_3_to_5_mm_on_thin_slices_within_15_percent() -> None:
    errors = [_volume_error(d, s, seed=i) for i, (d, s) in enumerate([(3.0, 0.625), (4.0, 1.25), (5.0, 2.5)])]
    assert max(abs(e) for e in errors) <= 0.15, errors


@pytest.mark.parametrize("slice_mm", [0.625, 1.25, 2.5])
def test_a_vessel_touching_a_small_nodule_is_not_grown_into(slice_mm: float) -> None:
    """A 3 mm vessel along a 6 mm nodule: the voxels just outside the model's (right)
    edge are mostly lung, so the mask only shrinks; growing it by a voxel would take in
    the vessel where it touches (+16 %)."""
    lesion = render_ellipsoid((3.0, 3.0, 3.0), (0.7, 0.7, slice_mm), offset_voxels=(0.2, 0.3, 0.25),
                              noise_hu=20.0, vessel=(1.5, 3.5))
    result = measure_lesion(lesion.hu, lesion.truth, lesion.spacing, half_maximum=True)
    assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.05


def test_the_refined_mask_follows_the_half_maximum_edge_not_an_attached_vessel() -> None:
    lesion = render_ellipsoid((6.0, 6.0, 6.0), (0.7, 0.7, 1.25), noise_hu=20.0, vessel=(1.5, 6.5))
    result = measure_lesion(lesion.hu, lesion.truth, lesion.spacing, half_maximum=True)
    dice = 2 * float((result.mask & lesion.truth).sum()) / float(result.mask.sum() + lesion.truth.sum())
    assert dice >= 0.97
    assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.05
    grown = result.mask & ~ndimage.binary_dilation(lesion.truth, structure=np.ones((3, 3, 3), dtype=bool))
    assert not grown.any()  # at most one voxel of growth: the vessel is not followed


def _on_an_enhancing_vessel(slice_mm: float, seed: int, *, vessel_hu: float | None = None,
                            calcified: bool = False) -> tuple[RenderedLesion, np.ndarray]:
    """A 14 mm nodule (35 HU) on a 5 mm vessel (150-300 HU, drawn; ``vessel_hu`` fixes
    it, NaN makes it as dense as the nodule), and a model mask that carries the vessel's
    stumps: the nodule and the vessel's voxels within 8 mm of it."""
    rng = np.random.default_rng(seed)
    offset = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)))
    drawn = float(rng.uniform(150.0, 300.0)) if vessel_hu is None else vessel_hu
    lesion = render_ellipsoid((7.0, 7.0, 7.0), (0.7, 0.7, slice_mm), offset_voxels=offset, noise_hu=20.0,
                              vessel=(2.5, 8.5), vessel_hu=None if math.isnan(drawn) else drawn, seed=seed)
    if calcified:
        centre = tuple(n // 2 for n in lesion.hu.shape)
        lesion.hu[centre[0] - 1: centre[0] + 2, centre[1] - 1: centre[1] + 2, centre[2]] = 600.0
    near = ndimage.distance_transform_edt(~lesion.truth, sampling=lesion.spacing) <= 8.0
    return lesion, lesion.truth | (near & (lesion.hu > -400.0))


@pytest.mark.parametrize("slice_mm", [0.625, 1.25])
def test_an_enhancing_vessel_in_the_models_mask_is_cut_at_its_half_maximum(slice_mm: float) -> None:
    """The stumps of a vessel at 150-300 HU add a third to the volume and up to 30 HU to
    the mean; cut where the vessel is brighter than the half way to it, they add under 2 %.
    (On 2.5 mm slices a 5 mm vessel reaches that contrast only where its slab is full,
    on 5 mm slices nowhere: the stumps then stay; README, "Measurement conventions".)"""
    for seed in range(4):
        lesion, mask = _on_an_enhancing_vessel(slice_mm, seed)
        assert mask.sum() > 1.25 * lesion.truth.sum()  # the model's mask carries the stumps
        result = measure_lesion(lesion.hu, mask, lesion.spacing, half_maximum=True)
        assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.03, seed
        assert abs(result.attenuation.mean - 35.0) <= 2.0, seed
        assert result.attenuation.maximum < 150.0, seed  # no vessel voxel: not a calcification
        dice = 2 * float((result.mask & lesion.truth).sum()) / float(result.mask.sum() + lesion.truth.sum())
        assert dice >= 0.97, seed


def test_a_vessel_as_dense_as_the_nodule_is_not_cut() -> None:
    """Without contrast a vessel is as dense as a solid nodule: nothing tells them apart
    by attenuation, and nothing is cut."""
    lesion, mask = _on_an_enhancing_vessel(1.25, 0, vessel_hu=math.nan)
    assert brighter_attachment(lesion.hu, mask, np.zeros_like(mask), lesion.spacing) is None


def _centred_mm(lesion: RenderedLesion) -> tuple[np.ndarray, ...]:
    """Each voxel's x, y and z in mm from the centre of ``lesion``'s box."""
    return tuple(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(lesion.hu.shape, lesion.spacing)],
                             indexing="ij"))


def _mass_with_a_bright_structure(band: bool) -> tuple[np.ndarray, np.ndarray, RenderedLesion, np.ndarray]:
    """A 30 mm mass and a 5 mm thick band (or a 5 mm vessel) of 250 HU through its centre
    and the whole box; the model's mask takes 5 mm of it outside the mass."""
    lesion = render_ellipsoid((15.0, 15.0, 15.0), (0.7, 0.7, 1.25), noise_hu=20.0, seed=2)
    x, y, z = _centred_mm(lesion)
    bright = np.abs(y) <= 2.5 if band else y**2 + z**2 <= 2.5**2
    hu = np.where(bright, np.float32(250.0), lesion.hu)
    return hu, lesion.truth | (bright & (np.abs(x) <= 20.0)), lesion, bright


def test_a_brighter_structure_that_would_divide_the_lesion_is_not_cut() -> None:
    """Cutting a band through the mass would leave two halves: a lesion is not split in
    two, and the band's voxels stay (as a calcification's)."""
    hu, mask, lesion, _ = _mass_with_a_bright_structure(band=True)
    assert brighter_attachment(hu, mask, np.zeros_like(mask), lesion.spacing) is None


def test_a_vessel_through_a_mass_is_cut_out_of_it() -> None:
    """A vessel through the mass leaves it one piece: its lumen is not the lesion's."""
    hu, mask, lesion, vessel = _mass_with_a_bright_structure(band=False)
    cut = brighter_attachment(hu, mask, np.zeros_like(mask), lesion.spacing)
    assert cut is not None and float(cut[vessel & mask].mean()) >= 0.9
    assert not bool(cut[lesion.truth & ~ndimage.binary_dilation(vessel, iterations=3)].any())


def test_an_enhancing_rim_beside_an_enhancing_vessel_stays() -> None:
    """A 30 mm mass with a necrotic centre (20 HU) in a 3 mm enhancing wall (130 HU),
    touched by a vessel of 220 HU: the centre is the most frequent HU, so the wall is
    above the half maximum to the vessel and joins it. The wall wraps the rest of the
    mass: it is the lesion's own, and nothing is cut (cut, the volume read -33 %)."""
    spacing = (0.7, 0.7, 1.25)
    lesion = render_ellipsoid((15.0, 15.0, 15.0), spacing, seed=2)
    x, y, z = _centred_mm(lesion)
    radius = np.sqrt(x**2 + y**2 + z**2)
    hu = np.full(lesion.hu.shape, -850.0)
    hu[radius <= 15.0] = 130.0
    hu[radius <= 12.0] = 20.0
    vessel = ((y - 17.0) ** 2 + z**2 <= 2.5**2) & (radius > 15.0)
    hu[vessel] = 220.0
    hu = ndimage.gaussian_filter(hu, sigma=(0.4 / 0.7, 0.4 / 0.7, 0.0))
    hu = (hu + np.random.default_rng(0).normal(0.0, 20.0, hu.shape)).astype(np.float32)
    mask = lesion.truth | (vessel & (np.abs(x) <= 8.0))
    result = measure_lesion(hu, mask, spacing, half_maximum=True)
    wall = (radius > 12.0) & (radius <= 15.0) & lesion.truth
    assert float(result.mask[wall].mean()) >= 0.95
    assert result.volume_mm3 >= 0.97 * lesion.volume_mm3


def test_a_calcification_inside_the_nodule_stays_beside_an_enhancing_vessel() -> None:
    lesion, mask = _on_an_enhancing_vessel(1.25, 1, vessel_hu=250.0, calcified=True)
    result = measure_lesion(lesion.hu, mask, lesion.spacing, half_maximum=True)
    centre = tuple(n // 2 for n in lesion.hu.shape)
    assert result.mask[centre]
    assert result.attenuation.maximum >= 590.0
    assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.03


def _juxtapleural(diameter: float, slice_mm: float, angle: float, seed: int):  # type: ignore[no-untyped-def]
    """A sphere whose centre lies 0.6 radii from a chest wall of 40 HU (the lung side
    drawn, as the phantom generator does), and a model's mask that runs 2 mm into the
    wall behind it."""
    r = diameter / 2
    lesion = render_ellipsoid((r, r, r), (0.7, 0.7, slice_mm), offset_voxels=(0.2, -0.3, 0.25), lesion_hu=-20.0,
                              noise_hu=20.0, seed=seed, margin_mm=12.0, wall=(0.6 * r, angle, 40.0))
    outside = ndimage.distance_transform_edt(~lesion.truth, sampling=lesion.spacing)
    model = lesion.truth | ((outside <= 2.0) & (lesion.hu > -400.0))
    return lesion, model


@pytest.mark.parametrize(("diameter", "slice_mm", "angle"),
                         [(9.0, 1.25, 0.0), (9.0, 2.5, 30.0), (16.0, 1.25, 60.0), (16.0, 5.0, 0.0), (22.0, 0.625, 45.0)])
def test_a_juxtapleural_nodule_ends_at_the_pleura(diameter: float, slice_mm: float, angle: float) -> None:
    """The mask's part in the chest wall is cut at the fitted pleural surface: volume
    within 8 % and attenuation within 10 HU of the lung-side part, where the model's
    mask as it is reads 13-60 % too large and its attenuation pulled toward the wall."""
    lesion, model = _juxtapleural(diameter, slice_mm, angle, seed=int(diameter))
    as_is = float(model.sum()) * float(np.prod(lesion.spacing)) / lesion.volume_mm3 - 1.0
    assert as_is > 0.1  # what the cut has to mend
    result = measure_lesion(lesion.hu, model, lesion.spacing, half_maximum=True)
    assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.08, (as_is, result.volume_mm3 / lesion.volume_mm3)
    assert abs(result.attenuation.mean + 20.0) <= 10.0, result.attenuation
    beyond = result.mask & ~ndimage.binary_dilation(lesion.truth, iterations=2)
    assert not beyond.any()  # nothing left more than two voxels into the wall


@pytest.mark.parametrize(("diameter", "gap_mm", "slice_mm"), [(12.0, 3.0, 1.25), (16.0, 3.0, 1.25), (20.0, 2.0, 2.5)])
def test_a_lesion_near_the_wall_is_not_its_own_wall(diameter: float, gap_mm: float, slice_mm: float) -> None:
    """A lesion a few millimetres from the chest wall, whose mask falls a pixel short of
    its edge, does not touch the wall: its own rim outside the mask is not wall, so
    there is no pleural cut (a held-out phantom's 17.5 mm nodule lost 37 % of itself to a
    surface fitted beside it when it was), and its volume is the whole ball's."""
    r = diameter / 2
    lesion = render_ellipsoid((r, r, r), (0.7, 0.7, slice_mm), lesion_hu=-20.0, noise_hu=20.0, seed=1,
                              margin_mm=14.0, wall=(r + gap_mm, 0.0, 40.0))
    short = ndimage.binary_erosion(lesion.truth, structure=np.ones((3, 3, 1), dtype=bool))
    assert beyond_pleura(lesion.hu, short, lesion.spacing, -435.0) is None
    result = measure_lesion(lesion.hu, short, lesion.spacing, half_maximum=True)
    assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.03, result.volume_mm3 / lesion.volume_mm3


def test_no_pleural_cut_without_a_wall_when_the_lesion_is_mostly_wall_or_a_mass() -> None:
    spacing = (0.7, 0.7, 1.25)
    free = render_ellipsoid((5.0, 5.0, 5.0), spacing, noise_hu=20.0, margin_mm=12.0)
    assert beyond_pleura(free.hu, free.truth, spacing, -420.0) is None
    lesion, model = _juxtapleural(12.0, 1.25, 0.0, seed=1)
    assert beyond_pleura(lesion.hu, model, spacing, -430.0) is not None
    deep = model | ((ndimage.distance_transform_edt(~model, sampling=spacing) <= 8.0) & (lesion.hu > 0.0))
    assert beyond_pleura(lesion.hu, deep, spacing, -430.0) is None  # more than half of it beyond
    mass, mass_model = _juxtapleural(34.0, 2.5, 0.0, seed=2)
    assert beyond_pleura(mass.hu, mass_model, mass.spacing, -430.0) is None  # a mass: not cut


@pytest.mark.parametrize("slice_mm", [0.625, 1.25, 2.5])
def test_mean_attenuation_of_solid_nodules_from_8_mm_within_15_hu(slice_mm: float) -> None:
    for i, diameter in enumerate((8.0, 12.0, 20.0)):
        lesion = render_ellipsoid((diameter / 2,) * 3, (*ANISOTROPIC, slice_mm), lesion_hu=35.0,
                                  offset_voxels=(0.3, -0.2, 0.4), noise_hu=30.0, seed=i)
        result = measure_lesion(lesion.hu, lesion.truth, lesion.spacing, half_maximum=True)
        assert result.attenuation.from_core
        assert abs(result.attenuation.mean - 35.0) <= 15.0, (diameter, result.attenuation)
        assert 20.0 <= result.attenuation.sd <= 40.0  # the noise, not the edge's blur


def test_a_nodule_too_thin_for_a_core_is_flagged_not_reported_as_ground_glass() -> None:
    """8 mm on 5 mm slices, centred on a slice boundary: no voxel is wholly inside, and the
    central voxels read about -150 HU for a 35 HU nodule."""
    lesion = render_ellipsoid((4.0, 4.0, 4.0), (0.7, 0.7, 5.0), offset_voxels=(0.0, 0.0, 0.5), noise_hu=10.0)
    result = measure_lesion(lesion.hu, lesion.truth, lesion.spacing, half_maximum=True)
    assert not result.attenuation.from_core
    assert result.attenuation.mean < -50.0  # why it is not reported
    assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.08  # the volume still is


def test_core_is_at_least_1_mm_inside_the_boundary() -> None:
    spacing = (0.5, 0.5, 0.625)
    mask = np.zeros((41, 41, 41), dtype=bool)
    mask[10:31, 10:31, 10:31] = True  # a 10.5 mm cube (boundary half a voxel outside)
    inner = core(mask, spacing)
    xs, _, zs = np.nonzero(inner)
    assert xs.min() == 10 + 3  # (1 mm + half of 0.5 mm) / 0.5 mm = 2.5, rounded up: 3 voxels
    assert zs.min() == 10 + 2  # (1 mm + half of 0.625 mm) / 0.625 mm = 2.1: 2 voxels
    thick = np.zeros((21, 21, 7), dtype=bool)
    thick[5:16, 5:16, 2:5] = True  # three 5 mm slices: the middle one is the core
    assert set(np.nonzero(core(thick, (0.7, 0.7, 5.0)))[2]) == {3}


def test_maximum_shows_a_calcification() -> None:
    lesion = render_ellipsoid((5.0, 5.0, 5.0), (0.7, 0.7, 1.0), noise_hu=10.0)
    hu = lesion.hu.copy()
    centre = tuple(s // 2 for s in hu.shape)
    hu[centre[0] - 1: centre[0] + 2, centre[1] - 1: centre[1] + 2, centre[2]] = 600.0
    att = attenuation(hu, lesion.truth, lesion.spacing)
    assert att.maximum >= 590.0 and att.from_core
    assert att.sd > 50.0


@pytest.mark.parametrize("angle", [0.0, 20.0, 45.0, 70.0, 110.0, 160.0])
def test_long_and_short_axis_of_ellipses_at_angles(angle: float) -> None:
    """RECIST/Fleischner: the long axis the longest diameter, the short axis the longest
    diameter perpendicular to it, on the key slice."""
    spacing = (0.5, 0.5)
    a, b = 12.0, 5.0  # semi-axes, mm
    n = 80
    x = (np.arange(n) - n / 2 + 0.25) * spacing[0]
    y = (np.arange(n) - n / 2 - 0.15) * spacing[1]
    X, Y = np.meshgrid(x, y, indexing="ij")
    t = math.radians(angle)
    u = X * math.cos(t) + Y * math.sin(t)
    v = -X * math.sin(t) + Y * math.cos(t)
    mask = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    long_axis, short_axis = axes(outlines(mask), spacing)
    assert abs(long_axis.length_mm - 2 * a) <= 2 * spacing[0]
    assert abs(short_axis.length_mm - 2 * b) <= 2 * spacing[0]
    dl = np.subtract(long_axis.end, long_axis.start) * spacing
    ds = np.subtract(short_axis.end, short_axis.start) * spacing
    assert abs(float(np.dot(dl, ds))) <= 1e-6 * np.linalg.norm(dl) * np.linalg.norm(ds)
    direction = abs(math.degrees(math.atan2(dl[1], dl[0]))) % 180
    off = abs(direction - angle % 180)
    assert min(off, 180 - off) <= 5.0, direction


MANIFEST = {
    "name": "t", "display_name": "T", "version": "1", "device_uid": "2.25.1",
    "procedure": {"scheme": "LN", "value": "24627-2", "meaning": "CT Chest"},
    "labels": {1: {
        "name": "Nodule", "per_component": True, "boundary": "half_maximum",
        "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically abnormal structure"},
        "type": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"},
        "mass": {"min_long_axis_mm": 30, "name": "Mass",
                 "type": {"scheme": "SCT", "value": "4147007", "meaning": "Mass"}},
    }},
}


def test_findings_from_30_mm_are_reported_as_masses_and_measured_on_the_source_grid() -> None:
    spacing = (0.8, 0.8, 2.5)
    big = render_ellipsoid((20.0, 17.0, 15.0), spacing, noise_hu=15.0, margin_mm=30.0)
    shape = big.hu.shape
    small = render_ellipsoid((4.0, 4.0, 4.0), spacing, noise_hu=15.0)
    hu = big.hu.copy()
    labels = big.truth.astype(np.uint8)
    sx, sy, sz = small.hu.shape
    corner = (2, 2, (shape[2] - sz) // 2)
    box = tuple(slice(c, c + s) for c, s in zip(corner, small.hu.shape))
    assert not labels[box].any()
    hu[box] = small.hu
    labels[box][small.truth] = 1
    affine = np.diag([*spacing, 1.0])
    specs = parse_manifest(MANIFEST).labels
    result = measure_findings(labels, hu, affine, specs)
    names = [f.name for f in result.findings]
    assert names == ["Mass 1", "Nodule 1"]
    mass, nodule = result.findings
    assert mass.codes.type == codes.SCT.Mass and nodule.codes.type == codes.SCT.Nodule
    assert abs(mass.volume_mm3 / big.volume_mm3 - 1.0) <= 0.03
    assert abs(nodule.volume_mm3 / small.volume_mm3 - 1.0) <= 0.08
    assert abs(mass.mean_hu - 35.0) <= 5.0 and mass.attenuation_from_core
    assert 38.0 <= mass.long_axis.length_mm <= 42.0
    assert set(np.unique(result.label_map)) == {0, 1, 2}


def _subsolid(diameter: float, solid_diameter: float, slice_mm: float, *, glass_hu: float = -550.0,
              seed: int = 0) -> RenderedLesion:
    """A ground-glass sphere, with a concentric solid core (0 HU) of ``solid_diameter``."""
    spacing = (*ANISOTROPIC, slice_mm)
    offset = (0.3, -0.2, 0.4)
    lesion = render_ellipsoid((diameter / 2,) * 3, spacing, lesion_hu=glass_hu, offset_voxels=offset,
                              noise_hu=20.0, seed=seed)
    if solid_diameter:
        margin = 8.0 + (diameter - solid_diameter) / 2  # the same box as the ground glass's
        occupancy = render_ellipsoid((solid_diameter / 2,) * 3, spacing, lesion_hu=1.0, background_hu=0.0,
                                     offset_voxels=offset, margin_mm=margin)
        assert occupancy.hu.shape == lesion.hu.shape
        lesion.hu = lesion.hu + occupancy.hu * (0.0 - glass_hu)
    return lesion


@pytest.mark.parametrize("slice_mm", SLICES)
def test_ground_glass_nodules_are_measured_whole(slice_mm: float) -> None:
    """A -550 HU nodule: the half maximum of a solid one (about -400 HU) would lose most
    of it. Measured at the ground glass's own half maximum, it is whole."""
    # on 5 mm slices a nodule under about 20 mm has no core (or a core of one slice that
    # partial volume fills): it is taken as solid (a limit the model README states)
    diameters = (8.0, 12.0, 20.0) if slice_mm < 5.0 else (20.0,)
    for i, diameter in enumerate(diameters):
        lesion = _subsolid(diameter, 0.0, slice_mm, seed=i)
        result = measure_lesion(lesion.hu, lesion.truth, lesion.spacing, half_maximum=True)
        assert result.composition == "ground_glass", (diameter, result.composition)
        assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.08, (diameter, result.volume_mm3)
        assert abs(result.attenuation.mean + 550.0) <= 15.0, (diameter, result.attenuation)
        assert result.solid_mask is not None and not result.solid_mask.any()


@pytest.mark.parametrize("slice_mm", SLICES)
def test_part_solid_nodules_are_measured_whole_with_their_solid_component(slice_mm: float) -> None:
    """The whole nodule's volume (ground glass and solid core), and the solid core's long
    axis as its own measurement (the size Lung-RADS grades a part-solid nodule by)."""
    specs = parse_manifest(MANIFEST).labels
    sizes = ((16.0, 8.0), (24.0, 10.0), (20.0, 12.0)) if slice_mm < 5.0 else ((24.0, 10.0), (20.0, 12.0))
    for i, (diameter, solid) in enumerate(sizes):
        lesion = _subsolid(diameter, solid, slice_mm, seed=i)
        result = measure_lesion(lesion.hu, lesion.truth, lesion.spacing, half_maximum=True)
        assert result.composition == "part_solid", (diameter, slice_mm)
        assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.08, (diameter, result.volume_mm3)
        finding = measure_findings(lesion.truth.astype(np.uint8), lesion.hu, np.diag([*lesion.spacing, 1.0]),
                                   specs).findings[0]
        assert finding.composition == "part_solid" and finding.solid_long_axis_mm is not None
        assert finding.solid_volume_mm3 is not None and finding.solid_volume_mm3 < 0.5 * finding.volume_mm3
        assert abs(finding.solid_long_axis_mm - solid) <= 2.0, (diameter, solid, finding.solid_long_axis_mm)


def test_a_core_smaller_than_a_3_mm_ball_judges_no_composition() -> None:
    """8 mm slices of 0.65 mm pixels: a ground-glass lesion three slices thick whose core
    (1 mm in-plane, one whole slice deep) is a handful of voxels is taken as solid; the
    same lesion with a core of a 3 mm ball or more is ground glass."""
    spacing = (0.65, 0.65, 8.0)
    hu = np.full((61, 61, 9), -850.0)
    for half_width, expected in ((1, False), (5, True)):
        mask = np.zeros(hu.shape, dtype=bool)
        mask[30 - 2 - half_width:30 + 3 + half_width, 28:33, 3:6] = True  # core: 1 + 2 half_width voxels long
        lesion_hu = np.where(mask, -500.0, hu)
        inner = core(mask, spacing)
        core_mm3 = float(inner.sum()) * 0.65 * 0.65 * 8.0
        assert (core_mm3 >= SUBSOLID_MIN_CORE_MM3) is expected, core_mm3
        assert is_subsolid(lesion_hu, mask, spacing) is expected, half_width


def test_a_solid_nodule_has_no_solid_component_of_its_own() -> None:
    lesion = render_ellipsoid((6.0, 6.0, 6.0), (0.7, 0.7, 1.25), noise_hu=30.0)
    result = measure_lesion(lesion.hu, lesion.truth, lesion.spacing, half_maximum=True)
    assert result.composition == "solid" and result.solid_mask is None
