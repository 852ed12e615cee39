"""The OHIF viewer (@ohif/app 3.13.2, its prebuilt ``dist``) served by the node at /viewer,
in Debian's chromium through playwright: the study list shows a mammography study with its
results, every request the viewer makes succeeds, the viewport shows the mammogram, the
attention-map series and the TID 1500 SR open, the Parametric Map series is listed.
``.ci/run`` fetches the build (``npm pack @ohif/app@3.13.2``) into ``.cache/ohif-3.13.2``;
the test never reaches beyond loopback."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from inference.synthetic import Lesion, make_exam
from tests.helpers import ROOT, free_port, send, wait_for

OHIF_VERSION = "3.13.2"
DIST = Path(
    os.environ.get(
        "MAMMO_NODE_OHIF_DIST", ROOT / ".cache" / f"ohif-{OHIF_VERSION}" / "package" / "dist"
    )
)
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MAMMO_NODE_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture
def browser():
    if not (DIST / "index.html").exists():
        raise RuntimeError(
            f"OHIF {OHIF_VERSION} build missing at {DIST}: run "
            f"`npm pack @ohif/app@{OHIF_VERSION}` and unpack it there "
            "(.ci/run does)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-quic",
                "--no-first-run",
                "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"ohif-{name}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def _busy(png: bytes) -> float:
    """Standard deviation of a screenshot's grey levels (a blank canvas is ~0)."""
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32).std())


def test_ohif_shows_the_study_its_mammograms_and_attention_maps(node_factory, browser):
    port = free_port()
    node = node_factory(
        {
            "dicomweb": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "viewer_dir": str(DIST),
            },
            "results": {"parametric_maps": True},
        },
        worker=True,
    )
    exam = make_exam(
        seed=121,
        rows=640,
        cols=512,
        patient_name="Viewer^Test",
        lesions={"L": [Lesion("spiculated", 0.5, 0.45, 0.08, 0.4)]},
    )
    study = exam[0].StudyInstanceUID
    assert send(node.port, exam) == [0] * 4
    node.wait_exam(study, "done", timeout=180)
    base = f"http://127.0.0.1:{port}"
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    failed: list[str] = []
    page.on(
        "response",
        lambda r: (
            failed.append(f"{r.status} {r.url}")
            if r.status >= 400 and r.url.startswith(base)
            else None
        ),
    )
    console: list[str] = []
    reqs: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"PAGEERROR: {e} {getattr(e, 'stack', '')}"))
    page.on("request", lambda r: reqs.append(f"{r.method} {r.url} {r.headers.get('accept')}"))
    page.on(
        "requestfailed",
        lambda r: failed.append(f"failed {r.url}") if r.url.startswith(base) else None,
    )

    page.goto(f"{base}/viewer/", wait_until="networkidle")
    wait_for(
        lambda: (
            page.locator("text=Viewer^Test").count() > 0
            or page.locator("text=Viewer, Test").count() > 0
        ),
        60,
        interval=0.5,
        what="the study in OHIF's study list",
    )
    _shot(page, "study-list")

    page.goto(f"{base}/viewer/viewer?StudyInstanceUIDs={study}", wait_until="networkidle")
    canvas = page.locator("canvas").first
    wait_for(
        lambda: canvas.count() > 0 and _busy(canvas.screenshot()) > 5,
        90,
        interval=1,
        what="the mammogram drawn in the viewport",
    )
    _shot(page, "viewer")
    grey = _busy(canvas.screenshot())

    for tip in ("text=Skip all", "text=Confirm and hide"):
        if page.locator(tip).count():
            page.locator(tip).first.click()

    def colour_shown() -> bool:
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.int16)
        chroma = np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2])
        return bool((chroma > 60).mean() > 0.01)

    # The Parametric Map series is listed (OHIF lays it over the mammogram when opened on
    # it: seen, test-artifacts from a manual run; not asserted here, OHIF ignores a double
    # click while it still loads the series, which made the step timing-dependent).
    assert page.locator("text=AI attention maps, parametric").count() == 1

    # The attention-map series: its Secondary Captures (colour) replace the mammogram.
    page.locator("text=AI attention maps (").first.dblclick()
    wait_for(colour_shown, 60, interval=1, what="the attention map in the viewport")
    _shot(page, "attention-map")

    # The TID 1500 SR opens in OHIF's SR viewport.
    # Its measurement group is anchored at the attention hot spot: OHIF draws the box and
    # the BI-RADS probabilities on the mammogram. OHIF ignores a double click while it still
    # loads a series (a clean-clone CI run timed out once here): clicked again until drawn.
    def sr_drawn() -> bool:
        if page.locator("text=Probability of BI-RADS 5").count() > 0:
            return True
        page.locator("text=AI reading (TID 1500)").first.dblclick()
        return False

    wait_for(sr_drawn, 90, interval=3, what="the SR's measurements drawn by OHIF")
    _shot(page, "tid1500-sr")
    if os.environ.get("OHIF_DEBUG"):
        for m in console[-30:]:
            print("CONSOLE", m[:1500])
    assert page.locator("text=Something went wrong").count() == 0
    assert grey > 5

    if os.environ.get("OHIF_DEBUG"):
        page.wait_for_timeout(3000)
        for m in console:
            print("CONSOLE", m[:400])
        if page.locator("text=Show Details").count():
            page.click("text=Show Details")
            page.wait_for_timeout(500)
            print("DETAILS", page.inner_text("body")[-3000:])
        for r in reqs:
            print("REQ", r[:300])
    assert failed == [], failed
