"""Utility beyond perplexity for every registry scheme on the default model: zero-shot accuracy on the
project's 210 multiple-choice items (± standard error), KL to the original at the first reply token and
over the first 16 teacher-forced tokens of the original's replies (bundled harmless test split, 64-token
greedy replies), and the reference perplexity.

    .venv/bin/python bench/utility.py [--schemes a,b] [--out bench/results/utility.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, also when another one is installed

from bench.common import write_results  # noqa: E402
from bench.compression import SCHEMES  # noqa: E402  (the registry's representative parameters)
from refusal_lab.tables import text_table  # noqa: E402


def main() -> int:
    from refusal_lab.compression import apply
    from refusal_lab.evaluation import kl_divergence, multi_token_kl, reference_perplexity
    from refusal_lab.generation import generate
    from refusal_lab.judges import last_logits
    from refusal_lab.memory import release
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled
    from refusal_lab.zero_shot import accuracy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "utility.json"))
    args = ap.parse_args()
    original = load_model("default")
    prompts = bundled("harmless", "test").prompts
    replies = generate(original, prompts, max_new_tokens=64)
    o_logits = last_logits(original, prompts)
    acc, se = accuracy(original)
    rows = [{"scheme": "none (original)", "zero_shot_accuracy": acc, "zero_shot_se": se, "kl_first_token": 0.0,
             "kl_16_tokens": 0.0, "perplexity": reference_perplexity(original), "seconds": 0.0}]
    for scheme in [s for s in args.schemes.split(",") if s]:
        t0 = time.perf_counter()
        try:
            h, _ = apply(original, scheme)
        except Exception as e:  # noqa: BLE001 — a scheme this machine cannot run is reported, not fatal
            rows.append({"scheme": scheme, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        acc, se = accuracy(h)
        rows.append({"scheme": scheme, "zero_shot_accuracy": acc, "zero_shot_se": se,
                     "kl_first_token": kl_divergence(o_logits, last_logits(h, prompts)),
                     "kl_16_tokens": multi_token_kl(original, h, prompts, replies),
                     "perplexity": reference_perplexity(h), "seconds": time.perf_counter() - t0})
        print(f"{scheme}: {rows[-1]['seconds']:.0f} s", flush=True)
        del h
        release()
    print(text_table(["scheme", "zero-shot acc", "± se", "KL first token", "KL 16 tokens", "perplexity"],
                     [[r["scheme"], *(["error: " + r["error"][:50], "", "", "", ""] if "error" in r else
                                      [f"{r['zero_shot_accuracy']:.3f}", f"{r['zero_shot_se']:.3f}",
                                       f"{r['kl_first_token']:.3f}", f"{r['kl_16_tokens']:.3f}",
                                       f"{r['perplexity']:.2f}"])] for r in rows]))
    write_results(args.out, {"command": " ".join(sys.argv), "n_prompts": len(prompts), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
