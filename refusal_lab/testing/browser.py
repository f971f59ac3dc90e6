"""Drive the dashboard in a real browser: start it the way ``make run`` does, open it in Debian's
chromium through Playwright, wait for pages, click through the flow. Used by ``tests/test_browser.py``
and ``bench/ui.py`` (Playwright is imported only by what needs it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout: app.py and pages/
CHROMIUM = os.environ.get("REFUSAL_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Longest wait for one action (compress, drift study, AIRD) or page. On a cold cache the real model's drift
# study (direction selection for the original and the variant) took longer than 15 min on 2 busy cores.
ACTION_TIMEOUT_S = float(os.environ.get("REFUSAL_LAB_BROWSER_TIMEOUT", "3600"))


@dataclass(frozen=True)
class PageSpec:
    """A page of the app: nav title, url path and a CSS selector that is visible once it rendered."""

    title: str
    path: str
    ready: str


# In navigation order; `ready` marks the page's main content (not just its title).
PAGES = [
    PageSpec("Home", "", ".st-key-home"),
    PageSpec("Model", "model", ".st-key-model_summary [data-testid='stMetric']"),
    PageSpec("Prompts", "prompts", ".st-key-prompts_harmful [data-testid='stMetric']"),
    PageSpec("Compress", "compress", ".st-key-variants [data-testid='stDataFrame']"),
    PageSpec("Refusal drift", "drift", ".st-key-drift_results [data-testid='stPlotlyChart']"),
    PageSpec("Steer", "steer", ".st-key-steer_form [data-testid='stTextArea']"),
    PageSpec("AIRD", "aird", ".st-key-aird_results [data-testid='stDataFrame']"),
    PageSpec("Report", "report", ".st-key-studies [data-testid='stDataFrame']"),
]


def existing_pages() -> list[PageSpec]:
    """The pages whose file exists (the app registers only those)."""
    names = {"": "home", "model": "model", "prompts": "prompts", "compress": "compress", "drift": "drift",
             "steer": "steer", "aird": "aird", "report": "report"}
    return [p for p in PAGES if (ROOT / "pages" / f"{names[p.path]}.py").exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_problem() -> str | None:
    """Why a real-browser run is impossible here, or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the Python package `playwright` is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return (f"no chromium at {CHROMIUM}: install Debian's browser with `apt-get install -y chromium` "
                "(Playwright's own browser download does not work here), or set REFUSAL_LAB_CHROMIUM")
    return None


