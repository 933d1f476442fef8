"""Command line: ``dicom-node serve | worker | echo | send | status | check-config``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import Config, load_config, redact_url, with_overrides
from dicom_node.errors import ConfigError, DeliveryError, NodeError, PluginError, StorageError
from dicom_node.logs import setup_logging

if TYPE_CHECKING:
    from datetime import datetime

    from dicom_node.admin import Admin
    from dicom_node.net.scu import Peer
    from dicom_node.storage.state import StateDB

log = logging.getLogger("dicom_node")

_PEER_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def _config_from(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("DICOM_NODE_CONFIG")
    config = load_config(Path(path) if path else None)
    port = getattr(args, "port", None) or os.environ.get("DICOM_NODE_PORT")
    return with_overrides(
        config,
        port=int(port) if port else None,
        ae_title=getattr(args, "ae_title", None) or os.environ.get("DICOM_NODE_AE_TITLE"),
        storage_dir=getattr(args, "storage_dir", None) or os.environ.get("DICOM_NODE_STORAGE_DIR"),
    )


def _peer(dest: str, config: Config) -> Peer:
    from dicom_node.net.scu import Peer

    if dest in config.destinations:
        from dicom_node.delivery import peer_for

        return peer_for(config.destinations[dest])
    m = _PEER_RE.match(dest)
    if not m:
        known = ", ".join(config.destinations) or "none configured"
        raise ConfigError(f"unknown destination {dest!r}: use a configured name ({known}) or AE@host:port")
    return Peer(m["ae"], m["host"], int(m["port"]))


def _start_failure(exc: BaseException) -> str:
    """One line for a start-up failure: the path and the reason, never a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"cannot start: {where}{exc.strerror}"
    return f"cannot start: {exc}" if not isinstance(exc, PluginError) else str(exc)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node until SIGTERM or SIGINT.

    Before any model is loaded, the plugin names, the storage folder and the ports are
    checked (:func:`dicom_node.preflight.before_serve`); every start-up failure is one
    line on stderr with exit code 2 (configuration) or 3 (environment), and the
    traceback goes to the log at DEBUG only.
    """
    from dicom_node import preflight
    from dicom_node.node import Node

    config = _config_from(args)
    setup_logging(config.logging.level, config.logging.json_format)
    failed = [check for check in preflight.before_serve(config) if not check.ok]
    for check in failed:
        print(f"error: {check.line()}", file=sys.stderr)
    if failed:
        return preflight.exit_code(failed)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node = Node(config)
        node.start()
    except (PluginError, StorageError, OSError) as exc:
        log.debug("start-up failed", exc_info=True)
        print(f"error: {_start_failure(exc)}", file=sys.stderr)
        return preflight.EXIT_ENVIRONMENT
    cluster = "" if config.cluster is None else (
        f"; cluster node {config.node_id}, state {redact_url(config.cluster.database)}, spool {config.cluster.spool}")
    log.info("dicom-node ready: AE %s port %d, storage %s%s", config.node.ae_title, node.port,
             config.node.storage_dir, cluster)
    stop.wait()
    node.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery analysis worker of a cluster (``cluster.broker``) until SIGTERM."""
    config = _config_from(args)
    setup_logging(config.logging.level, config.logging.json_format)
    plugins = [p.strip() for p in args.plugins.split(",") if p.strip()] if args.plugins else config.routed_plugins()
    from dicom_node import preflight
    from dicom_node.celery_jobs import run_worker

    try:
        return run_worker(config, plugins, args.concurrency, args.name, args.metrics_port)
    except PluginError as exc:  # a plugin that cannot load on this host: an environment error
        print(f"error: {exc}", file=sys.stderr)
        return preflight.EXIT_ENVIRONMENT


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a destination."""
    from dicom_node.net.scu import echo

    config = _config_from(args)
    peer = _peer(args.dest, config)
    status = echo(peer, args.calling_ae or config.node.ae_title, timeout=args.timeout)
    print(f"C-ECHO {peer}: status 0x{status:04X} ({'Success' if status == 0 else 'Failure'})")
    return 0 if status == 0 else 1


def _collect_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise NodeError(f"{p}: no such file or folder")
    return files


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files and folders (recursively) to a destination."""
    from dicom_node.net import statuses
    from dicom_node.net.scu import describe_file, store_files

    config = _config_from(args)
    peer = _peer(args.to, config)
    outgoing, skipped = [], 0
    for path in _collect_files(args.paths):
        try:
            outgoing.append(describe_file(path))
        except DeliveryError:
            skipped += 1
    if not outgoing:
        raise NodeError("no DICOM files to send")
    result = store_files(peer, outgoing, args.calling_ae or config.node.ae_title)
    ok = sum(statuses.is_success_or_warning(s) for s in result.values())
    failed = len(outgoing) - ok
    print(f"sent {ok} of {len(outgoing)} instances to {peer}" + (f"; {skipped} non-DICOM files skipped" if skipped else ""))
    for uid, status in result.items():
        if not statuses.is_success_or_warning(status):
            print(f"  {uid}: status {'0x%04X' % status if status >= 0 else 'not sent'}")
    return 0 if failed == 0 else 1


