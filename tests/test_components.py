"""plugin/components.py: connected components give SciPy's labels, count, bounding boxes
and voxels, by cc3d and by SciPy, on masks of every shape cc3d has been seen to get
wrong with boolean input."""

from __future__ import annotations

from typing import Any

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from plugin import components


def _masks(seed: int, count: int = 400) -> list[np.ndarray]:
    """Random masks of one to three dimensions, some one voxel thick, from nearly
    empty to nearly full."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        shape = tuple(int(n) for n in rng.integers(1, 12, size=int(rng.integers(1, 4))))
        out.append(rng.random(shape) < rng.random())
    return out


def _check(mask: np.ndarray, structure: np.ndarray | None) -> int:
    """``components.label`` against SciPy: labels, count, boxes, voxels; the count."""
    expected, count = ndimage.label(mask, structure=structure)
    found = components.label(mask, structure)
    assert found.count == count
    assert found.labels.dtype == expected.dtype and np.array_equal(found.labels, expected)
    assert found.boxes == ndimage.find_objects(expected, max_label=count)
    where = np.nonzero(expected)
    assert all(np.array_equal(a, b) for a, b in zip(found.where, where))
    assert np.array_equal(found.ids, expected[where])
    return int(count)


@pytest.mark.parametrize("dense_share", [0.0, 1.0], ids=["boxes-by-scan", "boxes-by-voxels"])
def test_labels_count_boxes_and_voxels_are_scipys(monkeypatch: pytest.MonkeyPatch, dense_share: float) -> None:
    monkeypatch.setattr(components, "DENSE_SHARE", dense_share)
    checked = 0
    for mask in _masks(0):
        for structure in (None, ndimage.generate_binary_structure(mask.ndim, 2), np.ones((3,) * mask.ndim, bool)):
            checked += _check(mask, structure)
    assert checked > 2000


def test_a_chest_sized_sparse_mask_matches_and_a_fortran_ordered_one_too() -> None:
    """Vessel-like tubes in a chest-sized grid (under 1 % marked), in C and in Fortran
    order (numbering follows C order either way, as SciPy's does)."""
    rng = np.random.default_rng(1)
    mask = np.zeros((120, 110, 90), dtype=bool)
    for _ in range(40):
        start = rng.integers(0, [120, 110, 90])
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        for t in range(30):
            x, y, z = np.clip((start + t * direction).astype(int), 0, [119, 109, 89])
            mask[x, y, z] = True
    assert mask.mean() < 0.01
    for array in (mask, np.asfortranarray(mask)):
        for structure in (None, np.ones((3, 3, 3), bool)):
            assert _check(array, structure) > 10


def test_labels_cc3d_numbered_out_of_raster_order_are_renumbered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were cc3d to number components in another order, the labels would still be SciPy's."""
    real = cc3d.connected_components
    rng = np.random.default_rng(2)

    def shuffled(data: np.ndarray, **kwargs: Any) -> tuple[np.ndarray, int]:
        labels, count = real(data, **kwargs)
        order = np.concatenate([[0], rng.permutation(count) + 1]).astype(labels.dtype)
        return order[labels], count

    monkeypatch.setattr(cc3d, "connected_components", shuffled)
    checked = 0
    for mask in _masks(4, count=150):
        if mask.ndim > 1:
            checked += _check(mask, None) + _check(mask, np.ones((3,) * mask.ndim, bool))
    assert checked > 500


def test_labels_out_of_raster_order_are_renumbered_as_scipy_numbers_them() -> None:
    assert components._raster_numbers(np.array([1, 1, 2, 3, 2], dtype=np.int32), 3) is None
    number = components._raster_numbers(np.array([2, 3, 2, 1, 3], dtype=np.int32), 3)
    assert number is not None and number[[2, 3, 2, 1, 3]].tolist() == [1, 2, 1, 3, 2]


def test_an_empty_mask_and_a_bad_structure() -> None:
    found = components.label(np.zeros((4, 5, 6), dtype=bool))
    assert found.count == 0 and found.boxes == [] and not found.labels.any() and found.ids.size == 0
    with pytest.raises(ValueError, match="symmetric"):
        components.label(np.ones((4, 4), bool), np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], bool))
    with pytest.raises(ValueError, match="symmetric"):
        components.label(np.ones((4, 4, 4), bool), np.ones((3, 3), bool))
