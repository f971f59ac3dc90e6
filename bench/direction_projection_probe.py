"""Probe: where wanda:0.5 moves the post-instruction residual stream on the original's refusal direction.

For the first 24 bundled train prompts of each kind, the residual stream leaving block 17 (hidden state 18)
at the post-instruction positions, of the original (O) and of wanda:0.5 (C): the mean projection on the
original's candidate direction at the last position, and the distill loss's state and direction distances
between C and O there (what the fifth distill round's direction term starts from, #23).

    .venv/bin/python bench/direction_projection_probe.py [--out bench/results/direction_projection_probe.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LAYER, N_PROMPTS = 17, 24


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "direction_projection_probe.json"))
    args = ap.parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from bench.common import write_results
    from refusal_lab.activations import post_instruction_length
    from refusal_lab.compression import apply as compress
    from refusal_lab.directions import generate_candidates
    from refusal_lab.distill_data import direction_distance, state_distance
    from refusal_lab.models import load_model
    from refusal_lab.precision import compute
    from refusal_lab.prompts import bundled

    o = load_model("default")
    r = generate_candidates(o, bundled("harmful", "train").prompts,
                            bundled("harmless", "train").prompts).candidate(-1, LAYER)
    c, _ = compress(o, "wanda:0.5")
    n = post_instruction_length(o)

    @torch.no_grad()
    def states(h, prompts: list[str]) -> torch.Tensor:
        """``(prompts, n, d_model)``: block LAYER's output at the last n positions, one prompt at a time."""
        out = []
        for p in prompts:
            text = h.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True)
            ids = h.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            with h.lock, compute(h):
                hidden = h.model(**ids, output_hidden_states=True).hidden_states[LAYER + 1]
            out.append(hidden[0, -n:].float())
        return torch.stack(out)

    unit = r / r.norm()
    rows = {}
    for kind in ("harmful", "harmless", "borderline"):
        prompts = bundled(kind, "train").prompts[:N_PROMPTS]
        so, sc = states(o, prompts), states(c, prompts)
        rows[kind] = {"projection_original": float((so @ unit)[:, -1].mean()),
                      "projection_compressed": float((sc @ unit)[:, -1].mean()),
                      "state_distance": float(state_distance(sc, so)),
                      "direction_distance": float(direction_distance(sc, so, r))}
        print(kind, {k: round(v, 3) for k, v in rows[kind].items()}, flush=True)
    write_results(args.out, {"command": " ".join(sys.argv), "layer": LAYER, "n_prompts": N_PROMPTS,
                             "precision": o.precision, "kinds": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
