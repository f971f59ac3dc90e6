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

The browser helpers (:class:`Server`, :func:`launch_browser`, :func:`wait_ready`, :data:`PAGES`) live in
:mod:`refusal_lab.testing.browser`, shared with ``tests/test_browser.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, also when another one is installed

from refusal_lab.testing.browser import (PAGES, Server, chromium_problem, click_nav, exception_boxes,  # noqa: E402
                                         existing_pages, launch_browser, wait_ready, warm_up)
from refusal_lab.testing.tiny import tiny_model_folder  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ui.json"
TARGET_S = 1.0


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
