"""End to end with a real PACS: Orthanc auto-routes a stable CT study to the node, and the
node's SEG, SR, key images (Secondary Capture) and KOS land back in the same Orthanc study.

Orthanc (Debian's ``orthanc`` package) runs as a subprocess with its own configuration
folder: the shipped snippet ``config/orthanc/orthanc-dicom-node.json`` (ports and script
path substituted) plus test keys, and the shipped routing script
``config/orthanc/route-to-dicom-node.lua``. Everything stays on 127.0.0.1. The analysis is
the test-only threshold plugin (tests/fake_plugins.py). Orthanc loads the DICOMweb plugin
(Debian's ``orthanc-dicomweb``), through which web viewers such as OHIF read the results.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.support import (
    FAKE_PLUGIN,
    REPO,
    NodeProcess,
    dense_phantom,
    dense_route,
    free_port,
    node_config,
    require_tool,
    storescu,
    wait_for,
)

SNIPPET = REPO / "config" / "orthanc" / "orthanc-dicom-node.json"
LUA = REPO / "config" / "orthanc" / "route-to-dicom-node.lua"
ORTHANC_AET = "ORTHANC"
STABLE_AGE = 2  # Orthanc's StableAge (s)
NODE_STABLE = 1.0  # the node route's stable_seconds
PATIENT = StudyIdentity(patient_name="ROUTED^PAT", patient_id="ORTHANC-E2E-1", patient_birth_date="19500101")
SLICES = 40
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # orthanc-dicomweb
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
KEY_IMAGES = 3  # the summary and one image per dense lesion
RESULTS = ("SEG", "SR", "OT", "KO")  # OT: the key images, KO: the Key Object Selection


def _substitute(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{SNIPPET.name}: expected exactly one {old!r}"
    return text.replace(old, new)


@dataclass
class Orthanc:
    """Orthanc in a subprocess, with its own configuration folder, storage and ports."""

    root: Path
    node_port: int
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.config_dir = self.root / "config"
        self.log_path = self.root / "orthanc.log"

    def write_config(self) -> None:
        """The shipped snippet, as an admin would adapt it, next to the test's own keys."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "db").mkdir(exist_ok=True)
        snippet = SNIPPET.read_text()
        snippet = _substitute(snippet, '"Port" : 11112', f'"Port" : {self.node_port}')
        snippet = _substitute(snippet, '"/etc/orthanc/route-to-dicom-node.lua"', json.dumps(str(LUA)))
        snippet = _substitute(snippet, '"StableAge" : 60', f'"StableAge" : {STABLE_AGE}')
        (self.config_dir / "dicom-node.json").write_text(snippet)
        assert DICOMWEB_PLUGIN.exists(), (f"{DICOMWEB_PLUGIN} is missing: run the README's test command "
                                          "(it installs orthanc-dicomweb)")
        local = {
            "Name": "orthanc-e2e", "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpsCACertificates": "", "Plugins": [str(DICOMWEB_PLUGIN)], "ConcurrentJobs": 2,
            "SyncStorageArea": False, "SaveJobs": False, "DicomScpTimeout": 30,
            # strict site: only declared modalities may store, from their declared host
            "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
        }
        (self.config_dir / "test.json").write_text(json.dumps(local, indent=2))

    def start(self, timeout: float = 30.0) -> Orthanc:
        binary = require_tool("Orthanc")
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, str(self.config_dir)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"Orthanc did not start in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return bytes(rsp.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        raw = self._request("POST", path, body)
        return json.loads(raw) if raw.strip() else None

    def put(self, path: str, body: Any) -> None:
        self._request("PUT", path, body)

    def file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file")


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_for(predicate, timeout, what, every=0.25)


def _series_by_modality(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return out


def _all_results(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]] | None:
    """The study's series by modality once every result is there (all key images too)."""
    series = _series_by_modality(orthanc, study_id)
    if all(series.get(m) for m in RESULTS) and len(series["OT"][0]["Instances"]) == KEY_IMAGES:
        return series
    return None


