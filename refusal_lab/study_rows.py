"""Rows for tables of a study's results — one builder for the CLI, the pages, the report and bench —
and the measured verdict of a variant's repair (AIRD, distill or both)."""

from __future__ import annotations

import math

from refusal_lab.results import (Density, Drift, Evaluation, MethodEvaluation, RepairedEvaluation, RepairResult,
                                 StudyResults, Verdict)


def measured_verdict(original_eval: Evaluation, variant_eval: Evaluation, repaired_eval: Evaluation, drift: Drift,
                     set_name: str, method: str = "AIRD") -> Verdict:
    """:func:`refusal_lab.aird.repair_verdict` on the harmful evaluation set's refusal rates of O, C and C
    repaired by ``method`` (its label: AIRD, distill, AIRD + distill; ``drift``: :meth:`Study.drift` or
    :meth:`Study.diagnostic`, anything holding its ``recoverability``)."""
    from refusal_lab.aird import repair_verdict

    ppl_o, ppl_c = original_eval.perplexity, variant_eval.perplexity
    verdict = repair_verdict(drift.recoverability, original_eval.rate("harmful"), variant_eval.rate("harmful"),
                             repaired_eval.rate("harmful"), set_name=set_name,
                             perplexity_ratio=ppl_c / ppl_o if ppl_o and ppl_c else None, method=method)
    broken = [ev.rate("harmful", "broken") for ev in (original_eval, variant_eval, repaired_eval)]
    if all(b is not None for b in broken) and any(broken):  # refusals count only readable replies: say so
        verdict.verdict += (" Broken replies (neither refusal nor compliance) on {}: original {:.0%}, compressed "
                            "{:.0%}, repaired {:.0%}.".format(set_name, *broken))
    return verdict


def evaluation_row(label: str, ev: Evaluation, extra: dict | None = None, *, key: str = "model") -> dict:
    """The columns every table of evaluations shares — refusal, attack success (harmful replies that
    comply, broken ones not counted), broken replies per set, over-refusal, perplexity, KL to the
    original — for one evaluation, labelled ``label`` under ``key``, then ``extra``. Results stored
    before outcomes existed have no broken rates, and their ASR is 1 − refusal."""
    harmful, complied = ev.rate("harmful"), ev.rate("harmful", "complied")
    asr = complied if complied is not None else None if harmful is None else 1 - harmful
    r = {key: label, "refusal_harmful": harmful, "asr": asr, "broken_harmful": ev.rate("harmful", "broken"),
         "over_refusal_harmless": ev.rate("harmless"), "broken_harmless": ev.rate("harmless", "broken"),
         "over_refusal_borderline": ev.rate("borderline"), "broken_borderline": ev.rate("borderline", "broken"),
         "perplexity": ev.perplexity, "zero_shot_accuracy": ev.zero_shot_accuracy,
         "kl_to_original": ev.kl_to_original, "kl_multi_token": ev.kl_multi_token}
    r.update(extra or {})
    return r


def density_value(d: Density | None) -> float | None:
    """A density for a table: None where there is none, or where the repair writes no matrix (α 0: NaN)."""
    return None if d is None or math.isnan(d.density) else d.density


def method_row(label: str, ev: Evaluation) -> dict:
    """A row of the repair-method comparison (:meth:`refusal_lab.study.Study.compare_methods`; a plain
    evaluation, e.g. the original's, has no cost columns)."""
    m = ev if isinstance(ev, MethodEvaluation) else None
    if m is not None and m.error is not None:
        return {"method": label, "error": m.error[:60]}
    row = evaluation_row(label, ev, {"parameters_changed": m and m.parameters_changed,
                                     "density_before": m and density_value(m.density_before),
                                     "density_after": m and density_value(m.density_after)}, key="method")
    del row["asr"]  # the comparison table shows refusal only
    return row


def repaired_row(label: str, rep: RepairedEvaluation, verdict: Verdict | None = None) -> dict:
    """The row of a repaired variant: its evaluation and the AIRD repair's layers, α, re-aligned layer (when
    AIRD is part of it), the distill repair's mode and rank (when distill is), and its cost — densified
    weights, and where known parameters changed, density before/after and seconds."""
    r, d = rep.repair, rep.distill
    extra = {"aird_layers": None if r is None else r.layers, "aird_alpha": None if r is None else r.alpha,
             "aird_realign_layer": None if r is None else r.realign_layer,
             "aird_verdict": None if verdict is None else verdict.level,
             "densified_weights": rep.densified_weights}
    if d is not None:
        extra.update(distill_mode=d.mode, distill_rank=d.rank, distill_steps=d.steps)
    if rep.parameters_changed is not None:
        extra.update(parameters_changed=rep.parameters_changed, seconds=rep.seconds,
                     density_before=density_value(rep.density_before), density_after=density_value(rep.density_after))
    return evaluation_row(label, rep, extra)


def _repair_label(scheme: str, method: str | None) -> str:
    from refusal_lab.study_repairs import method_label

    return f"{scheme} + {method_label(method)}"


def repair_rows(result: RepairResult) -> list[dict]:
    """Original, compressed and repaired rows of one repair — one per method run, side by side, the
    verdict on the method run (the AIRD page's before/after table)."""
    repairs = result.repairs or {result.method or "aird": result.repaired}
    final = result.method or "aird"
    return [evaluation_row("original", result.original), evaluation_row(result.scheme, result.variant)] + [
        repaired_row(_repair_label(result.scheme, m), ev, result.verdict if m == final else None)
        for m, ev in repairs.items()]


def summary_rows(results: StudyResults) -> list[dict]:
    """One row per model (original, each variant, each repaired variant) for tables."""
    rows = [evaluation_row("original", results.original.evaluation)]
    for scheme, v in results.variants.items():
        rows.append(evaluation_row(scheme, v.evaluation, {"cosine_to_original": v.drift.cosine,
                                                          "source_layer": v.drift.variant.source.layer,
                                                          "recoverability": v.drift.recoverability.level}))
        final = v.repair_method or "aird"
        for m, ev in (v.repairs or ({final: v.repaired} if v.repaired is not None else {})).items():
            rows.append(repaired_row(_repair_label(scheme, m), ev, v.aird_verdict if m == final else None))
    return rows
