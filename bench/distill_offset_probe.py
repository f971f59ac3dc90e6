"""Probe (#23): does a distill repair's over-refusal of benign prompts with alarming words move if the residual
stream leaving the source block is shifted along the original's refusal direction, by an offset chosen on val?

The distill repairs of rounds 5–7 bring refusal back on the public harmful sets but refuse the bundled
borderline test split more than the original (24.5% against 16.3%). Their val pool sits at the original's
rate, so the student's boundary is close, and a constant shift of the stream (``x ← x − β·r̂`` at the
output of block ``--layer``, every position, r̂ the original's unit candidate direction at the last
position) moves every prompt's refusal score the same way: harmful prompts sit ~14 units above benign
ones along r̂ (bench/direction_projection_probe.json), so a shift of a few units could cross the benign
boundary without crossing the harmful one. An activation addition (``refusal_lab.interventions.add``), not
a change of the repair.

Rule, fixed before any public set is evaluated: the β of the grid with the best val score of
``bench/distill.py`` (harmful val refusal − pooled benign val over-refusal, borderline pool included − broken);
within 1 point the smaller |β|. Then the chosen β (and β = 0 unless ``--skip-zero``) on the public sets.

    .venv/bin/python bench/distill_offset_probe.py [--config all-r4-s80-st4-d8-f4-ca] [--betas 0,1,2,3,4,6]
        [--layer 17] [--threads 2] [--out bench/results/distill_offset_probe.json]
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
    ap.add_argument("--config", default="all-r4-s80-st4-d8-f4-ca", help="an adapter in RUNS/distill-bench")
    ap.add_argument("--betas", default="0,1,2,3,4,6")
    ap.add_argument("--layer", type=int, default=17, help="source block: the candidate's layer and the shifted output")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--skip-zero", action="store_true", help="evaluate only the chosen β on the public sets")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill_offset_probe.json"))
    args = ap.parse_args()
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    from bench.common import write_results
    from bench.distill import PUBLIC, SCHEME, VAL, evaluate, val_score
    from refusal_lab.compression import apply as compress
    from refusal_lab.directions import generate_candidates
    from refusal_lab.distill import Distilled
    from refusal_lab.interventions import add
    from refusal_lab.models import load_model
    from refusal_lab.prompts import bundled

    o = load_model("default")
    r = generate_candidates(o, bundled("harmful", "train").prompts,
                            bundled("harmless", "train").prompts).candidate(-1, args.layer)
    unit = (r / r.norm()).float()
    c, _ = compress(o, SCHEME)
    rep = Distilled.load(Path(args.runs) / "distill-bench" / args.config)
    h = rep.apply(c)
    betas = [float(b) for b in args.betas.split(",")]
    out = {"command": " ".join(sys.argv), "scheme": SCHEME, "config": args.config, "layer": args.layer,
           "rule": __doc__.split("Rule, ")[1].split("\n\n")[0].replace("\n", " "), "val": {}, "public": {}}

    def shifted(beta: float):
        return add(h, unit, args.layer + 1, coeff=-beta)  # the input of block layer+1 = the output of block layer

    for beta in betas:
        with shifted(beta):
            ev = evaluate(h, VAL, ppl=False)
        out["val"][str(beta)] = ev
        print(f"β {beta}: val score {val_score(ev):.3f} "
              f"{ {k: round(100 * v['refused'], 1) for k, v in ev['sets'].items()} } "
              f"broken {100 * ev['broken_all']:.1f}", flush=True)
        write_results(args.out, out)
    best = max(val_score(e) for e in out["val"].values())
    close = [b for b in betas if val_score(out["val"][str(b)]) >= best - 0.01]
    out["chosen"] = min(close, key=abs)
    out["chosen_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_results(args.out, out)
    print("chosen on val: β", out["chosen"], flush=True)
    for beta in ([] if args.skip_zero or out["chosen"] == 0 else [0.0]) + [out["chosen"]]:
        with shifted(beta):
            out["public"][str(beta)] = evaluate(h, PUBLIC, ppl=True)
        write_results(args.out, out)
        ev = out["public"][str(beta)]
        print(f"β {beta} public: { {k: round(100 * v['refused'], 1) for k, v in ev['sets'].items()} } "
              f"broken {100 * ev['broken_all']:.1f} ppl {ev['perplexity']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
