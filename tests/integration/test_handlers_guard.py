"""A DIMSE handler that raises is answered with the service's failure status, logged once
without a traceback, and audited as a failure (real pynetdicom associations on loopback, the
guarded handlers in this process)."""

from __future__ import annotations

import logging

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node import audit as A
from node.handlers import guard, quiet_expected_refusals
from tests.helpers import free_port


class ListAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, dict]] = []

    def event(self, name, outcome=A.SUCCESS, **fields):
        self.events.append((name, outcome, fields))
        return fields


def _boom_find(event):
    yield 0xFF00, _match()
    raise RuntimeError("database went away\nsecond line with details")


def _boom_get(event):
    raise OSError("disk unreadable")
    yield  # pragma: no cover


def _boom_move(event):
    yield "127.0.0.1", 9  # a destination; the failure comes before any sub-operation
    raise ValueError("bad row")


def _boom_store(event):
    raise KeyError("nothing")


def _match() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "1.2.3"
    return ds


@pytest.fixture
def server():
    audit = ListAudit()
    ae = AE(ae_title="GUARDED")
    for cx in (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
        SecondaryCaptureImageStorage,
    ):
        ae.add_supported_context(cx)
    port = free_port()
    handlers = guard(
        [
            (evt.EVT_C_FIND, _boom_find),
            (evt.EVT_C_GET, _boom_get),
            (evt.EVT_C_MOVE, _boom_move),
            (evt.EVT_C_STORE, _boom_store),
        ],
        audit,
    )
    srv = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    yield port, audit
    srv.shutdown()


def _assoc(port):
    scu = AE(ae_title="SCU")
    for cx in (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
        SecondaryCaptureImageStorage,
    ):
        scu.add_requested_context(cx)
    a = scu.associate("127.0.0.1", port, ae_title="GUARDED")
    assert a.is_established
    return a


def _errors(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_find_failure_is_answered_logged_once_and_audited(server, caplog):
    port, audit = server
    a = _assoc(port)
    with caplog.at_level(logging.INFO):
        statuses = [
            st.Status
            for st, _ in a.send_c_find(_match(), StudyRootQueryRetrieveInformationModelFind)
        ]
    a.release()
    assert statuses == [0xFF00, 0xC000]
    errors = _errors(caplog)
    assert [r.name for r in errors] == ["mammo_node"], [r.getMessage() for r in errors]
    assert "C-FIND from SCU failed: RuntimeError: database went away" in errors[0].getMessage()
    assert "second line" not in errors[0].getMessage() and errors[0].exc_info is None
    assert [(n, o) for n, o, _ in audit.events] == [(A.QUERY, A.SERIOUS_FAILURE)]


def test_get_failure_before_its_count(server, caplog):
    port, audit = server
    a = _assoc(port)
    with caplog.at_level(logging.INFO):
        statuses = [
            st.Status
            for st, _ in a.send_c_get(_match(), StudyRootQueryRetrieveInformationModelGet)
            if st
        ]
    a.release()
    assert statuses[-1] == 0xC000
    assert [r.name for r in _errors(caplog)] == ["mammo_node"]
    assert audit.events[0][:2] == (A.BEGIN_TRANSFER, A.SERIOUS_FAILURE)


def test_move_failure_after_its_destination(server, caplog):
    port, audit = server
    a = _assoc(port)
    with caplog.at_level(logging.INFO):
        statuses = [
            st.Status
            for st, _ in a.send_c_move(
                _match(), "ANYWHERE", StudyRootQueryRetrieveInformationModelMove
            )
            if st
        ]
    a.release()
    assert statuses == [0xC000]  # a failure, and no association to the destination
    assert [r.name for r in _errors(caplog)] == ["mammo_node"]
    assert audit.events[0][:2] == (A.BEGIN_TRANSFER, A.SERIOUS_FAILURE)


def test_store_failure_is_processing_failure(server, caplog):
    port, audit = server
    a = _assoc(port)
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with caplog.at_level(logging.INFO):
        st = a.send_c_store(ds)
    a.release()
    assert st.Status == 0xC211
    assert audit.events[0][:2] == (A.INSTANCES_TRANSFERRED, A.SERIOUS_FAILURE)


def test_unknown_move_destination_line_is_dropped(caplog):
    quiet_expected_refusals()
    with caplog.at_level(logging.INFO):
        logging.getLogger("pynetdicom.service_class").error("Unknown Move Destination: X")
        logging.getLogger("pynetdicom.service_class").error("Move SCP: something real")
    assert [r.getMessage() for r in caplog.records] == ["Move SCP: something real"]
