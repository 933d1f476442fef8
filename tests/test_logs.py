"""Logging set-up: third-party INFO chatter stays out of the node's log unless DEBUG."""

from __future__ import annotations

import logging
import time
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


def test_repeated_warnings_are_limited_and_counted(restore_logging: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.logs import RepeatLimiter

    setup_logging("INFO")
    limiter = next(f for f in logging.getLogger().handlers[0].filters if isinstance(f, RepeatLimiter))
    limiter.window_s = 0.5
    log = logging.getLogger("dicom_node.receive.ingest")
    for n in range(500):
        log.warning("C-STORE refused (0x%04X): free disk below the reserve; sop=%d", 0xA700, n)
    log.info("an info line is never limited")
    time.sleep(0.6)  # the limiter's window (0.5 s) passing is what this test is about
    log.warning("C-STORE refused (0x%04X): free disk below the reserve; sop=%d", 0xA700, 500)
    lines = capsys.readouterr().err.splitlines()
    refused = [line for line in lines if "C-STORE refused" in line]
    assert len(refused) == 22, len(refused)  # 20, the one that says so, the one after the window
    assert "more like this are counted, not logged" in refused[20]
    assert "[479 more like this in the previous 0.5 s were not logged]" in refused[21]
    assert any("an info line" in line for line in lines)


def test_control_characters_are_escaped_and_long_messages_cut(restore_logging: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    logging.getLogger("dicom_node.receive.scp").warning("calling=%s", "EVIL\r\nFORGED\x1b[31m")
    logging.getLogger("dicom_node.receive.scp").warning("x" * 5000)
    err = capsys.readouterr().err
    assert "calling=EVIL\\r\\nFORGED\\x1b[31m" in err and "\nFORGED" not in err
    assert "... [3000 more characters]" in err