def _state_db(config: Config) -> StateDB:
    """The configuration's state database; a clear error when the node never ran there."""
    from dicom_node.storage.state import open_state_db

    if config.cluster is None and not config.database_path.exists():
        raise NodeError(f"no state database at {config.database_path}: has the node run with this storage_dir?")
    return open_state_db(config)


def _since(text: str | None) -> "datetime | None":
    """``--since`` (ISO time or a duration back from now), or a clear error."""
    from dicom_node.audit import parse_since

    try:
        return parse_since(text) if text else None
    except ValueError as exc:
        raise NodeError(str(exc)) from exc


def cmd_status(args: argparse.Namespace) -> int:
    """Show studies, jobs, deliveries and result objects, optionally narrowed."""
    from dicom_node.status_report import StatusFilter, collect, probe_health, render

    config = _config_from(args)
    since = _since(args.since)
    db = _state_db(config)
    try:
        data = collect(db, args.limit, StatusFilter(args.accession, args.state,
                                                        since.timestamp() if since else None))
    finally:
        db.close()
    data["node"] = probe_health(config)
    print(json.dumps(data, indent=2, default=str) if args.json else render(data))
    return 0


def _admin_action(args: argparse.Namespace, act: Callable[[Admin], list[str]]) -> int:
    from dicom_node.admin import Admin

    config = _config_from(args)
    db = _state_db(config)
    try:
        for line in act(Admin(config, db)):
            print(line)
    finally:
        db.close()
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Send a delivery (or every failed one) again now."""
    if (args.delivery is None) == (not args.failed):
        raise NodeError("give one delivery id, or --failed for every failed delivery")

    def act(admin: Admin) -> list[str]:
        lines = admin.retry_failed() if args.failed else admin.retry([args.delivery])
        return lines or ["no failed deliveries"]

    return _admin_action(args, act)


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Analyse a study again: a new revision whose results replace the older ones."""
    return _admin_action(args, lambda admin: [admin.reprocess(args.study_uid, args.plugin)])


def cmd_forget(args: argparse.Namespace) -> int:
    """Remove a study's images, results and state for good."""
    if not args.yes:
        raise NodeError(f"forget removes study {args.study_uid}'s images, results and state for good: "
                        "add --yes to do it")
    return _admin_action(args, lambda admin: [admin.forget(args.study_uid)])


def cmd_check_config(args: argparse.Namespace) -> int:
    """Pre-flight a configuration file: its schema, the plugin names its routes use, the
    storage folder and the ports; with ``--echo`` the destinations answer C-ECHO, with
    ``--deep`` every routed plugin loads with its weights, as ``serve`` does."""
    from dicom_node import preflight

    config = load_config(Path(args.path))
    print(f"{args.path}: schema OK ({len(config.routes)} routes, {len(config.destinations)} destinations)")
    names = preflight.plugin_names(config)
    checks = [*names, preflight.storage(config.node.storage_dir), *preflight.cluster(config)]
    if not args.no_ports:
        checks += preflight.ports(config)
    if args.echo:
        checks += preflight.destinations(config)
    if args.deep and all(check.ok for check in names):
        checks += preflight.plugin_loads(config)
    for check in checks:
        print(check.line(), file=sys.stdout if check.ok else sys.stderr)
    code = preflight.exit_code(checks)
    print({0: "ready to serve", 2: "configuration error", 3: "environment error"}[code],
          file=sys.stdout if code == 0 else sys.stderr)
    return code


