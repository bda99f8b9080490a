"""Headless Chromium for the HTML pages: the system's browser driven by Playwright (which is told where
it is, so it never downloads one of its own). The tests use `chromium()` and `open_page()`; run as a
script it times opening a page and saves a screenshot of its results browser:

    python scripts/browser.py reports/demo/report.html --screenshot reports/demo/browser.png \
        --filter x-wrong --x 0 --y 1 --sort diff-desc --word 4
"""
import argparse
import contextlib
import os
import shutil
import sys
import time

# Root in a container needs --no-sandbox; the rest keeps a headless run from reaching for the network.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-default-apps"]
INSTALL = "install it with `sudo apt-get install chromium` (or `make browser`)"


def chromium():
    """The system Chromium's path ($CHROMIUM, else chromium or chromium-browser on PATH), or None."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@contextlib.contextmanager
def open_page(path, width=1400, height=1000):
    """A Playwright page with `path` loaded, and the list its console errors and uncaught exceptions
    are collected in."""
    from playwright.sync_api import sync_playwright
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto("file://" + os.path.abspath(path), wait_until="load")
            yield page, errors
        finally:
            browser.close()


def main():
    p = argparse.ArgumentParser(description="time opening an HTML report and screenshot its results browser")
    p.add_argument("page")
    p.add_argument("--screenshot", help="PNG of the browser view with one word's attention map shown")
    p.add_argument("--filter", choices=["all", "disagree", "x-wrong", "pointing"], default="all")
    p.add_argument("--x", default="0", help="run X, by position")
    p.add_argument("--y", default="1", help="run Y, by position")
    p.add_argument("--sort", choices=["index", "diff-desc", "diff-asc"], default="index")
    p.add_argument("--word", type=int, default=2, help="hover this word (from 0) of the first attention caption")
    args = p.parse_args()
    if chromium() is None:
        sys.exit(f"error: Chromium not found: {INSTALL}")
    size = os.path.getsize(args.page)
    t0 = time.perf_counter()
    with open_page(args.page + "#browse") as (page, errors):
        page.wait_for_selector("#rows .row canvas")
        opened = time.perf_counter() - t0
        load_ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        if page.locator("#filter").count():  # a caption.py page has no scores, so no filters
            for select, value in (("#filter", args.filter), ("#run-x", args.x), ("#run-y", args.y),
                                  ("#sort", args.sort)):
                page.select_option(select, value)
        count = page.inner_text("#count")
        word = page.locator("#rows .row .w.att").nth(args.word)
        if word.count():
            word.hover()
        if args.screenshot:
            page.screenshot(path=args.screenshot)
    print(f"{args.page}: {size / 1e6:.1f} MB; load event (script run, first rows built) {load_ms / 1000:.2f} s after "
          f"navigation, {opened:.2f} s after Chromium's launch; {count} shown; console errors: {len(errors)}")
    for e in errors:
        print("  " + e)


if __name__ == "__main__":
    main()
