"""AIRD's edit: the :class:`Repair` (scaling edit of the residual writers of layers S, and the fitted
re-alignment of block l*−1), merged into weights or applied as an adapter, and its sparsity cost.
The method and its reconstruction: :mod:`refusal_lab.aird`."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from refusal_lab.interventions import add_rank1, scale_writers
from refusal_lab.models import ModelHandle, is_plain_linear, stored_weight
from refusal_lab.placement import copy_memo, read_tensor, write_tensors
from refusal_lab.results import CalibrationPoint, Density, RepairSummary

Mode = Literal["merged", "adapter"]
MODES: tuple[Mode, ...] = get_args(Mode)
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
REALIGN_ROLE = "mlp"  # the writer the fitted re-alignment edits, in block l*−1
DEFAULT_RIDGE = 0.1  # ridge strength, relative to the mean input power tr(XᵀX)/d
DEFAULT_REALIGN_POSITIONS = 5  # last prompt positions per prompt used by the fit


class AIRDError(ValueError):
    """A repair cannot be applied as asked; the message says why and what to do instead."""


# ----------------------------------------------------------------------------------------------
# The maths (pure)
# ----------------------------------------------------------------------------------------------

def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` in float64."""
    v = torch.as_tensor(v).detach().double()
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise AIRDError("the refusal direction has zero norm")
    return v / n


