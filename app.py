"""Refusal Lab dashboard entry point: `make run` (binds 127.0.0.1)."""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="Refusal Lab", page_icon="🧭", layout="wide")

PAGES = Path(__file__).parent / "pages"
pages = [st.Page(str(PAGES / "home.py"), title="Home", icon="🏠", default=True)]
for name, title, icon in [("model.py", "Model", "🧠")]:
    if (PAGES / name).exists():
        pages.append(st.Page(str(PAGES / name), title=title, icon=icon))
st.navigation(pages).run()
