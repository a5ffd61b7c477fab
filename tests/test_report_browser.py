"""report.html opens in a real browser (headless Chromium, Debian's `chromium` package): every
image decodes, none is shrunk below its own size (figures are drawn to be legible at that size),
nothing is wider than a 1400 px window, and the results table is there. The screenshot is
written to the test's temporary folder (pytest keeps the last runs' folders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vnca import artifacts
from vnca.report import build_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is absent (install Debian's package: apt-get install -y chromium)",
)

IMAGES_JS = """() => Array.from(document.images).map(img => ({
    alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
    shown: img.getBoundingClientRect().width}))"""
PAGE_WIDTH_JS = "() => document.documentElement.scrollWidth"
TABLE_JS = """() => {
    const t = document.querySelector('table#results');
    if (!t) return null;
    return Array.from(t.querySelectorAll('tr')).map(
        tr => Array.from(tr.querySelectorAll('th,td')).map(c => c.textContent.trim()));
}"""


def test_report_renders_in_chromium(tmp_path, report_inputs):
    from playwright.sync_api import sync_playwright

    dirs = report_inputs.make(tmp_path)
    html_path = build_report(dirs["evals"], dirs["trains"], dirs["data"], dirs["out"])
    # Opened from another directory: nothing may depend on files next to the HTML.
    moved = tmp_path / "elsewhere" / artifacts.REPORT_HTML
    moved.parent.mkdir()
    moved.write_bytes(html_path.read_bytes())
    screenshot = tmp_path / "report.png"
    failed_requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("requestfailed", lambda r: failed_requests.append(r.url[:80]))
            page.goto(moved.as_uri(), wait_until="load")
            images = page.evaluate(IMAGES_JS)
            rows = page.evaluate(TABLE_JS)
            banner = page.locator("#smoke-banner").inner_text()
            page_width = page.evaluate(PAGE_WIDTH_JS)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert failed_requests == []
    html_imgs = moved.read_text().count("<img ")
    assert len(images) == html_imgs > 20
    broken = [i["alt"] for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert broken == []
    assert all(i["shown"] > 0 for i in images)
    # Legible: no figure is scaled down (text would shrink with it), no horizontal scrolling.
    shrunk = [(i["alt"], i["w"], i["shown"]) for i in images if i["shown"] < i["w"] - 0.5]
    assert shrunk == []
    assert page_width <= 1400
    assert rows is not None, "table#results missing"
    header, *body = rows
    assert header[:3] == ["variant", "run", "ours (nats, mean ± se)"]
    assert [r[0] for r in body] == ["baseline", "doubling", "nondoubling"]
    by_variant = {r[0]: r for r in body}
    for variant, (mean, se, *_) in report_inputs.RUNS.items():
        assert by_variant[variant][2] == f"{mean:.2f} ± {se:.2f}"
    assert banner.startswith("SMOKE RUN")
    assert screenshot.stat().st_size > 10_000
