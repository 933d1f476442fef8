"""The synthetic chest-CT phantom: ranges, ground truth, layout and determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from phantoms.chest_phantom import make_chest_phantom, write_chest_phantom

SMALL = {"slices": 48, "rows": 128, "pixel_spacing_mm": 1.0, "slice_spacing_mm": 1.25}


@pytest.fixture(scope="module")
def phantom():  # type: ignore[no-untyped-def]
    return make_chest_phantom(
        3, nodule_diameters_mm=[10.0, 8.0], noise_hu=10.0, **SMALL
    )


def test_shapes_and_types(phantom) -> None:  # type: ignore[no-untyped-def]
    assert phantom.hu_zyx.shape == (48, 128, 128)
    assert phantom.hu_zyx.dtype == np.float32
    assert phantom.labels_zyx.dtype == np.uint8
    assert phantom.labels_zyx.shape == phantom.hu_zyx.shape
    assert set(np.unique(phantom.labels_zyx)) <= {0, 1}
    assert phantom.spacing_zyx == (1.25, 1.0, 1.0)


def test_hu_ranges(phantom) -> None:  # type: ignore[no-untyped-def]
    hu = phantom.hu_zyx
    assert hu.min() >= -1024.0 and hu.max() <= 3000.0
    assert np.median(hu[:, :4, :4]) < -950  # air in the corner
    assert hu.max() > 300  # bone
    nodule = hu[ndimage.binary_erosion(phantom.labels_zyx > 0)]
    assert nodule.size > 0
    assert -160 < float(np.median(nodule)) < 160
    lung = hu[phantom.lung_zyx & (phantom.labels_zyx == 0)]
    assert -950 <= float(np.median(lung)) <= -700  # parenchyma (vessels are few)
    assert phantom.params["lung_hu"] >= -950


def test_labels_are_at_the_nodules(phantom) -> None:  # type: ignore[no-untyped-def]
    assert len(phantom.nodules) == 2
    comp, n = ndimage.label(phantom.labels_zyx > 0)
    assert n == 2
    for nod in phantom.nodules:
        idx = tuple(round(c) for c in nod.centre_voxel_zyx)
        assert phantom.labels_zyx[idx] == 1
        size = (comp == comp[idx]).sum() * float(np.prod(phantom.spacing_zyx))
        sphere = np.pi / 6 * nod.diameter_mm**3
        assert 0.3 * sphere < size < 3.0 * sphere
        assert nod.kind in ("spherical", "irregular")


def test_nodule_mm_matches_affine(phantom) -> None:  # type: ignore[no-untyped-def]
    aff = phantom.lps_affine()
    for nod in phantom.nodules:
        k, j, i = nod.centre_voxel_zyx
        mm = aff @ np.array([i, j, k, 1.0])
        assert np.allclose(mm[:3], nod.centre_mm_lps, atol=1e-3)


def test_seeded_and_varied() -> None:
    a = make_chest_phantom(11, **SMALL)
    b = make_chest_phantom(11, **SMALL)
    c = make_chest_phantom(12, **SMALL)
    assert np.array_equal(a.hu_zyx, b.hu_zyx)
    assert a.nodules == b.nodules
    assert not np.array_equal(a.hu_zyx, c.hu_zyx)


def test_random_geometry_in_ranges() -> None:
    for seed in range(6):
        p = make_chest_phantom(seed, rows=64, nodule_diameters_mm=[])
        lay = p.layout
        assert 0.5 <= lay.pixel_spacing_mm[0] <= 1.0
        assert 0.625 <= lay.slice_spacing_mm <= 5.0
        assert 64 <= p.hu_zyx.shape[0] <= 600
        assert lay.bits_stored in (12, 16)
        assert 5 <= p.params["noise_hu"] <= 40


def test_write_roundtrip(tmp_path: Path) -> None:
    paths, p = write_chest_phantom(
        tmp_path,
        5,
        slices=4,
        rows=64,
        pixel_spacing_mm=1.0,
        slice_spacing_mm=2.0,
        signed=False,
        bits_stored=12,
    )
    assert len(paths) == 4
    ds = pydicom.dcmread(paths[2])
    assert ds.PixelRepresentation == 0 and ds.BitsStored == 12
    assert float(ds.RescaleIntercept) == -1024.0
    hu = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
    assert np.abs(hu - np.clip(np.rint(p.hu_zyx[2]), -1024, 3071)).max() <= 1.0


def test_ground_glass_and_part_solid_nodules_keep_the_scan() -> None:
    """Densities change the nodules' attenuation only: the same seed keeps its anatomy,
    nodule places and labels; a ground-glass nodule reads -750 to -350 HU, a part-solid
    one has a solid centre in a ground-glass rim."""
    kw = {**SMALL, "slices": 64, "rows": 160, "nodule_diameters_mm": [16.0, 16.0, 10.0], "noise_hu": 0.0}
    solid = make_chest_phantom(5, **kw)
    mixed = make_chest_phantom(5, nodule_densities=["ground_glass", "part_solid", "solid"], **kw)
    assert (solid.labels_zyx == mixed.labels_zyx).all()
    assert [n.density for n in mixed.nodules] == ["ground_glass", "part_solid", "solid"]
    changed = solid.hu_zyx != mixed.hu_zyx
    assert changed.any() and not (changed & ~ndimage.binary_dilation(mixed.labels_zyx > 0, iterations=3)).any()
    glass, part, kept = mixed.nodules
    assert -750 <= glass.hu <= -350 and part.solid_hu is not None and part.solid_diameter_mm is not None
    assert 0.3 * part.diameter_mm <= part.solid_diameter_mm <= 0.6 * part.diameter_mm
    centre = tuple(int(round(c)) for c in glass.centre_voxel_zyx)
    assert -800 <= mixed.hu_zyx[centre] <= -300
    z, y, x = (int(round(c)) for c in part.centre_voxel_zyx)
    rim = x + int(round(0.4 * part.diameter_mm / 1.0))  # 1 mm pixels: between core and edge
    assert mixed.hu_zyx[z, y, x] > -150 and -800 <= mixed.hu_zyx[z, y, rim] <= -300
    assert kept.density == "solid" and kept.hu == next(n.hu for n in solid.nodules if n.index == kept.index)


def test_fissures_are_thin_sheets_in_the_lungs() -> None:
    kw = {**SMALL, "slices": 64, "rows": 160, "n_nodules": 0, "noise_hu": 0.0}
    plain = make_chest_phantom(6, **kw)
    fissured = make_chest_phantom(6, fissures=True, **kw)
    changed = plain.hu_zyx != fissured.hu_zyx
    assert plain.lung_zyx is not None and changed.any()
    assert not (changed & ~ndimage.binary_dilation(plain.lung_zyx, iterations=2)).any()
    assert changed.sum() < 0.1 * plain.lung_zyx.sum()  # sheets, not a filling
    assert fissured.hu_zyx[changed].max() < plain.hu_zyx[plain.lung_zyx].max() + 400


def test_an_unknown_density_is_refused_before_anything_is_drawn() -> None:
    with pytest.raises(ValueError, match="unknown nodule density 'glass'"):
        make_chest_phantom(5, nodule_densities=["solid", "glass"], **SMALL)
