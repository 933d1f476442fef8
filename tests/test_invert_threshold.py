"""InvertThresholdd: the same label map as Invertd + AsDiscreted, computed on boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    Invertd,
    Orientationd,
    Spacingd,
)
from scipy import ndimage

from plugin.inversion import InvertThresholdd
from plugin.transforms import ZoomSpacingd


def _image(shape: tuple[int, int, int], spacing: tuple[float, float, float], flips: tuple[int, ...]) -> MetaTensor:
    signs = [-1.0 if axis in flips else 1.0 for axis in range(3)]
    affine = np.diag([s * p for s, p in zip(signs, spacing)] + [1.0])
    affine[:3, 3] = [120.0, -80.0, -60.0]
    rng = np.random.default_rng(7)
    data = np.full(shape, -1000.0, dtype=np.float32)
    body = tuple(slice(s // 6, s - s // 5) for s in shape)
    data[body] = 40.0 + rng.normal(0, 10, size=data[body].shape)
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.tensor(affine), meta={"space": "RAS"})


def _prediction(working: MetaTensor, seed: int) -> MetaTensor:
    """A smooth probability map with a few blobs of various sizes, some at the edges."""
    rng = np.random.default_rng(seed)
    shape = working.shape[1:]
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(6):
        centre = [rng.uniform(0, s - 1) for s in shape]
        radius = rng.uniform(1.0, 6.0)
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        field += np.exp(-dist2 / (2 * radius**2)).astype(np.float32)
    field += ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 1.0) * 0.3
    return MetaTensor(torch.from_numpy(np.clip(field, 0, 1))[None], meta=dict(working.meta))


def _both(pre: Compose, image: MetaTensor, seed: int) -> tuple[MetaTensor, MetaTensor]:
    data = pre({"img": image})
    data["pred"] = _prediction(data["img"], seed)
    slow = Compose([Invertd("pred", transform=pre, orig_keys="img", nearest_interp=False, to_tensor=True),
                    AsDiscreted("pred", threshold=0.5)])({**data, "pred": data["pred"].clone()})["pred"]
    fast = InvertThresholdd("pred", transform=pre, orig_keys="img", threshold=0.5)(dict(data))["pred"]
    return slow, fast


@pytest.mark.parametrize("flips", [(), (0, 1), (2,)])
@pytest.mark.parametrize("seed", [1, 2])
def test_same_labels_as_invertd_and_asdiscreted(flips: tuple[int, ...], seed: int) -> None:
    image = _image((70, 64, 40), (0.7, 0.7, 1.25 if seed == 1 else 2.5), flips)
    pre = Compose([
        Orientationd("img", "RAS"),
        CropForegroundd("img", source_key="img", select_fn=lambda x: x > -500, margin=3, allow_smaller=True),
        ZoomSpacingd("img", (1.0, 1.0, 1.25)),
    ])
    slow, fast = _both(pre, image, seed)
    assert fast.dtype == torch.uint8 and fast.shape == image.shape
    assert np.allclose(np.asarray(fast.affine), np.asarray(image.affine), atol=1e-6)
    expected, found = np.asarray(slow[0]) > 0.5, np.asarray(fast[0]) > 0
    assert expected.sum() > 50
    assert int((expected ^ found).sum()) <= max(1, expected.sum() // 1000)


def test_unsupported_chains_fall_back_to_invertd() -> None:
    image = _image((40, 40, 20), (0.8, 0.8, 2.0), (0,))
    pre = Compose([Orientationd("img", "RAS"), Spacingd("img", (1.0, 1.0, 1.5))])
    slow, fast = _both(pre, image, 3)
    assert np.array_equal(np.asarray(slow), np.asarray(fast))


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InvertThresholdd("pred", transform=Compose([]), orig_keys="img", threshold=0.0)


def test_one_key_it_cannot_take_sends_every_key_to_invertd_once() -> None:
    image = _image((50, 48, 30), (0.7, 0.7, 1.25), ())
    pre = Compose([Orientationd("img", "RAS"), ZoomSpacingd("img", (1.0, 1.0, 1.25))])
    data = pre({"img": image})
    data["pred"] = _prediction(data["img"], 4)
    two = torch.cat([data["pred"].as_tensor(), data["pred"].as_tensor()])  # 2 channels: not for the fast path
    data["both"] = MetaTensor(two, meta=dict(data["pred"].meta))
    slow = Compose([Invertd(["pred", "both"], transform=pre, orig_keys="img", nearest_interp=False, to_tensor=True),
                    AsDiscreted(["pred", "both"], threshold=0.5)])(
        {**data, "pred": data["pred"].clone(), "both": data["both"].clone()})
    fast = InvertThresholdd(["pred", "both"], transform=pre, orig_keys="img", threshold=0.5)(dict(data))
    for key in ("pred", "both"):
        assert fast[key].shape[1:] == image.shape[1:]
        assert np.array_equal(np.asarray(slow[key]) > 0.5, np.asarray(fast[key]) > 0.5), key
