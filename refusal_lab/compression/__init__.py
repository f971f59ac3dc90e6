"""Compression schemes: quantization (bitsandbytes, RTN, HQQ) and pruning (magnitude, Wanda, SparseGPT;
unstructured and N:M), applied to a :class:`~refusal_lab.models.ModelHandle` without touching it.

>>> scheme = parse_scheme("wanda:0.5")
>>> small, rep = apply(handle, scheme)          # handle is unchanged; small is a new handle
>>> print(rep.table())

Spec strings and their canonical form: :mod:`refusal_lab.compression.schemes`. What is counted in the
report: :mod:`refusal_lab.compression.report`. Which modules: :mod:`refusal_lab.compression.targets`.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from refusal_lab.compression.calibration import Calibration
from refusal_lab.compression.report import CompressionReport, build_report
from refusal_lab.compression.schemes import Scheme, SchemeError, VALID_FORMS, parse_scheme
from refusal_lab.compression.targets import Target, select_targets
from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress
from refusal_lab.progress import report as _report_progress

__all__ = ["Scheme", "SchemeError", "SchemeInfo", "CompressionReport", "Calibration", "REGISTRY",
           "parse_scheme", "list_schemes", "apply", "VALID_FORMS", "CODE_VERSION"]

CODE_VERSION = "compression-1"  # bump when an algorithm's output changes (part of every fingerprint)


def _always() -> str | None:
    return None


def _bnb_available() -> str | None:
    from refusal_lab.compression.bnb import availability
    return availability()


def _hqq_available() -> str | None:
    from refusal_lab.compression.hqq import availability
    return availability()


@dataclass
class Compressed:
    """What a method's ``apply`` returns: the compressed model, the calibration it used, a save note."""

    model: object  # nn.Module
    calibration: Calibration | None = None
    save_note: str = ""


Apply = Callable[[ModelHandle, Scheme, Sequence[Target], object, "Progress | None"], Compressed]


def _copied(handle: ModelHandle, targets: Sequence[Target]) -> tuple[object, dict]:
    """A deep copy of ``handle``'s model (no hooks attached: the lock is held) and its target modules by name.
    Weights accelerate offloaded are shared, not copied: the copy's edits go to its own hooks' overlays."""
    from refusal_lab.placement import copy_memo

    with handle.lock:
        model = copy.deepcopy(handle.model, copy_memo(handle.model))
    named = dict(model.named_modules())
    return model, {t.name: named[t.name] for t in targets}


def _apply_bnb(handle, scheme, targets, calibration, progress) -> Compressed:
    from refusal_lab.compression.bnb import load_quantized

    _report_progress(progress, 0, 1)
    model = load_quantized(handle, scheme, targets)
    _report_progress(progress, 1, 1)
    return Compressed(model)


def _apply_rtn(handle, scheme, targets, calibration, progress) -> Compressed:
    from refusal_lab.compression.quantization import rtn_quantize
    from refusal_lab.compression.targets import dense_weight, set_weight

    model, mods = _copied(handle, targets)
    for i, t in enumerate(targets):
        deq, _ = rtn_quantize(dense_weight(mods[t.name]), scheme.bits, scheme.group, symmetric=scheme.symmetric)
        set_weight(mods[t.name], deq)
        _report_progress(progress, i + 1, len(targets))
    return Compressed(model)


def _apply_hqq(handle, scheme, targets, calibration, progress) -> Compressed:
    from refusal_lab.compression.hqq import quantize_modules

    model, _ = _copied(handle, targets)
    quantize_modules(model, targets, scheme, progress)
    return Compressed(model, save_note="HQQLinear layers are not serialisable by save_pretrained; re-create from the parent")


def _apply_magnitude(handle, scheme, targets, calibration, progress) -> Compressed:
    from refusal_lab.compression.pruning import check_nm, magnitude_prune
    from refusal_lab.compression.targets import dense_weight, set_weight

    check_nm(targets, scheme.m)
    model, mods = _copied(handle, targets)
    for i, t in enumerate(targets):
        set_weight(mods[t.name], magnitude_prune(dense_weight(mods[t.name]), scheme.sparsity, scheme.n, scheme.m))
        _report_progress(progress, i + 1, len(targets))
    return Compressed(model)


def _apply_calibrated_pruning(handle, scheme, targets, calibration, progress) -> Compressed:
    """Wanda and SparseGPT: block by block, from activations of the calibration text."""
    from refusal_lab.compression.calibration import resolve
    from refusal_lab.compression.pruning import prune_sequential
    from refusal_lab.models import find_blocks

    calib = resolve(handle, calibration)
    model, mods = _copied(handle, targets)
    prune_sequential(model, find_blocks(model), mods, targets, calib, scheme.method,
                     sparsity=scheme.sparsity, n=scheme.n, m=scheme.m, progress=progress)
    return Compressed(model, calib)


@dataclass(frozen=True)
class SchemeInfo:
    """One registry entry: a method, its spec forms and examples, and whether it can run here."""

    method: str
    family: str
    form: str
    examples: tuple[str, ...]
    description: str
    calibration: bool
    saveable: bool
    apply: Apply
    check: Callable[[], str | None] = _always

    @property
    def unavailable_reason(self) -> str | None:
        return self.check()

    def to_dict(self) -> dict:
        return {"method": self.method, "family": self.family, "form": self.form, "examples": list(self.examples),
                "description": self.description, "calibration": self.calibration, "saveable": self.saveable,
                "available": self.unavailable_reason is None, "unavailable_reason": self.unavailable_reason}


