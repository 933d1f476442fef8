"""``KeepInLungsd`` (models/lung_nodules/transforms.py): predicted components in the
lungs are kept unchanged, components in soft tissue far from the lungs are removed."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

from models.lung_nodules.transforms import (
    KeepInLungsd,
    MassChanneld,
    domes,
    fill_holes_per_slice,
    lung_region,
    source_spacing,
    subsolid_components,
)

SOFT = (40.0 + 1000.0) / 1400.0  # 40 HU on the bundle's [-1000, 400] HU -> [0, 1] scale
AIR = 0.0  # -1000 HU


def _chest() -> np.ndarray:
    """(X, Y, Z) = (120, 100, 60): outside air, a soft-tissue body, two air lungs."""
    image = np.full((120, 100, 60), AIR, dtype=np.float32)
    image[10:110, 10:90, :] = SOFT
    image[20:55, 25:75, 5:55] = AIR  # right lung
    image[65:100, 25:75, 5:55] = AIR  # left lung
    return image


def test_lung_region_is_the_inner_air_not_the_outside() -> None:
    image = _chest()
    region = lung_region(image, dilate_voxels=0, min_voxels=1000, step=2)
    assert region[30 // 2, 50 // 2, 30 // 2] and region[80 // 2, 50 // 2, 30 // 2]
    assert not region[2 // 2, 2 // 2, 30 // 2]  # air outside the body
    assert not region[60 // 2, 50 // 2, 30 // 2]  # mediastinum between the lungs


def test_components_outside_the_lungs_are_removed_others_kept() -> None:
    image = _chest()
    image[35:41, 45:51, 25:31] = SOFT  # a nodule inside the right lung
    pred = np.zeros_like(image)
    pred[35:41, 45:51, 25:31] = 0.9  # the nodule
    pred[56:64, 81:88, 20:26] = 0.8  # soft tissue behind the mediastinum, away from the lungs
    prob = MetaTensor(torch.from_numpy(pred)[None], affine=torch.eye(4))
    img = MetaTensor(torch.from_numpy(image)[None], affine=torch.eye(4))
    gate = KeepInLungsd(keys="pred", image_key="image")
    out = gate({"image": img, "pred": prob})["pred"]
    kept = out[0].numpy()
    assert isinstance(out, MetaTensor)
    np.testing.assert_array_equal(kept[35:41, 45:51, 25:31], np.float32(0.9))  # unchanged
    assert kept[56:64, 81:88, 20:26].max() == 0.0


def test_tubes_are_removed_when_asked_blobs_kept() -> None:
    image = _chest()
    pred = np.zeros_like(image)
    pred[30:38, 40:48, 20:26] = 0.9  # a blob (8 x 8 x 7.5 mm at 1 x 1 x 1.25 mm)
    pred[66:98, 50:53, 30:33] = 0.9  # a tube along x, 32 mm long, 3 mm wide
    affine = torch.diag(torch.tensor([1.0, 1.0, 1.25, 1.0], dtype=torch.float64))
    prob = MetaTensor(torch.from_numpy(pred)[None], affine=affine)
    img = MetaTensor(torch.from_numpy(image)[None], affine=affine)
    data = {"image": img, "pred": prob}
    both = KeepInLungsd(keys="pred")(data)["pred"][0].numpy()
    assert both[30:38, 40:48, 20:26].min() > 0 and both[66:98, 50:53, 30:33].min() > 0
    blobs = KeepInLungsd(keys="pred", max_elongation=2.0)(data)["pred"][0].numpy()
    assert blobs[30:38, 40:48, 20:26].min() > 0
    assert blobs[66:98, 50:53, 30:33].max() == 0.0


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2  # type: ignore[no-any-return]


def test_domes_drops_a_flat_cap_on_the_abdomen_keeps_masses() -> None:
    """1 mm voxels, Z up. A 40 x 40 x 6 mm cap lying on soft tissue (the liver top the
    network marks through a lung base) is a dome; a 36 mm ball in the lung, a 36 mm ball
    resting on the diaphragm and a flat cap with lung below are not."""
    shape = (140, 140, 100)
    image = np.full(shape, AIR, dtype=np.float32)
    image[:, :, :30] = SOFT  # the abdomen below z = 30
    components = np.zeros(shape, dtype=np.int32)
    components[10:50, 10:50, 30:36] = 1  # the cap on the abdomen's top
    components[_ball(shape, (90, 30, 60), 18)] = 2  # a mass in the lung
    components[_ball(shape, (30, 100, 48), 18)] = 3  # a mass resting on the abdomen (bottom at z = 30)
    components[90:130, 90:130, 70:76] = 4  # a flat cap with lung below it
    spacing = np.array([1.0, 1.0, 1.0])
    candidates = np.array([False, True, True, True, True])
    assert domes(components, 4, image, spacing, candidates).tolist() == [False, True, False, False, False]
    # only the candidates are judged
    assert not domes(components, 4, image, spacing, np.array([False, False, True, True, True])).any()


def test_domes_drops_a_flat_cap_where_the_scan_ends_keeps_a_mass_there() -> None:
    """A flat cap on the scan's lowest slices has nothing below it to look at: taken for
    the abdomen's top where a scan ends at the lung bases. A ball cut by the scan's end
    is a lump, not a cap, and is kept."""
    shape = (140, 140, 60)
    image = np.full(shape, AIR, dtype=np.float32)  # lung down to the scan's end
    components = np.zeros(shape, dtype=np.int32)
    components[10:60, 10:60, 0:8] = 1  # 50 x 50 x 8 mm on the lowest slices
    components[_ball(shape, (100, 100, 10), 20)] = 2  # a 40 mm ball, its lower part cut off
    components[10:60, 80:130, 12:18] = 3  # a flat cap with lung (12 mm of it) below
    spacing = np.array([1.0, 1.0, 1.0])
    candidates = np.array([False, True, True, True])
    assert domes(components, 3, image, spacing, candidates).tolist() == [False, True, False, False]


def test_mass_channel_adds_only_wide_components_of_the_mass_network() -> None:
    """Channel 0 (nodule network) is kept as it is; of channel 1 (mass network) only
    components wider than the classifier's 32 mm patch along both in-plane axes join."""
    shape = (120, 120, 40)
    prob = np.zeros((2, *shape), dtype=np.float32)
    prob[0, 10:18, 10:18, 10:18] = 0.9  # a nodule only the nodule network sees
    prob[1, 60:110, 60:100, 5:35] = 0.8  # a 50 x 40 mm mass
    prob[1, 10:30, 80:100, 10:20] = 0.95  # a 20 mm blob of the mass network: not a mass
    prob[1, 12:16, 12:16, 12:16] = 0.6  # the mass network inside the nodule: dropped, channel 0 decides
    pred = MetaTensor(torch.from_numpy(prob), affine=torch.eye(4))
    out = MassChanneld(keys="pred")({"pred": pred})["pred"]
    assert isinstance(out, MetaTensor) and tuple(out.shape) == (1, *shape)
    merged = out[0].numpy()
    assert np.array_equal(merged[10:18, 10:18, 10:18], prob[0, 10:18, 10:18, 10:18])
    assert (merged[60:110, 60:100, 5:35] == np.float32(0.8)).all()
    assert merged[10:30, 80:100, 10:20].max() == 0.0
    assert float((merged > 0.5).sum()) == 8**3 + 50 * 40 * 30
    single = MetaTensor(torch.from_numpy(prob[:1].copy()), affine=torch.eye(4))
    assert MassChanneld(keys="pred")({"pred": single})["pred"] is single


