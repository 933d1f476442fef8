"""Route matching, ignored studies and retention (in-process node, real SCU)."""

from __future__ import annotations

import time
from pathlib import Path

from dicom_node.config import Route, parse_config
from dicom_node.node import Node
from dicom_node.routing import matching_routes
from phantoms.ct_writer import SeriesLayout, simple_ct_volume, write_ct_series
from tests.support import free_port, node_config, storescu

CT = "1.2.840.10008.5.1.4.1.1.2"
SERIES = {"modality": "CT", "body_part": "CHEST", "series_description": "Thorax 1.25mm B70f",
          "sop_class_uid": CT, "called_ae": "AI_LUNG", "calling_ae": "PACS", "study_description": "",
          "manufacturer": "Vendor"}


def _route(**match: str) -> Route:
    return Route(name="r", match=match, plugin="p")


def test_rules_match_on_tags_sop_class_and_called_ae() -> None:
    assert matching_routes([_route(Modality="CT", BodyPartExamined="(?i)chest|thorax|lung")], [SERIES])
    assert matching_routes([_route(SeriesDescription=r"(?i)thorax.*1\.25")], [SERIES])
    assert matching_routes([_route(SOPClassUID=f"^{CT}$", CalledAETitle="^AI_LUNG$")], [SERIES])
    assert not matching_routes([_route(CalledAETitle="^OTHER$")], [SERIES])
    assert not matching_routes([_route(Modality="^MR$")], [SERIES])
    assert not matching_routes([_route(Modality="CT", BodyPartExamined="HEAD")], [SERIES])
    assert matching_routes([_route()], [SERIES]), "an empty match matches every study"
    other = {**SERIES, "modality": "MR", "body_part": "HEAD"}
    assert matching_routes([_route(Modality="CT", BodyPartExamined="CHEST")], [other, SERIES])
    # all conditions must hold on one series, not spread over two
    assert not matching_routes([_route(Modality="MR", BodyPartExamined="CHEST")], [other, SERIES])


def test_unmatched_study_is_ignored_then_removed_by_retention(tmp_path: Path) -> None:
    route = {"name": "head", "match": {"BodyPartExamined": "HEAD"}, "plugin": "p", "destinations": []}
    cfg = parse_config(node_config(tmp_path / "var", free_port(), routes=[route]))
    node = Node(cfg)
    node.validate_plugins = lambda: None  # type: ignore[method-assign]  # no plugin is needed here
    node.start()
    try:
        files = write_ct_series(simple_ct_volume(3, 16, 16), tmp_path / "ct", layout=SeriesLayout(body_part="CHEST"))
        assert storescu(node.port, files).returncode == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and node.db.query("SELECT state FROM studies")[0]["state"] != "ignored":
            time.sleep(0.1)
        study = node.db.query("SELECT * FROM studies")[0]
        assert study["state"] == "ignored" and study["reason"] == "no route matches"
        assert list(node.spool.root.rglob("*.dcm"))
        node.assembler.apply_retention(time.time())
        assert not list(node.spool.root.rglob("*.dcm"))
        assert node.db.query("SELECT purged_at FROM studies")[0]["purged_at"] is not None
        assert not node.db.query("SELECT * FROM jobs")
    finally:
        node.stop()


def test_derived_series_and_localizers_never_reopen_a_study(tmp_path: Path) -> None:
    from dicom_node.receive.ingest import is_analysable

    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert is_analysable(ct, "ORIGINAL\\PRIMARY\\AXIAL")
    assert not is_analysable(ct, "DERIVED\\SECONDARY\\MPR")
    assert not is_analysable(ct, "ORIGINAL\\PRIMARY\\LOCALIZER")
    assert not is_analysable("1.2.840.10008.5.1.4.1.1.88.34", "")  # an SR
    route = {"name": "ct", "match": {"Modality": "CT"}, "plugin": "p", "destinations": []}
    node = Node(parse_config(node_config(tmp_path / "var", free_port(), routes=[route])))
    node.validate_plugins = lambda: None  # type: ignore[method-assign]
    node.start()
    try:
        from phantoms.ct_writer import StudyIdentity

        study = StudyIdentity()
        reformat = write_ct_series(simple_ct_volume(3, 16, 16), tmp_path / "mpr", study,
                                   SeriesLayout(image_type=("DERIVED", "SECONDARY", "MPR"), series_number=5))
        assert storescu(node.port, reformat).returncode == 0
        rows = node.db.query("SELECT analysable FROM series")
        assert rows == [{"analysable": 0}]
        original = write_ct_series(simple_ct_volume(3, 16, 16), tmp_path / "orig", study, SeriesLayout())
        assert storescu(node.port, original).returncode == 0
        assert sorted(r["analysable"] for r in node.db.query("SELECT analysable FROM series")) == [0, 1]
    finally:
        node.stop()
