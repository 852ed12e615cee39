"""The dashboard in a real browser: Debian's chromium driven by playwright (its own browser
download is not used). Screenshots of every page are saved as test artifacts
(``test-artifacts/dashboard-*.png``, or ``$MAMMO_NODE_ARTIFACTS``)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from inference.synthetic import Lesion, make_exam
from tests.helpers import ROOT, free_port, send, wait_for

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-admin-token"
ARTIFACTS = Path(os.environ.get("MAMMO_NODE_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} missing: apt-get install chromium (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_dashboard_pages_in_chromium(node_factory, storescp_factory, browser):
    pacs = storescp_factory()
    port = free_port()
    node = node_factory(
        {
            "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": port, "token": TOKEN},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
                {
                    "name": "archive",
                    "ae_title": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": free_port(),
                },
            ],  # nobody listens: its deliveries retry
            "export": {"max_attempts": 50, "initial_delay_seconds": 0.5, "max_delay_seconds": 2},
            "grouping": {"stable_seconds": 3600},
        },
        worker=True,
    )
    exam = make_exam(
        seed=111, rows=640, cols=512, lesions={"L": [Lesion("spiculated", 0.5, 0.45, 0.08, 0.4)]}
    )
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    # The patient's study of 2024 (the gap rule: a prior, kept, not read).
    prior = make_exam(
        seed=113,
        rows=64,
        cols=64,
        patient_id=exam[0].PatientID,
        acquisition=dt.datetime(2024, 6, 3, 9, 0),
    )
    assert send(node.port, prior) == [0] * 4
    partial = make_exam(seed=112, rows=64, cols=64)[:3]
    assert send(node.port, partial) == [0] * 3
    node.wait_exam(study, "done", timeout=180)
    wait_for(
        lambda: node.exam(study)["delivery"].get("pacs", {}).get("sent") == 6,
        60,
        what="delivered to the PACS",
    )
    base = f"http://127.0.0.1:{port}"
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    # Signing in: the list redirects to the form; a wrong token is refused.
    page.goto(f"{base}/ui")
    assert page.url.endswith("/ui/login")
    page.fill("input[name=token]", "wrong")
    page.click("button[type=submit]")
    assert "not valid" in page.content()
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/ui")
    errors.clear()  # the 401 of the wrong token was meant

    # Exams list.
    assert page.locator(f"a:has-text('{study}')").count() == 1
    assert page.locator("text=NOT FOR CLINICAL USE").count() == 1
    rows = page.locator("tbody tr:not(.priors)")
    assert rows.count() == 3
    assert "R-MLO" in rows.nth(0).inner_text()  # the partial exam, newest first, misses it
    assert "prior" in rows.nth(1).inner_text()
    # The prior under the patient's current exam, a link to it.
    under = page.locator(f"tr:has(a:has-text('{study}')) + tr.priors")
    assert "priors of this patient: 2024-06-03" in under.inner_text()
    assert under.locator("a").get_attribute("href") == f"/ui/exams/{prior[0].StudyInstanceUID}"
    _shot(page, "exams")
    page.select_option("select[name=state]", "failed")
    page.click("button:has-text('Filter')")
    assert "No exams match the filter" in page.content()
    page.goto(f"{base}/ui?state=done")
    assert page.locator("tbody tr:not(.priors)").count() == 1
    # Triage: by exam score, the read exam (with its marks above the operating point) first.
    page.goto(f"{base}/ui?sort=score")
    rows = page.locator("tbody tr:not(.priors)")
    assert rows.count() == 3 and study in rows.nth(0).inner_text()
    assert "above OP" in rows.nth(0).inner_text()
    listed = node.exam(study)
    assert f"{listed['score']:.0f}" in rows.nth(0).inner_text()
    assert listed["marks_above_operating_point"] >= 1

    # One exam: maps loaded, reading, timeline.
    page.click(f"a:has-text('{study}')")
    page.wait_for_load_state("networkidle")
    imgs = page.locator("img")
    assert imgs.count() == 4
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    assert all(w > 100 for w in widths), widths
    text = page.inner_text("main")
    assert "BI-RADS 5" in text and "Left" in text and "Fusion" in text.title()
    assert text.count("received") >= 4 and "processing -> done" in text
    assert "marks" in text.lower() and "region score" in text.lower()  # th: uppercase
    assert "sent (attempt 1)" in text and "archive" in text
    assert "conventional 2D" in page.inner_text("table.views")
    _shot(page, "exam")
    page.click("a:has-text('2024-06-03')")  # the prior, from the current exam
    text = page.inner_text("main")
    assert "kept for comparison, not read" in text and "Other studies of this patient" in text

    # Destinations: the PACS answers C-ECHO, the archive does not; pause.
    page.goto(f"{base}/ui/destinations")
    row_archive = page.locator("tr:has-text('archive')")
    assert "association with ARCHIVE" in row_archive.inner_text()  # its last error
    page.locator("tr:has-text('PACS@') button:has-text('C-ECHO')").click()
    assert "C-ECHO to pacs: success" in page.inner_text("main")
    row_archive = page.locator("tr:has-text('archive')")
    row_archive.locator("button:has-text('Pause')").click()
    assert "archive paused" in page.inner_text("main")
    assert "paused" in page.locator("tr:has-text('archive')").inner_text()
    _shot(page, "destinations")

    # System.
    page.goto(f"{base}/ui/system")
    text = page.inner_text("main")
    assert "mammo-node 0." in text and "demo checkpoint: NOT FOR CLINICAL USE" in text
    assert "Disk use" in text and "Forecast" in text and "database: ok" in text
    _shot(page, "system")

    # Actions: complete the partial exam now; reprocess the read one.
    page.goto(f"{base}/ui/exams/{partial[0].StudyInstanceUID}")
    page.click("button:has-text('Complete now')")
    assert "processing now without R-MLO" in page.inner_text("main")
    node.wait_exam(partial[0].StudyInstanceUID, "done", timeout=180)
    page.goto(f"{base}/ui/exams/{study}")
    page.click("button:has-text('Reprocess')")
    assert "version 2 is ready" in page.inner_text("main")
    e = node.wait_exam(study, "done", timeout=180)
    assert e["version"] == 2
    page.goto(f"{base}/ui/exams/{study}")
    assert "reprocess from the dashboard" in page.inner_text("main")
    assert errors == [], errors
