"""ZoomSpacingd: same grid as Spacingd, and Invertd puts labels back exactly."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Orientationd, Spacingd

from plugin.transforms import ZoomSpacingd


def _image(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> MetaTensor:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [180.0, 180.0, -100.0]
    x, y, z = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    data = ((x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 + (z - shape[2] / 2) ** 2 < 100).astype(np.float32)
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.tensor(affine), meta={"space": "RAS"})


def test_output_grid_matches_spacingd() -> None:
    image = _image((70, 60, 40), (0.7, 0.7, 2.5))
    ours = Compose([Orientationd("img", "RAS"), ZoomSpacingd("img", (1.0, 1.0, 1.25))])({"img": image})["img"]
    theirs = Compose([Orientationd("img", "RAS"), Spacingd("img", (1.0, 1.0, 1.25))])({"img": image.clone()})["img"]
    assert abs(ours.shape[1] - theirs.shape[1]) <= 1 and abs(ours.shape[3] - theirs.shape[3]) <= 1
    spacing = np.sqrt((np.asarray(ours.affine)[:3, :3] ** 2).sum(axis=0))
    assert np.allclose(spacing, (1.0, 1.0, 1.25), atol=0.02)
    # the sphere stays where it was, in world coordinates
    def centre(img: MetaTensor) -> np.ndarray:
        idx = np.argwhere(np.asarray(img[0]) > 0.5).mean(axis=0)
        return (np.asarray(img.affine) @ np.append(idx, 1.0))[:3]
    assert np.allclose(centre(ours), centre(theirs), atol=1.0)


def test_invertd_restores_the_source_grid() -> None:
    image = _image((64, 64, 32), (0.8, 0.8, 2.0))
    pre = Compose([Orientationd("img", "RAS"), ZoomSpacingd("img", (1.0, 1.0, 1.25))])
    data = pre({"img": image})
    data["pred"] = MetaTensor((data["img"] > 0.5).float(), meta=dict(data["img"].meta))
    data["pred"].applied_operations = list(data["img"].applied_operations)
    back = Invertd("pred", transform=pre, orig_keys="img", nearest_interp=True)(data)["pred"]
    assert back.shape == image.shape
    assert np.allclose(np.asarray(back.affine), np.asarray(image.affine), atol=1e-4)
    dice = 2 * float(((back > 0.5) & (image > 0.5)).sum()) / float((back > 0.5).sum() + (image > 0.5).sum())
    assert dice > 0.9
