"""Home page: what the product does, the order of the pages, and the one-click demo story."""

import streamlit as st

from refusal_lab.demo import (before_after_figure, demo_html, demo_planned, demo_spec, demo_story, drift_cosines_figure,
                       original_figure)
from pages._shared import cancel_button, current_workspace, guarded, model_cfg, require_handle, run_study

CANCEL = "demo_cancelled"

st.title("Refusal Lab")
st.container(key="home").markdown(
    "See what model compression does to a language model's **refusal direction** "
    "(Arditi et al. 2024) — and repair it (AIRD, after Chhabra & Khalili 2025).\n\n"
    "1. **Model** — the default model loads by itself; pick another one there.\n"
    "2. **Prompts** — harmful / harmless / borderline sets (bundled or your files).\n"
    "3. **Compress** — prune or quantize the model into variants.\n"
    "4. **Refusal drift** — how far each variant's refusal direction moved, layer by layer.\n"
    "5. **Steer** — generate with and without the direction, side by side.\n"
    "6. **AIRD** — repair a variant's refusal and compare before/after.\n"
    "7. **Report** — browse stored studies and export them.")

st.header("The demo story")
st.caption(f"One click runs the whole story on the current model (`{model_cfg()['spec']}`): it refuses, "
           "compression breaks that, the repair brings it back — stored after the first run, and exportable as "
           "one HTML file that opens without a server.")


def story_key(handle) -> tuple:
    return ("demo", handle.fingerprint, handle.precision)


if st.button("Run the demo study", type="primary"):
    handle = require_handle()
    ws = current_workspace(handle)
    ok, study = guarded("Opening the demo study", lambda: ws.study(demo_spec(handle, model_cfg()), handle))
    if ok:
        st.session_state[CANCEL] = False
        stop = cancel_button(CANCEL)
        ok, story = run_study(handle, study, demo_story, what="Demo study", cancel_key=CANCEL,
                              planned=demo_planned(study))
        stop.empty()
        if ok:
            ws.values[story_key(handle)] = story
            st.session_state["demo_story"] = story_key(handle)
if st.session_state.get(CANCEL):
    st.info("Demo study cancelled; every stage finished before the cancel is stored.")
    st.session_state[CANCEL] = False

key = st.session_state.get("demo_story")
story = current_workspace(require_handle()).values.get(key) if key else None
if story is not None:
    def examples(step: str, items) -> None:
        for e in items:
            reply, refused = getattr(e, step), getattr(e, f"{step}_refused")
            verdict = ":red[refuses]" if refused else ":green[answers]"
            st.markdown(f"**{e.prompt}** — {verdict}")
            st.caption(reply or "—")

    o, c, r = (100 * story.rate(w) for w in ("original", "compressed", "repaired"))
    with st.container(key="demo_step1"):
        st.subheader("1. The model refuses harmful prompts and answers harmless ones")
        st.plotly_chart(original_figure(story), width="stretch")
        a, b = st.columns(2)
        with a:
            st.markdown("*Harmful prompts*")
            examples("original", story.harmful)
        with b:
            st.markdown("*Harmless prompts*")
            examples("original", story.harmless)
    with st.container(key="demo_step2"):
        st.subheader(f"2. Compression ({story.scheme}) breaks it: refusal {o:.0f}% → {c:.0f}%")
        st.plotly_chart(drift_cosines_figure(story), width="stretch")
        examples("compressed", story.harmful)
    with st.container(key="demo_step3"):
        st.subheader(f"3. The repair (AIRD) brings it back: {c:.0f}% → {r:.0f}%")
        st.plotly_chart(before_after_figure(story), width="stretch")
        verdict = story.results.variants[story.scheme].aird_verdict
        if verdict is not None:
            st.caption(verdict.verdict)
        examples("repaired", story.harmful)
    ok, page = guarded("Preparing the HTML export", lambda: demo_html(story).encode("utf-8"))
    if ok:
        st.download_button("Download this story (HTML, opens offline)", page, file_name="refusal-lab-demo.html",
                           mime="text/html")
