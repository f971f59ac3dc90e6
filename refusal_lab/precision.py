"""Compute precision of forward passes: exact float32, or bfloat16 autocast with float32 weights.

``bfloat16`` runs every matmul of a forward in bfloat16 (``torch.autocast``: inputs rounded to bf16,
products accumulated in float32, the residual stream kept in float32 by the model's own additions);
weights stay float32, so compression and weight edits are unchanged. ``auto`` picks it where the
hardware has native bf16 matmuls (x86 AVX512-BF16 / AMX, CUDA with bf16 support) and float32
otherwise. The chosen precision is shown in the model info and is part of every cache key of a
study (see :mod:`refusal_lab.study`): results of the two precisions never mix. Its differences from float32
are measured in BENCHMARKS.md ("Reduced precision").

Every forward of the library runs inside :func:`compute`. Under autocast it also swaps each plain
``nn.Linear`` weight for a cached bfloat16 copy (:func:`_shadows`): autocast would otherwise cast
every weight again on every forward (a quarter of a greedy decoding step, measured in BENCHMARKS.md);
the copy is the same rounding, so outputs are bit-identical (tested). Key/value caches made under it
store bfloat16 (:func:`low_precision_cache`): attention reads its keys and values in bf16 anyway.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections import OrderedDict
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


SHADOW_MODELS = 1  # models whose bf16 weight copies are kept (each costs half its float32 linear weights)
_SHADOWS: OrderedDict[int, tuple] = OrderedDict()  # id(model) → (weakref(model), {module: entry})
_SHADOW_LOCK = threading.Lock()


def _shadow(entries: weakref.WeakKeyDictionary, module: torch.nn.Linear) -> torch.Tensor | None:
    """The bf16 copy of ``module.weight``, made again whenever the weight changed: another Parameter
    swapped in (an edit in a context), new storage (``.data =``) or an in-place write (``_version``)."""
    w = module._parameters.get("weight")
    if w is None or w.dtype != torch.float32 or w.device.type == "meta":
        return None
    entry = entries.get(module)
    stamp = (w.data_ptr(), w._version)
    if entry is None or entry[0]() is not w or entry[1] != stamp:
        entry = (weakref.ref(w), stamp, w.detach().to(torch.bfloat16))
        entries[module] = entry
    return entry[2]


def _shadows(model: torch.nn.Module) -> weakref.WeakKeyDictionary:
    """The bf16 weight copies of ``model`` (the ``SHADOW_MODELS`` most recently run models keep theirs)."""
    with _SHADOW_LOCK:
        key = id(model)
        ref_entries = _SHADOWS.pop(key, None)
        if ref_entries is None or ref_entries[0]() is not model:
            ref_entries = (weakref.ref(model), weakref.WeakKeyDictionary())
        _SHADOWS[key] = ref_entries
        while len(_SHADOWS) > SHADOW_MODELS:
            _SHADOWS.popitem(last=False)
        return ref_entries[1]


@contextlib.contextmanager
def _bf16_weights(model: torch.nn.Module) -> Iterator[None]:
    """Plain ``nn.Linear`` weights swapped for their bf16 copies for the duration (quantized layers,
    offloaded weights and forwards that build a graph keep their own)."""
    if torch.is_grad_enabled():
        yield
        return
    entries = _shadows(model)
    swapped = []
    try:
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                copy = _shadow(entries, m)
                if copy is not None:
                    swapped.append((m, m._parameters["weight"]))
                    m._parameters["weight"] = copy
        yield
    finally:
        for m, w in reversed(swapped):
            m._parameters["weight"] = w


DENSE_4BIT = True  # False: bitsandbytes' 4-bit CPU layers run its own fused kernel (bench/bnb_dense_probe.py)


@contextlib.contextmanager
def kept_4bit_packing(model: torch.nn.Module) -> Iterator[None]:
    """``model.state_dict()`` made safe inside the block for bitsandbytes 4-bit layers repacked for the CPU
    kernel: bitsandbytes 0.50's ``Linear4bit._save_to_state_dict`` turns such a weight back into the standard
    layout in place (its data and quant_state), and the layer's next forward packs the data again without
    updating the weight's quant_state, so from then on it computes garbage (peft's
    ``get_peft_model_state_dict`` and our fingerprints call it). Each packed weight's data and quant_state
    are put back after the block (the entries read inside are the standard layout's). By hand: a fix of
    the library's in-place conversion, which it has no switch for."""
    saved = []
    for m in model.modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        qs = getattr(w, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            saved.append((w, w.data, qs, dict(qs.__dict__)))  # the conversion rewrites qs's fields in place
    try:
        yield
    finally:
        for w, data, qs, fields in saved:
            w.data = data
            qs.__dict__.clear()
            qs.__dict__.update(fields)
            w.quant_state = qs


def _packed_4bit(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` that runs its fused CPU kernel (weights repacked
    at its first forward on a CPU with AVX512-BF16: ``packing_format_for_cpu``)."""
    if not any(c.__name__ == "Linear4bit" for c in type(module).__mro__):
        return False
    w = module._parameters.get("weight")
    qs = getattr(w, "quant_state", None)
    return (w is not None and w.device.type == "cpu" and bool(getattr(qs, "packing_format_for_cpu", False))
            and bool(getattr(module, "compute_type_is_set", False)))  # in train mode too: bitsandbytes keeps the
    #                                                                     packed kernel (no autograd) once packed


def read_4bit_weight(module: torch.nn.Module, chunk: int = 1024) -> torch.Tensor:
    """The bf16 weight ``(out_features, in_features)`` that bitsandbytes' fused CPU kernel multiplies by,
    read out of the kernel itself by multiplying the identity (each output is one weight times 1.0, so
    exact); costs one pass of ``in_features`` tokens through the layer. By hand: bitsandbytes exposes
    no dequantization of its repacked CPU layout."""
    import bitsandbytes as bnb

    qs = module.weight.quant_state
    k = int(qs.shape[1])
    cols = []
    with torch.no_grad(), torch.autocast(device_type="cpu", enabled=False):
        for j in range(0, k, chunk):
            eye = torch.eye(k, dtype=torch.bfloat16)[j:j + chunk]
            cols.append(bnb.matmul_4bit(eye, module.weight, quant_state=qs))  # (rows, out): W[:, j:j+rows]ᵀ
    return torch.cat(cols).T.contiguous()


def _dense_4bit_forward(module: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` on the CPU kernel's path, with its weight already dequantized: input cast to
    the compute dtype, then to bf16 (the kernel's own cast), product in the compute dtype, bias added there."""
    inp_dtype = x.dtype
    if module.compute_dtype is not None:
        x = x.to(module.compute_dtype)
    out = torch.nn.functional.linear(x.to(torch.bfloat16), weight).to(x.dtype)
    if module.bias is not None:
        out += module.bias.to(x.dtype)
    return out.to(inp_dtype)


@contextlib.contextmanager
def dense_4bit(model: torch.nn.Module) -> Iterator[None]:
    """bitsandbytes 4-bit layers on the CPU kernel run as a bf16 matmul with their weight dequantized once
    (kept with the bf16 copies of :func:`_shadows`, so with the ``SHADOW_MODELS`` most recently run
    models only) instead of the fused kernel, which unpacks every weight again on every
    call (4–5× a decoding step's matmul, BENCHMARKS.md "bitsandbytes on the CPU"). Same weights, same
    bf16 rounding of the input, float32 accumulation: outputs equal (tested; token agreement on the
    bundled test prompts measured by ``bench/bnb_dense_probe.py``). Forwards that build a graph take this
    path too, whatever ``DENSE_4BIT`` says: the fused kernel has no autograd (bitsandbytes 0.50 warns
    "an autograd kernel was not registered" and the gradient through it is wrong — a distill training of a
    bnb-nf4 student that had run once before diverged), the matmul here differentiates in its input."""
    if not (DENSE_4BIT or torch.is_grad_enabled()):
        yield
        return
    swapped = []
    try:
        entries = None
        for m in model.modules():
            if not _packed_4bit(m):
                continue
            if entries is None:
                entries = _shadows(model)  # one store with the bf16 copies: one model's copies in memory
            stamp = (m.weight.data_ptr(), id(m.weight.quant_state))
            entry = entries.get(m)
            if entry is None or entry[0] != stamp:
                entry = (stamp, read_4bit_weight(m))
                entries[m] = entry
            swapped.append((m, "forward" in m.__dict__, m.__dict__.get("forward")))
            m.forward = functools.partial(_dense_4bit_forward, m, entry[1])
        yield
    finally:
        for m, had, old in reversed(swapped):
            if had:
                m.forward = old
            else:
                del m.forward


def clear_shadows() -> None:
    """Drop every cached bf16 weight copy and dequantized 4-bit weight (frees their memory; the next
    forward makes them again)."""
    with _SHADOW_LOCK:
        _SHADOWS.clear()


@contextlib.contextmanager
def compute(handle, model: torch.nn.Module | None = None) -> Iterator[None]:
    """The forward-pass context of ``handle``'s precision: bf16 autocast (with cached bf16 weight
    copies) when the handle asks for it and its weights are float32, nothing otherwise (float32, or
    weights already in low precision); in either, bitsandbytes' 4-bit CPU layers with their weights
    dequantized once (:func:`dense_4bit`). ``model``: the module tree that runs (default ``handle.model``;
    e.g. a training copy that shares its parameters)."""
    model = handle.model if model is None else model
    with dense_4bit(model):
        if _autocasts(handle):
            with torch.autocast(device_type=handle.device.type, dtype=torch.bfloat16), _bf16_weights(model):
                yield
        else:
            yield


@contextlib.contextmanager
def running_at(handle, precision: str | None) -> Iterator[None]:
    """``handle``'s forward passes at ``precision`` inside the block (None: its own), restored after it
    whatever happens — for a step that must be exact while the rest runs in bf16. Holds ``handle.lock``
    (every forward does), so another thread's passes never see the switched precision."""
    with handle.lock:
        old = handle.precision
        if precision is not None:
            handle.precision = precision
        try:
            yield
        finally:
            handle.precision = old


def kv_dtype(handle) -> torch.dtype:
    """The dtype a key/value cache of ``handle`` holds: bf16 under autocast (:func:`low_precision_cache`)."""
    return torch.bfloat16 if _autocasts(handle) else handle.dtype



@functools.cache
def bf16_kv_layer() -> type:
    """The class of a growing cache layer that stores keys and values in bfloat16 (made on first use:
    importing ``transformers.cache_utils`` costs seconds, which no import of this module should pay).
    Under bf16 autocast attention (SDPA, or eager's matmuls) casts keys and values to bf16 when it reads
    them, so storing them cast gives the same attention, bit for bit, with half the memory and no
    re-cast of the whole cache per step."""
    from transformers.cache_utils import DynamicLayer

    class Bf16KVLayer(DynamicLayer):
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.dtype = torch.bfloat16
            self.keys, self.values = self.keys.to(self.dtype), self.values.to(self.dtype)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            return super().update(key_states.to(torch.bfloat16), value_states.to(torch.bfloat16), *args, **kwargs)

    return Bf16KVLayer


def is_growing_layer(layer) -> bool:
    """Whether a cache layer is a plain growing one (transformers' ``DynamicLayer`` or its bf16 form)."""
    from transformers.cache_utils import DynamicLayer

    return type(layer) in (DynamicLayer, bf16_kv_layer())


def low_precision_cache(handle, cache):
    """``cache`` with its plain growing layers storing bfloat16 when ``handle`` autocasts (in place;
    other layer kinds — sliding windows, quantized caches — and other precisions are left as they are).
    Returns ``cache``."""
    if cache is None or not _autocasts(handle) or not hasattr(cache, "layers"):
        return cache
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = bf16_kv_layer()  # the same state; only initialization and update differ
            if layer.is_initialized:
                layer.dtype = torch.bfloat16
                layer.keys, layer.values = layer.keys.to(torch.bfloat16), layer.values.to(torch.bfloat16)
    return cache
