"""AIRD page: repair a compressed variant's refusal with the original's direction; before/after."""

import dataclasses
import io
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from refusal_lab.codec import to_json
from refusal_lab.study_repairs import METHOD_NAMES, REPAIRS
from refusal_lab.session import completed_key, is_completed, mark_completed, mark_original_direction, original_source_layer
from pages._shared import (cancel_button, current_workspace, get_study, guarded, model_badge, require_handle,
                           replies_audit, run_study, settings_widgets, show_error, show_table)

CANCEL = "aird_cancelled"
BUDGET_LAYERS = 6

st.title("AIRD")
handle = require_handle()
ws = current_workspace(handle)
model_badge(handle)
st.markdown("**AIRD** re-induces the *original* model's refusal direction r̂ in a compressed model by editing "
            "the residual writers of a few layers: W′ = W + α r̂ r̂ᵀ W (our reconstruction of Chhabra & Khalili "
            "2025, see `refusal_lab/aird/`). *merged* edits the weights (the edited matrices become dense); *adapter* "
            "leaves them untouched and applies the same edit at run time. Our addition, the *fitted "
            "re-alignment*, is a second rank-1 edit W + r̂ uᵀ of the MLP output before the source layer, with u "
            "solved in closed form on the bundled train prompts so that the compressed model's projections on r̂ "
            "match the original's — it can pull harmless prompts back that compression pushed toward refusal. "
            "**distill** is a trained repair instead: a small LoRA adapter on the compressed model, trained so "
            "that its next-token distributions match the original's on the original's own replies to the "
            "bundled train prompts (`refusal_lab/distill.py`); **aird+distill** trains it from the AIRD-repaired "
            "model.")

with st.expander("Evaluation settings", expanded=False):
    settings_widgets()

options = list(dict.fromkeys([*ws.variants, *st.session_state.get("drift_schemes", [])]))
if not options:
    st.info("Make a compressed variant first: **Compress** page (e.g. `wanda:0.5`).")
    st.stop()
ok, study = guarded("Opening the study", lambda: get_study(handle),
                    fix="check the run store folder (REFUSAL_LAB_RUNS) and the study pipeline (refusal_lab/study.py).")
if not ok:
    st.stop()
source_layer = original_source_layer(study)

METHOD_HELP = {"aird": "AIRD: the training-free edit along the original's refusal direction",
               "distill": "distill: a LoRA trained with the original as teacher",
               "aird+distill": "AIRD, then distill trained from the AIRD-repaired model"}
c0, c1, c2, c3, c4 = st.columns([2, 2, 2, 1, 1])
method = c0.radio("Method", METHOD_NAMES, format_func=lambda m: REPAIRS[m].label, key="aird_method",
                  help="; ".join(METHOD_HELP.values()))
scheme = c1.selectbox("Variant", options)
no_aird = not REPAIRS[method].uses_aird
how = c2.radio("Repair layers and α", ["auto-calibrated", "manual"], horizontal=True, disabled=no_aird,
               help="auto: the layer set, α and re-alignment with the most refusal on harmful val prompts minus "
                    "over-refusal on harmless ones, keeping over-refusal (+2 points) and KL on harmless val "
                    "prompts in check")
mode = c3.radio("Mode", ["merged", "adapter"], horizontal=False, disabled=no_aird)
realign = c4.radio("Re-alignment", ["auto", "on", "off"], horizontal=False, disabled=no_aird,
                   help="the fitted rank-1 edit of the MLP output before the source layer: auto = calibration "
                        "decides (manual layers and α: off), on = always, off = never")
aird = {"aird": "auto", "aird_mode": mode, "aird_alpha": None, "aird_layers": None, "aird_realign": realign}
if how == "manual" and not no_aird:
    a, b = st.columns([3, 1])
    default = [x for x in ([source_layer - 1, source_layer] if source_layer is not None else [0]) if x >= 0]
    layers = a.multiselect("Repair layers", list(range(handle.n_layers)), default=default,
                           help="default: the original's source layer and the one before")
    alpha = b.number_input("α", min_value=0.0, max_value=20.0, value=2.0, step=0.5)
    if not layers:
        show_error("No repair layer", "manual mode needs at least one layer.", "pick the layers to edit.")
        st.stop()
    aird.update(aird="manual", aird_alpha=float(alpha), aird_layers=sorted(int(x) for x in layers))
