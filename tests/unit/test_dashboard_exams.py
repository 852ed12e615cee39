"""Unit layer: the dashboard's exam pages in this process (its Starlette routes called as an
ASGI application, a real SQLite exam store): which kind of image each view is read from (or
that it has only a volume, or nothing), the implant flag and an exam skipped for it, and a
patient's priors under the current exam."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from urllib.parse import urlencode

import pytest
from starlette.applications import Starlette

from inference.synthetic import make_exam, make_mammogram, make_tomo_volume
from node.assembly import assign_slots
from node.config import parse_config
from node.dashboard import Dashboard
from node.scp import instance_record
from storage.db import Database
from storage.deliveries import Deliveries
from storage.exams import Exams
from storage.files import FileStore
from storage.reports import Reports
from tests.helpers import asgi_request

pytestmark = pytest.mark.unit

TODAY = dt.datetime.now(dt.UTC).replace(tzinfo=None, hour=9, minute=0, second=0, microsecond=0)
GENERATED = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]


def _add(store: Exams, files: FileStore, datasets, assign=assign_slots) -> None:
    for ds in datasets:
        store.add_instance(
            instance_record(
                ds,
                files,
                "UNIT",
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                "1.2.840.10008.1.2.1",
                100,
            ),
            assign,
            place=lambda: None,
        )


def _rows(html: str) -> list[str]:
    """The list's table rows (the header row left out)."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [r for r in re.split(r"(?=<tr[\s>])", body) if r.startswith("<tr")]


@pytest.fixture
def site(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'ui.db'}")
    files = FileStore(tmp_path / "data", fsync=False)
    store = Exams(db, prior_after_days=30, prior_gap_days=180)
    # The current exam: two conventional views, a synthesized one (3D-only view), one view
    # with only a volume ([grouping] volume_2d = "missing").
    cur = make_exam(
        seed=1, rows=8, cols=8, patient_id="PAT-D", acquisition=TODAY, views=("L-CC", "R-CC")
    )
    study = cur[0].StudyInstanceUID
    synth = make_mammogram(
        "L",
        "MLO",
        rows=8,
        cols=8,
        study_uid=study,
        patient_id="PAT-D",
        accession=cur[0].AccessionNumber,
        acquisition=TODAY,
    )
    synth.ImageType = GENERATED
    vol = make_tomo_volume(
        "R",
        "MLO",
        frames=3,
        rows=8,
        cols=8,
        study_uid=study,
        patient_id="PAT-D",
        accession=cur[0].AccessionNumber,
    )
    _add(store, files, [*cur, synth, vol])
    # Two priors of the patient (the age rule), one of another patient.
    priors = [
        make_exam(
            seed=2 + i,
            rows=8,
            cols=8,
            patient_id="PAT-D",
            acquisition=TODAY - dt.timedelta(days=days),
        )
        for i, days in enumerate((400, 765))
    ]
    stranger = make_exam(
        seed=9, rows=8, cols=8, patient_id="PAT-OTHER", acquisition=TODAY - dt.timedelta(days=500)
    )
    for p in (*priors, stranger):
        _add(store, files, p)
    # An exam whose R-MLO is computed from its volume ([grouping] volume_2d = "mip").
    comp = make_exam(
        seed=5,
        rows=8,
        cols=8,
        patient_id="PAT-C",
        acquisition=TODAY,
        views=("L-CC", "L-MLO", "R-CC"),
    )
    comp_vol = make_tomo_volume(
        "R", "MLO", frames=3, rows=8, cols=8, study_uid=comp[0].StudyInstanceUID, patient_id="PAT-C"
    )
    _add(store, files, [*comp, comp_vol], assign=lambda m: assign_slots(m, volume_2d="mip"))
    # An implant exam the site does not read ([inference] implants = "skip").
    imp = make_exam(seed=6, rows=8, cols=8, patient_id="PAT-I", acquisition=TODAY)
    for ds in imp:
        ds.BreastImplantPresent = "YES"
    _add(store, files, imp)
    from node.worker import IMPLANT_SKIPPED

    others = []
    while (claimed := store.claim_next_ready()) is not None:
        if store.reading_context(claimed[0]).implant:
            assert store.skip(*claimed, IMPLANT_SKIPPED)
        else:
            others.append(claimed)
    for claimed in others:
        store.release_claim(*claimed, "test")
    dash = Dashboard(
        parse_config({}),
        files,
        "/dicomweb",
        exams=store,
        deliveries=Deliveries(db),
        reports=Reports(db),
    )
    app = Starlette(routes=dash.routes())
    yield {
        "app": app,
        "store": store,
        "dash": dash,
        "cur": study,
        "synth": synth,
        "vol": vol,
        "priors": [p[0] for p in priors],
        "stranger": stranger[0],
        "comp": comp[0].StudyInstanceUID,
        "comp_vol": comp_vol,
        "imp": imp[0].StudyInstanceUID,
    }
    db.close()


