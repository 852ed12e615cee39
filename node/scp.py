"""DICOM services of the node: C-ECHO and C-STORE SCP (pynetdicom event handlers).

pynetdicom streams each incoming dataset to a file under ``data_dir/incoming`` while it
arrives (``STORE_RECV_CHUNKED_DATASET``), so a 30 MB mammogram is never held whole in
memory, and each block is validated before it is written (:class:`node.validate.StreamCheck`):
a malformed dataset (a 2 GB volume whose functional groups do not match its frames) stops
being written where it shows, its file is emptied at once, and the C-STORE is refused when
the transfer ends. The C-STORE handler then reads the header only, classifies the view, moves
the file into the store and records its row in one transaction, and only then answers
success.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from node import audit as A
from node.compat import partial_dataset_file, receiving_file
from node.config import Config
from node.implementation import application_entity
from node.ingest import Ingest, StoreError, instance_record, public_message, read_header
from node.security import AccessControl
from node.status import (
    CANNOT_UNDERSTAND,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from node.validate import DEFLATED, DatasetInvalid, StreamCheck
from storage.files import FileStore

if TYPE_CHECKING:
    from node.metrics import NodeMetrics

__all__ = ["IncomingFile", "StorageSCP", "StoreError", "instance_record", "make_ae", "read_header"]

log = logging.getLogger("mammo_node.scp")


#: Transfer syntaxes accepted for storage: uncompressed, deflated, and the compressed ones
#: mammography archives use. Files are stored as received.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old systems)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
]


class RxRefused(OSError):
    """Why an incoming dataset stopped being written, with the C-STORE status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class IncomingFile:
    """The file pynetdicom streams a dataset into, made safe against a full disk.

    pynetdicom writes each P-DATA fragment as it arrives; an ``ENOSPC`` there would kill
    the association. This wrapper records the first write error, truncates the partial file
    to give the space back, swallows the rest of the dataset, and lets the C-STORE handler
    answer "out of resources" (0xA700) instead. The same happens, before the disk is full,
    when the dataset grows past ``limit_bytes`` (``[node] max_dataset_mb``) or free space
    falls below the reserve while it arrives (checked every ``CHECK_EVERY`` bytes), and,
    with the status the validation gives (0xC210), as soon as a block shows the dataset is
    malformed (each block goes through a :class:`StreamCheck` before it is written).
    """

    CHECK_EVERY = 16 * 1024 * 1024

    def __init__(
        self,
        *args: Any,
        directory: str,
        limit_bytes: int,
        disk_ok: Callable[[], bool] | None,
        **kwargs: Any,
    ) -> None:
        """``directory``: data_dir/incoming (the store's file system: placing is a rename);
        ``limit_bytes``: ``[node] max_dataset_mb``; ``disk_ok``: the free-space check. The
        rest is tempfile's, as pynetdicom passes them (see :meth:`factory`)."""
        self.directory, self.limit_bytes, self.disk_ok = directory, limit_bytes, disk_ok
        kwargs.setdefault("dir", directory)
        kwargs.setdefault("prefix", "rx-")
        self._f = tempfile.NamedTemporaryFile(*args, **kwargs)
        self.name = self._f.name
        self.error: OSError | None = None
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.written = 0
        self._next_check = self.CHECK_EVERY
        self.check: StreamCheck | None = StreamCheck(self.limit_bytes)
        #: Where the validation refused the dataset (bytes before the block that showed it).
        self.refused_at: int | None = None

    @classmethod
    def factory(
        cls, directory: str, limit_bytes: int, disk_ok: Callable[[], bool] | None
    ) -> Callable[..., IncomingFile]:
        """What pynetdicom calls (with tempfile's arguments only) to open each received
        dataset's file: this class with the node's settings bound."""
        return functools.partial(cls, directory=directory, limit_bytes=limit_bytes, disk_ok=disk_ok)

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        try:
            self._f.truncate(0)  # give the space back at once
        except OSError:
            pass

    def write(self, data: bytes) -> int:
        if self.error is None:
            self.written += len(data)
            if self.limit_bytes and self.written > self.limit_bytes:
                self._failed(
                    RxRefused(
                        OUT_OF_RESOURCES,
                        f"dataset larger than [node] max_dataset_mb ({self.limit_bytes >> 20} MB)",
                    )
                )
                return len(data)
            if self.written >= self._next_check:
                self._next_check += self.CHECK_EVERY
                if self.disk_ok is not None and not self.disk_ok():
                    self._failed(
                        RxRefused(
                            OUT_OF_RESOURCES,
                            "free space fell below the reserve while the dataset arrived",
                        )
                    )
                    return len(data)
            if self.check is not None:
                try:
                    self.check.feed(data)
                except DatasetInvalid as exc:
                    self._failed(RxRefused(exc.status, str(exc)))
                    self.refused_at = self.written - len(data)
                    return len(data)
                except Exception:  # a bug here must not refuse data: the file is walked
                    log.exception(
                        "validation while receiving failed; the file is validated whole instead"
                    )
                    self.check = None
            try:
                return self._f.write(data)
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._f.flush()
            except OSError as exc:
                self._failed(exc)

    def finish(self) -> None:
        """The last block arrived (the C-STORE handler runs): what the validation still
        holds open is an error too (a dataset that ends inside an element)."""
        if self.error is None and self.check is not None:
            try:
                self.check.finish()
            except DatasetInvalid as exc:
                self._failed(RxRefused(exc.status, str(exc)))
            except Exception:
                log.exception(
                    "validation while receiving failed; the file is validated whole instead"
                )
                self.check = None

    @property
    def validated(self) -> bool:
        """Every byte written passed the validation: the whole-file walk is not needed
        (except for a Deflated dataset, whose header is read from the inflated copy that walk
        writes)."""
        return (
            self.error is None
            and self.check is not None
            and self.check.done
            and self.check.syntax != DEFLATED
        )

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as exc:
            self.error = self.error or exc


