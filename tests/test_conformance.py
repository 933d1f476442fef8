"""The conformance statement is generated from the code and kept in docs/."""

from __future__ import annotations

import re
from pathlib import Path

from dicom_node.config import load_config
from dicom_node.conformance import conformance_statement
from dicom_node.receive.ingest import Ingestor
from dicom_node.receive.scp import StorageSCP

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


def test_docs_copy_matches_the_code() -> None:
    generated = conformance_statement(load_config(None))
    assert DOC.read_text() == generated, (
        "docs/conformance.md is stale: regenerate with `dicom-node conformance > docs/conformance.md`"
    )


def test_statement_lists_exactly_what_the_listener_accepts() -> None:
    config = load_config(None)
    scp = StorageSCP(config, Ingestor.__new__(Ingestor))
    contexts = scp.ae.supported_contexts
    doc = DOC.read_text()
    sections = doc.split("## ")
    sop_section = next(s for s in sections if s.startswith("3."))
    ts_section = next(s for s in sections if s.startswith("4."))
    documented_sops = set(re.findall(r"`([0-9.]+)`", sop_section))
    documented_ts = set(re.findall(r"`([0-9.]+)`", ts_section))
    assert documented_sops == {str(cx.abstract_syntax) for cx in contexts}
    for cx in contexts:
        if str(cx.abstract_syntax) != "1.2.840.10008.1.1":
            assert set(map(str, cx.transfer_syntax)) == documented_ts
