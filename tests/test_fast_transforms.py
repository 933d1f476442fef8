"""The fast equivalents in plugin.transforms give MONAI's results exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Activationsd,
    Compose,
    CropForegroundd,
    Invertd,
    Orientationd,
    ScaleIntensityRanged,
)

from plugin.transforms import (
    OrientCopyd,
    OrientCropForegroundd,
    ScaleIntensityRangeFusedd,
    ScanCropForegroundd,
    SigmoidInPlaced,
)


def _volume(perm: tuple[int, ...], signs: tuple[int, ...], space: str = "RAS") -> MetaTensor:
    """A (1, X, Y, Z) transposed view of a slice-ordered buffer, like the node's volumes,
    with a body of soft tissue in air and a random texture."""
    rng = np.random.default_rng(sum(perm) * 7 + sum(signs))
    affine = np.eye(4)
    affine[:3, :3] = 0
    for k, (p, s) in enumerate(zip(perm, signs)):
        affine[p, k] = s * (0.7, 0.8, 1.25)[k]
    affine[:3, 3] = (10.0, -20.0, 30.0)
    buffer = np.full((11, 17, 13), -1000.0, dtype=np.float32)  # (Z, Y, X)
    buffer[2:9, 3:12, 4:10] = rng.normal(40, 30, size=(7, 9, 6))
    buffer[5, 14, 11] = 0.0  # a lone foreground voxel off the body
    view = torch.from_numpy(buffer).permute(2, 1, 0)[None]
    return MetaTensor(view, affine=torch.tensor(affine), meta={"space": space})


ORIENTATIONS = list(itertools.product([(0, 1, 2), (1, 0, 2), (2, 0, 1)], [(1, 1, 1), (-1, -1, 1), (1, -1, -1)]))


@pytest.mark.parametrize(("perm", "signs"), ORIENTATIONS)
@pytest.mark.parametrize("space", ["RAS", "LPS"])
def test_orient_copy_equals_orientation(perm: tuple[int, ...], signs: tuple[int, ...], space: str) -> None:
    image = _volume(perm, signs, space)
    before = image.clone()
    theirs = Orientationd("img", "RAS")({"img": image})["img"]
    ours = OrientCopyd("img", "RAS")({"img": image})["img"]
    assert torch.equal(ours.as_tensor(), theirs.as_tensor()) and ours.is_contiguous()
    assert torch.equal(ours.affine, theirs.affine) and set(ours.meta) == set(theirs.meta)
    op_ours, op_theirs = ours.applied_operations[-1], theirs.applied_operations[-1]
    assert tuple(op_ours["orig_size"]) == tuple(op_theirs["orig_size"])
    assert np.array_equal(op_ours["extra_info"]["original_affine"], op_theirs["extra_info"]["original_affine"])
    assert torch.equal(image.as_tensor(), before.as_tensor())  # the input is not modified


@pytest.mark.parametrize(("margin", "allow_smaller", "k"), [(0, True, 1), (2, True, 1), (3, True, 4), (1, False, 1)])
def test_scan_crop_equals_crop_foreground(margin: int, allow_smaller: bool, k: int) -> None:
    image = Orientationd("img", "RAS")({"img": _volume((0, 1, 2), (-1, -1, 1))})["img"]
    args = {"select_fn": lambda x: x > -500, "margin": margin, "allow_smaller": allow_smaller, "k_divisible": k}
    theirs = CropForegroundd("img", "img", **args)({"img": image})
    ours = ScanCropForegroundd("img", "img", **args)({"img": image})
    assert torch.equal(ours["img"].as_tensor(), theirs["img"].as_tensor())
    assert torch.equal(ours["img"].affine, theirs["img"].affine)
    assert np.array_equal(ours["foreground_start_coord"], theirs["foreground_start_coord"])
    assert ours["img"].applied_operations[-1]["extra_info"]["cropped"] == \
        theirs["img"].applied_operations[-1]["extra_info"]["cropped"]


def test_scan_crop_of_an_empty_image_and_its_inverse() -> None:
    empty = MetaTensor(torch.full((1, 6, 5, 4), -1000.0), affine=torch.eye(4))
    args = {"select_fn": lambda x: x > -500, "margin": 1}
    theirs = CropForegroundd("img", "img", **args)({"img": empty.clone()})["img"]
    ours = ScanCropForegroundd("img", "img", **args)({"img": empty.clone()})["img"]
    assert ours.shape == theirs.shape
    pre = Compose([ScanCropForegroundd("img", "img", select_fn=lambda x: x > -500)])
    data = pre({"img": _volume((0, 1, 2), (1, 1, 1))})
    data["pred"] = MetaTensor(torch.ones_like(data["img"].as_tensor()), meta=dict(data["img"].meta))
    back = Invertd("pred", transform=pre, orig_keys="img")(data)["pred"]
    assert back.shape == (1, 13, 17, 11) and float(back.sum()) == float(np.prod(data["img"].shape))


def test_fused_scaling_is_bitwise_monai() -> None:
    image = MetaTensor(torch.linspace(-2000, 3000, 4000).reshape(1, 10, 20, 20), affine=torch.eye(4) * 2)
    for clip in (True, False):
        theirs = ScaleIntensityRanged("img", -1000, 400, 0, 1, clip=clip)({"img": image})["img"]
        ours = ScaleIntensityRangeFusedd("img", -1000, 400, 0, 1, clip=clip)({"img": image})["img"]
        assert torch.equal(ours.as_tensor(), theirs.as_tensor()) and torch.equal(ours.affine, theirs.affine)
    assert float(image.min()) == -2000  # input untouched


def test_sigmoid_in_place_is_bitwise_monai_and_makes_no_second_tensor() -> None:
    logits = torch.linspace(-30, 30, 3 * 41 * 37 * 11, dtype=torch.float32).reshape(3, 41, 37, 11)
    pred = MetaTensor(logits.clone(), affine=torch.eye(4) * 2)
    theirs = Activationsd("pred", sigmoid=True)({"pred": pred})["pred"]
    storage = pred.data_ptr()
    ours = SigmoidInPlaced("pred")({"pred": pred})["pred"]
    assert torch.equal(ours.as_tensor(), theirs.as_tensor()) and torch.equal(ours.affine, theirs.affine)
    assert ours.data_ptr() == storage  # the prediction's own memory
    with pytest.raises(TypeError, match="floating point"):
        SigmoidInPlaced("pred")({"pred": torch.zeros(2, dtype=torch.int64)})


@pytest.mark.parametrize(("perm", "signs"), ORIENTATIONS)
@pytest.mark.parametrize(("margin", "allow_smaller"), [(2, True), (0, False), (9, False)])
def test_orient_crop_equals_orientation_then_crop(perm: tuple[int, ...], signs: tuple[int, ...], margin: int,
                                                  allow_smaller: bool) -> None:
    image = _volume(perm, signs, "LPS")
    args = {"select_fn": lambda x: x > -500, "margin": margin, "allow_smaller": allow_smaller}
    theirs_pre = Compose([Orientationd("img", "RAS"), CropForegroundd("img", "img", **args)])
    ours_pre = Compose([OrientCropForegroundd("img", "RAS", **args)])
    theirs, ours = theirs_pre({"img": image}), ours_pre({"img": image})
    a, b = theirs["img"], ours["img"]
    assert torch.equal(a.as_tensor(), b.as_tensor()) and b.is_contiguous()
    assert torch.equal(a.affine, b.affine) and set(a.meta) == set(b.meta)
    assert np.array_equal(theirs["foreground_start_coord"], ours["foreground_start_coord"])
    assert [op["orig_size"] for op in a.applied_operations] == [op["orig_size"] for op in b.applied_operations]
    assert a.applied_operations[-1]["extra_info"]["cropped"] == b.applied_operations[-1]["extra_info"]["cropped"]
    for data in (theirs, ours):
        data["pred"] = MetaTensor(data["img"].as_tensor().clone(), meta=dict(data["img"].meta))
    back_theirs = Invertd("pred", transform=theirs_pre, orig_keys="img")(theirs)["pred"]
    back_ours = Invertd("pred", transform=ours_pre, orig_keys="img")(ours)["pred"]
    assert torch.equal(back_theirs.as_tensor(), back_ours.as_tensor())
    assert torch.equal(back_theirs.affine, back_ours.affine)


def test_orient_copy_never_shares_the_input_memory() -> None:
    plain = torch.zeros(1, 4, 3, 2)  # no metadata: the eager fallback, nothing to flip
    out = OrientCopyd("img", "RAS")({"img": plain})["img"]
    out += 1
    assert float(plain.sum()) == 0.0
    image = _volume((0, 1, 2), (1, 1, 1))  # already RAS
    before = image.clone()
    ours = OrientCropForegroundd("img", "RAS", select_fn=lambda x: x > -500)({"img": image})["img"]
    ours += 1
    assert torch.equal(image.as_tensor(), before.as_tensor())
