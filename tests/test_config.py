"""The configuration schema and ``dicom-node check-config``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.config import load_config, parse_config, with_overrides
from dicom_node.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

CORE = """
node: {ae_title: DICOMNODE, host: 0.0.0.0, port: 11112, storage_dir: ./var}
security: {allowed_callers: []}
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}
routes:
  - name: chest-ct
    match: {Modality: CT, BodyPartExamined: "(?i)chest|thorax|lung"}
    plugin: lung_nodules
    stable_seconds: 10
    destinations: [pacs]
"""


def test_core_schema_as_documented_is_valid() -> None:
    config = parse_config(yaml.safe_load(CORE))
    assert config.node.ae_title == "DICOMNODE"
    assert config.routes[0].stable_seconds == 10
    assert config.destinations["pacs"].port == 4242


@pytest.mark.parametrize("path", ["config/dicom-node.example.yaml", "dicom_node/default_config.yaml"])
def test_shipped_configs_are_valid(path: str) -> None:
    config = load_config(REPO / path)
    assert config.routes and config.routes[0].plugin == "lung_nodules"


def test_embedded_default_loads() -> None:
    assert load_config(None).node.port == 11112


def test_route_outputs_default_to_all_four() -> None:
    """A route without ``outputs`` makes every result object; the shipped one says so."""
    assert parse_config(yaml.safe_load(CORE)).routes[0].outputs == ["seg", "sr", "sc", "kos"]
    assert load_config(None).routes[0].outputs == ["seg", "sr", "sc", "kos"]
    data = yaml.safe_load(CORE)
    data["routes"][0]["outputs"] = ["sr", "sc"]
    assert parse_config(data).routes[0].outputs == ["sr", "sc"]


@pytest.mark.parametrize(
    "patch, key, reason",
    [
        ({"node": {"ae_title": ""}}, "node.ae_title", "1 to 16"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title", "1 to 16"),
        ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title", "backslash"),
        ({"node": {"ae_title": "BAD\nAE"}}, "node.ae_title", "control"),
        ({"node": {"ae_title": "    "}}, "node.ae_title", "all spaces"),
        ({"node": {"port": 0}}, "node.port", "greater than or equal to 1"),
        ({"node": {"port": 70000}}, "node.port", "less than or equal to 65535"),
        ({"node": {"colour": "blue"}}, "node.colour", "unknown key"),
        ({"surprise": 1}, "surprise", "unknown key"),
        ({"security": {"allowed_callers": [{"ae_title": "PACS", "hots": "x"}]}},
         "security.allowed_callers.0.hots", "unknown key"),
        ({"routes": [{"name": "r", "plugin": "p", "destinations": ["nowhere"]}]},
         "route 'r': destinations", "unknown destination 'nowhere'"),
        ({"routes": [{"name": "r", "plugin": "p", "match": {"Colour": "x"}}]}, "routes[r].match", "unknown match key"),
        ({"routes": [{"name": "r", "plugin": "p", "match": {"Modality": "("}}]}, "routes[r].match", "regular expression"),
        ({"routes": [{"name": "r", "plugn": "p"}]}, "routes[r].plugn", "unknown key (did you mean plugin?)"),
        ({"routes": [{"name": "a", "plugin": "p"}, {"name": "a", "plugin": "q"}]}, "two routes are named 'a'", ""),
        ({"node": {"max_asociations": 3}}, "node.max_asociations", "unknown key (did you mean max_associations?)"),
        ({"node": {"tls": {"certfile": "x"}}}, "node.tls.certfile", "unknown key (did you mean certificate?)"),
        ({"destinations": {"pacs": {"ae_title": "P", "host": "h", "port": 1, "hots": "x"}}},
         "destinations.pacs.hots", "unknown key (did you mean host?)"),
        ({"jobs": {"colour": 1}}, "jobs.colour", "unknown key"),
        ({"node": {"listener_processes": 0}}, "node.listener_processes", '"auto" or a whole number from 1 to 64'),
        ({"node": {"listener_processes": 65}}, "node.listener_processes", "from 1 to 64"),
        ({"node": {"listener_processes": "many"}}, "node.listener_processes", "from 1 to 64"),
        ({"node": {"listener_processes": 2.5}}, "node.listener_processes", "from 1 to 64"),
        ({"node": {"listener_processes": True}}, "node.listener_processes", "from 1 to 64"),
        ({"routes": [{"name": "r", "plugin": "p", "outputs": ["seg", "pdf"]}]}, "routes[r].outputs.1",
         "'seg', 'sr', 'sc' or 'kos'"),
        ({"routes": [{"name": "r", "plugin": "p", "outputs": ["sr", "sc", "sr"]}]}, "routes[r].outputs",
         "sr listed twice"),
        ({"routes": [{"name": "r", "plugin": "p", "outputs": []}]}, "routes[r].outputs", "at least 1 item"),
        ({"routes": [{"name": "r", "plugin": "p", "output": ["sr"]}]}, "routes[r].output",
         "unknown key (did you mean outputs?)"),
    ],
)
def test_invalid_values_name_key_and_reason(patch: dict, key: str, reason: str) -> None:
    data = yaml.safe_load(CORE)
    for section, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.yaml")
    message = str(err.value)
    assert key in message and reason in message, message


@pytest.mark.parametrize("setting, cpus, max_associations, expected", [
    ("auto", 1, 16, 2), ("auto", 2, 16, 2), ("auto", 4, 16, 4), ("auto", 32, 16, 8),
    ("auto", 4, 3, 3), ("auto", 2, 1, 1), (1, 8, 16, 1), (3, 1, 16, 3),
])
def test_listener_processes_auto_follows_the_cpus(setting: object, cpus: int, max_associations: int,
                                                   expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: one acceptor process per usable CPU, 2 to 8, no more than max_associations;
    a number is taken as given."""
    import dicom_node.config as config_module

    monkeypatch.setattr(config_module, "usable_cpus", lambda: cpus)
    node = parse_config({"node": {"listener_processes": setting, "max_associations": max_associations}}).node
    assert node.listener_process_count == expected


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CORE.replace("./var", str(tmp_path / "var")))
    assert main(["check-config", str(good), "--no-ports"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(CORE.replace("port: 4242", "port: 99999"))
    assert main(["check-config", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "destinations.pacs.port" in err and "65535" in err
    assert main(["check-config", str(tmp_path / "missing.yaml")]) != 0
    (tmp_path / "broken.yaml").write_text("node: [unclosed")
    assert main(["check-config", str(tmp_path / "broken.yaml")]) != 0
    assert "not valid YAML" in capsys.readouterr().err


def test_cli_overrides_replace_file_values() -> None:
    config = with_overrides(parse_config(yaml.safe_load(CORE)), port=1234, ae_title="OTHER", storage_dir=None)
    assert (config.node.port, config.node.ae_title) == (1234, "OTHER")
    with pytest.raises(ConfigError, match="node.port"):
        with_overrides(config, port=0)
