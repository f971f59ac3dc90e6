"""``python -m refusal_lab organism train|evaluate``: the refusal-tuned default model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from refusal_lab.cli.args import count, judge_spec, number
from refusal_lab.cli import add_model_args, load_from_args


def register(sub) -> None:
    p = sub.add_parser("organism", help="train or evaluate the refusal adapter of the default model")
    osub = p.add_subparsers(dest="organism_command", required=True)
    t = osub.add_parser("train", help="train the LoRA refusal adapter on the bundled train splits")
    t.add_argument("--out", default=None, help="adapter folder (default: refusal_lab/assets/organism)")
    t.add_argument("--steps", type=count(1), default=None, help="optimizer steps (default 100)")
    t.add_argument("--seed", type=count(0), default=None)
    t.add_argument("--lr", type=number(0.0, open_low=True), default=None)
    t.add_argument("--rank", type=count(1), default=None)
    t.add_argument("--soft-distillation", action=argparse.BooleanOptionalAction, default=None,
                   help="match the base model's full distribution on helpful answers (KL) instead of its "
                   "greedy tokens (default: on)")
    t.add_argument("--plain-anchor", action=argparse.BooleanOptionalAction, default=None,
                   help="also match the base model (KL) on its own answers as plain text "
                   "(keeps perplexity; default: on)")
    t.add_argument("--answer-batch-size", type=count(1), default=None,
                   help="prompts per batch when generating the base model's answers (default 64)")
    t.add_argument("--helpful-repeat", type=count(0), default=None,
                   help="times each harmless/borderline example appears per epoch (default 1)")
    t.add_argument("--tasks", action=argparse.BooleanOptionalAction, default=None,
                   help="also self-distil the train-only pool of short everyday tasks "
                   "(refusal_lab/assets/prompts/tasks.txt; default: on)")
    t.add_argument("--decision-tokens", type=count(1), default=None,
                   help="with --soft-distillation: also hard cross-entropy on the first N tokens of helpful "
                   "answers (default 3)")
    t.set_defaults(func=run_train)
    e = osub.add_parser("evaluate", help="refusal / over-refusal / perplexity of a model on many prompt sets")
    add_model_args(e)
    e.add_argument("--sets", nargs="+", default=["bundled:harmful:test", "bundled:harmless:test",
                                                 "bundled:borderline:test"],
                   help="prompt sets: bundled:KIND:SPLIT or files (.json/.jsonl/.csv/.txt), NAME=SPEC to rename")
    e.add_argument("--limit", type=count(1), default=None, help="first N prompts of each set")
    e.add_argument("--max-new-tokens", type=count(1), default=64)
    e.add_argument("--batch-size", type=count(1), default=None, help="prompts decoded together (default: sized by memory, ≤ 128)")
    e.add_argument("--adapter", default=None, help="merge this peft adapter folder into the model first "
                   "(e.g. a candidate from `organism train --out`)")
    e.add_argument("--judge", default="substring", type=judge_spec,
                   help="how replies are judged: substring (default) | score | classifier:… | llm:…")
    e.add_argument("--json", default=None, help="write the results here")
    e.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from refusal_lab.models import ADAPTER_DIR
    from refusal_lab.organism import OrganismConfig, train
    from refusal_lab.progress import tqdm_progress

    cfg = OrganismConfig()
    overrides = {k: getattr(args, k) for k in ("steps", "seed", "lr", "rank", "helpful_repeat", "decision_tokens",
                                                 "answer_batch_size", "soft_distillation", "plain_anchor", "tasks")
                 if getattr(args, k) is not None}
    cfg = replace(cfg, **overrides)
    out = Path(args.out) if args.out else ADAPTER_DIR
    result = train(cfg, out_dir=out, progress=tqdm_progress("organism"))
    print(f"trained {result.steps} steps in {result.seconds:.0f}s; final loss {result.losses[-1]:.4f}; "
          f"examples {result.n_examples}; adapter in {out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from refusal_lab.evaluation import refusal_evaluation
    from refusal_lab.progress import tqdm_progress
    from refusal_lab.prompts import bundled_text, resolve_prompt_arg

    handle = load_from_args(args)
    if args.adapter:
        from refusal_lab.organism import merge_adapter

        handle = merge_adapter(handle, Path(args.adapter))
    results: dict = {"model": handle.name, "spec": handle.spec, "fingerprint": handle.fingerprint,
                     "max_new_tokens": args.max_new_tokens, "sets": {}}
    for item in args.sets:
        name, _, spec = item.rpartition("=") if "=" in item else (None, "", item)
        prompts = resolve_prompt_arg(spec, "harmful").head(args.limit)
        name = name or prompts.name
        t0 = time.perf_counter()
        ev = refusal_evaluation(handle, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                judge=args.judge, progress=tqdm_progress(name))
        results["sets"][name] = {"source": spec, **ev.to_json(), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:40s} n={ev.n:4d} refusal={100 * ev.refusal_rate:5.1f}% complied={100 * ev.compliance_rate:5.1f}% "
              f"broken={100 * ev.broken_rate:5.1f}%", flush=True)
    try:
        from refusal_lab.evaluation import perplexity

        results["perplexity"] = perplexity(handle, bundled_text())
        print(f"{'perplexity (bundled text)':40s} {results['perplexity']:.3f}")
    except ImportError:
        pass
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
