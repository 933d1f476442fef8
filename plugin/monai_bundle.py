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

from dicom_node.errors import PluginError
from plugin.manifest import Manifest, load_manifest
from plugin.measure import measure_findings
from plugin.types import Findings, PluginInfo, SeriesCriteria, Volume

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("network_def", "preprocessing", "inferer", "postprocessing")
DROPPED_TARGETS = frozenset(
    name + suffix
    for name in ("LoadImage", "SaveImage", "EnsureChannelFirst")
    for suffix in ("", "d", "D", "Dict")
)
_DROPPED_TYPES = (
    LoadImage,
    LoadImaged,
    SaveImage,
    SaveImaged,
    EnsureChannelFirst,
    EnsureChannelFirstd,
)
PRED_KEY = "pred"
AFFINE_TOLERANCE_MM = 1e-3
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
        parser = self._read_config()
        self.image_key = str(parser.get("image_key", "image"))
        self.dropped = _strip_io_config(parser)
        self.preprocessing = self._instantiate(parser, "preprocessing")
        self.inferer = self._instantiate(parser, "inferer")
        self.postprocessing = self._instantiate(parser, "postprocessing")
        self.dropped += _strip_io_objects(self.preprocessing) + _strip_io_objects(
            self.postprocessing
        )
        self.network = self._load_network(parser)
        logger.info(
            "bundle %s %s ready on %s (dropped: %s)",
            self.info.name,
            self.info.version,
            self.device,
            ", ".join(self.dropped) or "none",
        )

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

    def _read_config(self) -> ConfigParser:
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
        return parser

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

    def _load_network(self, parser: ConfigParser) -> torch.nn.Module:
        models = self.bundle_dir / "models"
        if (models / "model.pt").is_file():
            network = self._instantiate(parser, "network_def")
            if not isinstance(network, torch.nn.Module):
                raise self._fail(f"network_def is a {type(network).__name__}, not a torch module")
            try:
                state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
                network.load_state_dict(_unwrap_state_dict(state), strict=True)
            except (RuntimeError, ValueError, OSError, KeyError, TypeError) as e:
                raise self._fail(f"models/model.pt does not load into network_def: {e}") from e
        elif (models / "model.ts").is_file():
            try:
                load_script: Any = torch.jit.load
                network = load_script(str(models / "model.ts"), map_location="cpu")
            except (RuntimeError, ValueError, OSError) as e:
                raise self._fail(f"models/model.ts is not a loadable TorchScript model: {e}") from e
        else:
            raise self._fail("no weights: expected models/model.pt or models/model.ts")
        return cast(torch.nn.Module, network.to(self.device).eval())

    # -- analysis -------------------------------------------------------------------

    def analyse(self, volume: Volume) -> Findings:
        """Run the bundle on ``volume`` and measure the findings on its source grid."""
        image = volume.image
        if not isinstance(image, MetaTensor) or image.ndim != 4 or image.shape[0] != 1:
            raise self._fail(
                f"expected a MetaTensor (1, X, Y, Z), got {getattr(image, 'shape', None)}"
            )
        started = time.monotonic()
        timings: dict[str, float] = {}
        with self._threads(), torch.inference_mode():
            pred = self._run(image, timings)
        mark = time.monotonic()
        labels = self._label_map(pred, image)
        del pred  # the label map replaces the (float) prediction before measuring
        hu = _numpy(image.as_tensor()[0]).astype(np.float32, copy=False)
        findings = measure_findings(
            labels,
            hu,
            volume.lps_affine(),
            self.manifest.labels,
            procedure=self.manifest.procedure_code(),
        )
        timings["measure"] = time.monotonic() - mark
        findings.timings = timings
        logger.info(
            "study %s series %s: %s found %d finding(s) in %.1f s",
            volume.study_instance_uid,
            volume.series_instance_uid,
            self.info.name,
            len(findings.findings),
            time.monotonic() - started,
        )
        return findings

    def _run(self, image: MetaTensor, timings: dict[str, float]) -> Any:
        """Preprocessing, inferer and postprocessing; their durations go to ``timings``."""
        try:
            mark = time.monotonic()
            data = self.preprocessing({self.image_key: self._input(image)})
            timings["preprocessing"] = time.monotonic() - mark
            if not isinstance(data, dict) or self.image_key not in data:
                raise self._fail("preprocessing must return one dict holding the image")
            x = data[self.image_key]
            plain = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
            batch = plain.unsqueeze(0).to(self.device)
            mark = time.monotonic()
            with self._autocast():
                out = self.inferer(batch, self.network)
            timings["inference"] = time.monotonic() - mark
            if not isinstance(out, torch.Tensor):
                raise self._fail(f"the inferer returned a {type(out).__name__}, not a tensor")
            pred = out[0].float()
            data[PRED_KEY] = (
                MetaTensor(pred, meta=dict(x.meta)) if isinstance(x, MetaTensor) else pred
            )
            mark = time.monotonic()
            data = self.postprocessing(data)
            timings["postprocessing"] = time.monotonic() - mark
        except PluginError:
            raise
        except Exception as e:  # bundle transforms may raise anything; reported with the cause
            raise self._fail(f"inference failed: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict) or PRED_KEY not in data:
            raise self._fail(f"postprocessing did not return a dict with {PRED_KEY!r}")
        return data[PRED_KEY]

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


def _is_dropped(item: Any) -> bool:
    target = item.get("_target_") if isinstance(item, dict) else None
    return isinstance(target, str) and target.rsplit(".", 1)[-1] in DROPPED_TARGETS


def _strip_io_config(parser: ConfigParser) -> list[str]:
    """Remove dropped transforms from the transform lists of pre- and postprocessing."""
    dropped: list[str] = []
    for key in ("preprocessing", "postprocessing"):
        node = parser[key]
        if not isinstance(node, dict):
            continue
        list_id = f"{key}#transforms"
        ref = node.get("transforms")
        if isinstance(ref, str) and ref.startswith("@") and isinstance(parser.get(ref[1:]), list):
            list_id = ref[1:]
        items = parser.get(list_id)
        if isinstance(items, list):
            dropped += [str(t["_target_"]) for t in items if _is_dropped(t)]
            parser[list_id] = [t for t in items if not _is_dropped(t)]
    return dropped


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
    ``amp``."""
    allowed = {"bundle_dir", "bundle_package", "device", "num_threads", "amp"}
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
    )
