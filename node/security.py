"""Who may do what: DIMSE peers and their services, DICOMweb tokens, TLS contexts.

Deny by default what exposes patients:

* no ``[[peers]]``: anyone may C-ECHO and C-STORE; nobody may query or retrieve;
* with peers: an association is accepted only from a listed AE title coming from one of its
  hosts and calling our own AE title; each DIMSE request is checked against that peer's
  services (refused with 0x0124 "Refused: Not Authorized" otherwise);
* DICOMweb: bearer tokens compared as SHA-256 digests in constant time; each token has its
  services (``stow``, ``qido``, ``wado``). Without any token DICOMweb must listen on loopback
  (:meth:`node.config.Config.check_startable`).

Every decision that refuses something is an audit ``Security Alert``; every association is
a ``User Authentication`` line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynetdicom import AllStoragePresentationContexts, evt

from node import audit as A
from node.config import Config, Peer

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger("mammo_node.security")


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
REJECT_NO_SPACE = (0x02, 0x03, 0x02)  # transient, provider (presentation), local limit

DEFAULT_SERVICES = ("echo", "store")

#: Every storage SOP class the node accepts (a storage association needs free space).
_STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


@dataclass(frozen=True)
class Grant:
    """What one accepted association may do."""

    ae_title: str
    address: str
    services: frozenset[str]
    tls: bool


class AccessControl:
    """Association acceptance and per-request rights for the DIMSE listener."""

    def __init__(
        self,
        cfg: Config,
        audit: A.AuditLog | A.NullAudit,
        disk_ok: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.audit = audit
        self.peers: list[Peer] = list(cfg.peers)
        self.disk_ok = disk_ok or (lambda: True)
        self._grants: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_RELEASED, self.on_end),
            (evt.EVT_ABORTED, self.on_end),
        ]

    def services_for(self, ae_title: str, address: str) -> frozenset[str] | None:
        """The services granted to a peer, or None when it may not associate at all."""
        if not self.peers:
            return frozenset(DEFAULT_SERVICES)
        granted: set[str] = set()
        found = False
        for p in self.peers:
            if p.matches(ae_title, address):
                found = True
                granted.update(p.services)
        return frozenset(granted) if found else None

    def _who(self, assoc: Association) -> dict:
        r = assoc.requestor
        ae_title = str(r.ae_title or "").strip()
        if not ae_title and r.primitive is not None:  # during EVT_REQUESTED
            ae_title = str(r.primitive.calling_ae_title or "").strip()
        return {
            "ae_title": ae_title,
            "address": r.address,
            "port": r.port,
            "tls": self.cfg.node.tls,
        }

    def _reject(self, assoc: Association, rsd: tuple[int, int, int], why: str) -> None:
        who = self._who(assoc)
        log.warning("association from %s (%s) rejected: %s", who["ae_title"], who["address"], why)
        try:
            self.audit.event(
                A.USER_AUTHENTICATION, A.MINOR_FAILURE, action="association", peer=who, reason=why
            )
            if rsd != REJECT_NO_SPACE:
                self.audit.event(
                    A.SECURITY_ALERT,
                    A.MINOR_FAILURE,
                    alert="unauthorized association",
                    peer=who,
                    reason=why,
                )
        except A.AuditUnavailable:
            pass  # a refusal goes ahead unaudited (fail_closed refuses; it does not admit)
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def on_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: accept or reject before any negotiation happens."""
        assoc = event.assoc
        rq = assoc.requestor
        primitive = rq.primitive
        assert primitive is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ arrived
        calling, address = str(primitive.calling_ae_title).strip(), str(rq.address)
        called = str(primitive.called_ae_title).strip()
        services = self.services_for(calling, address)
        if services is None:
            self._reject(
                assoc,
                REJECT_CALLING_AE,
                f"calling AE {calling!r} from {address} is not a configured peer",
            )
            return
        if self.peers and called != self.cfg.node.ae_title:
            self._reject(
                assoc,
                REJECT_CALLED_AE,
                f"called AE {called!r} is not this node ({self.cfg.node.ae_title})",
            )
            return
        proposes_storage = any(
            str(cx.abstract_syntax) in _STORAGE_CLASSES
            for cx in (primitive.presentation_context_definition_list or [])
        )
        if proposes_storage and "store" in services and not self.disk_ok():
            self._reject(
                assoc, REJECT_NO_SPACE, "disk below the free-space reserve ([storage] min_free_mb)"
            )
            return
        self._grants[assoc] = Grant(calling, address, services, self.cfg.node.tls)
        try:
            self.audit.event(
                A.USER_AUTHENTICATION,
                A.SUCCESS,
                action="association",
                peer=self._who(assoc),
                services=sorted(services),
            )
        except A.AuditUnavailable as exc:  # [audit] fail_closed: no unaudited association
            self._grants.pop(assoc, None)
            log.error("association from %s refused: %s", calling, exc)
            assoc.acse.send_reject(*REJECT_NO_SPACE)
            assoc.kill()

    def on_end(self, event: evt.Event) -> None:
        self._grants.pop(event.assoc, None)

    def allowed(self, event: evt.Event, service: str) -> bool:
        """Whether the association of ``event`` may use ``service``; audits a refusal."""
        g = self._grants.get(event.assoc)
        if g is not None and service in g.services:
            return True
        who = self._who(event.assoc)
        why = f"{who['ae_title']} ({who['address']}) is not granted {service!r}" + (
            "" if self.peers else " (no [[peers]] configured: query/retrieve is off)"
        )
        log.warning("request refused: %s", why)
        self.audit.event(
            A.SECURITY_ALERT,
            A.MINOR_FAILURE,
            alert="unauthorized request",
            service=service,
            peer=who,
            reason=why,
        )
        return False

    def who(self, event: evt.Event) -> dict:
        return self._who(event.assoc)


