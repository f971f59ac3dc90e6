"""The repairs AIRD is compared against, by name (:data:`METHODS`): none, AIRD merged / adapter,
projection restore, a dense copy of O's layers, activation addition of O's direction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from refusal_lab.aird.repair import (AIRDError, Mode, Repair, applied, check_dense, copy_handle, edited_writers,
                              projection_restore, set_weight, writers)
from refusal_lab.interventions import intervene
from refusal_lab.models import ModelHandle, stored_weight, weight_as_out_in
from refusal_lab.placement import model_tensors, write_tensors


@dataclass(frozen=True)
class RepairMethod:
    """A repair by name: ``apply(original, compressed, repair, direction_raw)`` yields the repaired model
    (a generator for :func:`contextlib.contextmanager`); ``changed(compressed, repair)`` counts the stored
    numbers it changes or adds relative to ``compressed``."""

    name: str
    label: str
    apply: Callable[..., Iterator[ModelHandle]]
    changed: Callable[[ModelHandle, Repair], int]


def _none(original, compressed, repair, direction_raw) -> Iterator[ModelHandle]:
    yield compressed


def _aird(mode: Mode):
    def apply(original, compressed, repair, direction_raw) -> Iterator[ModelHandle]:
        with applied(compressed, replace(repair, mode=mode)) as h:
            yield h
    return apply


def _projection_restore(original, compressed, repair, direction_raw) -> Iterator[ModelHandle]:
    check_dense(compressed, repair.layers, "Projection restore")
    new = copy_handle(compressed, f"projection-restore(L={','.join(map(str, repair.layers))})",
                      [m for _, _, m in writers(compressed, repair.layers)])
    for (_, _, m_new), (_, _, m_o) in zip(writers(new, repair.layers), writers(original, repair.layers)):
        set_weight(m_new, projection_restore(stored_weight(m_new), stored_weight(m_o), repair.direction))
    yield new


def _dense_copy(original, compressed, repair, direction_raw) -> Iterator[ModelHandle]:
    check_dense(compressed, repair.layers, "Dense copy")
    new = copy_handle(compressed, f"dense-copy(L={','.join(map(str, repair.layers))})",
                      [compressed.blocks[layer] for layer in repair.layers])
    edits = []  # O's block tensors, written where the copy's are stored (offloaded ones too)
    for layer in repair.layers:
        for key, value in model_tensors(original.blocks[layer]):
            owner, _, name = key.rpartition(".")
            edits.append((new.blocks[layer].get_submodule(owner), name, value))
    write_tensors(edits)
    yield new


def _activation_addition(original, compressed, repair, direction_raw) -> Iterator[ModelHandle]:
    if direction_raw is None or repair.source_layer is None:
        raise AIRDError("activation addition needs O's raw direction and its source layer")
    with intervene("add", compressed, direction_raw, layer=repair.source_layer, coeff=1.0):
        yield compressed


def _whole_matrices(mods) -> int:
    return sum(weight_as_out_in(m).numel() for _, _, m in mods)


def _fit_size(repair: Repair) -> int:
    return 0 if repair.realign is None else repair.realign.numel()


def adapter_size(d_model: int, repair: Repair) -> int:
    """Numbers an adapter-form repair stores: r̂, α and u — none when it does nothing (α 0, no re-alignment)."""
    return 0 if not repair.alpha and repair.realign is None else d_model + 1 + _fit_size(repair)


REPAIR_METHODS: dict[str, RepairMethod] = {m.name: m for m in (
    RepairMethod("none", "No repair", _none, lambda c, rep: 0),
    RepairMethod("aird-merged", "AIRD (merged weights)", _aird("merged"),
                 lambda c, rep: _whole_matrices(edited_writers(c, rep))),
    RepairMethod("aird-adapter", "AIRD (adapter)", _aird("adapter"),
                 lambda c, rep: adapter_size(c.d_model, rep)),
    RepairMethod("projection-restore", "Projection restore r̂r̂ᵀ(W_O − W_C)", _projection_restore,
                 lambda c, rep: _whole_matrices(writers(c, rep.layers))),
    RepairMethod("dense-copy", "Dense copy of O's layer(s)", _dense_copy,
                 lambda c, rep: sum(p.numel() for layer in rep.layers for p in c.blocks[layer].parameters())),
    RepairMethod("activation-addition", "Activation addition of O's direction", _activation_addition,
                 lambda c, rep: c.d_model),
)}
Method = Literal["none", "aird-merged", "aird-adapter", "projection-restore", "dense-copy", "activation-addition"]
METHODS: tuple[Method, ...] = get_args(Method)
assert METHODS == tuple(REPAIR_METHODS)  # the type names every registered method, in order
METHOD_LABELS = {name: m.label for name, m in REPAIR_METHODS.items()}


def _method(name: str) -> RepairMethod:
    if name not in REPAIR_METHODS:
        raise AIRDError(f"unknown method {name!r}; choose from {METHODS}")
    return REPAIR_METHODS[name]


@contextmanager
def method_applied(method: Method, original: ModelHandle, compressed: ModelHandle, repair: Repair,
                   direction_raw: torch.Tensor | None = None) -> Iterator[ModelHandle]:
    """Yield the model that ``method`` (one of :data:`METHODS`) produces from ``compressed``.

    ``projection-restore`` and ``dense-copy`` use the repair's layers; ``activation-addition`` adds
    O's raw direction (``direction_raw``, its norm is the mean harmful–harmless gap) at the input of
    ``repair.source_layer`` for every prompt.
    """
    with contextmanager(_method(method).apply)(original, compressed, repair, direction_raw) as h:
        yield h


def changed_parameters(method: Method, compressed: ModelHandle, repair: Repair) -> int:
    """Number of stored numbers a method changes or adds relative to ``compressed``."""
    return _method(method).changed(compressed, repair)
