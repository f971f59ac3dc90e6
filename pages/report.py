"""Report page: browse the studies in the run store, inspect their stages, export them."""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from refusal_lab.session import StoreError, StoredStudy, list_studies, runs_root
from refusal_lab.sweep import list_sweeps
from pages._shared import guarded, run_study, show_error

st.title("Report")
st.caption(f"Run store: `{Path(runs_root()).resolve()}` — every stage of every study is stored there; "
           "the CLI (`python -m refusal_lab study …`) and this dashboard share it.")

try:
    infos = list_studies()
except (OSError, StoreError) as e:
    show_error("Cannot read the run store", e, f"check that `{runs_root()}` is a writable folder "
               "(set REFUSAL_LAB_RUNS to use another one).")
    st.stop()

empty = [i for i in infos if i.entries == 0 and not i.problem]
if empty and not st.checkbox(f"Show empty studies ({len(empty)})", value=False):
    infos = [i for i in infos if i not in empty]
if not infos:
    st.info("No stored study yet. Run one from the **Refusal drift** or **AIRD** page, or with "
            "`python -m refusal_lab study --model default --scheme wanda:0.5`.")
    st.stop()

rows = [{"study": i.name, "id": i.id, "updated": i.updated.strftime("%Y-%m-%d %H:%M"), "entries": i.entries,
         "stages": ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in sorted(i.stages.items())),
         "MiB": i.size_bytes / 2**20, "problem": i.problem or ""} for i in infos]
st.container(key="studies").dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", placeholder="—",
                                      column_config={"MiB": st.column_config.NumberColumn(format="%.1f")})

ok, sweeps = guarded("Reading the sweeps", lambda: list_sweeps(runs_root()))
if ok and sweeps:
    st.subheader("Sweeps")
    st.caption("`python -m refusal_lab sweep`: models × schemes, one task each, here or on a Ray cluster; "
               "each model's study is listed above.")
    st.container(key="sweeps").dataframe(pd.DataFrame([{
        "sweep": r.spec.name or r.id, "id": r.id, "ran on": r.executor, "started": r.started[:16].replace("T", " "),
        "finished": (r.finished or "")[:16].replace("T", " "), "models": len(r.spec.models),
        "schemes": ", ".join(r.spec.schemes), "done": sum(t.status == "done" for t in r.tasks),
        "failed": sum(t.status == "failed" for t in r.tasks), "tasks": len(r.tasks)} for r in sweeps]),
        hide_index=True, width="stretch", placeholder="—")
    for r in sweeps:
        with st.expander(f"Tasks of {r.spec.name or r.id}", expanded=False):
            st.dataframe(pd.DataFrame([{"model": t.model, "task": t.scheme or "original", "status": t.status,
                                        "seconds": t.seconds, "stages computed": len(t.computed),
                                        "study": t.study_id, "error": t.error or ""} for t in r.tasks]),
                         hide_index=True, width="stretch", placeholder="—",
                         column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})

by_id = {i.id: i for i in infos}
order = sorted(by_id, key=lambda s: by_id[s].spec.get("kind") == "dashboard-variants")  # pipeline studies first
sid = st.selectbox("Study", order, format_func=lambda s: f"{by_id[s].name} ({s})")
info = by_id[sid]
ok, stored = guarded("Opening the study", lambda: StoredStudy(info))
if not ok:
    st.stop()

with st.expander("Spec", expanded=False):
    st.json(info.spec)

table = pd.DataFrame(stored.stages())
if not table.empty:
    table["seconds"] = pd.to_numeric(table["seconds"], errors="coerce")
st.subheader("Stages")
if table.empty:
    st.info("This study has no stored stage yet.")
else:
    st.dataframe(table.sort_values("done"), hide_index=True, width="stretch", placeholder="—",
                 column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})


st.subheader("Export")
c0, c1, c2, c3 = st.columns(4)
if stored.is_variants_list:
    c0.caption("Variants compressed on the Compress page (no pipeline results to report).")
elif c0.button("Prepare the HTML report", help="from the stored stages; a stage that is missing is computed"):
    ok, st_ = guarded("Opening the study", stored.pipeline)
    ok, page = run_study(None, st_, stored.html, what="Building the HTML report") if ok else (False, None)
    if ok:
        st.session_state["report_html"] = (sid, page)
h = st.session_state.get("report_html")
if h and h[0] == sid:
    c0.download_button(f"Download report.html ({len(h[1]) / 2**20:.1f} MiB)", h[1], file_name=f"{sid}.html",
                       mime="text/html")
ok, data = guarded("Collecting the JSON report", stored.json)
if ok:
    c1.download_button("JSON (all stored results)", json.dumps(data, indent=1, default=str),
                       file_name=f"{sid}.json", mime="application/json")
if c2.button("Prepare a zip of the study folder"):
    ok, blob = guarded("Exporting the zip", stored.zip_bytes)
    if ok:
        st.session_state["report_zip"] = (sid, blob)
z = st.session_state.get("report_zip")
if z and z[0] == sid:
    c2.download_button(f"Download {sid}.zip ({len(z[1]) / 2**20:.1f} MiB)", z[1], file_name=f"{sid}.zip",
                       mime="application/zip")
with c3.popover("Delete this study"):
    st.write(f"Deletes `{sid}` and every stored stage in it.")
    if st.button("Delete", type="primary"):
        ok, _ = guarded("Deleting the study", stored.delete)
        if ok:
            st.rerun()
