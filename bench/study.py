"""Wall time of the end-to-end study (per stage and total) and of its cached rerun.

    .venv/bin/python bench/study.py [--limit 100] [--runs DIR] [--scheme wanda:0.5 --scheme bnb-nf4]

Runs the acceptance command of the study pipeline twice in fresh processes against the same run
store; prints a table and writes bench/results/study.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT.parent / "shared" / "benchmarks"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--scheme", action="append", default=None)
    p.add_argument("--harmful", default=str(BENCH / "advbench.json"))
    p.add_argument("--harmless", default=str(BENCH / "alpaca_harmless_test.json"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "study.json"))
    args = p.parse_args()
    schemes = args.scheme or ["wanda:0.5", "bnb-nf4"]
    cmd = [sys.executable, "-m", "core", "study", "--model", "default", "--aird", "auto", "--limit", str(args.limit),
           "--harmful", args.harmful, "--harmless", args.harmless, "--runs", args.runs,
           "--json", str(ROOT / "bench" / "results" / "study_results.json"),
           "--out", str(ROOT / "bench" / "results" / "study_report.html")]
    for s in schemes:
        cmd += ["--scheme", s]
    runs = []
    for label in ("first", "cached rerun"):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        last = [line for line in proc.stdout.splitlines() if line.startswith("study ")][-1]
        stages = {}
        if "computed stages: " in last:
            stages = ast.literal_eval(last.split("computed stages: ", 1)[1])
        runs.append({"run": label, "seconds": round(seconds, 1), "stages": stages})
        print(proc.stdout)
    print(f"{'run':14s} {'seconds':>9s}")
    for r in runs:
        print(f"{r['run']:14s} {r['seconds']:9.1f}")
    print("\nstage seconds (first run):")
    for k, v in runs[0]["stages"].items():
        print(f"  {k:45s} {v:8.1f}")
    out = {"command": " ".join(cmd[1:]), "runs": runs,
           "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
