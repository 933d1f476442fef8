"""Stumps of a vessel as dense as the lesion, cut by shape (plugin.stump_cut), on
analytic lesions rendered as a scanner sees them (tests/lesion_phantoms.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import plugin.lesion_measure as lesion_measure
from plugin.lesion_measure import measure_lesion
from plugin.stump_cut import _attachment_exits, attached_stumps
from tests.lesion_phantoms import RenderedLesion, render_ellipsoid

DENSE = 35.0  # the nodule's HU, and the vessel's: no contrast


def _carrying_stumps(radius: float, slice_mm: float, seed: int, *,
                     lobe: tuple[float, float] | None = None) -> tuple[RenderedLesion, np.ndarray]:
    """A nodule of ``radius`` mm (35 HU) on a 5 mm vessel as dense as itself, and a model
    mask that carries the vessel's stumps: the nodule and the vessel within 8 mm of it."""
    rng = np.random.default_rng(seed)
    offset = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)))
    lesion = render_ellipsoid((radius,) * 3, (0.7, 0.7, slice_mm), offset_voxels=offset, noise_hu=20.0,
                              vessel=(2.5, radius + 1.5), lesion_hu=DENSE, seed=seed, lobe=lobe)
    near = ndimage.distance_transform_edt(~lesion.truth, sampling=lesion.spacing) <= 8.0
    return lesion, lesion.truth | (near & (lesion.hu > -400.0))


def _error(lesion: RenderedLesion, mask: np.ndarray) -> float:
    result = measure_lesion(lesion.hu, mask, lesion.spacing, half_maximum=True)
    return result.volume_mm3 / lesion.volume_mm3 - 1.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize(("slice_mm", "allowed"), [(0.625, 0.03), (1.25, 0.03), (2.5, 0.08), (5.0, 0.20)])
