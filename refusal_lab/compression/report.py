"""The compression report: achieved sparsity, effective bits per weight, memory footprint, wall time.

How storage is counted (``ACCOUNTING``):

* compressed modules' weights, *as they would be stored*:
  - dense or unstructured-sparse float weights: every element at its dtype width (sparsity saves nothing);
  - N:M-sparse weights: the N kept values per group of M at their dtype width plus a ``ceil(log2 M)``-bit
    position index each (2:4 in float32 → 17 bits/weight);
  - RTN: ``bits`` per weight + a float32 scale per group (+ a ``bits``-bit zero-point per group when
    asymmetric); the in-memory weights are dequantized floats, see ``resident_bytes``;
  - bitsandbytes / HQQ: measured from the layer's own tensors (packed weight + absmax/scales/zeros/code).
* everything else (embeddings, norms, ``lm_head``, biases): parameters and persistent buffers at their
  dtype width, tied tensors once.

``bits_per_weight`` = stored bits of the compressed modules' weights / their number of weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from refusal_lab.codec import JsonRecord
from refusal_lab.compression.schemes import Scheme
from refusal_lab.compression.targets import Target, dense_weight
from refusal_lab.placement import offload_hook

ACCOUNTING = ("stored size: sparse weights dense at dtype width unless N:M (N values + ceil(log2 M)-bit "
              "index per group); RTN = bits/weight + float32 scale (+ bits-bit zero) per group; "
              "bitsandbytes/HQQ measured from their packed tensors; other tensors at dtype width, tied once")


@dataclass(kw_only=True)
class CompressionReport(JsonRecord):
    """What a compression did. Sizes in bytes; sparsities are fractions of exactly-zero weights.
    ``module_sparsity``/``module_bits`` are per compressed module (empty in the form a variant's
    metadata carries)."""

    scheme: str
    family: str
    model: str
    n_modules: int
    n_weights: int
    layer_sparsity: list[float | None]  # one per decoder block; None where no module of the block was compressed
    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_bits: dict[str, float] = field(default_factory=dict)
    sparsity: float
    target_sparsity: float
    bits_per_weight: float
    original_bits_per_weight: float
    compressed_bytes: int
    original_compressed_bytes: int
    memory_bytes: int
    original_memory_bytes: int
    resident_bytes: int
    seconds: float
    calibration: dict | None = None
    saveable: bool = True
    save_note: str = ""
    accounting: str = ACCOUNTING
    extra: dict = field(default_factory=dict)

    def table(self, *, per_layer: bool = True) -> str:
        """A plain-text table for the terminal."""
        mb = 1024 ** 2
        rows = [
            ("scheme", f"{self.scheme} ({self.family})"),
            ("model", self.model),
            ("modules", f"{self.n_modules} linear layers, {self.n_weights:,} weights"),
            ("sparsity", f"{self.sparsity:.4f} (target {self.target_sparsity:.4f})"),
            ("bits / weight", f"{self.bits_per_weight:.3f} (was {self.original_bits_per_weight:.1f})"),
            ("compressed modules", f"{self.compressed_bytes / mb:.1f} MiB (was "
                                   f"{self.original_compressed_bytes / mb:.1f} MiB)"),
            ("model as stored", f"{self.memory_bytes / mb:.1f} MiB (was {self.original_memory_bytes / mb:.1f} MiB)"),
            ("in memory now", f"{self.resident_bytes / mb:.1f} MiB"),
            ("wall time", f"{self.seconds:.1f} s"),
        ]
        if self.calibration:
            c = self.calibration
            rows.append(("calibration", f"{c['source']}: {c['n_samples']} × {c['seq_len']} tokens"))
        rows.append(("saveable", "yes" if self.saveable else f"no — {self.save_note}"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if per_layer:
            lines.append("per-layer sparsity:")
            cells = [f"{i:>3}: {'—' if s is None else f'{s:.3f}'}" for i, s in enumerate(self.layer_sparsity)]
            for i in range(0, len(cells), 6):
                lines.append("  " + "   ".join(cells[i:i + 6]))
        lines.append(f"({self.accounting})")
        return "\n".join(lines)


def _dtype_bits(t: torch.Tensor) -> int:
    return t.element_size() * 8


def stored_weight_bits(module: nn.Module, scheme: Scheme | None, out_f: int, in_f: int) -> int:
    """Stored bits of one compressed module's weight (bias excluded), per ``ACCOUNTING``."""
    kind = type(module).__name__
    if kind == "HQQLinear":
        from refusal_lab.compression.hqq import module_storage_bits
        return module_storage_bits(module)
    if kind in ("Linear8bitLt", "Linear4bit"):
        from refusal_lab.compression.bnb import module_storage_bits
        return module_storage_bits(module)
    numel = out_f * in_f
    width = _dtype_bits(module.weight)
    if scheme is not None and scheme.method == "rtn":
        group = in_f if scheme.group is None else scheme.group
        n_groups = out_f * math.ceil(in_f / group)
        return numel * scheme.bits + n_groups * (32 + (0 if scheme.symmetric else scheme.bits))
    if scheme is not None and scheme.is_nm:
        return numel * scheme.n // scheme.m * (width + math.ceil(math.log2(scheme.m)))
    return numel * width


