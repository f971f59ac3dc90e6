"""bitsandbytes quantization: LLM.int8 (``bnb-int8``) and 4-bit NF4 / FP4 (``bnb-nf4``, ``bnb-fp4``).

The model is *reloaded* from the parent handle's ``source_dir`` (a plain safetensors folder) through
transformers' ``BitsAndBytesConfig``: bitsandbytes quantizes while loading and a GGUF-loaded model
refuses a ``quantization_config``, so there is no in-place path. bitsandbytes ≥ 0.48 has CPU kernels
(0.50.2 is pinned); the compute dtype is the parent's (float32 on CPU). Linear layers that are not
targeted (always ``lm_head``) are put on the skip list. The loaded model is put in ``eval()`` and
checked with a short forward pass; any failure is reported as :class:`BnbUnavailable` with the
RTN alternatives.

Storage (for the report) is measured from the module tensors: int8 weight + one float32 absmax per
row (``SCB``) for int8; packed 4-bit weight + one float32 absmax per block of 64 + the 16-entry code
for NF4/FP4.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from refusal_lab.compression.schemes import Scheme
from refusal_lab.compression.targets import Target, all_linear_names
from refusal_lab.models import ModelHandle


class _DropNotices(logging.Filter):
    """Drop two bitsandbytes notices that are noise here: "MatMul8bitLt: inputs will be cast … to float16"
    (logged on every int8 forward on CPU) and "Failed to load CPU gemm_4bit_forward from kernels-community"
    (logged at import when the optional ``kernels`` package is absent; bitsandbytes falls back to its
    own CPU path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "inputs will be cast" not in msg and "from kernels-community" not in msg


def _quiet_bnb() -> None:
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())


class BnbUnavailable(RuntimeError):
    """bitsandbytes cannot quantize or run this model here."""


def _advice(scheme: Scheme) -> str:
    alt = "rtn:8" if scheme.method == "bnb-int8" else "rtn:4:64 (or hqq:4:64)"
    return f"use {alt} instead (plain-torch round-to-nearest, runs anywhere)"


def availability() -> str | None:
    """``None`` if bitsandbytes imports, else the reason."""
    _quiet_bnb()
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return (f"bitsandbytes cannot run on this device: it is not importable ({type(e).__name__}: {e}); "
                "use rtn:8 / rtn:4:64 instead")
    return None


def bnb_config(scheme: Scheme, compute_dtype: torch.dtype, skip: Sequence[str]):
    """The transformers ``BitsAndBytesConfig`` for ``scheme``; ``skip`` are regexes of full module names."""
    from transformers import BitsAndBytesConfig

    if scheme.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme.method.split("-")[1],
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(skip))


def load_quantized(parent: ModelHandle, scheme: Scheme, targets: Sequence[Target]) -> nn.Module:
    """Reload ``parent`` from its ``source_dir`` with ``targets`` quantized by bitsandbytes."""
    if parent.source_dir is None:
        raise BnbUnavailable(
            f"{scheme} reloads the model from its plain safetensors folder, but {parent.name!r} is an in-memory "
            "variant with no source_dir (e.g. already compressed or edited). Apply it to a model loaded from "
            "a spec, or use a torch-side scheme that works on any handle: rtn:8, rtn:4:64, hqq:4:64, "
            "magnitude/wanda/sparsegpt")
    reason = availability()
    if reason:
        raise BnbUnavailable(reason)
    from transformers import AutoModelForCausalLM

    _quiet_bnb()
    wanted = {t.name for t in targets}
    skip = [re.escape(name) for name in all_linear_names(parent.model) if name not in wanted]
    device = parent.device
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
            model = AutoModelForCausalLM.from_pretrained(
                parent.source_dir, quantization_config=bnb_config(scheme, parent.dtype, skip),
                dtype=parent.dtype, device_map={"": str(device)})
            model.eval()
            model.requires_grad_(False)
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 2, 3, 4]], device=device), use_cache=False)
    except Exception as e:  # bitsandbytes raises many kinds (RuntimeError, NotImplementedError, …)
        raise BnbUnavailable(f"bitsandbytes cannot run on this device ({device}): {type(e).__name__}: "
                             f"{str(e)[:300]}; {_advice(scheme)}") from e
    return model


def module_storage_bits(module: nn.Module) -> int:
    """Bits of the quantized weight as stored (weight + scales/absmax + code), excluding bias."""
    kind = type(module).__name__
    w = module.weight
    bits = w.numel() * w.element_size() * 8
    if kind == "Linear8bitLt":
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(module.state, "SCB", None)
        if scb is not None:
            bits += scb.numel() * scb.element_size() * 8
    elif kind == "Linear4bit":
        qs = w.quant_state
        for t in (qs.absmax, qs.code):
            bits += t.numel() * t.element_size() * 8
        if getattr(qs, "nested", False) and qs.state2 is not None:
            for t in (qs.state2.absmax, qs.state2.code):
                bits += t.numel() * t.element_size() * 8
    return bits


def unpack_cpu_4bit(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU repacking of 4-bit weights before ``save_pretrained``; returns how many
    layers were converted.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks each ``Linear4bit`` at its first forward
    (``packing_format_for_cpu``: new nibble layout, absmax transposed to ``(blocks, rows)`` in bfloat16).
    Its own ``_save_to_state_dict`` inverts the layout but leaves the absmax transposed, so a saved and
    reloaded model gets scrambled block scales. Here the layout is inverted and the absmax put back in
    row-major block order (float32 holding the bfloat16 values the live model uses), so the reloaded
    model computes exactly what the in-memory one does. The next forward repacks again.
    """
    count = 0
    for mod in model.modules():
        if type(mod).__name__ != "Linear4bit":
            continue
        qs = mod.weight.quant_state
        if not getattr(qs, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, qs = _convert_weight_packed_for_cpu_inverse(mod.weight.data, qs)
        if qs.absmax.dim() == 2:
            qs.absmax = qs.absmax.T.reshape(-1).float().contiguous()
        mod.weight.data = data
        mod.weight.quant_state = qs
        if hasattr(mod, "quant_state"):
            mod.quant_state = qs
        count += 1
    return count
