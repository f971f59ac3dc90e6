"""Compression benchmark on the embedded default model (SmolLM2-135M-Instruct).

For every registry scheme (representative parameters): wall time, stored size, bits per weight,
achieved sparsity, perplexity on the bundled English text (sliding window) and refusal rate on the
bundled harmful test split (64 greedy tokens + the substring judge). Prints a table and writes
``bench/results/compression.json`` (rewritten after every scheme, so a partial run keeps its rows).

    python bench/compression.py [--no-refusal] [--limit N] [--schemes rtn:4:64,wanda:0.5] [--calibration harmless]

Note: Wanda/SparseGPT calibrate on the bundled text by default, the same text perplexity is measured
on; ``--calibration harmless`` calibrates on the harmless train prompts instead (no overlap).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refusal_lab.tables import text_table  # noqa: E402

SCHEMES = ["bnb-int8", "bnb-nf4", "bnb-fp4", "rtn:8", "rtn:4:64", "rtn:3:64", "hqq:4:64", "magnitude:0.5",
           "wanda:0.5", "sparsegpt:0.5", "wanda:2:4", "sparsegpt:2:4", "magnitude:4:8"]
OUT = ROOT / "bench" / "results" / "compression.json"


def refusal_rate(handle, prompts, *, batch_size: int = 16) -> float:
    from refusal_lab.generation import generate
    from refusal_lab.judges import is_refusal

    replies = generate(handle, prompts, max_new_tokens=64, batch_size=batch_size)
    return sum(is_refusal(r) for r in replies) / len(replies)


def measure(handle, text: str, prompts, args) -> dict:
    from refusal_lab.evaluation import perplexity

    t = time.perf_counter()
    row = {"perplexity": perplexity(handle, text, max_length=args.max_length, stride=args.stride)}
    row["perplexity_seconds"] = time.perf_counter() - t
    if prompts is not None:
        t = time.perf_counter()
        row["refusal_rate"] = refusal_rate(handle, prompts)
        row["refusal_seconds"] = time.perf_counter() - t
    return row


def fmt_table(rows: list[dict], refusal: bool) -> str:
    heads = ["scheme", "time s", "bits/w", "sparsity", "stored MiB", "ppl", "Δppl %"] + (["refusal"] if refusal else [])
    base = next((r["perplexity"] for r in rows if r["scheme"] == "none" and "perplexity" in r), None)
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["scheme"], "—", "—", "—", "—", "error: " + r["error"][:60]] + ([""] if refusal else []))
            continue
        ppl = r.get("perplexity")
        cells = [r["scheme"], f"{r['seconds']:.1f}", f"{r['bits_per_weight']:.2f}", f"{r['sparsity']:.3f}",
                 f"{r['memory_bytes'] / 2 ** 20:.1f}", f"{ppl:.2f}" if ppl else "—",
                 f"{100 * (ppl / base - 1):+.1f}" if ppl and base else "—"]
        if refusal:
            cells.append(f"{r['refusal_rate']:.2f}" if "refusal_rate" in r else "—")
        lines.append(cells)
    return text_table(heads, lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated scheme specs")
    p.add_argument("--no-refusal", action="store_true", help="skip the refusal-rate generation")
    p.add_argument("--limit", type=int, default=None, help="use only the first N harmful test prompts")
    p.add_argument("--calibration", default="text", help="text (default) | harmless")
    p.add_argument("--max-length", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default max-length/2)")
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    import torch

    from refusal_lab.compression import apply, parse_scheme
    from refusal_lab.compression.calibration import resolve
    from refusal_lab.compression.report import build_report
    from refusal_lab.compression.targets import select_targets
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled, bundled_text

    schemes = [str(parse_scheme(s)) for s in args.schemes.split(",") if s.strip()]
    t0 = time.perf_counter()
    handle = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    text = bundled_text()
    prompts = None if args.no_refusal else bundled("harmful", "test").head(args.limit).prompts
    calibration = resolve(handle, args.calibration)
    result = {
        "model": handle.name, "spec": handle.spec, "fingerprint": handle.fingerprint,
        "load_seconds": load_seconds,
        "text_tokens": len(handle.tokenizer(text, add_special_tokens=False)["input_ids"]),
        "perplexity": {"text": "refusal_lab.prompts.bundled_text()", "max_length": args.max_length,
                       "stride": args.stride or args.max_length // 2},
        "refusal": None if prompts is None else {"prompts": "harmful/test", "n": len(prompts),
                                                 "max_new_tokens": 64, "judge": "refusal_lab.judges.is_refusal"},
        "calibration": calibration.describe(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(handle.device), "torch": torch.__version__},
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2, default=str))

    print(f"{handle.name}: {result['text_tokens']} text tokens, "
          f"{'no refusal' if prompts is None else f'{len(prompts)} harmful prompts'}", flush=True)
    base = build_report(parent_model=handle.model, model=handle.model, targets=select_targets(handle),
                        scheme=parse_scheme("magnitude:0"), n_layers=handle.n_layers, model_name=handle.name,
                        seconds=0.0, calibration=None, saveable=True, save_note="")
    row = {"scheme": "none", "family": "-", "seconds": 0.0, "sparsity": base.sparsity,
           "bits_per_weight": base.original_bits_per_weight, "memory_bytes": base.original_memory_bytes,
           "resident_bytes": base.resident_bytes}
    row.update(measure(handle, text, prompts, args))
    result["rows"].append(row)
    save()
    print(f"  none: ppl {row['perplexity']:.2f}" + (f", refusal {row['refusal_rate']:.2f}" if prompts else ""),
          flush=True)

    for spec in schemes:
        row = {"scheme": spec}
        try:
            scheme = parse_scheme(spec)
            new, rep = apply(handle, scheme, calibration if scheme.needs_calibration else None)
            row.update(family=rep.family, seconds=rep.seconds, sparsity=rep.sparsity,
                       bits_per_weight=rep.bits_per_weight, memory_bytes=rep.memory_bytes,
                       resident_bytes=rep.resident_bytes, compressed_bytes=rep.compressed_bytes,
                       layer_sparsity=rep.layer_sparsity)
            row.update(measure(new, text, prompts, args))
            del new
        except Exception as e:  # keep going: one broken scheme must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        gc.collect()
        result["rows"].append(row)
        save()
        if "error" in row:
            print(f"  {spec}: ERROR {row['error'][:200]}", flush=True)
        else:
            print(f"  {spec}: {row['seconds']:.1f}s, ppl {row['perplexity']:.2f}"
                  + (f", refusal {row['refusal_rate']:.2f}" if "refusal_rate" in row else ""), flush=True)

    result["total_seconds"] = time.perf_counter() - t0
    save()
    print()
    print(fmt_table(result["rows"], prompts is not None))
    print(f"\nwritten to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
