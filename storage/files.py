"""On-disk layout under ``data_dir``.

::

    data_dir/
      mammo-node.db            SQLite database (default URL)
      incoming/<host>-<pid>/   partial datasets a listener process is receiving (each process
                               its own folder: several may share data_dir; cleaned at start)
      instances/<study>/<series>/<sop>.dcm
      results/                 produced SR / SC objects (results issue)

Only UIDs that pass :func:`is_valid_uid` become path components; anything else is refused
before a path is built, so no UID can climb out of ``data_dir``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
from pathlib import Path

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID (and so never a path component)."""


def is_valid_uid(value: object) -> bool:
    """True for 1-64 characters of digits separated by single dots.

    Leading zeros in a component are tolerated (some modalities emit them); anything else
    (letters, slashes, ``..``, spaces, empty components) is not.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def _check(uid: object, name: str) -> str:
    if not is_valid_uid(uid):
        raise InvalidUID(f"{name} is not a valid DICOM UID: {uid!r}")
    return uid  # type: ignore[return-value]


class FileStore:
    """Paths and atomic placement of files under ``data_dir``."""

    def __init__(self, root: Path, fsync: bool = True, per_process: bool = False) -> None:
        """``per_process``: this process receives data into a folder of its own under
        ``incoming`` (the daemon: listeners on several hosts may share ``data_dir``)."""
        self.root = Path(root)
        self.fsync = fsync
        self.incoming_root = self.root / "incoming"
        self.incoming = (
            self.incoming_root / f"{socket.gethostname()}-{os.getpid()}"
            if per_process
            else self.incoming_root
        )
        self.instances = self.root / "instances"
        self.results = self.root / "results"
        for d in (self.root, self.incoming_root, self.incoming, self.instances, self.results):
            d.mkdir(parents=True, exist_ok=True)

    def instance_relpath(self, study: str, series: str, sop: str) -> str:
        """Relative path of an instance file; raises :class:`InvalidUID`."""
        return "/".join(
            (
                "instances",
                _check(study, "StudyInstanceUID"),
                _check(series, "SeriesInstanceUID"),
                _check(sop, "SOPInstanceUID") + ".dcm",
            )
        )

    def abspath(self, relpath: str) -> Path:
        return self.root / relpath

    def place(self, src: Path, relpath: str) -> Path:
        """Move a fully written file into its place atomically (same file system).

        The file's data is flushed to disk before the rename and the directory entry after
        it, so that a success answered afterwards survives a crash or power loss.
        """
        dst = self.root / relpath
        if not src.exists() and dst.exists():
            return dst  # placed by an earlier try of the same store (a retried transaction)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            os.replace(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # incoming dir on another file system
                raise
            shutil.move(str(src), str(dst))
        if self.fsync:
            fd = os.open(dst.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return dst

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def clean_incoming(
        self, older_than_seconds: float = 0.0, others_after_seconds: float = 86400.0
    ) -> int:
        """Remove partial datasets left by aborted associations or a crash: this process's
        own, those of processes of this host that are gone, files of older releases (straight
        under ``incoming``), and anything older than ``others_after_seconds`` (another host's
        process that stopped for good)."""
        removed = 0
        now = time.time()
        host = socket.gethostname()
        for p in list(self.incoming_root.iterdir()):
            try:
                if p.is_dir():
                    name_host, _, pid = p.name.rpartition("-")
                    gone = p == self.incoming or (
                        name_host == host and pid.isdigit() and not _alive(int(pid))
                    )
                    for f in list(p.iterdir()):
                        age = now - f.stat().st_mtime
                        if (gone and age >= older_than_seconds) or age >= others_after_seconds:
                            f.unlink()
                            removed += 1
                    if gone and p != self.incoming and not any(p.iterdir()):
                        p.rmdir()
                elif now - p.stat().st_mtime >= older_than_seconds:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
