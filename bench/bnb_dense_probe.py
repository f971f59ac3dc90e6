"""Probe: a bitsandbytes 4-bit variant's greedy replies through bitsandbytes' fused CPU kernel (which
unpacks every weight on every call) and through the dequantized-once bf16 matmul that
``refusal_lab.precision.compute`` uses (``DENSE_4BIT``), in one run — seconds (alternating, two
runs each), token-identical replies and refused/answered verdict agreement on the bundled test prompts,
at each compute precision. Both products round the input to bf16 and accumulate in float32; they differ
in summation order, i.e. in the last bit of some bf16 outputs (#20, point 3).

    .venv/bin/python bench/bnb_dense_probe.py [--scheme bnb-nf4] [--precisions bfloat16,float32]
        [--out bench/results/bnb_dense_probe.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ORDER = ("kernel", "dense", "dense", "kernel")  # alternating: drift of the shared host hits both


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="bnb-nf4")
    ap.add_argument("--precisions", default="bfloat16,float32")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bnb_dense_probe.json"))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from bench.common import write_results
    from refusal_lab import precision as prec
    from refusal_lab.compression import apply as compress
    from refusal_lab.generation import generate
    from refusal_lab.judges import is_refusal
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled

    c, _ = compress(load_model("default"), args.scheme)
    kinds = ("harmful", "harmless", "borderline")
    sets = {kind: bundled(kind, "test").prompts for kind in kinds}
    prompts = [p for kind in kinds for p in sets[kind]]
    rows = {}
    for precision in args.precisions.split(","):
        seconds: dict[str, list[float]] = {}
        replies: dict[str, list[str]] = {}
        with prec.running_at(c, precision):
            generate(c, prompts[:2], max_new_tokens=4)  # warm-up (and the dense path's one dequantization)
            for path in ORDER:
                prec.DENSE_4BIT = path == "dense"
                t0 = time.perf_counter()
                replies[path] = generate(c, prompts, max_new_tokens=args.max_new_tokens)
                seconds.setdefault(path, []).append(round(time.perf_counter() - t0, 1))
        prec.DENSE_4BIT = True
        verdicts = {p: [bool(is_refusal(r)) for r in rs] for p, rs in replies.items()}
        rates, start = {}, 0
        for kind in kinds:
            n = len(sets[kind])
            rates[kind] = {p: round(100 * sum(v[start:start + n]) / n, 1) for p, v in verdicts.items()}
            start += n
        rows[precision] = {
            "seconds": seconds, "kernel_over_dense": round(sum(seconds["kernel"]) / sum(seconds["dense"]), 2),
            "identical_replies": round(sum(a == b for a, b in zip(replies["kernel"], replies["dense"])) / len(prompts), 4),
            "verdict_agreement": round(sum(a == b for a, b in zip(verdicts["kernel"], verdicts["dense"])) / len(prompts), 4),
            "refusal_pct": rates}
        print(precision, rows[precision], flush=True)
    out = {"scheme": args.scheme, "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows}
    print(f"{'precision':10} {'kernel s':>12} {'dense s':>12} {'ratio':>6} {'identical':>9} {'verdicts':>8}")
    for p, r in rows.items():
        print(f"{p:10} {str(r['seconds']['kernel']):>12} {str(r['seconds']['dense']):>12} {r['kernel_over_dense']:>6} "
              f"{r['identical_replies']:>9.1%} {r['verdict_agreement']:>8.1%}")
    write_results(args.out, {"command": " ".join(sys.argv), **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
