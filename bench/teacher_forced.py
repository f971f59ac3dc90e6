"""Teacher-forced scoring, new paths against the ones they replaced, on the same inputs:

* the zero-shot check: each prompt once with its cache shared by the four options, against every prompt +
  option sequence whole, right-padded (on the default model and a compressed variant): seconds, the
  largest difference of an option's summed log-likelihood, how many of the 210 answers agree;
* the multi-token KL (:func:`refusal_lab.evaluation.multi_token_kl`, the variant against the original along
  the original's replies to ``--limit`` bundled harmless test prompts): left-padded rows, the chat
  template's prefix run once, only the reply positions unembedded, 16 rows a batch sorted by length —
  against right-padded rows unembedded everywhere, 8 a batch in prompt order: seconds and the two KLs.

    .venv/bin/python bench/teacher_forced.py [--model default] [--scheme wanda:0.5] [--repeats 2]

Prints a table per measurement (median seconds of ``--repeats``, the paths alternating); writes
``bench/results/teacher_forced.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import write_results  # noqa: E402


def whole_rows(handle, items):
    """The replaced path: one forward per batch of 16 whole prompt + option rows, right-padded."""
    from refusal_lab.zero_shot import _summed

    tok = handle.tokenizer
    rows = [(tok(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"],
             tok(f" {o}", add_special_tokens=False)["input_ids"]) for it in items for o in it.options]
    sums = [float(_summed(lg, o)) for s in range(0, len(rows), 16)
            for lg, (_, o) in zip(right_padded_logits(handle, rows[s:s + 16]), rows[s:s + 16])]
    return torch.tensor(sums, dtype=torch.float64).view(len(items), 4)


def right_padded_logits(handle, pairs):
    """The replaced :func:`refusal_lab.activations.continuation_logits`: right-padded, every position unembedded."""
    from refusal_lab.precision import compute

    seqs = [list(c) + list(o) for c, o in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), handle.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    with torch.inference_mode(), handle.lock, compute(handle):
        logits = handle.model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device),
                              use_cache=False).logits.float().cpu()
    return [logits[row, len(c) - 1:len(c) - 1 + len(o)] for row, (c, o) in enumerate(pairs)]


def old_multi_token_kl(reference, handle, prompts, replies, tokens=16, batch_size=8):
    """The replaced multi-token KL: prompt order, 8 rows a batch, :func:`right_padded_logits`."""
    from refusal_lab.evaluation import kl_per_prompt

    tok = handle.tokenizer
    rows = [(tok(handle.format(p), add_special_tokens=False)["input_ids"],
             tok(r, add_special_tokens=False)["input_ids"][:tokens]) for p, r in zip(prompts, replies)]
    rows = [r for r in rows if r[1]]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        for ref, own in zip(right_padded_logits(reference, batch), right_padded_logits(handle, batch)):
            total, count = total + float(kl_per_prompt(ref, own).sum()), count + len(ref)
    return total / count


def kl_rows(original, variant, limit: int, repeats: int) -> list[dict]:
    from refusal_lab.evaluation import multi_token_kl
    from refusal_lab.generation import generate
    from refusal_lab.prompts import bundled

    prompts = bundled("harmless", "test").prompts[:limit]
    replies = generate(original, prompts, max_new_tokens=16)
    times: dict[str, list[float]] = {"old": [], "new": []}
    values = {}
    for _ in range(repeats):
        for path, fn in (("old", old_multi_token_kl), ("new", multi_token_kl)):
            t = time.perf_counter()
            values[path] = fn(original, variant, prompts, replies)
            times[path].append(time.perf_counter() - t)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    return [{"prompts": len(prompts), "old_s": old, "new_s": new, "speedup": old / new, "kl_old": values["old"],
             "kl_new": values["new"], "relative_difference": abs(values["new"] - values["old"]) / values["old"]}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--scheme", default="wanda:0.5")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--limit", type=int, default=100, help="harmless test prompts of the multi-token KL")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher_forced.json"))
    args = ap.parse_args()
    from refusal_lab.compression import apply
    from refusal_lab.models import load_model
    from refusal_lab.tables import text_table
    from refusal_lab.zero_shot import bundled_items, option_logprobs

    items = bundled_items()
    answers = torch.tensor([it.answer for it in items])
    original = load_model(args.model)
    models = {args.model: original, args.scheme: apply(original, args.scheme)[0]}
    rows = []
    for name, h in models.items():
        times = {"shared": [], "whole": []}
        for _ in range(args.repeats):
            for path, fn in (("whole", lambda: whole_rows(h, items)), ("shared", lambda: option_logprobs(h, items))):
                t = time.perf_counter()
                scores = fn()
                times[path].append(time.perf_counter() - t)
                if path == "whole":
                    exact = scores
                else:
                    fast = scores
        agree = int((fast.argmax(-1) == exact.argmax(-1)).sum())
        rows.append({"model": name, "precision": h.precision, "whole_s": statistics.median(times["whole"]),
                     "shared_s": statistics.median(times["shared"]),
                     "speedup": statistics.median(times["whole"]) / statistics.median(times["shared"]),
                     "max_abs_diff": float((fast - exact).abs().max()), "answers_agree": agree, "items": len(items),
                     "accuracy_whole": float((exact.argmax(-1) == answers).double().mean()),
                     "accuracy_shared": float((fast.argmax(-1) == answers).double().mean())})
    kl = kl_rows(original, models[args.scheme], args.limit, args.repeats)
    write_results(args.out, {"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
                             "zero_shot": rows, "multi_token_kl": kl})
    for table in (rows, kl):
        heads = list(table[0])
        print(text_table(heads, [[f"{r[h]:.4g}" if isinstance(r[h], float) else r[h] for h in heads] for r in table]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
