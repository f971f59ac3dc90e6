"""A study's repair methods, by name (:data:`REPAIRS`): ``aird`` (the paper's training-free edit, our
reconstruction: :mod:`refusal_lab.aird`), ``distill`` (a LoRA trained with the original as teacher:
:mod:`refusal_lab.distill`) and ``aird+distill`` (AIRD first, then distill trained from the AIRD-repaired
model). One interface for the study, the ``aird``/``study`` commands and the AIRD page.

The distill repair is a cached, resumable stage of a :class:`~refusal_lab.study.Study`, in two parts:

* ``distill teacher replies`` — the original's greedy replies to the bundled train prompts (JSON), shared
  by every scheme and by both distill methods; keyed by the original's fingerprint, the settings that
  shape the data and :data:`~refusal_lab.distill.DISTILL_VERSION`;
* ``distill SCHEME`` / ``aird+distill SCHEME`` — the trained LoRA (safetensors; the
  :class:`~refusal_lab.distill.DistillResult` as the entry's JSON meta; never pickle), keyed by the
  original's fingerprint, the scheme, the :class:`~refusal_lab.distill.DistillConfig`, the teacher replies'
  digest, the version and, for ``aird+distill``, the AIRD repair it starts from.

Each part is written atomically when it is done: a run killed during training finds the teacher's replies
stored and trains again; one killed later finds the adapter too and only evaluates. The repaired model is
evaluated like AIRD's (refusal, over-refusal, perplexity, KL, zero-shot), with the repair's parameters
changed, density and seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from refusal_lab.results import Density, Evaluation, MethodEvaluation, RepairedEvaluation, RepairResult, Verdict

if TYPE_CHECKING:  # the study imports this module; torch-heavy imports stay lazy
    from refusal_lab.distill import DistillConfig, Distilled
    from refusal_lab.distill_data import TeacherReplies
    from refusal_lab.models import ModelHandle
    from refusal_lab.study import Study

__all__ = ["REPAIRS", "METHOD_NAMES", "RepairMethod", "check_method", "distill_config", "teacher_replies",
           "distilled", "evaluate_method", "method_label", "planned_stages", "repair_result", "run_repairs",
           "variant_repairs", "compare_methods"]

DATA_STAGE = "distill teacher replies"


@dataclass(frozen=True)
class RepairMethod:
    """A repair by name: its row ``label`` (after the scheme: ``wanda:0.5 + AIRD``), whether it needs
    AIRD (``uses_aird``) and trains a distill repair (``uses_distill``), what it shows (``shows``: the
    methods whose evaluations its table has, itself last), its ``evaluate(study, scheme)`` and the
    ``stages(scheme)`` it computes, in order."""

    name: str
    label: str
    uses_aird: bool
    uses_distill: bool
    shows: tuple[str, ...]
    evaluate: Callable[["Study", str], RepairedEvaluation]
    stages: Callable[[str], list[str]]


def _aird_evaluation(study: "Study", scheme: str) -> RepairedEvaluation:
    return study.evaluate_repaired(scheme)


def _distill_evaluation(method: str) -> Callable[["Study", str], RepairedEvaluation]:
    def evaluate(study: "Study", scheme: str) -> RepairedEvaluation:
        return evaluate_distilled(study, scheme, method)
    return evaluate


REPAIRS: dict[str, RepairMethod] = {m.name: m for m in (
    RepairMethod("aird", "AIRD", True, False, ("aird",), _aird_evaluation,
                 lambda s: [f"aird {s}", f"evaluate {s}+aird"]),
    RepairMethod("distill", "distill", False, True, ("distill",), _distill_evaluation("distill"),
                 lambda s: [DATA_STAGE, f"distill {s}", f"evaluate {s}+distill"]),
    RepairMethod("aird+distill", "AIRD + distill", True, True, ("aird", "aird+distill"),
                 _distill_evaluation("aird+distill"),
                 lambda s: [f"aird {s}", f"evaluate {s}+aird", DATA_STAGE, f"aird+distill {s}",
                            f"evaluate {s}+aird+distill"]),
)}
METHOD_NAMES: tuple[str, ...] = tuple(REPAIRS)


def method(name: str) -> RepairMethod:
    """The repair method ``name``; an unknown one is a ValueError naming the choices."""
    if name not in REPAIRS:
        raise ValueError(f"unknown repair method {name!r}: use {' | '.join(METHOD_NAMES)}")
    return REPAIRS[name]


def method_label(name: str | None) -> str:
    """The label of a method's rows (``None``: AIRD, as stored before methods existed)."""
    return method(name or "aird").label


