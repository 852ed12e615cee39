"""Every key docs/conformance.md lists, with values (single value, wildcard, range, list where
the VR allows), over C-FIND (a real pynetdicom association) and QIDO-RS (HTTP), on SQLite and
PostgreSQL: one running node per backend, loaded once with two studies that differ in every
key. Keys or values the node cannot match are refused naming the key (0xA900 / HTTP 400); a
database that fails answers 0xC320 / HTTP 503 and the node answers again once it is back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import text

from inference.synthetic import make_exam
from node.query import ATTRIBUTES, MATCHING_KEYS, RETURN_KEYS
from tests.helpers import QR_PEER, NodeProcess, free_port, send, wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"

#: The two studies' values (A and B differ in every key the data allows).
VALUES = {
    "A": dict(
        PatientID="PAT-QA",
        PatientName="Alpha^Ann",
        PatientBirthDate="19600101",
        PatientSex="F",
        StudyDate="20260301",
        StudyTime="091500",
        AccessionNumber="ACC-QA",
        StudyDescription="Screening A",
        StudyID="SA1",
        ReferringPhysicianName="Ref^Alice",
        SeriesNumber=7,
        SeriesDescription="Views A",
    ),
    "B": dict(
        PatientID="PAT-QB",
        PatientName="Beta^Bea",
        PatientBirthDate="19700202",
        PatientSex="O",
        StudyDate="20260520",
        StudyTime="143000",
        AccessionNumber="ACC-QB",
        StudyDescription="Diagnostic B",
        StudyID="SB2",
        ReferringPhysicianName="Ref^Bob",
        SeriesNumber=8,
        SeriesDescription="Views B",
    ),
}


def _exams():
    a = make_exam(seed=71, rows=64, cols=48)
    b = make_exam(seed=72, rows=80, cols=64)
    for label, exam, first in (("A", a, 11), ("B", b, 21)):
        for i, ds in enumerate(exam):
            for k, v in VALUES[label].items():
                setattr(ds, k, v)
            ds.InstanceNumber = first + i
            if label == "A":
                ds.NumberOfFrames = 1  # B's images have none: a key only A holds
    return a, b


EXAMS = _exams()
UID = {
    k: {"A": getattr(EXAMS[0][0], k), "B": getattr(EXAMS[1][0], k)}
    for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
}
SC = "1.2.840.10008.5.1.4.1.1.7"

# (key, value, studies matched, value every answer returns for the key or None)
CASES: list[tuple[str, str, set[str], str | None]] = [
    ("PatientID", "PAT-QA", {"A"}, "PAT-QA"),
    ("PatientID", "PAT-?A", {"A"}, "PAT-QA"),
    ("PatientID", "pat-qa", set(), None),  # LO: case-sensitive
    ("PatientName", "Alpha^Ann", {"A"}, "Alpha^Ann"),
    ("PatientName", "ALPHA^ANN", {"A"}, "Alpha^Ann"),  # PN: case-insensitive
    ("PatientName", "*e*a*", {"B"}, "Beta^Bea"),
    ("PatientBirthDate", "19600101", {"A"}, "19600101"),
    ("PatientBirthDate", "-19651231", {"A"}, "19600101"),
    ("PatientBirthDate", "19650101-", {"B"}, "19700202"),
    ("PatientSex", "F", {"A"}, "F"),
    ("PatientSex", "O*", {"B"}, "O"),
    ("StudyInstanceUID", UID["StudyInstanceUID"]["A"], {"A"}, UID["StudyInstanceUID"]["A"]),
    ("StudyInstanceUID", "\\".join(UID["StudyInstanceUID"].values()), {"A", "B"}, None),
    ("StudyDate", "20260301", {"A"}, "20260301"),
    ("StudyDate", "20260201-20260331", {"A"}, "20260301"),
    ("StudyDate", "20260401-", {"B"}, "20260520"),
    ("StudyDate", "-20260101", set(), None),
    ("StudyTime", "0915", {"A"}, "091500"),
    ("StudyTime", "0900-1000", {"A"}, "091500"),
    ("StudyTime", "12:00-", {"B"}, "143000"),
    ("AccessionNumber", "ACC-QB", {"B"}, "ACC-QB"),
    ("AccessionNumber", "*QA", {"A"}, "ACC-QA"),
    ("AccessionNumber", "ACC_QA", set(), None),  # SQL wildcards are data
    ("StudyDescription", "Screening A", {"A"}, "Screening A"),
    ("StudyDescription", "Diag*", {"B"}, "Diagnostic B"),
    ("StudyID", "SA1", {"A"}, "SA1"),
    ("StudyID", "S?2", {"B"}, "SB2"),
    ("ReferringPhysicianName", "Ref^Alice", {"A"}, "Ref^Alice"),
    ("ReferringPhysicianName", "ref^b*", {"B"}, "Ref^Bob"),
    ("ModalitiesInStudy", "MG", {"A", "B"}, "MG"),
    ("ModalitiesInStudy", "CT\\MG", {"A", "B"}, "MG"),
    ("ModalitiesInStudy", "CT", set(), None),
    ("SeriesInstanceUID", UID["SeriesInstanceUID"]["B"], {"B"}, UID["SeriesInstanceUID"]["B"]),
    ("SeriesInstanceUID", "\\".join(UID["SeriesInstanceUID"].values()), {"A", "B"}, None),
    ("Modality", "MG", {"A", "B"}, "MG"),
    ("Modality", "M?", {"A", "B"}, "MG"),
    ("Modality", "CT\\SR", set(), None),
    ("SeriesNumber", "7", {"A"}, "7"),
    ("SeriesDescription", "Views B", {"B"}, "Views B"),
    ("SeriesDescription", "*A", {"A"}, "Views A"),
    ("SOPInstanceUID", UID["SOPInstanceUID"]["A"], {"A"}, UID["SOPInstanceUID"]["A"]),
    ("SOPInstanceUID", "\\".join(UID["SOPInstanceUID"].values()), {"A", "B"}, None),
    ("SOPClassUID", UID["SOPClassUID"]["A"], {"A", "B"}, UID["SOPClassUID"]["A"]),
    ("SOPClassUID", SC, set(), None),
    ("InstanceNumber", "12", {"A"}, "12"),
    ("Rows", "80", {"B"}, "80"),
    ("Columns", "48", {"A"}, "48"),
    ("BitsAllocated", "16", {"A", "B"}, "16"),
    ("BitsAllocated", "8", set(), None),
    ("NumberOfFrames", "1", {"A"}, "1"),
]


def documented_keys() -> tuple[set[str], set[str]]:
    """The matching keys and the return keys the conformance statement's query key table
    lists."""
    text_ = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- table: query-keys -->(.*?)<!-- end -->", text_, re.S)
    assert m, "the query-keys table is missing from docs/conformance.md"
    rows = re.findall(r"^\| ([A-Za-z]+) \| `\(.*?\| ([^|]+) \|$", m.group(1), re.M)
    keys = {k for k, matching in rows if matching.strip() != "return key"}
    returned = {k for k, matching in rows if matching.strip() == "return key"}
    return keys, returned


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_conformance_statement_lists_the_table_and_every_key_is_tested():
    keys, returned = documented_keys()
    assert keys == set(MATCHING_KEYS)
    assert returned == set(RETURN_KEYS)
    assert {k for k, *_ in CASES} == keys


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def loaded(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"query-{request.param}")
    url = (
        f"sqlite:///{tmp / 'q.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_server").new_database("q")
    )
    web = free_port()
    node = NodeProcess(
        tmp,
        {
            "node": {"database_url": url},
            "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": web},
            "peers": [QR_PEER, {"ae_title": "PYNETDICOM", "services": ["echo", "store"]}],
        },
    )
    node.start()
    try:
        assert send(node.port, EXAMS[0] + EXAMS[1]) == [0] * 8
        node.web = f"http://127.0.0.1:{web}/dicomweb"  # type: ignore[attr-defined]
        node.url = url  # type: ignore[attr-defined]
        wait_for(
            lambda: requests.get(f"{node.web}/studies", timeout=5).ok,
            30,  # type: ignore[attr-defined]
            what="DICOMweb up",
        )
        yield node
    finally:
        node.stop()


def _label(uid: str | None) -> str:
    for k, v in UID["StudyInstanceUID"].items():
        if v == uid:
            return k
    for k, v in VALUES.items():
        if v["PatientID"] == uid:
            return k
    raise AssertionError(f"an answer for {uid!r}, neither study")


def _text(elem) -> str:
    if elem.value is None:
        return ""
    return "\\".join(str(v) for v in elem.value) if elem.VM > 1 else str(elem.value)


def c_find(
    node, level: str, keys: dict[str, str], patient_root: bool = False, syntax: str | None = None
):
    """(final status, its error comment, the answers) of one C-FIND."""
    model = (
        PatientRootQueryRetrieveInformationModelFind
        if patient_root
        else StudyRootQueryRetrieveInformationModelFind
    )
    ae = AE(ae_title="QRSCU")
    if syntax:
        ae.add_requested_context(model, [syntax])
    else:
        ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel = level
        q.PatientID = ""
        if level != "PATIENT":
            q.StudyInstanceUID = ""
        for k, v in keys.items():
            tag = tag_for_keyword(k)
            if tag is None:
                q.add_new(0x00091010, "LO", v)  # a private element
            else:
                vr = dictionary_VR(tag)
                try:
                    q.add_new(tag, vr, (int(v) if v else None) if vr == "US" else v)
                except ValueError:  # a value pydicom will not hold ("seven" as IS): raw
                    raw = v.encode() + b" " * (len(v) % 2)
                    q[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
        answers, final = [], None
        for status, ident in assoc.send_c_find(q, model):
            if status.Status in (0xFF00, 0xFF01):
                answers.append(ident)
            else:
                final = status
        assert final is not None
        return final.Status, str(final.get("ErrorComment", "")), answers
    finally:
        assoc.release()


def _level(key: str) -> str:
    return ATTRIBUTES[key].level


@pytest.mark.parametrize(
    "key, value, expected, returned", CASES, ids=[f"{k}={v[:24]}" for k, v, *_ in CASES]
)
def test_c_find_key(loaded, key, value, expected, returned):
    level = _level(key)
    status, comment, answers = c_find(loaded, level, {key: value}, patient_root=level == "PATIENT")
    assert status == 0x0000, comment
    got = [_label(a.PatientID if level == "PATIENT" else a.StudyInstanceUID) for a in answers]
    assert set(got) == expected
    if level in ("PATIENT", "STUDY"):
        assert len(got) == len(expected)  # one answer per entity
    if returned is not None:
        assert {_text(a[key]) for a in answers} == {returned}


def _json_text(elem: dict) -> str:
    vals = elem.get("Value", [])
    return "\\".join(v["Alphabetic"] if isinstance(v, dict) else str(v) for v in vals)


QIDO_PATH = {"PATIENT": "studies", "STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}


@pytest.mark.parametrize(
    "key, value, expected, returned", CASES, ids=[f"{k}={v[:24]}" for k, v, *_ in CASES]
)
def test_qido_key(loaded, key, value, expected, returned):
    level = _level(key)
    r = requests.get(f"{loaded.web}/{QIDO_PATH[level]}", params={key: value}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    got = [_label(a["0020000D"]["Value"][0]) for a in body]
    assert set(got) == expected
    if level in ("PATIENT", "STUDY"):
        assert len(got) == len(expected)
    tag = f"{tag_for_keyword(key):08X}"
    if returned is not None:
        assert {_json_text(a.get(tag, {})) for a in body} == {returned}


def test_counts_and_relational_keys(loaded):
    status, _, answers = c_find(
        loaded,
        "STUDY",
        {
            "StudyDescription": "Screening A",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
            "ModalitiesInStudy": "",
            "NumberOfPatientRelatedStudies": "",
            "SOPInstanceUID": "",
            "InstitutionName": "",
        },
    )
    assert status == 0 and len(answers) == 1
    a = answers[0]
    assert (int(a.NumberOfStudyRelatedSeries), int(a.NumberOfStudyRelatedInstances)) == (1, 4)
    assert a.ModalitiesInStudy == "MG" and int(a.NumberOfPatientRelatedStudies) == 1
    assert a.SOPInstanceUID == "" and a.InstitutionName == ""  # asked, not held here: empty
    status, _, answers = c_find(
        loaded,
        "PATIENT",
        {
            "PatientName": "beta*",
            "NumberOfPatientRelatedStudies": "",
            "NumberOfPatientRelatedSeries": "",
            "NumberOfPatientRelatedInstances": "",
        },
        patient_root=True,
    )
    assert status == 0 and [a.PatientID for a in answers] == ["PAT-QB"]
    assert [
        int(answers[0][k].value)
        for k in (
            "NumberOfPatientRelatedStudies",
            "NumberOfPatientRelatedSeries",
            "NumberOfPatientRelatedInstances",
        )
    ] == [1, 1, 4]
    status, _, answers = c_find(
        loaded,
        "SERIES",
        {"SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": "", "Rows": "64"},
    )
    assert status == 0 and [int(a.NumberOfSeriesRelatedInstances) for a in answers] == [4]
    # A key of a lower level matches relationally: the studies holding such an instance.
    status, _, answers = c_find(loaded, "STUDY", {"SeriesDescription": "Views B"})
    assert status == 0 and [_label(a.StudyInstanceUID) for a in answers] == ["B"]
    r = requests.get(f"{loaded.web}/studies", params={"Rows": "64"}, timeout=30)
    assert [_label(s["0020000D"]["Value"][0]) for s in r.json()] == ["A"]
    assert r.json()[0]["00201208"]["Value"] == [4] and r.json()[0]["00080061"]["Value"] == ["MG"]
    r = requests.get(f"{loaded.web}/studies", params={"limit": "1"}, timeout=30)
    assert len(r.json()) == 1 and "Additional results" in r.headers["Warning"]


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("InstitutionName", "Hospital", "InstitutionName"),  # a key the node does not match on
        ("PrivateTag", "x", "(0009,1010)"),  # a private element with a value
        ("NumberOfStudyRelatedInstances", "4", "NumberOfStudyRelatedInstances"),  # return key
        ("StudyDate", "2026-13", "StudyDate"),
        ("StudyDate", "2026*", "StudyDate"),
        ("StudyTime", "25x", "StudyTime"),
        ("SeriesNumber", "seven", "SeriesNumber"),
        ("Rows", "6*", "Rows"),  # QIDO only: a US key of C-FIND is binary
        ("StudyInstanceUID", "1.2.*", "StudyInstanceUID"),
        ("StudyInstanceUID", "not-a-uid", "StudyInstanceUID"),
    ],
)
def test_refused_keys_name_the_key(loaded, key, value, named):
    if key != "Rows":
        status, comment, answers = c_find(loaded, "STUDY", {key: value})
        assert status == 0xA900 and not answers
        assert comment.startswith(named) or f"{named!r}" in comment, comment
    if key == "PrivateTag":
        return  # QIDO: the same refusal by tag is below
    r = requests.get(f"{loaded.web}/studies", params={key: value}, timeout=30)
    assert r.status_code == 400 and named in r.json()["error"]


@pytest.mark.parametrize(
    "syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"]
)
def test_c_find_in_every_transfer_syntax(loaded, syntax):
    """Implicit and Explicit VR Little Endian take the fast answer path, Deflated
    pynetdicom's: the same answers."""
    status, _, answers = c_find(
        loaded,
        "STUDY",
        {
            "PatientName": "alpha*",
            "StudyDescription": "",
            "NumberOfStudyRelatedInstances": "",
            "ModalitiesInStudy": "",
        },
        syntax=syntax,
    )
    assert status == 0 and len(answers) == 1
    a = answers[0]
    assert (
        str(a.PatientName),
        a.StudyDescription,
        int(a.NumberOfStudyRelatedInstances),
        a.ModalitiesInStudy,
    ) == ("Alpha^Ann", "Screening A", 4, "MG")