class StorageSCP:
    """The C-ECHO / C-STORE service provider bound to one store."""

    def __init__(
        self,
        cfg: Config,
        files: FileStore,
        *,
        ingest: Ingest,
        audit: A.AuditLog | A.NullAudit,
        metrics: NodeMetrics | None = None,
        access: AccessControl | None = None,
    ) -> None:
        """``access``: who may associate (default: from ``[[peers]]``, with this SCP's
        free-space check for storage associations)."""
        self.cfg = cfg
        self.files = files
        self.audit = audit
        self.ingest = ingest
        self.min_free = self.ingest.min_free
        #: Set by the daemon: wake the retention thread to purge what may go. Never a purge
        #: on the caller's thread (an association waiting for its A-ASSOCIATE-AC).
        self.make_room: Callable[[], None] | None = None
        self.access = access or AccessControl(cfg, self.audit, self.room_for_data)

    def disk_ok(self) -> bool:
        """Free space above the reserve: a quick check, safe on a network thread (it runs
        every 16 MB while a dataset arrives)."""
        return self.ingest.disk_ok()

    def room_for_data(self) -> bool:
        """At the start of an association or a STOW request: below the reserve, the retention
        thread is woken to purge what may go (``make_room`` returns at once) and the data is
        refused now; the peer retries once the purge has made room."""
        if self.disk_ok():
            return True
        if self.make_room is not None:
            self.make_room()
        return self.disk_ok()

    # -- handlers ------------------------------------------------------------------------
    def handlers(self) -> list[tuple]:
        return [
            *self.access.handlers(),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_ABORTED, self.on_aborted),
        ]

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS if self.access.allowed(event, "echo") else NOT_AUTHORIZED

    def on_accepted(self, event: evt.Event) -> None:
        a = event.assoc
        log.info(
            "association accepted from %s (%s:%s)",
            a.requestor.ae_title,
            a.requestor.address,
            a.requestor.port,
        )

    def on_aborted(self, event: evt.Event) -> None:
        log.warning("association with %s aborted", event.assoc.requestor.ae_title)

    def on_conn_close(self, event: evt.Event) -> None:
        """Remove the partial file of a dataset whose transfer was interrupted."""
        f = partial_dataset_file(event.assoc)
        if f is not None:
            try:
                f.close()
                Path(f.name).unlink(missing_ok=True)
                log.warning("connection closed mid-dataset: partial data discarded")
            except OSError:
                log.exception("could not remove partial dataset %s", f.name)

    def on_store(self, event: evt.Event) -> int | Dataset:
        req = event.request
        try:
            path = Path(event.dataset_path)
        except (AttributeError, TypeError):
            return self._fail(CANNOT_UNDERSTAND, "C-STORE request without a dataset", None)
        if not self.access.allowed(event, "store"):
            return self._fail(NOT_AUTHORIZED, "peer not granted store", path, req)
        rx = receiving_file(req)
        if isinstance(rx, IncomingFile):
            rx.finish()
        rx_error = getattr(rx, "error", None)
        if rx_error is not None:
            status = getattr(rx_error, "status", OUT_OF_RESOURCES)
            if status == CANNOT_UNDERSTAND:  # malformed: refused as the whole-file check does
                refusal = self.ingest.refuse(
                    status,
                    str(rx_error),
                    event.assoc.requestor.ae_title,
                    peer=self.access.who(event),
                )
                return self._fail(
                    status,
                    f"{refusal.message} (refused while it arrived, "
                    f"at byte {getattr(rx, 'refused_at', '?')})",
                    path,
                    req,
                    comment=refusal.message,
                )
            return self._fail(status, f"cannot take incoming data: {rx_error}", path, req)
        who = self.access.who(event)
        out = self.ingest.store(
            path,
            event.assoc.requestor.ae_title,
            str(getattr(req, "AffectedSOPClassUID", "")),
            str(getattr(req, "AffectedSOPInstanceUID", "")),
            str(event.context.transfer_syntax),
            peer=who,
            validated=bool(getattr(rx, "validated", False)),
        )
        if out.status == SUCCESS:
            return SUCCESS
        if out.status == PROCESSING_FAILURE:
            return PROCESSING_FAILURE
        return self._fail(out.status, out.message, None, req)

    # -- helpers -------------------------------------------------------------------------
    def _fail(
        self,
        status: int,
        message: str,
        path: Path | None,
        req: Any = None,
        comment: str | None = None,
    ) -> Dataset:
        if path is not None:
            path.unlink(missing_ok=True)
        uid = getattr(req, "AffectedSOPInstanceUID", None) if req is not None else None
        log.warning("C-STORE %s refused (0x%04X): %s", uid, status, message)
        rsp = Dataset()
        rsp.Status = status
        # A reason for the peer: never a server path (it says where data lives).
        rsp.ErrorComment = public_message(comment or message)[:64]
        return rsp


def make_ae(cfg: Config) -> AE:
    """An AE with the node's presentation contexts and limits."""
    ae = application_entity(cfg.node.ae_title)
    ae.maximum_pdu_size = cfg.node.max_pdu_size
    ae.maximum_associations = cfg.node.max_associations
    ae.network_timeout = cfg.node.network_timeout_seconds
    ae.acse_timeout = 30
    ae.dimse_timeout = cfg.node.network_timeout_seconds
    ae.add_supported_context(Verification)
    # Storage: as SCP (C-STORE in) and, when a C-GET requestor asks for it, as SCU.
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(
            str(cx.abstract_syntax), TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    from node.qr import QR_CONTEXTS

    for sop_class in QR_CONTEXTS:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES[:3])
    # Calling / called AE titles and addresses are checked by node.security.AccessControl
    # (EVT_REQUESTED), which knows each peer's hosts and services.
    return ae
