"""``KeepInLungsd`` (models/lung_nodules/transforms.py): predicted components in the
lungs are kept unchanged, components in soft tissue far from the lungs are removed."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from models.lung_nodules.transforms import KeepInLungsd, lung_region

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
