"""The command line as an admin first meets it: --help lists every command with help on
every option, --version names the node, its libraries and the shipped model."""

from __future__ import annotations

import argparse
import subprocess
import sys

import yaml

from dicom_node.cli import build_parser
from tests.support import REPO


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_lists_every_command_and_every_option_has_help() -> None:
    parser = build_parser()
    text = parser.format_help()
    assert "``" not in text  # written for admins, not a code comment
    commands = _subcommands(parser)
    assert {"serve", "echo", "send", "status", "audit", "demo", "conformance", "check-config"} <= set(commands)
    for name, command in commands.items():
        assert name in text
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_version_names_the_node_its_libraries_and_the_shipped_model() -> None:
    out = subprocess.run([sys.executable, "-m", "dicom_node", "--version"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    manifest = yaml.safe_load((REPO / "models" / "lung_nodules" / "manifest.yaml").read_text())
    assert out.startswith("dicom-node ")
    assert "pynetdicom " in out and "highdicom " in out and "torch " in out
    assert f"model lung_nodules {manifest['version']}" in out
