"""Configuration: ``config.toml`` loaded into dataclasses and validated at start.

Every error names the offending key (``[node] port``) so that an administrator can fix the
file without reading code. Unknown keys are errors too: a typo must not silently fall back
to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "NodeConfig",
    "GroupingConfig",
    "InferenceConfig",
    "Destination",
    "SecurityConfig",
    "StorageConfig",
    "Peer",
    "TLSConfig",
    "AuditConfig",
    "WebToken",
    "RolesConfig",
    "Config",
    "load_config",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: printable, no backslash, 1-16


class ConfigError(ValueError):
    """Raised for an invalid configuration; the message names the key."""


def _check_ae(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or not _AE_RE.match(value):
        raise ConfigError(
            f"{key} must be a DICOM AE title (1-16 printable characters, no backslash), "
            f"got {value!r}"
        )
    return value.strip()


def check_port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{key} must be an integer port 0-65535, got {value!r}")
    return value


def _check_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def check_device(dev: str, key: str) -> str:
    if dev not in ("auto", "cpu", "cuda") and not re.match(r"^cuda:\d+$", dev):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {dev!r}")
    return dev


def _check_number(value: Any, key: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{key} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _optional_number(
    t: dict[str, Any], key: str, default: float | None, section: str
) -> float | None:
    """A number >= 0, or "" (empty) for none; ``default`` when the key is absent."""
    if key not in t:
        return default
    if t[key] == "":
        return None
    return _check_number(t[key], f"{section} {key}")


def _check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


@dataclass
class NodeConfig:
    ae_title: str = "MAMMO_NODE"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: str = "./mammo-data"
    database_url: str = ""
    max_pdu_size: int = 4 * 1024 * 1024
    max_associations: int = 10
    network_timeout_seconds: float = 60.0
    #: The DIMSE listener speaks the DICOM TLS profile (certificates from ``[tls]``).
    tls: bool = False
    #: Largest dataset accepted, as received and (Deflated) after inflation, in MB.
    max_dataset_mb: float = 2048.0
    #: Most C-FIND responses to one query (the rest are not sent; the log says so).
    max_query_results: int = 1000


@dataclass
class GroupingConfig:
    stable_seconds: float = 60.0
    #: Image kinds in the order a slot takes them (inference.views.SLOT_KINDS; kinds not
    #: named follow in the default order).
    prefer: list[str] = field(default_factory=lambda: ["conventional", "synthesized"])
    #: A study whose StudyDate is more than this many days old on arrival is a prior
    #: (stored, not read); None ("") turns the rule off.
    prior_after_days: float | None = 30.0
    #: A study not read yet becomes a prior when the node holds one of the same patient at
    #: least this many days newer; None ("") turns the rule off.
    prior_gap_days: float | None = 180.0
    #: A view with only a tomosynthesis volume: "missing", or "mip" / "average": a 2D image
    #: computed from the volume (slab maximum-intensity / average projection).
    volume_2d: str = "missing"


@dataclass
class InferenceConfig:
    device: str = "auto"
    checkpoint: str = ""
    #: Seconds one exam may take in the inference process before it is killed and restarted.
    timeout_seconds: float = 900.0
    #: Attempts of an exam whose reading failed for a transient reason (timeout, the
    #: inference process died, I/O), with the delay doubling from retry_delay_seconds.
    max_attempts: int = 3
    retry_delay_seconds: float = 30.0
    #: A worker holds the exam it reads this long, renewed by its heartbeat (every third of
    #: it); an exam whose worker died is taken over by another once it runs out.
    lease_seconds: float = 60.0
    #: The 0-100 exam score above which an exam is called positive (None: the checkpoint's).
    operating_point: float | None = None
    #: An exam with a breast implant: "read" (from the standard views, flagged) or "skip".
    implants: str = "read"
    #: Read one synthetic exam end to end in the inference process before the node says it is
    #: ready, so the first real exam does not pay for imports, decoders and builders.
    warm_up_exam: bool = True
    #: While an exam's images (Secondary Captures, Parametric Maps) are built, decode and
    #: preprocess the next ready exam in the inference process (held in memory: one exam).
    read_ahead: bool = True


@dataclass
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    #: Export over TLS, verifying the PACS's certificate against ``[tls] ca_certificates``.
    tls: bool = False


#: DIMSE services a peer can be granted.
PEER_SERVICES = ("echo", "store", "find", "get", "move")
#: DICOMweb services a token can be granted.
WEB_SERVICES = ("stow", "qido", "wado")


@dataclass
class Peer:
    """A remote application entity and what it may do (``[[peers]]``)."""

    ae_title: str
    #: IP networks it may connect from; empty = any address.
    hosts: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    services: tuple[str, ...] = ("echo", "store")

    def matches(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if not self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.hosts)


@dataclass
class WebToken:
    """A DICOMweb bearer token, stored as its SHA-256 (``[[dicomweb.tokens]]``)."""

    name: str
    sha256: str
    services: tuple[str, ...] = WEB_SERVICES


@dataclass
class TLSConfig:
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = False


@dataclass
class AuditConfig:
    path: str = ""  # empty = <data_dir>/audit.jsonl
    syslog: str = ""  # "" | udp://host:port | tcp://host:port
    #: An audit line that cannot be written refuses the operation it records (instead of
    #: logging the failure and going on).
    fail_closed: bool = False


@dataclass
class SecurityConfig:
    allowed_calling_aets: list[str] = field(default_factory=list)


@dataclass
class StorageConfig:
    fsync: bool = True
    min_free_mb: float = 512.0
    #: Above this disk use, the oldest purgeable studies go first (None: never early).
    purge_above_percent: float | None = 90.0


@dataclass
class LoggingConfig:
    format: str = "text"  # text | json
    level: str = "INFO"


@dataclass
class RetentionConfig:
    #: Received images go this long after their exam is done and delivered (None: never).
    keep_images_days: float | None = 7.0
    #: Produced objects go this long after delivery (None: never).
    keep_results_days: float | None = None
    #: How often the daemon applies the rules.
    check_seconds: float = 300.0


SR_KINDS = ("mammo-cad", "tid1500")


@dataclass
class ResultsConfig:
    sr: list[str] = field(default_factory=lambda: ["mammo-cad", "tid1500"])
    attention_maps: bool = True
    #: The attention maps also as DICOM Parametric Maps (a viewer's own colour map, toggled).
    parametric_maps: bool = True
    #: One Grayscale Softcopy Presentation State per exam with the marks (every PACS viewer).
    presentation_states: bool = True
    #: At most this many marks (regions with a region score) per breast; 0: none.
    max_marks_per_breast: int = 3


@dataclass
class ExportConfig:
    max_attempts: int = 10
    initial_delay_seconds: float = 5.0
    max_delay_seconds: float = 600.0
    #: An exporter's claim on the deliveries it is sending (renewed while it works).
    lease_seconds: float = 60.0


@dataclass
class RolesConfig:
    """Processes started with ``--role listener|worker|exporter``."""

    #: The longest a worker or an exporter waits before it looks for work again. Work is
    #: announced at once (PostgreSQL LISTEN / NOTIFY across processes, in-process wake-ups),
    #: so this only bounds what a lost wake-up, or work that falls due with time, costs.
    poll_seconds: float = 1.0
    #: Where a role process serves /healthz, /readyz and /metrics (its own HTTP server).
    metrics_host: str = "127.0.0.1"
    #: The port of that server for each role; None ("") serves none (a listener serves them on
    #: the DICOMweb port too when [dicomweb] enabled).
    listener_metrics_port: int | None = None
    worker_metrics_port: int | None = None
    exporter_metrics_port: int | None = None

    def metrics_port(self, role: str) -> int | None:
        """The HTTP port of a ``--role`` process (None for ``all`` and when not set)."""
        return getattr(self, f"{role}_metrics_port", None)


@dataclass
class DicomWebConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    root: str = "/dicomweb"
    token: str = ""
    tokens: list[WebToken] = field(default_factory=list)
    tls: bool = False
    max_results: int = 1000
    max_request_mb: float = 2048.0
    max_concurrent_requests: int = 16
    #: Decoded images kept for rendered / thumbnail / WADO-URI requests (8-bit display
    #: images or stored integer values), in MB; 0: none.
    render_cache_mb: float = 128.0
    #: Origins (scheme://host[:port]) whose browser pages may call DICOMweb (CORS).
    cors_origins: list[str] = field(default_factory=list)
    #: A static viewer build (e.g. OHIF's dist) served at /viewer, configured for this node.
    viewer_dir: str = ""
    #: Host names the node is served under (the Host header is checked against them: DNS
    #: rebinding); empty: ``host`` and the loopback names.
    allowed_hosts: list[str] = field(default_factory=list)
    #: The dashboard's session cookie is marked Secure (None: when the node serves HTTPS;
    #: set true behind a TLS-terminating proxy).
    secure_cookies: bool | None = None
    #: A dashboard session ends this many minutes after sign-in.
    session_minutes: float = 480.0

    def host_names(self) -> set[str]:
        """The Host header names accepted (lower case)."""
        names = {h.lower() for h in self.allowed_hosts}
        if not self.allowed_hosts:
            names |= {self.host.lower().strip("[]"), "localhost", "127.0.0.1", "::1"}
        return names

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


@dataclass
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    destinations: list[Destination] = field(default_factory=list)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dicomweb: DicomWebConfig = field(default_factory=DicomWebConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    peers: list[Peer] = field(default_factory=list)
    tls: TLSConfig = field(default_factory=TLSConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    path: Path | None = None

    @property
    def audit_path(self) -> Path:
        if self.audit.path:
            p = Path(self.audit.path).expanduser()
            if not p.is_absolute() and self.path is not None:
                p = self.path.parent / p
            return p
        return self.data_dir / "audit.jsonl"

    def check_startable(self) -> None:
        """Refusals that only matter for a running daemon (secure defaults)."""
        w = self.dicomweb
        if w.enabled and not w.is_loopback and not (w.token or w.tokens):
            raise ConfigError(
                f"[dicomweb] host = {w.host!r} is not a loopback address and no token is set: "
                "anyone who reaches the port could read and upload patient images. Set "
                "[dicomweb] token, or add [[dicomweb.tokens]] entries (name, sha256, services), "
                'or bind [dicomweb] host = "127.0.0.1"'
            )

    @property
    def data_dir(self) -> Path:
        """The data directory, resolved relative to the config file's folder."""
        p = Path(self.node.data_dir).expanduser()
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p.resolve()

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL; empty in the file means SQLite inside ``data_dir``."""
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.data_dir / 'mammo-node.db'}"


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def _check_services(value: Any, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(v not in allowed for v in value):
        raise ConfigError(
            f"{key} must be a non-empty list drawn from {list(allowed)}, got {value!r}"
        )
    return tuple(dict.fromkeys(value))


def _check_file(value: Any, key: str, base: Path | None) -> str:
    text = _check_str(value, key)
    if not text:
        return ""
    p = Path(text).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {p}")
    return str(p)


def _known(section: str, table: dict[str, Any], cls: type) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in names:
            raise ConfigError(
                f"[{section}] {key}: unknown key (known keys: {', '.join(sorted(names))})"
            )


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


Check = Callable[[Any, str], Any]


def _number(minimum: float = 0.0) -> Check:
    return lambda v, key: _check_number(v, key, minimum)


def _integer(minimum: float = 0.0) -> Check:
    return lambda v, key: int(_check_number(v, key, minimum))


def _optional(v: Any, key: str) -> float | None:
    """A number >= 0, or "" (empty) for none."""
    return None if v == "" else _check_number(v, key)


def _choice(*options: str, upper: bool = False) -> Check:
    said = ", ".join(options[:-1]) + f" or {options[-1]}"

    def check(v: Any, key: str) -> str:
        text = _check_str(v, key)
        text = text.upper() if upper else text
        if text not in options:
            raise ConfigError(f"{key} must be {said}, got {text!r}")
        return text

    return check


def _optional_port(v: Any, key: str) -> int | None:
    """A port, or "" (empty) for none."""
    return None if v == "" else check_port(v, key)


def _device(v: Any, key: str) -> str:
    return check_device(_check_str(v, key), key)


#: Every scalar key of every table and its check, once. A key absent from the file keeps the
#: dataclass's default; what a check cannot say about one key alone (paths, lists with their
#: own grammar, keys that depend on each other) follows in parse_config's section steps.
KEYS: dict[str, dict[str, Check]] = {
    "node": {
        "ae_title": _check_ae,
        "host": _check_str,
        "port": check_port,
        "data_dir": _check_str,
        "database_url": _check_str,
        "max_pdu_size": _integer(),
        "max_associations": _integer(1),
        "network_timeout_seconds": _number(1),
        "tls": _check_bool,
        "max_dataset_mb": _number(1),
        "max_query_results": _integer(1),
    },
    "grouping": {
        "stable_seconds": _number(),
        "prior_after_days": _optional,
        "prior_gap_days": _optional,
        "volume_2d": _choice("missing", "mip", "average"),
    },
    "inference": {
        "device": _device,
        "checkpoint": _check_str,
        "timeout_seconds": _number(0.1),
        "max_attempts": _integer(1),
        "retry_delay_seconds": _number(),
        "lease_seconds": _number(1),
        "operating_point": _optional,
        "implants": _choice("read", "skip"),
        "warm_up_exam": _check_bool,
        "read_ahead": _check_bool,
    },
    "storage": {"fsync": _check_bool, "min_free_mb": _number(), "purge_above_percent": _optional},
    "retention": {
        "keep_images_days": _optional,
        "keep_results_days": _optional,
        "check_seconds": _number(1),
    },
    "results": {
        "attention_maps": _check_bool,
        "parametric_maps": _check_bool,
        "presentation_states": _check_bool,
    },
    "export": {
        "max_attempts": _integer(1),
        "initial_delay_seconds": _number(),
        "max_delay_seconds": _number(),
        "lease_seconds": _number(1),
    },
    "dicomweb": {
        "enabled": _check_bool,
        "host": _check_str,
        "port": check_port,
        "root": _check_str,
        "token": _check_str,
        "tls": _check_bool,
        "max_results": _integer(1),
        "max_request_mb": _number(1),
        "max_concurrent_requests": _integer(1),
        "render_cache_mb": _number(),
        "viewer_dir": _check_str,
        "secure_cookies": _check_bool,
        "session_minutes": _number(1),
    },
    "roles": {
        "poll_seconds": _number(0.05),
        "metrics_host": _check_str,
        "listener_metrics_port": _optional_port,
        "worker_metrics_port": _optional_port,
        "exporter_metrics_port": _optional_port,
    },
    "tls": {"require_client_certificate": _check_bool},
    "logging": {
        "format": _choice("text", "json"),
        "level": _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
    },
    "audit": {
        "path": _check_str,
        "syslog": lambda v, key: _check_str(v, key).strip(),
        "fail_closed": _check_bool,
    },
}

#: Each table's dataclass (its fields are the known keys).
TABLES: dict[str, type] = {
    "node": NodeConfig,
    "grouping": GroupingConfig,
    "inference": InferenceConfig,
    "security": SecurityConfig,
    "storage": StorageConfig,
    "retention": RetentionConfig,
    "results": ResultsConfig,
    "export": ExportConfig,
    "dicomweb": DicomWebConfig,
    "roles": RolesConfig,
    "tls": TLSConfig,
    "logging": LoggingConfig,
    "audit": AuditConfig,
}
#: Arrays of tables.
ARRAYS = ("destinations", "peers")


def _scalars(section: str, t: dict[str, Any], target: Any) -> None:
    for key, check in KEYS.get(section, {}).items():
        if key in t:
            setattr(target, key, check(t[key], f"[{section}] {key}"))


def parse_config(raw: dict[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document and build a :class:`Config`."""
    sections = set(TABLES) | set(ARRAYS)
    for key in raw:
        if key not in sections:
            raise ConfigError(f"[{key}]: unknown section (known: {', '.join(sorted(sections))})")

    cfg = Config(path=path)
    tables: dict[str, dict[str, Any]] = {}
    for name, cls in TABLES.items():
        t = tables[name] = _table(raw, name)
        _known(name, t, cls)
        _scalars(name, t, getattr(cfg, name))
    _check_node(cfg.node)
    _check_grouping(tables["grouping"], cfg.grouping)
    _check_inference(cfg.inference)
    cfg.destinations = _destinations(raw.get("destinations", []))
    cfg.peers = _peers(raw.get("peers", []))
    _security(tables["security"], cfg)
    _check_storage(cfg.storage)
    _results(tables["results"], cfg.results)
    _dicomweb(tables["dicomweb"], cfg.dicomweb, path)
    _tls(tables["tls"], cfg, path.parent if path is not None else None)
    if cfg.audit.syslog and not re.fullmatch(r"(udp|tcp)://[^:/\s]+:\d{1,5}", cfg.audit.syslog):
        raise ConfigError(
            f"[audit] syslog must be udp://host:port or tcp://host:port, got {cfg.audit.syslog!r}"
        )
    return cfg


