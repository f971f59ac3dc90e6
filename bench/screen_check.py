"""Does the screened direction search choose what the exact search chose? Original and compressed models.

For the default model and its variants (default: wanda:0.5 and bnb-nf4, the study acceptance
schemes), candidates on the bundled train splits and selection on the val splits at every
post-instruction position with ``screen=K`` (:func:`core.directions.select_direction`), compared
with the exact selections stored by the study acceptance run (``bench/results/study_results.json``:
same prompts, same rule, computed by the exact search): selected (position, layer), bypass, induce,
KL of the selected candidate, and the search's seconds.

    python bench/screen_check.py [--screen 12] [--schemes wanda:0.5,bnb-nf4] [--runs /tmp/screen-check-runs]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "screen_check.json"
REFERENCE = ROOT / "bench" / "results" / "study_results.json"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12) if not (math.isnan(a) and math.isnan(b)) else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--screen", type=int, default=12)
    ap.add_argument("--schemes", default="wanda:0.5,bnb-nf4")
    ap.add_argument("--runs", default="/tmp/screen-check-runs", help="run store for the compressed variants")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from core.directions import generate_candidates, quality
    try:
        from core.selection import select_direction
    except ImportError:  # the start commit's layout (the old side of bench/speed.py)
        from core.directions import select_direction
    from core.prompts import bundled
    from core.study import Study, StudySpec

    ref = json.loads(REFERENCE.read_text())
    schemes = [s for s in args.schemes.split(",") if s]
    study = Study(StudySpec(model="default", schemes=schemes, name="screen-check"), args.runs)
    rows = []
    for which in ["original", *schemes]:
        h = study.model_for(which)
        want = ref["original"]["source"] if which == "original" else ref["variants"][which]["drift"]["variant"]
        t0 = time.perf_counter()
        ds = generate_candidates(h, bundled("harmful", "train").prompts, bundled("harmless", "train").prompts)
        t1 = time.perf_counter()
        ds = select_direction(h, ds, bundled("harmful", "val").prompts, bundled("harmless", "val").prompts,
                              screen=args.screen)
        t2 = time.perf_counter()
        q, sel = quality(ds), ds.metadata["selection"]
        w_src, w_q = want["source"], want["quality"]
        row = {"model": which, "selected": list(ds.selected), "reference": [w_src["position"], w_src["layer"]],
               "same": list(ds.selected) == [w_src["position"], w_src["layer"]], "fallback": q["fallback"],
               "reference_fallback": w_q["fallback"], "searched": sel["screen"]["searched"],
               "candidates": sel["n_candidates"], "candidates_seconds": t1 - t0, "selection_seconds": t2 - t1,
               **{k: q[k] for k in ("bypass", "induce", "kl")},
               **{f"{k}_relative_difference": _rel(q[k], w_q[k]) for k in ("bypass", "induce", "kl")}}
        rows.append(row)
        print(f"{which:10s} selected {tuple(ds.selected)} reference {tuple(row['reference'])} same {row['same']}  "
              f"searched {row['searched']}/{row['candidates']}  selection {row['selection_seconds']:.0f} s  "
              f"bypass/induce/KL rel. diff {row['bypass_relative_difference']:.1e} / "
              f"{row['induce_relative_difference']:.1e} / {row['kl_relative_difference']:.1e}", flush=True)
    from bench.common import write_results

    write_results(args.out, {"command": f"python bench/screen_check.py --screen {args.screen} --schemes {args.schemes}",
                             "screen": args.screen, "rows": rows})


if __name__ == "__main__":
    main()
