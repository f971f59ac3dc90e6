"""Round-to-nearest (RTN) group-wise weight quantization in plain torch, stored dequantized.

Each output row is cut into groups of ``group`` consecutive input weights (one group per row when
``group`` is ``None``); the last group is padded by repeating the row's last weight when the width is
not a multiple. Per group:

* asymmetric (default): range ``[min(w, 0), max(w, 0)]``, ``scale = range / (2^b − 1)``,
  integer zero-point ``z = round(−min / scale)``, ``q = clamp(round(w / scale) + z, 0, 2^b − 1)``;
* symmetric: ``scale = max|w| / (2^(b−1) − 1)``, ``q = clamp(round(w / scale), −2^(b−1), 2^(b−1) − 1)``.

The weight is replaced by ``(q − z)·scale``, so ``|w − ŵ| ≤ scale / 2`` everywhere. Scales stay in
float32 (that is also how :mod:`refusal_lab.compression.report` counts them: 32 bits per group, plus a
``b``-bit zero-point per group when asymmetric).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rtn_quantize(weight: torch.Tensor, bits: int, group: int | None = None, *, symmetric: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-dequantize an ``(out, in)`` weight. Returns ``(dequantized (out, in) float32,
    scale (out, n_groups) float32)``; the error in group ``g`` of row ``r`` is ≤ ``scale[r, g] / 2``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"RTN bits must be 2-8, got {bits}")
    w = weight.detach().float()
    rows, cols = w.shape
    g = cols if group is None or group <= 0 or group >= cols else group
    pad = (-cols) % g
    if pad:
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    w = w.reshape(rows, -1, g)  # (out, n_groups, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=-1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
        deq = q * scale
    else:
        qmax = 2 ** bits - 1
        lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
        deq = (q - zero) * scale
    deq = deq.reshape(rows, -1)[:, :cols]
    return deq.contiguous(), scale.squeeze(-1)