def _scaled(hu: float) -> float:
    return (hu + 1000.0) / 1400.0


def test_subsolid_channel_adds_only_components_that_measure_subsolid() -> None:
    """Channel 2 (subsolid network): a ground-glass ball and the ground glass around a
    part-solid nodule's core join (the latter as one finding with the nodule channel's
    core); a component over soft tissue (a thick-slice vessel segment at -100 HU) does
    not, however sure the network is."""
    shape = (100, 100, 40)
    image = np.full(shape, _scaled(-850.0), dtype=np.float32)  # lung
    glass = _ball(shape, (25, 25, 20), 7)
    image[glass] = _scaled(-600.0)
    part = _ball(shape, (70, 30, 20), 8)
    core = _ball(shape, (70, 30, 20), 4)
    image[part] = _scaled(-550.0)
    image[core] = _scaled(30.0)
    vessel = _ball(shape, (40, 75, 20), 5)
    image[vessel] = _scaled(-100.0)
    prob = np.zeros((3, *shape), dtype=np.float32)
    prob[0][core] = 0.9  # the nodule network marks the solid core only
    prob[2][glass] = 0.8
    prob[2][part] = 0.7
    prob[2][vessel] = 0.99
    spacing = np.array([1.0, 1.0, 1.0])
    assert np.array_equal(subsolid_components(prob[2], image, spacing), glass | part)
    pred = MetaTensor(torch.from_numpy(prob), affine=torch.eye(4))
    img = MetaTensor(torch.from_numpy(image)[None], affine=torch.eye(4))
    merged = MassChanneld(keys="pred")({"pred": pred, "image": img})["pred"][0].numpy()
    assert np.array_equal(merged > 0.5, glass | part)
    assert (merged[core] == np.float32(0.9)).all()  # the nodule channel's own probability kept


