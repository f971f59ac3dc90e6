"""Refusal drift page: how far each compressed variant's refusal direction moved from the original's."""

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from refusal_lab.compression import SchemeError, VALID_FORMS, parse_scheme
from refusal_lab.session import completed_key, is_completed, mark_completed, mark_original_direction
from refusal_lab.results import DirectionSummary, Evaluation
from refusal_lab.study import evaluation_row
from pages._shared import (cancel_button, current_workspace, get_study, guarded, model_badge, require_handle,
                           replies_audit, run_study, settings_widgets, show_error, show_table)

CANCEL = "drift_cancelled"
COLORS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692"]

st.title("Refusal drift")
handle = require_handle()
ws = current_workspace(handle)
model_badge(handle)
st.markdown("Each model's refusal direction is the difference of mean activations on harmful vs harmless "
            "prompts (bundled **train** splits), selected on the **val** splits. Compression *drifts* it: "
            "the cosine to the original's direction drops, the best layer moves, refusal weakens.")

with st.expander("Evaluation settings", expanded=False):
    settings_widgets()

options = list(dict.fromkeys([*ws.variants, *st.session_state.get("drift_schemes", [])]))
c1, c2 = st.columns([3, 2])
schemes = c1.multiselect("Variants", options, default=options,
                         help="variants made on the Compress page; add another scheme on the right")
extra = c2.text_input("Add a scheme", placeholder="e.g. wanda:0.5, magnitude:0.5, bnb-nf4")
if extra.strip():
    try:
        s = str(parse_scheme(extra))
        if s not in schemes:
            schemes.append(s)
    except SchemeError as e:
        show_error(f"Scheme `{extra}` is not valid", e.problem, f"use one of: {VALID_FORMS}")
if not schemes:
    st.info("Compress the model on the **Compress** page (e.g. `wanda:0.5`) or add a scheme above.")
    st.stop()
st.session_state["drift_schemes"] = schemes

ok, study = guarded("Opening the study", lambda: get_study(handle),
                    fix="check the run store folder (REFUSAL_LAB_RUNS) and the study pipeline (refusal_lab/study.py).")
if not ok:
    st.stop()


def gather(study, schemes):
    """Everything the page shows, from the study's stages (computed or loaded from the run store)."""
    out = {"original": {"directions": study.directions("original"), "evaluation": study.evaluate("original")},
           "variants": {}}
    for s in schemes:
        out["variants"][s] = {"drift": study.drift(s), "directions": study.directions(s),
                              "evaluation": study.evaluate(s)}
    return out


memo_key = ("drift", study.id, tuple(schemes))
done_key = completed_key("drift", study=study.id, schemes=sorted(schemes))
results = ws.values.get(memo_key)
auto = results is None and is_completed(study, done_key)  # stored: load it (computes nothing)
clicked = st.button("Run the drift study", type="primary", disabled=results is not None or auto,
                    help="computes only the stages not stored yet (directions, drift, evaluation)")
if clicked or auto:
    st.session_state[CANCEL] = False
    stop = cancel_button(CANCEL) if clicked else st.empty()
    ok, results = run_study(handle, study, lambda s: gather(s, schemes),
                            what="Drift study" if clicked else "Loading the stored drift study", cancel_key=CANCEL,
                            planned=study.planned_stages(schemes, aird=False) if clicked else None)
    stop.empty()
    if ok:
        ws.values[memo_key] = results
        mark_completed(study, done_key, "drift", {"schemes": schemes})
        mark_original_direction(study, results["original"]["directions"])
        # the study may have compressed new schemes: share them with the other pages
        ws.keep_variants_of(study)
        if clicked:
            st.rerun()  # redraw with the button disabled (a stored study was loaded with it disabled already)
if st.session_state.get(CANCEL):
    st.info("Drift study cancelled; every stage finished before the cancel is stored.")
    st.session_state[CANCEL] = False
if results is None:
    st.info(f"Not computed yet for {', '.join(f'`{s}`' for s in schemes)}: click **Run the drift study**. "
            "Stages already stored in the run store are reused.")
    st.stop()

