"""Compress page: pick schemes, compress the loaded model with progress, compare the variants."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from refusal_lab import compression
from refusal_lab.compression import SchemeError, parse_scheme
from refusal_lab.evaluation import PERPLEXITY_LABEL
from refusal_lab.session import remembered_variants
from pages._shared import (cancel_button, current_workspace, guarded, model_badge, progress_callback, require_handle,
                           show_error, show_table)

CANCEL = "compress_cancelled"

st.title("Compress")
handle = require_handle()
ws = current_workspace(handle)
model_badge(handle)

infos = compression.list_schemes()
available = [ex for info in infos if info.unavailable_reason is None for ex in info.examples]
with st.expander("Schemes and their spec forms"):
    st.dataframe(pd.DataFrame([{"method": i.method, "family": i.family, "form": i.form,
                                "examples": ", ".join(i.examples), "calibration": i.calibration,
                                "available": i.unavailable_reason or "yes", "description": i.description}
                               for i in infos]), hide_index=True, width="stretch", placeholder="—")

picked = st.multiselect("Schemes", available, default=[s for s in ("wanda:0.5",) if s in available],
                        help="one variant per scheme; add others below")
extra = st.text_input("Other schemes (comma-separated)", placeholder="e.g. magnitude:0.3, rtn:4:32, sparsegpt:2:4")
st.caption("Wanda and SparseGPT calibrate on the bundled English text (the same variants the study pipeline "
           "and the CLI make, so their results are shared).")
do_ppl = st.checkbox("Measure perplexity and zero-shot accuracy", value=True,
                     help=f"{PERPLEXITY_LABEL[0].upper()}{PERPLEXITY_LABEL[1:]}: the same number the study and "
                          "README show; and the share right of the project's 210 four-option questions")

specs = list(picked) + [s.strip() for s in extra.split(",") if s.strip()]
schemes, bad = [], []
for s in specs:
    try:
        schemes.append(str(parse_scheme(s)))
    except SchemeError as e:
        bad.append(e)
for e in bad:
    show_error(f"Scheme `{e.spec}` is not valid", e.problem, f"use one of the valid forms: {compression.VALID_FORMS}")

def key_of(scheme: str) -> str:
    return scheme


def original_ppl() -> float:
    cb = progress_callback("Perplexity of the original", cancel_key=CANCEL)
    try:
        return ws.original_perplexity(handle, progress=cb)
    finally:
        cb.bar.empty()


def run(scheme: str) -> None:
    ws.compress(handle, scheme, perplexity=do_ppl,
                progress=progress_callback(f"Compressing with {scheme}", cancel_key=CANCEL),
                perplexity_progress=progress_callback(f"Perplexity of {scheme}", cancel_key=CANCEL) if do_ppl else None)


todo = [s for s in dict.fromkeys(schemes) if key_of(s) not in ws.variants]
go_btn = st.button(f"Compress ({len(todo)} new)" if todo else "Compress", type="primary",
                   disabled=not todo or bool(bad))
if st.session_state.get(CANCEL):
    st.info("Compression cancelled; the variants finished before the cancel are kept.", icon=":material/cancel:")
    st.session_state[CANCEL] = False
if go_btn and todo:
    st.session_state[CANCEL] = False
    cancel_button(CANCEL)
    if do_ppl:
        guarded("Perplexity of the original model", original_ppl)
    for scheme in todo:
        ok, _ = guarded(f"Compressing with `{scheme}`", lambda scheme=scheme: run(scheme))
        if not ok:
            break
    st.rerun()

# ------------------------------------------------------------------------------------------------
st.subheader("Variants")
ok, stored = guarded("Reading the stored variants", lambda: remembered_variants(handle))
stored = stored or {}
if not ws.variants and not stored:
    st.info("No compressed variant yet: pick a scheme and click **Compress**.")
    st.stop()
entries = {k: (v, True) for k, v in ws.variants.items()}  # scheme → (variant, in memory)
for k, v in stored.items():
    entries.setdefault(k, (v, False))

mib = 2 ** 20
first = next(iter(entries.values()))[0].report
rows = [{"variant": "original", "family": "—", "sparsity": 0.0, "bits/weight": first.original_bits_per_weight,
         "stored MiB": first.original_memory_bytes / mib, "resident MiB": first.original_memory_bytes / mib,
         "perplexity": ws.values.get("perplexity", float("nan")), "zero-shot acc": ws.values.get("zero_shot"),
         "seconds": float("nan"), "in memory": True}]
for key, (v, in_memory) in entries.items():
    r = v.report
    rows.append({"variant": key, "family": r.family, "sparsity": r.sparsity, "bits/weight": r.bits_per_weight,
                 "stored MiB": r.memory_bytes / mib, "resident MiB": r.resident_bytes / mib,
                 "perplexity": v.perplexity if v.perplexity is not None else float("nan"),
                 "zero-shot acc": v.zero_shot,
                 "seconds": r.seconds, "in memory": in_memory})
table = pd.DataFrame(rows)
show_table(table, decimals={"bits/weight": 2, "stored MiB": 1, "resident MiB": 1, "perplexity": 2, "seconds": 1,
                            "zero-shot acc": 3},
           where=st.container(key="variants"), hide_index=True, width="stretch",
           column_config={"perplexity": st.column_config.NumberColumn(format="%.2f", help=PERPLEXITY_LABEL),
                          "zero-shot acc": st.column_config.NumberColumn(
                              format="%.3f", help="share right of the project's 210 four-option questions "
                                                  "(arithmetic, opposites, uses of objects, reading)")})
st.caption("Stored = size as saved (see the accounting note); resident = what the variant occupies in memory. "
           "Variants not in memory (made before a server restart) are re-created by clicking **Compress** with "
           "their scheme; their numbers come from the run store.")

fig = go.Figure()
for key, (v, _) in entries.items():
    ls = v.report.layer_sparsity
    fig.add_scatter(x=list(range(len(ls))), y=ls, mode="lines+markers", name=key)
fig.update_layout(xaxis_title="layer", yaxis_title="sparsity", yaxis_range=[0, 1], height=300, showlegend=True, margin=dict(l=10, r=10, t=30, b=10),
                  title="Per-layer sparsity")
st.plotly_chart(fig, width="stretch")
with st.expander("Accounting"):
    st.caption(first.accounting)

drop = st.multiselect("Free memory: remove variants", list(ws.variants))
if drop and st.button("Remove"):
    ws.remove_variants(drop)
    st.rerun()
