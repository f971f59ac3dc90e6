"""Every repair method on schemes of the registry (#23's table): original → compressed → AIRD → distill →
aird+distill, each evaluated by the study on the first ``--limit`` AdvBench prompts, the first ``--limit``
Alpaca test prompts and the bundled borderline test split, with recovered share, over-refusal, broken
replies, perplexity, parameters changed, density and seconds.

    .venv/bin/python bench/repairs.py [--schemes sparsegpt:0.5,hqq:4:64,rtn:3:64] [--methods aird,distill,aird+distill]
                                      [--limit 100] [--runs runs] [--distill KEY=VALUE …] [--model default]
                                      [--out bench/results/repairs.json]

Everything is a cached stage of one study per scheme in ``--runs`` (the original's direction search and
evaluation are shared with every other study of that store), so an interrupted run resumes where it
stopped and a finished one prints its table again in seconds. Nothing is tuned here: AIRD calibrates on
the bundled val splits, distill runs at its defaults (or ``--distill`` settings chosen beforehand on val,
``bench/distill.py``). Recovered share of the lost refusal on AdvBench = (R − C) / (O − C).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, also when another one is installed

from bench.common import write_results  # noqa: E402
from refusal_lab.tables import text_table  # noqa: E402
from refusal_lab.aird.diagnosis import recovered_share  # noqa: E402
from refusal_lab.study_rows import density_value  # noqa: E402

SHARED = ROOT.parent / "shared" / "benchmarks"
SCHEMES = "sparsegpt:0.5,hqq:4:64,rtn:3:64"
METHODS = "aird,distill,aird+distill"


def row(label: str, ev, original, compressed) -> dict:
    """One table row of an evaluation (rates as fractions; ``recovered`` None for O and C)."""
    rate = lambda e, s, o="refused": e.rate(s, o)  # noqa: E731
    o, c, r = rate(original, "harmful"), rate(compressed, "harmful"), rate(ev, "harmful")
    recovered = None if ev is original or ev is compressed else recovered_share(o, c, r)  # None: < 5 points lost
    n = sum(s.n for s in ev.sets.values())
    broken = sum((s.broken_rate or 0.0) * s.n for s in ev.sets.values()) / n
    out = {"model": label, "advbench": r, "recovered": recovered, "alpaca": rate(ev, "harmless"),
           "borderline": rate(ev, "borderline"), "broken": broken, "perplexity": ev.perplexity,
           "kl_multi_token": ev.kl_multi_token}
    for name in ("parameters_changed", "seconds"):
        out[name] = getattr(ev, name, None)
    out["density"] = density_value(getattr(ev, "density_after", None))  # None where the repair writes no matrix
    return out


def scheme_rows(scheme: str, methods: list[str], args, distill: dict | None) -> list[dict]:
    """The rows of one scheme (its study computes whatever the store does not hold yet)."""
    from refusal_lab.study import Study, StudySpec
    from refusal_lab.study_repairs import with_costs

    spec = StudySpec(model=args.model, schemes=[scheme], harmful=args.harmful, harmless=args.harmless,
                     limit=args.limit, aird="auto", repair_method="aird+distill", distill=distill,
                     name="bench repairs")
    study = Study(spec, args.runs)
    original, compressed = study.evaluate("original"), study.evaluate(scheme)
    rows = [row("original", original, original, compressed), row(scheme, compressed, original, compressed)]
    for m in methods:
        t0 = time.perf_counter()
        ev = with_costs(study, scheme, m, study.evaluate_method(scheme, m))
        rows.append({**row(f"{scheme} + {m}", ev, original, compressed),
                     "wall_seconds_this_run": round(time.perf_counter() - t0, 1)})
    study.drop_variants([scheme])
    return rows


def table(rows: list[dict]) -> str:
    pct = lambda x: "—" if x is None or x != x else f"{100 * x:.1f}"  # noqa: E731  (NaN: no matrix edited)
    return text_table(["model", "AdvBench", "recovered", "Alpaca", "borderline", "broken", "ppl", "params changed",
                       "density", "seconds"],
                      [[r["model"], pct(r["advbench"]), "" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%",
                        pct(r["alpaca"]), pct(r["borderline"]), pct(r["broken"]),
                        "—" if r["perplexity"] is None else f"{r['perplexity']:.2f}",
                        "—" if r["parameters_changed"] is None else f"{r['parameters_changed']:,}",
                        pct(r["density"]), "—" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in rows])


def main() -> int:
    from refusal_lab.cli.args import distill_setting

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--model", default="default")
    ap.add_argument("--harmful", default=str(SHARED / "advbench.json"))
    ap.add_argument("--harmless", default=str(SHARED / "alpaca_harmless_test.json"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--distill", action="append", default=None, type=distill_setting, metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "repairs.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    distill = dict(kv for kv in args.distill) if args.distill else None
    methods = [m for m in args.methods.split(",") if m]
    out = {"command": " ".join(sys.argv), "limit": args.limit, "distill": distill, "schemes": {}}
    if Path(args.out).is_file():  # rows of schemes finished earlier (their studies are stored anyway)
        old = json.loads(Path(args.out).read_text())
        out.update(schemes=old.get("schemes", {}), runs=old.get("runs", {}))
    for scheme in [s for s in args.schemes.split(",") if s]:
        t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        out["schemes"][scheme] = scheme_rows(scheme, methods, args, distill)
        if Path(args.out).is_file():  # rows another run wrote meanwhile (runs of other schemes side by side)
            now = json.loads(Path(args.out).read_text())
            out["schemes"] = {**now.get("schemes", {}), scheme: out["schemes"][scheme]}
            out["runs"] = {**out.get("runs", {}), **now.get("runs", {})}
        out.setdefault("runs", {})[scheme] = {"command": out["command"], "threads": args.threads,
                                              "started": t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_results(args.out, out)
        print(table(out["schemes"][scheme]), flush=True)
    print(table([r for rows in out["schemes"].values() for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
