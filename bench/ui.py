"""Dashboard benchmark: time to first render of every page with cached results, in a real browser.

    .venv/bin/python bench/ui.py [--model SPEC] [--repeats N]

Starts the app the way ``make run`` does (``streamlit run app.py`` on 127.0.0.1, a free port), drives
Debian's chromium with Playwright, warms the caches by clicking through the flow once (load the model,
compress with ``wanda:0.5``, compute what the later pages show), then opens every page in a *fresh
session* (a new browser tab, so nothing comes from that session's state) and times until the script has
finished and the page's main element is visible. Prints a table and writes ``bench/results/ui.json``.

The warm-up is also the new user's flow, timed per action (``flow_seconds``): with ``--model default``
and the empty run store it starts from, Compress ``wanda:0.5`` → Run the drift study → Run AIRD, all
with the default settings.

Default model: a tiny random llama saved to a temporary folder (the timings measure the dashboard, not
the model); ``--model default`` uses the real default model and its cached results. Target: ≤ 1 s per page.

The helpers here (:class:`Server`, :func:`launch_browser`, :func:`wait_ready`, :data:`PAGES`) are also
used by ``tests/test_browser.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("REFUSAL_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
RESULTS = ROOT / "bench" / "results" / "ui.json"
TARGET_S = 1.0
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


def tiny_model_folder(folder: Path) -> Path:
    """Save the tests' tiny random llama (with its chat template) as a model folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from tiny import tiny_handle

    h = tiny_handle("llama", n_layers=4, d_model=64)
    h.model.save_pretrained(folder)
    h.tokenizer.save_pretrained(folder)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: a tiny random model)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh sessions per page")
    args = ap.parse_args()
    if (problem := chromium_problem()) is not None:
        print(f"UI benchmark skipped: {problem}")
        return 0  # `make bench` runs every bench script; a machine without a browser skips this one
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="refusal-lab-ui-"))
    try:
        model = args.model or str(tiny_model_folder(tmp / "tiny-llama"))
        env = {"REFUSAL_LAB_MODEL": model, "REFUSAL_LAB_RUNS": str(tmp / "runs")}  # an empty run store
        if args.model is None:  # and a private cache for the tiny model
            env.update(REFUSAL_LAB_CACHE=str(tmp / "cache"))
        rows = []
        with Server(env) as server, sync_playwright() as pw:
            browser = launch_browser(pw)
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            t = time.perf_counter()
            flow = warm_up(page, server)
            warm = time.perf_counter() - t
            print(f"warm-up (load, compute and cache everything once, from an empty run store): {warm:.1f} s")
            for spec in existing_pages():
                cold, switch = [], []
                for _ in range(args.repeats):
                    # cold: a fresh tab (new session) straight to the page: frontend load + script + render
                    p = ctx.new_page()
                    t = time.perf_counter()
                    p.goto(f"{server.url}/{spec.path}")
                    cold.append(wait_ready(p, spec, timeout_s=120) - t)
                    if boxes := exception_boxes(p):
                        raise RuntimeError(f"{spec.title}: exception on the page: {boxes[0]}")
                    # switch: a fresh session opened on Home (on Model for Home), then a click in the sidebar
                    start = PAGES[1] if not spec.path else PAGES[0]
                    p.goto(f"{server.url}/{start.path}")
                    wait_ready(p, start, timeout_s=120)
                    t = time.perf_counter()
                    click_nav(p, spec.title)
                    switch.append(wait_ready(p, spec, timeout_s=120) - t)
                    p.close()
                rows.append({"page": spec.title, "path": "/" + spec.path,
                             "switch_median_s": statistics.median(switch), "switch_max_s": max(switch),
                             "cold_median_s": statistics.median(cold), "cold_max_s": max(cold), "runs": len(cold),
                             "within_target": statistics.median(switch) <= TARGET_S})
            browser.close()
        print(f"\n{'page':<15}{'switch s':>10}{'cold tab s':>12}  switch ≤ {TARGET_S:g} s")
        for r in rows:
            print(f"{r['page']:<15}{r['switch_median_s']:>10.3f}{r['cold_median_s']:>12.3f}  "
                  f"{'yes' if r['within_target'] else 'NO'}")
        print("switch = sidebar click in an open session until the page's main element is shown and its script "
              "finished (medians); cold tab = a new tab loading the whole frontend.")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        out = {"benchmark": "ui-first-render", "model": args.model or "tiny random llama (4 × 64)",
               "target_s": TARGET_S, "warm_up_s": warm, "repeats": args.repeats, "pages": rows,
               "flow_seconds": flow, "run_store": "empty at start (a temporary folder)",
               "measured": {"switch": "sidebar click in a fresh session opened on Home → script finished, title and "
                                      "main element visible (the target applies to this)",
                            "cold": "new tab straight to the page URL (loads the whole frontend)"},
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "load_avg_1m": os.getloadavg()[0]},
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp_out = RESULTS.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(out, indent=2))
        os.replace(tmp_out, RESULTS)
        print(f"wrote {RESULTS.relative_to(ROOT)}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