def _dataset(orthanc: Orthanc, instance_id: str, save_to: Path) -> Dataset:
    raw = orthanc.file(instance_id)
    save_to.write_bytes(raw)
    return dcmread(io.BytesIO(raw))


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([require_tool("dciodvfy"), str(path)], check=False, capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _seg_references(seg: Dataset) -> set[str]:
    refs = {inst.ReferencedSOPInstanceUID
            for series in seg.ReferencedSeriesSequence for inst in series.ReferencedInstanceSequence}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.DerivationImageSequence:
            refs |= {src.ReferencedSOPInstanceUID for src in derivation.SourceImageSequence}
    return refs


def _routing_lines(orthanc: Orthanc, study_id: str, text: str) -> int:
    return sum(1 for line in orthanc.log().splitlines()
               if "dicom-node routing: study " + study_id in line and text in line)


def _routing_settled(orthanc: Orthanc, study_id: str) -> bool:
    """Nothing more goes from Orthanc to the node for this study: Orthanc holds it as stable
    (no stable event to come), the routing script's last word on it was "nothing to send",
    and no store job of Orthanc's is waiting or running."""
    lines = [line for line in orthanc.log().splitlines() if "dicom-node routing: study " + study_id in line]
    active = [job for job in orthanc.get("/jobs?expand") if job["State"] in ("Pending", "Running", "Retry")]
    return (bool(orthanc.get(f"/studies/{study_id}")["IsStable"]) and bool(lines)
            and "nothing to send" in lines[-1] and not active)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    """Orthanc (routing studies to the node), started, and the node (sending results to
    Orthanc), configured but not started: the test starts it."""
    require_tool("Orthanc")  # installed by scripts/test.sh; missing means fail, not skip
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    cfg = node_config(
        tmp_path / "var", node_port,
        destinations={"orthanc": {"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        routes=dense_route(["orthanc"], stable=NODE_STABLE), plugins=FAKE_PLUGIN,
        security={"allowed_callers": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1"}]},
    )
    node = NodeProcess(cfg, tmp_path / "node")
    try:
        orthanc.start()
        yield orthanc, node
    finally:
        orthanc.stop()
        node.stop()
        # pytest shows this captured output when the test fails
        version = subprocess.run([require_tool("Orthanc"), "--version"], check=False,
                                 capture_output=True, text=True).stdout
        print(f"--- {version.splitlines()[0] if version else 'Orthanc: no version'}")
        print("--- Orthanc log ---\n" + orthanc.log()[-12000:])
        print("--- node log ---\n" + node.log()[-6000:])


def _store(orthanc: Orthanc, files: list[Path]) -> None:
    sent = storescu(orthanc.dicom_port, files, called=ORTHANC_AET, calling="STORESCU")
    assert sent.returncode == 0, sent.stderr


def test_orthanc_routes_study_and_receives_results(tmp_path: Path, peers: tuple[Orthanc, NodeProcess]) -> None:
    orthanc, node = peers
    started = time.monotonic()
    assert "dicom-node routing: loaded" in orthanc.log()
    # the test's sender is a declared modality (Orthanc only accepts declared ones here)
    orthanc.put("/modalities/sender", {"AET": "STORESCU", "Host": "127.0.0.1", "Port": free_port(),
                                      "AllowStore": True})
    ct = write_ct_series(dense_phantom(SLICES), tmp_path / "ct", PATIENT, SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    mpr = write_ct_series(dense_phantom(8, 64), tmp_path / "mpr", PATIENT,
                          SeriesLayout(image_type=("DERIVED", "SECONDARY", "MPR"), series_number=5))
    study_uid = PATIENT.study_instance_uid

    # 1. the node is down: the routing job fails, and the script will send the CT again
    _store(orthanc, ct)
    study_id = _wait(lambda: orthanc.post("/tools/lookup", study_uid.encode()), 10, "the study in Orthanc")[0]["ID"]
    _wait(lambda: re.search(r"dicom-node routing: job \S+ failed", orthanc.log()), 30,
          "the routing job to fail while the node is down")

    # 2. the node is up: the checks docs/orthanc.md tells the admin to run, both ways
    node.start()
    assert orthanc.post("/modalities/dicom-node/echo", {}) == {}  # what docs/orthanc.md shows
    assert "Success" in node.cli("echo", "orthanc", "--config", str(node.config_path)).stdout

    # 3. a new series (a DERIVED reformat, never routed) makes the study stable again: the
    #    script sends the CT once more -> the node analyses it -> SEG, SR, key images and KOS
    #    back into the study
    _store(orthanc, mpr)
    series = _wait(lambda: _all_results(orthanc, study_id), 60, "SEG, SR, key images and KOS in Orthanc's study")
    routed_at = time.monotonic() - started
    assert _routing_lines(orthanc, study_id, "skipped: ImageType DERIVED") == 1

    # 4. loop safety: our results made the study stable again and the script ran again
    _wait(lambda: _routing_settled(orthanc, study_id), 30, "the routing script to run again on the results")
    # nothing is on its way to the node: its one study, one revision, one job
    status = node.status()
    assert [(s["state"], s["revision"], s["instance_count"]) for s in status["studies"]] == [("done", 0, SLICES)]
    assert len(status["jobs"]) == 1 and status["jobs"][0]["state"] == "done", status["jobs"]
    assert [d["state"] for d in status["deliveries"]] == ["done"]
    series = _series_by_modality(orthanc, study_id)
    assert sorted(series) == ["CT", "KO", "OT", "SEG", "SR"]
    assert [len(series[m]) for m in ("CT", *RESULTS)] == [2, 1, 1, 1, 1]
    assert [len(series[m][0]["Instances"]) for m in RESULTS] == [1, 1, KEY_IMAGES, 1]
    assert _routing_lines(orthanc, study_id, "sending 1 series") == 2  # failed, then after the node is up
    assert _routing_lines(orthanc, study_id, "produced by dicom-node") >= 4  # SEG, SR, SC, KOS skipped

    # 5. the results: same study and patient, referencing the CT instances Orthanc holds
    ct_series = next(s for s in series["CT"] if len(s["Instances"]) == SLICES)
    ct_uids = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in ct_series["Instances"]}
    results: dict[str, list[Dataset]] = {}
    for modality in RESULTS:
        for n, instance in enumerate(series[modality][0]["Instances"]):
            path = tmp_path / f"{modality}-{n}.dcm"
            results.setdefault(modality, []).append(_dataset(orthanc, instance, path))
            assert not _dciodvfy_errors(path), _dciodvfy_errors(path)
    for ds in sum(results.values(), []):
        assert ds.StudyInstanceUID == study_uid
        assert (ds.PatientID, str(ds.PatientName)) == (PATIENT.patient_id, PATIENT.patient_name)
        assert ds.Manufacturer == "dicom-node"
    seg, kos = results["SEG"][0], results["KO"][0]
    refs = _seg_references(seg)
    assert refs and refs <= ct_uids, refs - ct_uids
    key_images = sorted(results["OT"], key=lambda ds: int(ds.InstanceNumber))
    assert [ds.BurnedInAnnotation for ds in key_images] == ["YES"] * KEY_IMAGES
    assert {i.ReferencedSOPInstanceUID for ds in key_images for i in ds.SourceImageSequence} <= ct_uids
    # the KOS selects what Orthanc holds in this study: key images, key CT slices, SEG, SR
    in_study = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get(f"/studies/{study_id}/instances")}
    selected = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in kos.ContentSequence
                if item.ValueType in ("IMAGE", "COMPOSITE")]
    assert selected[:KEY_IMAGES] == [ds.SOPInstanceUID for ds in key_images]
    assert set(selected) <= in_study and {seg.SOPInstanceUID, results["SR"][0].SOPInstanceUID} <= set(selected)
    # what a web viewer (OHIF) asks Orthanc's DICOMweb plugin: the study's series, then the SEG
    qido = orthanc.get(f"/dicom-web/studies/{study_uid}/series")
    assert sorted(s["00080060"]["Value"][0] for s in qido) == ["CT", "CT", "KO", "OT", "SEG", "SR"]
    metadata = orthanc.get(f"/dicom-web/studies/{study_uid}/series/{seg.SeriesInstanceUID}/metadata")
    assert [m["00080016"]["Value"][0] for m in metadata] == [SEG_STORAGE]
    metadata = orthanc.get(f"/dicom-web/studies/{study_uid}/series/{key_images[0].SeriesInstanceUID}/metadata")
    assert [m["00080016"]["Value"][0] for m in metadata] == [SC_STORAGE] * KEY_IMAGES

    # 6. re-sending the same study to Orthanc (nothing new) changes nothing; neither does an
    #    admin sending the CT and our results to the node by hand (the script itself would
    #    send the CT again after an Orthanc restart): the node ignores duplicates and its
    #    own results
    _store(orthanc, ct)
    by_hand = [ct_series["ID"], *(series[m][0]["ID"] for m in RESULTS)]
    orthanc.post("/modalities/dicom-node/store", {"Resources": by_hand, "Synchronous": True})
    # The node registers every instance before its Success, and one that re-opens the study
    # sets it receiving at once (it is done again only as a new revision with a new job):
    # once our results are recorded and Orthanc has nothing more to send, "done, revision 0,
    # one job" proves that nothing was started.
    ours = 3 + KEY_IMAGES
    status = node.wait_for(lambda s: s["studies"][0]["instance_count"] == SLICES + ours, timeout=30,
                           what="the results sent by hand recorded")
    _wait(lambda: _routing_settled(orthanc, study_id), 30, "Orthanc's routing to settle after the re-send")
    status = node.status()
    assert len(status["jobs"]) == 1, status["jobs"]
    # one study, not re-opened: the CT, plus our SEG, SR, key images and KOS recorded but never analysed
    assert [(s["state"], s["revision"], s["instance_count"]) for s in status["studies"]] == [
        ("done", 0, SLICES + ours)]
    series = _series_by_modality(orthanc, study_id)
    assert [len(series[m]) for m in ("CT", *RESULTS)] == [2, 1, 1, 1, 1]
    assert len(orthanc.get(f"/studies/{study_id}/instances")) == SLICES + 8 + ours
    assert _routing_lines(orthanc, study_id, "sending 1 series") == 2
    print(f"results in Orthanc after {routed_at:.1f} s; whole test {time.monotonic() - started:.1f} s")