def _check_node(n: NodeConfig) -> None:
    if not n.data_dir:
        raise ConfigError("[node] data_dir must not be empty")
    if n.database_url and "://" not in n.database_url:
        raise ConfigError(
            f"[node] database_url must be an SQLAlchemy URL such as "
            f"'postgresql://user@host/db', got {n.database_url!r}"
        )


def _check_grouping(t: dict[str, Any], g: GroupingConfig) -> None:
    from inference.views import SLOT_KINDS

    prefer = t.get("prefer", g.prefer)
    if (
        not isinstance(prefer, list)
        or any(k not in SLOT_KINDS for k in prefer)
        or len(set(prefer)) != len(prefer)
    ):
        raise ConfigError(
            f"[grouping] prefer must be a list of distinct image kinds out of "
            f"{', '.join(SLOT_KINDS)}, got {prefer!r}"
        )
    g.prefer = list(prefer)


def _check_inference(inf: InferenceConfig) -> None:
    if inf.operating_point is not None and inf.operating_point > 100:
        raise ConfigError(
            f"[inference] operating_point is an exam score 0-100, got {inf.operating_point:g}"
        )


def _array(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"[[{name}]] must be an array of tables")
    for i, d in enumerate(value):
        if not isinstance(d, dict):
            raise ConfigError(f"[[{name}]] #{i + 1} must be a table")
    return value