if REPAIRS[method].uses_distill:
    from refusal_lab.distill import DistillConfig

    base = DistillConfig()  # the defaults the page starts from (settings equal to them are not sent)
    with st.expander("Distill settings", expanded=False):
        d1, d2, d3, d4, d5 = st.columns(5)
        distill = {"mode": d1.radio("Distill mode", ["adapter", "merged"], key="distill_mode",
                                    help="adapter: LoRA kept separate (compressed weights untouched); merged: "
                                         "folded into the weights (they become dense)"),
                   "rank": int(d2.number_input("LoRA rank", 1, 64, base.rank, key="distill_rank")),
                   "steps": int(d3.number_input("Training steps", 1, 1000, base.steps, key="distill_steps")),
                   "per_kind": int(d4.number_input("Train prompts per kind (0 = all)", 0, 1000, 0,
                                                   key="distill_per_kind")) or None,
                   "offset": float(d5.number_input("Offset", 0.0, 0.5, base.offset, step=0.01, format="%.2f",
                                                   key="distill_offset",
                                                   help="after training, the stream leaving the source block is "
                                                        "shifted by −offset × the original's refusal direction "
                                                        "(lowers over-refusal and refusal); changing it does not "
                                                        "train again"))}
        st.caption("Trained on the original's greedy replies (first 32 tokens) to the bundled train prompts — "
                   "harmful, harmless, borderline, the everyday-task pool and the contrast pool (benign prompts "
                   "with alarming words, where the original answers them); never a test or public set.")
    defaults = {"mode": base.mode, "rank": base.rank, "steps": base.steps, "per_kind": base.per_kind,
                "offset": base.offset}
    changed = {k: v for k, v in distill.items() if v != defaults[k]}
    if not REPAIRS[method].uses_aird:
        aird = {"aird": None}  # AIRD's settings are not used: not part of this result's settings
    aird.update(repair_method=method, distill=changed or None)
if source_layer is not None:
    st.caption(f"The original's refusal direction comes from layer {source_layer}.")


def gather(study):
    """Every result the page shows, with this page's AIRD settings (part of the repair's cache key; the
    study folder — and every other stage stored in it — stays the same)."""
    s = study.with_spec(**aird)
    mark_original_direction(s, s.directions("original"))
    return s.repair_result(scheme, budget_layers=BUDGET_LAYERS)


memo_key = ("aird", study.id, scheme, tuple((k, str(v)) for k, v in aird.items()))
done_key = completed_key("aird", study=study.id, scheme=scheme, settings=aird, budget=BUDGET_LAYERS)
results = ws.values.get(memo_key)
auto = results is None and is_completed(study, done_key)  # stored: load it (computes nothing)
clicked = st.button(f"Run {REPAIRS[method].label}", type="primary", disabled=results is not None or auto,
                    help="computes only what is not stored yet: directions, evaluations, calibration, repair, budget")
if clicked or auto:
    st.session_state[CANCEL] = False
    stop = cancel_button(CANCEL) if clicked else st.empty()
    what = f"{REPAIRS[method].label} on {scheme}" if clicked else "Loading stored results"
    ok, results = run_study(handle, study, gather, what=what,
                            cancel_key=CANCEL,
                            planned=study.with_spec(**aird).planned_stages([scheme], aird=True, budget=True)
                            if clicked else None)
    stop.empty()
    if ok:
        ws.values[memo_key] = results
        mark_completed(study, done_key, "aird", {"scheme": scheme, "settings": aird, "budget": BUDGET_LAYERS})
        ws.keep_variants_of(study)
        if clicked:
            st.rerun()  # redraw with the button disabled (a stored result was loaded with it disabled already)
if st.session_state.get(CANCEL):
    st.info(f"{REPAIRS[method].label} cancelled; every stage finished before the cancel is stored.")
    st.session_state[CANCEL] = False
if results is None:
    st.info(f"Not computed yet for `{scheme}` with these settings: click **Run {REPAIRS[method].label}**.")
    st.stop()

# ------------------------------------------------------------------------------------------------
from refusal_lab.study import repair_rows  # noqa: E402 — only needed once results exist

