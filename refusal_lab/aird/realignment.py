"""AIRD's fitted re-alignment: u of the rank-1 edit W′ = W_C + r̂ uᵀ of block l*−1's MLP output
projection, fitted in closed form so that C's projection on r̂ entering l* matches O's (:mod:`refusal_lab.aird`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusal_lab.activations import writer_inputs
from refusal_lab.aird.repair import DEFAULT_REALIGN_POSITIONS, DEFAULT_RIDGE, REALIGN_ROLE, AIRDError, ridge
from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress


def fit_realignment(original: ModelHandle, compressed: ModelHandle, direction: torch.Tensor, source_layer: int,
                    prompts: Sequence[str], *, n_positions: int = DEFAULT_REALIGN_POSITIONS,
                    lam: float = DEFAULT_RIDGE, original_proj: torch.Tensor | None = None,
                    progress: Progress | None = None) -> tuple[int, torch.Tensor]:
    """``(l*−1, u)``: the re-alignment ``W′ = W_C + r̂ uᵀ`` of C's MLP output projection in block l*−1,
    with ``u`` ``(d_ff,)`` the ridge solution (:func:`ridge`, strength ``lam``) of
    ``x_C u ≈ r̂ᵀh_O − r̂ᵀh_C``: C's writer inputs against the gap between O's and C's projections on
    r̂ of the residual entering ``source_layer``, at the last ``n_positions`` of every prompt. Closed
    form, no gradient steps. Use training prompts (the bundled train splits), never evaluation ones.
    ``original_proj``: O's side, :func:`original_projection` of the same arguments, when already known."""
    if source_layer < 1:
        raise AIRDError("a re-alignment edits block l*−1, and the source layer is 0")
    layer = source_layer - 1
    half = None if progress is None else (lambda d, t, *a: progress(d, 2 * t, *a))
    p_o = original_proj if original_proj is not None else original_projection(
        original, direction, source_layer, prompts, n_positions=n_positions, progress=half)
    x_c, p_c = writer_inputs(compressed, prompts, compressed.writers(layer)[REALIGN_ROLE], direction, source_layer,
                             n_positions=n_positions,
                             progress=None if progress is None else (lambda d, t, *a: progress(t + d, 2 * t, *a)))
    return layer, ridge(x_c, p_o - p_c, lam).float()


def original_projection(original: ModelHandle, direction: torch.Tensor, source_layer: int, prompts: Sequence[str], *,
                        n_positions: int = DEFAULT_REALIGN_POSITIONS, progress: Progress | None = None) -> torch.Tensor:
    """O's side of :func:`fit_realignment`: ``r̂ᵀh_O`` entering ``source_layer`` at the last
    ``n_positions`` of every prompt, ``(N·n_positions,)`` float64 (the same for every compressed model)."""
    _, p_o = writer_inputs(original, prompts, original.writers(source_layer - 1)[REALIGN_ROLE], direction,
                           source_layer, n_positions=n_positions, progress=progress)
    return p_o


def bundled_fit_prompts() -> list[str]:
    """The prompts a re-alignment is fitted on: the bundled *train* splits (harmful, harmless, borderline)."""
    from refusal_lab.prompts import bundled

    return [p for kind in ("harmful", "harmless", "borderline") for p in bundled(kind, "train").prompts]
