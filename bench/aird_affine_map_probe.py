"""Probe: can an affine map of the compressed model's own projection on the original's refusal
direction stand in for AIRD's per-feature re-alignment fit?

The fitted re-alignment (a ridge fit over d_ff features, ``refusal_lab.aird.fit_realignment``) closes most
of the O–C projection gap on prompts like its training prompts but little on unseen kinds
(``bench/aird_fit_probe.py``). This probe fits two numbers instead: ``p_O ≈ a·p_C + b`` — the
original's projection on r̂ entering the source layer l* as an affine function of C's — by least
squares on the bundled *train* prompts (last five positions), and reports the share of the squared
O–C gap it closes on the bundled val splits and on val harmful prompts whose category was left out
of the fit. Applying it would take a hook ``h ← h + ((a − 1)·r̂ᵀh + b)·r̂`` at block l*'s input (the
map reads the whole residual, so no writer's weights can hold it); the fit alone already showed it
does not carry (BENCHMARKS.md), so the script stops there.

    python bench/aird_affine_map_probe.py --fit-only [--scheme wanda:0.5]

Writes ``bench/results/aird_affine_map_probe.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RealignCaptures, write_results  # noqa: E402


def fit_affine(p_c: torch.Tensor, p_o: torch.Tensor) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``p_o ≈ a·p_c + b`` (1-D tensors of the same length)."""
    x = torch.stack([p_c.double(), torch.ones_like(p_c, dtype=torch.float64)], 1)
    a, b = torch.linalg.lstsq(x, p_o.double().unsqueeze(1)).solution.squeeze(1).tolist()
    return a, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="wanda:0.5")
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--fit-only", action="store_true", help="the only mode kept (see the module docstring)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "aird_affine_map_probe.json"))
    args = p.parse_args(argv)
    from refusal_lab.prompts import bundled

    t0 = time.perf_counter()
    probe = RealignCaptures(args.scheme, args.runs, f"bench aird affine map probe {args.scheme}")
    layer = probe.layer
    n_pos = 5

    def projections(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        _, p_o, p_c = probe.capture(prompts, n_pos)
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

    write_results(args.out, {"benchmark": "aird_affine_map_probe", "scheme": args.scheme, "source_layer": layer,
                             "fit": fit, "rows": [], "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
