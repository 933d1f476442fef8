"""Logging set-up: third-party INFO chatter stays out of the node's log unless DEBUG."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from dicom_node.logs import THIRD_PARTY_QUIET, setup_logging


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in (*THIRD_PARTY_QUIET, "pynetdicom")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
    logging.captureWarnings(False)


def test_highdicom_info_is_kept_out_at_info(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    logging.getLogger("highdicom.base").info("copy attributes of module General Study")
    logging.getLogger("monai.bundle").info("bundle step")
    logging.getLogger("dicom_node.pipeline").info("job done")

    err = capsys.readouterr().err
    assert "job done" in err and "copy attributes" not in err and "bundle step" not in err


def test_debug_shows_them(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG")
    logging.getLogger("highdicom.base").info("copy attributes of module General Study")

    assert "copy attributes" in capsys.readouterr().err
