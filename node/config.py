"""Configuration: ``config.toml`` loaded into dataclasses and validated at start.

Every error names the offending key (``[node] port``) so that an administrator can fix the
file without reading code. Unknown keys are errors too: a typo must not silently fall back
to a default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
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


def _check_port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{key} must be an integer port 0-65535, got {value!r}")
    return value


def _check_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _check_number(value: Any, key: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{key} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


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


@dataclass
class GroupingConfig:
    stable_seconds: float = 60.0


@dataclass
class InferenceConfig:
    device: str = "auto"
    checkpoint: str = ""


@dataclass
class Destination:
    name: str
    ae_title: str
    host: str
    port: int


@dataclass
class SecurityConfig:
    allowed_calling_aets: list[str] = field(default_factory=list)


@dataclass
class StorageConfig:
    fsync: bool = True
    min_free_mb: float = 512.0


SR_KINDS = ("mammo-cad", "tid1500")


@dataclass
class ResultsConfig:
    sr: list[str] = field(default_factory=lambda: ["mammo-cad", "tid1500"])
    attention_maps: bool = True


@dataclass
class ExportConfig:
    max_attempts: int = 10
    initial_delay_seconds: float = 5.0
    max_delay_seconds: float = 600.0


@dataclass
class DicomWebConfig:
    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = 8080
    root: str = "/dicomweb"
    token: str = ""


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
    path: Path | None = None

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


def parse_config(raw: dict[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document and build a :class:`Config`."""
    sections = {"node", "grouping", "inference", "destinations", "security", "storage",
                "results", "export", "dicomweb"}
    for key in raw:
        if key not in sections:
            raise ConfigError(f"[{key}]: unknown section (known: {', '.join(sorted(sections))})")

    cfg = Config(path=path)

    t = _table(raw, "node")
    _known("node", t, NodeConfig)
    n = cfg.node
    n.ae_title = _check_ae(t.get("ae_title", n.ae_title), "[node] ae_title")
    n.host = _check_str(t.get("host", n.host), "[node] host")
    n.port = _check_port(t.get("port", n.port), "[node] port")
    n.data_dir = _check_str(t.get("data_dir", n.data_dir), "[node] data_dir")
    if not n.data_dir:
        raise ConfigError("[node] data_dir must not be empty")
    n.database_url = _check_str(t.get("database_url", n.database_url), "[node] database_url")
    if n.database_url and "://" not in n.database_url:
        raise ConfigError(
            f"[node] database_url must be an SQLAlchemy URL such as "
            f"'postgresql://user@host/db', got {n.database_url!r}"
        )
    n.max_pdu_size = int(_check_number(t.get("max_pdu_size", n.max_pdu_size),
                                       "[node] max_pdu_size"))
    n.max_associations = int(_check_number(t.get("max_associations", n.max_associations),
                                           "[node] max_associations", 1))
    n.network_timeout_seconds = _check_number(
        t.get("network_timeout_seconds", n.network_timeout_seconds),
        "[node] network_timeout_seconds", 1)

    t = _table(raw, "grouping")
    _known("grouping", t, GroupingConfig)
    cfg.grouping.stable_seconds = _check_number(
        t.get("stable_seconds", cfg.grouping.stable_seconds), "[grouping] stable_seconds")

    t = _table(raw, "inference")
    _known("inference", t, InferenceConfig)
    dev = _check_str(t.get("device", "auto"), "[inference] device")
    if dev not in ("auto", "cpu", "cuda") and not re.match(r"^cuda:\d+$", dev):
        raise ConfigError(f"[inference] device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    cfg.inference.device = dev
    cfg.inference.checkpoint = _check_str(t.get("checkpoint", ""), "[inference] checkpoint")

    dests = raw.get("destinations", [])
    if not isinstance(dests, list):
        raise ConfigError("[[destinations]] must be an array of tables")
    seen: set[str] = set()
    for i, d in enumerate(dests):
        where = f"[[destinations]] #{i + 1}"
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a table")
        _known(f"destinations #{i + 1}", d, Destination)
        for key in ("name", "ae_title", "host", "port"):
            if key not in d:
                raise ConfigError(f"{where} {key}: missing")
        name = _check_str(d["name"], f"{where} name")
        if not name or name in seen:
            raise ConfigError(f"{where} name must be non-empty and unique, got {name!r}")
        seen.add(name)
        cfg.destinations.append(Destination(
            name=name,
            ae_title=_check_ae(d["ae_title"], f"{where} ae_title"),
            host=_check_str(d["host"], f"{where} host"),
            port=_check_port(d["port"], f"{where} port"),
        ))

    t = _table(raw, "security")
    _known("security", t, SecurityConfig)
    aets = t.get("allowed_calling_aets", [])
    if not isinstance(aets, list):
        raise ConfigError("[security] allowed_calling_aets must be a list of AE titles")
    cfg.security.allowed_calling_aets = [
        _check_ae(a, f"[security] allowed_calling_aets[{i}]") for i, a in enumerate(aets)
    ]

    t = _table(raw, "storage")
    _known("storage", t, StorageConfig)
    cfg.storage.fsync = _check_bool(t.get("fsync", cfg.storage.fsync), "[storage] fsync")
    cfg.storage.min_free_mb = _check_number(t.get("min_free_mb", cfg.storage.min_free_mb),
                                            "[storage] min_free_mb")

    t = _table(raw, "results")
    _known("results", t, ResultsConfig)
    sr = t.get("sr", cfg.results.sr)
    if not isinstance(sr, list) or any(k not in SR_KINDS for k in sr):
        raise ConfigError(f"[results] sr must be a list drawn from {list(SR_KINDS)}, got {sr!r}")
    cfg.results.sr = list(sr)
    cfg.results.attention_maps = _check_bool(t.get("attention_maps", True),
                                             "[results] attention_maps")

    t = _table(raw, "export")
    _known("export", t, ExportConfig)
    e = cfg.export
    e.max_attempts = int(_check_number(t.get("max_attempts", e.max_attempts),
                                       "[export] max_attempts", 1))
    e.initial_delay_seconds = _check_number(
        t.get("initial_delay_seconds", e.initial_delay_seconds), "[export] initial_delay_seconds")
    e.max_delay_seconds = _check_number(t.get("max_delay_seconds", e.max_delay_seconds),
                                        "[export] max_delay_seconds")

    t = _table(raw, "dicomweb")
    _known("dicomweb", t, DicomWebConfig)
    w = cfg.dicomweb
    w.enabled = _check_bool(t.get("enabled", w.enabled), "[dicomweb] enabled")
    w.host = _check_str(t.get("host", w.host), "[dicomweb] host")
    w.port = _check_port(t.get("port", w.port), "[dicomweb] port")
    w.root = _check_str(t.get("root", w.root), "[dicomweb] root")
    if not w.root.startswith("/"):
        raise ConfigError(f"[dicomweb] root must start with '/', got {w.root!r}")
    w.token = _check_str(t.get("token", w.token), "[dicomweb] token")
    return cfg


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