rep = results.repaired.repair  # AIRD's (None for distill alone)
repairs = results.repairs or {"aird": results.repaired}  # every method run, side by side
labels = {m: f"{scheme} + {REPAIRS[m].label}" for m in repairs}
box = st.container(key="aird_results")
with box:
    st.subheader("Before / after")
    table = pd.DataFrame(repair_rows(results))
    names = {"refusal_harmful": "refusal (harmful)", "asr": "ASR", "broken_harmful": "broken (harmful)",
             "broken_harmless": "broken (harmless)", "over_refusal_harmless": "over-refusal (harmless)",
             "over_refusal_borderline": "over-refusal (borderline)", "kl_to_original": "KL to original",
             "kl_multi_token": "KL over 16 tokens", "zero_shot_accuracy": "zero-shot accuracy",
             "aird_layers": "layers", "aird_alpha": "α", "aird_realign_layer": "re-aligned layer",
             "distill_rank": "LoRA rank", "parameters_changed": "parameters changed",
             "density_before": "density before", "density_after": "density after",
             "densified_weights": "densified weights", "seconds": "seconds"}
    keep = [c for c in ("model", "refusal_harmful", "asr", "broken_harmful", "over_refusal_harmless",
                        "broken_harmless", "over_refusal_borderline", "perplexity", "zero_shot_accuracy", "kl_to_original",
                        "kl_multi_token", "aird_layers", "aird_alpha", "aird_realign_layer", "distill_rank",
                        "parameters_changed", "density_before", "density_after", "densified_weights", "seconds")
            if c in table.columns and (c == "model" or table[c].notna().any())]
    table = table[keep].rename(columns=names)
    for c in table.columns:
        if c not in ("model", "layers"):
            table[c] = pd.to_numeric(table[c], errors="coerce")
    if "layers" in table.columns:
        table["layers"] = table["layers"].map(lambda v: ", ".join(map(str, v)) if isinstance(v, list) else "")
    show_table(table, decimals={"α": 2, "densified weights": 0, "parameters changed": 0, "LoRA rank": 0,
                                "perplexity": 2, "seconds": 1}, hide_index=True, width="stretch")
    said = []
    if rep is not None:
        how_chosen = "auto-calibrated on val prompts" if rep.auto else "manual"
        fit = "" if rep.realign_layer is None else f", re-alignment of layer {rep.realign_layer}'s MLP output"
        said.append(f"AIRD: layers {rep.layers}, α = {rep.alpha:g}{fit}, mode {rep.mode} ({how_chosen})")
    d = results.repaired.distill
    if d is not None:
        said.append(f"distill: {d.modules} linears of blocks {d.layers[0]}–{d.layers[-1]}, LoRA rank {d.rank}, "
                    f"{d.steps} steps, mode {d.mode}, trained on {sum(d.n_prompts.values())} train prompts "
                    f"({d.n_reply_tokens:,} reply tokens); training loss (KL to the original per reply token, plus the "
                    "stream terms when set) "
                    f"{d.loss_first:.3f} → {d.loss_last:.3f} nats"
                    + (f"; stream leaving the source block shifted by −{d.offset:g} × the refusal direction"
                       if d.offset else ""))
    st.caption("; ".join(said) + f". Evaluated on {results.original.sets['harmful'].n} test prompts per set; "
               "seconds: the repair's own compute time (calibration / teacher replies and training).")
    if rep is not None and rep.auto and rep.alpha == 0 and rep.realign_layer is None:
        st.warning("Calibration found no repair that raises refusal within the over-refusal and KL limits: "
                   "the variant is left unrepaired (see the recoverability diagnostic).")

    replies_audit({"original": results.original, scheme: results.variant,
                   **{labels[m]: ev for m, ev in repairs.items()}}, "aird_audit")

    sets = ["harmful", "harmless", "borderline"]
    fig = go.Figure()
    colors = ["#00cc96", "#636efa"]
    for name, ev, color in (("original", results.original, "#7f7f7f"), (scheme, results.variant, "#ef553b"),
                            *((labels[m], ev, colors[i % 2]) for i, (m, ev) in enumerate(repairs.items()))):
        fig.add_bar(x=sets, y=[ev.rate(k) for k in sets], name=name, marker_color=color)
    fig.update_layout(barmode="group", title="Refusal rate before and after the repair", yaxis_range=[0, 1],
                      yaxis_title="refusal rate", height=330, margin=dict(l=10, r=10, t=50, b=10))
    st.plotly_chart(fig, width="stretch", key="aird_bars")

    left, right = st.columns(2)
    with left:
        rec = results.drift.recoverability
        st.markdown("**Recoverability diagnostic**")
        measured = results.verdict
        (st.success if measured.level in ("recovered", "nothing lost") else
         st.error if measured.level == "not recovered" else st.warning)(f"Measured: {measured.verdict}")
        st.caption(f"Predicted from projections, before any repair: {rec.verdict}")
        dfig = go.Figure()
        dfig.add_scatter(y=rec.cohens_d_original, mode="lines", name="original", line=dict(color="#7f7f7f"))
        dfig.add_scatter(y=rec.cohens_d_compressed, mode="lines", name=scheme, line=dict(color="#ef553b"))
        dfig.add_vline(x=rec.layer, line=dict(color="grey", dash="dash"))
        dfig.update_layout(title="Harmful vs harmless separation along r̂ (Cohen's d)", xaxis_title="layer",
                           yaxis_title="Cohen's d", height=320, margin=dict(l=10, r=10, t=50, b=10))
        st.plotly_chart(dfig, width="stretch", key="aird_recoverability")
    with right:
        if not results.budget:
            st.markdown("**Budget curve**")
            st.caption("Not for this method: the budget curve measures AIRD's repair layers, and distill alone "
                       "does not use AIRD.")
        else:
            st.markdown("**Budget curve**")
            b = pd.DataFrame(to_json(results.budget))
            bfig = go.Figure()
            bfig.add_scatter(x=b["n_layers"], y=b["refusal"], mode="lines+markers", name="refusal (harmful)",
                             text=[f"layers {v}, densifies {w:,} weights" for v, w in zip(b["layers"], b["densified_weights"])])
            bfig.add_hline(y=results.variant.rate("harmful"), line=dict(color="#ef553b", dash="dot"),
                           annotation_text="unrepaired")
            bfig.add_hline(y=results.original.rate("harmful"), line=dict(color="#7f7f7f", dash="dot"),
                           annotation_text="original")
            bfig.update_layout(title=f"Refusal vs repaired layers (α = {rep.alpha:g})", xaxis_title="layers repaired",
                               yaxis_title="refusal rate", yaxis_range=[0, 1.05], height=320,
                               margin=dict(l=10, r=10, t=50, b=10))
            st.plotly_chart(bfig, width="stretch", key="aird_budget")

    if rep is not None and rep.calibration:
        with st.expander("Calibration grid (val prompts)"):
            grid = pd.DataFrame([{k: (", ".join(map(str, v)) if isinstance(v, list) else v)
                                  for k, v in g.to_json().items()} for g in rep.calibration])
            st.dataframe(grid, hide_index=True, width="stretch", placeholder="—")

    st.subheader("Example generations (harmful test prompts)")
    n_show = st.slider("Examples", 1, min(10, results.original.sets["harmful"].n), 3)
    shown = {"original": results.original, scheme: results.variant, **{labels[m]: ev for m, ev in repairs.items()}}
    res = [ev.sets["harmful"].results for ev in shown.values()]
    for i in range(n_show):
        st.markdown(f"**{res[0][i].prompt}**")
        cols = st.columns(len(shown))
        for col, name, r in zip(cols, shown, res):
            verdict = ":red[refuses]" if r[i].refused else ":green[complies]"
            col.caption(f"{name} — {verdict}")
            col.text(r[i].response[:600] or "(empty)")

