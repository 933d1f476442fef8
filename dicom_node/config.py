"""The node's configuration: one validated schema, loaded once.

The file is YAML. Unknown keys are errors. ``load_config`` fails fast with a
:class:`~dicom_node.errors.ConfigError` naming the key and the reason.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.errors import ConfigError

DEFAULT_CONFIG_RESOURCE = "default_config.yaml"

# Attributes a route rule may match on (regular expressions, searched).
MATCH_KEYS = (
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "StudyDescription",
    "SOPClassUID",
    "Manufacturer",
    "CalledAETitle",
    "CallingAETitle",
)


# The result objects a route can ask for (see dicom_node/results): DICOM Segmentation,
# TID 1500 SR, key images as Secondary Capture, Key Object Selection.
Output = Literal["seg", "sr", "sc", "kos"]
ALL_OUTPUTS: tuple[Output, ...] = typing.get_args(Output)


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("an AE title may not contain a backslash or control characters")
    if not value.strip():
        raise ValueError("an AE title may not be all spaces")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


def _readable(path: Path | None, key: str) -> None:
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{key}: {path} is not a readable file")


class ListenerTLS(_Strict):
    """DICOM TLS on the listener (PS3.15 B.1 Basic TLS Secure Transport Connection)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None  # set: callers must present a certificate signed by it
    min_version: TLSVersion = "TLSv1.2"
    ciphers: str | None = None  # OpenSSL cipher list for TLS 1.2 (default: Python's secure set)

    @model_validator(mode="after")
    def _files(self) -> "ListenerTLS":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs tls.certificate and tls.private_key")
        for key in ("certificate", "private_key", "ca_certificates"):
            _readable(getattr(self, key), f"tls.{key}")
        return self


class DestinationTLS(_Strict):
    """DICOM TLS towards a destination; the server's certificate is verified by default."""

    enabled: bool = False
    ca_certificates: Path | None = None  # default: the system's trusted CAs
    verify: bool = True  # check the server certificate and its host name
    server_hostname: str | None = None  # name to expect in the certificate (default: host)
    certificate: Path | None = None  # our client certificate, for mutual TLS
    private_key: Path | None = None
    min_version: TLSVersion = "TLSv1.2"
    ciphers: str | None = None

    @model_validator(mode="after")
    def _files(self) -> "DestinationTLS":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key go together")
        for key in ("certificate", "private_key", "ca_certificates"):
            _readable(getattr(self, key), f"tls.{key}")
        return self


