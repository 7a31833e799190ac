"""The compare report in headless Chromium: every section present, every image decoded, no console errors.

Needs Debian's /usr/bin/chromium and the playwright package (as tests/viz/test_explorer_browser.py).
"""

import os

import pytest

from tests.viz.test_explorer_browser import ARGS, CHROMIUM
from vitkit.compare.report import SECTIONS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def test_report_renders_offline_with_every_section_and_image(compared):
    out, results, *_ = compared
    events = {"console": [], "errors": [], "requests": []}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page()
        page.on("console", lambda m: events["console"].append((m.type, m.text)))
        page.on("pageerror", lambda e: events["errors"].append(str(e)))
        page.on("request", lambda r: events["requests"].append(r.url))
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        ids = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
        rows = page.eval_on_selector_all("section#cost tbody tr", "els => els.length")
        browser.close()
    assert ids == [sid for sid, _ in SECTIONS]
    # One figure per section that has one (attention distance included: the ViT has attention).
    assert len(images) == len(results["figures"]) == 6
    assert all(done and width > 0 for done, width, _ in images), images
    assert rows == 2
    assert events["errors"] == []
    assert [c for c in events["console"] if c[0] in ("error", "warning")] == []
    assert all(u.startswith(("file:", "data:")) for u in events["requests"]), events["requests"]