def _destinations(value: Any) -> list[Destination]:
    out: list[Destination] = []
    seen: set[str] = set()
    for i, d in enumerate(_array(value, "destinations")):
        where = f"[[destinations]] #{i + 1}"
        _known(f"destinations #{i + 1}", d, Destination)
        for key in ("name", "ae_title", "host", "port"):
            if key not in d:
                raise ConfigError(f"{where} {key}: missing")
        name = _check_str(d["name"], f"{where} name")
        if not name or name in seen:
            raise ConfigError(f"{where} name must be non-empty and unique, got {name!r}")
        seen.add(name)
        out.append(
            Destination(
                name=name,
                ae_title=_check_ae(d["ae_title"], f"{where} ae_title"),
                host=_check_str(d["host"], f"{where} host"),
                port=check_port(d["port"], f"{where} port"),
                tls=_check_bool(d.get("tls", False), f"{where} tls"),
            )
        )
    return out


def _network(h: Any, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        text = _check_str(h, f"{where} hosts").strip()
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(
            f"{where} hosts: {h!r} is not an IP address or CIDR block "
            "(host names are not accepted: they can be spoofed)"
        ) from None
    if "/" in text and net.network_address != ipaddress.ip_address(text.split("/")[0]):
        raise ConfigError(
            f"{where} hosts: {h!r} has host bits set (did you mean {net} or {text.split('/')[0]}?)"
        )
    return net


def _peers(value: Any) -> list[Peer]:
    out: list[Peer] = []
    for i, d in enumerate(_array(value, "peers")):
        where = f"[[peers]] #{i + 1}"
        _known(f"peers #{i + 1}", d, Peer)
        if "ae_title" not in d:
            raise ConfigError(f"{where} ae_title: missing")
        hosts = d.get("hosts", [])
        if not isinstance(hosts, list):
            raise ConfigError(f"{where} hosts must be a list of IP addresses or CIDR blocks")
        out.append(
            Peer(
                ae_title=_check_ae(d["ae_title"], f"{where} ae_title"),
                hosts=[_network(h, where) for h in hosts],
                services=_check_services(
                    d.get("services", ["echo", "store"]), f"{where} services", PEER_SERVICES
                ),
            )
        )
    return out


def _security(t: dict[str, Any], cfg: Config) -> None:
    aets = t.get("allowed_calling_aets", [])
    if not isinstance(aets, list):
        raise ConfigError("[security] allowed_calling_aets must be a list of AE titles")
    cfg.security.allowed_calling_aets = [
        _check_ae(a, f"[security] allowed_calling_aets[{i}]") for i, a in enumerate(aets)
    ]
    # The older key keeps working: each AE title becomes a store-only peer (any address).
    known = {p.ae_title for p in cfg.peers}
    for a in cfg.security.allowed_calling_aets:
        if a not in known:
            cfg.peers.append(Peer(ae_title=a, hosts=[], services=("echo", "store")))


def _check_storage(st: StorageConfig) -> None:
    if st.purge_above_percent is not None and not 1 <= st.purge_above_percent <= 100:
        raise ConfigError(
            '[storage] purge_above_percent must be between 1 and 100 (or "" '
            f"for never), got {st.purge_above_percent!r}"
        )


def _results(t: dict[str, Any], res: ResultsConfig) -> None:
    sr = t.get("sr", res.sr)
    if not isinstance(sr, list) or any(k not in SR_KINDS for k in sr):
        raise ConfigError(f"[results] sr must be a list drawn from {list(SR_KINDS)}, got {sr!r}")
    res.sr = list(sr)
    mm = t.get("max_marks_per_breast", res.max_marks_per_breast)
    if isinstance(mm, bool) or not isinstance(mm, int) or not 0 <= mm <= 20:
        raise ConfigError(
            f"[results] max_marks_per_breast must be an integer from 0 to 20, got {mm!r}"
        )
    res.max_marks_per_breast = mm


def _dicomweb(t: dict[str, Any], w: DicomWebConfig, path: Path | None) -> None:
    if not w.root.startswith("/"):
        raise ConfigError(f"[dicomweb] root must start with '/', got {w.root!r}")
    origins = t.get("cors_origins", [])
    if not isinstance(origins, list) or any(
        not isinstance(o, str) or not re.fullmatch(r"(https?://[^/\s]+|\*)", o) for o in origins
    ):
        raise ConfigError(
            "[dicomweb] cors_origins must be a list of origins such as "
            f'"https://viewer.example:3000" (or "*"), got {origins!r}'
        )
    w.cors_origins = list(origins)
    if w.viewer_dir:
        vd = Path(w.viewer_dir).expanduser()
        if not vd.is_absolute() and path is not None:
            vd = path.parent / vd
        if not (vd / "index.html").is_file():
            raise ConfigError(f"[dicomweb] viewer_dir: no index.html in {vd}")
        w.viewer_dir = str(vd)
    hosts = t.get("allowed_hosts", [])
    if not isinstance(hosts, list) or any(
        not isinstance(h, str) or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", h) for h in hosts
    ):
        raise ConfigError(
            "[dicomweb] allowed_hosts must be a list of host names or addresses "
            f'(no scheme, no port) such as "node.example.org", got {hosts!r}'
        )
    w.allowed_hosts = [h.strip("[]") for h in hosts]
    w.tokens = _tokens(t.get("tokens", []))


def _tokens(tokens: Any) -> list[WebToken]:
    if not isinstance(tokens, list):
        raise ConfigError("[[dicomweb.tokens]] must be an array of tables")
    out: list[WebToken] = []
    names: set[str] = set()
    for i, d in enumerate(tokens):
        where = f"[[dicomweb.tokens]] #{i + 1}"
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a table")
        if "token" in d:
            raise ConfigError(f"{where}: write the token's SHA-256 as sha256, never the token")
        _known(f"dicomweb.tokens #{i + 1}", d, WebToken)
        name = _check_str(d.get("name", ""), f"{where} name")
        if not name or name in names:
            raise ConfigError(f"{where} name must be non-empty and unique, got {name!r}")
        names.add(name)
        digest = _check_str(d.get("sha256", ""), f"{where} sha256").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(
                f"{where} sha256 must be 64 hex digits (the SHA-256 of the "
                "token: printf %s TOKEN | sha256sum)"
            )
        out.append(
            WebToken(
                name=name,
                sha256=digest,
                services=_check_services(
                    d.get("services", list(WEB_SERVICES)), f"{where} services", WEB_SERVICES
                ),
            )
        )
    return out


def _tls(t: dict[str, Any], cfg: Config, base: Path | None) -> None:
    c = cfg.tls
    c.certificate = _check_file(t.get("certificate", ""), "[tls] certificate", base)
    c.private_key = _check_file(t.get("private_key", ""), "[tls] private_key", base)
    c.ca_certificates = _check_file(t.get("ca_certificates", ""), "[tls] ca_certificates", base)
    if (cfg.node.tls or cfg.dicomweb.tls) and not (c.certificate and c.private_key):
        raise ConfigError(
            "[node] tls / [dicomweb] tls need [tls] certificate and [tls] private_key"
        )
    if c.require_client_certificate and not c.ca_certificates:
        raise ConfigError(
            "[tls] require_client_certificate needs [tls] ca_certificates "
            "(the CA that signs the peers' certificates)"
        )
    if any(d.tls for d in cfg.destinations) and not c.ca_certificates:
        raise ConfigError(
            "[[destinations]] tls = true needs [tls] ca_certificates to verify "
            "the PACS's certificate"
        )


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate ``path`` (default ``./config.toml``).

    A missing default file gives the built-in defaults; a missing explicit file is an error.
    """
    explicit = path is not None
    p = Path(path if path is not None else "config.toml")
    if not p.exists():
        if explicit:
            raise ConfigError(f"configuration file not found: {p}")
        return Config(path=None)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    try:
        cfg = parse_config(raw, p.resolve())
        ckpt = cfg.inference.checkpoint
        if ckpt:
            path = Path(ckpt).expanduser()
            if not path.is_absolute():
                path = p.resolve().parent / path  # relative to the config file, as data_dir
            if not path.is_file():
                raise ConfigError(f"[inference] checkpoint: file not found: {path}")
            cfg.inference.checkpoint = str(path)
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
