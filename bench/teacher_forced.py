"""Zero-shot check: each prompt once with its cache shared by the four options, against every prompt +
option sequence whole (the exact path it replaced), on the default model and a compressed variant.

    .venv/bin/python bench/zero_shot.py [--model default] [--scheme wanda:0.5] [--repeats 2]

Prints, per model, seconds of both paths (median of ``--repeats``, alternating), their ratio, the largest
difference of an option's summed log-likelihood, and how many of the 210 answers agree; writes
``bench/results/zero_shot.json``.
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
    """The replaced path: one forward per batch of 16 whole prompt + option rows."""
    from refusal_lab.zero_shot import _one_row_each

    tok = handle.tokenizer
    rows = [(tok(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"],
             tok(f" {o}", add_special_tokens=False)["input_ids"]) for it in items for o in it.options]
    return torch.cat([_one_row_each(handle, rows[s:s + 16], 4) for s in range(0, len(rows), 16)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--scheme", default="wanda:0.5")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "zero_shot.json"))
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
    write_results(args.out, {"command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(), "rows": rows})
    heads = list(rows[0])
    print(text_table(heads, [[f"{r[h]:.4g}" if isinstance(r[h], float) else r[h] for h in heads] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
