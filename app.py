"""Refusal Lab dashboard entry point: `make run` (binds 127.0.0.1, see .streamlit/config.toml)."""

from pathlib import Path

import streamlit as st

from pages._shared import model_cfg

st.set_page_config(page_title="Refusal Lab", page_icon=":material/explore:", layout="wide")

PAGES = Path(__file__).parent / "pages"
SPEC = [("home.py", "Home", "home"), ("model.py", "Model", "memory"), ("prompts.py", "Prompts", "edit_note"),
        ("compress.py", "Compress", "compress"), ("drift.py", "Refusal drift", "explore"),
        ("steer.py", "Steer", "tune"), ("aird.py", "AIRD", "healing"), ("report.py", "Report", "description")]
pages = [st.Page(str(PAGES / name), title=title, icon=f":material/{icon}:", default=name == "home.py")
         for name, title, icon in SPEC if (PAGES / name).exists()]
page = st.navigation(pages)
with st.sidebar:
    st.caption(f"Model spec: `{model_cfg()['spec']}`")
page.run()
