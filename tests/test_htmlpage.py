"""The HTML pages: how they are put together, and a demo-sized report opened in headless Chromium.

The browser tests need the system's Chromium (`sudo apt-get install chromium`) and skip, saying so,
without it; CI sets REQUIRE_BROWSER=1, which turns that skip into a failure.
"""
import base64
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import htmlpage
from scripts.browser import INSTALL, chromium, open_page
from tests.conftest import TINY_DEMO_SCENES
from tests.helpers import page_data, run_script
from results import attention_bytes
from visualize import attention_from_bytes

TEST_IMAGES = TINY_DEMO_SCENES // 10  # the demo workspace's TEST split: 10% of its scenes


# ----------------------------------------------------------------------------- without a browser

def test_markdown_as_compare_writes_it(tmp_path):
    Image.new("RGB", (4, 3), "red").save(tmp_path / "plot.png")
    text = "\n".join([
        "# Comparison: a vs b", "", "Made by `compare.py` on 2 < 3 runs; see [the page](report.html#browse).", "",
        "- **b** beats **a** on 3 of 4", "  Largest gains: CIDEr +0.1.", "- *x* <y>", "",
        "| run | CIDEr |", "|---|---|", "| a | 1.0 |", "| b | *2.0* |", "", "![curves](plot.png)", ""])
    out = htmlpage.markdown(text, tmp_path)
    assert "<h1>Comparison: a vs b</h1>" in out
    assert ('<p>Made by <code>compare.py</code> on 2 &lt; 3 runs; see <a href="report.html#browse">the page</a>.</p>'
            in out)
    assert "<li><strong>b</strong> beats <strong>a</strong> on 3 of 4<br>Largest gains: CIDEr +0.1.</li>" in out
    assert "<li><em>x</em> &lt;y&gt;</li>" in out
    assert "<thead><tr><th>run</th><th>CIDEr</th></tr></thead>" in out and "<td><em>2.0</em></td>" in out
    uri = re.search(r'<img alt="curves" src="data:image/png;base64,([^"]+)">', out).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(uri))).size == (4, 3)


def test_page_data_cannot_end_its_script_early():
    data = {"runs": [], "images": [{"caps": [{"caption": "</script><script>alert(1)</script>"}]}], "split": "TEST"}
    page = htmlpage.page("t", data)
    assert page_data(page) == data


def test_image_uri_keeps_the_picture_and_picks_the_smaller_encoding():
    flat = np.zeros((3, 64, 64), dtype=np.uint8)
    flat[0, 10:30, 10:30] = 255
    noisy = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    for image, mime in ((flat, "image/png"), (noisy, "image/jpeg")):
        uri = htmlpage.image_uri(image)
        assert uri.startswith(f"data:{mime};base64,")
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
        assert decoded.shape == (64, 64, 3)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(
        htmlpage.image_uri(flat).split(",", 1)[1])))).transpose(2, 0, 1), flat)  # PNG: lossless
    small = htmlpage.image_uri(noisy, size=32)
    assert Image.open(io.BytesIO(base64.b64decode(small.split(",", 1)[1]))).size == (32, 32)


def test_attention_bytes_round_trip_to_within_a_level():
    alphas = torch.softmax(torch.randn(7, 64) * 3, dim=1)
    maps = attention_from_bytes(attention_bytes(alphas), 8)
    scaled = alphas / alphas.max(dim=1, keepdim=True).values
    assert maps.shape == (7, 64) and (maps - scaled).abs().max() <= 0.5 / 255 + 1e-6


# ----------------------------------------------------------------------------- in Chromium

