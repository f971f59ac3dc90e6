"""Probe: AIRD auto on wanda:0.5 under the default (bf16) precision, but with the re-alignment fitted in
float32 — which point the calibration then chooses, and the repaired model's bundled test-split rates with
bf16 and with float32 replies. Separates the two causes of point 2's bf16 test-rate difference (#20).

    .venv/bin/python bench/aird_fit_precision_probe.py [--out bench/results/aird_fit_precision_probe.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "aird_fit_precision_probe.json"))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from bench.common import write_results
    from refusal_lab.aird import applied, bundled_fit_prompts, calibrate, fit_realignment, mode_for
    from refusal_lab.compression import apply as compress
    from refusal_lab.directions import generate_candidates
    from refusal_lab.generation import generate
    from refusal_lab.judges import is_refusal
    from refusal_lab.models import load_model
    from refusal_lab.precision import running_at
    from refusal_lab.prompts import bundled

    h = load_model("default")
    ds = generate_candidates(h, bundled("harmful", "train").prompts, bundled("harmless", "train").prompts)
    direction, layer = ds.candidate(-1, 17), 17  # the original's selected candidate (bench/speed.py)
    c, _ = compress(h, "wanda:0.5")
    t0 = time.perf_counter()
    with running_at(h, "float32"), running_at(c, "float32"):
        fit = fit_realignment(h, c, direction, layer, bundled_fit_prompts())
    t1 = time.perf_counter()
    rep = calibrate(c, direction, layer, mode=mode_for(c, range(c.n_layers), "merged"), realignment=fit, original=h)
    t2 = time.perf_counter()
    best = next(g for g in rep.calibration if g.chosen)
    out = {"precision": h.precision, "fit_seconds": round(t1 - t0, 1), "calibration_seconds": round(t2 - t1, 1),
           "chosen": {"layers": best.layers, "alpha": best.alpha, "realign": best.realign},
           "val_objective": best.harmful_refusal - best.harmless_refusal,
           "confirmed": [{"layers": g.layers, "alpha": g.alpha, "realign": g.realign,
                          "val_objective": g.harmful_refusal - g.harmless_refusal}
                         for g in rep.calibration if g.measured == "generated"]}
    for precision in ("bfloat16", "float32"):
        rates = {}
        with applied(c, rep) as repaired, running_at(repaired, precision):
            for kind in ("harmful", "harmless", "borderline"):
                replies = generate(repaired, bundled(kind, "test").prompts, max_new_tokens=64)
                rates[kind] = sum(map(is_refusal, replies)) / len(replies)
        out[f"test_refusal_{precision}"] = rates
    print(out)
    write_results(args.out, {"command": " ".join(sys.argv), **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
