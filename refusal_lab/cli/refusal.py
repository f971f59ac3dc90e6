"""``python -m refusal_lab refusal``: refusal rate and mean refusal score of a model on a prompt set,
optionally with a direction ablated / added / orthogonalized, or on a compressed variant."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from refusal_lab.cli.args import count, judge_spec, number
from refusal_lab.cli import add_model_args, load_from_args


def register(sub) -> None:
    p = sub.add_parser("refusal", help="refusal rate (substring judge) and refusal score on a prompt set")
    add_model_args(p)
    p.add_argument("--prompts", default=None,
                   help="FILE (.txt/.csv/.json/.jsonl) | bundled:KIND[:SPLIT] (default bundled:harmful:test)")
    p.add_argument("--judge", default="substring", type=judge_spec,
                   help="how replies are judged: substring (default) | score | classifier:HUB_ID_OR_FOLDER[@LABEL] | llm:MODEL")
    p.add_argument("--column", default=None, help="the text column of a CSV/JSON prompt file (default: detected)")
    p.add_argument("--limit", type=count(1), default=None, help="only the first N prompts")
    p.add_argument("--max-new-tokens", type=count(1), default=64)
    p.add_argument("--batch-size", type=count(1), default=None, help="prompts decoded together (default: as many as 1 GiB of KV cache holds, ≤ 128)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ablate", metavar="DIR", default=None, help="ablate the selected direction of DIR at every layer")
    g.add_argument("--add", metavar="DIR", default=None, help="add the selected direction of DIR (see --coeff, --layer)")
    g.add_argument("--orthogonalize", metavar="DIR", default=None,
                   help="orthogonalize the weights against the selected direction of DIR")
    p.add_argument("--coeff", type=number(), default=1.0, help="coefficient for --add (1.0)")
    p.add_argument("--layer", type=count(0), default=None, help="layer for --add (default: the direction's own layer)")
    # Hook for compressed variants (refusal_lab.compression): parse_scheme(spec) + apply(handle, scheme).
    p.add_argument("--scheme", default=None, help="evaluate a compressed variant, e.g. rtn:4 or wanda:0.5")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON to this file")
    p.add_argument("--show", type=count(0), default=3, help="print this many example replies (3)")
    p.set_defaults(func=run)


def _compress(handle, spec: str):
    """``--scheme``: compress with :mod:`refusal_lab.compression` if it is installed in this checkout."""
    try:
        from refusal_lab.compression import apply, parse_scheme
    except ImportError as e:
        raise ValueError(f"--scheme needs the compression package (refusal_lab.compression), which is not "
                         f"available here: {e}") from e
    scheme = parse_scheme(spec)
    print(f"compressing with {scheme} …", file=sys.stderr)
    return apply(handle, scheme)


def run(args: argparse.Namespace) -> int:
    from refusal_lab.directions import DirectionSet
    from refusal_lab.evaluation import refusal_evaluation
    from refusal_lab.interventions import INTERVENTIONS, intervene
    from refusal_lab.progress import tqdm_progress
    from refusal_lab.prompts import resolve_prompt_arg

    if args.add is None and (args.layer is not None or args.coeff != 1.0):
        raise ValueError("--coeff and --layer only apply with --add DIR")
    prompts = resolve_prompt_arg(args.prompts, "harmful", "test", column=args.column).head(args.limit)
    dir_path = args.ablate or args.add or args.orthogonalize
    ds = DirectionSet.load(dir_path) if dir_path else None
    if ds is not None and ds.selected is None:
        raise ValueError(f"{dir_path} has candidates but no selected direction (run `directions` without "
                         "--skip-selection)")
    handle = load_from_args(args)
    parent_fp = handle.fingerprint
    if args.scheme:
        handle, _ = _compress(handle, args.scheme)
    if ds is not None:
        if ds.d_model != handle.d_model:
            raise ValueError(f"{dir_path} has d_model {ds.d_model}, the model has {handle.d_model}")
        if ds.metadata.get("model_fingerprint") not in (parent_fp, handle.fingerprint):
            print(f"note: {dir_path} was extracted from another model "
                  f"({ds.metadata.get('model', '?')}, {ds.metadata.get('model_fingerprint', '?')})", file=sys.stderr)

    kind = next((k for k in ("ablate", "add", "orthogonalize") if getattr(args, k)), "none")
    layer = None
    intervention = "none" if ds is None else f"{kind} {dir_path}"
    if INTERVENTIONS[kind].uses_layer:
        layer = ds.selected[1] if args.layer is None else args.layer
        intervention += f" coeff {args.coeff} layer {layer}"
    ctx = intervene(kind, handle, None if ds is None else ds.direction, layer=layer, coeff=args.coeff)

    t0 = time.perf_counter()
    with ctx:
        ev = refusal_evaluation(handle, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                judge=args.judge, progress=tqdm_progress("generating"))
    seconds = time.perf_counter() - t0
    refused = [r.refused for r in ev.results]
    rate, mean_score = ev.refusal_rate, ev.mean_refusal_score

    print(f"model: {handle.name}")
    print(f"prompts: {prompts.name} ({len(prompts)})   intervention: {intervention}")
    print(f"refusal_rate: {rate:.3f} ({sum(refused)}/{len(refused)}, judge {ev.judge})")
    print(f"compliance_rate: {ev.compliance_rate:.3f}   broken_rate: {ev.broken_rate:.3f} (empty, looping or no "
          "language: neither refusal nor compliance)")
    print(f"mean_refusal_score: {mean_score:+.3f}")
    print(f"seconds: {seconds:.1f}")
    for r in ev.results[:args.show]:
        print(f"\n[{'REFUSED' if r.refused else 'answered'}] {r.prompt}\n  → {r.response[:200]!r}")
    if args.json_out:
        out = {**ev.to_json(), "model": handle.name, "model_fingerprint": handle.fingerprint, "scheme": args.scheme,
               "intervention": intervention, "prompts": prompts.name, "prompts_sha": prompts.sha,
               "max_new_tokens": args.max_new_tokens}
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
        print(f"\nwrote {path}")
    return 0