class Server:
    """``streamlit run app.py`` on 127.0.0.1:<free port> as a subprocess (the command ``make run`` runs)."""

    def __init__(self, env: dict | None = None, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.log_path = log or Path(tempfile.mkstemp(prefix="streamlit-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        streamlit = Path(sys.executable).with_name("streamlit")
        cmd = [str(streamlit) if streamlit.exists() else "streamlit", "run", "app.py",
               "--server.address", "127.0.0.1", "--server.port", str(self.port), "--server.headless", "true",
               "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}: {self.log()[-2000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2).status == 200:
                    return self
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"streamlit did not answer on {self.url} within 120 s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # only the server we started, by its own handle
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def launch_browser(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


SCRIPT_STATE = "document.querySelector('[data-testid=\"stApp\"]')?.getAttribute('data-test-script-state')"


def wait_idle(page, timeout_s: float | None = None, settle_s: float = 0.4) -> None:
    """Wait until the Streamlit script is not running and stays so for ``settle_s`` (a page that calls
    ``st.rerun()`` stops and starts again within a few milliseconds)."""
    timeout_s = timeout_s or ACTION_TIMEOUT_S
    deadline = time.time() + timeout_s
    since = None
    while time.time() < deadline:
        if page.evaluate(SCRIPT_STATE) == "notRunning":
            since = since or time.time()
            if time.time() - since >= settle_s:
                return
        else:
            since = None
        time.sleep(0.03)
    raise TimeoutError(f"the app was still running after {timeout_s:.0f} s")


READY_JS = """([title, sel]) => {
  const app = document.querySelector('[data-testid="stApp"]');
  const h1 = [...document.querySelectorAll('h1')].some(h => h.textContent.includes(title));
  const el = document.querySelector(sel);
  const visible = !!el && el.getClientRects().length > 0;
  return [app ? app.getAttribute('data-test-script-state') : null, h1, visible];
}"""


def wait_ready(page, spec: PageSpec, timeout_s: float = 600, settle_s: float = 0.4) -> float:
    """Wait until the page shows its title and main element and its script has finished; return the
    ``time.perf_counter()`` at which that state was first seen (it must then hold for ``settle_s``, which
    is not counted: a page that calls ``st.rerun()`` stops and starts again within milliseconds)."""
    title = spec.title if spec.path else "Refusal Lab"
    deadline = time.time() + timeout_s
    first = None
    while time.time() < deadline:
        now = time.perf_counter()
        state, has_title, visible = page.evaluate(READY_JS, [title, spec.ready])
        if state == "notRunning" and has_title and visible:
            first = first or now
            if now - first >= settle_s:
                return first
        else:
            first = None
        time.sleep(0.02)
    raise TimeoutError(f"{spec.title}: not ready after {timeout_s:.0f} s (script state, title and {spec.ready})")


def exception_boxes(page) -> list[str]:
    """Texts of Streamlit exception elements on the page (there must be none)."""
    return [e.inner_text()[:500] for e in page.query_selector_all("[data-testid='stException']")]


def click_nav(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()


def click_button(page, label: str, timeout_s: float | None = None) -> None:
    """Click a button by its label and wait for the resulting script runs to finish."""
    page.get_by_role("button", name=label).first.click()
    time.sleep(0.3)
    wait_idle(page, timeout_s or ACTION_TIMEOUT_S)


def run_action(page, title: str, action: str | None, log=print) -> float | None:
    """Click ``action`` on the page ``title`` if that button is there and enabled (nothing to do when the
    results are cached); the seconds until the page was idle again, or None when nothing was clicked."""
    if not action:
        return None
    button = page.get_by_role("button", name=action)
    try:
        button.first.wait_for(state="visible", timeout=15_000)
    except Exception:  # noqa: BLE001 — no such button on this page state
        return None
    if not button.first.is_enabled():
        return None
    t = time.perf_counter()
    click_button(page, action)
    seconds = time.perf_counter() - t
    log(f"  {title}: {action} in {seconds:.1f} s")
    return seconds


def click_label(page, text: str) -> None:
    """Click a radio/checkbox option by its visible label and wait for the rerun."""
    page.get_by_text(text, exact=True).first.click()
    time.sleep(0.3)
    wait_idle(page)


FLOW_ACTIONS = {"Compress": "Compress", "Refusal drift": "Run the drift study", "Steer": "Generate",
                "AIRD": "Run AIRD"}


def flow_step(page, title: str, *, fast: bool, log=print) -> float | None:
    """What a user clicks on each page to get its results; the seconds the click took (None: nothing to
    click). ``fast``: last-token direction search and a manual AIRD repair (no calibration grid) — the
    browser test's short path; otherwise the defaults."""
    if fast and title == "Refusal drift":
        page.get_by_text("Evaluation settings").first.click()
        click_label(page, "last prompt token only, screened")
    if fast and title == "AIRD":
        click_label(page, "manual")
    return run_action(page, title, FLOW_ACTIONS.get(title), log)


def warm_up(page, server: Server, log=print) -> dict[str, float]:
    """Click through the flow once, as a new user does with the default settings, so every page has
    results to show (cached for later sessions); ``{page: seconds of its action}``."""
    page.goto(server.url)
    wait_ready(page, PAGES[0])
    times = {}
    for spec in existing_pages()[1:]:
        click_nav(page, spec.title)
        page.wait_for_selector(f"h1:has-text('{spec.title}')", timeout=600_000)
        wait_idle(page)
        seconds = flow_step(page, spec.title, fast=False, log=log)
        if seconds is not None:
            times[spec.title] = seconds
    return times


