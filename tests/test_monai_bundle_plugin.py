"""The MONAI bundle plugin on the real third-party spleen_ct_segmentation bundle.

The fixture holds the bundle's configs only (see its NOTICE.md). Each test copies it
to ``tmp_path``, builds its ``network_def`` with seeded random weights and saves them as
``models/model.pt``, writes a ``manifest.yaml`` and runs the bundle's own
preprocessing, inferer and postprocessing (Invertd included) in memory.

Random weights predict nothing meaningful, so:

* the UNet tests add a large bias (+/-50) to the spleen / background logits of the
  network's last convolution before saving, so every voxel is predicted Spleen: the
  Spleen segment is guaranteed non-empty and its volume is known exactly;
* the geometry tests replace ``network_def`` by a 1x1x1 convolution that thresholds the
  preprocessed intensity (spleen where HU > ~53), a deterministic "identity-like"
  network, so the label map must land exactly on the bright box of the input after
  Orientationd + Spacingd and their inversion by Invertd.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor

from dicom_node.errors import PluginError
from plugin.monai_bundle import MonaiBundlePlugin, _in_channels, _window_size, create
from plugin.types import Volume
from tests.support import BUNDLE_FIXTURES, REPO

FIXTURE = BUNDLE_FIXTURES / "spleen_ct_segmentation"
SPLEEN = ("78961009", "SCT", "Spleen")
THRESHOLD_NET = {
    "_target_": "torch.nn.Conv3d",
    "in_channels": 1,
    "out_channels": 2,
    "kernel_size": 1,
}
MANIFEST = {
    "name": "spleen_ct_segmentation",
    "display_name": "Spleen CT segmentation (test weights)",
    "version": "0.5.9",
    "device_uid": "2.25.81234567890123456789",
    "for_clinical_use": False,
    "procedure": {"scheme": "LN", "value": "25045-6", "meaning": "CT unspecified body region"},
    "series": {
        "modality": "CT",
        "min_slices": 8,
        "max_slices": 2000,
        "slice_spacing_mm": [0.5, 5.0],
    },
    "labels": {
        1: {
            "name": "Spleen",
            "per_component": False,
            "category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
            "type": {"scheme": "SCT", "value": "78961009", "meaning": "Spleen"},
            "color": [200, 120, 60],
        }
    },
}


def make_bundle(tmp_path: Path, *, threshold: bool = False) -> Path:
    """A copy of the spleen bundle with seeded weights and a manifest."""
    bundle = tmp_path / "spleen_ct_segmentation"
    shutil.copytree(FIXTURE / "configs", bundle / "configs")
    config_file = bundle / "configs" / "inference.json"
    if threshold:
        config = json.loads(config_file.read_text())
        config["network_def"] = THRESHOLD_NET
        config_file.write_text(json.dumps(config, indent=2))
    parser = ConfigParser()
    parser.read_config(str(config_file))
    torch.manual_seed(1234)
    network = parser.get_parsed_content("network_def")
    state = network.state_dict()
    if threshold:  # logit(spleen) - logit(background) = 40 * (intensity - 0.5)
        state["weight"] = torch.tensor([-20.0, 20.0]).reshape(2, 1, 1, 1, 1)
        state["bias"] = torch.tensor([10.0, -10.0])
    else:  # the last convolution of the UNet adds straight onto the output logits
        last_bias = [k for k, v in state.items() if k.endswith("conv.bias") and v.shape == (2,)][-1]
        state[last_bias] = state[last_bias] + torch.tensor([-50.0, 50.0])
    (bundle / "models").mkdir()
    torch.save(state, bundle / "models" / "model.pt")
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(MANIFEST, sort_keys=False))
    return bundle


def ras_affine(
    spacing: tuple[float, float, float], origin_lps: tuple[float, float, float]
) -> np.ndarray:
    """The RAS affine of an axial DICOM stack (its LPS affine with x and y negated)."""
    lps = np.diag([*spacing, 1.0])
    lps[:3, 3] = origin_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def make_volume(hu: np.ndarray, affine: np.ndarray) -> Volume:
    image = MetaTensor(
        torch.from_numpy(hu[None].astype(np.float32)), affine=torch.as_tensor(affine)
    )
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(image, [], "1.2.3", "1.2.3.4", "1.2.3.5", spacing)  # type: ignore[arg-type]


def box_phantom(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue (-100 HU) with an off-centre bright box (150 HU)."""
    hu = np.full(shape, -100.0, dtype=np.float32)
    box = np.zeros(shape, dtype=bool)
    box[10:34, 52:80, 6:22] = True
    hu[box] = 150.0
    return hu, box


