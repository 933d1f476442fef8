"""MONAI Model Zoo bundles for the benchmarks, built once under ``bench/out/bundles/``.

The real weights are not in the repository (and cannot be downloaded here), so each
bundle is assembled as the tests do (``tests/test_detection_bundle.py`` and
``tests/test_wholebody_bundle.py``, ``make_bundle``):

* ``configs/`` (and ``scripts/`` where the bundle has one) copied unchanged from
  ``tests/fixtures/monai_bundles/<name>/``;
* ``manifest.yaml`` copied unchanged from ``config/bundles/<name>/`` (the shipped one:
  its overrides, series criteria and score threshold, nothing lowered for the bench);
* the bundle's own ``network_def`` with seeded random weights (no bias of any kind),
  saved where the bundle's ``checkpointloader`` loads them with the manifest's
  overrides applied: ``models/model.pt`` for both bundles in their default
  (high-resolution) configuration.

Random weights cost what the real ones cost (same network, same shapes, same sliding
window), so timings and memory are real; what they find is not. A ``bench-bundle.json``
marker (written last) records the inputs' digest; a bundle whose inputs changed, or
whose build was interrupted, is built again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.common import OUT, REPO

FIXTURES = REPO / "tests" / "fixtures" / "monai_bundles"
MANIFESTS = REPO / "config" / "bundles"
BUNDLES = OUT / "bundles"
MARKER = "bench-bundle.json"
# seeds as in the tests' make_bundle (detector 7, whole body 3)
SEEDS = {"lung_nodule_ct_detection": 7, "wholeBody_ct_segmentation": 3}
BUILD_VERSION = 1  # bump when the way a bundle is built changes


def names() -> list[str]:
    """The bundles the benchmarks can build."""
    return sorted(SEEDS)


def _sources(name: str) -> list[Path]:
    fixture = FIXTURES / name
    files = [p for sub in ("configs", "scripts") for p in sorted((fixture / sub).rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts]
    return [*files, MANIFESTS / name / "manifest.yaml"]


def _digest(name: str) -> str:
    h = hashlib.sha256(f"{name} seed={SEEDS[name]} v={BUILD_VERSION}".encode())
    for path in _sources(name):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _weights_path(bundle: Path, overrides: dict[str, Any]) -> Path:
    """Where the bundle's ``checkpointloader`` loads from (``models/model.pt`` by default)."""
    from monai.bundle.config_parser import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    if "checkpointloader#load_path" not in parser:
        return bundle / "models" / "model.pt"
    return Path(str(parser.get_parsed_content("checkpointloader#load_path")))


def _build(name: str, target: Path) -> None:
    import torch
    from monai.bundle.config_parser import ConfigParser

    fixture = FIXTURES / name
    shutil.copytree(fixture / "configs", target / "configs")
    if (fixture / "scripts").is_dir():
        shutil.copytree(fixture / "scripts", target / "scripts",
                        ignore=shutil.ignore_patterns("__pycache__"))
    manifest_text = (MANIFESTS / name / "manifest.yaml").read_text()
    (target / "manifest.yaml").write_text(manifest_text)
    overrides = dict(yaml.safe_load(manifest_text).get("overrides") or {})
    weights = _weights_path(target, overrides)
    parser = ConfigParser()
    parser.read_config(str(target / "configs" / "inference.json"))
    torch.manual_seed(SEEDS[name])
    network = parser.get_parsed_content("network_def")
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), weights)
    params = sum(p.numel() for p in network.parameters())
    (target / MARKER).write_text(json.dumps({
        "name": name, "digest": _digest(name), "seed": SEEDS[name], "weights": str(weights.relative_to(target)),
        "parameters": params, "note": "random weights: real cost, meaningless findings",
    }, indent=1))


def bundle_dir(name: str) -> Path:
    """``bench/out/bundles/<name>``, built now if missing or stale."""
    if name not in SEEDS:
        raise ValueError(f"unknown bundle {name!r}; known: {', '.join(names())}")
    folder = BUNDLES / name
    marker = folder / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("digest") == _digest(name):
                return folder
        except ValueError:
            pass
    print(f"building the bench bundle {name} (random weights) in {folder} ...", file=sys.stderr)
    BUNDLES.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=BUNDLES))
    try:
        # built under its final name's parent so that torch.save and the load path agree
        target = staging / name
        target.mkdir()
        _build(name, target)
        shutil.rmtree(folder, ignore_errors=True)
        target.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def info(name: str) -> dict[str, Any]:
    """The marker of a built bundle (seed, weights path, parameter count)."""
    return dict(json.loads((bundle_dir(name) / MARKER).read_text()))


if __name__ == "__main__":
    for bundle in sys.argv[1:] or names():
        print(bundle_dir(bundle), info(bundle))
