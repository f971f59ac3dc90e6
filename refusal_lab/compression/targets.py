"""Which modules a scheme compresses, and uniform access to their weights.

Targets are always linear layers inside the decoder blocks (never embeddings, norms or ``lm_head``).
By default every one of them (q/k/v/o, gate/up/down, GPT-2's ``c_attn``/``c_proj``/``c_fc`` …);
``modules=`` narrows that down with a regex (``re.search`` on the full module name, e.g.
``r"mlp\\."``) or a list of name suffixes (``["q_proj", "k_proj"]``, matched at a ``.`` boundary).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from refusal_lab.models import ModelHandle, find_blocks, is_plain_linear, stored_weight, weight_as_out_in
from refusal_lab.placement import write_tensors


@dataclass(frozen=True)
class Target:
    """One module to compress: full name in the model, the block index it lives in, its shape."""

    name: str
    layer: int
    out_features: int
    in_features: int


def _matcher(modules: "str | Sequence[str] | None"):
    if modules is None:
        return lambda name: True
    if isinstance(modules, str):
        try:
            pattern = re.compile(modules)
        except re.error as e:
            raise ValueError(f"modules={modules!r} is not a valid regular expression: {e}") from None
        return lambda name: pattern.search(name) is not None
    suffixes = [s.strip(".") for s in modules]
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def block_prefixes(model: nn.Module) -> list[str]:
    """Full module-name prefix of each decoder block (``model.layers.0`` …)."""
    blocks = find_blocks(model)
    ids = {id(b): i for i, b in enumerate(blocks)}
    prefixes = [""] * len(blocks)
    for name, mod in model.named_modules():
        if id(mod) in ids:
            prefixes[ids[id(mod)]] = name
    return prefixes


def select_targets(handle: ModelHandle, modules: "str | Sequence[str] | None" = None) -> list[Target]:
    """The linear layers inside decoder blocks that match ``modules`` (all when ``None``), in model order.

    Raises ``ValueError`` when nothing matches (e.g. a model that is already quantized)."""
    match = _matcher(modules)
    targets = []
    for layer, prefix in enumerate(block_prefixes(handle.model)):
        block = handle.blocks[layer]
        for sub, mod in block.named_modules():
            if sub and is_plain_linear(mod):
                name = f"{prefix}.{sub}"
                if match(name):
                    w = weight_as_out_in(mod)
                    targets.append(Target(name, layer, int(w.shape[0]), int(w.shape[1])))
    if not targets:
        what = "the default selection" if modules is None else f"modules={modules!r}"
        raise ValueError(f"{what} matches no plain linear layer inside the decoder blocks of {handle.name} "
                         "(already quantized? a regex like 'mlp' or suffixes like ['q_proj'] select modules)")
    return targets


def all_linear_names(model: nn.Module) -> list[str]:
    """Every plain linear layer of the model, anywhere (for bitsandbytes' skip list)."""
    return [name for name, mod in model.named_modules() if is_plain_linear(mod)]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's effective weight as a float32 ``(out_features, in_features)`` tensor — dequantized
    for bitsandbytes ``Linear8bitLt``/``Linear4bit`` and HQQ's ``HQQLinear``, read where it is stored when
    accelerate offloaded it. Always a new tensor."""
    kind = type(module).__name__
    with torch.no_grad():
        if kind == "HQQLinear":
            return module.dequantize().float().reshape(module.meta["shape"]).clone()
        if kind == "Linear8bitLt":
            w = module.weight
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = getattr(module.state, "SCB", None)
            if w.dtype == torch.int8 and scb is not None:
                return w.float() * (scb.float().unsqueeze(1) / 127.0)
            return w.float().clone()
        if kind == "Linear4bit":
            return _dequantize_bnb_4bit(module)
        return stored_weight(module).detach().float().clone()


def _dequantize_bnb_4bit(module: nn.Module) -> torch.Tensor:
    """Dequantize a bnb ``Linear4bit``. On CPUs with AVX512-BF16, bitsandbytes repacks the weight at the
    first forward (``packing_format_for_cpu``, absmax in bfloat16); undo that on a copy first. Falls back
    to reading the weight off a forward pass of the identity if the layout is unknown."""
    import bitsandbytes.functional as bf

    w = module.weight
    qs, data = w.quant_state, w.data
    try:
        if getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, qs = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(qs))
            if qs.absmax.dim() == 2:  # left transposed (blocks-per-row, rows) when not nested
                qs.absmax = qs.absmax.T.reshape(-1).float()
        return bf.dequantize_4bit(data, qs).float().reshape(qs.shape).clone()
    except Exception:
        eye = torch.eye(module.in_features, device=data.device, dtype=getattr(module, "compute_dtype", None)
                        or torch.float32)
        out = module(eye).float()
        if module.bias is not None:
            out = out - module.bias.float()
        return out.T.contiguous()


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``(out, in)`` weight into a plain linear/Conv1D, in the module's own dtype, where its weight is
    stored: in place, or — offloaded by accelerate — in the module's weights map
    (:func:`refusal_lab.placement.write_tensors`)."""
    write_tensors([(module, "weight", weight.T if type(module).__name__ == "Conv1D" else weight)])
