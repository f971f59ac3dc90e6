"""AIRD — re-induce the *original* model's refusal direction in a compressed model.

Chhabra & Khalili 2025 (arXiv 2504.04215) describe AIRD as a training-free edit of one layer that
works with the original model's refusal direction and costs sparsity in that layer; they publish
no formula. **This module is our reconstruction**, with those properties:

* O = original model, C = compressed model, r̂ = O's selected refusal direction (unit), from O's
  source layer l*.
* For the residual-writing matrices W_C (attention-output and MLP-output projections) of the
  repair layers ℓ ∈ S (default: l*−1 and l*):  **W′ = W_C + α r̂ r̂ᵀ W_C** (bias b′ = b + α r̂ r̂ᵀ b).
  The layer writes (1+α)× its component along r̂ and is unchanged in every other direction.
  Harmful prompts write much more along r̂ than harmless ones, so refusal comes back on harmful
  prompts while harmless ones barely move. The update is rank-1 but dense: in mode ``merged`` the
  repaired matrices lose their sparsity — the cost the paper reports.
* Mode ``adapter`` (beyond the paper): W_C stays untouched (sparse, RTN, bitsandbytes or HQQ) and
  the layer output y becomes y + α r̂ (r̂ᵀ y) at run time — the same function, zero weights changed,
  ``d_model`` extra numbers.
* α and S are calibrated on the bundled *validation* split only (:func:`core.aird_calibration.calibrate`).
* **Fitted re-alignment** (our addition, also training-free): pruning can also *shift* harmless
  prompts along r̂ (they then over-refuse), which a scaling edit cannot undo — it amplifies their
  writes too. The MLP output projection of block l*−1, whose output enters the residual stream that
  l* reads, gets a second rank-1 edit **W′ = W_C + r̂ uᵀ**, u fitted in closed form by ridge regression
  on the bundled *train* prompts so that C's projection on r̂ entering l* matches O's, prompt by
  prompt, at the post-instruction positions (:func:`fit_realignment`). It acts on the writer's input,
  so it can move harmless and harmful prompts differently. The scaling edit then applies to the
  re-aligned writers: W′ = (I + α r̂r̂ᵀ)(W_C + r̂uᵀ) where both touch one matrix. Calibration decides
  whether it is used. In adapter mode it is a hook adding r̂ (uᵀx), ``d_ff`` extra numbers.

Also here: the alternatives AIRD is compared against, the recoverability diagnostic and the
budget curve.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from core.activations import projection_stats, writer_inputs
from core.generation import generate
from core.interventions import add as add_direction
from core.interventions import add_rank1, scale_writers
from core.judges import has_refusal_phrase, is_refusal
from core.models import ModelHandle, weight_as_out_in
from core.progress import Progress, report

MODES = ("merged", "adapter")
METHODS = ("none", "aird-merged", "aird-adapter", "projection-restore", "dense-copy", "activation-addition")
METHOD_LABELS = {
    "none": "No repair", "aird-merged": "AIRD (merged weights)", "aird-adapter": "AIRD (adapter)",
    "projection-restore": "Projection restore r̂r̂ᵀ(W_O − W_C)", "dense-copy": "Dense copy of O's layer(s)",
    "activation-addition": "Activation addition of O's direction"}
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
    diff = w_o.detach().double() - w_c.detach().double()
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
    mode: str = "merged"
    source_layer: int | None = None
    calibration: list[dict] = field(default_factory=list)
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

    def key(self) -> tuple:
        """What the repaired model's function depends on (for cache keys): layers, α, mode and a digest
        of the re-alignment."""
        import hashlib

        digest = None if self.realign is None else hashlib.sha256(
            self.realign.numpy().tobytes()).hexdigest()[:16]
        return (self.layers, self.alpha, self.mode, self.realign_layer, digest)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The repair's tensors for safetensors: ``direction`` and, when fitted, ``realign``."""
        out = {"direction": self.direction.contiguous()}
        if self.realign is not None:
            out["realign"] = self.realign.contiguous()
        return out

    def describe(self) -> dict:
        """Plain-data summary (no tensors)."""
        d = asdict(self)
        d.pop("direction")
        d.pop("realign")
        return d

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