REGISTRY: dict[str, SchemeInfo] = {info.method: info for info in (
    SchemeInfo("bnb-int8", "quantization", "bnb-int8", ("bnb-int8",),
               "bitsandbytes LLM.int8 (8-bit rows with fp16 outlier decomposition), reloaded from source_dir",
               False, True, _apply_bnb, _bnb_available),
    SchemeInfo("bnb-nf4", "quantization", "bnb-nf4", ("bnb-nf4",),
               "bitsandbytes 4-bit NormalFloat, blocks of 64, reloaded from source_dir", False, True,
               _apply_bnb, _bnb_available),
    SchemeInfo("bnb-fp4", "quantization", "bnb-fp4", ("bnb-fp4",),
               "bitsandbytes 4-bit float, blocks of 64, reloaded from source_dir", False, True, _apply_bnb,
               _bnb_available),
    SchemeInfo("rtn", "quantization", "rtn:BITS[:GROUP][:sym]", ("rtn:8", "rtn:4:64", "rtn:3:64", "rtn:4:128:sym"),
               "round-to-nearest int-BITS per group (per row without GROUP), asymmetric unless :sym; "
               "stored dequantized, plain torch", False, True, _apply_rtn),
    SchemeInfo("hqq", "quantization", "hqq:BITS[:GROUP]", ("hqq:4:64", "hqq:3:64", "hqq:8"),
               "Half-Quadratic Quantization via hqq's HQQLinear (optimised zero/scale)", False, False,
               _apply_hqq, _hqq_available),
    SchemeInfo("magnitude", "pruning", "magnitude:SPARSITY | magnitude:N:M", ("magnitude:0.5", "magnitude:4:8"),
               "zero the smallest |W| per weight matrix (or per group of M)", False, True, _apply_magnitude),
    SchemeInfo("wanda", "pruning", "wanda:SPARSITY | wanda:N:M", ("wanda:0.5", "wanda:2:4"),
               "Wanda: |W|·‖X‖ per output row from calibration activations, block by block", True, True,
               _apply_calibrated_pruning),
    SchemeInfo("sparsegpt", "pruning", "sparsegpt:SPARSITY | sparsegpt:N:M", ("sparsegpt:0.5", "sparsegpt:2:4"),
               "SparseGPT: OBS pruning with weight update from the calibration Hessian, block by block",
               True, True, _apply_calibrated_pruning),
)}


def list_schemes() -> list[SchemeInfo]:
    """Every registered method, in registry order."""
    return list(REGISTRY.values())


def compressed_fingerprint(parent: ModelHandle, scheme: Scheme, calibration_sha: str | None,
                           targets: Sequence[Target] | None = None) -> str:
    """Cheap id of a compressed variant: sha of (parent fingerprint, scheme, calibration, modules, code)."""
    h = hashlib.sha256(f"{parent.fingerprint}|{scheme}|{calibration_sha or '-'}|{CODE_VERSION}".encode())
    if targets is not None:
        h.update("|".join(t.name for t in targets).encode())
    return h.hexdigest()[:16]


def apply(handle: ModelHandle, scheme: "str | Scheme", calibration=None, *,
          modules: "str | Sequence[str] | None" = None,
          progress: Progress | None = None) -> tuple[ModelHandle, CompressionReport]:
    """Compress ``handle`` with ``scheme``; return ``(new handle, report)``. ``handle`` is never modified.

    ``calibration`` (Wanda/SparseGPT only; ignored otherwise): ``None`` = bundled English text,
    ``"harmless"`` = bundled harmless train prompts, a text ``str``, a list of prompts / ``PromptSet``,
    or a :class:`Calibration`. ``modules``: regex or name suffixes among the decoder blocks' linears
    (default: all of them). bnb schemes reload from ``handle.source_dir``; the others work on a deep copy.
    """
    scheme = parse_scheme(scheme)
    info = REGISTRY[scheme.method]
    if (reason := info.unavailable_reason) is not None:
        raise RuntimeError(f"{scheme} is not available here: {reason}")
    t0 = time.perf_counter()
    targets = select_targets(handle, modules)
    done = info.apply(handle, scheme, targets, calibration, progress)
    model, calib = done.model, done.calibration
    model.eval()
    model.requires_grad_(False)

    seconds = time.perf_counter() - t0
    default_modules = modules is None
    new = ModelHandle(
        model=model, tokenizer=handle.tokenizer, name=f"{handle.name} · {scheme}", spec=f"{handle.spec}+{scheme}",
        fingerprint=compressed_fingerprint(handle, scheme, calib.sha if calib else None,
                                           None if default_modules else targets),
        source_dir=None, chat_template=handle.chat_template, system_prompt=handle.system_prompt,
        precision=handle.precision, meta={"parent_fingerprint": handle.fingerprint, "parent_spec": handle.spec, "scheme": str(scheme),
              "calibration": calib.describe() if calib else None, "code_version": CODE_VERSION,
              "modules": None if default_modules else [t.name for t in targets]})
    rep = build_report(parent_model=handle.model, model=model, targets=targets, scheme=scheme,
                       n_layers=handle.n_layers, model_name=handle.name, seconds=seconds,
                       calibration=calib.describe() if calib else None,
                       saveable=info.saveable, save_note=done.save_note)
    new.meta["report"] = {k: v for k, v in rep.to_json().items() if k not in ("module_sparsity", "module_bits")}
    return new, rep
