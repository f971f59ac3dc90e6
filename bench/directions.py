"""Activation-extraction benchmark on the embedded default model (SmolLM2-135M-Instruct).

Mean residual stream at the post-instruction positions over all layers (block inputs + final-norm input)
for N harmful + N harmless prompts, two ways in the same process:

* ``batched`` — :func:`refusal_lab.activations.mean_activations` (length-sorted batches under a memory budget,
  shared prompt prefix run once through the KV cache, float64 running sums);
* ``naive``   — one prompt at a time with ``output_hidden_states=True``, every prompt's activations kept
  until the end (:func:`refusal_lab.activations.naive_mean_activations`).

Reports wall time, prompts/s and the peak RSS increase during each phase (sampled by a thread), checks
both give the same means, prints a table and writes ``bench/results/directions.json``. ``--selection``
also times candidate selection on a few candidates and extrapolates the full grid's cost.

    python bench/directions.py [--n 128] [--model default] [--threads N] [--selection]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "directions.json"


class PeakRSS:
    """Samples this process's RSS every few ms; ``peak_mb - start_mb`` is the phase's extra memory."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _phase(args) -> int:
    """One method in this (fresh) process: load, warm up, measure; write means + numbers to --tmp."""
    import torch
    from safetensors.torch import save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    from refusal_lab.activations import mean_activations, naive_mean_activations
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled

    handle = load_model(args.model)
    harmful = bundled("harmful", "train").head(args.n).prompts
    harmless = bundled("harmless", "train").head(args.n).prompts
    # Warm-up: the first forward pages the memory-mapped weights in (~0.5 GB for SmolLM2) and initialises
    # kernels — not a cost of either method.
    naive_mean_activations(handle, harmful[:1])
    mean_activations(handle, harmful[:2])
    fn = mean_activations if args.phase == "batched" else naive_mean_activations
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = [fn(handle, ps) for ps in (harmful, harmless)]
        seconds = time.perf_counter() - t
    means = [o.mean if args.phase == "batched" else o for o in out]
    tmp = Path(args.tmp)
    save_file({"harmful": means[0].contiguous(), "harmless": means[1].contiguous()}, str(tmp / f"{args.phase}.st"))
    n_total = len(harmful) + len(harmless)
    (tmp / f"{args.phase}.json").write_text(json.dumps({
        "seconds": round(seconds, 2), "prompts_per_s": round(n_total / seconds, 2),
        "peak_rss_increase_mb": round(mem.extra_mb, 1), "peak_rss_mb": round(mem.peak / 2**20, 1),
        "torch_threads": torch.get_num_threads()}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=128, help="prompts per set (128 harmful + 128 harmless)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--selection", action="store_true", help="also time selection on a few candidates")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--phase", choices=["batched", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return _phase(args)

    import subprocess
    import tempfile

    import torch
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)
    from refusal_lab.activations import post_instruction_length
    from refusal_lab.models import load_model

    t0 = time.perf_counter()
    handle = load_model(args.model)
    load_s = time.perf_counter() - t0
    n_pos = post_instruction_length(handle)
    print(f"model {handle.name}: {handle.n_layers} layers, d_model {handle.d_model}; {args.n} harmful + "
          f"{args.n} harmless prompts; {n_pos} post-instruction positions; torch threads "
          f"{args.threads or torch.get_num_threads()}; load {load_s:.1f} s; 1-min load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    results: dict = {}
    means: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("batched", "naive"):  # each in a fresh process: clean peak-RSS numbers
            cmd = [sys.executable, __file__, "--phase", name, "--tmp", tmp, "--model", args.model, "--n", str(args.n)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
            results[name] = json.loads((Path(tmp) / f"{name}.json").read_text())
            means[name] = load_file(str(Path(tmp) / f"{name}.st"))
            print(f"  {name}: {results[name]['seconds']:.1f} s", flush=True)
    diff = max(float((means["batched"][k] - means["naive"][k]).abs().max()) for k in ("harmful", "harmless"))
    scale = max(float(means["naive"][k].abs().max()) for k in ("harmful", "harmless"))
    speedup = results["naive"]["seconds"] / results["batched"]["seconds"]

    selection = None
    if args.selection:
        from refusal_lab.directions import generate_candidates
        from refusal_lab.selection import select_direction
        from refusal_lab.prompts import bundled

        ds = generate_candidates(handle, bundled("harmful", "train").head(32), bundled("harmless", "train").head(32))
        hv, nv = bundled("harmful", "val").head(32), bundled("harmless", "val").head(32)
        t = time.perf_counter()
        sel = select_direction(handle, ds, hv, nv, positions=[-1], max_layer_frac=4 / handle.n_layers)
        s = time.perf_counter() - t
        info = sel.metadata["selection"]
        passes = 1 + info["n_candidates"] + 2 * info["n_checked"]
        per_pass = s / passes
        full = len(ds.positions) * int(0.8 * handle.n_layers)
        selection = {"seconds": round(s, 1), "candidates": info["n_candidates"], "checked": info["n_checked"],
                     "val_prompts": 32, "seconds_per_val_pass": round(per_pass, 2),
                     "full_grid_candidates": full,
                     "full_grid_estimate_min": round((full + 6) * per_pass / 60, 1),
                     "estimate_note": "one bypass pass per candidate + a few KL/induce passes (lazy search)"}

    table = [("method", "seconds", "prompts/s", "peak RSS +MB"),
             *[(k, f"{v['seconds']:.1f}", f"{v['prompts_per_s']:.2f}", f"{v['peak_rss_increase_mb']:.0f}")
               for k, v in results.items()]]
    print()
    for row in table:
        print(f"{row[0]:<10}{row[1]:>10}{row[2]:>12}{row[3]:>14}")
    print(f"speed-up: {speedup:.1f}x (target >= 3x); max |batched - naive| = {diff:.2e} (max |mean| {scale:.1f})")
    if selection:
        print(f"selection: {selection['candidates']} candidates in {selection['seconds']} s "
              f"({selection['seconds_per_val_pass']} s per pass over 32 val prompts); full grid "
              f"({selection['full_grid_candidates']} candidates) ≈ {selection['full_grid_estimate_min']} min")

    report = {"model": handle.name, "fingerprint": handle.fingerprint, "n_layers": handle.n_layers,
              "d_model": handle.d_model, "n_harmful": args.n, "n_harmless": args.n,
              "n_positions": n_pos, "torch_threads": results["batched"]["torch_threads"],
              "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
              "platform": platform.platform(), "torch": torch.__version__, "results": results,
              "speedup": round(speedup, 2), "max_abs_diff": diff, "selection": selection,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