# -- DICOMweb tokens ---------------------------------------------------------------------------
class TokenAuth:
    """Bearer tokens: ``[dicomweb] token`` (all services) and ``[[dicomweb.tokens]]``."""

    def __init__(self, cfg: Config) -> None:
        self.entries: list[tuple[str, bytes, frozenset[str]]] = []
        w = cfg.dicomweb
        if w.token:
            self.entries.append(
                (
                    "token",
                    hashlib.sha256(w.token.encode()).digest(),
                    frozenset(("stow", "qido", "wado")),
                )
            )
        for t in w.tokens:
            self.entries.append((t.name, bytes.fromhex(t.sha256), frozenset(t.services)))

    @property
    def required(self) -> bool:
        return bool(self.entries)

    def authenticate(self, authorization: str) -> tuple[str, frozenset[str]] | None:
        """(token name, services) for a valid ``Bearer`` header, else None. Every entry is
        compared (constant time, no early exit) so timing tells nothing about the tokens."""
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = hashlib.sha256(presented.strip().encode("utf-8", "replace")).digest()
        found = None
        for name, want, services in self.entries:
            if hmac.compare_digest(digest, want) and found is None:
                found = (name, services)
        return found


# -- TLS ----------------------------------------------------------------------------------------
#: TLS 1.2 cipher suites of BCP 195 (RFC 9325 4.2): ephemeral key exchange with AEAD ciphers
#: only (what DCMTK's BCP 195 profiles negotiate).
BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


def server_context(cfg: Config) -> ssl.SSLContext:
    """TLS for our listeners (DIMSE and HTTPS): TLS 1.2+, our certificate, and the peers'
    certificates verified against ``ca_certificates`` (required when configured so)."""
    t = cfg.tls
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)  # TLS 1.2; TLS 1.3's suites are all AEAD already
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(t.certificate, t.private_key)
    if t.ca_certificates:
        ctx.load_verify_locations(cafile=t.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if t.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(cfg: Config) -> ssl.SSLContext:
    """TLS for exports: the PACS's certificate verified against ``ca_certificates``; ours
    presented when configured (PACS that require client certificates)."""
    t = cfg.tls
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=t.ca_certificates or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if t.certificate and t.private_key:
        ctx.load_cert_chain(t.certificate, t.private_key)
    return ctx
