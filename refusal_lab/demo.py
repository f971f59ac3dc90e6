"""The demo story: one study that tells, in order, what the product shows — the model refuses harmful
prompts and answers harmless ones, compression breaks that (refusal drops, the direction drifts), the
repair brings it back — with three example replies at each step, and its export as one self-contained
HTML file (Plotly's JavaScript inlined: it opens offline, no server needed).

The Home page runs it for the current model (:func:`demo_spec`, :func:`demo_story`); its stages are
ordinary study stages, so they are stored and a second run loads them.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import plotly.graph_objects as go
import plotly.io as pio

from refusal_lab.models import ModelHandle
from refusal_lab.results import StudyResults
from refusal_lab.study import Study, StudySpec, summary_rows

DEMO_SCHEME = "wanda:0.5"  # unstructured 50% pruning: the scheme whose refusal loss the paper reports
DEMO_LIMIT = 24  # prompts per evaluation set (the dashboard's default)
DEMO_TOKENS = 32  # new tokens per reply (the dashboard's default)
EXAMPLES = 3


def demo_spec(handle: ModelHandle, cfg: dict) -> StudySpec:
    """The demo's study for ``handle`` loaded with model configuration ``cfg`` (spec, device, dtype):
    :data:`DEMO_SCHEME`, AIRD auto, the bundled test sets, the dashboard's default evaluation size."""
    return StudySpec(model=cfg["spec"], schemes=[DEMO_SCHEME], limit=DEMO_LIMIT, max_new_tokens=DEMO_TOKENS,
                     aird="auto", device=cfg["device"], dtype=cfg["dtype"], precision=handle.precision,
                     device_map=cfg.get("device_map"), max_memory=cfg.get("max_memory"), name=f"demo · {handle.name}")


@dataclass
class Example:
    """One prompt's replies along the story (None where the step does not show it)."""

    prompt: str
    original: str
    original_refused: bool
    compressed: str | None = None
    compressed_refused: bool | None = None
    repaired: str | None = None
    repaired_refused: bool | None = None


@dataclass
class DemoStory:
    """What the demo shows: the study's results plus the example replies picked for each step."""

    model: str
    scheme: str
    results: StudyResults
    harmful: list[Example]   # the same prompts through the original, compressed and repaired model
    harmless: list[Example]  # the original's replies to harmless prompts

    @property
    def rows(self) -> list[dict]:
        return summary_rows(self.results)

    def rate(self, which: str, key: str = "refusal_harmful") -> float:
        """A rate of ``which`` (original / compressed / repaired) from the summary rows."""
        label = {"original": "original", "compressed": self.scheme, "repaired": f"{self.scheme} + AIRD"}[which]
        return next(r[key] for r in self.rows if r["model"] == label)


def demo_planned(study: Study) -> list[str]:
    """The stages the demo computes (for the time left in all)."""
    return study.planned_stages([DEMO_SCHEME], aird=True)


def demo_story(study: Study) -> DemoStory:
    """Run (or load) the demo study's stages and pick its example replies."""
    results = study.results()
    v = results.variants[DEMO_SCHEME]
    o = results.original.evaluation.sets
    c, r = v.evaluation.sets["harmful"].results, v.repaired.sets["harmful"].results
    steps = list(zip(o["harmful"].results, c, r))
    # the clearest cases first: refused, then answered after compression, then refused again
    steps.sort(key=lambda t: -(t[0].refused + (not t[1].refused) + t[2].refused))
    harmful = [Example(a.prompt, a.response, a.refused, b.response, b.refused, x.response, x.refused)
               for a, b, x in steps[:EXAMPLES]]
    answered = sorted(o["harmless"].results, key=lambda e: e.refused)  # answered ones first
    harmless = [Example(e.prompt, e.response, e.refused) for e in answered[:EXAMPLES]]
    return DemoStory(study.original.name, DEMO_SCHEME, results, harmful, harmless)


# ----------------------------------------------------------------------------------------------
# Figures (the Home page and the HTML export show the same ones)
# ----------------------------------------------------------------------------------------------

def original_figure(story: DemoStory) -> go.Figure:
    """Step 1: how often the original refuses harmful, harmless and borderline prompts."""
    o = story.rows[0]
    kinds = [("harmful", o["refusal_harmful"]), ("harmless", o["over_refusal_harmless"]),
             ("borderline", o["over_refusal_borderline"])]
    kinds = [(k, v) for k, v in kinds if v is not None]
    fig = go.Figure(go.Bar(x=[k for k, _ in kinds], y=[100 * v for _, v in kinds],
                           text=[f"{100 * v:.0f}%" for _, v in kinds], marker_color=["#d62728", "#1f77b4", "#9467bd"]
                           [:len(kinds)]))
    fig.update_layout(title=f"{story.model}: refusal by kind of prompt", yaxis_title="refused (%)",
                      yaxis_range=[0, 105], template="plotly_white", height=340, margin=dict(t=50, b=30))
    return fig


