"""Report page: browse the studies in the run store, inspect their stages, export them."""

import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from core.store import StoreError
from core.study import Study, StudySpec
from pages._shared import guarded, run_store, run_study, runs_root, show_error

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

empty = [i for i in infos if i.entries == 0 and not i.problem]
if empty and not st.checkbox(f"Show empty studies ({len(empty)})", value=False):
    infos = [i for i in infos if i not in empty]
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
order = sorted(by_id, key=lambda s: by_id[s].spec.get("kind") == "dashboard-variants")  # pipeline studies first
sid = st.selectbox("Study", order, format_func=lambda s: f"{by_id[s].name} ({s})")
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
if not table.empty:
    table["seconds"] = pd.to_numeric(table["seconds"], errors="coerce")
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


def pipeline_study() -> Study:
    """The stored study as a :class:`core.study.Study` (nothing is loaded or computed here)."""
    st_ = Study(StudySpec.from_dict(info.spec), store)
    if st_.record.id != sid:
        raise StoreError(f"the stored spec of {sid} maps to another folder ({st_.record.id}); the study was made "
                         "by another version of the code")
    return st_


def report_inputs(st_: Study) -> tuple[dict, dict]:
    """``(results, budgets)`` for :func:`core.report.html_report` from the study's stored stages.

    CLI studies list their schemes in the spec. Dashboard studies (no schemes in the spec) take the
    schemes their pages completed, and the AIRD settings each AIRD run used."""
    import dataclasses

    budgets: dict = {}
    if st_.spec.schemes:
        return st_.results(), budgets
    markers = [study.get_json(k) for k, e in entries.items()
               if str(e.get("stage", "")).startswith("dashboard ") and e.get("kind") == "json" and study.has(k)]
    schemes = sorted({s for m in markers for s in m.get("schemes", [])} | {m["scheme"] for m in markers if "scheme" in m})
    base = st_.spec
    try:
        st_.spec = dataclasses.replace(base, schemes=schemes, aird=None)
        results = st_.results()
        for m in markers:
            if m.get("scheme") in results["variants"] and isinstance(m.get("settings"), dict):
                st_.spec = dataclasses.replace(base, schemes=schemes, **m["settings"])
                results["variants"][m["scheme"]]["repaired"] = st_.evaluate_repaired(m["scheme"])
                budgets[m["scheme"]] = st_.budget(m["scheme"], max_layers=int(m.get("budget", 8)))
    finally:
        st_.spec = base
    return results, budgets


def html_export(st_: Study) -> bytes:
    from core.report import html_report

    results, budgets = report_inputs(st_)
    if not results["variants"]:
        raise ValueError("this study has no compressed variant with a drift result yet: run the Refusal drift page")
    return html_report(results, budget=budgets).encode("utf-8")


st.subheader("Export")
c0, c1, c2, c3 = st.columns(4)
if info.spec.get("kind") == "dashboard-variants":
    c0.caption("Variants compressed on the Compress page (no pipeline results to report).")
elif c0.button("Prepare the HTML report", help="from the stored stages; a stage that is missing is computed"):
    ok, st_ = guarded("Opening the study", pipeline_study)
    ok, page = run_study(None, st_, html_export, what="Building the HTML report") if ok else (False, None)
    if ok:
        st.session_state["report_html"] = (sid, page)
h = st.session_state.get("report_html")
if h and h[0] == sid:
    c0.download_button(f"Download report.html ({len(h[1]) / 2**20:.1f} MiB)", h[1], file_name=f"{sid}.html",
                       mime="text/html")
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
