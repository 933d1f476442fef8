"""Guards on the library internals the node leans on: the pins in pyproject.toml agree
with what the code checks, and the listener's fallback for another pynetdicom serves,
says loudly what it lacks, and loses nothing."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import highdicom as hd
import pynetdicom
import pytest
from packaging.requirements import Requirement
from pydicom import dcmread
from pynetdicom.ae import ApplicationEntity
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.receive import reactor
from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.support import start_node

ROOT = Path(__file__).resolve().parents[1]


def _requirement(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    assert len(found) == 1, f"pyproject.toml names {name} {len(found)} times"
    return found[0]


@pytest.mark.parametrize("version", ["3.0.0", "3.0.4", "3.0.99", "3.1.0", "3.2.1", "4.0.0", "2.9.0"])
def test_pynetdicom_pin_admits_exactly_what_the_reactor_mirrors(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", version)
    assert _requirement("pynetdicom").specifier.contains(version) == reactor.supported()


def test_installed_libraries_are_inside_their_pins() -> None:
    assert _requirement("pynetdicom").specifier.contains(pynetdicom.__version__)
    assert _requirement("highdicom").specifier.contains(hd.__version__)
    assert reactor.supported()


def test_highdicom_keeps_the_sr_content_attribute_the_sr_encoder_sets() -> None:
    """results/sr.py replaces ``_content`` of highdicom's SR (the attribute highdicom's own
    ``content`` property returns): a release that renamed it would leave the report's
    findings out, so the pin stops below the next minor release and this fails first."""
    import inspect

    from dicom_node.results import sr as sr_module

    assert "sr._content = " in inspect.getsource(sr_module)
    assert "return self._content" in inspect.getsource(hd.sr.Comprehensive3DSR.content.fget)


def test_another_pynetdicom_falls_back_to_one_process_that_serves_and_warns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The fallback (pynetdicom's own server, one process) accepts C-ECHO and C-STORE, keeps
    what it acknowledged, and says at start which protections are off."""
    monkeypatch.setattr(reactor, "supported", lambda: False)
    caplog.set_level(logging.WARNING, logger="dicom_node")
    node = start_node(tmp_path, node={"listener_processes": 2})
    try:
        assert node.acceptors is None and node.scp is not None, "expected the one-process fallback"
        warned = [r.getMessage() for r in caplog.records if "WITHOUT the PDU-size guard" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert "3.0 series" in warned[0]
        paths = write_ct_series(simple_ct_volume(4, 32, 32), tmp_path / "ct")
        ae = ApplicationEntity(ae_title="FALLBACK")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0x0000
            statuses = [assoc.send_c_store(dcmread(p)).Status for p in paths]
        finally:
            assoc.release()
        assert statuses == [0x0000] * len(paths)
        spooled = {p.stem for p in node.spool.root.rglob("*.dcm")}
        assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths} <= spooled
    finally:
        node.stop()