def test_the_stumps_of_a_vessel_as_dense_as_the_nodule_are_cut(slice_mm: float, allowed: float,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A 14 mm nodule whose mask carries 8 mm of a dense vessel's stumps reads +20 to
    +32 % as it is; cut by shape, within 3 % on thin slices. On thicker slices the base
    of each stump, within a voxel (a slice) of the body, stays."""
    for seed in range(3):
        lesion, mask = _carrying_stumps(7.0, slice_mm, seed)
        cut = _error(lesion, mask)
        assert abs(cut) <= allowed, (seed, cut)
        with monkeypatch.context() as patch:
            patch.setattr(lesion_measure, "attached_stumps", lambda *args: None)
            as_it_was = _error(lesion, mask)
        assert as_it_was >= 0.19, (seed, as_it_was)  # the model's mask carries the stumps
        assert as_it_was - abs(cut) >= 0.07, seed  # at least 7 points of the stumps gone


@pytest.mark.parametrize("seed", [0, 1])
def test_a_vessel_that_runs_on_into_the_chest_wall_is_cut_as_a_stump(seed: int) -> None:
    """The vessel leaves the mask on both sides of a 14 mm nodule; on one side it runs 5 mm
    further and into the chest wall. It is judged by its own thickness, not the wall's:
    with the wall counted, that stump stayed (+11 to +12 % on 1.25 mm slices)."""
    rng = np.random.default_rng(seed)
    offset = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)))
    lesion = render_ellipsoid((7.0,) * 3, (0.7, 0.7, 1.25), offset_voxels=offset, noise_hu=20.0, vessel=(2.5, 0.0),
                              lesion_hu=DENSE, seed=seed, margin_mm=26.0, wall=(19.0, 0.0, 40.0))
    near = ndimage.distance_transform_edt(~lesion.truth, sampling=lesion.spacing) <= 8.0
    mask = lesion.truth | (near & (lesion.hu > -400.0))
    assert float(mask.sum()) * float(np.prod(lesion.spacing)) / lesion.volume_mm3 - 1.0 >= 0.19  # the stumps
    assert abs(_error(lesion, mask)) <= 0.03


def test_the_nodule_keeps_its_attenuation_and_its_voxels() -> None:
    lesion, mask = _carrying_stumps(7.0, 0.625, 0)
    result = measure_lesion(lesion.hu, mask, lesion.spacing, half_maximum=True)
    # the mask before the cut is kept for judging which findings touch (plugin.measure)
    assert result.uncut_mask is not None
    assert float((result.uncut_mask & ~result.mask & ~lesion.truth).sum()) > 0.15 * float(lesion.truth.sum())
    assert not (result.mask & ~result.uncut_mask).any()
    assert abs(result.attenuation.mean - DENSE) <= 2.0
    assert _dice(result.mask, lesion.truth) >= 0.97
    assert float((lesion.truth & ~result.mask).sum()) <= 0.02 * float(lesion.truth.sum())


def test_a_lobe_that_no_vessel_continues_stays() -> None:
    """A lobe thinner than the body (a 6 mm ball on a 14 mm nodule, the vessel on the
    other side) is no body either, but nothing bright goes on beyond it: it stays."""
    lesion, mask = _carrying_stumps(7.0, 0.625, 1, lobe=(3.0, -7.5))
    result = measure_lesion(lesion.hu, mask, lesion.spacing, half_maximum=True)
    lobe_only = lesion.truth & (np.indices(lesion.truth.shape)[1] < lesion.truth.shape[1] // 2 - round(7.5 / 0.7))
    assert lobe_only.sum() > 20
    assert float((lobe_only & result.mask).sum()) >= 0.9 * float(lobe_only.sum())
    assert abs(result.volume_mm3 / lesion.volume_mm3 - 1.0) <= 0.03


def test_a_lone_nodule_and_a_vessel_touching_a_correct_mask_are_left_alone() -> None:
    """Nothing is cut from a nodule with nothing attached, nor from a correct mask beside a
    dense vessel (the mask holds none of the vessel: no stump)."""
    alone = render_ellipsoid((7.0,) * 3, (0.7, 0.7, 1.25), noise_hu=20.0, seed=2)
    assert attached_stumps(alone.truth, alone.hu > -400.0, alone.spacing) is None
    assert measure_lesion(alone.hu, alone.truth, alone.spacing, half_maximum=True).uncut_mask is None
    beside, _ = _carrying_stumps(7.0, 1.25, 2)
    assert attached_stumps(beside.truth, beside.hu > -400.0, beside.spacing) is None


def test_no_cut_for_a_mass_a_small_nodule_or_a_lesion_inside_something_larger() -> None:
    """A mass (its body wider than 30 mm) marked with a stump, a nodule too small to tell
    body from vessel, and a mask that holds half of a nodule (the rest outside it is as
    thick as the half, no vessel) are not cut."""
    mass = render_ellipsoid((16.0,) * 3, (1.0, 1.0, 2.0), noise_hu=20.0, vessel=(2.5, 17.5), seed=3, margin_mm=10.0)
    near = ndimage.distance_transform_edt(~mass.truth, sampling=mass.spacing) <= 8.0
    assert attached_stumps(mass.truth | (near & (mass.hu > -400.0)), mass.hu > -400.0, mass.spacing) is None
    small, mask = _carrying_stumps(2.5, 0.625, 3)
    assert attached_stumps(mask, small.hu > -400.0, small.spacing) is None
    for slice_mm in (0.625, 1.25, 2.5, 5.0):
        for radius in (7.0, 10.0):
            nodule = render_ellipsoid((radius,) * 3, (0.7, 0.7, slice_mm), noise_hu=20.0, seed=4)
            half = nodule.truth.copy()
            half[: half.shape[0] // 2] = False
            assert attached_stumps(half, nodule.hu > -400.0, nodule.spacing) is None, (slice_mm, radius)


def _voxels(balls: list[tuple[float, float]], tube_to: float, *, carried_to: float,
            spacing: tuple[float, float, float] = (0.7, 0.7, 1.25)) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-centre geometry without a scanner: ``balls`` (centre x, radius; mm, on the x
    axis) are the lesion, a 1.5 mm tube along x from x = 0 to ``tube_to`` is a vessel, and
    the model's mask holds the balls and the tube up to ``carried_to``. Returns the mask
    and the voxels above the half maximum (lesion and vessel)."""
    shape = tuple(int(round(n / s)) | 1 for n, s in zip((2 * tube_to + 20.0, 30.0, 30.0), spacing))
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    lesion = np.zeros(shape, dtype=bool)
    for centre, radius in balls:
        lesion |= (x - centre) ** 2 + y**2 + z**2 <= radius**2
    tube = (y**2 + z**2 <= 1.5**2) & (x >= 0.0) & (x <= tube_to)
    return lesion | (tube & (x <= carried_to)), lesion | tube


def test_a_second_lobe_as_thick_as_the_body_stays_when_a_vessel_touches_it() -> None:
    """Two 12 mm lobes 11 mm apart (or two touching nodules in one mask), the vessel on the
    second: the body is every lobe as thick as the ball, so only the vessel is cut (with the
    largest piece alone as body, the second lobe went whole, -49 %)."""
    spacing = (0.7, 0.7, 1.25)
    mask, above = _voxels([(-5.5, 6.0), (5.5, 6.0)], 40.0, carried_to=20.0, spacing=spacing)
    stumps = attached_stumps(mask, above, spacing)
    assert stumps is not None
    x = (np.arange(mask.shape[0]) - (mask.shape[0] - 1) / 2) * spacing[0]
    second_lobe = mask & (x[:, None, None] > 0.0) & (x[:, None, None] <= 11.5)
    assert float((stumps & second_lobe).sum()) <= 0.02 * float(second_lobe.sum())
    assert (stumps & (x[:, None, None] > 15.0)).any()  # the vessel beyond the lobe is cut


def test_no_cut_when_the_stumps_would_be_most_of_the_mask_or_attachments_wrap_it() -> None:
    """The two guards: stumps taking 60 % of the mask or more (a small body on a long
    carried vessel: more likely the model marked a vessel with a bulge), and attachments
    around 30 % of the mask or more (the lesion lies in something larger)."""
    spacing = (0.7, 0.7, 1.25)
    short, above_short = _voxels([(-4.0, 4.0)], 60.0, carried_to=15.0, spacing=spacing)
    assert attached_stumps(short, above_short, spacing) is not None  # the stump alone: cut
    long, above_long = _voxels([(-4.0, 4.0)], 60.0, carried_to=50.0, spacing=spacing)
    assert attached_stumps(long, above_long, spacing) is None
    depth = ndimage.distance_transform_edt(~short, sampling=spacing)
    wrapped = above_short | ((depth > 0) & (depth <= 3.0))  # a 3 mm sleeve of tissue around it all
    assert attached_stumps(short, wrapped, spacing) is None


def test_a_structure_with_no_voxel_near_the_mask_is_not_judged_thin() -> None:
    """On thick slices a block that meets the mask only from the next slice has no voxel
    within two ball radii of it: its thickness cannot be read there, and it is no
    attachment (SciPy's maximum over no voxel is 0, which read as thin)."""
    spacing = (0.7, 0.7, 8.0)
    x, y, z = np.meshgrid(*[(np.arange(n) - n // 2) * s for n, s in zip((61, 61, 7), spacing)], indexing="ij")
    nodule = (x**2 + y**2 <= 4.2**2) & (z == 0)
    block = ((x - 11.0) ** 2 + y**2 <= 9.0**2) & (z >= 8) & (z <= 24)
    radius = 0.85 * float(ndimage.distance_transform_edt(np.pad(nodule, 1), sampling=spacing).max())
    assert _attachment_exits(nodule, nodule | block, radius, spacing) is None


def test_the_inputs_must_match() -> None:
    with pytest.raises(ValueError, match="same 3D shape"):
        attached_stumps(np.ones((4, 4, 4), dtype=bool), np.ones((4, 4, 5), dtype=bool), (1.0, 1.0, 1.0))