def check_method(name: str, aird: str | None, distill: dict | None) -> None:
    """Raise ValueError for a method that does not exist, one needing AIRD without ``aird`` settings, or
    distill settings for a method without distill or that :func:`~refusal_lab.distill.config_from` refuses."""
    m = method(name)
    if m.uses_aird and m.uses_distill and not aird:
        raise ValueError(f"repair method {name} starts with AIRD: set aird (auto, manual or top:K)")
    if distill is not None:
        if not m.uses_distill:
            raise ValueError(f"distill settings need a method that trains one (distill or aird+distill), not {name}")
        distill_config(distill)


def distill_config(overrides: dict | None) -> "DistillConfig":
    """The :class:`~refusal_lab.distill.DistillConfig` of a spec's ``distill`` settings (checked)."""
    from refusal_lab.distill import config_from

    return config_from(overrides)


# ----------------------------------------------------------------------------------------------
# The distill stage
# ----------------------------------------------------------------------------------------------

def teacher_replies(study: "Study") -> "TeacherReplies":
    """The original's greedy replies to the bundled train prompts (cached stage :data:`DATA_STAGE`)."""
    from refusal_lab.distill import distill_data
    from refusal_lab.distill_data import TeacherReplies

    cfg = distill_config(study.spec.distill)
    return study._cached(DATA_STAGE, _data_parts(study, cfg),
                         lambda: distill_data(study.original, cfg, progress=study._progress(DATA_STAGE)),
                         codec=TeacherReplies)


def _data_parts(study: "Study", cfg: "DistillConfig") -> tuple:
    """The cache-key parts of :func:`teacher_replies`: the original and what shapes the data."""
    from refusal_lab.distill import DISTILL_VERSION

    shape = {"kinds": cfg.kinds, "per_kind": cfg.per_kind, "reply_tokens": cfg.reply_tokens,
             "max_prompt_tokens": cfg.max_prompt_tokens}
    if cfg.answered_only:  # the stored replies are filtered by it (absent when empty: older keys stay)
        shape["answered_only"] = cfg.answered_only
    return (study.original_fingerprint(), shape, DISTILL_VERSION)


def aird_seconds(study: "Study", scheme: str) -> float | None:
    """Seconds the stored AIRD repair of ``scheme`` took (calibration and fit; the computing study's when copied)."""
    return study.stage_seconds(f"aird {scheme}", study._repair_parts(scheme))


@contextmanager
def _student(study: "Study", scheme: str, name: str) -> Iterator["ModelHandle"]:
    """The model distill trains from: the variant, or for a method that starts with AIRD the AIRD-repaired
    variant (in AIRD's mode: a merged copy, or the variant under AIRD's hooks for the block)."""
    from refusal_lab.aird import applied

    if not method(name).uses_aird:
        yield study.variant(scheme)
        return
    with applied(study.variant(scheme), study.repair(scheme)) as h:
        yield h


def _aird_key(study: "Study", scheme: str, name: str) -> tuple:
    return study.repair(scheme).key() if method(name).uses_aird else ()


def distilled(study: "Study", scheme: str, name: str = "distill") -> "Distilled":
    """The trained distill repair of ``scheme`` by method ``name`` (``distill`` or ``aird+distill``;
    cached stage ``NAME SCHEME``). Its ``seconds_data`` is the teacher replies' stage time."""
    from refusal_lab.distill import DISTILL_VERSION, distill

    wanted = distill_config(study.spec.distill)
    cfg = dataclasses.replace(wanted, offset=0.0)  # trained without the offset: it never enters training, so
    #                                                trying offsets trains once
    data = teacher_replies(study)
    found = study.directions("original") if wanted.needs_source_layer() or wanted.needs_direction() else None
    source = found.selected[1] if wanted.needs_source_layer() else None
    direction = found.direction if cfg.needs_direction() else None
    stage = f"{name} {scheme}"

    def compute() -> "Distilled":
        with _student(study, scheme, name) as student:
            _, repair = distill(study.original, student, cfg, source_layer=source, data=data, direction=direction,
                                states_progress=study._progress(f"{stage}: teacher states"),
                                own_progress=study._progress(f"{stage}: own replies"),
                                progress=study._progress(f"{stage}: training"))
        repair.result.seconds_data = round(study.stage_seconds(DATA_STAGE, _data_parts(study, cfg)) or 0.0, 2)
        return repair

    parts = (study.original_fingerprint(), scheme, name, cfg.key_json(), source, data.key(), DISTILL_VERSION)
    if direction is not None:  # the selected candidate: the original's direction search is part of the key
        parts += (list(found.selected),)
    trained = study._cached(stage, parts + _aird_key(study, scheme, name), compute, "distill")
    return trained.with_offset(wanted.offset, found.direction) if wanted.offset else trained


