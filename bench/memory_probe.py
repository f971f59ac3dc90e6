"""Resident memory of the study acceptance command, stage by stage, in one process.

Prints, at each stage's start and end, the process's resident size (VmRSS) and its peak so far
(VmHWM), from ``/proc/self/status`` (Linux): which stage raises the peak, and what a stage leaves
resident after it ended. Usage: ``python bench/memory_probe.py --runs /tmp/memprobe`` (an empty
folder: every stage computes; ~12 minutes on 2 cores). Writes ``bench/results/memory_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "benchmarks"


def memory_mb() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) // 1024 for k in ("VmRSS", "VmHWM")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="run store folder (empty, so every stage computes)")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_probe.json"))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from refusal_lab.study import Study, StudySpec

    spec = StudySpec(model="default", schemes=["wanda:0.5", "bnb-nf4"], harmful=str(SHARED / "advbench.json"),
                     harmless=str(SHARED / "alpaca_harmless_test.json"), limit=args.limit, aird="auto")
    study = Study(spec, args.runs)
    rows: list[dict] = []

    def on_stage(stage: str, seconds: float | None) -> None:
        m = memory_mb()
        rows.append({"event": "start" if seconds is None else "end", "stage": stage, "rss_mb": m["VmRSS"],
                     "peak_mb": m["VmHWM"]})
        print(f"{rows[-1]['event']:5s} {stage:28s} resident {m['VmRSS']:5d} MB  peak {m['VmHWM']:5d} MB", flush=True)

    study.on_stage = on_stage
    study.run(budget=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "final": memory_mb()}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
