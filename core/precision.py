"""Compute precision of forward passes: exact float32, or bfloat16 autocast with float32 weights.

``bfloat16`` runs every matmul of a forward in bfloat16 (``torch.autocast``: inputs rounded to bf16,
products accumulated in float32, the residual stream kept in float32 by the model's own additions);
weights stay float32, so compression and weight edits are unchanged. ``auto`` picks it where the
hardware has native bf16 matmuls (x86 AVX512-BF16 / AMX, CUDA with bf16 support) and float32
otherwise. The chosen precision is shown in the model info and is part of every cache key of a
study (see :mod:`core.study`): results of the two precisions never mix. Its differences from float32
are measured in BENCHMARKS.md ("Reduced precision").

Every forward of the library runs inside :func:`compute`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` has native bfloat16 matmuls (autocast is then faster than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(p()) for p in probes if callable(p))
    return False


def resolve_precision(precision: str, device: torch.device, weight_dtype: torch.dtype) -> str:
    """``auto`` → ``bfloat16`` when the weights are float32 and :func:`fast_bf16`, else the weights'
    own precision; ``float32``/``bfloat16`` as asked (bf16 weights always compute in bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if weight_dtype != torch.float32:
        return str(weight_dtype).replace("torch.", "")
    if precision == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    return precision


def _autocasts(handle) -> bool:
    return getattr(handle, "precision", "float32") == "bfloat16" and handle.dtype == torch.float32


@contextlib.contextmanager
def compute(handle) -> Iterator[None]:
    """The forward-pass context of ``handle``'s precision: bf16 autocast when the handle asks for it
    and its weights are float32, nothing otherwise (float32, or weights already in low precision)."""
    if _autocasts(handle):
        with torch.autocast(device_type=handle.device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
