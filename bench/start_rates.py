"""The speed issue's start commit (530a573) evaluating the study's unrepaired models on *this* machine: does
the reference results JSON (``bench/results/study_results.json``, measured on another machine) hold here?

    .venv/bin/python bench/start_rates.py [--base-dir ../speed-base] [--out bench/results/start_rates.json]

Runs the start commit's own code (a git worktree at ``--base-dir``, made by ``bench/speed.py``) in float32,
its only precision: the original, wanda:0.5 and bnb-nf4 compressed by it, greedy replies (64 tokens) to the
study's three sets (AdvBench first 100, Alpaca test first 100, bundled borderline test), judged by the
reference's rule (``is_refusal``), and the reference perplexity. Prints each rate next to the
reference's, how many replies are token-for-token the reference's, and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "benchmarks"
MODELS = ("original", "wanda:0.5", "bnb-nf4")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-dir", default=str(ROOT.parent / "speed-base"))
    ap.add_argument("--reference", default=str(ROOT / "bench" / "results" / "study_results.json"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "start_rates.json"))
    args = ap.parse_args()
    sys.path.insert(0, args.base_dir)  # the start commit's package is `core`
    from core.compression import apply as compress
    from core.evaluation import perplexity, refusal_evaluation
    from core.judges import is_refusal
    from core.models import load_model
    from core.prompts import bundled_text, resolve_prompt_arg

    sys.path.insert(0, str(ROOT))
    from bench.common import write_results
    from refusal_lab.tables import text_table

    ref = json.loads(Path(args.reference).read_text())
    sets = {"harmful": resolve_prompt_arg(str(SHARED / "advbench.json"), "harmful").head(100),
            "harmless": resolve_prompt_arg(str(SHARED / "alpaca_harmless_test.json"), "harmless").head(100),
            "borderline": resolve_prompt_arg("bundled:borderline:test", "borderline").head(100)}
    original = load_model("default")
    out: dict = {"base_dir": args.base_dir, "reference": args.reference, "models": {}}
    rows = []
    for which in MODELS:
        t0 = time.perf_counter()
        handle = original if which == "original" else compress(original, which)[0]
        ref_eval = (ref["original"] if which == "original" else ref["variants"][which])["evaluation"]
        ref_sets = ref_eval["sets"]
        got = {}
        for name, prompts in sets.items():
            replies = [r["response"] for r in refusal_evaluation(handle, prompts, max_new_tokens=64)["results"]]
            ref_replies = [r["response"] for r in ref_sets[name]["results"]]
            got[name] = {"rate": sum(map(is_refusal, replies)) / len(replies),
                         "reference": sum(map(is_refusal, ref_replies)) / len(ref_replies),
                         "identical_replies": sum(a == b for a, b in zip(replies, ref_replies)), "n": len(replies)}
            rows.append([which, name, f"{100 * got[name]['rate']:.1f}", f"{100 * got[name]['reference']:.1f}",
                         f"{got[name]['identical_replies']}/{len(replies)}"])
        ppl = perplexity(handle, bundled_text(), max_length=512)
        ref_ppl = ref_eval["perplexity"]
        out["models"][which] = {"sets": got, "perplexity": ppl, "reference_perplexity": ref_ppl,
                                "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{which}: perplexity {ppl:.4f} (reference {ref_ppl:.4f}), {time.perf_counter() - t0:.0f} s", flush=True)
        write_results(args.out, out)
    print(text_table(["model", "set", "start commit here (%)", "reference (%)", "replies identical"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
