"""Refusal Lab dashboard entry point: `make run` (binds 127.0.0.1, see .streamlit/config.toml)."""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="Refusal Lab", page_icon="🧭", layout="wide")

PAGES = Path(__file__).parent / "pages"
SPEC = [("home.py", "Home", "🏠"), ("model.py", "Model", "🧠"), ("prompts.py", "Prompts", "📝"),
        ("compress.py", "Compress", "🗜️"), ("drift.py", "Refusal drift", "🧭"), ("steer.py", "Steer", "🎛️"),
        ("aird.py", "AIRD", "🩹"), ("report.py", "Report", "📄")]
pages = [st.Page(str(PAGES / name), title=title, icon=icon, default=name == "home.py")
         for name, title, icon in SPEC if (PAGES / name).exists()]
page = st.navigation(pages)
with st.sidebar:
    cfg = st.session_state.get("model_cfg")
    st.caption(f"Model spec: `{cfg['spec'] if isinstance(cfg, dict) else 'default'}`")
page.run()
