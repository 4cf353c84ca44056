"""The report as a reader sees it: headless Chromium loads the page, every figure loads, and the
screenshot is not blank. Marked slow and skipped where no Chromium and Playwright are installed
(neither is part of the set-up: Debian's `chromium` package, `pip install playwright`)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from harness_tasks import HERE, fake_result, tiny

from recur.results import ResultStore
from recur.report import build_report

sys.path.insert(0, str(HERE.parent / "scripts"))
import render_report  # noqa: E402

# Slow (outside the default run, which needs no browser): run with -m slow where both are installed.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(render_report.find_chromium() is None or importlib.util.find_spec("playwright") is None,
                                 reason="needs Chromium and Playwright")]


def test_the_page_renders_with_every_figure_loaded(db, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with ResultStore(db) as store:
        for model in ("elman", "lstm"):
            for seed in (0, 1):
                curve = [(1, 2.0, 1.0), (15, 1.0, 1.2), (30, 0.5, 1.4)]
                store.put(fake_result(tiny(model=model, seed=seed), {8: 0.4 + 0.1 * seed, 32: 0.3})
                          .model_copy(update={"curve": curve}))
    index = build_report(db, tmp_path / "report")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=render_report.find_chromium(), args=render_report.FLAGS[1:])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(index.resolve().as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) == 4 and all(w > 100 for w in widths)
        browser.close()
    png = tmp_path / "page.png"
    assert render_report.render(index, png) == "playwright"
    image = Image.open(png).convert("L")
    assert image.size[0] == 1400 and image.size[1] > 1500
    low, high = image.getextrema()
    assert high - low > 100  # text and figures, not a blank page