def test_subsolid_channel_adds_nothing_the_lung_around_it_matches() -> None:
    """A component of the subsolid channel that is only lung (a -770 HU stretch of a
    dense -775 HU lung: its core is below -300 HU, so 'subsolid') is not added; the same
    shape of -600 HU ground glass in that lung is, 170 HU above it."""
    shape = (60, 60, 40)
    lung = np.full(shape, _scaled(-775.0), dtype=np.float32)
    patch = _ball(shape, (30, 30, 20), 8)
    plain = lung.copy()
    plain[patch] = _scaled(-770.0)
    glass = lung.copy()
    glass[patch] = _scaled(-600.0)
    prob = np.where(patch, 0.95, 0.0).astype(np.float32)
    spacing = np.array([1.0, 1.0, 1.0])
    assert not subsolid_components(prob, plain, spacing).any()
    assert np.array_equal(subsolid_components(prob, glass, spacing), patch)


def test_subsolid_components_need_the_source_grids_core() -> None:
    """On 5 mm source slices a component one slice thick (a diluted vessel segment,
    resampled to 1.25 mm) has no core where the report measures it, so it is not added;
    a ground-glass ball three slices deep is."""
    shape = (60, 60, 48)
    image = np.full(shape, _scaled(-850.0), dtype=np.float32)
    thin = np.zeros(shape, dtype=bool)
    thin[10:22, 10:22, 20:24] = True  # 12 x 12 x 5 mm
    ball = _ball(shape, (40, 40, 24), 9)  # 18 mm across: 22 working voxels, over 3 source slices
    image[thin | ball] = _scaled(-500.0)
    prob = np.where(thin | ball, 0.9, 0.0).astype(np.float32)
    spacing = np.array([1.0, 1.0, 1.25])
    assert np.array_equal(subsolid_components(prob, image, spacing), thin | ball)
    kept = subsolid_components(prob, image, spacing, source_spacing=np.array([0.8, 0.8, 5.0]))
    assert np.array_equal(kept, ball)


def test_source_spacing_follows_the_orientation() -> None:
    """The bundle's preprocessing (orientation to RAS, crop, resampling) recorded on the
    image: the source voxel size comes back in the working grid's axis order."""
    from monai.transforms import Compose

    from plugin.transforms import OrientCropForegroundd, ZoomSpacingd

    image = np.full((1, 40, 30, 12), 100.0, dtype=np.float32)
    swapped = np.array([[0.0, -0.9, 0.0, 0.0], [-0.7, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0, 0, 0, 1.0]])
    source = MetaTensor(torch.from_numpy(image), affine=torch.from_numpy(swapped))  # array axis 0 runs along -Y, axis 1 along -X
    out = Compose([OrientCropForegroundd(keys="image", axcodes="RAS", select_fn=lambda x: x > -500, margin=0),
                   ZoomSpacingd(keys="image", pixdim=(1.0, 1.0, 1.25))])({"image": source})["image"]
    assert np.allclose(source_spacing(out), [0.9, 0.7, 5.0])
    assert source_spacing(torch.zeros(1, 2, 2, 2)) is None


def test_holes_are_filled_slice_by_slice_as_scipy_fills_them() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        mask = rng.random(tuple(int(n) for n in rng.integers(1, 16, size=3))) < rng.random()
        expected = np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in range(mask.shape[2])], axis=2)
        assert np.array_equal(fill_holes_per_slice(mask), expected)
    ring = np.zeros((7, 7, 3), dtype=bool)
    ring[1:6, 1:6, 1] = True
    ring[2:5, 2:5, 1] = False  # a hole in the middle slice only: filled there, nowhere else
    filled = fill_holes_per_slice(ring)
    assert filled[1:6, 1:6, 1].all() and not filled[:, :, 0].any() and not filled[:, :, 2].any()
