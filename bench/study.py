"""Wall time of the end-to-end study (per stage and total), of its cached rerun, and a SIGKILL/resume check.

    .venv/bin/python bench/study.py [--model default] [--limit 100] [--runs DIR] [--scheme wanda:0.5 --scheme bnb-nf4]
                                    [--kill-after SECONDS] [--reference RESULTS.json]

Runs the acceptance command of the study pipeline in fresh processes against one run store: the first
run (with ``--kill-after``: SIGKILLed after that many seconds, then run again to completion), then the
same command again (the cached rerun). Per-stage times come from the run store's manifest, so they
include stages computed by a killed process and show 0 for stages copied from another study of the
store. ``--reference`` compares the final results with those of an uninterrupted run (JSON written by
``--json``). Prints a table and writes bench/results/study.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH = ROOT.parent / "shared" / "benchmarks"

from bench.common import write_results  # noqa: E402
from refusal_lab.tables import text_table  # noqa: E402


def _run(cmd: list[str], kill_after: float | None = None) -> tuple[float, str, int]:
    """Run ``cmd`` (its progress bars and errors go to this terminal); with ``kill_after`` send SIGKILL after
    that many seconds. ``(seconds, stdout, returncode)``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
    return time.perf_counter() - t0, out, proc.returncode


RUN_SPECIFIC = ("study_id", "seconds")  # keys that differ between any two runs: the study folder, wall times