def _base(mod):
    """The stored linear under a peft LoRA wrapper (the module itself when not wrapped)."""
    return mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod


def _density(handle: "ModelHandle", names: list[str]) -> Density:
    from refusal_lab.distill import density

    return density([_base(handle.model.get_submodule(n)) for n in names])


def _aird_writer_names(study: "Study", scheme: str) -> list[str]:
    from refusal_lab.aird import edited_writers

    c = study.variant(scheme)
    names = {id(m): n for n, m in c.model.named_modules()}
    return [names[id(m)] for _, _, m in edited_writers(c, study.repair(scheme))]


def aird_parameters(study: "Study", scheme: str, ev: RepairedEvaluation) -> int:
    """Stored numbers the AIRD repair of ``scheme`` changes or adds, without its model: its edited matrices
    (merged: their size is ``ev``'s density total), or r̂, α and the re-alignment's u (adapter) — what
    :func:`refusal_lab.aird.changed_parameters` counts on the model."""
    rep = study.repair(scheme)
    if rep.mode == "merged":
        return ev.density_before.total if ev.density_before is not None else 0
    from refusal_lab.aird.baselines import adapter_size

    return adapter_size(rep.direction.numel(), rep)


def evaluate_distilled(study: "Study", scheme: str, name: str = "distill") -> RepairedEvaluation:
    """The evaluation of ``scheme`` repaired by ``name`` (``distill`` | ``aird+distill``), as AIRD's repaired
    model is evaluated, with the repair's parameters changed, density (of every matrix it writes to:
    distill's targets, and AIRD's writers for aird+distill) and seconds (cached stage
    ``evaluate SCHEME+NAME``)."""
    from refusal_lab.aird import changed_parameters

    rep = distilled(study, scheme, name)
    r = rep.result
    aird = study.repair(scheme) if method(name).uses_aird else None

    def compute() -> RepairedEvaluation:
        c = study.variant(scheme)
        names = list(dict.fromkeys(r.targets + (_aird_writer_names(study, scheme) if aird else [])))
        before = _density(c, names)
        params = r.trainable_parameters if r.config.mode == "adapter" else r.density_before.total
        seconds = r.seconds
        if aird is not None:
            params += changed_parameters(f"aird-{aird.mode}", c, aird)
            seconds += aird_seconds(study, scheme) or 0.0
        with _student(study, scheme, name) as student:
            h = rep.apply(student)
            after = _density(h, names)
            aird_summary = None if aird is None else aird.summary()
            return study._evaluate_handle(h, f"{scheme}+{name}", study._original_harmless_logits(),
                                          RepairedEvaluation, repair=aird_summary, density_before=before,
                                          density_after=after, densified_weights=after.nonzero - before.nonzero,
                                          method=name, distill=r.summary(), parameters_changed=params,
                                          seconds=round(seconds, 2))

    from refusal_lab.distill import DISTILL_VERSION

    # the code version too: an evaluation stored by a version whose repaired model ran wrong is not reused
    key = study._eval_key(f"{scheme}+{name}") + rep.key() + _aird_key(study, scheme, name) + (DISTILL_VERSION,)
    return study._cached(f"evaluate {scheme}+{name}", key, compute, codec=RepairedEvaluation)


def compare_methods(study: "Study", scheme: str, methods: tuple[str, ...] | None = None) -> dict[str, MethodEvaluation]:
    """Every repair of :data:`refusal_lab.aird.METHODS` on ``scheme`` — AIRD merged and adapter and the
    repairs it is compared against, each evaluated with its parameters changed and density (those that
    cannot apply to this variant, e.g. weight edits on bitsandbytes layers, are reported with the reason)."""
    from refusal_lab.aird import METHODS, AIRDError, changed_parameters, method_applied, writer_density

    methods = tuple(methods or METHODS)
    rep = study.repair(scheme)
    out = {}
    for name in methods:
        def compute(name=name):
            c = study.variant(scheme)
            ref = study._original_harmless_logits()
            edited = rep if name.startswith("aird") else rep.layers
            before = writer_density(c, edited)
            try:
                with method_applied(name, study.original, c, rep, study.directions("original").direction) as h:
                    ev = study._evaluate_handle(h, f"{scheme}: {name}", ref, MethodEvaluation, method=name,
                                                density_before=before,
                                                parameters_changed=changed_parameters(name, c, rep))
                    ev.density_after = writer_density(h, edited)
            except AIRDError as e:
                return MethodEvaluation(method=name, error=str(e))
            return ev

        key = study._eval_key(f"{scheme}:{name}") + rep.key()
        out[name] = study._cached(f"method {scheme}: {name}", key, compute, codec=MethodEvaluation)
    return out


