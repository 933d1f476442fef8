"""The Storage SCP with real dcmtk peers: echo, store, compression, policy, bad input."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1
from pynetdicom.ae import ApplicationEntity
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage

from dicom_node.node import Node
from phantoms.ct_writer import SeriesLayout, simple_ct_volume, write_ct_series
from tests.support import start_node, DCMTK_ENV, require_tool, storescu


@pytest.fixture(params=[1, 2], ids=["in-process", "2-acceptors"])
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    """A node listening in its own process, and one with two acceptor processes."""
    n = start_node(tmp_path, node={"listener_processes": request.param}, retention={"ignored_days": None})
    yield n
    n.stop()


# For tests that patch or look inside the listener: only the node listening in its own process.
in_process = pytest.mark.parametrize("node", [1], ids=["in-process"], indirect=True)


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _spooled(node: Node) -> dict[str, Path]:
    return {p.stem: p for p in node.spool.root.rglob("*.dcm")}


def test_echoscu(node: Node) -> None:
    require_tool("echoscu")
    result = subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, env=DCMTK_ENV)
    assert result.returncode == 0, result.stderr


def test_storescu_150_slices_bytes_as_sent(node: Node, ct150: list[Path]) -> None:
    result = storescu(node.port, ct150[0].parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("Received Store Response (Success)") == 150
    spooled = _spooled(node)
    assert len(spooled) == 150
    for path in ct150:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert _dataset_bytes(spooled[uid]) == _dataset_bytes(path)
    rows = node.db.query("SELECT COUNT(*) AS n FROM instances")
    assert rows[0]["n"] == 150


def _compressed(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    require_tool("dcmcjpeg")
    plain = write_ct_series(simple_ct_volume(3, 64, 64), tmp_path / "plain")
    j2k = write_ct_series(simple_ct_volume(3, 64, 64), tmp_path / "j2k",
                          layout=SeriesLayout(transfer_syntax=JPEG2000Lossless, series_number=3))
    jll = []
    for i, src in enumerate(plain):
        dst = tmp_path / f"jpegll_{i}.dcm"
        subprocess.run(["dcmcjpeg", "+e1", str(src), str(dst)], check=True, env=DCMTK_ENV)
        jll.append(dst)
    return j2k, jll


def test_compressed_transfer_syntaxes_kept_as_sent(node: Node, tmp_path: Path) -> None:
    j2k, jll = _compressed(tmp_path)
    # -xv / -xs: propose JPEG 2000 lossless / JPEG lossless SV1, so storescu sends them as stored
    for files, option in ((j2k, "-xv"), (jll, "-xs")):
        result = storescu(node.port, files, option)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr.count("Received Store Response (Success)") == len(files)
    files = j2k + jll
    spooled = _spooled(node)
    syntaxes = set()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        stored = spooled[ds.SOPInstanceUID]
        assert dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert _dataset_bytes(stored) == _dataset_bytes(path)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
    assert syntaxes == {JPEG2000Lossless, JPEGLosslessSV1}


def test_wrong_called_ae_rejected(node: Node, ct150: list[Path]) -> None:
    result = storescu(node.port, ct150[:1], called="NOTUS")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr
    assert not _spooled(node)


@pytest.mark.parametrize("allowed, calling, accepted", [
    ([{"ae_title": "PACS"}], "INTRUDER", False),
    ([{"ae_title": "PACS"}], "PACS", True),
    ([{"ae_title": "PACS", "host": "10.1.2.3"}], "PACS", False),
    ([{"ae_title": "PACS", "host": "127.0.0.1"}], "PACS", True),
])
def test_calling_ae_allowlist(tmp_path: Path, ct150: list[Path], allowed: list, calling: str, accepted: bool) -> None:
    n = start_node(tmp_path, security={"allowed_callers": allowed})
    try:
        result = storescu(n.port, ct150[:1], calling=calling)
        if accepted:
            assert result.returncode == 0, result.stderr
        else:
            assert "Calling AE Title Not Recognized" in result.stderr
            assert not _spooled(n)
            audit = [__import__("json").loads(line) for line in n.config.audit_path.read_text().splitlines()]
            rejected = [r for r in audit if r["event"] == "association" and r["outcome"] == "rejected"]
            assert rejected and rejected[0]["reason"] == "calling AE title not recognised"
            assert rejected[0]["calling_ae"] == calling
    finally:
        n.stop()


def _scu_store(port: int, ds: Dataset) -> Dataset:
    ae = ApplicationEntity("TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def _small_ct(**changes: str) -> Dataset:
    path = write_ct_series(simple_ct_volume(1, 16, 16), Path(__import__("tempfile").mkdtemp()))[0]
    ds = dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("changes, status", [
    ({"SOPInstanceUID": "../../../../tmp/evil"}, 0xC000),
    ({"StudyInstanceUID": "../../escape"}, 0xC000),
    ({"SeriesInstanceUID": "1.2.3/../../x"}, 0xC000),
    ({"StudyInstanceUID": "1." + "2" * 70}, 0xC000),
    ({"StudyInstanceUID": None}, 0xA900),
    ({"SeriesInstanceUID": None}, 0xA900),
])
def test_bad_uids_refused_nothing_written(node: Node, changes: dict, status: int) -> None:
    rsp = _scu_store(node.port, _small_ct(**changes))
    assert rsp.Status == status
    assert "ErrorComment" in rsp
    storage = node.config.node.storage_dir.parent
    assert not list(storage.rglob("*evil*")) and not list(storage.rglob("*escape*"))
    assert not _spooled(node)


def test_disk_reserve_answers_out_of_resources(tmp_path: Path, ct150: list[Path]) -> None:
    n = start_node(tmp_path, node={"min_free_disk_mb": 10**9})
    try:
        result = storescu(n.port, ct150[:2])
        assert "Out of Resources" in result.stderr or "OutOfResources" in result.stderr, result.stderr
        assert "Received Store Response (Success)" not in result.stderr
        assert not _spooled(n)
    finally:
        n.stop()


@in_process
def test_write_error_answers_out_of_resources(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_write(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dicom_node.storage.spool.write_to_slot", failing_write)
    rsp = _scu_store(node.port, _small_ct())
    assert rsp.Status == 0xA700
    assert "No space left" in rsp.ErrorComment
    assert not _spooled(node)
    assert all(p.stat().st_size == 0 for p in node.spool.slots.folder.iterdir())


def test_duplicate_sop_instance_is_idempotent(node: Node, ct150: list[Path]) -> None:
    assert storescu(node.port, ct150[:3]).returncode == 0
    first = {p.stem: p.read_bytes() for p in _spooled(node).values()}
    result = storescu(node.port, ct150[:3])
    assert result.stderr.count("Received Store Response (Success)") == 3
    assert {p.stem: p.read_bytes() for p in _spooled(node).values()} == first
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 3
    assert node.db.query("SELECT instance_count FROM studies")[0]["instance_count"] == 3


@in_process
def test_a_resent_study_logs_one_line_with_its_duplicate_count(node: Node, ct150: list[Path],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import time

    assert storescu(node.port, ct150[:5]).returncode == 0
    with caplog.at_level(logging.INFO):
        caplog.clear()
        assert storescu(node.port, ct150[:5]).returncode == 0
        deadline = time.monotonic() + 10
        while "duplicates=" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)  # the closing line is written when the release completes
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in info if "duplicate instance ignored" in m]  # not one line per instance
    closing = [m for m in info if "duplicates=" in m]
    assert len(closing) == 1 and "instances=5 duplicates=5 failures=0" in closing[0], info


@in_process
def test_disk_reserve_stops_then_resumes_when_space_returns(node: Node, ct150: list[Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_free = node.spool.free_bytes
    monkeypatch.setattr(node.spool, "free_bytes", lambda: 0)
    refused = storescu(node.port, ct150[:1])
    assert "Out of Resources" in refused.stderr or "OutOfResources" in refused.stderr
    monkeypatch.setattr(node.spool, "free_bytes", real_free)
    accepted = storescu(node.port, ct150[:1])
    assert accepted.returncode == 0 and "Received Store Response (Success)" in accepted.stderr


@pytest.mark.parametrize("image_type", [
    "ORIGINAL\\PRIMARY\\AXIAL", "DERIVED\\SECONDARY", "ORIGINAL", "ORIGINAL\\ PRIMARY",
    "ORIGINAL \\PRIMARY", "ORIGINAL\\\\AXIAL", "\\PRIMARY", "ORIGINAL\\PRIMARY\\LOCALIZER ",
])
def test_quick_header_reads_what_pydicom_reads(image_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast header reader gives pydicom's values, or leaves the dataset to pydicom."""
    from io import BytesIO

    from dicom_node.receive import ingest
    from dicom_node.dataset_scan import scan_instance

    ds = _small_ct()
    ds.ImageType = image_type.split("\\")
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    req = ingest.StoreRequest(data, "", "", str(ds.file_meta.TransferSyntaxUID), "", "")
    with scan_instance(data, ingest._WANTED, max_instance_bytes=len(data)) as scan:
        quick = ingest._quick_header(scan)
        monkeypatch.setattr(ingest, "_quick_header", lambda _scan: None)
        slow = ingest._header(req, scan)
    if quick is not None:
        assert quick == slow
    plain = all(p and p.strip() == p for p in image_type.rstrip().split("\\"))
    assert (quick is not None) == plain, quick


