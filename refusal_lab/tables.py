"""Tables of result rows (dicts, e.g. :mod:`refusal_lab.study_rows`): as plain text for the terminal (the CLI,
bench scripts) and as HTML (the report)."""

from __future__ import annotations

import html
from collections.abc import Sequence


def text_table(heads: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table for the terminal: columns left-aligned, two spaces apart, no trailing blanks."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(str(h)), *(len(r[i]) for r in cells)]) for i, h in enumerate(heads)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [[str(h) for h in heads], *cells])


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return html.escape(str(v))


def rows_table_html(rows: list[dict]) -> str:
    """An HTML table of ``rows`` (columns in first-seen order; a missing value shows "—")."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
