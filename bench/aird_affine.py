"""Probe, not yet part of AIRD: an *affine* re-alignment of the compressed model to the original's
refusal projections, alone and combined with AIRD's scaling edit, on the default model.

Pruning can shift harmless prompts along r̂ (organism v2 + wanda:0.5: they moved 52% of the gap toward
refusal), which a scaling edit W′ = W + α r̂ r̂ᵀ W cannot undo. Here a rank-1 edit of one MLP output
projection, W′ = W + r̂ uᵀ, gets u by ridge regression on the bundled *train* prompts so that C's
projection on r̂ at O's source layer l* matches O's, prompt by prompt, at the post-instruction
positions (u acts on the writer's input, so it can add an offset, not only a gain). The scaling
settings compared are fixed below (chosen on val in a first exploration); the test-split evaluation of
the last row is the only one on test prompts.

    python bench/aird_affine.py [--runs runs] [--ridge 0.1] [--positions 5]

Prints a table and writes ``bench/results/aird_affine.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.activations import tokenize  # noqa: E402
from core.aird import CalibrationSets, refusal_rate, unit  # noqa: E402
from core.cli import text_table  # noqa: E402
from core.evaluation import perplexity  # noqa: E402
from core.interventions import scale_writers  # noqa: E402
from core.prompts import bundled, bundled_text  # noqa: E402
from core.study import Study, StudySpec  # noqa: E402

OUT = ROOT / "bench" / "results" / "aird_affine.json"
SCALINGS = [([], 0.0), ([15, 16, 17], 0.5), ([15, 16, 17], 1.0)]  # (layers, α) of the scaling edit


@torch.inference_mode()
def collect(handle, prompts, r, layer: int, n_pos: int, writer: torch.nn.Module | None = None):
    """Projection on ``r`` of the residual entering block ``layer`` ``(N*n_pos,)`` and, with ``writer``,
    its inputs ``(N*n_pos, d_in)`` (else None), at the last ``n_pos`` positions of each prompt.
    (:func:`core.activations.projections` reads one position per call and no writer inputs.)"""
    seen: dict = {}
    hook = None if writer is None else writer.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("x", a[0][0, -n_pos:].float()))
    projs, xs = [], []
    try:
        for ids in tokenize(handle, prompts):
            out = handle.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            projs.append(out.hidden_states[layer][0, -n_pos:].float() @ r)
            if hook is not None:
                xs.append(seen["x"])
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(projs), (torch.cat(xs) if xs else None)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_u |x u − y|² + lam·(tr(xᵀx)/d)·|u|² (float64); lam is relative to the mean feature power."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    d = gram.shape[0]
    return torch.linalg.solve(gram + lam * gram.trace() / d * torch.eye(d, dtype=torch.float64), x.T @ y)


@contextmanager
def rank1_added(module: torch.nn.Module, r: torch.Tensor, u: torch.Tensor):
    """``module.weight += r uᵀ`` for the duration (restored even on error)."""
    w0 = module.weight.data.clone()
    try:
        module.weight.data = w0 + torch.outer(r, u.float()).to(w0.dtype)
        yield
    finally:
        module.weight.data = w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--scheme", default="wanda:0.5")
    ap.add_argument("--ridge", type=float, default=0.1)
    ap.add_argument("--positions", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    t0 = time.perf_counter()
    study = Study(StudySpec(model="default", schemes=[args.scheme], aird="auto", name=f"bench aird affine {args.scheme}"),
                  args.runs)
    ds = study.directions("original")
    r, (_, src) = unit(ds.direction).float(), ds.selected
    o, c = study.original, study.variant(args.scheme)
    writer = c.writers(src - 1)["mlp"]
    train = [p for kind in ("harmful", "harmless", "borderline") for p in bundled(kind, "train").prompts]
    p_o, _ = collect(o, train, r, src, args.positions)
    p_c, x_c = collect(c, train, r, src, args.positions, writer)
    u = ridge(x_c, p_o - p_c, args.ridge)
    val = CalibrationSets.bundled()
    rows = []
    for fit in (False, True):
        for layers, alpha in SCALINGS:
            with rank1_added(writer, r, u) if fit else nullcontext():
                with scale_writers(c, r, layers, alpha=alpha):
                    h, _ = refusal_rate(c, val.harmful, max_new_tokens=24)
                    n, _ = refusal_rate(c, val.harmless, max_new_tokens=24)
            rows.append({"fit": fit, "layers": layers, "alpha": alpha, "val_harmful": h, "val_harmless": n})
            print(rows[-1], flush=True)
    best_layers, best_alpha = SCALINGS[-1]
    test = {}
    for which in ("original", args.scheme):  # the study's own evaluations (stored: usually no compute)
        ev = study.evaluate(which)
        test[which] = {k: v["refusal_rate"] for k, v in ev["sets"].items()} | {"perplexity": ev["perplexity"]}
    with rank1_added(writer, r, u), scale_writers(c, r, best_layers, alpha=best_alpha):
        test[f"{args.scheme} + fit + scale"] = {
            kind: refusal_rate(c, bundled(kind, "test").prompts, max_new_tokens=64)[0]
            for kind in ("harmful", "harmless", "borderline")} | {"perplexity": perplexity(c, bundled_text())}
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    print(text_table(["fit", "scaling layers", "α", "val harmful %", "val harmless+borderline %"],
                     [["yes" if x["fit"] else "no", ",".join(map(str, x["layers"])) or "—", x["alpha"],
                       pct(x["val_harmful"]), pct(x["val_harmless"])] for x in rows]))
    print(text_table(["model", "harmful test %", "harmless test %", "borderline test %", "perplexity"],
                     [[k, pct(v["harmful"]), pct(v["harmless"]), pct(v["borderline"]), f"{v['perplexity']:.2f}"]
                      for k, v in test.items()]))
    out = {"benchmark": "aird_affine", "scheme": args.scheme, "source_layer": src, "writer": f"layer {src - 1} mlp",
           "ridge": args.ridge, "positions": args.positions, "n_train": len(train), "val": rows, "test": test,
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