def _get(app, path: str) -> str:
    status, _, body = asgi_request(app, "GET", path)
    assert status == 200, (path, status, body[:300])
    return body.decode()


def test_exams_list_shows_view_sources_implant_and_priors_under_the_current_exam(site):
    html = _get(site["app"], "/ui")
    rows = _rows(html)
    (i,) = [n for n, r in enumerate(rows) if f">{site['cur']}</a>" in r]
    row = rows[i]
    views = re.findall(r'<div class="view (\w+)" title="([LR]-(?:CC|MLO)): ([^"]+)">\2 <span', row)
    assert views == [
        ("conventional", "L-CC", "conventional 2D"),
        ("synthesized", "L-MLO", "synthesized 2D"),
        ("conventional", "R-CC", "conventional 2D"),
        ("volume_only", "R-MLO", "volume only: read with this view missing"),
    ]
    # The patient's priors on the row under it, oldest first, each a link; not the
    # stranger's study.
    under = rows[i + 1]
    assert under.startswith('<tr class="priors">')
    older, old = sorted(site["priors"], key=lambda d: d.StudyDate)
    links = re.findall(r'<a href="/ui/exams/([\d.]+)">(\d{4}-\d\d-\d\d)</a>', under)
    assert links == [
        (d.StudyInstanceUID, f"{d.StudyDate[:4]}-{d.StudyDate[4:6]}-{d.StudyDate[6:]}")
        for d in (older, old)
    ]
    assert site["stranger"].StudyInstanceUID not in under
    # The priors are exams of their own (state prior), without priors under them.
    for p in site["priors"]:
        (prow,) = [r for r in rows if f">{p.StudyInstanceUID}</a>" in r]
        assert '<span class="state prior">prior</span>' in prow
    assert sum(r.startswith('<tr class="priors">') for r in rows) == 1
    (comp,) = [r for r in rows if f">{site['comp']}</a>" in r]
    assert (
        'title="R-MLO: computed from the tomosynthesis volume">R-MLO <span class="muted '
        'kind">computed</span>' in comp
    )
    (imp,) = [r for r in rows if f">{site['imp']}</a>" in r]
    assert "implant present" in imp and '<span class="state skipped">skipped</span>' in imp
    assert "implant present: not read ([inference] implants = skip)" in imp
    assert "implant present" not in row


def test_exam_page_views_priors_and_a_skipped_implant_read_on_request(site):
    app, store = site["app"], site["store"]
    page = _get(app, f"/ui/exams/{site['cur']}")
    views = re.findall(r'<tr class="view (\w+)"><td>([LR]-(?:CC|MLO))</td>', page)
    assert views == [
        ("conventional", "L-CC"),
        ("synthesized", "L-MLO"),
        ("conventional", "R-CC"),
        ("volume_only", "R-MLO"),
    ]
    assert site["synth"].SOPInstanceUID in page
    assert "volume only: read with this view missing" in page
    assert site["vol"].SOPInstanceUID not in page.split("<h2>Views</h2>")[1].split("</table>")[0]
    for p in site["priors"]:
        assert f'href="/ui/exams/{p.StudyInstanceUID}"' in page
    assert site["stranger"].StudyInstanceUID not in page
    # A prior's page: why it is one, and the patient's current exam.
    prior = _get(app, f"/ui/exams/{site['priors'][0].StudyInstanceUID}")
    assert "StudyDate older than [grouping] prior_after_days" in prior
    assert f'href="/ui/exams/{site["cur"]}"' in prior and "Other studies of this patient" in prior
    # The computed view names the volume it was computed from.
    comp = _get(app, f"/ui/exams/{site['comp']}")
    assert re.search(
        r'<tr class="view computed"><td>R-MLO</td><td>computed from the '
        r'tomosynthesis volume</td><td class="uid">' + re.escape(site["comp_vol"].SOPInstanceUID),
        comp,
    )
    # The implant exam: skipped, says why, and is read on request from the page.
    imp = _get(app, f"/ui/exams/{site['imp']}")
    assert "not read: [inference] implants = skip" in imp and "Complete now" in imp
    status, headers, _ = asgi_request(
        app,
        "POST",
        f"/ui/exams/{site['imp']}/complete",
        body=urlencode({"csrf": site["dash"].sessions.anonymous_csrf}).encode(),
    )
    assert status == 303, headers
    e = Reports(store.db).exam_view(site["imp"])
    assert (e.state, e.read_on_request) == ("ready", True)
    assert "Read on request" in _get(app, f"/ui/exams/{site['imp']}")
