"""Probe: a bitsandbytes variant's greedy replies in bf16 autocast and in float32 on the CPU, in one run —
seconds (alternating, two runs each) and whether the refused/answered verdicts agree. bitsandbytes' CPU
kernels compute its 4-bit layers their own way in either case; this measures whether ``auto`` (bf16) buys
anything for such a variant, and what it costs in agreement with the exact path (#20, point 3's bnb-nf4 rates).

    .venv/bin/python bench/bnb_precision_probe.py [--scheme bnb-nf4] [--out bench/results/bnb_precision_probe.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ORDER = ("bfloat16", "float32", "float32", "bfloat16")  # alternating: drift of the shared host hits both


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="bnb-nf4")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bnb_precision_probe.json"))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from bench.common import write_results
    from refusal_lab.compression import apply as compress
    from refusal_lab.generation import generate
    from refusal_lab.judges import is_refusal
    from refusal_lab.models import load_model
    from refusal_lab.precision import running_at
    from refusal_lab.prompts import bundled

    c, _ = compress(load_model("default"), args.scheme)
    prompts = [p for kind in ("harmful", "harmless", "borderline") for p in bundled(kind, "test").prompts]
    generate(c, prompts[:2], max_new_tokens=4)  # warm-up
    seconds: dict[str, list[float]] = {}
    verdicts: dict[str, list[bool]] = {}
    for precision in ORDER:
        with running_at(c, precision):
            t0 = time.perf_counter()
            replies = generate(c, prompts, max_new_tokens=64)
            seconds.setdefault(precision, []).append(round(time.perf_counter() - t0, 1))
        verdicts[precision] = [bool(is_refusal(r)) for r in replies]
    agree = sum(a == b for a, b in zip(verdicts["bfloat16"], verdicts["float32"])) / len(prompts)
    out = {"scheme": args.scheme, "n_prompts": len(prompts), "seconds": seconds,
           "float32_over_bfloat16": round(sum(seconds["float32"]) / sum(seconds["bfloat16"]), 3),
           "verdict_agreement": round(agree, 4),
           "refusal": {p: round(sum(v) / len(v), 4) for p, v in verdicts.items()}}
    print(out)
    write_results(args.out, {"command": " ".join(sys.argv), **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
