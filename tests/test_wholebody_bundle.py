"""The Model Zoo's wholeBody_ct_segmentation bundle (104 structures), run unchanged.

The fixture holds the bundle's configs (see its NOTICE); each test copies them with the
shipped ``config/bundles/wholeBody_ct_segmentation/manifest.yaml`` (SNOMED CT codes
from TotalSegmentator's mapping) and saves the real SegResNet with seeded random
weights. The bundle's own low-resolution variant (``displayable_configs#highres:
false``: 3 mm, ``models/model_lowres.pt``) is chosen by a config override, as a site
would choose it. Random weights segment nothing real, so the bias of the network's last
convolution lifts two classes (right and left kidney) far above the rest: every voxel
is one of the two, the choice between them left to the random features.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
import yaml
from monai.bundle.config_parser import ConfigParser

from dicom_node import pipeline
from dicom_node.pipeline import JobSpec, run_job
from phantoms.ct_writer import SeriesLayout, write_ct_series
from plugin.manifest import load_manifest
from plugin.monai_bundle import create
from tests.results_support import dciodvfy_errors, run_tool, walk
from tests.support import BUNDLE_FIXTURES, REPO

FIXTURE = BUNDLE_FIXTURES / "wholeBody_ct_segmentation"
MANIFEST = REPO / "config" / "bundles" / "wholeBody_ct_segmentation" / "manifest.yaml"
RIGHT_KIDNEY, LEFT_KIDNEY = 2, 3


def make_bundle(tmp_path: Path, *, drop_labels: tuple[int, ...] = ()) -> Path:
    bundle = tmp_path / "wholeBody_ct_segmentation"
    shutil.copytree(FIXTURE / "configs", bundle / "configs")
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["overrides"] = {"displayable_configs#highres": False}
    manifest["series"]["min_slices"] = 16
    for label in drop_labels:
        del manifest["labels"][label]
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.manual_seed(3)
    state = parser.get_parsed_content("network_def").state_dict()
    last_bias = [k for k, v in state.items() if k.endswith("bias") and v.shape == (105,)][-1]
    state[last_bias][RIGHT_KIDNEY] += 60.0
    state[last_bias][LEFT_KIDNEY] += 60.0
    (bundle / "models").mkdir()
    torch.save(state, bundle / "models" / "model_lowres.pt")
    return bundle


@pytest.fixture(autouse=True)
def fresh_plugins() -> Any:
    pipeline._PLUGINS.clear()
    yield
    pipeline._PLUGINS.clear()


def ct_files(tmp_path: Path) -> list[Path]:
    hu = np.full((32, 64, 64), 40.0, dtype=np.float32)
    hu[:, :, :8] = -1000.0
    return write_ct_series(hu, tmp_path / "ct", layout=SeriesLayout(pixel_spacing_mm=(1.5, 1.5), slice_spacing_mm=2.5))


def run(tmp_path: Path, bundle: Path) -> tuple[pydicom.Dataset, pydicom.Dataset, list[Path]]:
    files = ct_files(tmp_path)
    spec = JobSpec(job_id=1, study_uid="1.2.3", plugin_name="wholeBody_ct_segmentation",
                   plugin_factory="monai_bundle", plugin_options={"bundle_dir": str(bundle), "device": "cpu"},
                   files=files, results_dir=tmp_path / "results", revision=1)
    outcome = run_job(spec)
    # structures get no key image of their own: the summary lists them
    assert [r.kind for r in outcome.results] == ["SEG", "SR", "SC", "KOS"], outcome
    kinds = {r.kind: r.path for r in outcome.results}
    for path in kinds.values():
        errors, output = dciodvfy_errors(path)
        assert errors == [], output
    assert run_tool("dsrdump", kinds["SR"]).returncode == 0
    return pydicom.dcmread(kinds["SEG"]), pydicom.dcmread(kinds["SR"]), files


def test_real_wholebody_bundle_to_a_seg_with_snomed_codes(tmp_path: Path) -> None:
    seg, sr, _ = run(tmp_path, make_bundle(tmp_path))

    segments = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert set(segments) == {"Right kidney", "Left kidney"}
    for label, side in (("Right kidney", "24028007"), ("Left kidney", "7771000")):
        prop = segments[label].SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("64033007", "SCT")
        assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == side
        assert segments[label].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    # structures: one TID 1501 group each (volume, mean HU), no per-slice outlines
    groups = [i for i in walk(sr) if i.get("ValueType") == "CONTAINER"
              and i.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert len(groups) == 2
    assert not [i for i in walk(sr) if i.get("ValueType") == "SCOORD"]
    volumes = [float(i.MeasuredValueSequence[0].NumericValue) for i in walk(sr)
               if i.get("ValueType") == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "118565006"]
    assert sum(volumes) == pytest.approx(64 * 64 * 32 * 1.5 * 1.5 * 2.5)  # every voxel is one of the two


def test_label_without_codes_gets_the_documented_fallback(tmp_path: Path) -> None:
    seg, _, _ = run(tmp_path, make_bundle(tmp_path, drop_labels=(LEFT_KIDNEY,)))

    segments = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert set(segments) == {"Right kidney", "kidney_left"}  # named as the bundle names it
    fallback = segments["kidney_left"].SegmentedPropertyTypeCodeSequence[0]
    assert (fallback.CodeValue, fallback.CodingSchemeDesignator) == ("91723000", "SCT")


def test_shipped_manifest_codes_all_104_labels() -> None:
    manifest = load_manifest(MANIFEST)
    names = yaml.safe_load((FIXTURE / "configs" / "metadata.json").read_text())[
        "network_data_format"]["outputs"]["pred"]["channel_def"]
    assert sorted(manifest.labels) == list(range(1, 105)) == sorted(int(k) for k in names if k != "0")
    assert all(spec.role == "structure" for spec in manifest.labels.values())
    # a paired organ's side is its modifier; types that are lateral themselves carry none
    lateral_types = {16, 45, 46, 47, 48}  # middle lobe of right lung, the heart's chambers
    for key, name in names.items():
        if key != "0" and ("left" in name or "right" in name):
            side = manifest.labels[int(key)].modifier
            if int(key) in lateral_types:
                assert side is None, name
            else:
                assert side is not None and side.meaning.lower() in name, name


def test_fused_argmax_equals_the_bundles_softmax_then_argmax() -> None:
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from plugin.argmax_fusion import argmax_channels, fuse_argmax

    torch.manual_seed(0)
    pred = torch.randn(1, 105, 12, 10, 8)
    bundle_way = AsDiscreted(keys="pred", argmax=True)(Activationsd(keys="pred", softmax=True)({"pred": pred[0]}))
    assert torch.equal(argmax_channels(pred)[0], bundle_way["pred"])
    kept = Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys="pred", argmax=True, keepdim=False)])
    assert not fuse_argmax(kept) and len(kept.transforms) == 2  # any other setting: left to the bundle


def test_softmax_argmax_is_taken_on_the_device(tmp_path: Path) -> None:
    plugin = create(bundle_dir=str(make_bundle(tmp_path)), device="cpu")

    assert plugin.fused_argmax  # the bundle's Activationsd + AsDiscreted ran as one argmax
    assert [type(t).__name__ for t in plugin.postprocessing.transforms] == ["Invertd"]
    assert len(plugin.labels) == 104


def test_manifest_may_leave_a_label_out(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, drop_labels=(LEFT_KIDNEY,))
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["unlisted_labels"] = "ignore"
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))

    seg, _, _ = run(tmp_path, bundle)

    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right kidney"]