# ----------------------------------------------------------------------------------------------
# What a study, a page and the CLI ask
# ----------------------------------------------------------------------------------------------

def evaluate_method(study: "Study", scheme: str, name: str) -> RepairedEvaluation:
    """The repaired evaluation of ``scheme`` by method ``name`` (computing what is not stored)."""
    return method(name).evaluate(study, scheme)


def with_costs(study: "Study", scheme: str, name: str, ev: RepairedEvaluation) -> RepairedEvaluation:
    """``ev`` with its parameters changed and seconds (AIRD's evaluations do not store them: they are
    filled in from the repair and its stage, for views; others are returned as they are)."""
    if ev.parameters_changed is not None:
        return ev
    return dataclasses.replace(ev, method=name, parameters_changed=aird_parameters(study, scheme, ev),
                               seconds=_round(aird_seconds(study, scheme)))


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def variant_repairs(study: "Study", scheme: str, name: str | None = None) -> dict[str, RepairedEvaluation]:
    """Every evaluation method ``name`` (default: the spec's) shows for ``scheme``, by method, in order."""
    m = method(name or study.spec.repair_method)
    return {shown: evaluate_method(study, scheme, shown) for shown in m.shows}


def run_repairs(study: "Study", scheme: str, budget: bool = False) -> None:
    """The spec's repair method's stages for ``scheme`` (``budget``: and AIRD's budget curve, for methods
    that use AIRD)."""
    m = method(study.spec.repair_method)
    variant_repairs(study, scheme)
    if budget and m.uses_aird:
        study.budget(scheme)


def planned_stages(study: "Study", scheme: str, budget: bool = False, name: str | None = None) -> list[str]:
    """The repair stages :func:`run_repairs` goes through for ``scheme``, by name."""
    m = method(name or study.spec.repair_method)
    return m.stages(scheme) + ([f"budget {scheme}"] if budget and m.uses_aird else [])


def verdict(study: "Study", original: Evaluation, variant: Evaluation, repaired: Evaluation, drift,
            name: str) -> Verdict:
    """The measured verdict of method ``name``'s repair (:func:`refusal_lab.study_rows.measured_verdict`)."""
    from refusal_lab.study_rows import measured_verdict

    return measured_verdict(original, variant, repaired, drift, study.eval_sets()["harmful"].name,
                            method=method_label(name))


def fill_variant(study: "Study", scheme: str, v, original: Evaluation) -> None:
    """Put the spec's repair into a :class:`~refusal_lab.results.VariantResult`: the method's evaluation and
    verdict, and for a method other than AIRD its name and every evaluation it shows (AIRD alone stays as
    it was stored before methods existed)."""
    name = study.spec.repair_method
    repairs = variant_repairs(study, scheme)
    v.repaired = repairs[name]
    v.aird_verdict = verdict(study, original, v.evaluation, v.repaired, v.drift, name)
    if name != "aird":
        v.repair_method, v.repairs = name, repairs


def repair_result(study: "Study", scheme: str, budget_layers: int = 8) -> RepairResult:
    """The spec's repair of ``scheme`` with what it is judged by (the AIRD page's view): every evaluation
    the method shows, with parameters changed and seconds, the verdict on the method run, and AIRD's
    budget curve for methods that use AIRD."""
    name = study.spec.repair_method
    original, variant, drift = study.evaluate("original"), study.evaluate(scheme), study.drift(scheme)
    repairs = {k: with_costs(study, scheme, k, ev) for k, ev in variant_repairs(study, scheme).items()}
    repaired = repairs[name]
    budget = study.budget(scheme, max_layers=budget_layers) if method(name).uses_aird else []
    return RepairResult(scheme=scheme, original=original, variant=variant, drift=drift, repaired=repaired,
                        verdict=verdict(study, original, variant, repaired, drift, name), budget=budget,
                        method=name, repairs=repairs)
