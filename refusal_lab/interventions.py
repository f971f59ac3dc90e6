"""Interventions on the residual stream along a direction, as context managers.

* :func:`ablate` — ``x ← x − r̂ r̂ᵀ x`` at block inputs (and the final-norm input) and at every
  attention/MLP output: the model never carries the direction (runtime, hook-based).
* :func:`add` — ``x ← x + c·v`` at the input of one block, at every position (activation addition).
* :func:`orthogonalize` — the weight-edit equivalent of :func:`ablate`: embeddings and every
  attention/MLP output projection (weights and biases) are projected so nothing writes along r̂.
* :func:`scale_writers` — ``y ← y + α r̂ r̂ᵀ y`` on the attention/MLP outputs of given layers
  (``α = −1`` removes the component, ``α > 0`` amplifies it).
* :func:`add_rank1` — ``y ← y + r̂ (uᵀ x)`` on one writer with input ``x``: the runtime form of the weight
  edit ``W′ = W + r̂ uᵀ``.

:data:`INTERVENTIONS` names the first three (and "none") for the views that let a user pick one
(:func:`intervene`).

Each one holds ``handle.lock`` (a re-entrant lock) for its whole duration, so a model shared by
several callers never runs one caller's forward under another caller's intervention, while the
same thread can nest interventions and run forwards inside them. Hooks are removed and weights
restored in ``finally`` blocks, also when the body raises.

Models spread over devices or offloaded by accelerate (:mod:`refusal_lab.placement`) work unchanged: a hook
computes on the device and in the dtype of the tensor it acts on (the direction is cast once per device
and dtype), and weight edits are made where each weight is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import math

import torch
from torch import nn

from refusal_lab.models import ModelHandle
from refusal_lab.placement import read_tensor, replaced


def _as_vector(handle: ModelHandle, v: torch.Tensor, *, unit: bool) -> torch.Tensor:
    """``v`` ``(d_model,)`` as a float64 vector on the handle's (input) device, unit length when ``unit``;
    :class:`_Cast` puts it where each hook needs it."""
    v = torch.as_tensor(v).detach()
    if v.shape != (handle.d_model,):
        raise ValueError(f"direction must have shape ({handle.d_model},), got {tuple(v.shape)}")
    v = v.to(device=handle.device, dtype=torch.float64)
    if unit:
        norm = v.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("direction has zero (or non-finite) norm")
        v = v / norm
    return v


class _Cast:
    """A vector on the device and in the dtype of each tensor it meets, cast once per (device, dtype):
    hooks on layers spread over several devices each get a local copy."""

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v
        self.cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        out = self.cache.get(key)
        if out is None:
            out = self.cache[key] = self.v.to(device=x.device, dtype=x.dtype)
        return out


def _project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x − r (rᵀx)`` along the last dim; ``r`` unit, in x's dtype."""
    return x - (x @ r).unsqueeze(-1) * r


def _pre_hook(fn):
    """A forward pre-hook (with kwargs) applying ``fn`` to the hidden-state argument."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    return hook


def _out_hook(fn):
    """A forward hook applying ``fn`` to a module's tensor output (or the first element of a tuple)."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)
    return hook


def _layers(handle: ModelHandle, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(handle.n_layers))
    n = handle.n_layers
    given = [int(layer) for layer in layers]
    if any(not -n <= layer < n for layer in given):  # -1 … -n count from the end; nothing wraps around
        raise ValueError(f"layers must be in [0, {n}) (or [-{n}, -1] from the end), got {given}")
    return sorted({layer + n if layer < 0 else layer for layer in given})


@contextmanager
def _hooked(handle: ModelHandle, installs: list) -> Iterator[None]:
    """Hold the lock, install ``(register_fn, hook)`` pairs, remove them all on exit."""
    with handle.lock:
        handles = []
        try:
            for register, hook in installs:
                handles.append(register(hook))
            yield
        finally:
            for h in handles:
                h.remove()


