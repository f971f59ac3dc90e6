"""The whole selection grid of the default model, per prompt, and what each search order would cost.

For every candidate the selection may score (all post-instruction positions × layers below
0.8·n_layers, non-zero), on the bundled val splits (the study's setting):

* bypass — refusal score of each harmful val prompt with the candidate ablated everywhere,
* KL — KL(unmodified ‖ ablated) of each harmless val prompt's next-token distribution,
* induce — refusal score of each harmless val prompt with the candidate added at its layer.

Kept per prompt (``bench/results/selection_grid.json``), so that search strategies can be compared
offline on real numbers. The table counts full passes over one val set (67 prompts; a partial KL
check counts its share of prompts) each strategy needs to reach its choice, and checks they choose alike:

* ``lazy`` — the start commit's rule: bypass for all, then KL / induce in bypass order;
* ``lazy + KL bound`` — the same, a KL check stopping once its running sum proves KL ≥ the threshold;
* ``induce first`` — KL (bounded) for all, induce for those under the threshold, bypass only for
  the feasible ones (same choice; the bypass heatmap stays partial);
* ``screen induce on k prompts`` — an approximation: induce on k evenly spread harmless prompts for
  every candidate; only those whose screened mean + 3 standard errors is > 0 go on to the exact
  checks (as ``induce first``). Its choice is compared with the exact one.

    python bench/selection_grid.py [--from bench/results/selection_grid.json] [--chunk 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "selection_grid.json"
THRESHOLDS = (0.1, 0.25, 0.5, 1.0)  # select_direction's defaults: 0.1, relaxed to 0.25, 0.5, 1.0


def measure() -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from refusal_lab.activations import BatchRunner, tokenize
    from refusal_lab.directions import generate_candidates
    from refusal_lab.evaluation import kl_per_prompt
    from refusal_lab.interventions import ablate, add
    from refusal_lab.judges import refusal_score_from_logits, refusal_token_ids
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled

    h = load_model("default")
    ds = generate_candidates(h, bundled("harmful", "train").prompts, bundled("harmless", "train").prompts)
    harmful, harmless = bundled("harmful", "val").prompts, bundled("harmless", "val").prompts
    ids = refusal_token_ids(h.tokenizer)
    run_h, run_n = BatchRunner(h, tokenize(h, harmful)), BatchRunner(h, tokenize(h, harmless))
    with h.lock:
        base_n = run_n.last_logits()
        base_h = refusal_score_from_logits(run_h.last_logits(), ids)
    grid, t0 = {}, time.perf_counter()
    for p in ds.positions:
        for layer in range(int(0.8 * h.n_layers)):
            r = ds.candidate(p, layer)
            if float(r.norm()) == 0:
                continue
            with ablate(h, r):
                bypass = refusal_score_from_logits(run_h.last_logits(), ids)
                kl = kl_per_prompt(base_n, run_n.last_logits())
            with add(h, r, layer, 1.0):
                induce = refusal_score_from_logits(run_n.last_logits(), ids)
            grid[f"{p},{layer}"] = {"bypass": bypass.tolist(), "kl": kl.tolist(), "induce": induce.tolist()}
            print(f"{p:3d} {layer:3d}  bypass {bypass.mean():7.3f}  KL {kl.mean():6.3f}  induce {induce.mean():7.3f}"
                  f"  {time.perf_counter() - t0:6.0f} s", flush=True)
    return {"n_harmful": len(harmful), "n_harmless": len(harmless), "baseline_harmful": base_h.tolist(),
            "seconds": time.perf_counter() - t0, "grid": grid}


def strategies(data: dict, chunk: int) -> list[dict]:
    """Passes each search order needs on the measured grid (1 pass = one val set, all prompts)."""
    grid = data["grid"]
    n = data["n_harmless"]
    mean = {k: {m: sum(v[m]) / len(v[m]) for m in ("bypass", "kl", "induce")} for k, v in grid.items()}
    keys = list(grid)
    chunks = [range(i, min(i + chunk, n)) for i in range(0, n, chunk)]

    def run(order_first: str, bound: bool, only: list[str] | None = None) -> dict:
        cost = {"baseline": 1.0, "bypass": 0.0, "kl": 0.0, "induce": 0.0}
        kl_state = {k: (0.0, 0) for k in keys}
        have = {"bypass": set(), "induce": set()}

        def get(k: str, m: str) -> float:
            if k not in have[m]:
                have[m].add(k)
                cost[m] += 1
            return mean[k][m]

        def below(k: str, t: float) -> bool:
            total, done = kl_state[k]
            while done < len(chunks) and (not bound or total < n * t):
                total += sum(grid[k]["kl"][i] for i in chunks[done])
                cost["kl"] += len(chunks[done]) / n
                done += 1
            kl_state[k] = (total, done)
            return done == len(chunks) and total / n < t

        chosen = None
        if order_first == "bypass":
            order = sorted(keys, key=lambda k: get(k, "bypass"))
            for t in THRESHOLDS:
                chosen = next((k for k in order if below(k, t) and get(k, "induce") > 0), None)
                if chosen:
                    break
        else:
            for t in THRESHOLDS:
                feasible = [k for k in (keys if only is None else only) if below(k, t) and get(k, "induce") > 0]
                if feasible:
                    chosen = min(feasible, key=lambda k: get(k, "bypass"))
                    break
        if chosen is None:
            chosen = min(keys, key=lambda k: get(k, "bypass"))
        return {"chosen": chosen, "passes": sum(cost.values()), **{f"passes_{k}": v for k, v in cost.items()}}

    def screened(k: int, z: float = 3.0) -> dict:
        idx = [round(i * n / k) for i in range(k)]
        kept = []
        for key in keys:
            s = [grid[key]["induce"][i] for i in idx]
            m = sum(s) / k
            se = (sum((x - m) ** 2 for x in s) / (k - 1)) ** 0.5 / k ** 0.5
            if m + z * se > 0:
                kept.append(key)
        row = run("induce", bound=True, only=kept)
        row["passes_screen"] = len(keys) * k / n
        row["passes"] += row["passes_screen"]
        return {"strategy": f"screen induce on {k} prompts", "kept": len(kept), **row}

    rows = [{"strategy": "lazy (start commit)", **run("bypass", bound=False)},
            {"strategy": "lazy + KL bound (this commit)", **run("bypass", bound=True)},
            {"strategy": "induce first", **run("induce", bound=True)},
            *(screened(k) for k in (8, 12, 16))]
    for r in rows:
        r["same_choice"] = r["chosen"] == rows[0]["chosen"]
    for r in rows:
        r["ratio_to_start"] = rows[0]["passes"] / r["passes"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", default=None, help="reuse a grid JSON instead of measuring")
    ap.add_argument("--chunk", type=int, default=16, help="prompts per KL batch (the runner's batch size)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    data = json.loads(Path(args.source).read_text()) if args.source else measure()
    rows = strategies(data, args.chunk)
    print(f"\n{'strategy':32s} {'chosen':>8s} {'same':>5s} {'passes':>7s} {'bypass':>7s} {'KL':>6s} {'induce':>7s} "
          f"{'screen':>7s} {'× start':>8s}")
    for r in rows:
        print(f"{r['strategy']:32s} {r['chosen']:>8s} {str(r['same_choice']):>5s} {r['passes']:7.1f} "
              f"{r['passes_bypass']:7.0f} {r['passes_kl']:6.1f} {r['passes_induce']:7.0f} "
              f"{r.get('passes_screen', 0):7.1f} {r['ratio_to_start']:8.2f}")
    if not args.source:
        from bench.common import write_results

        write_results(args.out, {"command": "python bench/selection_grid.py", **data, "strategies": rows})


if __name__ == "__main__":
    main()