@in_process
def test_contexts_copied_per_association_equal_and_independent(node: Node) -> None:
    from copy import deepcopy

    assert node.scp.server is not None
    original = node.scp.server.contexts
    copied = deepcopy(original)
    assert [(c.abstract_syntax, c.transfer_syntax, c.context_id, c.scu_role, c.scp_role) for c in copied] == \
        [(c.abstract_syntax, c.transfer_syntax, c.context_id, c.scu_role, c.scp_role) for c in original]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax for a, b in zip(copied, original))
    copied[0].transfer_syntax = ["1.2.840.10008.1.2"]
    copied[0].context_id = 99
    assert original[0].context_id != 99 and len(original[0].transfer_syntax) > 1


@pytest.mark.parametrize("status, comment, class_uid", [
    (0x0000, None, CTImageStorage),
    (0xA700, "disk write failed: No space left on device", CTImageStorage),
    (0xC000, "odd", "1.2.840.10008.5.1.4.1.1.7"),
    (0xB007, None, None),
])
def test_store_response_encoded_as_pynetdicom_does(status: int, comment: str | None, class_uid: str | None) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node.receive.reactor import store_response_command

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = class_uid
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
    rsp.Status = status
    rsp.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 16384))
    assert [(1, b"\x03" + store_response_command(rsp))] == pdata.presentation_data_value_list  # type: ignore[operator]


@in_process
def test_health_is_not_ready_while_the_disk_reserve_refuses_stores(node: Node, ct150: list[Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Free space just above the reserve, but not by an instance: C-STOREs are refused,
    and /health says not ready, and why (it once said ready, disk_above_reserve true)."""
    reserve = node.config.node.min_free_disk_mb * 2**20
    monkeypatch.setattr(node.spool, "free_bytes", lambda: reserve + 2**16)
    assert node.health()["ready"]
    refused = storescu(node.port, ct150[:1])
    assert "Out of Resources" in refused.stderr or "OutOfResources" in refused.stderr
    health = node.health()
    assert not health["ready"] and not health["checks"]["disk_above_reserve"]
    assert "too close to the reserve" in health["not_ready_because"]
