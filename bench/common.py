"""Pieces the benchmark scripts share: the machine record and results writing, and the captures the
re-alignment probes fit on."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def write_results(path: str | Path, payload: dict) -> None:
    """Write ``payload`` plus the machine and the date as JSON to ``path`` (folders created) and say so."""
    out = {**payload, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                  "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


class RealignCaptures:
    """The default model O, its compressed variant C (``scheme``) and O's selected refusal direction, from
    a run store, and what AIRD's re-alignment regresses on: C's inputs of the MLP output projection in
    block l*−1 and the projections of O and C on r̂ entering the source layer l*."""

    def __init__(self, scheme: str, runs: str | Path, name: str) -> None:
        from refusal_lab.study import Study, StudySpec

        self.study = study = Study(StudySpec(model="default", schemes=[scheme], aird="auto", name=name), runs)
        self.direction = study.directions("original")
        self.layer = self.direction.selected[1]
        self.original, self.compressed = study.original, study.variant(scheme)

    def capture(self, prompts: list[str], n_positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_C (N·n_positions, d_ff), p_O (N·n_positions,), p_C (N·n_positions,))`` at the last
        ``n_positions`` of every prompt, rows in prompt order."""
        from refusal_lab.activations import writer_inputs
        from refusal_lab.aird import REALIGN_ROLE

        r, layer = self.direction.direction, self.layer
        _, p_o = writer_inputs(self.original, prompts, self.original.writers(layer - 1)[REALIGN_ROLE], r, layer,
                               n_positions=n_positions)
        x_c, p_c = writer_inputs(self.compressed, prompts, self.compressed.writers(layer - 1)[REALIGN_ROLE], r, layer,
                                 n_positions=n_positions)
        return x_c, p_o, p_c
