"""Report page: browse the studies in the run store, inspect their stages, export them."""

import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from core.store import StoreError
from pages._shared import guarded, run_store, runs_root, show_error

st.title("Report")
st.caption(f"Run store: `{Path(runs_root()).resolve()}` — every stage of every study is stored there; "
           "the CLI (`python -m core study …`) and this dashboard share it.")

try:
    store = run_store()
    infos = store.list_studies()
except (OSError, StoreError) as e:
    show_error("Cannot read the run store", e, f"check that `{runs_root()}` is a writable folder "
               "(set REFUSAL_LAB_RUNS to use another one).")
    st.stop()

if not infos:
    st.info("No stored study yet. Run one from the **Refusal drift** or **AIRD** page, or with "
            "`python -m core study --model default --scheme wanda:0.5`.")
    st.stop()

rows = [{"study": i.name, "id": i.id, "updated": i.updated.strftime("%Y-%m-%d %H:%M"), "entries": i.entries,
         "stages": ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in sorted(i.stages.items())),
         "MiB": i.size_bytes / 2**20, "problem": i.problem or ""} for i in infos]
st.container(key="studies").dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                                      column_config={"MiB": st.column_config.NumberColumn(format="%.1f")})

by_id = {i.id: i for i in infos}
sid = st.selectbox("Study", list(by_id), format_func=lambda s: f"{by_id[s].name} ({s})")
info = by_id[sid]
ok, study = guarded("Opening the study", lambda: store.open(sid))
if not ok:
    st.stop()

with st.expander("Spec", expanded=False):
    st.json(info.spec)

entries = study.manifest["stages"]
table = pd.DataFrame([{"stage": e.get("stage"), "kind": e.get("kind"), "done": e.get("done_at", "")[:19],
                       "seconds": e.get("seconds"), "key": k,
                       "status": "ok" if (p := study.problem(k)) is None else p}
                      for k, e in entries.items()])
st.subheader("Stages")
if table.empty:
    st.info("This study has no stored stage yet.")
else:
    st.dataframe(table.sort_values("done"), hide_index=True, width="stretch",
                 column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})


def collect_json() -> dict:
    """The study's spec and every stored JSON artifact, by stage."""
    out: dict = {"study": sid, "name": info.name, "spec": info.spec, "stages": {}}
    for k, e in entries.items():
        if e.get("kind") == "json" and study.has(k):
            out["stages"].setdefault(e["stage"], []).append(study.get_json(k))
    return out


st.subheader("Export")
c1, c2, c3 = st.columns(3)
ok, data = guarded("Collecting the JSON report", collect_json)
if ok:
    c1.download_button("JSON (all stored results)", json.dumps(data, indent=1, default=str),
                       file_name=f"{sid}.json", mime="application/json")
if c2.button("Prepare a zip of the study folder"):
    def make_zip() -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return store.export_zip(sid, Path(tmp) / f"{sid}.zip").read_bytes()
    ok, blob = guarded("Exporting the zip", make_zip)
    if ok:
        st.session_state["report_zip"] = (sid, blob)
z = st.session_state.get("report_zip")
if z and z[0] == sid:
    c2.download_button(f"Download {sid}.zip ({len(z[1]) / 2**20:.1f} MiB)", z[1], file_name=f"{sid}.zip",
                       mime="application/zip")
with c3.popover("Delete this study"):
    st.write(f"Deletes `{sid}` and every stored stage in it.")
    if st.button("Delete", type="primary"):
        ok, _ = guarded("Deleting the study", lambda: store.delete(sid))
        if ok:
            st.rerun()
