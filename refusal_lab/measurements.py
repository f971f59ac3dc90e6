"""Whole-model measurements (reference perplexity, zero-shot accuracy) remembered per weights.

The dashboard measures a model on the Compress page and the study measures the same model again in its
evaluation; both hold the same :class:`~refusal_lab.models.ModelHandle`, so the handle keeps what was
measured on it. A value is reused only while nothing can have changed the model's outputs since:

* the same fingerprint and compute precision;
* no forward hook or pre-hook on any module (an intervention or an adapter hook in place) and no
  accelerate hook (offloaded weights are edited outside the parameters);
* every parameter and buffer the same tensor object, storage and in-place version (a weight edited in
  place, e.g. an AIRD merge inside ``with applied(...)``, bumps the version).

Anything else is measured afresh and not remembered. Written here because no library memoises on a
module's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress, report

__all__ = ["measured", "weights_signature"]

T = TypeVar("T")
KEPT = 16  # values remembered per handle (oldest forgotten first)


def weights_signature(model: torch.nn.Module) -> tuple | None:
    """``(id, storage pointer, in-place version)`` of every parameter and buffer, or None when the model
    carries a hook (forward hooks, accelerate's) or a tensor whose version is not tracked — then no value
    measured on it may be reused."""
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return None
    try:
        return tuple((id(t), t.data_ptr(), t._version)
                     for t in (*model.parameters(), *model.buffers()))
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def measured(handle: ModelHandle, what: str, compute: Callable[[], T], progress: Progress | None = None) -> T:
    """``compute()`` of ``handle``, or the value measured before on the same, unchanged weights
    (``what`` names the measurement and everything it depends on besides the model; ``progress`` is
    told the work is done when the value is reused)."""
    signature = weights_signature(handle.model)
    if signature is None:
        return compute()
    memo: dict = handle.__dict__.setdefault("_measured", {})
    key = (what, handle.fingerprint, handle.precision, signature)
    if key in memo:
        report(progress, 1, 1)
        return memo[key]
    value = compute()
    if weights_signature(handle.model) == signature:  # unchanged while measuring
        while len(memo) >= KEPT:
            memo.pop(next(iter(memo)))
        memo[key] = value
    return value