def rank1_edit(weight: torch.Tensor, r_hat: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W + α r̂ (r̂ᵀ W)`` for a writer weight ``W`` ``(d_model, in)`` and unit ``r̂`` ``(d_model,)``;
    computed in float64, returned in W's dtype. A bias ``(d_model,)`` works the same way."""
    w = weight.detach().double()
    r = r_hat.to(w.device, torch.float64)
    return (w + alpha * torch.outer(r, r @ w) if w.dim() == 2 else w + alpha * r * (r @ w)).to(weight.dtype)


def projection_restore(w_c: torch.Tensor, w_o: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``W_C + r̂ r̂ᵀ (W_O − W_C)``: the compressed writer with O's component along r̂ put back."""
    r = r_hat.to(w_c.device, torch.float64)
    diff = w_o.detach().to(w_c.device, torch.float64) - w_c.detach().double()
    return (w_c.detach().double() + torch.outer(r, r @ diff)).to(w_c.dtype)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin_u ‖x u − y‖² + λ·(tr(xᵀx)/d)·‖u‖²`` for ``x`` ``(n, d)``, ``y`` ``(n,)`` → ``(d,)`` float64;
    ``lam`` is relative to the mean feature power, so it does not depend on the activations' scale.
    With fewer rows than features and λ > 0 it solves the equivalent dual ``xᵀ(x xᵀ + c I)⁻¹ y``: an
    ``n × n`` system instead of ``d × d`` (1,000 rows vs d_ff 14,336 on a 7B model: 8 MB, not 1.6 GB)."""
    x, y = x.double(), y.double()
    n, d = x.shape
    reg = lam * float((x * x).sum()) / d if d else 0.0
    if n < d and reg > 0:
        return x.T @ torch.linalg.solve(x @ x.T + reg * torch.eye(n, dtype=torch.float64), y)
    return torch.linalg.solve(x.T @ x + reg * torch.eye(d, dtype=torch.float64), x.T @ y)


# ----------------------------------------------------------------------------------------------
# Repairs
# ----------------------------------------------------------------------------------------------

@dataclass
class Repair:
    """An AIRD repair: unit ``direction`` ``(d_model,)`` (O's), repair ``layers``, strength ``alpha``;
    optionally the fitted re-alignment ``realign`` ``(d_in,)`` (u of W′ = W + r̂ uᵀ) of the MLP output
    projection of block ``realign_layer``."""

    direction: torch.Tensor
    layers: list[int]
    alpha: float
    mode: Mode = "merged"
    source_layer: int | None = None
    calibration: list[CalibrationPoint] = field(default_factory=list)
    auto: bool = False
    realign: torch.Tensor | None = None
    realign_layer: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AIRDError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.direction = unit(self.direction).float()
        self.layers = sorted({int(x) for x in self.layers})
        if (self.realign is None) != (self.realign_layer is None):
            raise AIRDError("a re-alignment needs both its vector and its layer")
        if self.realign is not None:
            self.realign = torch.as_tensor(self.realign).detach().float().cpu()
        self.calibration = [g if isinstance(g, CalibrationPoint) else CalibrationPoint.from_json(g)
                            for g in self.calibration]

    def key(self) -> tuple:
        """What the repaired model's function depends on (for cache keys): layers, α, mode and a digest
        of the re-alignment."""
        from refusal_lab.store import tensor_key

        digest = None if self.realign is None else tensor_key(self.realign)
        return (self.layers, self.alpha, self.mode, self.realign_layer, digest)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The repair's tensors for safetensors: ``direction`` and, when fitted, ``realign``."""
        out = {"direction": self.direction.contiguous()}
        if self.realign is not None:
            out["realign"] = self.realign.contiguous()
        return out

    def summary(self) -> RepairSummary:
        """The repair without its tensors."""
        return RepairSummary(layers=self.layers, alpha=self.alpha, mode=self.mode, source_layer=self.source_layer,
                             calibration=self.calibration, auto=self.auto, realign_layer=self.realign_layer)

    def describe(self) -> dict:
        """:meth:`summary` as JSON."""
        return self.summary().to_json()

    def save(self, folder: str | Path) -> Path:
        """The adapter as ``aird_adapter.safetensors`` (r̂, u) + ``aird_adapter.json`` (layers, α, …)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(folder / "aird_adapter.safetensors"))
        (folder / "aird_adapter.json").write_text(json.dumps(self.describe(), indent=1))
        return folder

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "Repair":
        """Inverse of :meth:`tensors` + :meth:`describe`."""
        return cls(direction=tensors["direction"], realign=tensors.get("realign"), **meta)

    @classmethod
    def load(cls, folder: str | Path) -> "Repair":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "aird_adapter.json").read_text())
        return cls.from_tensors(load_file(str(folder / "aird_adapter.safetensors")), meta)


def writers(handle: ModelHandle, layers: Sequence[int]) -> list[tuple[int, str, torch.nn.Module]]:
    bad = [x for x in layers if not 0 <= x < handle.n_layers]
    if bad:
        raise AIRDError(f"repair layers {bad} outside [0, {handle.n_layers})")
    return [(layer, role, mod) for layer in layers for role, mod in handle.writers(layer).items()]


def copy_handle(handle: ModelHandle, suffix: str, edited: Sequence[torch.nn.Module] | None = None) -> ModelHandle:
    """A copy of a handle's model under a new name. With ``edited`` (modules of ``handle``'s model),
    only their parameters are copied; every other parameter is *shared* with ``handle`` (a merged edit
    of two layers costs their matrices, not a second model), so only ``edited`` may be changed in place.
    Offloaded weights (accelerate) are always shared: edits of the copy go to overlays of its own hooks
    (:func:`refusal_lab.placement.write_tensors`)."""
    memo: dict[int, object] = copy_memo(handle.model)
    if edited is not None:
        own = {id(p) for m in edited for p in m.parameters()}
        memo.update({id(p): p for p in handle.model.parameters() if id(p) not in own})
    with handle.lock:
        model = copy.deepcopy(handle.model, memo)
    import hashlib

    return ModelHandle(model=model, tokenizer=handle.tokenizer, name=f"{handle.name} + {suffix}",
                       spec=f"{handle.spec}+{suffix}",
                       fingerprint=hashlib.sha256(f"{handle.fingerprint}|{suffix}".encode()).hexdigest()[:16],
                       chat_template=handle.chat_template, system_prompt=handle.system_prompt,
                       precision=handle.precision, meta={**handle.meta, "parent_fingerprint": handle.fingerprint, "edit": suffix})


def quantized_writer(handle: ModelHandle, layers: Sequence[int]) -> tuple[int, str, torch.nn.Module] | None:
    """The first writer of ``layers`` stored quantized (bitsandbytes/HQQ), or None when all are dense."""
    return next(((layer, role, mod) for layer, role, mod in writers(handle, layers) if not is_plain_linear(mod)), None)


def check_dense(handle: ModelHandle, layers: Sequence[int], what: str) -> None:
    if (found := quantized_writer(handle, layers)) is not None:
        layer, role, mod = found
        raise AIRDError(f"{what} edits weights, but layer {layer}'s {role} projection is "
                        f"{type(mod).__name__} (quantized storage). Use mode 'adapter', which works "
                        "on any layer type.")


def mode_for(handle: ModelHandle, layers: Sequence[int], mode: Mode) -> Mode:
    """The mode to use on ``handle``: ``mode``, except ``merged`` becomes ``adapter`` when a writer of
    ``layers`` is quantized storage (bitsandbytes/HQQ), where the adapter computes the same function."""
    return "adapter" if mode == "merged" and quantized_writer(handle, layers) is not None else mode


def set_weight(mod: torch.nn.Module, new_out_in: torch.Tensor) -> None:
    """Write an ``(out, in)`` weight into ``mod`` where its weight is stored (in place, or offloaded)."""
    write_tensors([(mod, "weight", new_out_in.T if type(mod).__name__ == "Conv1D" else new_out_in)])


def edited_writers(handle: ModelHandle, repair: Repair) -> list[tuple[int, str, torch.nn.Module]]:
    """The writers ``repair`` changes: every writer of its layers when α ≠ 0, and the re-aligned one."""
    out = writers(handle, repair.layers) if repair.alpha else []
    if repair.realign_layer is not None:
        mod = writers(handle, [repair.realign_layer])
        out += [w for w in mod if w[1] == REALIGN_ROLE and all(w[2] is not m for _, _, m in out)]
    return out


def merge(compressed: ModelHandle, repair: Repair) -> ModelHandle:
    """A new handle: a copy of ``compressed`` with the repair merged into its weights — first the
    re-alignment ``W + r̂ uᵀ`` (when fitted), then ``W′ = W + α r̂ r̂ᵀ W`` in the repair layers.
    ``compressed`` is not modified. Quantized (bitsandbytes/HQQ) writers need mode 'adapter'."""
    touched = sorted({layer for layer, _, _ in edited_writers(compressed, repair)})
    check_dense(compressed, touched, "Merged AIRD")
    fit = "" if repair.realign is None else f",fit={repair.key()[-1]}"
    new = copy_handle(compressed, f"aird(α={repair.alpha:g},L={','.join(map(str, repair.layers))}{fit})",
                [m for _, _, m in edited_writers(compressed, repair)])
    r = repair.direction
    if repair.realign is not None:
        mod = new.writers(repair.realign_layer)[REALIGN_ROLE]
        w = stored_weight(mod)
        fit = torch.outer(r.double(), repair.realign.double()).to(w.device)
        set_weight(mod, (w.double() + fit).to(w.dtype))
    for _, _, mod in writers(new, repair.layers):
        set_weight(mod, rank1_edit(stored_weight(mod), r, repair.alpha))
        if getattr(mod, "bias", None) is not None:
            write_tensors([(mod, "bias", rank1_edit(read_tensor(mod, "bias"), r, repair.alpha))])
    return new


@contextmanager
def applied(compressed: ModelHandle, repair: Repair) -> Iterator[ModelHandle]:
    """The repaired model for the duration of the block: in ``adapter`` mode ``compressed`` itself
    under output hooks (removed on exit), in ``merged`` mode a merged copy."""
    if repair.mode == "adapter":
        with realigned(compressed, repair), scale_writers(compressed, repair.direction, repair.layers,
                                                          alpha=repair.alpha):
            yield compressed
    else:
        yield merge(compressed, repair)


@contextmanager
def realigned(handle: ModelHandle, repair: Repair) -> Iterator[None]:
    """The repair's fitted re-alignment as a hook (``y ← y + r̂ (uᵀx)``), nothing without one. Enter it
    before :func:`~refusal_lab.interventions.scale_writers` so the scaling acts on the re-aligned output."""
    if repair.realign is None:
        yield
    else:
        with add_rank1(handle, repair.direction, repair.realign, repair.realign_layer, REALIGN_ROLE):
            yield


def writer_density(handle: ModelHandle, layers: Sequence[int] | Repair) -> Density:
    """Non-zero weights / total of the writers in ``layers``, or of those a :class:`Repair` edits (dense
    float weights only; quantized layers count as dense)."""
    nnz = total = 0
    mods = edited_writers(handle, layers) if isinstance(layers, Repair) else writers(handle, layers)
    for _, _, mod in mods:
        if is_plain_linear(mod):
            w = read_tensor(mod, "weight")
            nnz += int((w != 0).sum())
            total += w.numel()
        else:
            n = int(getattr(mod, "in_features", 0)) * int(getattr(mod, "out_features", 0))
            nnz += n
            total += n
    return Density(nonzero=nnz, total=total, density=nnz / total if total else math.nan)


def densified_weights(compressed: ModelHandle, layers: Sequence[int] | Repair) -> int:
    """How many zero weights a merged repair of ``layers`` (or a :class:`Repair`) turns non-zero (its
    sparsity cost)."""
    d = writer_density(compressed, layers)
    return d.total - d.nonzero
