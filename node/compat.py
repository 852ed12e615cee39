"""Library internals the node relies on, in one place, each with why and the versions it
was checked against (pynetdicom 3.0.4, pydicom 3.0.2, highdicom 0.28.2).

If an upgrade breaks one of these, the tests that exercise it fail; nothing else in the
code reaches into a library's private parts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import socket
    import socketserver
    from concurrent.futures import ProcessPoolExecutor

    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext
    from pynetdicom.transport import ThreadedAssociationServer


def wait_until_sent(assoc: Association, timeout: float = 30.0) -> None:
    """Block until the association's outgoing PDU queue is empty.

    Why: pynetdicom's DUL reactor (``dul.DULServiceProvider.run_reactor``) sends queued
    PDUs before it reads the socket, so while a C-FIND handler yields answers faster than
    they go out, an incoming C-CANCEL is not even read until every answer is sent, and the
    encoded answers pile up in memory. Waiting here at intervals lets the DUL read what the
    peer sent (the C-CANCEL) and bounds the queue. ``dul.to_provider_queue`` is a plain
    attribute in pynetdicom 2.x and 3.0.x.
    """
    q = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if q is None:
        return
    deadline = time.monotonic() + timeout
    while not q.empty() and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0005)


def stream_incoming_datasets(file_class: Callable[..., Any]) -> None:
    """Have pynetdicom write each received C-STORE dataset straight into a file that
    ``file_class`` opens (given tempfile's arguments: :meth:`node.scp.IncomingFile.factory`)
    instead of memory.

    Why: ``_config.STORE_RECV_CHUNKED_DATASET`` makes pynetdicom stream the P-DATA fragments
    of a dataset to a ``tempfile.NamedTemporaryFile`` that ``pynetdicom.dimse_messages``
    imports by name; replacing that name is the only way to choose where the file goes and
    to survive a full disk without killing the association. Checked with pynetdicom 2.1 and
    3.0.4 (``dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``).
    """
    from pynetdicom import _config, dimse_messages

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = file_class  # type: ignore[attr-defined]


def received_file_meta_names(implementation_uid: str, version_name: str) -> None:
    """Have the File Meta Information pynetdicom writes at the head of each received C-STORE
    dataset's file carry the node's Implementation Class UID and Version Name.

    Why: with ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes that file meta itself,
    calling ``dsutils.create_file_meta`` (imported by name into ``pynetdicom.dimse_messages``)
    without its ``implementation_uid`` / ``implementation_version`` arguments, so the file
    names pynetdicom as its writer whatever the AE negotiates. Wrapping that name with our
    defaults is the only way to set them. Checked with pynetdicom 3.0.4
    (``dimse_messages.create_file_meta(sop_class_uid=, sop_instance_uid=, transfer_syntax=)``).
    """
    from pydicom.uid import UID
    from pynetdicom import dimse_messages, dsutils

    def create_file_meta(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("implementation_uid", UID(implementation_uid))
        kwargs.setdefault("implementation_version", version_name)
        return dsutils.create_file_meta(*args, **kwargs)

    dimse_messages.create_file_meta = create_file_meta  # type: ignore[attr-defined]


def receiving_file(request: object) -> Any:
    """The file a C-STORE request's dataset was streamed into (None when held in memory).

    Why: pynetdicom keeps it as ``C_STORE._dataset_file`` (3.0.x; the public
    ``event.dataset_path`` gives only its name, and we need our wrapper's write error)."""
    return getattr(request, "_dataset_file", None)


def partial_dataset_file(assoc: Association) -> Any:
    """The file of a dataset still arriving when the connection closed, or None.

    Why: a dataset cut off mid-transfer is never handed to a handler; pynetdicom leaves its
    half-written file as ``DIMSEMessage._data_set_file`` of ``assoc.dimse.message``
    (pynetdicom 2.1, 3.0.4). Removing it is our job."""
    msg = getattr(getattr(assoc, "dimse", None), "message", None)
    return getattr(msg, "_data_set_file", None) if msg is not None else None


def highdicom_sr_base() -> type:
    """highdicom's base class of its SR documents, for SR SOP classes it does not provide
    (the Mammography CAD SR). Why: ``highdicom.sr.sop._SR`` builds the SR General and
    Document modules, content, evidence and predecessor references correctly and is the
    base of its own Comprehensive / Enhanced SR classes; it is private (checked with
    highdicom 0.23 and 0.28.2)."""
    import highdicom as hd

    return hd.sr.sop._SR


def kill_pool_processes(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the worker processes of a ``concurrent.futures.ProcessPoolExecutor``.

    Why: ``shutdown(cancel_futures=True)`` cannot stop a call that is running (a hung
    inference would go on holding the model and the CPU, and every later exam would time out
    behind it); the executor keeps its processes in the private ``_processes`` dict (pid ->
    Process), unchanged from Python 3.8 to 3.13.
    """
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            proc.kill()
        except (OSError, AttributeError):
            pass
    pool.shutdown(wait=False, cancel_futures=True)


def listener_alive(server: socketserver.TCPServer) -> bool:
    """Whether pynetdicom's association server still accepts connections, without opening
    one (a bare TCP probe would hold an association slot until the ACSE timeout).

    Why: ``AE.start_server(block=False)`` keeps no handle on the thread that runs
    ``serve_forever``; pynetdicom 2.x / 3.0 name it ``AcceptorServer@<timestamp>``. The
    listening socket is the server's public ``socket`` (socketserver.BaseServer).
    """
    import threading

    try:
        if server.socket.fileno() < 0:
            return False
    except (AttributeError, OSError):
        return False
    return any(t.name.startswith("AcceptorServer") and t.is_alive() for t in threading.enumerate())


def send_find_responses(
    assoc: Any,
    context_id: int,
    message_id: int,
    sop_class_uid: str,
    identifiers: Iterable[bytes],
    is_cancelled: Callable[[], bool],
    batch_bytes: int = 64 * 1024,
) -> tuple[int, bool]:
    """Send C-FIND pending responses (status 0xFF00) with the already encoded
    ``identifiers`` (bytes in the presentation context's transfer syntax): (number sent,
    whether a C-CANCEL stopped them). The final response is left to pynetdicom (the handler
    returns, or yields the cancel status).

    Why: pynetdicom's per-response path (``service_class._c_find_scp`` ->
    ``dimse.send_msg`` -> ``DIMSEMessage.encode_msg``) encodes the same command set again for
    every answer and sends each message as two P-DATA-TF PDUs, each through the DUL queue,
    its reactor thread and its own ``send`` call: about 0.5 ms an answer, 300+ ms for 640
    studies (issue 21). Here the command set is encoded once; each response is one
    P-DATA-TF PDU holding its command and data set PDVs (PS3.8 9.3.5: one or more PDVs a
    PDU); and on a plain TCP connection many such PDUs are written with one
    ``AssociationSocket.send`` (``dul.socket``), once the DUL queue is empty
    (:func:`wait_until_sent`): nothing else is sent on the association while its handler
    runs, and the reactor thread only reads meanwhile. Not several *responses* in one PDU:
    pynetdicom's receiver (``dimse.receive_primitive`` -> ``decode_msg``) takes one message
    from a P-DATA and drops the PDVs of the next (checked, 3.0.4), so a pynetdicom peer
    would lose answers. On TLS (an SSL socket must not be written in one thread while
    another reads it) each PDU goes through the DUL queue (``dul.send_pdu``) as before.
    The C-FIND-RSP command set comes from ``dimse_messages.C_FIND_RSP.primitive_to_message``
    and the PDV layout (context ID, then the message control header) is ``encode_msg``'s.
    Checked with pynetdicom 3.0.4; ``tests/integration/test_qr.py`` (C-CANCEL) and
    ``tests/integration/test_query_keys.py`` exercise it with pynetdicom and DCMTK findscu as peers.
    """
    import ssl
    import struct
    from io import BytesIO

    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu_primitives import P_DATA

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class_uid
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(b"\0")  # a data set follows
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    command = bytes(encode(msg.command_set, True, True) or b"")
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    max_pdu = int(peer.maximum_length or 0)
    sock = assoc.dul.socket
    direct = sock is not None and not isinstance(getattr(sock, "socket", None), ssl.SSLSocket)
    cx = bytes([context_id])

    def pdvs_of(ident: bytes) -> list[list[tuple[int, bytes]]]:
        """The PDUs (each a list of PDVs) of one response, within the peer's maximum."""
        if not max_pdu or 12 + len(command) + len(ident) <= max_pdu:
            return [[(context_id, b"\x03" + command), (context_id, b"\x02" + ident)]]
        step = max(1, max_pdu - 6)
        out = (
            [[(context_id, b"\x03" + command)]]
            if len(command) <= step
            else [
                [
                    (
                        context_id,
                        (b"\x03" if i + step >= len(command) else b"\x01") + command[i : i + step],
                    )
                ]
                for i in range(0, len(command), step)
            ]
        )
        out += [
            [(context_id, (b"\x02" if i + step >= len(ident) else b"\x00") + ident[i : i + step])]
            for i in range(0, max(1, len(ident)), step)
        ]
        return out

    buffer: list[bytes] = []
    size = sent = 0

    def flush() -> None:
        nonlocal buffer, size
        if buffer:
            sock.send(b"".join(buffer))
            buffer, size = [], 0

    wait_until_sent(assoc)
    for n, ident in enumerate(identifiers):
        if not assoc.is_established:
            return sent, False
        if n % 64 == 0 and n:
            flush()
            wait_until_sent(assoc)  # lets the DUL read a C-CANCEL (see wait_until_sent)
            if is_cancelled():
                return sent, True
        for pdvs in pdvs_of(ident):
            if not direct:
                p = P_DATA()
                p.presentation_data_value_list.extend(pdvs)  # the setter wants lists
                assoc.dul.send_pdu(p)
                continue
            items = b"".join(struct.pack(">I", len(v) + 1) + cx + v for _, v in pdvs)
            buffer.append(b"\x04\x00" + struct.pack(">I", len(items)) + items)
            size += len(buffer[-1])
            if size >= batch_bytes:
                flush()
        sent += 1
    flush()
    wait_until_sent(assoc)
    return sent, False


class _CheapCopyContexts(list):
    """A list of presentation contexts whose deep copy copies each context and its list of
    transfer syntaxes, sharing the (immutable) UIDs: see :func:`fast_context_copies`."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        import copy

        out = []
        for cx in self:
            c = copy.copy(cx)
            c._transfer_syntax = list(cx._transfer_syntax)
            out.append(c)
        return out


def fast_context_copies(server: ThreadedAssociationServer) -> None:
    """Make the per-association copy of the listener's supported contexts cheap.

    Why: pynetdicom's ``transport.RequestHandler.handle`` gives every new association
    ``deepcopy(server.contexts)``; with the ~180 storage and Q/R SOP classes the node
    supports, 16 transfer syntaxes each, that deep copy takes ~105 ms on these machines,
    before the A-ASSOCIATE-AC: most of what a findscu query costs (findscu against
    DCMTK's storescp associates in ~7 ms). A ``PresentationContext`` holds its context ID,
    abstract syntax, transfer syntax list, result and role flags; UIDs are immutable
    ``str``, so copying each context and its transfer syntax list is an equally independent
    copy. ``server.contexts`` is a plain attribute set in ``AssociationServer.__init__``
    (pynetdicom 2.x, 3.0.4).
    """
    server.contexts = _CheapCopyContexts(server.contexts)


def handshake_in_connection_thread(
    server: Any, timeout: float, on_error: Callable[[Any, Exception], None] | None = None
) -> None:
    """Run the TLS handshake of every accepted connection in that connection's own thread,
    with a deadline, instead of in the accept thread.

    Why: pynetdicom's ``AssociationServer.get_request`` (2.x, 3.0.x) wraps the accepted
    socket with ``ssl_context.wrap_socket(..., server_side=True)`` in the thread that
    accepts, on a blocking socket: one TCP connection that never sends a ClientHello stops
    the DIMSE listener for every peer. Here the server's ``ssl_context`` is taken away (so
    ``get_request`` returns the plain socket) and ``process_request_thread`` (the
    per-connection thread of ``socketserver.ThreadingMixIn``) does the handshake under
    ``timeout`` seconds first, then hands the TLS socket, with the same deadline for each
    read and write (see ``node.daemon._accept_with_deadline``), to the original.
    ``on_error(address, exc)`` is told of a failed handshake.
    """
    import ssl

    ctx = server.ssl_context
    if ctx is None:
        return
    server.ssl_context = None
    original = server.process_request_thread

    def process_request_thread(request: socket.socket, client_address: Any) -> None:
        try:
            request.settimeout(timeout)
            tls = ctx.wrap_socket(request, server_side=True)
            tls.settimeout(timeout)  # each read and write keeps the deadline (node.daemon)
        except (OSError, ssl.SSLError, ValueError) as exc:
            if on_error is not None:
                on_error(client_address, exc)
            try:
                request.close()
            except OSError:
                pass
            return
        original(tls, client_address)

    server.process_request_thread = process_request_thread


class MoveRefused(Exception):
    """Raised by a C-MOVE handler after it named its destination, to answer a failure status
    without an association to that destination (:func:`refuse_move`)."""

    def __init__(self, status: int, comment: str = "") -> None:
        super().__init__(f"0x{status:04X} {comment}".strip())
        self.status = status


def refuse_move(status: int, comment: str = "") -> NoReturn:
    """End a C-MOVE with ``status`` (and an Error Comment) before any sub-operation, without
    associating with the move destination.

    Why: pynetdicom's ``service_class._move_scp`` (3.0.x) takes the destination (first
    yield), then the number of sub-operations (second yield), then associates with the
    destination, and only then reads statuses: a refusal found after the destination (a
    retrieve key that is not allowed) could only be answered after connecting to the PACS.
    The second ``next(generator)`` runs inside ``with attempt(rsp, ...) as ctx``, which answers
    ``ctx.error_status`` when the handler raises: this sets that status (and the response's
    ErrorComment) on the ``attempt`` of the calling ``_move_scp`` frame and raises. Its two log
    lines are dropped by :mod:`node.handlers`. Checked with pynetdicom 3.0.4
    (``tests/integration/test_handlers_guard.py``, ``tests/integration/test_qr.py``)."""
    import sys

    from pynetdicom.service_class import attempt

    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_move_scp":
            ctx = frame.f_locals.get("ctx")
            if isinstance(ctx, attempt):
                ctx.error_status = status
                if comment:
                    rsp: Any = ctx._rsp
                    rsp.ErrorComment = comment[:64]
            break
        frame = frame.f_back
    raise MoveRefused(status, comment)