# ------------------------------------------------------------------------------------------------
d_o = results["original"]["directions"]
src_o = d_o.selected
variants = results["variants"]

box = st.container(key="drift_results")
with box:
    fig = go.Figure()
    for i, (s, v) in enumerate(variants.items()):
        cos = [math.nan if c is None else c for c in v["drift"].cosine_per_layer]
        fig.add_scatter(x=list(range(len(cos))), y=cos, mode="lines+markers", name=s,
                        line=dict(color=COLORS[i % len(COLORS)]))
    fig.add_vline(x=src_o[1], line=dict(color="grey", dash="dash"),
                  annotation_text=f"original's source layer {src_o[1]}")
    fig.update_layout(title=f"Cosine similarity to the original's candidates, per layer (position {src_o[0]})",
                      xaxis_title="layer", yaxis_title="cosine", yaxis_range=[-0.05, 1.05], height=380, showlegend=True,
                      margin=dict(l=10, r=10, t=50, b=10), legend_title="variant")
    st.plotly_chart(fig, width="stretch", key="cosine_chart")

    shown = {"refusal_harmful": "refusal (harmful)", "asr": "ASR", "broken_harmful": "broken (harmful)",
             "over_refusal_harmless": "over-refusal (harmless)", "broken_harmless": "broken (harmless)",
             "over_refusal_borderline": "over-refusal (borderline)", "perplexity": "perplexity",
             "zero_shot_accuracy": "zero-shot accuracy", "kl_to_original": "KL to original",
             "kl_multi_token": "KL over 16 tokens"}

    def ev_row(name: str, ev: Evaluation) -> dict:
        row = evaluation_row(name, ev)
        return {label: row[k] for k, label in shown.items()}

    def src_row(info: DirectionSummary) -> dict:
        src, q = info.source, info.quality
        return {"source layer": src.layer, "position": src.position,
                "token": "—" if src.token is None else repr(src.token),
                "bypass": q.bypass, "induce": q.induce, "KL": q.kl}

    first = next(iter(variants.values()))["drift"]
    rows = [{"model": "original", **src_row(first.original), "cosine to original": 1.0,
             **ev_row("original", results["original"]["evaluation"]), "recoverability": "—"}]
    for s, v in variants.items():
        rows.append({"model": s, **src_row(v["drift"].variant), "cosine to original": v["drift"].cosine,
                     **ev_row(s, v["evaluation"]), "recoverability": v["drift"].recoverability.level})
    numeric = ("bypass", "induce", "KL", "cosine to original", "refusal (harmful)", "ASR", "broken (harmful)",
               "over-refusal (harmless)", "broken (harmless)", "over-refusal (borderline)", "perplexity",
               "zero-shot accuracy", "KL to original", "KL over 16 tokens")
    st.subheader("Source layer, direction quality and refusal")
    if any(v["directions"].selected is None for v in variants.values()):
        st.caption("Variants without a source layer: their own direction was not selected (Evaluation settings); "
                   "their cosine is the original's direction against their candidate at the original's source.")
    df = pd.DataFrame(rows)
    for c in numeric:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    show_table(df, decimals={"perplexity": 2}, hide_index=True, width="stretch")
    st.caption("bypass = mean refusal score on harmful val prompts with the direction ablated (lower = the "
               "direction carries refusal); induce = on harmless prompts with it added (higher = stronger); KL = "
               "next-token KL on harmless prompts under ablation. Refusal rates on the test sets "
               f"({results['original']['evaluation'].sets['harmful'].n} prompts each); every reply is refused, "
               "complied with (ASR on harmful prompts) or broken — empty, looping or no language, counted as "
               "neither.")

    replies_audit({"original": results["original"]["evaluation"],
                   **{s: v["evaluation"] for s, v in variants.items()}}, "drift_audit")

    sets = ["harmful", "harmless", "borderline"]
    bars = go.Figure()
    for i, (name, ev) in enumerate([("original", results["original"]["evaluation"]),
                                    *[(s, v["evaluation"]) for s, v in variants.items()]]):
        ys = [ev.rate(k) for k in sets]
        bars.add_bar(x=sets, y=ys, name=name, marker_color="#7f7f7f" if name == "original" else
                     COLORS[(i - 1) % len(COLORS)])
    bars.update_layout(barmode="group", title="Refusal rate per variant", yaxis_title="refusal rate",
                       yaxis_range=[0, 1], height=320, margin=dict(l=10, r=10, t=50, b=10))
    st.plotly_chart(bars, width="stretch", key="refusal_bars")

    scores_tab, bands_tab = st.tabs(["Candidate scores", "Projection bands"], key="drift_detail",
                                    on_change="rerun")
    if scores_tab.open:  # only the selected tab is computed and sent (a page switch draws one chart)
        with scores_tab:
            scored = [s for s, v in variants.items() if v["directions"].selected is not None]
            which = st.selectbox("Candidate scores of", ["original", *scored], key="heatmap_of",
                                 help="variants appear here when their own direction was selected (Evaluation "
                                      "settings)")
            ds = d_o if which == "original" else variants[which]["directions"]
            toks = ds.metadata.get("post_instruction_tokens") or []
            ylabels = [f"{p} {toks[p]!r}" if toks and -len(toks) <= p < 0 else str(p) for p in ds.positions]
            metric = st.radio("Score", ["induce", "bypass", "KL"], horizontal=True, key="heatmap_score",
                              help="The search scores induce for every candidate, bypass only for those that "
                                   "induce refusal, KL until one passes; blank cells were not needed.")
            z = getattr(ds, metric.lower()).tolist()
            heat = go.Figure(go.Heatmap(z=[[None if x != x else x for x in row] for row in z], y=ylabels,
                                        x=list(range(ds.n_layers)), colorscale="RdBu_r", colorbar_title=metric))
            if ds.selected is not None:
                heat.add_scatter(x=[ds.selected[1]], y=[ylabels[ds.pos_index(ds.selected[0])]], mode="markers",
                                 marker=dict(symbol="x", size=14, color="black"), name="selected", showlegend=False)
            heat.update_layout(title=f"{metric} score per candidate — {which} (× = selected)", xaxis_title="layer",
                               yaxis_title="position", height=360, margin=dict(l=10, r=10, t=50, b=10))
            st.plotly_chart(heat, width="stretch", key="heatmap")
    if bands_tab.open:
        with bands_tab:
            pick = st.selectbox("Projection bands of", list(variants), key="bands_of")
            pr = variants[pick]["drift"].projections
            band = go.Figure()
            for who, dash in (("original", "solid"), ("variant", "dot")):
                p = pr[who]
                x = list(range(len(p.harmful_mean)))
                for kind, color in (("harmful", "220,40,40"), ("harmless", "40,90,220")):
                    m, sd = getattr(p, f"{kind}_mean"), getattr(p, f"{kind}_std")
                    label = f"{kind} · {'original' if who == 'original' else pick}"
                    band.add_scatter(x=x + x[::-1], y=[a + b for a, b in zip(m, sd)] + [a - b for a, b in zip(m, sd)][::-1],
                                     fill="toself", fillcolor=f"rgba({color},{0.15 if who == 'original' else 0.08})",
                                     line=dict(width=0), hoverinfo="skip", showlegend=False)
                    band.add_scatter(x=x, y=m, mode="lines", name=label, line=dict(color=f"rgb({color})", dash=dash))
            band.update_layout(title="Projection on the original's direction (mean ± std per layer)",
                               xaxis_title="layer (last = final norm input)", yaxis_title="projection", height=360,
                               margin=dict(l=10, r=10, t=50, b=10))
            st.plotly_chart(band, width="stretch", key="bands")
    for name, v in variants.items():
        rec = v["drift"].recoverability
        (st.success if rec.level == "recoverable" else st.warning)(
            f"**{name}** — predicted from projections (the AIRD page measures it): {rec.verdict}")
    for w in d_o.warnings:
        st.caption(f"original direction: {w}")