def cmd_audit(args: argparse.Namespace) -> int:
    """Print audit records (JSON lines), filtered by time and event type."""
    from dicom_node.audit import read_records

    config = _config_from(args)
    since = _since(args.since)
    if not config.audit_path.exists():
        raise NodeError(f"no audit log at {config.audit_path}: has the node run with this storage_dir?")
    for entry in read_records(config.audit_path, since, args.event):
        print(json.dumps(entry))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo: phantom in, findings table and PNG out."""
    from dicom_node.demo import run_demo

    setup_logging("WARNING")
    return run_demo(Path(args.out), slices=args.slices)


def cmd_conformance(args: argparse.Namespace) -> int:
    """Print the DICOM Conformance Statement of this configuration."""
    from dicom_node.conformance import conformance_statement

    print(conformance_statement(_config_from(args)), end="")
    return 0


DESCRIPTION = """\
dicom-node: a DICOM node that a PACS routes studies to. It analyses them with MONAI
models and sends the findings back to the same study as DICOM SEG and SR objects.

Start with "dicom-node demo" (no network, no configuration), check a configuration
with "dicom-node check-config FILE --deep", then run it with "dicom-node serve
--config FILE". Every command that reads the configuration takes --config (the
embedded default configuration when omitted)."""

EPILOG = """\
exit codes: 0 ok, 1 an operation failed (e.g. a peer refused), 2 configuration error,
3 environment error (serve, worker, check-config: a folder, a port, a destination, or a
plugin or its model that cannot load).
Each command has its own --help, e.g. "dicom-node send --help"."""


def version_text() -> str:
    """The node's version, its DICOM and model libraries' and the shipped models' (read
    from their manifests: nothing is imported or loaded)."""
    from importlib import metadata

    import yaml

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"dicom-node {installed('dicom-node')}",
             "libraries: " + ", ".join(f"{name} {installed(name)}" for name in
                                       ("pynetdicom", "pydicom", "highdicom", "monai", "torch"))]
    models = Path(__file__).resolve().parent.parent / "models"
    for manifest in sorted(models.glob("*/manifest.yaml")):
        try:
            data = yaml.safe_load(manifest.read_text()) or {}
            lines.append(f"model {data.get('name', manifest.parent.name)} {data.get('version', '?')}"
                         f" ({data.get('display_name', '')})")
        except (OSError, yaml.YAMLError) as exc:
            lines.append(f"model {manifest.parent.name}: manifest unreadable ({exc})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="dicom-node", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_text(),
                        help="show the node's, its libraries' and the shipped models' versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="YAML configuration (default: the embedded default)")
        return p

    def with_storage_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--storage-dir", help="use this storage folder instead of the configuration's")

    serve = with_config(sub.add_parser("serve", help="run the node"))
    serve.add_argument("--port", type=int, help="DICOM port to listen on (overrides node.port)")
    serve.add_argument("--ae-title", help="the node's AE title (overrides node.ae_title)")
    serve.add_argument("--storage-dir", help="state, spool and results folder (overrides node.storage_dir)")
    serve.set_defaults(func=cmd_serve)
    worker = with_config(sub.add_parser("worker", help="run a cluster's analysis worker: takes jobs from the "
                                        "broker (cluster.broker) for its plugins"))
    worker.add_argument("--plugins", help="comma-separated plugin names whose queues it takes (default: "
                        "every plugin a route names)")
    worker.add_argument("--concurrency", type=int, default=1, help="analysis processes (default 1)")
    worker.add_argument("--name", help="this worker's name in status and leases (default: <host>-worker-<pid>)")
    worker.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus /metrics on this port "
                        "(at http.host; default: none)")
    worker.set_defaults(func=cmd_worker)
    echo = with_config(sub.add_parser("echo", help="C-ECHO a destination (name or AE@host:port)"))
    echo.add_argument("dest", help="a destination name from the configuration, or AE@host:port")
    echo.add_argument("--calling-ae", help="calling AE title (default: the node's)")
    echo.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to wait for the connection and the association (default 10)")
    echo.set_defaults(func=cmd_echo)
    send = with_config(sub.add_parser("send", help="C-STORE files or folders to a destination"))
    send.add_argument("paths", nargs="+", help="DICOM files or folders (searched recursively)")
    send.add_argument("--to", required=True, help="destination name or AE@host:port")
    send.add_argument("--calling-ae", help="calling AE title (default: the node's)")
    send.set_defaults(func=cmd_send)
    status = with_config(sub.add_parser("status", help="studies, jobs and deliveries"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--limit", type=int, default=50, help="newest studies, jobs and deliveries shown (default 50)")
    with_storage_dir(status)
    status.add_argument("--accession", help="only the studies with this accession number, and their jobs "
                        "and deliveries")
    status.add_argument("--state", help="only studies, jobs and deliveries in this state (e.g. failed, "
                        "pending, done, receiving)")
    status.add_argument("--since", help="only what changed since: ISO time (UTC if no zone) or a duration "
                        "back from now: 30m, 2h, 7d")
    status.set_defaults(func=cmd_status)
    retry = with_config(sub.add_parser("retry", help="send a failed delivery (or all of them) again now"))
    retry.add_argument("delivery", nargs="?", type=int, help="the delivery id (see status)")
    retry.add_argument("--failed", action="store_true",
                       help="every failed or rejected delivery of the studies' current results")
    with_storage_dir(retry)
    retry.set_defaults(func=cmd_retry)
    reprocess = with_config(sub.add_parser("reprocess", help="analyse a study again (a new revision whose "
                                           "results replace the older ones)"))
    reprocess.add_argument("study_uid", help="the Study Instance UID (see status)")
    reprocess.add_argument("--plugin", help="only the matching routes of this plugin")
    with_storage_dir(reprocess)
    reprocess.set_defaults(func=cmd_reprocess)
    forget = with_config(sub.add_parser("forget", help="remove a study's images, results and state for good"))
    forget.add_argument("study_uid", help="the Study Instance UID (see status)")
    forget.add_argument("--yes", action="store_true", help="confirm: nothing of the study is kept")
    with_storage_dir(forget)
    forget.set_defaults(func=cmd_forget)
    audit = with_config(sub.add_parser("audit", help="print the audit trail (JSON lines)"))
    audit.add_argument("--since", help="ISO time (UTC if no zone) or a duration back from now: 30m, 2h, 7d")
    audit.add_argument("--event", choices=["association", "study-received", "analysis", "delivery",
                                           "config-loaded", "admin"], help="only this kind of event")
    with_storage_dir(audit)
    audit.set_defaults(func=cmd_audit)
    demo = sub.add_parser("demo", help="see it work: a phantom in, findings and a PNG out")
    demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--slices", type=int, default=300, help="slices of the phantom chest CT (default 300)")
    demo.set_defaults(func=cmd_demo)
    conf = with_config(sub.add_parser("conformance", help="print the DICOM Conformance Statement"))
    conf.set_defaults(func=cmd_conformance)
    check = sub.add_parser("check-config", help="pre-flight a configuration: schema, plugin names, storage "
                           "folder, ports (exit 0 ok, 2 configuration error, 3 environment error)")
    check.add_argument("path", help="the YAML configuration file to check")
    check.add_argument("--deep", action="store_true",
                       help="also load every plugin a route names, with its model weights (as serve does)")
    check.add_argument("--echo", action="store_true", help="also C-ECHO every destination")
    check.add_argument("--no-ports", action="store_true",
                       help="do not try the DICOM and HTTP ports (e.g. while the node runs)")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except (NodeError, PluginError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
