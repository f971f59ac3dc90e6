"""AIRD calibration: choose the repair layers S and strength α on validation prompts.

The objective (:func:`choose`): the largest harmful refusal rate minus harmless + borderline
over-refusal, subject to over-refusal rising ≤ ``max_overrefusal_rise`` over the unrepaired model and
the KL rule (:func:`kl_acceptable`). Refusal rates are the substring judge's verdicts on greedy
replies — one generation of every val prompt per grid point, the cost of calibration.

``search="scored"`` (the default) walks the grid with a one-forward estimate instead: a prompt
counts as refused when its refusal score (:func:`refusal_lab.judges.refusal_score_from_logits` of the
first reply token) exceeds a threshold fitted on the unrepaired model's own generated verdicts on the
same val prompts (:func:`refusal_threshold`: a compressed model's refusals often start with less than
half the probability on the refusal openings, so 0 is not the boundary). The KL values are exact
either way (the first reply token's logits are the same forward). Then only the ``confirm`` best
points are generated, at ``confirm_precision`` like the unrepaired model's replies that fit the
threshold (float32 by default: the exact path, whatever the model's compute precision; the scores stay
at the model's own precision, and the threshold maps them to exact verdicts), and the choice among
them and the unrepaired model is made on those generated rates. ``search="generated"`` generates every
point (the reference; the two are compared in BENCHMARKS.md, "AIRD calibration").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from refusal_lab.activations import BatchRunner, tokenize
from refusal_lab.aird.repair import DEFAULT_ALPHAS, AIRDError, Mode, Repair, applied, unit
from refusal_lab.evaluation import kl_divergence
from refusal_lab.generation import generate_with_logits
from refusal_lab.judges import has_refusal_phrase, is_refusal, last_logits, refusal_score_from_logits, refusal_token_ids
from refusal_lab.models import ModelHandle
from refusal_lab.precision import running_at
from refusal_lab.progress import Progress, report
from refusal_lab.results import CalibrationPoint

Search = Literal["scored", "generated"]
SEARCHES: tuple[Search, ...] = get_args(Search)
DEFAULT_CONFIRM = 4  # grid points generated after a scored search, besides the unrepaired model: on default +
#                     wanda:0.5 the exact search's best point ranks 4th by score in float32 and in bf16 (BENCHMARKS.md)
CONFIRM_PRECISION: str | None = "float32"  # of the confirming generations: one val prompt decides between close points


@dataclass
class CalibrationSets:
    """Validation prompts for calibration (the bundled val splits by default — never test prompts)."""

    harmful: list[str]
    harmless: list[str]

    @classmethod
    def bundled(cls) -> "CalibrationSets":
        from refusal_lab.prompts import bundled

        return cls(harmful=bundled("harmful", "val").prompts,
                   harmless=bundled("harmless", "val").prompts + bundled("borderline", "val").prompts)


def candidate_layer_sets(source_layer: int, n_layers: int, max_layers: int = 4) -> list[list[int]]:
    """Repair-layer sets tried by calibration: ``[l*−1, l*]`` (the default), ``[l*]``, then growing
    windows ending at l*."""
    sets = [[source_layer - 1, source_layer], [source_layer]]
    sets += [list(range(source_layer - k + 1, source_layer + 1)) for k in range(3, max_layers + 1)]
    return [s for s in ([[x for x in s if 0 <= x < n_layers] for s in sets]) if s]


def kl_acceptable(kl_to_c: float, kl_to_o: float | None, base_kl_to_o: float | None, threshold: float) -> bool:
    """The calibration's KL rule on harmless prompts: KL to C ≤ ``threshold``, or (when O's logits are
    known) KL to O no larger than C's own ``base_kl_to_o`` — a move back toward the original."""
    return kl_to_c <= threshold or (kl_to_o is not None and base_kl_to_o is not None
                                    and kl_to_o <= base_kl_to_o + 1e-9)


def _rank(g: CalibrationPoint) -> tuple:
    """:func:`choose`'s order: refusal minus over-refusal, then refusal score, no re-alignment, fewer
    layers, smaller α."""
    return (round(g.harmful_refusal - g.harmless_refusal, 6), g.harmful_score, -g.realign, -len(g.layers), -g.alpha)


def choose(grid: Sequence[CalibrationPoint]) -> CalibrationPoint:
    """The calibration point to keep: among feasible points, the largest harmful refusal minus
    harmless over-refusal (ties: larger refusal score, no re-alignment, fewer layers, smaller α).

    Refusal minus over-refusal, not refusal alone: under a loose over-refusal limit the largest refusal
    sits at the largest feasible α, at the edge where refusal collapses (measured: BENCHMARKS.md)."""
    feasible = [g for g in grid if g.feasible]
    if not feasible:
        raise AIRDError("no feasible calibration point (the unrepaired model is always one)")
    return max(feasible, key=_rank)