def drift_cosines_figure(story: DemoStory) -> go.Figure:
    """Step 2: cosine between the original's refusal direction and the compressed model's, per layer."""
    cos = story.results.variants[story.scheme].drift.cosine_per_layer
    fig = go.Figure(go.Scatter(x=list(range(len(cos))), y=cos, mode="lines+markers", name=story.scheme))
    src = story.results.original.source.source.layer
    if src is not None:
        fig.add_vline(x=src, line_dash="dot", annotation_text=f"original's source layer {src}")
    fig.update_layout(title=f"How far {story.scheme} moved the refusal direction (1 = unchanged)",
                      xaxis_title="layer", yaxis_title="cosine to the original's direction", yaxis_range=[-0.05, 1.05],
                      template="plotly_white", height=340, margin=dict(t=50, b=30))
    return fig


def before_after_figure(story: DemoStory) -> go.Figure:
    """Step 3: refusal on harmful prompts and over-refusal on harmless ones — original, compressed, repaired."""
    labels = ["original", story.scheme, f"{story.scheme} + AIRD"]
    fig = go.Figure()
    for key, name, color in (("refusal_harmful", "refusal on harmful prompts", "#d62728"),
                             ("over_refusal_harmless", "over-refusal on harmless prompts", "#1f77b4")):
        vals = [100 * story.rate(w, key) for w in ("original", "compressed", "repaired")]
        fig.add_trace(go.Bar(x=labels, y=vals, name=name, marker_color=color, text=[f"{v:.0f}%" for v in vals]))
    fig.update_layout(barmode="group", title="Before and after the repair", yaxis_title="%", yaxis_range=[0, 105],
                      template="plotly_white", height=360, margin=dict(t=50, b=30))
    return fig


# ----------------------------------------------------------------------------------------------
# The HTML export
# ----------------------------------------------------------------------------------------------

def _verdict(refused: bool | None) -> str:
    return "—" if refused is None else ("refuses" if refused else "answers")


def _examples_html(examples: list[Example], column: str) -> str:
    rows = "".join(f"<tr><td>{html.escape(e.prompt)}</td><td><b>{_verdict(getattr(e, column + '_refused'))}</b>"
                   f"<br>{html.escape(getattr(e, column) or '—')}</td></tr>" for e in examples)
    return f"<table><tr><th>prompt</th><th>reply</th></tr>{rows}</table>"


def demo_html(story: DemoStory) -> str:
    """The story as one self-contained HTML page (Plotly's JavaScript inlined once)."""
    figs = [original_figure(story), drift_cosines_figure(story), before_after_figure(story)]
    plots = [pio.to_html(f, full_html=False, include_plotlyjs="inline" if i == 0 else False)
             for i, f in enumerate(figs)]
    o, c, r = (100 * story.rate(w) for w in ("original", "compressed", "repaired"))
    v = story.results.variants[story.scheme]
    cos = v.drift.cosine
    verdict = html.escape("" if v.aird_verdict is None else v.aird_verdict.verdict)
    n = story.results.original.evaluation.sets["harmful"].n
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Refusal Lab demo · {html.escape(story.model)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:0.9em;width:100%}}td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;
text-align:left}}th{{background:#f4f4f4}}</style></head><body>
<h1>What compression does to refusal — and the repair</h1>
<p>Model <b>{html.escape(story.model)}</b>, compressed with <b>{html.escape(story.scheme)}</b>, repaired with AIRD
(this project's reconstruction of Chhabra &amp; Khalili 2025). Refusal is the
{html.escape(story.results.spec.get('judge', 'substring'))} judge on greedy replies
({story.results.spec['max_new_tokens']} new tokens) to {n} prompts per set; replies that are empty, loop or hold
no language count as broken, neither refusal nor compliance.</p>
<h2>1. The model refuses harmful prompts and answers harmless ones</h2>{plots[0]}
<h3>Harmful prompts</h3>{_examples_html(story.harmful, 'original')}
<h3>Harmless prompts</h3>{_examples_html(story.harmless, 'original')}
<h2>2. Compression breaks it: refusal {o:.0f}% → {c:.0f}%</h2>
<p>The refusal direction drifts: its cosine to the original's is {cos:.2f} at the original's source layer.</p>{plots[1]}
{_examples_html(story.harmful, 'compressed')}
<h2>3. The repair brings it back: {c:.0f}% → {r:.0f}%</h2>{plots[2]}<p>{verdict}</p>
{_examples_html(story.harmful, 'repaired')}
</body></html>"""
