"""Time left in a whole study (or a page's part of one), not just in its current stage.

A study announces its stages (:meth:`refusal_lab.study.Study.planned_stages`); each one costs about what the
same *kind* of stage cost before: earlier in this run (the first variant's evaluation times the
second's), else the median of computed stages of that kind stored in the run store for the same model
and precision — scaled, once one of a variant's own stages has run, by how much slower or faster that
variant ran than those estimates (a bitsandbytes variant's stages take 2–4× a pruned one's on the CPU:
BENCHMARKS.md), and replaced by the variant's own time where it already ran that kind (its repaired
evaluation after its evaluation). Stages already stored in this study load in about no time. The current stage's own
time left comes from its progress (:class:`refusal_lab.progress.Eta`). Kinds never timed count as zero, and
the estimate says how many there are, so it is a lower bound until every kind has been seen once —
the honest answer on a fresh store.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# stage-name prefix → kind, first match wins ("directions original" searches; a variant's only extracts)
KINDS: tuple[tuple[str, str], ...] = (
    ("directions original", "directions original"), ("directions ", "directions variant"),
    ("repaired directions", "repaired directions"), ("evaluate ", "evaluate"), ("method ", "evaluate"),
    ("compress", "compress"), ("drift ", "drift"), ("diagnostic ", "diagnostic"), ("aird ", "aird"),
    ("budget ", "budget"), ("distill teacher replies", "distill teacher replies"), ("distill ", "distill"),
    ("aird+distill ", "distill"),
)


def stage_kind(stage: str) -> str:
    """The kind of a stage name (``"evaluate wanda:0.5+aird"`` → ``"evaluate"``); the name itself when unknown."""
    return next((kind for prefix, kind in KINDS if stage.startswith(prefix)), stage)


def stage_model(stage: str) -> str:
    """The model a stage runs on: its scheme (``"evaluate wanda:0.5+aird"``, ``"method wanda:0.5: distill"``
    → ``"wanda:0.5"``), or ``"original"`` (the original's stages, the teacher's replies, unknown names)."""
    prefix = next((p for p, _ in KINDS if stage.startswith(p)), None)
    rest = stage[len(prefix):].split(": ")[0].strip() if prefix else ""
    return rest.split(" ")[-1].split("+")[0] if rest else "original"


def stage_history(store, model: str, precision: str) -> dict[str, float]:
    """Median seconds per stage kind of the stages computed (not copied) by studies in ``store`` of the
    same ``model`` spec and compute ``precision``. Unreadable studies are skipped."""
    from refusal_lab.store import StudyRecord

    seen: dict[str, list[float]] = {}
    for info in store.list_studies():
        spec = info.spec or {}
        if info.problem or spec.get("model") != model or spec.get("precision", "float32") != precision:
            continue
        try:
            entries = StudyRecord(info.path).manifest["stages"].values()
        except Exception:  # a damaged peer never stops an estimate
            continue
        for e in entries:
            seconds = e.get("seconds") if isinstance(e, dict) else None
            if isinstance(seconds, (int, float)) and seconds > 0.5:  # copied / loaded entries cost nothing
                seen.setdefault(stage_kind(str(e.get("stage", ""))), []).append(float(seconds))
    return {kind: statistics.median(v) for kind, v in seen.items()}


@dataclass
class StudyEta:
    """Time left in ``planned`` stages. Feed it :meth:`on_stage` (``Study.on_stage``;
    stages may nest — a drift computes its variant's directions — and each is timed without the stages
    nested in it) and ask :meth:`left` with the innermost stage's own estimate from its progress.
    ``stored``: stage names already in this study's record (they only load). ``clock``: for tests."""

    planned: Sequence[str]
    history: dict[str, float] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)
    clock: Callable[[], float] = time.monotonic
    done: set[str] = field(default_factory=set)
    running: list[list] = field(default_factory=list)  # [stage, start, seconds of stages nested in it]
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)  # kind → {model: own seconds}, last last
    pace: dict[str, list[float]] = field(default_factory=dict)  # model → [own seconds, estimated seconds]

    def on_stage(self, stage: str, seconds: float | None) -> None:
        """``Study.on_stage``: a start (``seconds`` None) or an end."""
        if seconds is None:
            self.started(stage)
        else:
            self.finished(stage, seconds)

    def started(self, stage: str) -> None:
        self.running.append([stage, self.clock(), 0.0])

    def finished(self, stage: str, seconds: float) -> None:
        """``stage`` ended after ``seconds`` (its own time is that minus its nested stages')."""
        i = max((k for k, r in enumerate(self.running) if r[0] == stage), default=None)
        nested = 0.0
        if i is not None:
            nested = self.running[i][2]
            del self.running[i:]
        if self.running:
            self.running[-1][2] += seconds
        kind, model, own = stage_kind(stage), stage_model(stage), max(0.0, seconds - nested)
        base = self._elsewhere(kind, model)
        if base and kind != "compress":  # compressing is the scheme's own algorithm, not its speed
            pace = self.pace.setdefault(model, [0.0, 0.0])
            pace[0], pace[1] = pace[0] + own, pace[1] + base
        self.by_model.setdefault(kind, {}).pop(model, None)
        self.by_model[kind][model] = own
        self.done.add(stage)

    @property
    def measured(self) -> dict[str, float]:
        """Kind → own seconds of its last stage this run."""
        return {kind: list(seen.values())[-1] for kind, seen in self.by_model.items()}

    def _elsewhere(self, kind: str, model: str) -> float | None:
        """Seconds of a ``kind`` stage known from other models: the last one this run, else the history."""
        others = [v for m, v in self.by_model.get(kind, {}).items() if m != model]
        return others[-1] if others else self.history.get(kind)

    def estimate(self, stage: str) -> float | None:
        """Seconds ``stage`` is expected to take (None: its kind was never timed): its model's own time
        for that kind, else another model's scaled by its model's pace so far."""
        if stage in self.stored:
            return 0.0
        kind, model = stage_kind(stage), stage_model(stage)
        if model in self.by_model.get(kind, {}):
            return self.by_model[kind][model]
        base = self._elsewhere(kind, model)
        if base is None:
            return None
        own, est = self.pace.get(model, (0.0, 0.0))
        return base * (own / est) if est > 0 and kind != "compress" else base

    def left(self, current_left: float | None = None) -> tuple[float, int]:
        """``(seconds left, stages whose kind was never timed)`` over the planned stages not done yet.
        The innermost running stage counts ``current_left`` when given (from its progress); running
        stages otherwise count their estimate minus the time they have run (nested stages excluded)."""
        now = self.clock()
        running = {r[0] for r in self.running}
        total, unknown = 0.0, 0
        for k, (stage, start, nested) in enumerate(self.running):
            if k == len(self.running) - 1 and current_left is not None:
                total += current_left
                continue
            est = self.estimate(stage)
            if est is None:
                unknown += 1
            else:
                total += max(0.0, est - (now - start - nested))
        for s in self.planned:
            if s in self.done or s in running:
                continue
            est = self.estimate(s)
            if est is None:
                unknown += 1
            else:
                total += est
        return total, unknown

    def describe(self, current_left: float | None = None) -> str:
        """``~6 min left in all`` / ``at least ~2 min left in all (3 stages not timed yet)`` / ``""``."""
        from refusal_lab.progress import format_seconds

        seconds, unknown = self.left(current_left)
        if unknown == 0:
            return f"{format_seconds(seconds)} left in all"
        if seconds < 1:
            return ""
        plural = "s" if unknown > 1 else ""
        return f"at least {format_seconds(seconds)} left in all ({unknown} stage{plural} not timed yet)"


def for_study(study, planned: Sequence[str]) -> StudyEta:
    """A :class:`StudyEta` over ``planned`` stages of ``study`` (a :class:`refusal_lab.study.Study`): the stages
    its record already holds load, the others cost what the run store's history says."""
    stored = {str(e.get("stage")) for e in study.record.manifest["stages"].values() if isinstance(e, dict)}
    for p in planned:  # a variant is compressed only when one of its stages must be computed
        scheme = p[len("compress "):] if p.startswith("compress ") else None
        mine = lambda q: any(t.rstrip(":") in (scheme, f"{scheme}+aird") for t in q.split(" ")[1:])  # noqa: E731
        if scheme and all(q in stored for q in planned if q != p and mine(q)):
            stored.add(p)
    return StudyEta(planned, stage_history(study.store, study.spec.model, study.precision), stored)
