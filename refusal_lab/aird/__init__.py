"""AIRD — re-induce the *original* model's refusal direction in a compressed model.

Chhabra & Khalili 2025 (arXiv 2504.04215) describe AIRD as a training-free edit of one layer that
works with the original model's refusal direction and costs sparsity in that layer; they publish
no formula. **This module is our reconstruction**, with those properties:

* O = original model, C = compressed model, r̂ = O's selected refusal direction (unit), from O's
  source layer l*.
* For the residual-writing matrices W_C (attention-output and MLP-output projections) of the
  repair layers ℓ ∈ S (default: l*−1 and l*):  **W′ = W_C + α r̂ r̂ᵀ W_C** (bias b′ = b + α r̂ r̂ᵀ b).
  The layer writes (1+α)× its component along r̂ and is unchanged in every other direction.
  Harmful prompts write much more along r̂ than harmless ones, so refusal comes back on harmful
  prompts while harmless ones barely move. The update is rank-1 but dense: in mode ``merged`` the
  repaired matrices lose their sparsity — the cost the paper reports.
* Mode ``adapter`` (beyond the paper): W_C stays untouched (sparse, RTN, bitsandbytes or HQQ) and
  the layer output y becomes y + α r̂ (r̂ᵀ y) at run time — the same function, zero weights changed,
  ``d_model`` extra numbers.
* α and S are calibrated on the bundled *validation* split only (:func:`refusal_lab.aird.calibration.calibrate`).
* **Fitted re-alignment** (our addition, also training-free): pruning can also *shift* harmless
  prompts along r̂ (they then over-refuse), which a scaling edit cannot undo — it amplifies their
  writes too. The MLP output projection of block l*−1, whose output enters the residual stream that
  l* reads, gets a second rank-1 edit **W′ = W_C + r̂ uᵀ**, u fitted in closed form by ridge regression
  on the bundled *train* prompts so that C's projection on r̂ entering l* matches O's, prompt by
  prompt, at the post-instruction positions (:func:`fit_realignment`). It acts on the writer's input,
  so it can move harmless and harmful prompts differently. The scaling edit then applies to the
  re-aligned writers: W′ = (I + α r̂r̂ᵀ)(W_C + r̂uᵀ) where both touch one matrix. Calibration decides
  whether it is used. In adapter mode it is a hook adding r̂ (uᵀx), ``d_ff`` extra numbers.

The package: :mod:`~refusal_lab.aird.repair` (the edit, merged or adapter), :mod:`~refusal_lab.aird.realignment`
(the fit), :mod:`~refusal_lab.aird.calibration` (S and α on val prompts), :mod:`~refusal_lab.aird.diagnosis`
(recoverability and the verdicts' prose), :mod:`~refusal_lab.aird.budget` (the budget curve) and
:mod:`~refusal_lab.aird.baselines` (the repairs it is compared against).
"""

from __future__ import annotations

from refusal_lab.aird.baselines import METHOD_LABELS, METHODS, changed_parameters, method_applied
from refusal_lab.aird.budget import budget_curve, refusal_rate
from refusal_lab.aird.calibration import CalibrationSets, calibrate, candidate_layer_sets
from refusal_lab.aird.diagnosis import BROKEN_PERPLEXITY_RATIO, recoverability, recovered_share, repair_verdict
from refusal_lab.aird.realignment import bundled_fit_prompts, fit_realignment, original_projection
from refusal_lab.aird.repair import (DEFAULT_ALPHAS, DEFAULT_REALIGN_POSITIONS, DEFAULT_RIDGE, MODES, REALIGN_ROLE, AIRDError,
                              Repair, applied, densified_weights, edited_writers, merge, mode_for, projection_restore,
                              rank1_edit, realigned, ridge, unit, writer_density)

__all__ = ["METHOD_LABELS", "METHODS", "changed_parameters", "method_applied", "budget_curve", "refusal_rate",
           "CalibrationSets", "calibrate", "candidate_layer_sets", "BROKEN_PERPLEXITY_RATIO", "recoverability",
           "recovered_share", "repair_verdict", "bundled_fit_prompts", "fit_realignment", "original_projection",
           "DEFAULT_ALPHAS", "DEFAULT_REALIGN_POSITIONS", "DEFAULT_RIDGE", "MODES", "REALIGN_ROLE", "AIRDError",
           "Repair", "applied", "densified_weights", "edited_writers", "merge", "mode_for", "projection_restore",
           "rank1_edit", "realigned", "ridge", "unit", "writer_density"]
