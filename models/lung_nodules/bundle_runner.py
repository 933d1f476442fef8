"""Run this bundle in memory, the way the generic MONAI bundle plugin does.

``configs/inference.json`` is parsed with :class:`monai.bundle.ConfigParser`; the file
transforms (``LoadImage(d)``, ``EnsureChannelFirst(d)``, ``SaveImage(d)``) are dropped,
``models/model.pt`` (a state_dict) is loaded into ``network_def`` and the bundle's own
preprocessing, inferer and postprocessing run on ``{"image": MetaTensor (1, X, Y, Z)}``.
Used by ``train.py`` (to preprocess training data exactly as at inference),
``evaluate.py`` and the model regression test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

BUNDLE_ROOT = Path(__file__).resolve().parent
FILE_TRANSFORMS = (
    "LoadImage",
    "LoadImaged",
    "EnsureChannelFirst",
    "EnsureChannelFirstd",
    "SaveImage",
    "SaveImaged",
)


def _without_file_transforms(section: dict[str, Any]) -> dict[str, Any]:
    keep = [
        t for t in section["transforms"] if t.get("_target_") not in FILE_TRANSFORMS
    ]
    return {**section, "transforms": keep}


def load_parser(bundle_root: Path = BUNDLE_ROOT) -> ConfigParser:
    """The bundle's inference config with the file transforms removed."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_root)
    parser["device"] = "$torch.device('cpu')"
    for key in ("preprocessing", "postprocessing"):
        parser[key] = _without_file_transforms(parser[key])
    return parser


def make_metatensor(image_xyz: np.ndarray, ras_affine: np.ndarray) -> MetaTensor:
    """A (1, X, Y, Z) float32 MetaTensor with an RAS affine, as the node builds it."""
    data = torch.from_numpy(np.ascontiguousarray(image_xyz, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(ras_affine, dtype=torch.float64))


class BundleRunner:
    """Preprocessing, network, inferer and postprocessing of the bundle, in memory."""

    def __init__(
        self, bundle_root: Path = BUNDLE_ROOT, weights: Path | None = None
    ) -> None:
        self.parser = load_parser(bundle_root)
        self.preprocessing = self.parser.get_parsed_content("preprocessing")
        self.postprocessing = self.parser.get_parsed_content("postprocessing")
        self.inferer = self.parser.get_parsed_content("inferer")
        self.network = self.parser.get_parsed_content("network")
        path = weights or bundle_root / "models" / "model.pt"
        self.network.load_state_dict(
            torch.load(path, map_location="cpu", weights_only=True)
        )
        self.network.eval()

    def __call__(self, image: MetaTensor) -> np.ndarray:
        """Label map (X, Y, Z) uint8 on the grid of ``image``."""
        data = self.preprocessing({"image": image})
        # postprocessing too: its in-place sigmoid may not touch an inference tensor outside
        # inference mode (the plugin runs both in it as well)
        with torch.inference_mode():
            data["pred"] = self.inferer(data["image"][None], self.network)[0]
            data = self.postprocessing(data)
        return np.asarray(data["pred"][0].cpu().numpy(), dtype=np.uint8)