def test_unet_bundle_end_to_end_in_memory(tmp_path: Path) -> None:
    plugin = MonaiBundlePlugin(make_bundle(tmp_path), device="cpu")
    assert plugin.info.name == "spleen_ct_segmentation" and plugin.criteria.min_slices == 8
    assert set(plugin.dropped) == {"LoadImaged", "EnsureChannelFirstd", "SaveImaged"}
    shape = (96, 96, 40)
    hu, _ = box_phantom(shape)
    volume = make_volume(hu, ras_affine((1.0, 1.0, 2.5), (-40.0, -60.0, 100.0)))

    findings = plugin.analyse(volume)

    assert findings.label_map.shape == shape
    assert [f.name for f in findings.findings] == ["Spleen"]
    spleen = findings.findings[0]
    assert (spleen.codes.type.value, spleen.codes.type.scheme_designator) == SPLEEN[:2]
    assert spleen.codes.category.value == "91723000"
    assert spleen.volume_mm3 == pytest.approx(96 * 96 * 40 * 2.5)
    assert findings.procedure.value == "25045-6"


def test_the_cuda_warm_up_knows_the_window_and_is_a_no_op_on_the_cpu(tmp_path: Path) -> None:
    plugin = MonaiBundlePlugin(make_bundle(tmp_path), device="cpu")
    assert _window_size(plugin.inferer) == (96, 96, 96)  # the spleen bundle's roi_size
    assert _in_channels(plugin.network) == 1
    assert _window_size(object()) is None and _in_channels(torch.nn.ReLU()) == 1
    calls: list[Any] = []
    plugin.network.register_forward_hook(lambda *args: calls.append(args))
    plugin.warm_up()
    assert calls == []  # nothing to initialise on the CPU: no forward pass at worker start


@pytest.mark.parametrize(
    "spacing, origin, min_dice",
    [
        # the bundle's own spacing (1.5, 1.5, 2.0): only axis flips, so the result is exact
        ((1.5, 1.5, 2.0), (-40.0, -60.0, 100.0), 1.0),
        ((1.5, 1.5, -2.0), (12.0, 7.0, 40.0), 1.0),
        # resampled and back: step edges blur by up to one voxel, never shift
        ((1.0, 1.0, 2.5), (-40.0, -60.0, 100.0), 0.92),
        ((0.8, 0.9, -2.0), (12.0, 7.0, 40.0), 0.92),
    ],
)
def test_prediction_lands_on_the_source_grid(
    tmp_path: Path,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    min_dice: float,
) -> None:
    plugin = MonaiBundlePlugin(make_bundle(tmp_path, threshold=True), device="cpu")
    shape = (72, 96, 32)
    hu, box = box_phantom(shape)
    affine = ras_affine(spacing, origin)

    findings = plugin.analyse(make_volume(hu, affine))

    predicted = findings.label_map == 1
    dice = 2 * np.sum(predicted & box) / (predicted.sum() + box.sum())
    assert dice >= min_dice, dice
    found, expected_box = np.argwhere(predicted), np.argwhere(box)
    assert np.abs(found.min(axis=0) - expected_box.min(axis=0)).max() <= 1
    assert np.abs(found.max(axis=0) - expected_box.max(axis=0)).max() <= 1
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    expected = lps @ np.append(expected_box.mean(axis=0), 1.0)
    assert np.allclose(findings.findings[0].centroid_mm, expected[:3], atol=0.5)
    assert findings.findings[0].mean_hu > 100


