"""Judges on real replies: the three outcome rates (refused / complied / broken) of the substring and
score judges, and their agreement (Cohen's κ), for the default model, the untouched base model and
wanda:0.5 of the default, on the bundled test splits and on the public sets in ../shared/benchmarks.

    .venv/bin/python bench/judges.py [--tokens 64] [--models default,smollm2-base,wanda] [--sets bundled|all]
                                     [--out bench/results/judges.json]

One generation per (model, set): both judges read the same greedy replies (the score judge the
first-position refusal log-odds the generation already computed). Measured only: nothing here chose a
threshold (the broken rules' thresholds come from tests/test_degeneration.py's written examples)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, also when another one is installed

from bench.common import write_results  # noqa: E402
from refusal_lab.tables import text_table  # noqa: E402

SHARED = ROOT.parent / "shared" / "benchmarks"
SETS = {"bundled harmful test": "bundled:harmful:test", "bundled harmless test": "bundled:harmless:test",
        "bundled borderline test": "bundled:borderline:test", "AdvBench": str(SHARED / "advbench.json"),
        "JailbreakBench": str(SHARED / "jailbreakbench.json"),
        "Alpaca test (200)": str(SHARED / "alpaca_harmless_test.json")}


def main() -> int:
    from refusal_lab.compression import apply
    from refusal_lab.evaluation import refusal_evaluations
    from refusal_lab.judge_audit import cohens_kappa
    from refusal_lab.judges import ScoreJudge
    from refusal_lab.models import load_model
    from refusal_lab.prompts import resolve_prompt_arg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--models", default="default,smollm2-base,wanda", help="of default, smollm2-base, wanda")
    ap.add_argument("--sets", default="all", choices=["all", "bundled"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "judges.json"))
    args = ap.parse_args()
    sets = {name: resolve_prompt_arg(spec, "harmful").head(200 if "Alpaca" in name else None)
            for name, spec in SETS.items() if spec.startswith("bundled:")
            or (args.sets == "all" and Path(spec).exists())}
    default = load_model("default")
    known = {"default": ("default", lambda: default), "smollm2-base": ("smollm2-base", lambda: load_model("smollm2-base")),
             "wanda": ("default · wanda:0.5", lambda: apply(default, "wanda:0.5")[0])}
    models = dict(known[m] for m in args.models.split(","))
    rows, table = [], []
    for model_name, make in models.items():
        t0 = time.perf_counter()
        h = make()
        evals, _ = refusal_evaluations(h, sets, max_new_tokens=args.tokens, judge="substring")
        for set_name, ev in evals.items():
            replies = [r.response for r in ev.results]
            sub = [r.outcome for r in ev.results]
            score = ScoreJudge().judge([r.prompt for r in ev.results], replies, [r.refusal_score for r in ev.results])
            share = lambda xs, o: sum(x == o for x in xs) / len(xs)  # noqa: E731
            row = {"model": model_name, "set": set_name, "n": ev.n,
                   **{f"substring_{o}": share(sub, o) for o in ("refused", "complied", "broken")},
                   **{f"score_{o}": share(score, o) for o in ("refused", "complied", "broken")},
                   "agreement": sum(a == b for a, b in zip(sub, score)) / ev.n, "kappa": cohens_kappa(sub, score),
                   "broken_examples": [r.response[:120] for r in ev.results if r.outcome == "broken"][:5]}
            rows.append(row)
            pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
            table.append([model_name, set_name, str(ev.n), *(pct(row[f"substring_{o}"]) for o in ("refused", "complied",
                          "broken")), *(pct(row[f"score_{o}"]) for o in ("refused", "complied")),
                          "—" if row["kappa"] is None else f"{row['kappa']:.2f}"])
        print(f"{model_name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(text_table(["model", "set", "n", "substr refused %", "complied %", "broken %", "score refused %",
                      "complied %", "κ"], table))
    write_results(args.out, {"command": " ".join(sys.argv), "tokens": args.tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
