"""The study's KL to the original, measured on two sources of the variant's harmless logits.

    .venv/bin/python bench/kl_source.py [--scheme wanda:0.5 --scheme bnb-nf4] [--limit 100]

The study measures KL(original ‖ variant) on the harmless evaluation set. The original's logits come
from one last-position pass (computed once per study); the variant's used to come from a second pass
of its own and now come from its harmless replies' first generation step (the logits the first reply
token is chosen from: the same last position, in a prefill batch of another composition). This prints
both KLs per scheme and their difference, on the study's harmless set (Alpaca test, first ``--limit``;
the bundled harmless test split when ../shared is absent). Writes bench/results/kl_source.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402
from refusal_lab.tables import text_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scheme", action="append", default=None)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kl_source.json"))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from refusal_lab.compression import apply as compress
    from refusal_lab.evaluation import kl_divergence
    from refusal_lab.generation import generate_with_logits
    from refusal_lab.judges import last_logits
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled, load_prompts

    alpaca = ROOT.parent / "shared" / "benchmarks" / "alpaca_harmless_test.json"
    prompts = (load_prompts(str(alpaca)) if alpaca.exists() else bundled("harmless", "test")).prompts[:args.limit]
    original = load_model("default")
    reference = last_logits(original, prompts)
    rows = []
    for scheme in args.scheme or ["wanda:0.5", "bnb-nf4"]:
        variant, _ = compress(original, scheme)
        pass_kl = kl_divergence(reference, last_logits(variant, prompts))
        _, first = generate_with_logits(variant, prompts, max_new_tokens=1)  # the prefill is the evaluation's
        gen_kl = kl_divergence(reference, first)
        rows.append({"scheme": scheme, "precision": variant.precision, "kl_second_pass": pass_kl,
                     "kl_first_step": gen_kl, "relative_difference": abs(gen_kl - pass_kl) / pass_kl})
        del variant
    print(text_table(list(rows[0]), [[f"{v:.6g}" if isinstance(v, float) else v for v in r.values()] for r in rows]))
    write_results(args.out, {"command": " ".join(sys.argv), "n_prompts": len(prompts), "rows": rows})


if __name__ == "__main__":
    main()
