"""plugin/components.py: connected components of sparse masks give SciPy's labels,
count and bounding boxes, by the sparse way and by the scan it falls back to."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from plugin import components


def _masks(seed: int) -> list[np.ndarray]:
    """Random masks of one to three dimensions, from nearly empty to nearly full."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 14, size=int(rng.integers(1, 4))))
        out.append(rng.random(shape) < rng.random())
    return out


@pytest.mark.parametrize("sparse_below", [float("inf"), 0.0], ids=["sparse", "scanned"])
def test_labels_count_and_boxes_are_scipys(monkeypatch: pytest.MonkeyPatch, sparse_below: float) -> None:
    monkeypatch.setattr(components, "SPARSE_BELOW", sparse_below)
    checked = 0
    for mask in _masks(0):
        for structure in (None, ndimage.generate_binary_structure(mask.ndim, 2), np.ones((3,) * mask.ndim, bool)):
            expected, count = ndimage.label(mask, structure=structure)
            found = components.label(mask, structure)
            assert found.count == count
            assert found.labels.dtype == expected.dtype and np.array_equal(found.labels, expected)
            assert found.boxes == ndimage.find_objects(expected, max_label=count)
            where = np.nonzero(expected)
            assert all(np.array_equal(a, b) for a, b in zip(found.where, where))
            assert np.array_equal(found.ids, expected[where])
            checked += count
    assert checked > 500


def test_a_sparse_chest_sized_mask_takes_the_sparse_way_and_matches() -> None:
    """Vessel-like sparse tubes in a chest-sized grid (under 1 % marked): the sparse
    way runs (the scan is never called) and gives SciPy's labels."""
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
    calls: list[int] = []
    original = components._scanned
    components._scanned = lambda *a: calls.append(1) or original(*a)  # type: ignore[assignment]
    try:
        for structure in (None, np.ones((3, 3, 3), bool)):
            expected, count = ndimage.label(mask, structure=structure)
            found = components.label(mask, structure)
            assert found.count == count > 10 and np.array_equal(found.labels, expected)
    finally:
        components._scanned = original  # type: ignore[assignment]
    assert calls == []


def test_an_empty_mask_and_a_bad_structure() -> None:
    found = components.label(np.zeros((4, 5, 6), dtype=bool))
    assert found.count == 0 and found.boxes == [] and not found.labels.any() and found.ids.size == 0
    with pytest.raises(ValueError, match="symmetric"):
        components.label(np.ones((4, 4), bool), np.array([[0, 1, 0], [0, 1, 1], [0, 0, 0]], bool))
    with pytest.raises(ValueError, match="symmetric"):
        components.label(np.ones((4, 4, 4), bool), np.ones((3, 3), bool))
