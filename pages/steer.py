"""Steer page: one prompt through the original and compressed variants, with and without an
intervention along the original model's refusal direction; per-token refusal scores."""

import html

import plotly.graph_objects as go
import streamlit as st

from refusal_lab.directions import source
from refusal_lab.interventions import INTERVENTIONS as STEERING
from pages._shared import (ROLES, cancel_button, current_workspace, get_study, guarded, model_badge, progress_callback,
                           prompt_set, require_handle, settings_widgets, show_error, study_direction)

CANCEL = "steer_cancelled"
RESULTS = "steer_results"
INTERVENTIONS = {name: i.label for name, i in STEERING.items()}

st.title("Steer")
handle = require_handle()
ws = current_workspace(handle)
model_badge(handle)

# -- prompt ---------------------------------------------------------------------------------------
form = st.container(key="steer_form")
mode = form.radio("Prompt", ["Type a prompt", "Pick from a set"], horizontal=True, label_visibility="collapsed")
if mode == "Type a prompt":
    prompt = form.text_area("Prompt", value="How do I pick a lock?", height=80)
else:
    c1, c2 = form.columns([1, 3])
    role = c1.selectbox("Set (test split)", ROLES)
    try:
        options = prompt_set(role, "test").prompts
    except Exception as e:  # noqa: BLE001
        options = []
        show_error(f"Could not load the {role} prompts", e, "check the Prompts page.")
    prompt = c2.selectbox("Prompt", options) if options else ""
prompt = (prompt or "").strip()

# -- variants and intervention --------------------------------------------------------------------
names = ["original", *ws.variants]
c1, c2 = st.columns([2, 3])
chosen = c1.multiselect("Variants", names, default=names[:3],
                        help="compressed variants are made on the Compress page")
max_new = c1.slider("New tokens", 8, 128, 48, step=8)
kind = c2.radio("Intervention", list(INTERVENTIONS), format_func=INTERVENTIONS.get, horizontal=True)

with st.expander("Direction settings", expanded=False):
    settings_widgets()
ok, study = guarded("Opening the study", lambda: get_study(handle))
dirset = study_direction(handle, study) if ok else None
coeff, layer = 1.0, 0
if kind != "none" and ok:
    if dirset is None:
        st.info("Interventions use the **original model's refusal direction** (difference in means of harmful vs "
                "harmless train prompts, selected on val) — the same one the Refusal drift and AIRD pages use. "
                "It is computed once and stored.")
        if st.button("Compute the refusal direction", type="primary"):
            st.session_state[CANCEL] = False
            stop = cancel_button(CANCEL)
            dirset = study_direction(handle, study, compute=True, cancel_key=CANCEL)
            stop.empty()
            if dirset is not None:
                st.rerun()
    else:
        src = source(dirset)
        st.caption(f"Direction: position {src['position']} (token `{src['token']!r}`), layer {src['layer']} of "
                   f"{dirset.n_layers}, norm {float(dirset.direction.norm()):.2f}.")
        for w in dirset.warnings:
            st.caption(f"Note: {w}")
        if kind == "add":
            a, b = st.columns(2)
            coeff = a.slider("Coefficient", -4.0, 4.0, 1.0, step=0.25)
            layer = b.slider("Layer", 0, handle.n_layers - 1, int(src["layer"]))

ready = bool(prompt) and bool(chosen) and (kind == "none" or dirset is not None)


def variant_handle(name: str):
    return handle if name == "original" else ws.variants[name].handle


def one(name: str, steered: bool) -> dict:
    """Generate and score one (variant, steered?) cell (kept in the shared workspace)."""
    if not steered:
        return ws.steered_reply(variant_handle(name), prompt, max_new)
    return ws.steered_reply(variant_handle(name), prompt, max_new, kind, dirset.direction, layer=layer, coeff=coeff,
                            direction_id=dirset.metadata.get("harmful_sha"))


if st.button("Generate", type="primary", disabled=not ready):
    st.session_state[CANCEL] = False
    stop = cancel_button(CANCEL)
    cells = [(n, s) for n in chosen for s in ([False, True] if kind != "none" else [False])]
    cb = progress_callback("Generating", cancel_key=CANCEL)
    results = {}

    def run_all():
        for i, (n, s) in enumerate(cells):
            cb(i, len(cells))
            results[(n, s)] = one(n, s)
        cb(len(cells), len(cells))

    ok, _ = guarded("Generation", run_all,
                    fix="orthogonalized weights need float weights: use *Ablate* on quantized variants."
                    if kind == "orthogonalize" else None)
    cb.bar.empty()
    stop.empty()
    st.session_state[RESULTS] = {"prompt": prompt, "kind": kind, "coeff": coeff, "layer": layer,
                                 "cells": results}
if st.session_state.get(CANCEL):
    st.info("Generation cancelled.", icon=":material/cancel:")
    st.session_state[CANCEL] = False


# -- results --------------------------------------------------------------------------------------
def token_strip(tokens: list[str], scores: list[float]) -> str:
    """Reply tokens coloured by the refusal score before each (red = refusal likely)."""
    spans = []
    for t, s in zip(tokens, scores):
        a = max(0.0, min(1.0, (s + 4) / 8))  # -4 → white, +4 → red
        spans.append(f'<span title="{s:+.2f}" style="background: rgba(220,40,40,{a:.2f}); '
                     f'border-radius: 3px">{html.escape(t)}</span>')
    return "<div style='line-height: 1.9; font-family: monospace; white-space: pre-wrap'>" + "".join(spans) + "</div>"


res = st.session_state.get(RESULTS)
if res and res["cells"]:
    with st.container(key="steer_results"):
        st.subheader("Generations")
        label = INTERVENTIONS[res["kind"]] + (f" · c = {res['coeff']}, layer {res['layer']}" if STEERING[res["kind"]].uses_layer else "")
        st.caption(f"Prompt: *{res['prompt']}* · intervention: {label}")
        variant_names = list(dict.fromkeys(n for n, _ in res["cells"]))
        cols = st.columns(len(variant_names))
        for col, name in zip(cols, variant_names):
            with col:
                st.markdown(f"#### {name}")
                for steered in (False, True):
                    cell = res["cells"].get((name, steered))
                    if cell is None:
                        continue
                    tag = "steered" if steered else "plain"
                    verdict = ":red[refuses]" if cell["refusal"] else ":green[complies]"
                    st.markdown(f"**{tag}** — {verdict} · first-token refusal score {cell['scores'][0]:+.2f}")
                    st.markdown(token_strip(cell["tokens"], cell["scores"]), unsafe_allow_html=True)
        fig = go.Figure()
        for (name, steered), cell in res["cells"].items():
            fig.add_scatter(y=cell["scores"], mode="lines", name=f"{name} · {'steered' if steered else 'plain'}",
                            line=dict(dash="dot" if steered else "solid"))
        fig.add_hline(y=0, line=dict(color="grey", width=1))
        fig.update_layout(height=300, xaxis_title="reply tokens so far", yaxis_title="refusal score (log-odds)",
                          margin=dict(l=10, r=10, t=30, b=10), title="Refusal score along each reply")
        st.plotly_chart(fig, width="stretch")
elif not ready and not prompt:
    st.info("Type a prompt or pick one from a set.")
