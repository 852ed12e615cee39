"""The typed records of storage/ and the transition tables they rest on."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from storage.models import Exam
from storage.reports import DeliveryCounts, ExamDetail, ExamRow, ExamView, StateCounts
from storage.transitions import (
    EXAM_TRANSITIONS,
    OUTBOUND_TRANSITIONS,
    ExamNotFound,
    ExamState,
    IllegalTransition,
    OutboundState,
    check_transition,
)

pytestmark = pytest.mark.unit


def _exam() -> Exam:
    at = dt.datetime(2024, 5, 6, 7, 8, 9)
    exam = Exam(
        study_instance_uid="1.2.3",
        accession_number="A1",
        patient_id="P",
        state="done",
        version=2,
        last_received_at=at,
        state_changed_at=at,
        notes_json='["a note"]',
        kinds_json='{"L-CC": "synthesized"}',
        reading_json=json.dumps(
            {
                "score": 71.5,
                "marks": {
                    "L-CC": [
                        {"slot": "L-CC", "index": 0, "score": 0.9, "above_operating_point": True}
                    ]
                },
            }
        ),
    )
    exam.set_slot("L-CC", "1.2.3.4")
    return exam


def test_exam_view_is_as_dict_field_for_field_in_order() -> None:
    exam = _exam()
    view = ExamView.of(exam)
    assert list(view.to_json()) == list(exam.as_dict())
    assert view.to_json() == exam.as_dict()
    assert view.view_kinds["L-CC"] == "synthesized" and view.marks_above_operating_point == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.state = "ready"  # type: ignore[misc]


def test_exam_row_and_detail_add_their_keys_at_the_end() -> None:
    exam = _exam()
    counts = DeliveryCounts.of_rows([("pacs", "sent", 3), ("pacs", "retrying", 1)])
    row = ExamRow(**exam.as_dict(), delivery=counts, latency_seconds=None)
    js = row.to_json()
    assert list(js)[-2:] == ["delivery", "latency_seconds"]
    assert js["delivery"] == {"pacs": {"sent": 3, "retrying": 1}}
    js["views"]["L-CC"] = "changed"  # a copy: the record stays as it was
    assert row.views["L-CC"] == "1.2.3.4"
    detail = ExamDetail(**exam.as_dict(), reading_json=exam.reading_json)
    assert list(detail.to_json())[-1] == "reading_json"


def test_delivery_counts() -> None:
    assert not DeliveryCounts().all_sent  # nothing queued is not "delivered"
    sent = DeliveryCounts.of_rows([("a", "sent", 2), ("b", "sent", 1)])
    assert sent.all_sent and sent.count("a", "sent") == 2 and sent.count("c", "sent") == 0
    assert not DeliveryCounts.of_rows([("a", "sent", 2), ("b", "pending", 1)]).all_sent
    assert StateCounts({"ready": 1}).to_json() == {"ready": 1}


def test_every_state_has_a_row_and_only_known_targets() -> None:
    assert set(EXAM_TRANSITIONS) == set(ExamState)
    assert set(OUTBOUND_TRANSITIONS) == set(OutboundState)
    for table in (EXAM_TRANSITIONS, OUTBOUND_TRANSITIONS):
        for old, targets in table.items():
            check_transition(old, old, table)  # staying is always allowed
            for new in targets:
                check_transition(old, new, table)


def test_illegal_and_unknown_transitions_are_refused() -> None:
    with pytest.raises(IllegalTransition, match="done -> processing"):
        check_transition("done", "processing", EXAM_TRANSITIONS)
    with pytest.raises(IllegalTransition, match="sent -> gave_up"):
        check_transition("sent", "gave_up", OUTBOUND_TRANSITIONS)
    with pytest.raises(IllegalTransition, match="unknown"):
        check_transition("ready", "lost", EXAM_TRANSITIONS)


def test_exam_not_found_is_a_key_error_that_reads_well() -> None:
    err = ExamNotFound("1.2.3")
    assert isinstance(err, KeyError) and str(err) == "1.2.3"