def _tensor_bytes(model: nn.Module, skip: set[str], resident: bool) -> int:
    """Bytes of parameters and (persistent, unless ``resident``) buffers outside the ``skip`` modules (offloaded
    ones included: the same count wherever accelerate put them)."""
    seen: set[int] = set()
    total = 0
    for name, mod in model.named_modules():
        if name in skip:
            continue
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        tensors = list(mod.named_parameters(recurse=False))
        tensors += [(n, b) for n, b in mod.named_buffers(recurse=False) if resident or n not in non_persistent]
        offloaded = offload_hook(mod) is not None  # its meta placeholders stand for tensors stored elsewhere
        for _, t in tensors:
            if t is None or (t.device.type == "meta" and not offloaded):
                continue
            key = t.data_ptr() if t.numel() and t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _resident_module_bytes(module: nn.Module) -> int:
    total = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        total += sum(t.numel() * t.element_size() for t in meta.values() if isinstance(t, torch.Tensor))
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    if qs is not None:
        total += qs.absmax.numel() * qs.absmax.element_size()
    return total


def build_report(*, parent_model: nn.Module, model: nn.Module, targets: list[Target], scheme: Scheme,
                 n_layers: int, model_name: str, seconds: float, calibration: dict | None,
                 saveable: bool, save_note: str) -> CompressionReport:
    """Measure the compressed ``model`` (whose ``targets`` were compressed from ``parent_model``)."""
    names = {t.name for t in targets}
    zeros_per_layer = [0] * n_layers
    numel_per_layer = [0] * n_layers
    module_sparsity: dict[str, float] = {}
    module_bits: dict[str, float] = {}
    stored = original = bias_bytes = resident_targets = 0
    zeros_total = 0
    for t in targets:
        mod = model.get_submodule(t.name)
        numel = t.out_features * t.in_features
        zeros = int((dense_weight(mod) == 0).sum())
        zeros_total += zeros
        zeros_per_layer[t.layer] += zeros
        numel_per_layer[t.layer] += numel
        module_sparsity[t.name] = zeros / numel
        bits = stored_weight_bits(mod, scheme, t.out_features, t.in_features)
        module_bits[t.name] = bits / numel
        stored += bits
        orig_mod = parent_model.get_submodule(t.name)
        original += numel * _dtype_bits(orig_mod.weight)
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias_bytes += bias.numel() * bias.element_size()
        resident_targets += _resident_module_bytes(mod)
    n_weights = sum(t.out_features * t.in_features for t in targets)
    others = _tensor_bytes(model, names, resident=False)
    parent_others = _tensor_bytes(parent_model, names, resident=False)
    parent_bias = sum(b.numel() * b.element_size() for t in targets
                      if isinstance(b := getattr(parent_model.get_submodule(t.name), "bias", None), torch.Tensor))
    return CompressionReport(
        scheme=str(scheme), family=scheme.family, model=model_name, n_modules=len(targets), n_weights=n_weights,
        layer_sparsity=[z / n if n else None for z, n in zip(zeros_per_layer, numel_per_layer)],
        module_sparsity=module_sparsity, module_bits=module_bits,
        sparsity=zeros_total / n_weights, target_sparsity=scheme.target_sparsity,
        bits_per_weight=stored / n_weights, original_bits_per_weight=original / n_weights,
        compressed_bytes=math.ceil(stored / 8), original_compressed_bytes=math.ceil(original / 8),
        memory_bytes=math.ceil(stored / 8) + bias_bytes + others,
        original_memory_bytes=math.ceil(original / 8) + parent_bias + parent_others,
        resident_bytes=_tensor_bytes(model, names, resident=True) + resident_targets,
        seconds=seconds, calibration=calibration, saveable=saveable, save_note=save_note)
