"""A Breast Tomosynthesis volume (enhanced multi-frame) in OHIF 3.13.2 served by the node:
OHIF lists it, loads its frames through WADO-RS frames and scrolls to a given frame (its
overlay says which; the drawn slice differs from the first). Chromium through playwright on
loopback, as in tests/integration/test_ohif.py."""

from __future__ import annotations

import re

from pydicom import dcmread

from inference.synthetic import write_tomo_volume
from tests.helpers import free_port, send, wait_for
from tests.integration.test_ohif import DIST, _busy, _shot, browser  # noqa: F401  (the fixture)

FRAMES, TARGET = 30, 20


def test_ohif_scrolls_a_tomosynthesis_volume_to_a_frame(
    node_factory,
    browser,  # noqa: F811
    tmp_path,
):
    port = free_port()
    node = node_factory(
        {"dicomweb": {"enabled": True, "host": "127.0.0.1", "port": port, "viewer_dir": str(DIST)}}
    )
    path = write_tomo_volume(
        tmp_path / "v.dcm", "L", "MLO", frames=FRAMES, rows=512, cols=416, patient_id="TOMO-OHIF"
    )
    assert send(node.port, [path]) == [0]
    study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
    base = f"http://127.0.0.1:{port}"
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    failed: list[str] = []
    frames_asked: list[str] = []
    page.on(
        "response",
        lambda r: (
            failed.append(f"{r.status} {r.url}")
            if r.status >= 400 and r.url.startswith(base)
            else None
        ),
    )
    page.on("request", lambda r: frames_asked.append(r.url) if "/frames/" in r.url else None)
    page.goto(f"{base}/viewer/viewer?StudyInstanceUIDs={study}", wait_until="networkidle")
    canvas = page.locator("canvas").first
    wait_for(
        lambda: canvas.count() > 0 and _busy(canvas.screenshot()) > 5,
        90,
        interval=1,
        what="the volume's first frame drawn",
    )
    for tip in ("text=Skip all", "text=Confirm and hide"):
        if page.locator(tip).count():
            page.locator(tip).first.click()

    def shown() -> int | None:
        """The frame OHIF's overlay says is drawn ("I:1 (k/30)")."""
        m = re.search(rf"\((\d+)/{FRAMES}\)", page.inner_text("body"))
        return int(m.group(1)) if m else None

    wait_for(lambda: shown() == 1, 30, interval=0.5, what="the overlay at frame 1")
    first = canvas.screenshot()
    _shot(page, "tomo-frame-1")
    box = canvas.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(TARGET * 2):  # one wheel step at a time, each one seen drawn
        now = shown() or 0
        if now >= TARGET:
            break
        page.mouse.wheel(0, 100)
        wait_for(
            lambda now=now: (shown() or 0) > now,
            30,
            interval=0.1,
            what=f"the overlay past frame {now}",
        )
    wait_for(
        lambda: any(u.endswith(f"/frames/{TARGET}") for u in frames_asked),
        30,
        what=f"frame {TARGET} fetched by WADO-RS frames",
    )
    page.wait_for_load_state("networkidle")
    shot = _shot(page, f"tomo-frame-{TARGET}")
    assert shown() == TARGET and shot.exists()
    assert canvas.screenshot() != first  # another slice is drawn (its dense block moved)
    assert _busy(canvas.screenshot()) > 5
    assert failed == [], failed
