"""Rows for tables of a study's results — one builder for the CLI, the pages, the report and bench —
and the measured AIRD verdict of a variant."""

from __future__ import annotations

def measured_verdict(original_eval: dict, variant_eval: dict, repaired_eval: dict, drift: dict,
                     set_name: str) -> dict:
    """:func:`core.aird.repair_verdict` on the harmful evaluation set's refusal rates of O, C and C + AIRD
    (evaluations as :meth:`Study.evaluate` returns them; ``drift`` from :meth:`Study.drift` or
    :meth:`Study.diagnostic`: anything holding its ``recoverability``)."""
    from core.aird import repair_verdict

    rate = lambda ev: ev["sets"]["harmful"]["refusal_rate"]  # noqa: E731
    ppl_o, ppl_c = original_eval.get("perplexity"), variant_eval.get("perplexity")
    return repair_verdict(drift["recoverability"], rate(original_eval), rate(variant_eval), rate(repaired_eval),
                          set_name=set_name, perplexity_ratio=ppl_c / ppl_o if ppl_o and ppl_c else None)


def drift_cosine(drift: dict) -> float:
    """The cosine a table shows for a variant: between the selected directions when the variant's was
    selected, else between O's direction and the variant's candidate at O's source."""
    sel = drift.get("cosine_selected")
    return sel if sel is not None else drift["cosine_at_source"]


def evaluation_row(label: str, ev: dict, extra: dict | None = None, *, key: str = "model") -> dict:
    """The columns every table of evaluations shares — refusal, attack success, over-refusal, perplexity,
    KL to the original — for one evaluation (:meth:`core.study.Study.evaluate`), labelled ``label``
    under ``key``, then ``extra``."""
    sets = ev["sets"]
    r = {key: label, "refusal_harmful": sets["harmful"]["refusal_rate"],
         "asr": 1 - sets["harmful"]["refusal_rate"],
         "over_refusal_harmless": sets["harmless"]["refusal_rate"],
         "over_refusal_borderline": sets.get("borderline", {}).get("refusal_rate"),
         "perplexity": ev.get("perplexity"), "kl_to_original": ev.get("kl_to_original")}
    r.update(extra or {})
    return r


def method_row(label: str, ev: dict) -> dict:
    """A row of the repair-method comparison (:meth:`core.study.Study.compare_methods`)."""
    if "error" in ev:
        return {"method": label, "error": ev["error"][:60]}
    row = evaluation_row(label, ev, {"parameters_changed": ev.get("parameters_changed"),
                                     "density_before": (ev.get("density_before") or {}).get("density"),
                                     "density_after": (ev.get("density_after") or {}).get("density")},
                         key="method")
    del row["asr"]  # the comparison table shows refusal only
    return row


def summary_rows(results: dict) -> list[dict]:
    """One row per model (original, each variant, each repaired variant) for tables."""
    row = evaluation_row

    rows = [row("original", results["original"]["evaluation"])]
    for scheme, v in results["variants"].items():
        rows.append(row(scheme, v["evaluation"], {"cosine_to_original": drift_cosine(v["drift"]),
                                                  "source_layer": v["drift"]["variant"]["source"]["layer"],
                                                  "recoverability": v["drift"]["recoverability"]["level"]}))
        if "repaired" in v:
            rep = v["repaired"]["repair"]
            rows.append(row(f"{scheme} + AIRD", v["repaired"],
                            {"aird_layers": rep["layers"], "aird_alpha": rep["alpha"],
                             "aird_realign_layer": rep.get("realign_layer"),
                             "aird_verdict": v.get("aird_verdict", {}).get("level"),
                             "densified_weights": v["repaired"]["densified_weights"]}))
    return rows
