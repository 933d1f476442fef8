"""The generic MONAI bundle plugin: run any bundle from its own ``inference.json``.

The bundle's ``preprocessing``, ``network_def`` (+ weights), ``inferer`` and
``postprocessing`` run in memory on ``{"image": volume.image}``. These transforms are
dropped because the volume is already in memory and channel-first:

* ``LoadImage(d)``: the node builds the volume from DICOM (like ``ITKReader``);
* ``EnsureChannelFirst(d)``: the image is already ``(1, X, Y, Z)``; applied again it
  would fail (no ``original_channel_dim``) or add a second channel (``"no_channel"``).
  It records no invertible operation, so ``Invertd`` is not affected;
* ``SaveImage(d)``: results are returned, never written to files.

Everything else, including ``Invertd`` that brings ``pred`` back onto the source grid,
is the bundle's own. Which label is which finding comes from ``manifest.yaml``.

Two kinds of bundle (the manifest's ``kind``):

* ``segmentation``: the postprocessed ``pred`` is a label map on the source grid,
  measured by :mod:`plugin.measure` (a leading softmax + argmax runs as one argmax on
  the device, :mod:`plugin.argmax_fusion`); scores per finding, where the
  postprocessing gives them, as :mod:`plugin.finding_scores` describes;
* ``detection`` (e.g. the Model Zoo's ``lung_nodule_ct_detection``): the inferer is a
  detector returning boxes, labels and scores under its own keys; the bundle's
  postprocessing maps them to world coordinates and :mod:`plugin.boxes` onto the source
  grid. The bundle's ``scripts/``, ``overrides``, required packages and the evaluator's
  ``_requires_`` (``detector_ops``) are handled by :mod:`plugin.bundle_config`.
Everything is checked when the plugin is created (node start): the config parses,
the required keys exist and instantiate, the weights load strictly, the manifest is
valid.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor
from monai.transforms.io.array import LoadImage, SaveImage
from monai.transforms.io.dictionary import LoadImaged, SaveImaged
from monai.transforms.utility.array import EnsureChannelFirst
from monai.transforms.utility.dictionary import EnsureChannelFirstd
from pydicom.sr.coding import Code

from plugin.errors import PluginError
from plugin.argmax_fusion import argmax_channels, fuse_argmax
from plugin.boxes import detections_from_boxes, to_lps_cccwhd
from plugin.bundle_config import (
    BundleConfigError,
    apply_overrides,
    bundle_scripts,
    check_requirements,
    check_scripts,
    metadata_packages,
    missing_packages,
    run_required,
    strip_io_config,
)
from plugin.manifest import CodeSpec, LabelSpec, Manifest, load_manifest
from plugin.finding_scores import SCORES_KEY, assign_scores
from plugin.measure import measure_findings
from plugin.types import Findings, PluginInfo, SeriesCriteria, Volume

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("network_def", "preprocessing", "inferer", "postprocessing")
_DROPPED_TYPES = (
    LoadImage,
    LoadImaged,
    SaveImage,
    SaveImaged,
    EnsureChannelFirst,
    EnsureChannelFirstd,
)
PRED_KEY = "pred"
# what a label the manifest does not code is reported as (see MonaiBundlePlugin._label_specs)
FALLBACK_CODE = CodeSpec(scheme="SCT", value="91723000", meaning="Anatomical structure")
AFFINE_TOLERANCE_MM = 1e-3
# boxes are axis-aligned in the world: on a grid tilted further they are not the detector's
MAX_DETECTION_TILT_DEGREES = 1.0
LABEL_SLAB_VOXELS = 8 * 2**20  # voxels converted at a time from the prediction to the label map


class MonaiBundlePlugin:
    """An :class:`plugin.contract.AnalysisPlugin` backed by a MONAI bundle folder."""

    info: PluginInfo
    criteria: SeriesCriteria

    def __init__(
        self,
        bundle_dir: Path,
        *,
        device: str | None = None,
        num_threads: int | None = None,
        amp: bool = True,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        try:
            self.manifest: Manifest = load_manifest(self.bundle_dir)
        except PluginError as e:
            raise self._fail(f"manifest: {e}") from e
        self.info = self.manifest.plugin_info()
        self.criteria = self.manifest.series_criteria()
        self.device = self._pick_device(device)
        self.num_threads = num_threads
        self.amp = amp and self.device.type == "cuda"
        with _quiet_monai():
            self._build({**self.manifest.overrides, **(overrides or {})})
        logger.info(
            "bundle %s %s ready on %s (dropped: %s)",
            self.info.name,
            self.info.version,
            self.device,
            ", ".join(self.dropped) or "none",
        )

    def _build(self, overrides: dict[str, Any]) -> None:
        """Parse the config and build the bundle's parts (see the module docstring)."""
        parser = self._read_config(overrides)
        self.image_key = str(parser.get("image_key", "image"))
        self.dropped = strip_io_config(parser)
        with bundle_scripts(self.bundle_dir):
            self.preprocessing = self._instantiate(parser, "preprocessing")
            # before the inferer, as the bundle's evaluator has it: the detector's
            # RetinaNetInferer reads the sliding window that detector_ops sets up when it
            # is built, and without one it runs the network on the whole image at once
            self._run_required(parser)
            self.inferer = self._instantiate(parser, "inferer")
            self.postprocessing = self._instantiate(parser, "postprocessing")
            self.network = self._load_network(parser)  # network_def may be in scripts/ too
        self.dropped += _strip_io_objects(self.preprocessing) + _strip_io_objects(
            self.postprocessing
        )
        self.fused_argmax = self.manifest.kind == "segmentation" and fuse_argmax(
            self.postprocessing, PRED_KEY
        )
        self.labels = self._label_specs(parser)

    # -- loading --------------------------------------------------------------------

    def _fail(self, reason: str) -> PluginError:
        return PluginError(f"MONAI bundle {self.bundle_dir.name!r} ({self.bundle_dir}): {reason}")

    def _pick_device(self, device: str | None) -> torch.device:
        try:
            chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise self._fail(f"invalid device {device!r}: {e}") from e
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise self._fail(f"device {device!r} requested but CUDA is not available")
        return chosen

    def _read_config(self, overrides: dict[str, Any]) -> ConfigParser:
        configs = self.bundle_dir / "configs"
        found = [configs / f"inference.{ext}" for ext in ("json", "yaml", "yml")]
        config_file = next((f for f in found if f.is_file()), None)
        if config_file is None:
            raise self._fail("configs/inference.json not found")
        parser = ConfigParser()
        self._read(parser.read_config, config_file)
        if (configs / "metadata.json").is_file():
            self._read(parser.read_meta, configs / "metadata.json")
        if not isinstance(parser.get(), dict):
            raise self._fail(f"{config_file.name} must hold a mapping")
        missing = [key for key in REQUIRED_KEYS if key not in parser]
        if missing:
            raise self._fail(f"{config_file.name} lacks required key(s): {', '.join(missing)}")
        channels = parser.get(f"{parser.meta_key}#network_data_format#inputs#image#num_channels")
        if channels not in (None, 1):
            raise self._fail(f"metadata.json: the network expects {channels} input channels, not 1")
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = f"$torch.device({str(self.device)!r})"
        if self.device.type == "cpu" and "inferer#device" in parser:
            # never a GPU the site did not choose (bundles say "cuda if available"); on a
            # GPU the bundle's own choice stands (some stitch large outputs on the CPU)
            parser["inferer#device"] = "@device"
        try:
            apply_overrides(parser, overrides)
            check_requirements(self.manifest.requires or ())
            check_scripts(parser, self.bundle_dir, ("preprocessing", "inferer", "postprocessing",
                                                    "network_def", "evaluator#_requires_"))
        except BundleConfigError as e:
            raise self._fail(str(e)) from e
        absent = missing_packages(metadata_packages(parser))
        if absent:
            logger.warning("bundle %s: metadata.json lists %s, not installed here; the node runs "
                           "no evaluator or handlers, so only transforms that import them would fail",
                           self.bundle_dir.name, ", ".join(absent))
        return parser

    def _label_specs(self, parser: ConfigParser) -> dict[int, LabelSpec]:
        """The manifest's labels, plus a fallback for each output channel that the bundle's
        ``metadata.json`` names (``channel_def``) and the manifest does not: named as the
        bundle names it, coded (SCT 91723000, "Anatomical structure") as category and type,
        reported as a structure. A bundle update that adds a class then shows up, named,
        instead of being dropped or crashing the job; a warning says which labels lack codes.
        """
        labels = dict(self.manifest.labels)
        if self.manifest.kind != "segmentation" or self.manifest.unlisted_labels == "ignore":
            return labels
        channels = parser.get(f"{parser.meta_key}#network_data_format#outputs#pred#channel_def")
        if not isinstance(channels, dict):
            return labels
        unlisted = {int(k): str(v) for k, v in channels.items() if str(k).isdigit()}
        fallback = sorted(v for v in unlisted if v > 0 and v not in labels)
        for value in fallback:
            labels[value] = LabelSpec(
                name=unlisted[value][:56] or f"Label {value}",
                category=FALLBACK_CODE, type=FALLBACK_CODE, role="structure", color=(128, 128, 128),
            )
        if fallback:
            logger.warning("bundle %s: label(s) %s have no codes in the manifest; reported with "
                           "the fallback code SCT 91723000", self.bundle_dir.name, fallback)
        return labels

    def _run_required(self, parser: ConfigParser) -> None:
        """What the bundle's evaluator requires first (e.g. ``detector_ops``)."""
        try:
            ran = run_required(parser)
        except Exception as e:  # bundle expressions may raise anything; reported
            raise self._fail(f"cannot run the evaluator's '_requires_': {type(e).__name__}: {e}") from e
        if ran:
            logger.debug("bundle %s: ran %s", self.bundle_dir.name, ", ".join(ran))

    def _read(self, read: Callable[[str], None], path: Path) -> None:
        try:
            read(str(path))
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise self._fail(f"cannot parse {path.name}: {e}") from e
        except Exception as e:  # yaml and other loader errors, reported with their type
            raise self._fail(f"cannot parse {path.name}: {type(e).__name__}: {e}") from e

    def _instantiate(self, parser: ConfigParser, key: str) -> Any:
        try:
            return parser.get_parsed_content(key, instantiate=True)
        except Exception as e:  # bundle code may raise anything; reported, never swallowed
            raise self._fail(f"cannot build {key!r}: {type(e).__name__}: {e}") from e

    def _weights(self, parser: ConfigParser) -> Path:
        """The checkpoint the bundle's own ``checkpointloader`` loads (e.g. the whole-body
        bundle's ``model_lowres.pt`` when ``highres`` is off), else ``models/model.pt``."""
        if "checkpointloader#load_path" in parser:
            try:
                return Path(str(parser.get_parsed_content("checkpointloader#load_path")))
            except Exception as e:  # a bundle expression; reported with its cause
                raise self._fail(f"cannot evaluate checkpointloader#load_path: {e}") from e
        return self.bundle_dir / "models" / "model.pt"

    def _load_network(self, parser: ConfigParser) -> torch.nn.Module:
        models = self.bundle_dir / "models"
        weights = self._weights(parser)
        if weights.is_file():
            network = self._instantiate(parser, "network_def")
            if not isinstance(network, torch.nn.Module):
                raise self._fail(f"network_def is a {type(network).__name__}, not a torch module")
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                network.load_state_dict(_unwrap_state_dict(state), strict=True)
            except (RuntimeError, ValueError, OSError, KeyError, TypeError) as e:
                raise self._fail(f"{weights.name} does not load into network_def: {e}") from e
        elif (models / "model.ts").is_file():
            try:
                load_script: Any = torch.jit.load
                network = load_script(str(models / "model.ts"), map_location="cpu")
            except (RuntimeError, ValueError, OSError) as e:
                raise self._fail(f"models/model.ts is not a loadable TorchScript model: {e}") from e
        else:
            shown = weights.relative_to(self.bundle_dir) if weights.is_relative_to(self.bundle_dir) else weights
            raise self._fail(
                f"no weights: expected {shown}"
                " or models/model.ts (download the bundle's weights into models/)"
            )
        return cast(torch.nn.Module, network.to(self.device).eval())

    # -- analysis -------------------------------------------------------------------

    def analyse(self, volume: Volume) -> Findings:
        """Run the bundle on ``volume`` and measure the findings on its source grid."""
        image = volume.image
        if not isinstance(image, MetaTensor) or image.ndim != 4 or image.shape[0] != 1:
            raise self._fail(
                f"expected a MetaTensor (1, X, Y, Z), got {getattr(image, 'shape', None)}"
            )
        if self.manifest.kind == "detection":
            self._check_axial(volume)  # before minutes of network, not after
        started = time.monotonic()
        timings: dict[str, float] = {}
        with self._threads(), torch.inference_mode():
            data = self._run(image, timings)
        mark = time.monotonic()
        if self.manifest.kind == "detection":
            findings = self._detections(data, volume)
        else:
            findings = self._segmentation(data.pop(PRED_KEY), volume)
            assign_scores(findings, data.pop(SCORES_KEY, None) or [], np.asarray(volume.image.affine))
        del data  # the findings replace the (float) prediction
        timings["measure"] = time.monotonic() - mark
        findings.timings = timings
        logger.info(
            "study %s series %s: %s found %d finding(s) in %.1f s",
            volume.study_instance_uid,
            volume.series_instance_uid,
            self.info.name,
            findings.count,
            time.monotonic() - started,
        )
        return findings

    def _segmentation(self, pred: Any, volume: Volume) -> Findings:
        """Measure the label map on the source grid."""
        labels = self._label_map(pred, volume.image)
        del pred  # the label map replaces the (float) prediction before measuring
        hu = _numpy(volume.image.as_tensor()[0]).astype(np.float32, copy=False)
        findings = measure_findings(
            labels,
            hu,
            volume.lps_affine(),
            self.labels,
            procedure=self.manifest.procedure_code(),
        )
        findings.looked_for = self._looked_for()
        return findings

    def _detections(self, data: dict[str, Any], volume: Volume) -> Findings:
        """The postprocessed boxes as findings on the source grid (see :mod:`plugin.boxes`)."""
        keys = self._box_keys()
        missing = [key for key in keys if key not in data]
        if missing:
            raise self._fail(f"postprocessing returned no {', '.join(map(repr, missing))} (detection)")
        box, label, score = (_numpy(torch.as_tensor(data[key])) for key in keys)
        spec = self.manifest.detection
        try:
            found = detections_from_boxes(
                to_lps_cccwhd(box, spec.box_mode, spec.box_coordinates), label, score,
                volume.lps_affine(), volume.shape, self.manifest.labels,
                score_threshold=spec.score_threshold, max_findings=spec.max_findings,
            )
        except ValueError as e:
            raise self._fail(f"detection output: {e}") from e
        summary = ", ".join(f"{d.name} {d.long_axis_mm:.0f} mm (score {d.score:.2f})" for d in found)
        clipped = [d.name for d in found if d.clipped]
        if clipped:
            summary += f". Outline cut at the image edge: {', '.join(clipped)}"
        if found:  # a reader must not take a box's side for a measured diameter
            summary += ". Sizes are the sides of each detection box, not measured outlines."
        return Findings(label_map=None, findings=[], detections=found,
                        procedure=self.manifest.procedure_code(), summary=summary,
                        looked_for=self._looked_for())

    def _check_axial(self, volume: Volume) -> None:
        """Boxes are axis-aligned in the world: refuse a grid tilted away from it."""
        tilt = _tilt_degrees(volume.lps_affine())
        if tilt > MAX_DETECTION_TILT_DEGREES:
            raise self._fail(
                f"boxes need an axial series whose rows, columns and slices run along the patient "
                f"axes; this one is tilted by {tilt:.1f} degrees (an oblique, coronal or sagittal "
                "series), where an axis-aligned world box is not the detector's box"
            )

    def _looked_for(self) -> Code | None:
        """The one finding type the manifest names, if it names one (e.g. Nodule)."""
        types = {spec.type.code() for spec in self.manifest.labels.values()}
        return types.pop() if len(types) == 1 else None

    def _box_keys(self) -> tuple[str, str, str]:
        """Box, label and score keys: the detector's own (``set_target_keys``)."""
        detector = getattr(self.inferer, "detector", None)
        box = str(getattr(detector, "target_box_key", "box"))
        label = str(getattr(detector, "target_label_key", "label"))
        return box, label, str(getattr(detector, "pred_score_key", f"{label}_scores"))

    def _run(self, image: MetaTensor, timings: dict[str, float]) -> dict[str, Any]:
        """Preprocessing, inferer and postprocessing; their durations go to ``timings``.
        Returns the postprocessed data: ``pred`` holds a segmentation's prediction; a
        detector's boxes, labels and scores are under its own keys."""
        try:
            mark = time.monotonic()
            data = self.preprocessing({self.image_key: self._input(image)})
            self._synchronize()
            timings["preprocessing"] = time.monotonic() - mark
            if not isinstance(data, dict) or self.image_key not in data:
                raise self._fail("preprocessing must return one dict holding the image")
            x = data[self.image_key]
            plain = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
            batch = plain.unsqueeze(0).to(self.device)
            mark = time.monotonic()
            with self._autocast():
                out = self.inferer(batch, self.network)
            self._synchronize()
            timings["inference"] = time.monotonic() - mark
            mark = time.monotonic()  # the fused argmax (if any) counts as postprocessing
            data.update(self._prediction(out, x))
            data = self.postprocessing(data)
            timings["postprocessing"] = time.monotonic() - mark
        except PluginError:
            raise
        except Exception as e:  # bundle transforms may raise anything; reported with the cause
            raise self._fail(f"inference failed: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict) or (self.manifest.kind == "segmentation" and PRED_KEY not in data):
            raise self._fail(f"postprocessing did not return a dict with {PRED_KEY!r}")
        return data

    def _prediction(self, out: Any, x: Any) -> dict[str, Any]:
        """The inferer's output for the postprocessing: ``{"pred": tensor}`` for a
        segmentation; a detector's first (only) result dict of boxes, labels, scores."""
        if self.manifest.kind == "detection":
            first = out[0] if isinstance(out, (list, tuple)) and out else out
            if not isinstance(first, dict):
                raise self._fail(f"the detector returned a {type(out).__name__}, not boxes")
            label_key = self._box_keys()[1]  # class indices stay integers, the rest float
            return {key: value.detach() if key == label_key else value.detach().float()
                    for key, value in first.items()}
        if not isinstance(out, torch.Tensor):
            raise self._fail(f"the inferer returned a {type(out).__name__}, not a tensor")
        if self.fused_argmax:  # on the device: one channel, not all of them, reaches the host
            out = argmax_channels(out)
        pred = out[0].float()
        return {PRED_KEY: MetaTensor(pred, meta=dict(x.meta)) if isinstance(x, MetaTensor) else pred}

    def _input(self, image: MetaTensor) -> MetaTensor:
        """What the preprocessing gets: the volume itself when its first transform
        declares that it makes a new C-ordered copy (``copies_input``, e.g.
        :class:`plugin.transforms.OrientCopyd`), else a C-ordered working copy."""
        transforms = getattr(self.preprocessing, "transforms", None)
        first = transforms[0] if isinstance(transforms, (list, tuple)) and transforms else None
        if getattr(first, "copies_input", False) is True:
            return image
        return _working_copy(image)

    def _label_map(self, pred: Any, image: MetaTensor) -> np.ndarray:
        """The prediction as an integer label map on the source grid.

        Converted slab by slab into the smallest unsigned type that holds the labels,
        so no full-size float copy of the prediction is made.
        """
        spatial = tuple(image.shape[1:])
        tensor = torch.as_tensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred).detach().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tuple(tensor.shape) != spatial:
            expected = ", ".join(map(str, spatial))
            raise self._fail(
                f"output {PRED_KEY!r} has shape {tuple(np.shape(pred))}, expected (1, {expected})"
                " on the source grid (does the postprocessing invert the preprocessing"
                " with Invertd?)"
            )
        if isinstance(pred, MetaTensor):
            found, source = (_numpy(t.affine) for t in (pred, image))
            delta = float(np.abs(found - source).max())
            if delta > AFFINE_TOLERANCE_MM:
                raise self._fail(f"output affine differs from the source affine by {delta:.4g}")
        return self._integer_labels(tensor)

    def _integer_labels(self, tensor: torch.Tensor) -> np.ndarray:
        low, high = (float(v) for v in torch.aminmax(tensor.float() if tensor.dtype == torch.bool else tensor))
        if low < 0:
            raise self._fail("postprocessing must produce a non-negative integer label map")
        dtype = np.uint8 if high < 256 else np.uint16 if high < 65536 else np.int32
        out = np.empty(tuple(tensor.shape), dtype=dtype)
        # Slabs across the outermost axis in memory, so that each slab is one block.
        axis = max(range(tensor.ndim), key=lambda a: (tensor.stride(a), -a))
        step = max(1, LABEL_SLAB_VOXELS // max(1, tensor.numel() // max(1, tensor.shape[axis])))
        for start in range(0, tensor.shape[axis], step):
            slab = tensor.narrow(axis, start, min(step, tensor.shape[axis] - start))
            if slab.is_floating_point():
                rounded = torch.round(slab)
                if not torch.equal(rounded, slab):
                    raise self._fail("postprocessing must produce a non-negative integer label map")
                slab = rounded
            index = (slice(None),) * axis + (slice(start, start + slab.shape[axis]),)
            out[index] = slab.numpy().astype(dtype, copy=False)
        return out

    def _synchronize(self) -> None:
        """Wait for the device's queued work, so that each stage's time is its own
        (CUDA runs asynchronously: unsynchronised, the network's time shows up in the
        next stage that reads its output)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm_up(self) -> None:
        """On CUDA, run the network once on a zero input of its sliding window's size
        (the bundle's ``roi_size``), so that CUDA's start-up and kernel selection are paid
        here, at worker start, and not by the first study. Nothing to do on the CPU."""
        if self.device.type != "cuda":
            return
        roi = _window_size(self.inferer)
        if roi is None:
            logger.info("%s: no sliding window size known; CUDA warms up in the first job", self.info.name)
            return
        started = time.monotonic()
        try:
            with self._threads(), torch.inference_mode(), self._autocast():
                self.network(torch.zeros((1, _in_channels(self.network), *roi), device=self.device))
            self._synchronize()
        except Exception as e:  # a warm-up is an optimisation: the first job pays instead
            logger.warning("%s: CUDA warm-up failed (%s: %s); the first job pays it", self.info.name,
                           type(e).__name__, e)
            return
        logger.info("%s: CUDA warmed up on %s in %.1f s", self.info.name, self.device, time.monotonic() - started)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Limit CPU threads to this process's cores (or ``num_threads``) while running."""
        previous = torch.get_num_threads()
        wanted = self.num_threads or min(previous, len(os.sched_getaffinity(0)))
        torch.set_num_threads(max(1, wanted))
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def _window_size(inferer: Any) -> tuple[int, ...] | None:
    """The sliding window's ``roi_size`` of a bundle's inferer, or of a detector's own
    sliding-window inferer; None when there is none."""
    for candidate in (inferer, getattr(getattr(inferer, "detector", None), "inferer", None)):
        roi = getattr(candidate, "roi_size", None)
        if roi is not None and len(roi) and all(int(r) > 0 for r in roi):
            return tuple(int(r) for r in roi)
    return None


def _in_channels(network: torch.nn.Module) -> int:
    """Input channels of ``network``: its first convolution's (1 when it has none)."""
    first = next((m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 1


def _tilt_degrees(lps_affine: np.ndarray) -> float:
    """How far (degrees) the volume's axes are from the patient axes, each allowed to be
    any of them either way round: 0 for an axial stack, 90 for none at all."""
    directions = np.asarray(lps_affine, dtype=np.float64)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    worst = float(np.abs(directions).max(axis=0).min())
    return float(np.degrees(np.arccos(np.clip(worst, -1.0, 1.0))))


@contextlib.contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI's deprecation notices about a bundle's config (e.g. "optional_packages_version"
    renamed, a changed default of Orientationd) go to the debug log, not to the admin's
    terminal: they concern the bundle's authors, and the bundle runs as it is."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        warnings.filterwarnings("always", category=FutureWarning)
        warnings.filterwarnings("always", category=UserWarning, module=r"monai\.")
        yield
    for warning in caught:
        if issubclass(warning.category, (DeprecationWarning, FutureWarning)) or warning.filename.find("monai") >= 0:
            logger.debug("bundle config: %s", warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _working_copy(image: MetaTensor) -> MetaTensor:
    """A float32 copy of ``image`` (1, X, Y, Z) in C order (Z varies fastest).

    The node's volume is a transposed view of a slice-ordered buffer (as ITKReader's).
    Torch reduces and resamples that layout several times slower than a C-ordered one
    (MONAI's ``CropForegroundd`` took 1.1 s instead of 0.2 s on a 512x512x300 CT), and
    ``Tensor.contiguous`` transposes it slowly, so the copy is made slice by slice.
    """
    source = image.as_tensor().detach()
    if source.device.type != "cpu" or source.is_contiguous() or source.ndim != 4:
        copy = source.clone(memory_format=torch.contiguous_format).float()
    else:
        array = source.numpy()
        # torch's allocator, not numpy's: numpy asks for transparent huge pages, and
        # their first touch in this strided order cost 0.5-0.7 s more per job here.
        copy = torch.empty(tuple(source.shape), dtype=torch.float32)
        out = copy.numpy()
        for z in range(array.shape[-1]):
            out[..., z] = array[..., z]
    meta = dict(image.meta)
    meta["affine"] = image.affine.clone()
    return MetaTensor(copy, meta=meta, applied_operations=list(image.applied_operations))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy or view of ``tensor`` (MetaTensor or plain)."""
    plain = tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor
    return np.asarray(plain.detach().cpu().numpy())


def _strip_io_objects(transform: Any) -> list[str]:
    """Safety net for compositions built by expressions: drop instances in place."""
    items = getattr(transform, "transforms", None)
    if not isinstance(items, (list, tuple)):
        return []
    dropped = [type(t).__name__ for t in items if isinstance(t, _DROPPED_TYPES)]
    kept = tuple(t for t in items if not isinstance(t, _DROPPED_TYPES))
    if dropped:
        transform.transforms = kept
    for t in kept:
        dropped += _strip_io_objects(t)
    return dropped


def _unwrap_state_dict(state: Any) -> dict[str, torch.Tensor]:
    """A plain state dict from a checkpoint that may wrap it (``{"model": ...}`` etc.)."""
    for key in ("model", "state_dict", "network", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return cast(dict[str, torch.Tensor], state)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise PluginError(f"bundle_package {package!r} is not an importable package")
    return Path(locations[0])


def create(**options: Any) -> MonaiBundlePlugin:
    """Entry-point factory. Options: ``bundle_dir`` (or ``bundle_package``, a package
    holding the bundle, e.g. ``"models.lung_nodules"``), ``device``, ``num_threads``,
    ``amp`` and ``overrides`` (bundle config values, over the manifest's)."""
    allowed = {"bundle_dir", "bundle_package", "device", "num_threads", "amp", "overrides"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise PluginError(f"monai_bundle: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    if ("bundle_dir" in options) == ("bundle_package" in options):
        raise PluginError(
            "monai_bundle: give exactly one of the options 'bundle_dir' or 'bundle_package'"
        )
    if "bundle_package" in options:
        bundle_dir = _package_dir(str(options["bundle_package"]))
    else:
        bundle_dir = Path(options["bundle_dir"])
    if not bundle_dir.is_dir():
        raise PluginError(f"monai_bundle: bundle_dir {str(bundle_dir)!r} is not a folder")
    return MonaiBundlePlugin(
        bundle_dir,
        device=options.get("device"),
        num_threads=options.get("num_threads"),
        amp=bool(options.get("amp", True)),
        overrides=_overrides(options.get("overrides")),
    )


def _overrides(value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise PluginError(f"monai_bundle: option 'overrides' must be a mapping, not {type(value).__name__}")
    return value
