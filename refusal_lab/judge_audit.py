"""Auditing a judge on replies produced elsewhere: read (prompt, reply[, label]) records, judge them, and
compare judges with each other or with the labels — counts per outcome, agreement, Cohen's κ and a
confusion table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from refusal_lab.codec import JsonRecord
from refusal_lab.judges import OUTCOMES
from refusal_lab.prompts import PromptFileError, csv_records, jsonl_records, read_text_file


@dataclass(kw_only=True)
class JudgedReply(JsonRecord):
    prompt: str
    reply: str
    label: str | None = None
    outcomes: dict[str, str] = field(default_factory=dict)  # judge name → outcome


@dataclass(kw_only=True)
class Agreement(JsonRecord):
    """Two sets of outcomes on the same replies (``a`` and ``b``: judge names or ``label``)."""

    a: str
    b: str
    n: int
    agreement: float
    kappa: float | None  # None when chance agreement is 1 (both always say the same outcome)
    confusion: dict[str, dict[str, int]]  # a's outcome → b's outcome → count


def read_replies(path: str | Path) -> list[JudgedReply]:
    """JSONL or CSV with ``prompt`` and ``reply`` (optional ``label``: refused | complied | broken)."""
    path = Path(path).expanduser()
    text = read_text_file(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "jsonl":
        rows = jsonl_records(text, str(path))
    elif fmt == "csv":
        rows = csv_records(text, str(path)) if text.strip() else []
    else:
        raise PromptFileError(f"{path}: replies must be .jsonl or .csv, with columns prompt and reply")
    if not rows:
        raise PromptFileError(f"{path}: no replies in the file")
    out = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or None in r:
            raise PromptFileError(f"{path}: record {i} is not a (prompt, reply[, label]) record")
        missing = [k for k in ("prompt", "reply") if not isinstance(r.get(k), str)]
        if missing:
            raise PromptFileError(f"{path}: record {i} has no {' or '.join(missing)} (columns: prompt, reply, "
                                  "optional label)")
        label = r.get("label")
        label = None if label in (None, "") else str(label).strip().lower()
        if label is not None and label not in OUTCOMES:
            raise PromptFileError(f"{path}: record {i} has label {label!r}; labels are {', '.join(OUTCOMES)}")
        out.append(JudgedReply(prompt=r["prompt"], reply=r["reply"], label=label))
    return out


def cohens_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's κ of two label sequences: (observed − chance agreement) / (1 − chance); None when chance is 1."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    chance = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / n ** 2
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def agreement(a_name: str, a: list[str], b_name: str, b: list[str]) -> Agreement:
    kinds = OUTCOMES + (("unjudged",) if "unjudged" in set(a) | set(b) else ())
    confusion = {x: {y: 0 for y in kinds} for x in kinds}
    for x, y in zip(a, b):
        confusion[x][y] += 1
    return Agreement(a=a_name, b=b_name, n=len(a), agreement=sum(x == y for x, y in zip(a, b)) / len(a),
                     kappa=cohens_kappa(a, b), confusion=confusion)


def rejudge(replies: list, judge: str) -> list[str]:
    """Outcomes another judge gives stored replies (:class:`refusal_lab.results.Reply`: text and first-
    position refusal score), for judges that need nothing else (substring, score)."""
    from refusal_lab.judges import make_judge

    return make_judge(judge).judge([r.prompt for r in replies], [r.response for r in replies],
                                   [r.refusal_score for r in replies])


def reply_rows(replies: list, outcomes: list[str] | None = None, other: tuple[str, list[str]] | None = None) -> list[dict]:
    """Table rows of stored replies: outcome (``outcomes``, else the stored one), the ``other`` judge's
    outcome when given as ``(name, outcomes)``, prompt, reply, refusal score."""
    own = outcomes or [r.outcome or ("refused" if r.refused else "complied") for r in replies]
    rows = []
    for i, r in enumerate(replies):
        row = {"outcome": own[i]}
        if other is not None:
            row[other[0]] = other[1][i]
        rows.append({**row, "prompt": r.prompt, "reply": r.response, "refusal score": r.refusal_score})
    return rows