def differences(a, b, ignore: tuple[str, ...] = (), path: str = "") -> list[str]:
    """Paths where two JSON values differ, skipping dict keys in ``ignore`` at any depth; NaN equals NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted((set(a) | set(b)) - set(ignore))
        return [d for k in keys for d in (differences(a[k], b[k], ignore, f"{path}/{k}") if k in a and k in b
                                          else [f"{path}/{k} (missing)"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, ignore, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: {str(a)[:60]} vs {str(b)[:60]}"]


def identical(a, b) -> bool:
    """Two study results are the same but for what differs between any two runs (:data:`RUN_SPECIFIC`)."""
    return not differences(a, b, RUN_SPECIFIC)


def rates(results: dict, rule=None) -> dict[str, float]:
    """Every refusal rate of a study's results: ``model/set`` → rate (original, variants, repaired); with
    ``rule`` (reply text → refused?) the share of replies it calls refusals instead of the stored rate."""
    out = {}
    models = [("original", results["original"]["evaluation"])]
    for scheme, v in results["variants"].items():
        models.append((scheme, v["evaluation"]))
        if "repaired" in v:
            models.append((f"{scheme} + AIRD", v["repaired"]))
    for name, ev in models:
        for kind, res in ev["sets"].items():
            replies = res["results"]
            out[f"{name} / {kind}"] = (res["refusal_rate"] if rule is None else
                                       sum(bool(rule(r["response"])) for r in replies) / len(replies))
    return out


def judged_before_outcomes(results: dict) -> bool:
    """Whether results predate #22's three outcomes (refused / complied / broken): their refusal rate then
    counted every reply the substring rule (:func:`refusal_lab.judges.is_refusal`) calls a refusal —
    empty and looping ones included — where the current rate leaves broken replies out."""
    sets = results["original"]["evaluation"]["sets"].values()
    return not any("outcome" in r for s in sets for r in s["results"])


def rate_rows(new: dict, ref: dict, rule=None) -> list[dict]:
    """The rates of two results side by side, the difference in points (``rule``: :func:`rates`, for
    the new results)."""
    a, b = rates(new, rule), rates(ref)
    return [{"rate": k, "reference": b.get(k), "new": a[k],
             "points": None if b.get(k) is None else round(100 * (a[k] - b[k]), 1)} for k in a]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--scheme", action="append", default=None)
    p.add_argument("--harmful", default=str(BENCH / "advbench.json"))
    p.add_argument("--harmless", default=str(BENCH / "alpaca_harmless_test.json"))
    p.add_argument("--kill-after", type=float, default=None, help="SIGKILL the first run after this many seconds")
    p.add_argument("--first-label", default="first",
                   help="label of the first run, e.g. 'rerun after a manual SIGKILL' when resuming a killed run")
    p.add_argument("--reference", default=None, help="results JSON of an uninterrupted run to compare with")
    p.add_argument("--rates-against", default=None, metavar="RESULTS.json",
                   help="compare every refusal rate with this results JSON (in points; the speed issue's ±3)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "study.json"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "study_results.json"),
                   help="where the study writes its results JSON (the HTML report goes next to it)")
    p.add_argument("--precision", default=None, choices=["auto", "float32", "bfloat16"],
                   help="the study's --precision (default: the study's own default, auto)")
    p.add_argument("--check", default=None, metavar="RESULTS.json",
                   help="only compare a study's results JSON with --reference (no run) and print the differences")
    args = p.parse_args()
    if args.check:
        a, b = json.loads(Path(args.check).read_text()), json.loads(Path(args.reference).read_text())
        diffs = differences(a, b)
        print("raw differences:", *diffs or ["none"], sep="\n  ")
        same = identical(a, b)
        print(f"identical to the reference (ignoring study id and wall times): {same}")
        return 0 if same else 1
    schemes = args.scheme or ["wanda:0.5", "bnb-nf4"]
    results_json = Path(args.results)
    cmd = [sys.executable, "-m", "refusal_lab", "study", "--model", args.model, "--aird", "auto", "--limit", str(args.limit),
           "--harmful", args.harmful, "--harmless", args.harmless, "--runs", args.runs,
           "--json", str(results_json), "--out", str(results_json.with_suffix(".html"))]
    for s in schemes:
        cmd += ["--scheme", s]
    if args.precision:
        cmd += ["--precision", args.precision]
    plan = ([("first (SIGKILLed)", args.kill_after), ("rerun after the kill", None)] if args.kill_after
            else [(args.first_label, None)]) + [("cached rerun", None)]
    runs, study_id, results = [], None, []
    for label, kill in plan:
        seconds, out, rc = _run(cmd, kill)
        killed = rc == -signal.SIGKILL
        if rc != 0 and not killed:
            return rc
        last = [line for line in out.splitlines() if line.startswith("study ")]
        if last:
            study_id = last[-1].split()[1].rstrip(":")
            results.append(json.loads(results_json.read_text()))
        runs.append({"run": label, "seconds": round(seconds, 1), "killed": killed})
        print(f"{label}: {seconds:.1f} s{' (killed)' if killed else ''}", flush=True)
        if not killed:
            print(out)
    from refusal_lab.store import StudyRecord

    record = StudyRecord(Path(args.runs) / study_id)
    stages: dict[str, float] = {}
    for key in record.keys():
        e = record.entry(key) or {}
        stages[e.get("stage", key)] = stages.get(e.get("stage", key), 0.0) + float(e.get("seconds") or 0.0)
    print(text_table(["run", "seconds", "killed"], [[r["run"], f"{r['seconds']:.1f}", str(r["killed"])] for r in runs]))
    print("\nstage seconds (from the run store; 0 = copied from another study of the store):")
    print(text_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in sorted(stages.items(), key=lambda kv: -kv[1])]))
    import resource

    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest run's peak
    print(f"peak RSS of the study processes: {peak_rss_mb:.0f} MB")
    checks = {"cached_rerun_identical": identical(results[-1], results[-2])}
    rows = []
    if args.rates_against:
        rows = rate_rows(results[-2], json.loads(Path(args.rates_against).read_text()))
        print(text_table(["rate", "reference", "new", "points"],
                         [[r["rate"], r["reference"], r["new"], r["points"]] for r in rows]))
        checks["rates_within_3_points"] = all(r["points"] is not None and abs(r["points"]) <= 3 for r in rows)
        reference = json.loads(Path(args.rates_against).read_text())
        if judged_before_outcomes(reference):  # the same replies judged as the reference judged its own
            from refusal_lab.judges import is_refusal

            same_rule = rate_rows(results[-2], reference, is_refusal)
            print("\nthe same, the new replies judged by the reference's rule (is_refusal; broken replies count):")
            print(text_table(["rate", "reference", "new", "points"],
                             [[r["rate"], r["reference"], r["new"], r["points"]] for r in same_rule]))
            checks["rates_within_3_points_by_the_reference_rule"] = all(
                r["points"] is not None and abs(r["points"]) <= 3 for r in same_rule)
            rows = [{**r, "new_by_reference_rule": q["new"], "points_by_reference_rule": q["points"]}
                    for r, q in zip(rows, same_rule)]
    if args.reference:
        checks["identical_to_reference"] = identical(results[-2], json.loads(Path(args.reference).read_text()))
    print("checks:", checks)
    write_results(args.out, {"command": " ".join(cmd[1:]), "study_id": study_id, "runs": runs,
                             "stage_seconds": stages, "checks": checks, "reference": args.reference,
                             "peak_rss_mb": peak_rss_mb, "rates": rows, "rates_against": args.rates_against})
    return 0


if __name__ == "__main__":
    sys.exit(main())
