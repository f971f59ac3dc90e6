"""Real-browser test: Playwright drives Debian's chromium through every page of the running app.

The server is started the way ``make run`` starts it (``streamlit run app.py`` on 127.0.0.1, here on a
free port). The flow a user clicks — Model, Prompts, Compress (``wanda:0.5``), Refusal drift, Steer,
AIRD, Report — runs on a tiny random model (``REFUSAL_LAB_BROWSER_MODEL=default`` uses the real default
model instead, e.g. to refresh the README screenshots from cached results). Each page is screenshot into
``tests/artifacts/`` and must show no exception box. Skips with the reason when no browser is found.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from refusal_lab.testing import browser as ui
from refusal_lab.testing.tiny import tiny_model_folder

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if (problem := ui.chromium_problem()) is not None:
        pytest.skip(f"real-browser test skipped: {problem}")
    tmp = tmp_path_factory.mktemp("browser")
    model = os.environ.get("REFUSAL_LAB_BROWSER_MODEL")
    env = {"REFUSAL_LAB_MODEL": model} if model else {
        "REFUSAL_LAB_MODEL": str(tiny_model_folder(tmp / "tiny-llama")),
        "REFUSAL_LAB_CACHE": str(tmp / "cache"), "REFUSAL_LAB_RUNS": str(tmp / "runs")}
    with ui.Server(env, log=tmp / "streamlit.log") as s:
        yield s
        log = s.log()
    assert "Traceback" not in log or "Cancelled" in log, f"server log shows a traceback:\n{log[-3000:]}"


def test_deep_link_on_a_fresh_server_uses_the_app_navigation(server):
    """First request of the server straight to a page URL: served by app.py's navigation, not by
    Streamlit's legacy pages/ mode (which would list every file of pages/ in the sidebar)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = ui.launch_browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.url}/report")
        page.wait_for_selector("h1:has-text('Report')", timeout=300_000)
        ui.wait_idle(page)
        nav = [a.inner_text().split("\n")[-1] for a in page.query_selector_all("[data-testid='stSidebarNav'] a")]
        assert nav == [p.title for p in ui.existing_pages()], nav
        assert ui.exception_boxes(page) == []
        browser.close()


def test_click_through_every_page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seen = []
    with sync_playwright() as pw:
        browser = ui.launch_browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        ui.wait_ready(page, ui.PAGES[0], timeout_s=300)
        page.screenshot(path=ARTIFACTS / "00-home.png", full_page=True)
        for i, spec in enumerate(ui.existing_pages()[1:], start=1):
            ui.click_nav(page, spec.title)
            page.wait_for_selector(f"h1:has-text('{spec.title}')", timeout=ui.ACTION_TIMEOUT_S * 1000)
            ui.wait_idle(page)
            if spec.title == "Refusal drift":  # a long action can be cancelled from the page
                page.get_by_role("button", name="Run the drift study").click()
                page.wait_for_selector("[data-testid='stProgress']", timeout=120_000)
                page.get_by_role("button", name="Cancel").click()
                page.wait_for_selector("text=Drift study cancelled", timeout=120_000)
                ui.wait_idle(page)
                assert ui.exception_boxes(page) == []
            ui.flow_step(page, spec.title, fast=True)
            ui.wait_ready(page, spec, timeout_s=ui.ACTION_TIMEOUT_S)
            assert ui.exception_boxes(page) == [], f"{spec.title}: {ui.exception_boxes(page)}"
            page.mouse.move(0, 0)  # no tooltip in the screenshot
            name = f"{i:02d}-{spec.path}.png"
            page.screenshot(path=ARTIFACTS / name, full_page=True)
            seen.append(spec.title)
            legend = page.locator("[data-testid='stPlotlyChart'] .legendtext")
            if spec.title == "Compress":  # per-layer sparsity of the variant
                assert legend.filter(has_text="wanda:0.5").count() >= 1
            if spec.title == "Refusal drift":  # cosine per layer, one line for the variant
                assert legend.filter(has_text="wanda:0.5").count() >= 1
            if spec.title == "AIRD":  # before/after bars include the repaired variant
                assert legend.filter(has_text="wanda:0.5 + AIRD").count() >= 1
            if spec.title == "Steer":
                page.wait_for_selector(".st-key-steer_results h4:has-text('original')", timeout=60_000)
        browser.close()
    assert seen[:3] == ["Model", "Prompts", "Compress"]
    if os.environ.get("REFUSAL_LAB_BROWSER_MODEL"):  # real model: refresh the README's screenshots
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        for shot in ("drift", "aird"):
            src = next(ARTIFACTS.glob(f"*-{shot}.png"), None)
            if src is not None:
                shutil.copy(src, docs / f"screenshot-{shot}.png")


def test_demo_story_and_its_html_export_open_offline(server, tmp_path):
    """Home → *Run the demo study*: the three steps appear; the exported HTML file, opened in chromium
    with every network request blocked, draws its three plots."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = ui.launch_browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        ui.wait_ready(page, ui.PAGES[0], timeout_s=300)
        page.get_by_role("button", name="Run the demo study").click()
        page.wait_for_selector(".st-key-demo_step3 h3, [data-testid='stAlert']", timeout=ui.ACTION_TIMEOUT_S * 1000)
        ui.wait_idle(page)
        assert ui.exception_boxes(page) == [] and page.locator("[data-testid='stAlert']").count() == 0, \
            page.inner_text("body")[-2000:]
        for step, title in ((1, "1. The model refuses"), (2, "2. Compression (wanda:0.5) breaks it"),
                            (3, "3. The repair (AIRD) brings it back")):
            section = page.locator(f".st-key-demo_step{step}")
            assert title in section.locator("h3").first.inner_text()
            chart = section.locator("[data-testid='stPlotlyChart']")
            chart.first.wait_for(state="attached", timeout=60_000)  # charts mount after the script is idle
            assert chart.count() == 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "00-home-demo.png", full_page=True)
        with page.expect_download() as download:
            page.get_by_role("button", name="Download this story (HTML, opens offline)").click()
        exported = tmp_path / "demo.html"
        download.value.save_as(exported)

        offline = browser.new_page()
        blocked = []
        offline.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                      else (blocked.append(route.request.url), route.abort()))
        offline.goto(exported.as_uri())
        offline.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
        assert offline.locator(".js-plotly-plot").count() == 3 and blocked == []
        assert "2. Compression breaks it" in offline.inner_text("body")
        browser.close()
