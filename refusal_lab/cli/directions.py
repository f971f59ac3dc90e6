"""``python -m refusal_lab directions``: difference-in-means candidates + selection, saved to a folder."""

from __future__ import annotations

import argparse
import math
import time

from refusal_lab.cli.args import count, number
from refusal_lab.cli import add_model_args, load_from_args


def register(sub) -> None:
    p = sub.add_parser("directions", help="extract and select the refusal direction of a model",
                       description="Candidates r[pos, layer] = mean(harmful) - mean(harmless) at the post-instruction "
                                   "positions, scored by bypass/induce/KL on validation prompts (Arditi et al. 2024). "
                                   "Selection costs one forward over the harmful val prompts per candidate "
                                   "(positions x layers below --max-layer-frac): restrict --positions to go faster.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="folder to write directions.safetensors + directions.json to")
    p.add_argument("--harmful", default=None, help="harmful prompts for candidates: FILE | bundled:KIND:SPLIT "
                   "(default bundled harmful train split)")
    p.add_argument("--harmless", default=None, help="harmless prompts for candidates (default bundled harmless train)")
    p.add_argument("--column", default=None, help="the text column of CSV/JSON prompt files (default: detected)")
    p.add_argument("--harmful-val", default=None, help="harmful prompts for selection (default bundled harmful val)")
    p.add_argument("--harmless-val", default=None, help="harmless prompts for selection (default bundled harmless val)")
    p.add_argument("--n-train", type=count(1), default=128, help="use the first N prompts of each candidate set (128)")
    p.add_argument("--n-val", type=count(1), default=32, help="use the first N prompts of each selection set (32)")
    p.add_argument("--positions", nargs="+", default=["all"],
                   help="post-instruction positions to evaluate, as negative offsets (e.g. -1 -2), or 'all'")
    p.add_argument("--max-layer-frac", type=number(0.0, 1.0, open_low=True), default=0.8, help="only layers < frac * n_layers (0.8)")
    p.add_argument("--kl-threshold", type=number(0.0), default=0.1, help="keep candidates with KL below this (0.1)")
    p.add_argument("--kl-relaxation", type=number(0.0), nargs="*", default=[0.25, 0.5, 1.0],
                   help="KL thresholds tried in turn when no candidate passes --kl-threshold, before the "
                        "lowest-bypass fallback (default 0.25 0.5 1.0; give none for the strict anchor)")
    p.add_argument("--induce-threshold", type=number(), default=0.0,
                   help="keep candidates whose induce score exceeds this (0.0)")
    p.add_argument("--no-filter", action="store_true",
                   help="do not drop harmful prompts the model does not refuse / harmless ones it refuses")
    p.add_argument("--exhaustive", action="store_true",
                   help="score KL and induce for every candidate (full grid; slower, same selection)")
    p.add_argument("--screen", type=count(0), default=None, metavar="K",
                   help="approximate: screen induce (and, at the fallback, bypass) on K val prompts and search "
                        "exactly only the candidates that may pass (see BENCHMARKS.md for its agreement)")
    p.add_argument("--skip-selection", action="store_true", help="only extract the candidates")
    p.add_argument("--batch-size", type=count(1), default=None, help="prompts per forward (default: memory budget)")
    p.add_argument("--top", type=count(1), default=8, help="rows in the printed table (8)")
    p.set_defaults(func=run)


def _positions(values: list[str]) -> list[int] | None:
    if [v.lower() for v in values] == ["all"]:
        return None
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--positions takes negative offsets like -1 -2, or 'all' (got {values})") from None
    if any(p >= 0 for p in out):
        raise ValueError("--positions are negative offsets from the end of the prompt (-1 = last token)")
    return out


def _fmt(x: float) -> str:
    return "    —" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def run(args: argparse.Namespace) -> int:
    from refusal_lab.directions import generate_candidates, quality, source
    from refusal_lab.selection import select_direction
    from refusal_lab.progress import tqdm_progress
    from refusal_lab.prompts import resolve_prompt_arg

    positions = _positions(args.positions)
    col = args.column
    harmful = resolve_prompt_arg(args.harmful, "harmful", "train", column=col).head(args.n_train)
    harmless = resolve_prompt_arg(args.harmless, "harmless", "train", column=col).head(args.n_train)
    harmful_val = resolve_prompt_arg(args.harmful_val, "harmful", "val", column=col).head(args.n_val)
    harmless_val = resolve_prompt_arg(args.harmless_val, "harmless", "val", column=col).head(args.n_val)
    handle = load_from_args(args)
    filt = not args.no_filter

    t0 = time.perf_counter()
    ds = generate_candidates(handle, harmful, harmless, filter_refusals=filt, batch_size=args.batch_size,
                             progress=tqdm_progress("mean activations"))
    t_cand = time.perf_counter() - t0
    if positions is not None:
        for p in positions:
            ds.pos_index(p)  # fail before the long part
    if not args.skip_selection:
        t1 = time.perf_counter()
        ds = select_direction(handle, ds, harmful_val, harmless_val, max_layer_frac=args.max_layer_frac,
                              kl_threshold=args.kl_threshold, induce_threshold=args.induce_threshold,
                              kl_relaxation=args.kl_relaxation,
                              positions=positions, filter_refusals=filt, exhaustive=args.exhaustive,
                              screen=args.screen, batch_size=args.batch_size, progress=tqdm_progress("selecting"))
        t_sel = time.perf_counter() - t1
    folder = ds.save(args.out)

    meta = ds.metadata
    print(f"model: {handle.name} ({handle.fingerprint})")
    print(f"candidates: {ds.n_positions} positions x {ds.n_layers} layers, d_model {ds.d_model}; "
          f"{meta['n_harmful']} harmful / {meta['n_harmless']} harmless prompts; {t_cand:.1f} s")
    if ds.selected is not None:
        sel = meta["selection"]
        src, q = source(ds), quality(ds)
        print(f"selection: {sel['n_candidates']} candidates, {sel['n_checked']} checked against the filters; "
              f"{t_sel:.1f} s")
        print(f"baseline refusal score: harmful {_fmt(sel['baseline_harmful_score'])}, "
              f"harmless {_fmt(sel['baseline_harmless_score'])}")
        print(f"selected: position {src['position']} ({src['token']!r}), layer {src['layer']} — "
              f"bypass {_fmt(q['bypass'])}, induce {_fmt(q['induce'])}, KL {_fmt(q['kl'])}, "
              f"norm {q['norm']:.3f}{'  [FALLBACK]' if q['fallback'] else ''}")
        # candidates with a bypass score first (lowest first), then the rest by induce (highest first)
        rows = [(float(ds.bypass[i, layer]), p, layer) for i, p in enumerate(ds.positions)
                for layer in range(ds.n_layers)
                if not (math.isnan(float(ds.bypass[i, layer])) and math.isnan(float(ds.induce[i, layer])))]
        rows.sort(key=lambda r: (math.isnan(r[0]), r[0] if not math.isnan(r[0]) else
                                 -float(ds.induce[ds.pos_index(r[1]), r[2]]) if not math.isnan(
                                     float(ds.induce[ds.pos_index(r[1]), r[2]])) else math.inf))
        print(f"\n{'pos':>4} {'layer':>5} {'bypass':>8} {'induce':>8} {'KL':>8}")
        for b, p, layer in rows[:args.top]:
            i = ds.pos_index(p)
            mark = " <" if (p, layer) == ds.selected else ""
            print(f"{p:>4} {layer:>5} {_fmt(b):>8} {_fmt(float(ds.induce[i, layer])):>8} "
                  f"{_fmt(float(ds.kl[i, layer])):>8}{mark}")
    for w in ds.warnings:
        print(f"warning: {w}")
    print(f"saved to {folder}")
    return 0
