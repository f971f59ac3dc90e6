"""The floor under the direction search on this machine: what one scoring pass costs, against FLOPs.

One selection pass = the last-position logits of the 67 bundled harmful val prompts under a hook (the
shared 24-token template prefix run once). Measured here, on the default model, in one run:

* matrix-product throughput at the model's own shapes (rows = tokens of one pass; float32, bfloat16);
* one pass in float32, under ``torch.autocast`` to bfloat16, and with bfloat16 weights;
* the same FLOPs at the measured float32 matmul rate (the floor a faster pass of the same maths
  could reach).

    python bench/floor.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "floor.json"


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from refusal_lab.activations import BatchRunner, tokenize
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled

    h = load_model("default")
    cfg = h.model.config
    prompts = bundled("harmful", "val").prompts
    runner = BatchRunner(h, tokenize(h, prompts))
    tokens = sum(len(r) for r in runner.rest)
    params = sum(p.numel() for n, p in h.model.named_parameters() if "embed" not in n and "lm_head" not in n)
    flops = 2 * params * tokens + 2 * cfg.vocab_size * h.d_model * len(prompts)  # body + last-position head
    rows = {}
    d, ff = h.d_model, cfg.intermediate_size
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(tokens, d, dtype=dtype), torch.randn(ff, d, dtype=dtype)
        s = _best(lambda: torch.nn.functional.linear(x, w), 20)
        rows[f"matmul {tokens}×{d}×{ff} {str(dtype)[6:]}"] = {"seconds": s, "gflops": 2 * tokens * d * ff / s / 1e9}

    def one_pass(handle):
        with handle.lock:
            handle_runner = BatchRunner(handle, tokenize(handle, prompts))
            return lambda: handle_runner.last_logits()

    rows["pass float32"] = {"seconds": _best(one_pass(h), args.repeats)}

    def autocast_pass():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runner.last_logits()

    with h.lock:
        rows["pass autocast bfloat16"] = {"seconds": _best(autocast_pass, args.repeats)}
    h16 = copy.copy(h)
    h16.model = copy.deepcopy(h.model).to(torch.bfloat16)
    rows["pass bfloat16 weights"] = {"seconds": _best(one_pass(h16), args.repeats)}
    fp32_rate = rows[f"matmul {tokens}×{d}×{ff} float32"]["gflops"]
    for name in ("pass float32", "pass autocast bfloat16", "pass bfloat16 weights"):
        rows[name]["gflops"] = flops / rows[name]["seconds"] / 1e9
    floor = flops / (fp32_rate * 1e9)
    print(f"one pass: {len(prompts)} prompts, {tokens} tokens after the {len(runner.prefix)}-token shared prefix, "
          f"{flops / 1e9:.0f} GFLOP; float32 matmul floor {floor:.2f} s\n")
    print(f"{'measurement':40s} {'seconds':>8s} {'GFLOP/s':>8s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['seconds']:8.3f} {r['gflops']:8.0f}")
    from bench.common import write_results

    write_results(args.out, {"command": "python bench/floor.py", "prompts": len(prompts), "tokens": tokens,
                             "prefix_tokens": len(runner.prefix), "gflop_per_pass": flops / 1e9,
                             "float32_floor_seconds": floor, "rows": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
