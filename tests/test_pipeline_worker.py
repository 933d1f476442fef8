"""Analysis worker set-up: numpy's huge-page requests are turned off unless configured;
a plugin's optional warm-up hook runs when the worker loads it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest

from dicom_node import pipeline
from dicom_node.pipeline import _no_numpy_huge_pages

_multiarray = importlib.import_module("numpy._core.multiarray")


@pytest.fixture()
def restore_huge_pages() -> Iterator[None]:
    before = _multiarray._set_madvise_hugepage(True)
    _multiarray._set_madvise_hugepage(before)
    yield
    _multiarray._set_madvise_hugepage(before)


def test_huge_pages_are_turned_off(monkeypatch: pytest.MonkeyPatch, restore_huge_pages: None) -> None:
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    _multiarray._set_madvise_hugepage(True)
    _no_numpy_huge_pages()
    assert _multiarray._set_madvise_hugepage(False) is False


def test_the_environment_variable_wins(monkeypatch: pytest.MonkeyPatch, restore_huge_pages: None) -> None:
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    _multiarray._set_madvise_hugepage(True)
    _no_numpy_huge_pages()
    assert _multiarray._set_madvise_hugepage(True) is True


def test_warm_up_loads_the_plugin_and_runs_its_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "_PLUGINS", {})
    spec = ("dense", "tests.fake_plugins:create", {"threshold": 300})
    assert pipeline.warm_up([spec]) > 0
    plugin = pipeline.get_plugin(*spec)  # the jobs get the instance the warm-up loaded
    assert plugin.warm_ups == 1