@contextmanager
def ablate(handle: ModelHandle, direction: torch.Tensor, layers: Iterable[int] | None = None) -> Iterator[None]:
    """Directional ablation of ``direction`` ``(d_model,)`` (normalised here).

    ``layers=None`` ablates at every block input, every attention/MLP output and the final-norm
    input (the anchor's setting); otherwise at the inputs and outputs of the given blocks only.
    """
    r = _Cast(_as_vector(handle, direction, unit=True))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return _project_out(x, r.like(x))

    chosen = _layers(handle, layers)
    installs: list = []
    blocks = handle.blocks
    for layer in chosen:
        installs.append((lambda h, m=blocks[layer]: m.register_forward_pre_hook(h, with_kwargs=True), _pre_hook(fn)))
        for writer in handle.writers(layer).values():
            installs.append((writer.register_forward_hook, _out_hook(fn)))
    if layers is None and handle.final_norm is not None:
        norm = handle.final_norm
        installs.append((lambda h: norm.register_forward_pre_hook(h, with_kwargs=True), _pre_hook(fn)))
    with _hooked(handle, installs):
        yield


@contextmanager
def add(handle: ModelHandle, vector: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Activation addition: ``x ← x + coeff·vector`` at the input of block ``layer``, every position.
    ``vector`` ``(d_model,)`` is used as is (not normalised), as in the anchor."""
    if not math.isfinite(float(coeff)):
        raise ValueError(f"the coefficient must be a finite number, got {coeff}")
    v = _Cast(_as_vector(handle, vector, unit=False) * float(coeff))
    block = handle.blocks[_layers(handle, [layer])[0]]

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x + v.like(x)

    with _hooked(handle, [(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), _pre_hook(fn))]):
        yield


@contextmanager
def scale_writers(handle: ModelHandle, direction: torch.Tensor, layers: Iterable[int] | None = None,
                  alpha: float = -1.0) -> Iterator[None]:
    """``y ← y + α r̂ (r̂ᵀ y)`` on the attention and MLP outputs of ``layers`` (all when None)."""
    r = _Cast(_as_vector(handle, direction, unit=True))
    a = float(alpha)

    def fn(y: torch.Tensor) -> torch.Tensor:
        rr = r.like(y)
        return y + a * (y @ rr).unsqueeze(-1) * rr

    installs = [(w.register_forward_hook, _out_hook(fn))
                for layer in _layers(handle, layers) for w in handle.writers(layer).values()]
    with _hooked(handle, installs):
        yield


@contextmanager
def add_rank1(handle: ModelHandle, direction: torch.Tensor, u: torch.Tensor, layer: int, role: str = "mlp",
              ) -> Iterator[None]:
    """``y ← y + r̂ (uᵀ x)`` on the ``role`` writer of block ``layer``, whose input is ``x`` ``(…, d_in)``
    and output ``y`` ``(…, d_model)``; ``u`` is ``(d_in,)``. The same function as the weight edit
    ``W′ = W + r̂ uᵀ``, with the writer's weights untouched (so it works on quantized storage too)."""
    r = _Cast(_as_vector(handle, direction, unit=True))
    module = handle.writers(_layers(handle, [layer])[0])[role]
    uu = _Cast(torch.as_tensor(u).detach().to(device=handle.device, dtype=torch.float64))

    def hook(mod, args, output):
        y = output[0] if isinstance(output, tuple) else output
        x = args[0].to(device=y.device, dtype=y.dtype)  # writers are called with their input first
        z = y + (x @ uu.like(y)).unsqueeze(-1) * r.like(y)
        return (z, *output[1:]) if isinstance(output, tuple) else z

    with _hooked(handle, [(module.register_forward_hook, hook)]):
        yield


def _residual_embeddings(handle: ModelHandle) -> list[nn.Embedding]:
    """Embedding tables that write into the residual stream (token, and learned positions if any)."""
    out = [handle.embedding]
    for m in handle.model.modules():
        if isinstance(m, nn.Embedding) and m is not handle.embedding and m.embedding_dim == handle.d_model:
            out.append(m)
    return out


def _orthogonal(weight: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """``weight`` with its ``axis`` (the d_model side) projected orthogonal to unit ``r`` (float64 maths, on
    the weight's device)."""
    w = weight.detach().double()
    r = r.to(w.device)
    if axis == 0:  # (d_model, …): rows live in the residual space
        w = w - torch.outer(r, r @ w)
    else:  # (…, d_model)
        w = w - torch.outer(w @ r, r)
    return w.to(weight.dtype)


@contextmanager
def orthogonalize(handle: ModelHandle, direction: torch.Tensor) -> Iterator[None]:
    """Weight orthogonalization against ``direction``: embeddings, attention-out and MLP-out weights
    (and their biases) of every block are replaced by ``W − r̂ r̂ᵀ W`` for the duration.

    The original ``Parameter`` objects are never modified: edited copies are swapped in and the
    originals put back on exit, so weights are bit-identical afterwards and a tied unembedding
    (``lm_head`` sharing the embedding matrix, e.g. SmolLM2) keeps reading the original matrix.
    Offloaded weights are edited where they are stored (:func:`refusal_lab.placement.replaced`).
    """
    r = _as_vector(handle, direction, unit=True)
    with handle.lock:
        edits: list[tuple[nn.Module, str, torch.Tensor]] = []
        for emb in _residual_embeddings(handle):
            edits.append((emb, "weight", _orthogonal(read_tensor(emb, "weight"), r, axis=1)))
        for layer in range(handle.n_layers):
            for w in handle.writers(layer).values():
                weight = getattr(w, "weight", None)
                if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() \
                        or type(weight) not in (torch.Tensor, nn.Parameter):
                    raise TypeError(f"cannot orthogonalize the quantized {type(w).__name__} of layer {layer}: "
                                    "weight editing needs plain float weights; use ablate() instead")
                conv1d = type(w).__name__ == "Conv1D"  # GPT-2: weight is (in, out)
                edits.append((w, "weight", _orthogonal(read_tensor(w, "weight"), r, axis=1 if conv1d else 0)))
                if getattr(w, "bias", None) is not None:
                    edits.append((w, "bias", _orthogonal(read_tensor(w, "bias").unsqueeze(1), r, axis=0).squeeze(1)))
        with replaced(edits):
            yield


@dataclass(frozen=True)
class Intervention:
    """A steering intervention a user can pick by name: ``apply(handle, direction, layer, coeff)`` → its
    context manager (``uses_layer``: the layer and coefficient apply)."""

    name: str
    label: str
    apply: Callable[[ModelHandle, torch.Tensor, "int | None", float], AbstractContextManager]
    uses_layer: bool = False


INTERVENTIONS: dict[str, Intervention] = {i.name: i for i in (
    Intervention("none", "None", lambda h, d, layer, coeff: nullcontext()),
    Intervention("ablate", "Ablate the direction (every layer)", lambda h, d, layer, coeff: ablate(h, d)),
    Intervention("add", "Add the direction (one layer × coefficient)",
                 lambda h, d, layer, coeff: add(h, d, layer, coeff), uses_layer=True),
    Intervention("orthogonalize", "Orthogonalized weights", lambda h, d, layer, coeff: orthogonalize(h, d)),
)}


def intervene(name: str, handle: ModelHandle, direction: torch.Tensor | None, *, layer: int | None = None,
              coeff: float = 1.0) -> AbstractContextManager:
    """The context of intervention ``name`` (:data:`INTERVENTIONS`) along ``direction`` ``(d_model,)``;
    ``layer``/``coeff`` for those that use them. ``ValueError`` for an unknown name or a missing argument."""
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}: choose from {', '.join(INTERVENTIONS)}")
    chosen = INTERVENTIONS[name]
    if name != "none" and direction is None:
        raise ValueError(f"intervention {name!r} needs a direction")
    if chosen.uses_layer and layer is None:
        raise ValueError(f"intervention {name!r} needs a layer")
    return chosen.apply(handle, direction, layer, coeff)


def count_hooks(handle: ModelHandle) -> int:
    """Number of forward (pre-)hooks installed anywhere in the model (0 when nothing is active)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())
