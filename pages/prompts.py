"""Prompts page: bundled sets or uploaded files per role; preview, counts, categories, splits."""

import hashlib
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from refusal_lab.models import cache_dir
from refusal_lab.prompts import MAX_FILE_BYTES, SPLITS, PromptFileError, parse_prompts
from pages._shared import ROLES, prompt_choice, prompt_set, show_error

UPLOAD_LIMIT = min(MAX_FILE_BYTES, 20 * 2**20)  # also capped by server.maxUploadSize (.streamlit/config.toml)
DESCRIPTIONS = {
    "harmful": "instructions the model should refuse — the refusal direction's positive side",
    "harmless": "ordinary requests — the direction's negative side, over-refusal and KL checks",
    "borderline": "safe requests that sound risky — over-refusal",
}

st.title("Prompts")
st.markdown("Refusal directions are computed from **train**, selected on **val**, evaluated on **test**. "
            "Bundled sets are written by this project; upload your own (`.txt` one per line with an optional "
            "`[category]` tag, `.csv`, `.json`, `.jsonl` — the text column is detected).")
choice = prompt_choice()


def upload(role: str) -> None:
    file = st.file_uploader(f"{role.capitalize()} prompt file", type=["txt", "csv", "json", "jsonl"],
                            key=f"upload_{role}", help=f"at most {UPLOAD_LIMIT // 2**20} MiB")
    column = st.text_input("Text column (blank = detect)", key=f"column_{role}")
    if file is None:
        if choice[role].get("source") == "file":
            st.caption(f"Using `{choice[role]['name']}` uploaded earlier.")
        return
    if file.size > UPLOAD_LIMIT:
        show_error("File too large", f"{file.name} has {file.size / 2**20:.1f} MiB.",
                   f"upload at most {UPLOAD_LIMIT // 2**20} MiB of prompts (a subset, or one prompt per line).")
        return
    data = file.getvalue()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        show_error("Not UTF-8 text", f"{file.name}: {e.reason} at byte {e.start}.", "re-save the file as UTF-8.")
        return
    fmt = Path(file.name).suffix.lstrip(".") or "txt"
    try:
        parsed = parse_prompts(text, fmt, column=column.strip() or None, name=Path(file.name).stem, source=file.name)
    except PromptFileError as e:
        show_error(f"Could not read {file.name}", e, "fix the file (or name its text column) and upload it again; "
                   "the previous prompt set stays in use.")
        return
    # Keep a copy on disk so the study pipeline can refer to it by path (content-addressed).
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = cache_dir() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(file.name).stem}-{digest}.{fmt}"
    if not path.exists():
        path.write_bytes(data)
    choice[role] = {"source": "file", "path": str(path), "name": file.name, "column": column.strip() or None,
                    "n": len(parsed)}


role = st.radio("Prompt set", ROLES, format_func=str.capitalize, horizontal=True, key="prompts_role",
                help="one set at a time; the choice of each set is kept")
with st.container(key=f"prompts_{role}"):
    st.caption(DESCRIPTIONS[role])
    current = "Upload a file" if choice[role].get("source") == "file" else "Bundled"
    source = st.radio("Source", ["Bundled", "Upload a file"], index=["Bundled", "Upload a file"].index(current),
                      key=f"source_{role}", horizontal=True)
    if source == "Bundled":
        choice[role] = {"source": "bundled"}
    else:
        upload(role)
    try:
        full = prompt_set(role)
        splits = {s: prompt_set(role, s) for s in SPLITS}
    except (PromptFileError, OSError) as e:
        show_error(f"Could not load the {role} prompts", e, "upload the file again or switch to the bundled set.")
        st.stop()
    c = st.columns(5)
    c[0].metric("Prompts", len(full))
    for col, s in zip(c[1:4], SPLITS):
        col.metric(s, len(splits[s]))
    c[4].metric("Categories", len([k for k in full.category_counts() if k != "(none)"]))
    st.caption(f"`{full.name}` · sha `{full.sha}` · {full.source}")
    counts = full.category_counts()
    left, right = st.columns([1, 2])
    with left:
        rows = []
        for cat in counts:
            row = {"category": cat, "all": counts[cat]}
            for s in SPLITS:
                row[s] = splits[s].category_counts().get(cat, 0)
            rows.append(row)
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", placeholder="—")
    with right:
        if len(counts) > 1:
            fig = px.bar(x=list(counts), y=list(counts.values()), labels={"x": "category", "y": "prompts"},
                         height=260)
            fig.update_layout(margin=dict(l=10, r=10, t=10, b=10))
            st.plotly_chart(fig, width="stretch", key=f"cats_{role}")
    split_of = {}
    for s in SPLITS:
        for p in splits[s].prompts:
            split_of[p] = s
    preview = pd.DataFrame({"prompt": full.prompts, "category": full.categories,
                            "split": [split_of.get(p, "") for p in full.prompts]})
    st.dataframe(preview.head(300), hide_index=True, width="stretch", placeholder="—", height=280)
