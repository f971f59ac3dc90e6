"""The study's time-left estimate replayed on measured stage times: how honest it was at each stage.

Feeds a study's own stage times (``stage_seconds`` of a ``bench/study.py`` result, measured from an
empty store) in the order the study runs them to :class:`refusal_lab.study_eta.StudyEta` with an empty
history (a fresh store, as in the acceptance command), and prints, as each planned stage starts, the
estimated and the true time left in all. ``--root`` imports ``refusal_lab`` from another checkout (a
worktree of an older commit), so two estimators are compared on the same times in one run:

    .venv/bin/python bench/eta_replay.py [--study bench/results/study_here_bf16_final.json]
                                        [--root DIR] [--out bench/results/eta_replay.json]

A stage's recorded time includes the stages nested in it (a drift's diagnostic), as the study reports
it to the estimate. No model runs: this times nothing, it replays times.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plan() -> list[str]:
    """The acceptance study's planned stages (``Study.planned_stages(budget=True)``'s order)."""
    out = ["directions original", "evaluate original"]
    for s in ("wanda:0.5", "bnb-nf4"):
        out += [f"compress {s}", f"directions {s}", f"drift {s}", f"evaluate {s}", f"aird {s}",
                f"evaluate {s}+aird", f"budget {s}"]
    return out


def replay(planned: list[str], seconds: dict[str, float]) -> list[dict]:
    """One row per planned stage: the estimate of the time left in all as it starts, and the truth."""
    from refusal_lab.study_eta import StudyEta

    clock = [0.0]
    eta = StudyEta(planned, clock=lambda: clock[0])
    rows = []
    for i, stage in enumerate(planned):
        truth = sum(seconds[p] for p in planned[i:])
        eta.started(stage)
        left, unknown = eta.left()
        rows.append({"stage": stage, "n": i + 1, "estimated_left": round(left, 1), "true_left": round(truth, 1),
                     "not_timed": unknown})
        clock[0] += seconds[stage]
        eta.finished(stage, seconds[stage])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default=str(ROOT / "bench" / "results" / "study_here_bf16_final.json"))
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose refusal_lab estimates")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eta_replay.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.root).resolve()))
    measured = json.loads(Path(args.study).read_text())["stage_seconds"]
    planned = plan()
    seconds = {p: float(measured.get(p, 0.0)) for p in planned}
    per_scheme_compress = measured.get("compress", 0.0) / 2  # the record keeps one "compress" stage for both
    for p in planned:
        if p.startswith("compress "):
            seconds[p] = per_scheme_compress
    rows = replay(planned, seconds)
    sys.path.insert(0, str(ROOT))
    from bench.common import write_results
    from refusal_lab.tables import text_table

    print(text_table(["#", "stage", "estimated left s", "true left s", "ratio", "stages not timed"],
                     [[r["n"], r["stage"], f"{r['estimated_left']:.0f}", f"{r['true_left']:.0f}",
                       f"{r['estimated_left'] / r['true_left']:.2f}" if r["true_left"] else "—", r["not_timed"]]
                      for r in rows]))
    fully = [r for r in rows if not r["not_timed"] and r["true_left"] > 0]
    worst = min(fully, key=lambda r: r["estimated_left"] / r["true_left"]) if fully else None
    summary = {"worst_ratio_once_every_kind_timed": None if worst is None else
               round(worst["estimated_left"] / worst["true_left"], 3),
               "worst_stage": None if worst is None else worst["stage"]}
    print(summary)
    write_results(args.out, {"command": " ".join(sys.argv), "study": args.study, "root": args.root,
                             "rows": rows, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
