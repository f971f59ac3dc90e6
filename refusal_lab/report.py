"""Figures and the self-contained HTML report of a study (Plotly; no UI framework here — the
dashboard pages show the same figures)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from refusal_lab.results import BudgetPoint, Diagnostic, StudyResults
from refusal_lab.study import summary_rows
from refusal_lab.tables import rows_table_html


def drift_figure(results: StudyResults) -> go.Figure:
    """Per-layer cosine similarity between the original's refusal direction and each variant's."""
    fig = go.Figure()
    for scheme, v in results.variants.items():
        cos = v.drift.cosine_per_layer
        fig.add_trace(go.Scatter(x=list(range(len(cos))), y=cos, mode="lines+markers", name=scheme))
    src = results.original.source.source.layer
    if src is not None:
        fig.add_vline(x=src, line_dash="dot", annotation_text=f"original source layer {src}")
    fig.update_layout(title="Refusal-direction drift: cosine(original, compressed) per layer",
                      xaxis_title="layer (block input)", yaxis_title="cosine similarity",
                      yaxis_range=[-0.05, 1.05], template="plotly_white", height=420)
    return fig


def projection_figure(drift: Diagnostic, which: str = "variant") -> go.Figure:
    """Harmful vs harmless projection bands (mean ± std) on the original direction, per layer
    (``which``: ``original`` or ``variant``)."""
    p = drift.projections[which]
    fig = go.Figure()
    for kind, color in (("harmful", "#d62728"), ("harmless", "#1f77b4")):
        mean, std = getattr(p, f"{kind}_mean"), getattr(p, f"{kind}_std")
        x = list(range(len(mean)))
        fig.add_trace(go.Scatter(x=x + x[::-1], y=[m + s for m, s in zip(mean, std)] +
                                 [m - s for m, s in zip(mean, std)][::-1], fill="toself", line=dict(width=0),
                                 fillcolor=color, opacity=0.2, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=mean, name=kind, line=dict(color=color)))
    fig.update_layout(title=f"Projection on the original refusal direction ({which})", xaxis_title="layer",
                      yaxis_title="projection", template="plotly_white", height=380)
    return fig


def refusal_figure(results: StudyResults) -> go.Figure:
    """Refusal on harmful prompts and over-refusal on harmless/borderline ones, per model."""
    rows = summary_rows(results)
    names = [r["model"] for r in rows]
    fig = go.Figure()
    for key, label in (("refusal_harmful", "refusal on harmful"), ("over_refusal_harmless", "over-refusal harmless"),
                       ("over_refusal_borderline", "over-refusal borderline")):
        vals = [None if r.get(key) is None else 100 * r[key] for r in rows]
        if any(v is not None for v in vals):
            fig.add_trace(go.Bar(x=names, y=vals, name=label, text=[None if v is None else f"{v:.0f}%" for v in vals]))
    fig.update_layout(barmode="group", title="Refusal before and after compression and AIRD", yaxis_title="%",
                      yaxis_range=[0, 105], template="plotly_white", height=420)
    return fig


def budget_figure(curve: list[BudgetPoint], title: str = "AIRD budget curve") -> go.Figure:
    """Refusal recovered vs weights densified as more layers are repaired."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[r.n_layers for r in curve], y=[100 * r.refusal for r in curve],
                             mode="lines+markers", name="refusal on harmful (%)"))
    fig.add_trace(go.Bar(x=[r.n_layers for r in curve], y=[r.densified_weights for r in curve],
                         name="weights densified (merged)", yaxis="y2", opacity=0.35))
    fig.update_layout(title=title, xaxis_title="repaired layers (ending at the source layer)",
                      yaxis=dict(title="refusal %", range=[0, 105]),
                      yaxis2=dict(title="weights densified", overlaying="y", side="right"),
                      template="plotly_white", height=380)
    return fig


def html_report(results: StudyResults) -> str:
    """A single self-contained HTML page (Plotly's JS inlined) with the study's tables and charts (and the
    AIRD budget curves the results hold)."""
    figs = [drift_figure(results), refusal_figure(results)]
    for scheme, v in results.variants.items():
        figs.append(projection_figure(v.drift, "variant").update_layout(title=f"{scheme}: projections on O's r̂"))
    for scheme, curve in (results.budget or {}).items():
        figs.append(budget_figure(curve, f"{scheme}: AIRD budget curve"))
    parts = []
    for i, fig in enumerate(figs):
        parts.append(pio.to_html(fig, full_html=False, include_plotlyjs="inline" if i == 0 else False))
    verdicts = "".join(
        f"<li><b>{html.escape(s)}</b>: predicted from projections: {html.escape(v.drift.recoverability.verdict)}"
        + (f"<br>measured: {html.escape(v.aird_verdict.verdict)}" if v.aird_verdict is not None else "") + "</li>"
        for s, v in results.variants.items())
    spec = html.escape(json.dumps(results.spec, indent=1))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Refusal Lab report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f4f4f4}}pre{{background:#f8f8f8;padding:1em}}</style></head><body>
<h1>Refusal Lab report</h1>
<p>Study <code>{html.escape(results.study_id)}</code>. Every greedy reply ({results.spec['max_new_tokens']} new
tokens) is judged refused, complied or broken (empty, looping or no language — neither) by the
{html.escape(results.spec.get('judge', 'substring'))} judge; ASR counts complied harmful replies. AIRD is this project's reconstruction of Chhabra &amp; Khalili (2025).</p>
<h2>Results</h2>{rows_table_html(summary_rows(results))}
<h2>Recoverability</h2><ul>{verdicts}</ul>
<h2>Charts</h2>{''.join(parts)}
<h2>Spec</h2><pre>{spec}</pre></body></html>"""


def write_report(results: StudyResults, path: str | Path, **kw) -> Path:
    """Write :func:`html_report` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(html_report(results, **kw), encoding="utf-8")
    tmp.replace(path)
    return path