@pytest.fixture(scope="module")
def browser():
    """Skips (or, under REQUIRE_BROWSER=1, fails) without the system's Chromium and Playwright."""
    try:
        import playwright  # noqa: F401
        missing = None if chromium() else f"Chromium not found: {INSTALL}"
    except ImportError:
        missing = "Playwright not installed: make install"
    if missing:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(f"REQUIRE_BROWSER is set but {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def demo_page(demo_workspace):
    """The report.html `make demo` wrote in the test workspace: its TEST images, the three decoders at
    beam 3 (rnn, attention, transformer: the page's runs in that order), the maps of the last two
    (conftest.demo_workspace)."""
    runs = demo_workspace / "runs"
    tables = {d: json.loads((runs / f"demo-{d}" / "eval_TEST_images_beam3.json").read_text())["images"]
              for d in ("rnn", "attention", "transformer")}
    return demo_workspace / "runs" / "reports" / "demo" / "report.html", tables


def shown(page):
    """(the count line's two numbers, the rows in the page)."""
    numbers = tuple(map(int, re.findall(r"\d+", page.inner_text("#count"))))
    return numbers, page.locator("#rows .row").count()


def test_report_opens_without_errors_and_fits_the_window(browser, demo_page):
    path, _ = demo_page
    assert os.path.getsize(path) < 20e6
    with open_page(path) as (page, errors):
        assert page.locator("#report-view").is_visible() and not page.locator("#browse-view").is_visible()
        assert page.locator("#report-view table").count() >= 4  # quality per beam, cost, overlays, errors
        pictures = page.eval_on_selector_all("#report-view img", "els => els.map(e => e.naturalWidth)")
        assert len(pictures) >= 4 and all(w > 0 for w in pictures)  # every plot decoded
        assert page.evaluate("document.documentElement.scrollWidth") <= 1400  # no sideways scrolling
        page.click("nav a[href='#browse']")
        page.wait_for_selector("#browse-view", state="visible")  # hashchange is handled as a later task
        assert not page.locator("#report-view").is_visible()
        assert shown(page) == ((TEST_IMAGES, TEST_IMAGES), 40)  # rendered 40 at a time
        page.locator("#more").scroll_into_view_if_needed()
        page.wait_for_function("document.querySelectorAll('#rows .row').length > 40")
        assert shown(page)[1] == 80
        assert errors == []


def test_filters_and_sort_agree_with_eval_results(browser, demo_page):
    path, tables = demo_page
    rnn, att = tables["rnn"], tables["attention"]
    disagree = sum(len({t[i]["caption"] for t in tables.values()}) > 1 for i in range(TEST_IMAGES))  # any two
    att_wrong = sum(not a["describes_scene"] and b["describes_scene"] for a, b in zip(att, rnn, strict=True))
    missed = sum(any(0 in (t[i].get("pointing") or []) for t in tables.values()) for i in range(TEST_IMAGES))
    gain = [a["CIDEr"] - b["CIDEr"] for a, b in zip(att, rnn, strict=True)]
    # at test size the three runs disagree, and one of them misses an object, on nearly every image (all 100 here)
    assert 0 < disagree <= TEST_IMAGES and 0 < missed <= TEST_IMAGES
    with open_page(str(path) + "#browse") as (page, errors):
        page.select_option("#filter", "disagree")
        assert shown(page) == ((disagree, TEST_IMAGES), min(disagree, 40))
        page.select_option("#filter", "x-wrong")
        page.select_option("#run-x", "1")  # attention wrong, rnn right
        page.select_option("#run-y", "0")
        assert shown(page) == ((att_wrong, TEST_IMAGES), min(att_wrong, 40))
        page.select_option("#filter", "pointing")
        assert shown(page) == ((missed, TEST_IMAGES), min(missed, 40))
        page.select_option("#filter", "all")
        page.select_option("#run-x", "0")
        page.select_option("#run-y", "1")
        page.select_option("#sort", "diff-desc")
        first = max(range(TEST_IMAGES), key=lambda i: (gain[i], -i))
        assert page.inner_text("#rows .row:first-child figcaption.title") == f"TEST {first}"
        page.select_option("#sort", "diff-asc")
        last = min(range(TEST_IMAGES), key=lambda i: (gain[i], i))
        assert page.inner_text("#rows .row:first-child figcaption.title") == f"TEST {last}"
        assert errors == []


def test_hovering_and_stepping_through_words_shows_their_attention(browser, demo_page):
    path, tables = demo_page
    with open_page(str(path) + "#browse") as (page, errors):
        row = page.locator("#rows .row").first
        canvas = row.locator("canvas")
        page.wait_for_function("document.querySelector('#rows canvas').getContext('2d')"
                               ".getImageData(112, 112, 1, 1).data[3] > 0")  # the picture is drawn
        plain = canvas.evaluate("c => c.toDataURL()")
        words = row.locator(".cap").nth(1).locator(".w.att")  # the attention decoder's caption
        assert words.count() == len(tables["attention"][0]["caption"].split())
        assert row.locator(".cap").first.locator(".w.att").count() == 0  # the plain decoder has no maps
        words.nth(0).hover()
        first = canvas.evaluate("c => c.toDataURL()")
        assert first != plain and "word 1 of" in row.locator("figcaption.word").inner_text()
        words.nth(0).focus()
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.textContent") == tables["attention"][0]["caption"].split()[1]
        assert canvas.evaluate("c => c.toDataURL()") not in (plain, first)
        assert "word 2 of" in row.locator("figcaption.word").inner_text()
        page.keyboard.press("ArrowDown")  # the next image's first word
        assert page.evaluate("document.activeElement.closest('.row').querySelector('.title').textContent") == "TEST 1"
        assert errors == []


def test_smoothing_is_caption_pys(browser, demo_page):
    """The page's upsampling of a grid equals visualize.overlay()'s skimage resize (order 3, edge)."""
    from skimage.transform import resize
    rng = np.random.default_rng(0)
    with open_page(demo_page[0]) as (page, errors):
        for g, n in ((8, 64), (14, 224), (4, 50)):
            grid = rng.random((g, g)) ** 3
            ours = np.array(page.evaluate("([grid, g, n]) => Array.from(smooth(grid, g, n))",
                                          [grid.ravel().tolist(), g, n])).reshape(n, n)
            assert np.abs(ours - resize(grid, (n, n), order=3, mode="edge")).max() < 1e-6, (g, n)
        assert errors == []


def test_report_alone_and_caption_page_open_cleanly(browser, tmp_path):
    """A report without the browser (no per-image results), and a caption.py page: no scores, so no
    filters; no maps (the plain decoder), so no hover."""
    (tmp_path / "report.html").write_text(htmlpage.page("t", None, "<h1>only the report</h1>"))
    with open_page(tmp_path / "report.html") as (page, errors):
        assert page.inner_text("h1") == "only the report" and page.locator("nav").count() == 0
        assert errors == []
    image = np.zeros((3, 32, 32), dtype=np.uint8)
    data = {"runs": [{"name": "r", "label": "r (rnn)", "grid": None}], "split": "", "scored": False,
            "images": [{"src": htmlpage.image_uri(image), "title": f"p{i}.jpg", "refs": [],
                        "caps": [{"caption": "a red circle"}]} for i in range(3)]}
    (tmp_path / "captions.html").write_text(htmlpage.page("t", data))
    with open_page(tmp_path / "captions.html") as (page, errors):
        assert page.locator("#rows .row").count() == 3 and not page.locator("#controls").is_visible()
        assert page.locator(".w").count() == 9 and page.locator(".w.att").count() == 0
        assert errors == []


def test_screenshot_is_not_blank(browser, demo_page, tmp_path):
    with open_page(str(demo_page[0]) + "#browse") as (page, errors):
        page.locator("#rows .row .w.att").nth(2).hover()
        page.screenshot(path=tmp_path / "shot.png")
    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 500 and pixels.std() > 20


def test_the_browser_script_times_a_page_and_saves_a_screenshot(browser, demo_page, tmp_path):
    """scripts/browser.py as the docs run it: the load time, the filtered count, and a picture."""
    r = run_script("scripts/browser.py", demo_page[0], "--screenshot", tmp_path / "shot.png", "--filter", "x-wrong",
                   "--x", 0, "--y", 1, "--sort", "diff-desc", "--word", 8)
    assert r.returncode == 0, r.stderr
    assert "load event" in r.stdout and "console errors: 0" in r.stdout
    assert Image.open(tmp_path / "shot.png").size == (1400, 1000)
