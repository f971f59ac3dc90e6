"""Probe: repair the compressed model with an affine map of its own projection on the original's
refusal direction, instead of a per-feature fit.

The fitted re-alignment (a ridge fit over d_ff features, ``core.aird.fit_realignment``) closes most
of the O–C projection gap on prompts like its training prompts but little on unseen kinds
(``bench/aird_fit_probe.py``). This probe fits two numbers instead: ``p_O ≈ a·p_C + b`` — the
original's projection on r̂ entering the source layer l* as an affine function of C's — by least
squares on the bundled *train* prompts (last five positions), and applies, at the input of block l*,
every position, ``h ← h + ((a_t − 1)·r̂ᵀh + b_t)·r̂`` with ``a_t = 1 + t(a − 1)``, ``b_t = t·b``
(``t`` = 1: the fitted map; ``t`` < 1: part of it). A hook, i.e. AIRD's adapter form: the map depends
on the whole residual, so no single writer's weights can hold it. Reports the gap closed (val;
val harmful with its category left out of the fit) and refusal on the bundled val splits (24 new
tokens, the calibration's setting); with ``--public N`` also, for evaluation only, on the first N
prompts of AdvBench and of Alpaca (``../shared/benchmarks``).

    python bench/aird_affine_map_probe.py [--scheme wanda:0.5] [--t 0.5,1] [--public 0]

Prints a table and writes ``bench/results/aird_affine_map_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "benchmarks"

from core.cli import text_table  # noqa: E402


def fit_affine(p_c: torch.Tensor, p_o: torch.Tensor) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``p_o ≈ a·p_c + b`` (1-D tensors of the same length)."""
    x = torch.stack([p_c.double(), torch.ones_like(p_c, dtype=torch.float64)], 1)
    a, b = torch.linalg.lstsq(x, p_o.double().unsqueeze(1)).solution.squeeze(1).tolist()
    return a, b


@contextmanager
def affine_along(handle, direction: torch.Tensor, layer: int, a: float, b: float):
    """``h ← h + ((a − 1)·r̂ᵀh + b)·r̂`` at the input of block ``layer``, every position (removed on exit)."""
    from core.interventions import _hooked, _pre_hook  # the package's hook plumbing (lock, removal on error)

    r = (direction / direction.norm()).float()

    def fn(x: torch.Tensor) -> torch.Tensor:
        rr = r.to(x.dtype)
        return x + ((a - 1) * (x @ rr) + b).unsqueeze(-1) * rr

    block = handle.blocks[layer]
    with _hooked(handle, [(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), _pre_hook(fn))]):
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="wanda:0.5")
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--t", default="0.5,1")
    p.add_argument("--fit-only", action="store_true", help="stop after the fit (no generation)")
    p.add_argument("--public", type=int, default=0, help="also the first N prompts of AdvBench and Alpaca (evaluation)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "aird_affine_map_probe.json"))
    args = p.parse_args(argv)
    from core.activations import writer_inputs
    from core.aird import REALIGN_ROLE, CalibrationSets, refusal_rate
    from core.evaluation import kl_divergence
    from core.judges import last_logits
    from core.prompts import bundled, resolve_prompt_arg
    from core.study import Study, StudySpec

    t0 = time.perf_counter()
    study = Study(StudySpec(model="default", schemes=[args.scheme], aird="auto",
                            name=f"bench aird affine map probe {args.scheme}"), args.runs)
    d_o = study.directions("original")
    layer = d_o.selected[1]
    o, c = study.original, study.variant(args.scheme)
    n_pos = 5

    def projections(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        _, p_o = writer_inputs(o, prompts, o.writers(layer - 1)[REALIGN_ROLE], d_o.direction, layer, n_positions=n_pos)
        _, p_c = writer_inputs(c, prompts, c.writers(layer - 1)[REALIGN_ROLE], d_o.direction, layer, n_positions=n_pos)
        return p_c, p_o

    train = {k: projections(bundled(k, "train").prompts) for k in ("harmful", "harmless", "borderline")}
    val = {k: projections(bundled(k, "val").prompts) for k in ("harmful", "harmless", "borderline")}
    a, b = fit_affine(torch.cat([v[0] for v in train.values()]), torch.cat([v[1] for v in train.values()]))

    def closed(pc: torch.Tensor, po: torch.Tensor, a_: float, b_: float) -> float:
        gap = po - pc
        return float(1 - ((po - (a_ * pc + b_)) ** 2).sum() / (gap ** 2).sum())

    cats_tr, cats_va = bundled("harmful", "train").categories, bundled("harmful", "val").categories
    num = den = 0.0
    for cat in sorted(set(cats_tr)):
        keep = torch.tensor([k != cat for k in cats_tr]).repeat_interleave(n_pos)
        pc = torch.cat([train["harmful"][0][keep], train["harmless"][0], train["borderline"][0]])
        po = torch.cat([train["harmful"][1][keep], train["harmless"][1], train["borderline"][1]])
        a_c, b_c = fit_affine(pc, po)
        sel = torch.tensor([k == cat for k in cats_va]).repeat_interleave(n_pos)
        vc, vo = val["harmful"][0][sel], val["harmful"][1][sel]
        num += float(((vo - (a_c * vc + b_c)) ** 2).sum())
        den += float(((vo - vc) ** 2).sum())
    fit = {"a": a, "b": b, "gap_closed_val": closed(torch.cat([v[0] for v in val.values()]),
                                                    torch.cat([v[1] for v in val.values()]), a, b),
           "gap_closed_val_harmful_category_left_out": 1 - num / den}
    print(f"fit: a {a:.3f}, b {b:.3f}; gap closed on val {fit['gap_closed_val']:.3f}, "
          f"val harmful with its category left out {fit['gap_closed_val_harmful_category_left_out']:.3f}", flush=True)

    rows: list[dict] = []
    if args.fit_only:
        return _write(args, fit, rows, layer, t0)
    sets = CalibrationSets.bundled()
    evals = {"val harmful": sets.harmful, "val harmless+borderline": sets.harmless}
    if args.public and SHARED.is_dir():
        evals["AdvBench (evaluation)"] = resolve_prompt_arg(str(SHARED / "advbench.json"), "harmful").head(args.public).prompts
        evals["Alpaca test (evaluation)"] = resolve_prompt_arg(str(SHARED / "alpaca_harmless_test.json"),
                                                               "harmless").head(args.public).prompts
    base_logits = last_logits(c, sets.harmless)
    configs = [("C (no repair)", None)] + [(f"affine map, t {float(t):g}", float(t)) for t in args.t.split(",") if t]
    for label, t in configs:
        row: dict = {"config": label, "t": t}
        ctx = affine_along(c, d_o.direction, layer, 1 + t * (a - 1), t * b) if t is not None else None
        with ctx if ctx is not None else nullcontext():
            for name, prompts in evals.items():
                row[name], _ = refusal_rate(c, list(prompts), max_new_tokens=24)
            row["kl to C, val harmless+borderline"] = (kl_divergence(base_logits, last_logits(c, sets.harmless))
                                                       if t is not None else 0.0)
        rows.append(row)
        print(label, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, flush=True)
    print(text_table(["config", *evals, "KL to C"],
                     [[r["config"], *(f"{100 * r[n]:.1f}%" for n in evals),
                       f"{r['kl to C, val harmless+borderline']:.3f}"] for r in rows]))
    return _write(args, fit, rows, layer, t0)


def _write(args, fit: dict, rows: list[dict], layer: int, t0: float) -> int:
    out = {"benchmark": "aird_affine_map_probe", "scheme": args.scheme, "source_layer": layer, "fit": fit,
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
