"""``python -m refusal_lab judge``: judge replies produced elsewhere (JSONL or CSV with ``prompt`` and
``reply``, optional ``label``) with one or more judges; with labels or two judges, agreement, Cohen's κ and
a confusion table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusal_lab.cli import add_model_args
from refusal_lab.cli.args import judge_spec


def register(sub) -> None:
    p = sub.add_parser("judge", help="judge replies from a file; agreement with labels or another judge")
    p.add_argument("--replies", required=True, help="JSONL or CSV with columns prompt, reply (optional label)")
    p.add_argument("--judge", action="append", type=judge_spec, default=None,
                   help="substring (default) | score (needs --model) | classifier:HUB_ID_OR_FOLDER[@LABEL] | llm:MODEL; "
                        "repeat to compare judges")
    p.add_argument("--json", default=None, help="write every judged reply and the agreement figures here")
    p.add_argument("--show-disagreements", action="store_true", help="print the replies the judges disagree on")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from refusal_lab.judge_audit import agreement, read_replies
    from refusal_lab.judges import OUTCOMES, make_judge
    from refusal_lab.tables import text_table

    records = read_replies(args.replies)
    names = list(dict.fromkeys(args.judge or ["substring"]))
    scores = None
    if any(n.partition(":")[0] == "score" for n in names):
        from refusal_lab.cli import load_from_args
        from refusal_lab.judges import refusal_scores

        scores = refusal_scores(load_from_args(args), [r.prompt for r in records]).tolist()
    for name in names:
        outcomes = make_judge(name).judge([r.prompt for r in records], [r.reply for r in records], scores)
        for r, o in zip(records, outcomes):
            r.outcomes[name] = o
    kinds = OUTCOMES + (("unjudged",) if any("unjudged" in r.outcomes.values() for r in records) else ())
    rows = [[name] + [str(sum(r.outcomes[name] == o for r in records)) for o in kinds] for name in names]
    print(text_table(["judge", *kinds], rows))
    sides = ([("label", [r.label for r in records])] if all(r.label for r in records) else []) + \
        [(n, [r.outcomes[n] for r in records]) for n in names]
    pairs = [agreement(a, xa, b, xb) for i, (a, xa) in enumerate(sides) for b, xb in sides[i + 1:]]
    for ag in pairs:
        kappa = "—" if ag.kappa is None else f"{ag.kappa:.3f}"
        print(f"\n{ag.a} vs {ag.b}: agreement {100 * ag.agreement:.1f}% of {ag.n}, Cohen's κ {kappa}")
        print(text_table([f"{ag.a} \\ {ag.b}", *ag.confusion],
                         [[x, *(str(n) for n in row.values())] for x, row in ag.confusion.items()]))
    if args.show_disagreements:
        for r in records:
            said = {**({"label": r.label} if r.label else {}), **r.outcomes}
            if len(set(said.values())) > 1:
                print(f"\n{', '.join(f'{k}: {v}' for k, v in said.items())}\n  prompt: {r.prompt[:200]!r}\n"
                      f"  reply:  {r.reply[:300]!r}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"judges": names, "replies": [r.to_json() for r in records],
                                               "agreement": [a.to_json() for a in pairs]}, indent=1))
    return 0
