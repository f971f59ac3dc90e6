"""Probe: how well does AIRD's fitted re-alignment reproduce the original's refusal projection on
prompts it was not fitted on, by fit setting?

The re-alignment edits one writer (C's MLP output in block l*−1) so that C's projection on O's refusal
direction r̂, entering the source layer l*, matches O's: ``x_C u ≈ r̂ᵀh_O − r̂ᵀh_C``. Because the edited
writer is the last one before l*, the edited model's projection there is exactly ``r̂ᵀh_C + x_C u``, so
the share of the O–C gap a fit closes on held-out prompts can be measured from captured activations,
without generating. Settings are *chosen* on the bundled val splits (``gap closed, val``); the public
benchmark columns (first ``--n-public`` prompts of AdvBench and JailbreakBench, when present) are
evaluation only.

    python bench/aird_fit_probe.py [--scheme wanda:0.5] [--runs runs] [--n-public 100] [--extra-harmful FILE]

``--extra-harmful``: also fit on a train-only pool of our own harmful prompts (``[category]`` tags; the
left-out category is left out of the pool too), at the default fit positions.

Prints a table and writes ``bench/results/aird_fit_probe.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "benchmarks"

from bench.common import RealignCaptures, write_results  # noqa: E402
from refusal_lab.tables import text_table  # noqa: E402


def gap_closed(x: torch.Tensor, p_o: torch.Tensor, p_c: torch.Tensor, u: torch.Tensor) -> float:
    """1 − Σ(p_O − p_C − x u)² / Σ(p_O − p_C)²: the share of the squared O–C projection gap the fit closes
    (1 = C+fit matches O, 0 = no better than C, < 0 worse)."""
    gap = p_o - p_c
    return float(1 - ((gap - x @ u) ** 2).sum() / (gap ** 2).sum().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="wanda:0.5")
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--n-public", type=int, default=100)
    p.add_argument("--extra-harmful", default=None,
                   help="a train-only pool of our own harmful prompts ([category] tags) to add to the fit")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "aird_fit_probe.json"))
    args = p.parse_args(argv)
    from refusal_lab.aird import DEFAULT_REALIGN_POSITIONS, ridge
    from refusal_lab.prompts import bundled, load_prompts, resolve_prompt_arg

    t0 = time.perf_counter()
    probe = RealignCaptures(args.scheme, args.runs, f"bench aird fit probe {args.scheme}")
    layer = probe.layer
    n_pos = DEFAULT_REALIGN_POSITIONS  # evaluated positions (the last five of every prompt)
    n_cap = 15  # captured positions: fits may use more than the default five

    def capture(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return probe.capture(prompts, n_cap)

    train = {k: capture(bundled(k, "train").prompts) for k in ("harmful", "harmless", "borderline")}
    cats_pool: list = []
    if args.extra_harmful:
        pool = load_prompts(args.extra_harmful, name="pool")
        train["pool"], cats_pool = capture(pool.prompts), pool.categories
    held = {f"val {k}": capture(bundled(k, "val").prompts) for k in ("harmful", "harmless", "borderline")}
    public = {}
    for name in ("advbench", "jailbreakbench"):
        f = SHARED / f"{name}.json"
        if f.is_file():
            public[name] = capture(resolve_prompt_arg(str(f), "harmful").head(args.n_public).prompts)

    def prompt_rows(n_prompts: int, keep: list[bool], k: int) -> torch.Tensor:
        """Row indices of the last ``k`` captured positions of the kept prompts."""
        base = torch.arange(n_prompts * n_cap).reshape(n_prompts, n_cap)[torch.tensor(keep)]
        return base[:, n_cap - k:].reshape(-1)

    def fit(parts: list[str], k: int, lam: float, standardize: bool, drop: str | None = None) -> torch.Tensor:
        """The re-alignment ``u`` from the train captures of ``parts`` at the last ``k`` positions
        (``drop``: leave out the harmful train and pool prompts of that category)."""
        xs, ys = [], []
        for part in parts:
            x, po, pc = train[part]
            cats = {"harmful": cats_train, "pool": cats_pool}.get(part, [None] * (len(x) // n_cap))
            rows = prompt_rows(len(cats), [c != drop or drop is None for c in cats], k)
            xs.append(x[rows])
            ys.append((po - pc)[rows])
        x, y = torch.cat(xs), torch.cat(ys)
        scale = x.std(0).clamp_min(1e-8) if standardize else torch.ones(x.shape[1], dtype=x.dtype)
        return ridge(x / scale, y, lam) / scale

    def closed(t: tuple[torch.Tensor, ...], u: torch.Tensor, keep: list[bool] | None = None) -> tuple[float, float]:
        """(Σ squared residual, Σ squared gap) over the last ``n_pos`` positions of the kept prompts."""
        x, po, pc = t
        n = len(x) // n_cap
        rows = prompt_rows(n, keep or [True] * n, n_pos)
        gap = (po - pc)[rows]
        return float(((gap - x[rows] @ u) ** 2).sum()), float((gap ** 2).sum())

    # Leave-one-category-out on our own prompts: fit without the train harmful prompts of one category,
    # measure the gap closed on that category's val harmful prompts. A proxy, on bundled data only, for
    # how a fit carries to harmful prompts unlike those it was fitted on (the public sets are such prompts).
    cats_train = bundled("harmful", "train").categories
    cats_val = bundled("harmful", "val").categories

    fits = []
    base = ["harmful", "harmless", "borderline"]
    settings = ([(base, 5, False)] + [(base + ["pool"], 5, std) for std in (False, True)] if args.extra_harmful
                else [(base, k, std) for k in (5, 1, 15) for std in (False, True)])
    for parts, k, standardize in settings:
        for lam in (0.01, 0.03, 0.1, 0.3, 1.0):
            u = fit(parts, k, lam, standardize)
            num = den = 0.0
            for cat in sorted(set(cats_train)):
                a, b = closed(held["val harmful"], fit(parts, k, lam, standardize, drop=cat),
                              [c == cat for c in cats_val])
                num, den = num + a, den + b
            row = {"fit prompts": "+".join(parts), "fit positions": k, "standardized": standardize, "lambda": lam,
                   "loco": 1 - num / den}
            val = [closed(held[h], u) for h in held]
            row["val"] = 1 - sum(a for a, _ in val) / sum(b for _, b in val)
            for name, t in public.items():
                a, b = closed(t, u)
                row[name] = 1 - a / b
            for name, (x, po, pc) in {**held, **public}.items():
                lastrow = torch.arange(n_cap - 1, len(po), n_cap)
                row[f"{name} mean projection O/C/C+fit"] = [float(po[lastrow].mean()), float(pc[lastrow].mean()),
                                                            float((pc + x @ u)[lastrow].mean())]
            fits.append(row)
            print(row["fit prompts"], k, standardize, lam, f"loco {row['loco']:.3f} val {row['val']:.3f}",
                  *(f"{n} {row[n]:.3f}" for n in public), flush=True)
    heads = ["fit prompts", "fit positions", "standardized", "λ", "gap closed: val", "val, category left out"] + \
        [f"{n} (evaluation only)" for n in public] + [f"{n}: O/C/C+fit" for n in [*held, *public]]
    lines = [[r.get("fit prompts", "harmful+harmless+borderline"), str(r["fit positions"]), str(r["standardized"]), f"{r['lambda']:g}", f"{r['val']:.3f}",
              f"{r['loco']:.3f}"] + [f"{r[n]:.3f}" for n in public]
             + ["/".join(f"{v:.1f}" for v in r[f"{n} mean projection O/C/C+fit"]) for n in [*held, *public]]
             for r in fits]
    print(text_table(heads, lines))
    write_results(args.out, {"benchmark": "aird_fit_probe", "scheme": args.scheme, "source_layer": layer,
                             "evaluated_positions": n_pos, "captured_positions": n_cap,
                             "extra_harmful": args.extra_harmful, "rows": fits,
                             "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