def test_dicom_series_to_plugin_to_seg(tmp_path: Path) -> None:
    from dicom_node.results import encode_seg
    from dicom_node.series import build_volume
    from phantoms.ct_writer import SeriesLayout, write_ct_series

    hu, _ = box_phantom((64, 64, 24))
    layout = SeriesLayout(
        pixel_spacing_mm=(1.0, 1.0), slice_spacing_mm=2.5, origin_mm=(-30.0, -30.0, 0.0)
    )
    paths = write_ct_series(
        np.ascontiguousarray(hu.transpose(2, 1, 0)), tmp_path / "ct", layout=layout
    )
    volume = build_volume(paths)
    plugin = create(bundle_dir=str(make_bundle(tmp_path)), device="cpu")

    findings = plugin.analyse(volume)

    assert findings.label_map.shape == volume.shape == (64, 64, 24)
    assert [f.name for f in findings.findings] == ["Spleen"]
    seg = encode_seg(volume, findings, plugin.info, series_number=901)
    (segment,) = seg.SegmentSequence
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == SPLEEN
    assert segment.SegmentLabel.startswith("Spleen")
    out = tmp_path / "seg.dcm"
    seg.save_as(out, enforce_file_format=True)
    errors, output = dciodvfy_errors(out)
    assert not errors, output


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """Error lines reported by dciodvfy (the test fails when the tool is missing)."""
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy (dicom3tools) is required for this test"
    result = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def test_postprocessing_without_invertd_is_rejected(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    transforms = config["postprocessing"]["transforms"]
    config["postprocessing"]["transforms"] = [t for t in transforms if t["_target_"] != "Invertd"]
    config_file.write_text(json.dumps(config))
    plugin = MonaiBundlePlugin(bundle, device="cpu")
    hu, _ = box_phantom((72, 96, 32))
    with pytest.raises(PluginError, match="source grid"):
        plugin.analyse(make_volume(hu, ras_affine((1.0, 1.0, 2.5), (0.0, 0.0, 0.0))))


def test_missing_weights_fail_at_load(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(PluginError, match="spleen_ct_segmentation.*no weights"):
        MonaiBundlePlugin(bundle, device="cpu")


def test_weights_that_do_not_fit_fail_at_load(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    torch.save({"model": {"weight": torch.zeros(3, 1, 1, 1, 1)}}, bundle / "models" / "model.pt")
    with pytest.raises(PluginError, match="does not load into network_def"):
        MonaiBundlePlugin(bundle, device="cpu")


def test_wrapped_state_dict_loads(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({"model": state}, bundle / "models" / "model.pt")
    assert MonaiBundlePlugin(bundle, device="cpu").network is not None


def test_bad_inference_json_fails_at_load(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    (bundle / "configs" / "inference.json").write_text('{"network_def": {')
    with pytest.raises(PluginError, match="cannot parse inference.json"):
        MonaiBundlePlugin(bundle, device="cpu")


def test_missing_required_key_fails_at_load(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    del config["inferer"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(PluginError, match="lacks required key.*inferer"):
        MonaiBundlePlugin(bundle, device="cpu")


def test_unknown_transform_fails_at_load(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["preprocessing"]["transforms"][2]["_target_"] = "NoSuchTransformd"
    config_file.write_text(json.dumps(config))
    with pytest.raises(PluginError, match="cannot build 'preprocessing'"):
        MonaiBundlePlugin(bundle, device="cpu")


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda m: m.update(colour=[1, 2, 3]), "colour"),
        (lambda m: m["labels"][1].pop("type"), "labels.1.type"),
        (lambda m: m.update(device_uid="2.25.01"), "device_uid"),
    ],
)
def test_bad_manifest_fails_at_load_naming_the_key(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], key: str
) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    edit(manifest)
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(PluginError, match=f"spleen_ct_segmentation.*{key}"):
        MonaiBundlePlugin(bundle, device="cpu")


def test_create_checks_its_options(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="unknown option"):
        create(bundle_dir=str(tmp_path), colour="red")
    with pytest.raises(PluginError, match="exactly one"):
        create()
    with pytest.raises(PluginError, match="not a folder"):
        create(bundle_dir=str(tmp_path / "missing"))


LUNG_MANIFEST = """
name: lung_nodules
display_name: AI Lung Nodules
version: 0.1.0
device_uid: "2.25.123456789"
for_clinical_use: false
procedure: {scheme: LN, value: "24627-2", meaning: "Chest CT"}
series: {modality: CT, min_slices: 64, max_slices: 2000, slice_spacing_mm: [0.5, 5.0],
         image_type_required: [ORIGINAL, PRIMARY], body_part_regex: null,
         series_description_regex: null}
labels:
  1:
    name: Nodule
    per_component: true
    min_volume_mm3: 15
    category: {scheme: SCT, value: "49755003", meaning: "Morphologically abnormal structure"}
    type: {scheme: SCT, value: "27925004", meaning: "Nodule"}
    site: {scheme: SCT, value: "39607008", meaning: "Lung"}
    color: [255, 64, 64]
"""


def test_manifest_converts_to_contract_types(tmp_path: Path) -> None:
    from plugin.manifest import load_manifest

    (tmp_path / "manifest.yaml").write_text(LUNG_MANIFEST)
    manifest = load_manifest(tmp_path)
    info, criteria = manifest.plugin_info(), manifest.series_criteria()
    assert (info.name, info.version, info.device_uid) == ("lung_nodules", "0.1.0", "2.25.123456789")
    assert info.display_name == "AI Lung Nodules" and info.for_clinical_use is False
    assert criteria.min_slices == 64 and criteria.slice_spacing_mm == (0.5, 5.0)
    assert criteria.image_type_required == ("ORIGINAL", "PRIMARY")
    assert manifest.procedure_code().value == "24627-2"
    codes = manifest.segment_codes()[1]
    assert (
        codes.type.value == "27925004" and codes.site is not None and codes.site.meaning == "Lung"
    )
    assert codes.color_rgb == (255, 64, 64)
    assert manifest.labels[1].per_component and manifest.labels[1].min_volume_mm3 == 15


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("min_slices: 64", "min_slices: 4000", "series: Value error, min_slices must not exceed"),
        ("color: [255, 64, 64]", "color: [300, 64, 64]", "labels.1.color"),
        ("body_part_regex: null", "body_part_regex: '('", "series.body_part_regex"),
        ("  1:\n", "  0:\n", "labels: Value error, label values must be >= 1"),
    ],
)
def test_manifest_errors_name_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    from plugin.manifest import load_manifest

    assert old in LUNG_MANIFEST
    (tmp_path / "manifest.yaml").write_text(LUNG_MANIFEST.replace(old, new))
    with pytest.raises(PluginError, match=key.replace("(", r"\(")):
        load_manifest(tmp_path / "manifest.yaml")


def test_torchscript_weights_and_bundle_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    network = torch.nn.Conv3d(1, 2, kernel_size=1)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    scripted: Any = torch.jit.script(network)  # torch marks TorchScript deprecated; bundles ship it
    scripted.save(str(bundle / "models" / "model.ts"))
    (bundle / "models" / "model.pt").unlink()
    monkeypatch.syspath_prepend(str(tmp_path))

    plugin = create(bundle_package=bundle.name, device="cpu")

    assert plugin.bundle_dir == bundle.resolve()
    hu = np.full((48, 48, 16), -100.0, dtype=np.float32)
    hu[5:20, 30:40, 2:10] = 150.0
    findings = plugin.analyse(make_volume(hu, ras_affine((1.5, 1.5, 2.0), (0.0, 0.0, 0.0))))
    assert int(np.sum(findings.label_map == 1)) == 15 * 10 * 8


def test_multi_channel_bundles_are_rejected_from_metadata(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = 4
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(PluginError, match="expects 4 input channels"):
        MonaiBundlePlugin(bundle, device="cpu")


def test_file_transforms_built_by_expressions_are_dropped_too() -> None:
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.dictionary import ScaleIntensityd
    from monai.transforms.io.dictionary import LoadImaged, SaveImaged

    from plugin.monai_bundle import _strip_io_objects

    inner = Compose([SaveImaged(keys="pred", output_dir="/nonexistent"), ScaleIntensityd(keys="x")])
    outer = Compose([LoadImaged(keys="image"), inner])
    assert _strip_io_objects(outer) == ["LoadImaged", "SaveImaged"]
    assert outer.transforms == (inner,)
    assert [type(t).__name__ for t in inner.transforms] == ["ScaleIntensityd"]


def test_working_copy_is_c_ordered_and_equal() -> None:
    """The preprocessing input: same values, affine and metadata, C order, a copy."""
    from plugin.monai_bundle import _working_copy

    buffer = np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)  # (Z, Y, X)
    affine = torch.diag(torch.tensor([-0.7, -0.7, 1.25, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(buffer).permute(2, 1, 0)[None], affine=affine, meta={"x": 1})
    copy = _working_copy(image)
    assert copy.is_contiguous() and copy.dtype == torch.float32
    assert torch.equal(copy.as_tensor(), image.as_tensor())
    assert torch.equal(copy.affine, image.affine) and copy.meta["x"] == 1
    copy[0, 0, 0, 0] = -1.0
    assert buffer[0, 0, 0] == 0.0


def test_integer_labels_from_either_layout() -> None:
    labels = (torch.rand(40, 30, 20) > 0.9).float() * 3
    itk_layout = labels.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    plugin = MonaiBundlePlugin.__new__(MonaiBundlePlugin)
    plugin.bundle_dir = Path("bundle")
    for tensor in (labels, itk_layout):
        out = plugin._integer_labels(tensor)
        assert out.dtype == np.uint8 and np.array_equal(out, labels.numpy())
    with pytest.raises(PluginError, match="integer label map"):
        plugin._integer_labels(labels + 0.5)


def test_shipped_spleen_manifest_runs_the_bundle(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    shutil.copy(REPO / "config" / "bundles" / "spleen_ct_segmentation" / "manifest.yaml", bundle)
    plugin = create(bundle_dir=str(bundle), device="cpu")
    hu, _ = box_phantom((64, 64, 40))

    findings = plugin.analyse(make_volume(hu, ras_affine((1.0, 1.0, 2.5), (-40.0, -60.0, 100.0))))

    assert plugin.info.name == "spleen_ct_segmentation" and not plugin.info.for_clinical_use
    (spleen,) = findings.findings
    assert spleen.name == "Spleen" and spleen.role == "structure" and spleen.codes.type.value == "78961009"
    assert list(spleen.contours) == [spleen.key_slice]  # a structure is outlined on its key slice only


def test_network_def_from_the_bundles_own_scripts(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, threshold=True)
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "net.py").write_text(
        "import torch\n\n\ndef Net() -> torch.nn.Module:\n    return torch.nn.Conv3d(1, 2, 1)\n")
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["network_def"] = {"_target_": "scripts.net.Net"}
    config_file.write_text(json.dumps(config))

    plugin = create(bundle_dir=str(bundle), device="cpu")

    assert type(plugin.network).__name__ == "Conv3d"
    shutil.rmtree(bundle / "scripts")
    with pytest.raises(PluginError, match="scripts.net.Net but the bundle has no scripts/ package"):
        create(bundle_dir=str(bundle), device="cpu")