# ------------------------------------------------------------------------------------------------
st.subheader("Download")


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


def stored_repair():
    """The repair with its tensors (read from the store: the run above computed it)."""
    return study.with_spec(**aird).repair(scheme)


def adapter_zip() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return zip_folder(stored_repair().save(Path(tmp) / "aird_adapter"))


def distill_zip() -> bytes:
    """The distill adapter (LoRA weights as safetensors + its description), read from the store."""
    from refusal_lab.study_repairs import distilled

    with tempfile.TemporaryDirectory() as tmp:
        return zip_folder(distilled(study.with_spec(**aird), scheme, method).save(Path(tmp) / "distill_adapter"))


if REPAIRS[method].uses_distill:
    ok, blob = guarded("Packing the distill adapter", distill_zip)
    if ok:
        st.download_button("Distill adapter (LoRA, safetensors)", blob,
                           file_name=f"distill-adapter-{scheme.replace(':', '_')}.zip", mime="application/zip")
if not REPAIRS[method].uses_aird:
    st.stop()


def merged_zip() -> bytes:
    from refusal_lab.aird import merge

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        full = stored_repair()
        repaired = merge(study.variant(scheme), dataclasses.replace(full, mode="merged"))
        repaired.model.save_pretrained(out, safe_serialization=True)
        repaired.tokenizer.save_pretrained(out)
        full.save(out)  # the repair's description travels with the weights
        return zip_folder(out)


c1, c2 = st.columns(2)
ok, blob = guarded("Packing the adapter", adapter_zip)
if ok:
    c1.download_button("Adapter (r̂ + layers + α, safetensors)", blob, file_name=f"aird-adapter-{scheme}.zip",
                       mime="application/zip")
if REPAIRS[method].uses_distill:
    st.caption("AIRD + distill: apply the AIRD adapter, then the distill adapter (trained on the AIRD-repaired model).")
    st.stop()
dl_key = ("aird_zip", memo_key)
if c2.button("Prepare the repaired model (safetensors folder)"):
    if scheme not in study.variants() and scheme not in ws.variants:
        show_error("The compressed variant is not in memory", f"`{scheme}` was computed in an earlier server run.",
                   "compress it again on the Compress page (the study's stored results are reused).")
    else:
        ok, blob = guarded("Saving the repaired model", merged_zip,
                           fix="quantized layers cannot be merged: download the adapter instead.")
        if ok:
            st.session_state["aird_zip"] = (memo_key, blob)
z = st.session_state.get("aird_zip")
if z and z[0] == memo_key:
    c2.download_button(f"Download the repaired model ({len(z[1]) / 2**20:.0f} MiB zip)", z[1],
                       file_name=f"aird-{scheme.replace(':', '_')}.zip", mime="application/zip")
