"""Associations the node requests, in one place: export to a PACS, the PACS's C-FIND before a
resend, C-ECHO from the dashboard and from ``mammo-node status``, and the C-MOVE
sub-association to a move destination.

One context manager opens an association as the node (its own Implementation Class UID,
:func:`node.implementation.application_entity`) with the given presentation contexts, one
timeout for ACSE, DIMSE and the network, optional TLS and TCP_NODELAY, and releases it on the
way out whatever happened inside. A failure to associate is an :class:`AssociationFailed`
whose message names the peer, so each caller says the same thing the same way.

A C-MOVE's sub-association is the exception that pynetdicom opens itself, from the listener's
AE (the node's AE title, identity and timeouts) once the handler has named the destination:
:func:`move_destination` is what the handler names it with (the destination's AE title, the
presentation contexts, TLS as for an export: :func:`destination_tls`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pynetdicom import build_context

from node.implementation import application_entity

if TYPE_CHECKING:
    import ssl

    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    from node.config import Config, Destination

#: TLS arguments of ``AE.associate``: the client context and the host name to verify (None:
#: the certificate is not matched to a name).
TLSArgs = tuple["ssl.SSLContext", "str | None"]


class AssociationFailed(Exception):
    """The association was not established. ``tls_setup``: TLS could not even be set up
    (certificate files, the context), as opposed to the peer refusing or not answering."""

    def __init__(self, message: str, tls_setup: bool = False) -> None:
        super().__init__(message)
        self.tls_setup = tls_setup


def nodelay(assoc: Association) -> None:
    """Disable Nagle's algorithm on an association's socket: a C-STORE request is a command
    PDU then data PDUs, and Nagle + the peer's delayed ACK would stall each one ~40 ms."""
    try:
        assoc.dul.socket.socket.setsockopt(  # type: ignore[union-attr]
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
    except (AttributeError, OSError):
        pass


def contexts_for(
    pairs: Sequence[tuple[str, str | Sequence[str]]] | Sequence[str],
) -> list[PresentationContext]:
    """Presentation contexts: abstract syntaxes (default transfer syntaxes) or
    (abstract syntax, transfer syntax or transfer syntaxes in order of preference) pairs."""
    out = []
    for item in pairs:
        if isinstance(item, tuple):
            syntaxes = item[1]
            out.append(
                build_context(item[0], [syntaxes] if isinstance(syntaxes, str) else list(syntaxes))
            )
        else:
            out.append(build_context(item))
    return out


def destination_tls(cfg: Config, dest: Destination) -> TLSArgs | None:
    """TLS to a configured destination with ``tls = true``: the PACS's certificate is
    verified against ``[tls] ca_certificates`` and its host name; None without TLS. The
    certificate files are read here: OSError or ValueError when they cannot be."""
    if not dest.tls:
        return None
    from node.security import client_context

    return client_context(cfg), dest.host


def move_destination(
    cfg: Config, dest: Destination, contexts: Sequence[PresentationContext]
) -> tuple[str, int, dict[str, Any]]:
    """What a C-MOVE handler yields for pynetdicom to open the sub-association to the move
    destination ``dest``: its address, and its AE title, ``contexts`` and TLS as
    ``AE.associate`` keywords. pynetdicom associates from the listener's AE (the node's AE
    title, identity and timeouts) and answers 0xA801 when the destination does not accept."""
    kwargs: dict[str, Any] = {"contexts": list(contexts), "ae_title": dest.ae_title}
    tls = destination_tls(cfg, dest)
    if tls is not None:
        kwargs["tls_args"] = tls
    return dest.host, dest.port, kwargs


@contextmanager
def association(
    calling: str,
    host: str,
    port: int,
    called: str,
    contexts: Sequence[PresentationContext],
    timeout: float,
    tls: TLSArgs | None = None,
    no_delay: bool = False,
) -> Iterator[Association]:
    """An established association from ``calling`` to ``called``@``host``:``port``,
    released (if still up) when the block ends. :class:`AssociationFailed` otherwise."""
    ae = application_entity(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = list(contexts)
    kwargs: dict[str, Any] = {"tls_args": tls} if tls is not None else {}
    where = f"{called}@{host}:{port}"
    try:
        assoc = ae.associate(host, port, ae_title=called, **kwargs)
    except (OSError, ValueError) as exc:  # TLS set-up (certificate files) failed
        raise AssociationFailed(f"cannot open TLS to {where}: {exc}", tls_setup=True) from exc
    if not assoc.is_established:
        raise AssociationFailed(
            f"association with {where} failed{' (TLS)' if tls is not None else ''}"
        )
    if no_delay:
        nodelay(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def echo(
    calling: str, host: str, port: int, called: str, timeout: float, tls: TLSArgs | None = None
) -> bool:
    """C-ECHO: True when the peer answers success. AssociationFailed when it does not
    associate."""
    from pynetdicom.sop_class import Verification

    with association(
        calling, host, port, called, contexts_for([str(Verification)]), timeout, tls
    ) as assoc:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
