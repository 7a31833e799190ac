"""The explorer in headless Chromium: hovering changes the map, nothing errors, hostile names stay text.

Needs Debian's /usr/bin/chromium and the playwright package (`make test` installs chromium when it can);
playwright never downloads a browser here.
"""

import os

import pytest

from tests.viz.conftest import XSS
from vitkit.viz import write_explorer

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def opened(browser, tmp_path, model, image):
    path = write_explorer(tmp_path / "explorer.html", model, [image], names=[XSS + ".png"], title="t " + XSS)
    page = browser.new_page()
    events = {"console": [], "errors": [], "dialogs": [], "requests": []}
    page.on("console", lambda m: events["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: events["errors"].append(str(e)))
    page.on("request", lambda r: events["requests"].append(r.url))

    def on_dialog(d):
        events["dialogs"].append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    yield page, events
    page.close()


# Reads the heat canvas's pixels in the page: a hash of them and how many distinct colours there are.
READ_PIXELS = """() => {
  const c = document.getElementById('heat');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 2166136261; const colours = new Set();
  for (let i = 0; i < d.length; i += 4) {
    const v = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
    colours.add(v); h = Math.imul(h ^ v, 16777619) >>> 0;
  }
  return [h, colours.size];
}"""


def heat_state(page):
    pixels = page.evaluate(READ_PIXELS)
    return (
        page.locator("#heat").get_attribute("data-query"),
        page.locator("#heat").get_attribute("data-checksum"),
        pixels,
    )


def hover_patch(page, row, col, grid=(4, 6)):
    box = page.locator("#marks").bounding_box()
    x = box["x"] + (col + 0.5) * box["width"] / grid[1]
    y = box["y"] + (row + 0.5) * box["height"] / grid[0]
    page.mouse.move(x, y)


def test_hovering_two_patches_shows_two_maps(opened):
    page, events = opened
    hover_patch(page, 0, 0)
    q1, sum1, px1 = heat_state(page)
    hover_patch(page, 3, 5)
    q2, sum2, px2 = heat_state(page)
    assert (q1, q2) == ("0", "23")
    assert sum1 != sum2 and px1[0] != px2[0]  # the data and the pixels both differ
    assert px1[1] > 10 and px2[1] > 10  # a map, not a flat colour
    # Switching to the class maps and back works without errors.
    for mode in ("rollout", "grad_rollout", "relevance", "attention"):
        page.check(f"input[name=mode][value={mode}]")
        assert page.locator("#heat").get_attribute("data-mode") == mode
    page.select_option("#head", "0")
    assert page.locator("#heat").get_attribute("data-head") == "0"
    assert not events["errors"]
    assert not [m for m in events["console"] if m[0] == "error"]
    assert all(url.startswith("file://") for url in events["requests"])  # nothing fetched from anywhere


def test_hostile_class_name_is_text(opened):
    page, events = opened
    preds = page.locator("#preds")
    assert XSS in preds.inner_text()
    assert page.locator("#preds img").count() == 0 and page.locator("img").count() == 1  # only the photo
    assert XSS in page.locator("#image-select").inner_text() or page.locator("#image-select option").count() == 1
    assert XSS in page.locator("h1").inner_text()
    page.wait_for_timeout(200)
    assert not events["dialogs"] and not events["errors"]
    # Clicking the hostile class explains it, still as text.
    page.locator("#preds li", has_text=XSS).click()
    assert page.locator("#heat").get_attribute("data-mode") == "relevance"
    assert XSS in page.locator("#caption").inner_text()
    assert not events["dialogs"]


def test_click_pins_a_patch(opened):
    page, _ = opened
    hover_patch(page, 1, 2)
    page.mouse.down()
    page.mouse.up()
    hover_patch(page, 2, 4)  # moving away keeps the pinned patch
    assert page.locator("#heat").get_attribute("data-query") == str(1 * 6 + 2)
    assert "pinned" in page.locator("#caption").inner_text()


@pytest.mark.parametrize("kind", ["segmentation", "detection"])
def test_dense_page_shows_the_prediction_and_its_class_maps(browser, tmp_path, kind):
    """A segmentation model's page lists its classes (click: Seg-Grad-CAM), a detector's its queries (click: the
    query's cross-attention); both show the prediction beside the image and hide the classifier-only maps."""
    import torch

    from tests.explain.conftest import detr_model, seg_model

    model = seg_model() if kind == "segmentation" else detr_model()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    path = write_explorer(tmp_path / "dense.html", model, [x], top_k=3)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    mode = "gradcam" if kind == "segmentation" else "cross_attention"
    assert page.locator("#prediction").is_visible()
    assert not page.locator("input[name=mode][value=relevance]").is_visible()
    hover_patch(page, 3, 5)
    assert page.locator("#heat").get_attribute("data-query") == "23"
    page.locator("#preds li").nth(1).click()
    assert page.locator("#heat").get_attribute("data-mode") == mode
    first = heat_state(page)[1]
    page.locator("#preds li").nth(0).click()
    assert heat_state(page)[1] != first  # another class (query), another map
    assert ("Seg-Grad-CAM" if kind == "segmentation" else "cross-attention") in page.locator("#caption").inner_text()
    assert not errors
    page.close()