class NodeSettings(_Strict):
    """The listener and where the node keeps its data."""

    ae_title: AETitle = "DICOMNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    storage_dir: Path = Path("./var")
    max_associations: int = Field(default=16, ge=1, le=1000)
    # connections that have not sent a complete A-ASSOCIATE-RQ, per acceptor process; over
    # either limit the oldest of them is closed (see dicom_node/receive/negotiation.py)
    max_negotiating_per_host: int = Field(default=16, ge=1, le=10000)
    max_negotiating: int = Field(default=64, ge=1, le=10000)
    max_pdu_size: int = Field(default=262144, ge=0)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    min_free_disk_mb: int = Field(default=1024, ge=0)
    max_instance_mb: int = Field(default=2048, ge=1)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # DICOM listener processes: "auto" (one per CPU, 2 to 8) or a number; 1 = in the node's own process
    listener_processes: Literal["auto"] | int = "auto"
    tls: ListenerTLS = Field(default_factory=ListenerTLS)

    @field_validator("listener_processes", mode="before")
    @classmethod
    def _check_listener_processes(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise ValueError('use "auto" or a whole number from 1 to 64')
        return value

    @property
    def listener_process_count(self) -> int:
        """How many acceptor processes ``listener_processes`` means on this machine.

        ``auto``: one per usable CPU, at least 2 and at most 8, and never more than
        ``max_associations`` (a process that can never get an association is waste).
        """
        if self.listener_processes != "auto":
            return int(self.listener_processes)
        return max(1, min(max(2, usable_cpus()), 8, self.max_associations))


class AllowedCaller(_Strict):
    """One peer allowed to open associations (host optional)."""

    ae_title: AETitle
    host: str | None = None


class SecuritySettings(_Strict):
    """Association policy."""

    allowed_callers: list[AllowedCaller] = Field(default_factory=list)


class Destination(_Strict):
    """A DICOM peer that receives results by C-STORE."""

    ae_title: AETitle
    host: str
    port: Port
    tls: DestinationTLS = Field(default_factory=DestinationTLS)


class Route(_Strict):
    """A rule: which stable studies go to which plugin and destinations."""

    name: str = Field(min_length=1)
    match: dict[str, str] = Field(default_factory=dict)
    plugin: str = Field(min_length=1)
    stable_seconds: float = Field(default=10.0, ge=0)
    destinations: list[str] = Field(default_factory=list)
    # which result objects to produce and send (default: all of them)
    outputs: list[Output] = Field(default_factory=lambda: list(ALL_OUTPUTS), min_length=1)

    @field_validator("outputs")
    @classmethod
    def _check_outputs(cls, outputs: list[Output]) -> list[Output]:
        repeated = sorted({o for o in outputs if outputs.count(o) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice")
        return outputs

    @field_validator("match")
    @classmethod
    def _check_match(cls, match: dict[str, str]) -> dict[str, str]:
        for key, pattern in match.items():
            if key not in MATCH_KEYS:
                raise ValueError(f"unknown match key {key!r}; use one of {', '.join(MATCH_KEYS)}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match.{key}: invalid regular expression: {exc}") from exc
        return match


class PluginSpec(_Strict):
    """How to create a plugin: an entry point or ``module:callable``, with options."""

    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    # a cluster's Celery workers (dicom-node worker): a job running longer is stopped and failed
    # with this reason; its worker process is ended 30 s later if the plugin does not stop
    time_limit_seconds: float | None = Field(default=None, gt=0)


class DeliverySettings(_Strict):
    """Sending results: our calling AE title and the retry policy."""

    calling_ae_title: AETitle | None = None
    retry_initial_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    deadline_hours: float = Field(default=24.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)


class AssemblySettings(_Strict):
    """Study assembly: how often to look, and when unmatched studies count as stable."""

    default_stable_seconds: float = Field(default=10.0, ge=0)
    poll_seconds: float = Field(default=0.5, gt=0)


class JobSettings(_Strict):
    """Analysis workers."""

    max_concurrent_analyses: int = Field(default=1, ge=1, le=64)
    torch_threads: int | None = Field(default=None, ge=1)
    max_series_slices: int = Field(default=2000, ge=1)  # longer series are refused with a reason
    max_volume_mb: int = Field(default=4096, ge=1)  # float32 volume size guard (memory)


class RetentionSettings(_Strict):
    """When spooled studies are removed (days; 0 = immediately, null = never)."""

    ignored_days: float | None = Field(default=0.0, ge=0)
    delivered_days: float | None = Field(default=7.0, ge=0)


class HttpSettings(_Strict):
    """The operations endpoint: health (liveness, readiness) and Prometheus metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=11180, ge=0, le=65535)


class LoggingSettings(_Strict):
    """Log level and format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


DATABASE_SCHEMES = ("postgresql", "postgres")
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps")


def _check_url(value: str, schemes: tuple[str, ...], what: str) -> str:
    """A URL with one of ``schemes`` and a host; the message never repeats the URL (it may
    hold a password)."""
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(f"{what} must be a {' or '.join(s + '://' for s in schemes)} URL")
    if not parts.hostname:
        raise ValueError(f"{what} names no host")
    try:
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValueError(f"{what}: the port is not a number from 1 to 65535") from None
    return value


def redact_url(url: str) -> str:
    """``url`` without its password (for messages and logs): ``postgresql://node:***@db:5432/x``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class ClusterSettings(_Strict):
    """Scale-out (docs/scale-out.md): the state in PostgreSQL and a spool every host mounts.

    Absent (the default) the node keeps everything on one machine: SQLite and a local spool.
    """

    database: str  # postgresql://user:password@host:5432/dbname
    spool: Path  # a folder every node mounts (NFS in production): received instances and results
    broker: str | None = None  # Celery broker URL (redis://host:6379/0); check-config checks it answers
    # this node's name (leases, its slot folder in the spool); default: <host name>-<node.port>
    node_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    lease_seconds: float = Field(default=30.0, ge=2, le=3600)  # a dead node's jobs and deliveries wait this long
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # with a broker: a queued job whose message no worker took is sent again after this long
    # (a broker that restarted without persistence lost it; a duplicate message is dropped)
    resend_seconds: float = Field(default=60.0, ge=1)
    # with a broker: a job whose runs ended without a result this many times (its worker died:
    # crash, out of memory, killed, over the hard time limit) is failed, not run again
    max_attempts: int = Field(default=3, ge=1, le=100)

    @field_validator("database")
    @classmethod
    def _check_database(cls, value: str) -> str:
        return _check_url(value, DATABASE_SCHEMES, "cluster.database")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, BROKER_SCHEMES, "cluster.broker")


class Config(_Strict):
    """The whole configuration."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    plugins: dict[str, PluginSpec] = Field(default_factory=dict)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    cluster: ClusterSettings | None = None  # absent: one machine (SQLite, local spool)

    def plugin_factory(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """How the plugin ``name`` is created: its factory (None: the entry point of that
        name) and options, from ``plugins:`` when it is configured there."""
        spec = self.plugins.get(name)
        return (spec.factory, dict(spec.options)) if spec else (None, {})

    def routed_plugins(self) -> list[str]:
        """The plugins the routes name, sorted, each once."""
        return sorted({route.plugin for route in self.routes})

    @model_validator(mode="after")
    def _check_references(self) -> "Config":
        names = set()
        for route in self.routes:
            if route.name in names:
                raise ValueError(f"routes: two routes are named {route.name!r}")
            names.add(route.name)
            for dest in route.destinations:
                if dest not in self.destinations:
                    raise ValueError(
                        f"route {route.name!r}: destinations: unknown destination {dest!r}"
                        f" (configured: {', '.join(self.destinations) or 'none'})"
                    )
        return self

    @property
    def shared_dir(self) -> Path:
        """The folder of the data every node reads: ``cluster.spool``, else ``node.storage_dir``."""
        return self.cluster.spool if self.cluster is not None else self.node.storage_dir

    @property
    def spool_dir(self) -> Path:
        """Where received instances are kept."""
        return self.shared_dir / "spool"

    @property
    def results_dir(self) -> Path:
        """Where result objects are kept until delivered."""
        return self.shared_dir / "results"

    @property
    def node_id(self) -> str:
        """This node's name in a cluster (leases, slot folders): ``cluster.node_id``, else
        the host name and the DICOM port, stable across restarts."""
        if self.cluster is not None and self.cluster.node_id:
            return self.cluster.node_id
        return f"{socket.gethostname()}-{self.node.port}"

    @property
    def audit_path(self) -> Path:
        """The append-only audit trail (JSON lines)."""
        return self.node.storage_dir / "audit.jsonl"

    @property
    def database_path(self) -> Path:
        """The SQLite state database."""
        return self.node.storage_dir / "state.sqlite3"


def _unoptional(annotation: Any) -> Any:
    """``X`` from ``X | None`` (an optional section such as ``cluster``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def _section_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows beside ``loc``'s last part (e.g. ``node.max_asociations``
    -> the fields of ``node``); empty where the section is free-form (``match``, ``options``)."""
    model: Any = Config
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _unoptional(field.annotation)
        while typing.get_origin(model) in (list, dict):  # skip the index or the mapping key
            model = typing.get_args(model)[-1]
            if parts:
                parts.pop(0)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _key_text(loc: tuple[Any, ...], data: Any) -> str:
    """``loc`` as the user wrote it, with a route named by its name: ``routes[chest-ct].plugin``."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "routes" and isinstance(loc[1], int) and isinstance(data, dict):
        routes = data.get("routes")
        name = routes[loc[1]].get("name") if isinstance(routes, list) and loc[1] < len(routes) \
            and isinstance(routes[loc[1]], dict) else None
        parts[0:2] = [f"routes[{name}]" if isinstance(name, str) and name else f"routes[{loc[1]}]"]
    return ".".join(parts)


def _format_error(exc: ValidationError, source: str, data: Any = None) -> str:
    lines = []
    for err in exc.errors():
        key = _key_text(err["loc"], data)
        msg = err["msg"].removeprefix("Value error, ")
        if not key:  # cross-field checks put the key in the message
            lines.append(f"{source}: {msg}")
            continue
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), _section_keys(err["loc"]), n=1, cutoff=0.6)
            msg = "unknown key" + (f" (did you mean {near[0]}?)" if near else "")
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a mapping (parsed YAML) into a :class:`Config`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source, data)) from exc


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc


def load_config(path: Path | None) -> Config:
    """Load a config file, or the embedded default when ``path`` is None."""
    if path is None:
        text = resources.files("dicom_node").joinpath(DEFAULT_CONFIG_RESOURCE).read_text()
        return parse_config(_read_yaml(text, "embedded default"), "embedded default")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from exc
    return parse_config(_read_yaml(text, str(path)), str(path))


def with_overrides(config: Config, **node_overrides: Any) -> Config:
    """Return ``config`` with non-None ``node`` settings replaced (CLI flags)."""
    changes = {k: v for k, v in node_overrides.items() if v is not None}
    if not changes:
        return config
    data = config.model_dump()
    data["node"].update(changes)
    return parse_config(data, "command line")