def _writers(handle: ModelHandle, layers: Sequence[int]) -> list[tuple[int, str, torch.nn.Module]]:
    bad = [x for x in layers if not 0 <= x < handle.n_layers]
    if bad:
        raise AIRDError(f"repair layers {bad} outside [0, {handle.n_layers})")
    return [(layer, role, mod) for layer in layers for role, mod in handle.writers(layer).items()]


def _is_dense(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and type(module).__name__ in ("Linear",) \
        or type(module).__name__ == "Conv1D"


def _copy(handle: ModelHandle, suffix: str, edited: Sequence[torch.nn.Module] | None = None) -> ModelHandle:
    """A copy of a handle's model under a new name. With ``edited`` (modules of ``handle``'s model),
    only their parameters are copied; every other parameter is *shared* with ``handle`` (a merged edit
    of two layers costs their matrices, not a second model), so only ``edited`` may be changed in place."""
    memo: dict[int, object] = {}
    if edited is not None:
        own = {id(p) for m in edited for p in m.parameters()}
        memo = {id(p): p for p in handle.model.parameters() if id(p) not in own}
    with handle.lock:
        model = copy.deepcopy(handle.model, memo)
    import hashlib

    return ModelHandle(model=model, tokenizer=handle.tokenizer, name=f"{handle.name} + {suffix}",
                       spec=f"{handle.spec}+{suffix}",
                       fingerprint=hashlib.sha256(f"{handle.fingerprint}|{suffix}".encode()).hexdigest()[:16],
                       chat_template=handle.chat_template, system_prompt=handle.system_prompt,
                       precision=handle.precision, meta={**handle.meta, "parent_fingerprint": handle.fingerprint, "edit": suffix})


def _quantized_writer(handle: ModelHandle, layers: Sequence[int]) -> tuple[int, str, torch.nn.Module] | None:
    """The first writer of ``layers`` stored quantized (bitsandbytes/HQQ), or None when all are dense."""
    return next(((layer, role, mod) for layer, role, mod in _writers(handle, layers) if not _is_dense(mod)), None)


def _check_dense(handle: ModelHandle, layers: Sequence[int], what: str) -> None:
    if (found := _quantized_writer(handle, layers)) is not None:
        layer, role, mod = found
        raise AIRDError(f"{what} edits weights, but layer {layer}'s {role} projection is "
                        f"{type(mod).__name__} (quantized storage). Use mode 'adapter', which works "
                        "on any layer type.")


def mode_for(handle: ModelHandle, layers: Sequence[int], mode: str) -> str:
    """The mode to use on ``handle``: ``mode``, except ``merged`` becomes ``adapter`` when a writer of
    ``layers`` is quantized storage (bitsandbytes/HQQ), where the adapter computes the same function."""
    return "adapter" if mode == "merged" and _quantized_writer(handle, layers) is not None else mode


def _set_weight(mod: torch.nn.Module, new_out_in: torch.Tensor) -> None:
    with torch.no_grad():
        weight_as_out_in(mod).copy_(new_out_in)


def edited_writers(handle: ModelHandle, repair: Repair) -> list[tuple[int, str, torch.nn.Module]]:
    """The writers ``repair`` changes: every writer of its layers when α ≠ 0, and the re-aligned one."""
    out = _writers(handle, repair.layers) if repair.alpha else []
    if repair.realign_layer is not None:
        mod = _writers(handle, [repair.realign_layer])
        out += [w for w in mod if w[1] == REALIGN_ROLE and all(w[2] is not m for _, _, m in out)]
    return out


def merge(compressed: ModelHandle, repair: Repair) -> ModelHandle:
    """A new handle: a copy of ``compressed`` with the repair merged into its weights — first the
    re-alignment ``W + r̂ uᵀ`` (when fitted), then ``W′ = W + α r̂ r̂ᵀ W`` in the repair layers.
    ``compressed`` is not modified. Quantized (bitsandbytes/HQQ) writers need mode 'adapter'."""
    touched = sorted({layer for layer, _, _ in edited_writers(compressed, repair)})
    _check_dense(compressed, touched, "Merged AIRD")
    fit = "" if repair.realign is None else f",fit={repair.key()[-1]}"
    new = _copy(compressed, f"aird(α={repair.alpha:g},L={','.join(map(str, repair.layers))}{fit})",
                [m for _, _, m in edited_writers(compressed, repair)])
    r = repair.direction
    if repair.realign is not None:
        mod = new.writers(repair.realign_layer)[REALIGN_ROLE]
        w = weight_as_out_in(mod)
        _set_weight(mod, (w.double() + torch.outer(r.double(), repair.realign.double())).to(w.dtype))
    for _, _, mod in _writers(new, repair.layers):
        _set_weight(mod, rank1_edit(weight_as_out_in(mod), r, repair.alpha))
        if getattr(mod, "bias", None) is not None:
            with torch.no_grad():
                mod.bias.copy_(rank1_edit(mod.bias, r, repair.alpha))
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
    before :func:`~core.interventions.scale_writers` so the scaling acts on the re-aligned output."""
    if repair.realign is None:
        yield
    else:
        with add_rank1(handle, repair.direction, repair.realign, repair.realign_layer, REALIGN_ROLE):
            yield


def writer_density(handle: ModelHandle, layers: Sequence[int] | Repair) -> dict:
    """Non-zero weights / total of the writers in ``layers``, or of those a :class:`Repair` edits (dense
    float weights only; quantized layers count as dense)."""
    nnz = total = 0
    mods = edited_writers(handle, layers) if isinstance(layers, Repair) else _writers(handle, layers)
    for _, _, mod in mods:
        if _is_dense(mod):
            w = mod.weight
            nnz += int((w != 0).sum())
            total += w.numel()
        else:
            n = int(getattr(mod, "in_features", 0)) * int(getattr(mod, "out_features", 0))
            nnz += n
            total += n
    return {"nonzero": nnz, "total": total, "density": nnz / total if total else math.nan}


def densified_weights(compressed: ModelHandle, layers: Sequence[int] | Repair) -> int:
    """How many zero weights a merged repair of ``layers`` (or a :class:`Repair`) turns non-zero (its
    sparsity cost)."""
    d = writer_density(compressed, layers)
    return d["total"] - d["nonzero"]


# ----------------------------------------------------------------------------------------------
# Alternatives (for comparison)
# ----------------------------------------------------------------------------------------------

@contextmanager
def method_applied(method: str, original: ModelHandle, compressed: ModelHandle, repair: Repair,
                   direction_raw: torch.Tensor | None = None) -> Iterator[ModelHandle]:
    """Yield the model that ``method`` (one of :data:`METHODS`) produces from ``compressed``.

    ``projection-restore`` and ``dense-copy`` use the repair's layers; ``activation-addition`` adds
    O's raw direction (``direction_raw``, its norm is the mean harmful–harmless gap) at the input of
    ``repair.source_layer`` for every prompt.
    """
    if method == "none":
        yield compressed
    elif method in ("aird-merged", "aird-adapter"):
        with applied(compressed, replace(repair, mode=method.split("-")[1])) as h:
            yield h
    elif method == "projection-restore":
        _check_dense(compressed, repair.layers, "Projection restore")
        new = _copy(compressed, f"projection-restore(L={','.join(map(str, repair.layers))})",
                    [m for _, _, m in _writers(compressed, repair.layers)])
        for (_, _, m_new), (_, _, m_o) in zip(_writers(new, repair.layers), _writers(original, repair.layers)):
            _set_weight(m_new, projection_restore(weight_as_out_in(m_new), weight_as_out_in(m_o),
                                                  repair.direction))
        yield new
    elif method == "dense-copy":
        _check_dense(compressed, repair.layers, "Dense copy")
        new = _copy(compressed, f"dense-copy(L={','.join(map(str, repair.layers))})",
                    [compressed.blocks[layer] for layer in repair.layers])
        with torch.no_grad():
            for layer in repair.layers:
                new.blocks[layer].load_state_dict(original.blocks[layer].state_dict())
        yield new
    elif method == "activation-addition":
        if direction_raw is None or repair.source_layer is None:
            raise AIRDError("activation addition needs O's raw direction and its source layer")
        with add_direction(compressed, direction_raw, repair.source_layer, coeff=1.0):
            yield compressed
    else:
        raise AIRDError(f"unknown method {method!r}; choose from {METHODS}")


def changed_parameters(method: str, compressed: ModelHandle, repair: Repair) -> int:
    """Number of stored numbers a method changes or adds relative to ``compressed``."""
    if method == "none":
        return 0
    fit = 0 if repair.realign is None else repair.realign.numel()
    if method == "aird-adapter":
        return compressed.d_model + 1 + fit  # r̂, α and u
    if method == "activation-addition":
        return compressed.d_model
    if method == "dense-copy":
        return sum(p.numel() for layer in repair.layers for p in compressed.blocks[layer].parameters())
    mods = edited_writers(compressed, repair) if method == "aird-merged" else _writers(compressed, repair.layers)
    return sum(weight_as_out_in(m).numel() for _, _, m in mods)  # merged / projection restore: whole matrices


# ----------------------------------------------------------------------------------------------
# Measurements used by calibration and comparison
# ----------------------------------------------------------------------------------------------

def refusal_rate(handle: ModelHandle, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int | None = None,
                 settle: bool = False, progress: Progress | None = None) -> tuple[float, list[str]]:
    """Fraction of ``prompts`` whose greedy reply the substring judge calls a refusal, and the replies.
    ``settle``: a reply ends once it holds a refusal phrase (its verdict is then settled; the rate is
    the same, the reply a prefix)."""
    if not prompts:
        return math.nan, []
    replies = generate(handle, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop_when=has_refusal_phrase if settle else None, progress=progress)
    return sum(map(is_refusal, replies)) / len(replies), replies


def fit_realignment(original: ModelHandle, compressed: ModelHandle, direction: torch.Tensor, source_layer: int,
                    prompts: Sequence[str], *, n_positions: int = DEFAULT_REALIGN_POSITIONS,
                    lam: float = DEFAULT_RIDGE, original_proj: torch.Tensor | None = None,
                    progress: Progress | None = None) -> tuple[int, torch.Tensor]:
    """``(l*−1, u)``: the re-alignment ``W′ = W_C + r̂ uᵀ`` of C's MLP output projection in block l*−1,
    with ``u`` ``(d_ff,)`` the ridge solution (:func:`ridge`, strength ``lam``) of
    ``x_C u ≈ r̂ᵀh_O − r̂ᵀh_C``: C's writer inputs against the gap between O's and C's projections on
    r̂ of the residual entering ``source_layer``, at the last ``n_positions`` of every prompt. Closed
    form, no gradient steps. Use training prompts (the bundled train splits), never evaluation ones.
    ``original_proj``: O's side, :func:`original_projection` of the same arguments, when already known."""
    if source_layer < 1:
        raise AIRDError("a re-alignment edits block l*−1, and the source layer is 0")
    layer = source_layer - 1
    half = None if progress is None else (lambda d, t, *a: progress(d, 2 * t, *a))
    p_o = original_proj if original_proj is not None else original_projection(
        original, direction, source_layer, prompts, n_positions=n_positions, progress=half)
    x_c, p_c = writer_inputs(compressed, prompts, compressed.writers(layer)[REALIGN_ROLE], direction, source_layer,
                             n_positions=n_positions,
                             progress=None if progress is None else (lambda d, t, *a: progress(t + d, 2 * t, *a)))
    return layer, ridge(x_c, p_o - p_c, lam).float()


def original_projection(original: ModelHandle, direction: torch.Tensor, source_layer: int, prompts: Sequence[str], *,
                        n_positions: int = DEFAULT_REALIGN_POSITIONS, progress: Progress | None = None) -> torch.Tensor:
    """O's side of :func:`fit_realignment`: ``r̂ᵀh_O`` entering ``source_layer`` at the last
    ``n_positions`` of every prompt, ``(N·n_positions,)`` float64 (the same for every compressed model)."""
    _, p_o = writer_inputs(original, prompts, original.writers(source_layer - 1)[REALIGN_ROLE], direction,
                           source_layer, n_positions=n_positions, progress=progress)
    return p_o


def bundled_fit_prompts() -> list[str]:
    """The prompts a re-alignment is fitted on: the bundled *train* splits (harmful, harmless, borderline)."""
    from core.prompts import bundled

    return [p for kind in ("harmful", "harmless", "borderline") for p in bundled(kind, "train").prompts]


# ----------------------------------------------------------------------------------------------
# Diagnostic and budget curve
# ----------------------------------------------------------------------------------------------

def recoverability(original_proj: dict[str, torch.Tensor], compressed_proj: dict[str, torch.Tensor],
                   source_layer: int, *, good_ratio: float = 0.6, poor_ratio: float = 0.3,
                   min_d: float = 1.0, max_harmless_shift: float = 0.25) -> dict:
    """Compare the separation of harmful vs harmless projections on O's r̂ in O and C.

    ``*_proj`` hold ``harmful`` ``(n_h, n_layers+1)`` and ``harmless`` ``(n_n, n_layers+1)`` projections
    (see :func:`core.activations.projections`). Returns per-layer Cohen's d for both and a verdict on
    the source layer: a weight edit along r̂ can only amplify a separation that is still there.
    ``harmless_shift`` is how far C's harmless mean moved toward O's harmful one, as a fraction of O's
    gap; above ``max_harmless_shift`` C already over-refuses along r̂ and a scaling edit, which
    amplifies harmless writes too, can be at best partial on its own (the fitted re-alignment exists for
    this case).
    """
    d_o = projection_stats(original_proj["harmful"], original_proj["harmless"])["cohens_d"]
    d_c = projection_stats(compressed_proj["harmful"], compressed_proj["harmless"])["cohens_d"]
    at = source_layer
    ratio = float(d_c[at] / d_o[at]) if d_o[at].abs() > 1e-6 else math.nan
    gap = float(original_proj["harmful"][:, at].double().mean() - original_proj["harmless"][:, at].double().mean())
    moved = float(compressed_proj["harmless"][:, at].double().mean() - original_proj["harmless"][:, at].double().mean())
    shift = moved / gap if abs(gap) > 1e-6 else math.nan
    if ratio >= good_ratio and float(d_c[at]) >= min_d and shift > max_harmless_shift:
        verdict, level = (f"Partly recoverable by scaling alone: harmful and harmless prompts still separate along "
                          f"the original refusal direction at layer {at} (Cohen's d {float(d_c[at]):.2f} vs "
                          f"{float(d_o[at]):.2f} in the original), but harmless prompts moved {100 * shift:.0f}% of "
                          "the way toward the harmful ones, so the compressed model already over-refuses, and "
                          "amplifying r̂ raises their refusal too. AIRD's fitted re-alignment, which moves each "
                          "prompt by what it contains, can pull them back; calibration uses it when it helps."), "partial"
    elif ratio >= good_ratio and float(d_c[at]) >= min_d:
        verdict, level = (f"Recoverable: harmful and harmless prompts still separate along the original refusal "
                          f"direction at layer {at} (Cohen's d {float(d_c[at]):.2f} vs {float(d_o[at]):.2f} in the "
                          "original), so amplifying that component can restore refusal."), "recoverable"
    elif ratio >= poor_ratio:
        verdict, level = (f"Partly recoverable: the separation along the original direction at layer {at} shrank to "
                          f"{100 * ratio:.0f}% of the original's (d {float(d_c[at]):.2f} vs {float(d_o[at]):.2f}); "
                          "a repair will recover some refusal, and cost more over-refusal."), "partial"
    else:
        verdict, level = (f"Not recoverable by a weight edit: compression removed most of the harmful/harmless "
                          f"separation along the original direction at layer {at} (d {float(d_c[at]):.2f} vs "
                          f"{float(d_o[at]):.2f}). Amplifying r̂ would push harmless prompts as much as harmful "
                          "ones. Use a milder compression or keep this layer dense."), "unrecoverable"
    return {"cohens_d_original": d_o.tolist(), "cohens_d_compressed": d_c.tolist(), "layer": at,
            "ratio": ratio, "harmless_shift": shift, "level": level, "verdict": verdict}


def recovered_share(original: float, compressed: float, repaired: float, *, min_loss: float = 0.05) -> float | None:
    """Share of the harmful refusal rate lost to compression that the repair brings back,
    ``(R − C) / (O − C)`` (1 = all of it; may exceed 1 or be negative); None when compression lost
    less than ``min_loss`` (a rate, 0–1): then there is nothing to recover."""
    lost = original - compressed
    return None if lost < min_loss else (repaired - compressed) / lost


BROKEN_PERPLEXITY_RATIO = 5.0  # C's perplexity over O's from which C no longer counts as a working language model


def repair_verdict(diagnosis: dict, original: float, compressed: float, repaired: float, *,
                   good: float = 0.8, poor: float = 0.3, set_name: str = "the harmful prompts",
                   perplexity_ratio: float | None = None) -> dict:
    """The diagnostic's verdict after the repair was measured: ``diagnosis`` is :func:`recoverability`'s
    (a prediction from projections, made before any repair); ``original``/``compressed``/``repaired`` are
    harmful refusal rates (0–1) of O, C and C + AIRD on one prompt set. The level comes from the
    measured share recovered (``recovered`` ≥ ``good``, ``partial`` ≥ ``poor``, else ``not recovered``);
    the text says whether the prediction held and, when it did not, what that means. With
    ``perplexity_ratio`` (C's perplexity / O's) ≥ :data:`BROKEN_PERPLEXITY_RATIO` and the repair failing,
    the text says the compressed model itself is broken instead of blaming the layers after l*."""
    share = recovered_share(original, compressed, repaired)
    at, pred = diagnosis.get("layer"), diagnosis.get("level")
    rates = (f"refusal on {set_name}: original {100 * original:.1f}%, compressed {100 * compressed:.1f}%, "
             f"repaired {100 * repaired:.1f}%")
    if share is None:
        return {"level": "nothing lost", "recovered": None, "predicted": pred,
                "verdict": f"Compression cost almost no refusal ({rates}); there was nothing to recover."}
    level = "recovered" if share >= good else "partial" if share >= poor else "not recovered"
    text = f"AIRD brought back {100 * share:.0f}% of the refusal lost to compression ({rates})."
    broken = perplexity_ratio is not None and perplexity_ratio >= BROKEN_PERPLEXITY_RATIO
    if level == "not recovered" and broken:
        text += (f" The compressed model's perplexity is {perplexity_ratio:.0f}× the original's: it no longer "
                 "writes fluent text, so there is no refusal left to steer, and no edit along one direction "
                 "repairs a broken model. Use a milder compression.")
    elif level == "not recovered" and pred in ("recoverable", "partial"):
        sep = (f" (Cohen's d {diagnosis['cohens_d_compressed'][at]:.2f} vs {diagnosis['cohens_d_original'][at]:.2f})"
               if at is not None and "cohens_d_compressed" in diagnosis else "")
        text += (f" The projections predicted more: harmful and harmless prompts still separate along the "
                 f"original direction at layer {at}{sep}, yet amplifying that component barely restores refusal: "
                 "most of the damage lies after the direction is written, in the layers that turn it into a "
                 "refusal, which an edit along r̂ does not undo. Use a milder compression or keep the later "
                 "layers dense.")
    elif level == "recovered" and pred == "unrecoverable":
        text += " The projections had predicted otherwise; the measurement is what counts."
    return {"level": level, "recovered": share, "predicted": pred, "verdict": text}


def budget_curve(compressed: ModelHandle, repair: Repair, prompts: Sequence[str], *, max_layers: int = 8,
                 gen_tokens: int = 24, progress: Progress | None = None) -> list[dict]:
    """Refusal on ``prompts`` when repairing the k layers ending at the source layer, k = 1…``max_layers``
    (adapter form, same α and re-alignment), with the weights a merged repair would densify (the
    re-aligned writer included, whether or not its block is among the k)."""
    src = repair.source_layer if repair.source_layer is not None else max(repair.layers)
    rows = []
    for k in range(1, max_layers + 1):
        layers = [x for x in range(src - k + 1, src + 1) if x >= 0]
        trial = replace(repair, layers=layers, mode="adapter")
        with applied(compressed, trial):
            rate, _ = refusal_rate(compressed, prompts, max_new_tokens=gen_tokens, settle=True)
        rows.append({"n_layers": len(layers), "layers": layers, "refusal": rate,
                     "densified_weights": densified_weights(compressed, trial)})
        report(progress, k, max_layers)
    return rows