def refusal_threshold(scores: torch.Tensor, refused: Sequence[bool]) -> tuple[float, float]:
    """The refusal-score threshold that best reproduces generated verdicts: ``(t, agreement)`` with
    ``score > t`` ⇔ refused on the largest share ``agreement`` of the prompts; among equally good
    thresholds the middle one. ``scores`` ``(n,)``, one verdict per prompt."""
    s = scores.double().sort().values
    cuts = torch.cat([s[:1] - 1, (s[1:] + s[:-1]) / 2, s[-1:] + 1])  # below all, between neighbours, above all
    y = torch.tensor([bool(r) for r in refused])
    agree = torch.stack([((scores.double() > t) == y).double().mean() for t in cuts])
    best = torch.nonzero(agree == agree.max()).squeeze(-1)
    return float(cuts[best[len(best) // 2]]), float(agree.max())


class _Measure:
    """Refusal rates, refusal score and harmless logits of ``handle`` (under whatever repair is applied)."""

    def __init__(self, handle: ModelHandle, sets: CalibrationSets, gen_tokens: int) -> None:
        self.handle, self.sets, self.gen_tokens = handle, sets, gen_tokens
        self.ids = refusal_token_ids(handle.tokenizer)
        self.threshold = 0.0  # of the scored verdicts (fit_threshold)
        self.runners = {kind: BatchRunner(handle, tokenize(handle, list(prompts)))
                        for kind, prompts in (("harmless", sets.harmless), ("harmful", sets.harmful))}

    def _last_logits(self, kind: str, start: int, keep: Sequence[int]) -> torch.Tensor:
        with self.handle.lock:
            return self.runners[kind].last_logits(start=start, keep_inputs=keep)

    def generated(self) -> dict:
        """Greedy replies of ``gen_tokens`` judged by the substring judge; scores from their first step.
        The per-prompt scores and verdicts are kept in ``self.detail``."""
        out, self.detail = {}, {}
        harmful, harmless = list(self.sets.harmful), list(self.sets.harmless)
        # one generation for both sets: continuous batching keeps the batch full across their boundary
        replies, logits = generate_with_logits(self.handle, harmful + harmless, max_new_tokens=self.gen_tokens,
                                               stop_when=has_refusal_phrase)  # the verdict is settled
        for kind, part in (("harmful", slice(0, len(harmful))), ("harmless", slice(len(harmful), None))):
            refused = [is_refusal(r) for r in replies[part]]
            out[kind] = (sum(refused) / len(refused), logits[part])
            self.detail[kind] = (refusal_score_from_logits(logits[part], self.ids), refused)
        return self._point(out)

    def fit_threshold(self, scores: dict[str, torch.Tensor]) -> dict:
        """Fit the scored verdicts' threshold: ``scores`` (kind → one refusal score per prompt) against the
        last :meth:`generated` measurement's verdicts on the same prompts."""
        flat = torch.cat([scores[k] for k in ("harmful", "harmless")])
        refused = [r for k in ("harmful", "harmless") for r in self.detail[k][1]]
        self.threshold, agreement = refusal_threshold(flat, refused)
        return {"score_threshold": self.threshold, "threshold_agreement": agreement}

    def scored(self, harmless_ok: Callable[[float, torch.Tensor], bool] | None = None, *, start: int = 0,
               keep: Sequence[int] = (), fit: bool = False) -> dict:
        """One forward per prompt: refused when the first reply token's refusal score is > the fitted
        threshold. Harmless prompts first: when ``harmless_ok(rate, logits)`` is False the point is
        infeasible whatever the harmful prompts do, and they are not run (their fields are None).
        ``start``/``keep``: :meth:`refusal_lab.activations.BatchRunner.run` (the repair touches no block below
        ``start``; the unrepaired pass keeps the inputs of blocks ``keep``). ``fit``: first fit the threshold
        on these scores (the unrepaired model's pass; :meth:`fit_threshold`), and return it in the point."""
        logits, fitted = {}, {}
        for kind in ("harmless", "harmful"):
            logits[kind] = self._last_logits(kind, start, keep)
            if fit:
                continue
            rate = self._rate(logits[kind])
            if kind == "harmless" and harmless_ok is not None and not harmless_ok(rate, logits[kind]):
                return {"harmful_refusal": None, "harmless_refusal": rate, "harmful_score": None,
                        "harmless_logits": logits[kind]}
        if fit:
            fitted = self.fit_threshold({k: refusal_score_from_logits(v, self.ids) for k, v in logits.items()})
        return {**self._point({k: (self._rate(v), v) for k, v in logits.items()}), **fitted}

    def _rate(self, logits: torch.Tensor) -> float:
        """Share of prompts whose first-token refusal score is above the fitted threshold."""
        return float((refusal_score_from_logits(logits, self.ids) > self.threshold).float().mean())

    def _point(self, out: dict) -> dict:
        return {"harmful_refusal": out["harmful"][0], "harmless_refusal": out["harmless"][0],
                "harmful_score": float(refusal_score_from_logits(out["harmful"][1], self.ids).mean()),
                "harmless_logits": out["harmless"][1]}


def calibrate(compressed: ModelHandle, direction: torch.Tensor, source_layer: int, *,
              sets: CalibrationSets | None = None, layer_sets: Sequence[Sequence[int]] | None = None,
              alphas: Sequence[float] = DEFAULT_ALPHAS, max_overrefusal_rise: float = 0.02,
              kl_threshold: float = 0.1, gen_tokens: int = 24, mode: Mode = "merged",
              realignment: tuple[int, torch.Tensor] | None = None, require_realignment: bool = False,
              original: ModelHandle | None = None, search: Search = "scored", confirm: int = DEFAULT_CONFIRM,
              confirm_precision: str | None = CONFIRM_PRECISION, original_logits: torch.Tensor | None = None,
              progress: Progress | None = None) -> Repair:
    """Choose S and α on validation prompts (module docstring: objective, ``search``, ``confirm``).

    KL rule: KL to C on harmless prompts ≤ ``kl_threshold`` — or, given the ``original`` O, KL to O no
    larger than C's own KL to O: a repair that moves harmless behaviour back toward the original is not
    damage, though it moves away from C (one that moves away from both is).

    With ``realignment`` (``(layer, u)`` from :func:`refusal_lab.aird.fit_realignment`) the grid is searched
    twice, without and with it, against the same unrepaired baseline, and the re-alignment is kept only
    if it is chosen (``require_realignment``: only the grid with it). Runs in adapter form (hooks;
    identical function to merged), so it also works on quantized layers; α grows per layer set until a
    constraint fails or harmful refusal stops rising (a larger α then only costs over-refusal).
    Returns the chosen :class:`~refusal_lab.aird.Repair` with the whole grid in ``calibration`` (each point
    says how it was ``measured``); α = 0 (no repair) when nothing beats the unrepaired model.
    """
    if search not in SEARCHES:
        raise AIRDError(f"calibration search must be one of {SEARCHES}, got {search!r}")
    if require_realignment and realignment is None:
        raise AIRDError("require_realignment needs a realignment")
    sets = sets or CalibrationSets.bundled()
    layer_sets = [list(s) for s in (layer_sets or candidate_layer_sets(source_layer, compressed.n_layers))]
    r = unit(direction).float()
    fits = [None] if realignment is None else [realignment] if require_realignment else [None, realignment]
    meas = _Measure(compressed, sets, gen_tokens)
    steps = len(fits) * (1 + len(layer_sets) * len(alphas))
    gen_steps = 0 if search == "generated" else 1 + confirm
    state = {"done": 0, "total": steps + gen_steps}

    def tick(skip: int = 0) -> None:
        state["done"] += 1 + skip
        report(progress, state["done"], state["total"])

    def trial(fit, layers: list[int], alpha: float) -> Repair:
        return Repair(r, layers, alpha, "adapter", source_layer, realign=None if fit is None else fit[1],
                      realign_layer=None if fit is None else fit[0])

    def first_block(fit, layers: Sequence[int]) -> int:  # the lowest block a trial touches
        return min([*layers, *([] if fit is None else [fit[0]])], default=0)

    with running_at(compressed, confirm_precision if search == "scored" else None):
        generated_base = meas.generated()  # the yardstick of confirmed points, and the threshold's verdicts
    starts = sorted({first_block(f, ls) for f in fits for ls in [[], *layer_sets]} - {0})
    base = generated_base
    if search == "scored":
        base = meas.scored(keep=starts, fit=True)
        generated_base.update({k: base.pop(k) for k in ("score_threshold", "threshold_agreement")})
        tick()
    o_logits = original_logits  # O's harmless val logits, when the caller keeps them (a study's schemes share them)
    if o_logits is None and original is not None:
        o_logits = last_logits(original, sets.harmless)
    judge = _Judge(base, o_logits, max_overrefusal_rise, kl_threshold)

    def measure(fit, layers: Sequence[int]) -> dict:
        if search == "generated":
            return meas.generated()
        return meas.scored(judge.harmless_ok, start=first_block(fit, layers))
    grid: list[CalibrationPoint] = []
    for fit in fits:
        if fit is None:  # the unrepaired model: measured above
            grid.append(judge.point(None, [], 0.0, dict(base), search))
        else:
            with applied(compressed, trial(fit, [], 0.0)):
                grid.append(judge.point(fit, [], 0.0, measure(fit, []), search))
        tick()
        for layers in layer_sets:
            previous = -1.0
            for k, alpha in enumerate(sorted(alphas)):
                with applied(compressed, trial(fit, layers, alpha)):
                    grid.append(judge.point(fit, layers, alpha, measure(fit, layers), search))
                gained = grid[-1].feasible and grid[-1].harmful_refusal > previous + 1e-9
                previous = grid[-1].harmful_refusal if grid[-1].feasible else previous
                if not gained:
                    tick(len(alphas) - k - 1)
                    break  # larger α only moves further: past a constraint, or past the refusal plateau
                tick()
    if search == "scored":
        with running_at(compressed, confirm_precision):
            grid = _confirm(grid, compressed, meas, trial, realignment, confirm, generated_base, o_logits,
                            max_overrefusal_rise, kl_threshold, tick)
    best = choose(grid)
    layers = best.layers or candidate_layer_sets(source_layer, compressed.n_layers)[0]
    for g in grid:
        g.chosen = g is best
    fit = realignment if best.realign else None
    report(progress, state["done"], state["done"])
    return Repair(direction=r, layers=layers, alpha=best.alpha, mode=mode, source_layer=source_layer,
                  calibration=grid, auto=True, realign=None if fit is None else fit[1],
                  realign_layer=None if fit is None else fit[0])


class _Judge:
    """Feasibility of grid points against the unrepaired model's measurement ``base``."""

    def __init__(self, base: dict, o_logits: torch.Tensor | None, max_rise: float, kl_threshold: float) -> None:
        self.base, self.o_logits, self.max_rise, self.kl_threshold = base, o_logits, max_rise, kl_threshold
        self.base_logits = base["harmless_logits"]
        self.base_kl_o = None if o_logits is None else kl_divergence(o_logits, self.base_logits)
        self._last: tuple | None = None  # (logits, KL to C, KL to O) of the last logits asked about

    def kls(self, logits: torch.Tensor) -> tuple[float, float | None]:
        """KL to C and to O (None without O's logits) of harmless ``logits``; the last pair is kept, since
        :meth:`harmless_ok` and :meth:`point` ask for the same logits in turn."""
        if self._last is None or self._last[0] is not logits:
            kl_o = None if self.o_logits is None else kl_divergence(self.o_logits, logits)
            self._last = (logits, kl_divergence(self.base_logits, logits), kl_o)
        return self._last[1], self._last[2]

    def harmless_ok(self, rate: float, logits: torch.Tensor) -> bool:
        """The harmless half of feasibility: over-refusal rise and the KL rule."""
        kl, kl_o = self.kls(logits)
        return (rate - self.base["harmless_refusal"] <= self.max_rise + 1e-9
                and kl_acceptable(kl, kl_o, self.base_kl_o, self.kl_threshold))

    def point(self, fit, layers: list[int], alpha: float, m: dict, measured: str) -> CalibrationPoint:
        """The grid point of a measurement ``m`` (:class:`_Measure`'s: rates, score, harmless logits)."""
        m = dict(m)
        logits = m.pop("harmless_logits")
        kl, kl_o = self.kls(logits)
        feasible = self.harmless_ok(m["harmless_refusal"], logits)
        assert m["harmful_refusal"] is not None or not feasible  # harmful skipped only when infeasible
        return CalibrationPoint(realign=fit is not None, layers=list(layers), alpha=alpha, measured=measured,
                                kl=kl, kl_original=kl_o, feasible=feasible, **m)


def _confirm(grid: list[CalibrationPoint], compressed: ModelHandle, meas: _Measure, trial, realignment, confirm: int,
             base: dict, o_logits, max_rise: float, kl_threshold: float, tick) -> list[CalibrationPoint]:
    """Generate the ``confirm`` best scored points; their feasibility and rates become the generated ones,
    judged against ``base`` (the unrepaired model's generated measurement), and the scored values stay
    in ``scored_*``. Points not confirmed stay in the grid, infeasible for the choice."""
    ranked = sorted((g for g in grid if g.feasible and not g.unrepaired), key=_rank, reverse=True)[:confirm]
    judge = _Judge(base, o_logits, max_rise, kl_threshold)
    out = []
    for g in grid:
        scored = {"scored_harmful_refusal": g.harmful_refusal, "scored_harmless_refusal": g.harmless_refusal,
                  "scored_feasible": g.feasible}
        if g.unrepaired:
            new = judge.point(None, [], 0.0, dict(base), "generated")
        elif any(g is x for x in ranked):
            fit = realignment if g.realign else None
            with applied(compressed, trial(fit, g.layers, g.alpha)):
                new = judge.point(fit, g.layers, g.alpha, meas.generated(), "generated")
            tick()
        else:
            new = replace(g, feasible=False, harmful_refusal=None, harmless_refusal=None)
        out.append(replace(new, **scored))
    for _ in range(confirm - len(ranked)):
        tick()
    return out
