"""Render a `recur report` page to PNG in headless Chromium, to look at it as a reader would.

    python scripts/render_report.py recur-report/index.html report.png [--width 1400]

Uses Playwright (``pip install playwright``) driving the system Chromium when both are there
(a full-page screenshot), else the ``chromium`` command line alone (a screenshot of a tall
window). Chromium itself comes from the system's packages (Debian: ``apt-get install chromium``);
nothing here downloads a browser. Exit code 2 when no browser can be found.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# As root in a closed network: no sandbox, no GPU, no background connections.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render(index: Path, out: Path, width: int = 1400, height: int = 900) -> str:
    """Write ``out`` (PNG) from the page ``index``; returns which renderer was used."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    url = index.resolve().as_uri()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is not None:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=browser, args=FLAGS[1:])
            page = b.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_load_state("load")
            page.screenshot(path=str(out), full_page=True)
            b.close()
        return "playwright"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{max(height, 6000)}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    return "chromium --screenshot"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index", type=Path, help="the report's index.html")
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--width", type=int, default=1400, help="viewport width in CSS pixels (1400)")
    args = ap.parse_args(argv)
    try:
        how = render(args.index, args.out, args.width)
    except FileNotFoundError as e:
        print(f"render_report: {e}", file=sys.stderr)
        return 2
    print(f"{args.out} written ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
