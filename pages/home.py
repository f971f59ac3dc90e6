import streamlit as st

st.title("Refusal Lab")
st.markdown(
    "See what model compression does to a language model's **refusal direction** "
    "(Arditi et al. 2024) — and repair it (AIRD, after Chhabra & Khalili 2025). "
    "Start on the **Model** page.")
