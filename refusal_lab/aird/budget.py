"""Refusal against repair size: the budget curve (k layers ending at the source layer), measured by
greedy replies and the substring judge."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from refusal_lab.aird.repair import Repair, applied, densified_weights
from refusal_lab.generation import generate
from refusal_lab.judges import has_refusal_phrase, is_refusal
from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress, report
from refusal_lab.results import BudgetPoint


def refusal_rate(handle: ModelHandle, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int | None = None,
                 settle: bool = False, progress: Progress | None = None) -> tuple[float, list[str]]:
    """Fraction of ``prompts`` whose greedy reply the substring judge calls a refusal, and the replies.
    ``settle``: a reply ends once it holds a refusal phrase (its verdict is then settled; the rate is
    the same, the reply a prefix)."""
    if not prompts:
        return math.nan, []
    replies = generate(handle, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop_when=has_refusal_phrase if settle else None, progress=progress)
    return sum(map(is_refusal, replies)) / len(replies), replies


def budget_curve(compressed: ModelHandle, repair: Repair, prompts: Sequence[str], *, max_layers: int = 8,
                 gen_tokens: int = 24, progress: Progress | None = None) -> list[BudgetPoint]:
    """Refusal on ``prompts`` when repairing the k layers ending at the source layer, k = 1…``max_layers``
    (adapter form, same α and re-alignment), with the weights a merged repair would densify (the
    re-aligned writer included, whether or not its block is among the k)."""
    src = repair.source_layer if repair.source_layer is not None else max(repair.layers)
    rows = []
    for k in range(1, max_layers + 1):
        layers = [x for x in range(src - k + 1, src + 1) if x >= 0]
        trial = replace(repair, layers=layers, mode="adapter")
        with applied(compressed, trial):
            rate, _ = refusal_rate(compressed, prompts, max_new_tokens=gen_tokens, settle=True)
        rows.append(BudgetPoint(n_layers=len(layers), layers=layers, refusal=rate,
                                densified_weights=densified_weights(compressed, trial)))
        report(progress, k, max_layers)
    return rows
