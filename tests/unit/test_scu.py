"""Unit layer: node/scu.py, the one helper for the associations the node requests: the C-FIND an
export asks before a resend (against an in-process pynetdicom Query/Retrieve SCP), a peer that
does not associate, and what a C-MOVE handler names its sub-association with."""

from __future__ import annotations

import ssl

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    DigitalMammographyXRayImageStorageForPresentation,
    StudyRootQueryRetrieveInformationModelFind,
)

from node.config import Config, Destination
from node.export import _find_instance
from node.scu import AssociationFailed, association, contexts_for, move_destination
from tests.helpers import free_port

pytestmark = pytest.mark.unit

MG = str(DigitalMammographyXRayImageStorageForPresentation)
STUDY, HELD = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.1.1"


@pytest.fixture
def pacs():
    """A PACS that answers C-FIND at IMAGE level and holds one instance, HELD; the calling AE
    titles of the queries it answered."""
    callers: list[str] = []

    def on_find(event):
        callers.append(str(event.assoc.requestor.ae_title).strip())
        if event.identifier.SOPInstanceUID == HELD:
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID, match.SOPInstanceUID = STUDY, HELD
            yield 0xFF00, match

    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]
    )
    try:
        yield Destination("pacs", "PACS", "127.0.0.1", port), callers
    finally:
        server.shutdown()


def test_find_before_a_resend_says_what_the_destination_holds(pacs):
    dest, callers = pacs
    assert _find_instance("MAMMO_NODE", dest, STUDY, HELD) is True
    assert _find_instance("MAMMO_NODE", dest, STUDY, HELD + "9") is False
    assert callers == ["MAMMO_NODE", "MAMMO_NODE"]  # as the node, one association each


def test_a_destination_that_does_not_associate(pacs):
    dest, _ = pacs
    closed = Destination("gone", "PACS", "127.0.0.1", free_port())  # nobody listens there
    assert _find_instance("MAMMO_NODE", closed, STUDY, HELD) is None  # cannot tell
    with pytest.raises(
        AssociationFailed,
        match=rf"^association with PACS@127\.0\.0\.1:"
        rf"{closed.port} failed$",
    ) as info:
        with association(
            "MAMMO_NODE", closed.host, closed.port, closed.ae_title, contexts_for([MG]), 5
        ):
            pass
    assert not info.value.tls_setup
    # The PACS is up but accepts no storage context: no association either.
    with pytest.raises(AssociationFailed, match=r"^association with PACS@"):
        with association("MAMMO_NODE", dest.host, dest.port, dest.ae_title, contexts_for([MG]), 5):
            pass


def test_contexts_keep_the_transfer_syntaxes_in_order():
    one, several, default = contexts_for(
        [
            (MG, str(JPEG2000Lossless)),
            (MG, [str(JPEG2000Lossless), ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
            MG,
        ]
    )
    assert one.transfer_syntax == [JPEG2000Lossless]
    assert several.transfer_syntax == [
        JPEG2000Lossless,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    assert {one.abstract_syntax, several.abstract_syntax, default.abstract_syntax} == {MG}
    assert ExplicitVRLittleEndian in default.transfer_syntax  # pynetdicom's defaults


def test_move_destination_names_the_sub_association():
    cfg = Config()
    contexts = contexts_for([(MG, str(JPEG2000Lossless))])
    host, port, kwargs = move_destination(
        cfg, Destination("pacs", "PACS", "10.0.0.7", 104), contexts
    )
    assert (host, port, kwargs) == ("10.0.0.7", 104, {"contexts": contexts, "ae_title": "PACS"})
    host, port, kwargs = move_destination(
        cfg, Destination("pacs", "PACS", "pacs.example", 2762, tls=True), contexts
    )
    ctx, server_name = kwargs.pop("tls_args")
    assert (host, port, server_name) == ("pacs.example", 2762, "pacs.example")
    assert (
        isinstance(ctx, ssl.SSLContext)
        and ctx.verify_mode == ssl.CERT_REQUIRED
        and ctx.check_hostname
    )
    assert kwargs == {"contexts": contexts, "ae_title": "PACS"}
