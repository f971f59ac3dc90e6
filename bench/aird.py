"""AIRD on every compression scheme of the registry, on the embedded default model.

For each scheme: refusal of the original (O), the compressed model (C) and C repaired by AIRD (auto:
layers, α and whether to use the fitted re-alignment calibrated on the bundled *val* splits), the
share of the refusal lost to compression that AIRD recovers, over-refusal (harmless, borderline),
perplexity, the repaired layers' density, and the recoverability diagnostic: its prediction from
projections and its verdict on the measured recovery (:func:`refusal_lab.aird.repair_verdict`). Evaluation on the bundled *test* splits; with
``--full SCHEME`` also on public benchmark files (AdvBench, JailbreakBench, Alpaca first 200).

Every stage runs through :class:`refusal_lab.study.Study` on a run store (default ``runs/``), so a rerun or
the dashboard reuses what was computed. Prints a table and writes ``bench/results/aird.json``
(rewritten after every scheme, so a partial run keeps its rows; ``--merge`` keeps the rows of an
existing ``--out`` that this run does not measure).

    python bench/aird.py [--schemes wanda:0.5,bnb-nf4] [--full wanda:0.5] [--runs runs] [--out F] [--merge]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402
from bench.compression import SCHEMES  # noqa: E402  (the registry's representative parameters)
from refusal_lab.tables import text_table  # noqa: E402

OUT = ROOT / "bench" / "results" / "aird.json"
SHARED = ROOT.parent / "shared" / "benchmarks"


def evaluate_scheme(scheme: str, runs: str, *, harmful: str, harmless: str, borderline: str | None,
                    limit: int | None, on_progress) -> dict:
    from refusal_lab.study import Study, StudySpec, measured_verdict

    spec = StudySpec(model="default", schemes=[scheme], harmful=harmful, harmless=harmless, borderline=borderline,
                     limit=limit, aird="auto", name=f"bench aird {scheme} {Path(harmful).stem}")
    study = Study(spec, runs, on_progress=on_progress)
    t0 = time.perf_counter()
    rep = study.repair(scheme)
    ev = {"O": study.evaluate("original"), "C": study.evaluate(scheme), "R": study.evaluate_repaired(scheme)}
    diag = study.diagnostic(scheme)
    row: dict = {"scheme": scheme, "harmful": harmful, "harmless": harmless, "borderline": borderline, "limit": limit,
                 "layers": rep.layers, "alpha": rep.alpha, "mode": rep.mode, "realign_layer": rep.realign_layer,
                 "diagnostic": diag.recoverability.level, "verdict": diag.recoverability.verdict,
                 "cohens_d_ratio": diag.recoverability.ratio, "harmless_shift": diag.recoverability.harmless_shift,
                 "density_before": ev["R"].density_before.density,
                 "density_after": ev["R"].density_after.density, "seconds": 0.0}
    for k, e in ev.items():
        for name, s in e.sets.items():
            row[f"{name}_{k}"] = s.refusal_rate
        row[f"perplexity_{k}"] = e.perplexity
    measured = measured_verdict(ev["O"], ev["C"], ev["R"], diag, study.eval_sets()["harmful"].name)
    row.update(recovered=measured.recovered, measured=measured.level, measured_verdict=measured.verdict)
    row["perplexity_rise"] = row["perplexity_R"] / row["perplexity_C"] - 1
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def fmt(rows: list[dict]) -> str:
    heads = ["scheme", "harmful set", "O", "C", "C+AIRD", "recovered", "harmless C→R", "borderline C→R",
             "ppl C→R", "layers", "α", "re-aligned", "density", "predicted", "measured"]
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["scheme"], r.get("harmful", ""), "error: " + r["error"][:70]] + [""] * 12)
            continue
        lines.append([r["scheme"], Path(r["harmful"]).stem.replace("bundled:", ""), pct(r["harmful_O"]),
                      pct(r["harmful_C"]), pct(r["harmful_R"]),
                      "—" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%",
                      f"{pct(r['harmless_C'])}→{pct(r['harmless_R'])}",
                      f"{pct(r.get('borderline_C'))}→{pct(r.get('borderline_R'))}",
                      f"{r['perplexity_C']:.2f}→{r['perplexity_R']:.2f}", ",".join(map(str, r["layers"])),
                      f"{r['alpha']:g}", "—" if r.get("realign_layer") is None else f"layer {r['realign_layer']}",
                      f"{r['density_before']:.2f}→{r['density_after']:.2f}", r["diagnostic"], r.get("measured", "")])
    return text_table(heads, lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme specs")
    p.add_argument("--full", default="wanda:0.5", help="comma-separated schemes also evaluated on the public "
                   "benchmark files in ../shared/benchmarks ('' for none)")
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in --out for (scheme, harmful set) pairs this run does not measure")
    args = p.parse_args(argv)
    from refusal_lab.progress import tqdm_progress

    bars: dict = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        bars.setdefault(stage, tqdm_progress(stage))(done, total)

    full = [x for x in args.full.split(",") if x]
    if full and not SHARED.is_dir():
        print(f"public benchmarks not found at {SHARED}: bundled test splits only")
        full = []
    schemes = [s for s in args.schemes.split(",") if s]
    schemes = [s for s in schemes if s in full] + [s for s in schemes if s not in full]  # full ones first
    jobs = []
    for s in schemes:
        jobs.append((s, "bundled:harmful:test", "bundled:harmless:test", "bundled:borderline:test", None))
        if s in full:
            jobs.append((s, str(SHARED / "advbench.json"), "bundled:harmless:test", None, None))
            jobs.append((s, str(SHARED / "jailbreakbench.json"), str(SHARED / "alpaca_harmless_test.json"), None, 200))
    meta = {"benchmark": "aird", "model": "default", "runs": args.runs, "rows": []}
    if args.merge and Path(args.out).is_file():  # earlier rows and notes stay (new rows carry their date)
        measured = {(j[0], j[1]) for j in jobs}
        before = json.loads(Path(args.out).read_text())
        meta.update({k: v for k, v in before.items() if k not in ("machine", "date", "rows")})
        meta["rows"] = [r for r in before["rows"] if (r["scheme"], r["harmful"]) not in measured]
    for scheme, harmful, harmless, borderline, limit in jobs:
        try:
            row = evaluate_scheme(scheme, args.runs, harmful=harmful, harmless=harmless, borderline=borderline,
                                  limit=limit, on_progress=on_progress)
        except Exception as e:  # a scheme that cannot run here (e.g. bitsandbytes) is a row, not a crash
            row = {"scheme": scheme, "harmful": harmful, "error": f"{type(e).__name__}: {e}"}
        meta["rows"].append({**row, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_results(args.out, meta)
        print("\n" + fmt(meta["rows"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
