"""Home page: what the product does and the order of the pages."""

import streamlit as st

import pages._shared  # noqa: F401 — leaves Streamlit's legacy pages/ mode on a first visit

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
