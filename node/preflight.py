"""Start-up checks: every reason ``mammo-node start`` cannot run, found before anything is
built, as one line that names the configuration key and the reason (exit code 2, no
traceback). What the configuration loader cannot know from the file alone lives here: whether
``data_dir`` can be created and written, whether the database answers, whether the
certificate files are certificates, whether the checkpoint is a checkpoint, whether the ports
are free."""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import struct
import tempfile

from node.config import Config


class StartupError(Exception):
    """A reason the node cannot start; its text names the key."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_data_dir(cfg: Config) -> None:
    path = cfg.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StartupError(
            f"[node] data_dir = '{path}': cannot create or write it: {_reason(exc)}"
        ) from None


def check_database(cfg: Config) -> None:
    """Connect once (SQLite: the file can be opened in ``data_dir``; PostgreSQL: the server
    answers and takes the credentials). The password never reaches the message."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    url = make_url(cfg.database_url)
    shown = url.render_as_string(hide_password=True)
    args: dict = {}
    if url.get_backend_name() == "postgresql":
        args = {"connect_args": {"connect_timeout": 10}}
    engine = create_engine(url, **args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        raise StartupError(
            f"[node] database_url = '{shown}': cannot connect: {_reason(orig)}"
        ) from None
    except Exception as exc:  # a driver missing, a malformed option
        raise StartupError(f"[node] database_url = '{shown}': {_reason(exc)}") from None
    finally:
        engine.dispose()


def check_audit(cfg: Config) -> None:
    path = cfg.audit_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise StartupError(
            f"[audit] path = '{path}': cannot create or append to it: {_reason(exc)}"
        ) from None


def check_tls(cfg: Config) -> None:
    t = cfg.tls
    uses = cfg.node.tls or cfg.dicomweb.tls or any(d.tls for d in cfg.destinations)
    if not uses:
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if t.certificate and t.private_key:
        try:
            ctx.load_cert_chain(t.certificate, t.private_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise StartupError(
                f"[tls] certificate = '{t.certificate}' / [tls] private_key = "
                f"'{t.private_key}': cannot load them as a PEM certificate and its key: "
                f"{_reason(exc)}"
            ) from None
    if t.ca_certificates:
        try:
            ctx.load_verify_locations(t.ca_certificates)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise StartupError(
                f"[tls] ca_certificates = '{t.ca_certificates}': cannot load "
                f"it as PEM CA certificates: {_reason(exc)}"
            ) from None


#: The largest safetensors header we accept (the demo's is a few kB).
_MAX_HEADER = 64 * 1024 * 1024


def check_checkpoint(cfg: Config) -> None:
    """A configured checkpoint must be a readable safetensors file (its contents are checked
    against the model when the inference process loads it)."""
    path = cfg.inference.checkpoint
    if not path:
        return
    key = f"[inference] checkpoint = '{path}'"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise StartupError(f"{key}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= _MAX_HEADER:
                raise StartupError(f"{key}: not a safetensors file (bad header length)")
            json.loads(f.read(n))
    except OSError as exc:
        raise StartupError(f"{key}: cannot read it: {_reason(exc)}") from None
    except (ValueError, UnicodeDecodeError):
        raise StartupError(f"{key}: not a safetensors file (its header is not JSON)") from None


def check_port(host: str, port: int, key: str) -> None:
    """Whether ``host:port`` can be bound now (0: any free port, nothing to check)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name == "posix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            hint = " (another process listens there)" if exc.errno == errno.EADDRINUSE else ""
            raise StartupError(
                f"{key} = {port}: cannot listen on {host}:{port}: {_reason(exc)}{hint}"
            ) from None


def listen_error(cfg: Config, exc: OSError) -> str:
    """The line for a listener that failed to bind after the checks (a race)."""
    return (
        f"[node] port = {cfg.node.port}: cannot listen on {cfg.node.host}:"
        f"{cfg.node.port}: {_reason(exc)}"
    )


def check(cfg: Config, parts: set[str]) -> None:
    """Every start-up check for a process running ``parts`` (listener, worker, exporter)."""
    check_data_dir(cfg)
    check_audit(cfg)
    check_database(cfg)
    check_tls(cfg)
    if "worker" in parts:
        check_checkpoint(cfg)
    if "listener" in parts:
        check_port(cfg.node.host, cfg.node.port, "[node] port")
        if cfg.dicomweb.enabled:
            check_port(cfg.dicomweb.host, cfg.dicomweb.port, "[dicomweb] port")