def test_qido_unknown_tag_is_refused(loaded):
    r = requests.get(f"{loaded.web}/studies", params={"00091010": "x"}, timeout=30)
    assert r.status_code == 400 and "00091010" in r.json()["error"]


def test_a_database_failure_is_c320_and_503_then_it_answers_again(loaded):
    """The instances table taken away under the running node (a real database error on
    either engine): C-FIND answers 0xC320 and QIDO 503, nothing crashes, and once it is
    back both answer again."""
    from storage.db import Database

    db = Database(loaded.url)
    try:
        with db.engine.begin() as c:
            c.execute(text("ALTER TABLE instances RENAME TO instances_away"))
        try:
            status, comment, _ = c_find(loaded, "STUDY", {"PatientID": "PAT-QA"})
            assert status == 0xC320 and "database" in comment
            r = requests.get(f"{loaded.web}/studies", params={"PatientID": "PAT-QA"}, timeout=30)
            assert r.status_code == 503 and r.headers.get("Retry-After")
        finally:
            with db.engine.begin() as c:
                c.execute(text("ALTER TABLE instances_away RENAME TO instances"))
    finally:
        db.close()
    status, _, answers = c_find(loaded, "STUDY", {"PatientID": "PAT-QA"})
    assert status == 0 and len(answers) == 1
    r = requests.get(f"{loaded.web}/studies", params={"PatientID": "PAT-QA"}, timeout=30)
    assert r.status_code == 200 and len(r.json()) == 1
