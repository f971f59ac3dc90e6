"""HQQ (Half-Quadratic Quantization, pip ``hqq``) by swapping each targeted ``nn.Linear`` for
``hqq.core.quantize.HQQLinear`` directly — hqq's transformers integration is broken in the current
release, the layer-level API is not.

Measured with hqq 0.2.8.post1 on CPU: ``HQQLinear(linear, BaseQuantizeConfig(nbits, group_size),
compute_dtype=float32, device="cpu")`` quantizes (with its proximal zero/scale optimisation) and runs
forward with the pure-PyTorch backend, so HQQ is available on CPU. ``group_size=None`` gives one group
per row. The layer keeps a float32 scale and zero per group (compute dtype), which is what the report
counts; GPT-2 ``Conv1D`` layers are converted to ``nn.Linear`` first. HQQ models cannot be saved by
this project (``save_pretrained`` does not know HQQLinear); re-create them from the parent — the
quantization is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from refusal_lab.compression.runtime import few_threads
from refusal_lab.compression.schemes import Scheme
from refusal_lab.compression.targets import Target
from refusal_lab.models import weight_as_out_in
from refusal_lab.placement import is_offloaded
from refusal_lab.progress import Progress, report


class HqqUnavailable(RuntimeError):
    """hqq is not installed or cannot run here."""


def availability() -> str | None:
    """``None`` if hqq's HQQLinear imports, else the reason."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear  # noqa: F401
    except Exception as e:
        return f"hqq is not importable ({type(e).__name__}: {e}); install `hqq` or use rtn:4:64"
    return None


def _as_linear(module: nn.Module) -> nn.Linear:
    if type(module) is nn.Linear:
        return module
    w = weight_as_out_in(module)  # GPT-2 Conv1D
    lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin


def quantize_modules(model: nn.Module, targets: Sequence[Target], scheme: Scheme,
                     progress: Progress | None = None) -> None:
    """Replace every target in ``model`` (a copy) by an ``HQQLinear`` in place."""
    reason = availability()
    if reason:
        raise HqqUnavailable(reason)
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    if scheme.group is not None:
        bad = [t.name for t in targets if t.in_features % scheme.group]
        if bad:
            raise ValueError(f"{scheme}: in_features must be a multiple of the group size {scheme.group} "
                             f"(not the case for {bad[:3]}); use another group size or per-row ({scheme.method}:"
                             f"{scheme.bits})")
    config = BaseQuantizeConfig(nbits=scheme.bits, group_size=scheme.group)
    for i, t in enumerate(targets):
        parent_name, _, attr = t.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if is_offloaded(getattr(parent, attr)):
            raise HqqUnavailable(f"HQQ cannot quantize {t.name}: accelerate offloaded its weight (CPU/disk offload "
                                 "of a device map); use rtn:BITS[:GROUP], or a device map without offload")
        lin = _as_linear(getattr(parent, attr))
        try:
            with few_threads(lin.weight.device):  # HQQ's optimiser is many small ops
                q = HQQLinear(lin, quant_config=config, compute_dtype=lin.weight.dtype,
                              device=str(lin.weight.device), del_orig=True)
        except Exception as e:
            raise HqqUnavailable(f"HQQ failed on {t.name} ({type(e).__name__}: {e}); use rtn:"
                                 f"{scheme.bits}{':' + str(scheme.group) if scheme.group else ''} instead") from e
        q.eval()
        q.requires_grad_(False)
        setattr(parent, attr, q)
        report(progress, i + 1, len(targets))


def module_storage_bits(module: nn.Module) -> int:
    """Bits of an HQQLinear's packed weight plus its per-group scale and zero tensors (no bias)."""
    bits = module.W_q.numel() * module.W_q.element_size() * 8
    for key in ("scale", "zero", "scale_q", "zero_q"):
        t = module.meta.get(key)
        if isinstance(t, torch.Tensor):
            bits += t.numel() * t.element_size() * 8
    return bits
