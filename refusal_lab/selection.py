"""Direction selection (Arditi et al. 2024, stage 3): score candidate directions and choose one.

The rule: among candidates below ``max_layer_frac·n_layers`` whose *induce* score (mean refusal score
on harmless val prompts with the candidate added at its layer) exceeds ``induce_threshold`` and whose
*KL* (next-token KL on harmless val prompts under ablation) is below ``kl_threshold``, choose the one
with the lowest *bypass* score (mean refusal score on harmful val prompts with it ablated everywhere).
If none qualifies, the KL threshold is relaxed in steps, and then selection falls back to the lowest
bypass overall, with a warning naming the filters that removed the candidates.

The search computes exactly that choice in fewer forward passes (each pass = the val prompts of one
set under one intervention):

* induce first, for every candidate: on a compressed or small model few candidates can induce
  refusal, and only those need a bypass score (e.g. 2 of 138 on the embedded default);
* then bypass for the feasible ones, and KL in order of increasing bypass, stopping at the first pass;
* a KL check stops as soon as the prompts run so far prove KL ≥ the threshold (:class:`_LazyKL`).

``exhaustive=True`` computes all three scores for every candidate (the full grid, for plots).
``screen=k`` is an approximation (measured in BENCHMARKS.md): induce is first screened on ``k`` prompts.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from refusal_lab.activations import DEFAULT_MEMORY_MB, BatchRunner, tokenize
from refusal_lab.directions import MIN_KEPT, DirectionSet, _sha
from refusal_lab.evaluation import kl_per_prompt
from refusal_lab.interventions import ablate, add
from refusal_lab.judges import refusal_score_from_logits, refusal_token_ids
from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress, report

SCREEN_Z = 3.0  # standard errors a screened mean must clear to stay in the search
SCREEN_SURVIVORS = 0.15  # share of candidates a screen keeps (measured: 20 of 138 on the default model)

Candidate = tuple[int, int]  # (position offset, layer)


class _LazyKL:
    """KL(unmodified ‖ ablated) on the harmless val prompts, evaluated a batch of prompts at a time.

    Per-prompt KL is ≥ 0, so once the running sum over the batches run so far reaches ``n·t`` the mean
    is ≥ ``t`` whatever the remaining batches hold: the check "KL < t" is then decided without them —
    exactly, not estimated. Only candidates that pass (or come close) pay for every batch; the value
    of one decided early stays unknown (NaN). Batches are the runner's own, so every logit is the one
    a full pass computes."""

    def __init__(self, handle: ModelHandle, runner: BatchRunner, base_logits: torch.Tensor) -> None:
        self.handle, self.runner, self.base = handle, runner, base_logits
        self.n = len(runner)
        self.state: dict[Candidate, tuple[float, int]] = {}  # candidate → (running sum, batches run)

    def below(self, key: Candidate, direction: torch.Tensor, threshold: float) -> bool:
        """Whether the candidate's mean KL is < ``threshold`` (``inf``: evaluate every batch)."""
        total, done = self.state.get(key, (0.0, 0))
        n_batches = len(self.runner.batches)
        if done < n_batches and total < self.n * threshold:
            with ablate(self.handle, direction):
                for idx, logits in self.runner.run(batches=range(done, n_batches)):
                    total += float(kl_per_prompt(self.base[idx], logits).sum())
                    done += 1
                    if total >= self.n * threshold:
                        break
            self.state[key] = (total, done)
        return done == n_batches and self.value(key) < threshold

    def value(self, key: Candidate) -> float:
        """The mean KL when every batch was run, else NaN; rounded to float32 as the grid stores it, so
        that a check and the stored value always agree."""
        total, done = self.state.get(key, (0.0, 0))
        return float(torch.tensor(total / self.n, dtype=torch.float32)) if done == len(self.runner.batches) else math.nan

    @property
    def decided_early(self) -> int:
        return sum(done < len(self.runner.batches) for _, done in self.state.values())


def _spread_index(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k`` is None or ``≥ n``)."""
    return list(range(n)) if k is None or k >= n else [round(i * n / k) for i in range(k)]


def _spread(prompts: Sequence[str], k: int | None) -> list[str]:
    """``k`` prompts spread evenly over ``prompts`` (all of them when ``k`` is None or ``≥ len``)."""
    return [prompts[i] for i in _spread_index(len(prompts), k)]


def _screen(candidates: Sequence[Candidate], runner: BatchRunner, score, intervention, tick,
            start: Callable[[Candidate], int] = lambda c: 0, batches: Sequence[int] | None = None,
            kept: dict | None = None) -> dict:
    """``{candidate: (mean, standard error)}`` of the per-prompt ``score`` of ``runner``'s prompts (those
    of ``batches`` when given) under ``intervention(candidate)`` (a context manager), each pass run
    from block ``start(candidate)``; ``kept[candidate]`` receives the per-prompt scores ``(n,)`` (NaN
    for prompts not run), which a later full pass completes instead of running them again."""
    out = {}
    for c in candidates:
        with intervention(c):
            full = score(runner.last_logits(start=start(c), batches=batches)).double()
        s = full[~full.isnan()]
        if kept is not None:
            kept[c] = full
        se = float(s.std() / math.sqrt(len(s))) if len(s) > 1 else math.inf
        out[c] = (float(s.mean()), se)
        tick(len(s))
    return out


def candidate_grid(dirset: DirectionSet, positions: Sequence[int], n_layers: int,
                   max_layer_frac: float) -> tuple[list[int], list[Candidate], list[str]]:
    """The evaluated layers, the non-zero candidates ``(position, layer)`` among them, and warnings.

    Layers below ``int(max_layer_frac·n_layers)``; all layers when that leaves none, or no non-zero
    candidate (e.g. a 2-layer model, whose layer-0 candidates at template tokens are zero)."""
    msgs: list[str] = []
    cut = int(max_layer_frac * n_layers)
    layers = list(range(min(cut, n_layers)))
    if not layers:
        msgs.append(f"layer filter (< {max_layer_frac}·{n_layers}) removed every layer; evaluating all layers")
        layers = list(range(n_layers))

    def nonzero(ls: list[int]) -> list[Candidate]:
        return [(p, layer) for p in positions for layer in ls if float(dirset.candidate(p, layer).norm()) > 0]

    grid = nonzero(layers)
    if not grid and len(layers) < n_layers:
        msgs.append(f"no non-zero candidate below layer {cut} (layer filter < {max_layer_frac}·{n_layers}); "
                    "evaluating all layers")
        layers = list(range(n_layers))
        grid = nonzero(layers)
    if not grid:
        raise ValueError("every candidate direction is zero: the harmful and harmless means are identical "
                         "at the evaluated positions (are the two prompt sets the same?)")
    return layers, grid, msgs


@dataclasses.dataclass
class _Search:
    """The state of one selection: val runners, score grids ``(n_pos, n_layers)`` and the progress bar.

    Progress counts prompts run (a pass over the harmful val set is ``nh`` of them, a screen ``k``), so
    that the bar's pace, and the ETA drawn from it, holds across steps of different sizes."""

    handle: ModelHandle
    dirset: DirectionSet
    run_h: BatchRunner
    run_n: BatchRunner
    score: Callable[[torch.Tensor], torch.Tensor]
    progress: Progress | None
    total: int = 0
    done: int = 0
    passes: int = 0
    tables: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    screened_induce: dict = dataclasses.field(default_factory=dict)  # candidate → per-prompt scores of the screen

    def __post_init__(self) -> None:
        for name in ("bypass", "induce", "kl"):
            self.tables[name] = torch.full_like(getattr(self.dirset, name), math.nan)
        self.nh, self.nn = len(self.run_h), len(self.run_n)

    def tick(self, prompts: int, passes: int = 1) -> None:
        """``passes`` forward passes over ``prompts`` prompts in all were run."""
        self.done += prompts
        self.passes += passes
        self.total = max(self.total, self.done)
        report(self.progress, self.done, self.total)

    def plan(self, more: float) -> None:
        """The bar now expects ``more`` prompts after those run (the ETA follows)."""
        self.total = self.done + round(more)
        report(self.progress, self.done, self.total)

    def get(self, name: str, c: Candidate) -> float:
        return float(self.tables[name][self.dirset.pos_index(c[0]), c[1]])

    def put(self, name: str, c: Candidate, value: float) -> None:
        self.tables[name][self.dirset.pos_index(c[0]), c[1]] = value

    def bypass(self, cands: Sequence[Candidate]) -> None:
        """Exact bypass of each candidate: one pass over the harmful val prompts, ablated everywhere."""
        for c in cands:
            with ablate(self.handle, self.dirset.candidate(*c)):
                self.put("bypass", c, float(self.score(self.run_h.last_logits()).mean()))
            self.tick(self.nh)

    def induce(self, cands: Sequence[Candidate]) -> None:
        """Exact induce of each candidate: one pass over the harmless val prompts, added at its layer
        (the blocks below it are unchanged: the pass starts there, from the baseline's kept inputs).
        A screened candidate's screen batches are not run again: they are batches of this same pass."""
        for c in cands:
            if math.isnan(self.get("induce", c)):
                part = self.screened_induce.get(c)
                todo = None if part is None else [b for b in range(len(self.run_n.batches))
                                                  if b not in self.run_n.group_batches[0]]
                if todo == []:  # the screen ran every prompt
                    scores = part
                else:
                    with add(self.handle, self.dirset.candidate(*c), c[1], 1.0):
                        scores = self.score(self.run_n.last_logits(start=c[1], batches=todo)).double()
                    if part is not None:
                        scores = torch.where(scores.isnan(), part, scores)
                self.put("induce", c, float(scores.mean()))
                self.tick(self.nn if part is None else self.nn - int((~part.isnan()).sum()))

    def by_bypass(self, cands: Sequence[Candidate]) -> list[Candidate]:
        return sorted((c for c in cands if not math.isnan(self.get("bypass", c))), key=lambda c: self.get("bypass", c))


def _val_runners(handle: ModelHandle, harmful_val: list[str], harmless_val: list[str], filter_refusals: bool,
                 score, runner_kw: dict, msgs: list[str], keep: Sequence[int], screen: int | None):
    """Runners over the (optionally refusal-filtered) val prompts, the harmless baseline logits and the
    baseline scores; ``(run_h, run_n, base_n, s_h, s_n, harmful_val, harmless_val)``. The harmless
    runner keeps its inputs of blocks ``keep`` (induce passes start there) and, with ``screen``, batches
    the ``screen`` prompts spread over the set apart (``group_batches[0]``: the induce screen)."""
    def harmless_runner(vals: list[str]) -> BatchRunner:
        groups = [_spread_index(len(vals), screen)] if screen else ()
        return BatchRunner(handle, tokenize(handle, vals), groups=groups, **runner_kw)

    run_h = BatchRunner(handle, tokenize(handle, harmful_val), **runner_kw)
    run_n = harmless_runner(harmless_val)
    base_h, base_n = run_h.last_logits(), run_n.last_logits(keep_inputs=keep)
    s_h, s_n = score(base_h), score(base_n)
    if filter_refusals:
        keep_h, keep_n = (s_h > 0), (s_n < 0)
        for kind, keep, vals in (("harmful", keep_h, harmful_val), ("harmless", keep_n, harmless_val)):
            if int(keep.sum()) < MIN_KEPT:
                msgs.append(f"val refusal filter kept only {int(keep.sum())}/{len(vals)} {kind} prompts; using all")
                keep[:] = True
        if not bool(keep_h.all()):
            harmful_val = [q for q, k in zip(harmful_val, keep_h.tolist()) if k]
            run_h = BatchRunner(handle, tokenize(handle, harmful_val), **runner_kw)
        if not bool(keep_n.all()):
            harmless_val = [q for q, k in zip(harmless_val, keep_n.tolist()) if k]
            run_n = harmless_runner(harmless_val)
            run_n.last_logits(keep_inputs=keep)
            base_n = base_n[keep_n]
        s_h, s_n = s_h[keep_h], s_n[keep_n]
    return run_h, run_n, base_n, s_h, s_n, harmful_val, harmless_val


def select_direction(handle: ModelHandle, dirset: DirectionSet, harmful_val: Sequence[str],
                     harmless_val: Sequence[str], *, max_layer_frac: float = 0.8, kl_threshold: float = 0.1,
                     induce_threshold: float = 0.0, kl_relaxation: Sequence[float] = (0.25, 0.5, 1.0),
                     positions: Sequence[int] | None = None,
                     filter_refusals: bool = False, exhaustive: bool = False, screen: int | None = None,
                     batch_size: int | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                     progress: Progress | None = None) -> DirectionSet:
    """Score candidates and select one (the rule in this module's docstring); returns a new
    :class:`DirectionSet` with the scores computed (NaN elsewhere) and ``selected``.

    Cost (passes over one val set): one induce pass per candidate, one bypass pass per candidate that
    induces refusal, and KL checks in bypass order until one passes; ``exhaustive`` computes all three
    for every candidate (3 passes each). Candidates are ``positions`` (offsets; default all
    post-instruction positions) × layers below ``int(max_layer_frac·n_layers)``.

    ``filter_refusals`` keeps only harmful val prompts the unmodified model refuses and harmless ones it
    does not (the anchor's val filtering); dropped with a warning if fewer than ``MIN_KEPT`` remain.
    ``kl_relaxation`` are the relaxed KL thresholds tried in turn before the fallback (each step a
    warning; a small model's next-token distribution moves more than a 7B model's); ``()`` keeps the
    anchor's strict behaviour.

    ``screen=k`` (an approximation, off by default; measured in BENCHMARKS.md): induce is first
    measured for every candidate on ``k`` harmless val prompts spread over the set, and only candidates
    whose screened mean + ``SCREEN_Z`` standard errors exceeds the threshold are scored exactly. When
    the fallback is reached, bypass is screened the same way on ``k`` harmful val prompts and computed
    exactly for the candidates that may hold the lowest value.
    """
    _check_inputs(handle, dirset, harmful_val, harmless_val, screen)
    screen = None if exhaustive else screen
    t0 = time.perf_counter()
    msgs = list(dirset.metadata.get("warnings", []))
    pos_list = list(positions) if positions is not None else list(dirset.positions)
    for p in pos_list:
        dirset.pos_index(p)
    ref_ids = refusal_token_ids(handle.tokenizer)
    score = lambda logits: refusal_score_from_logits(logits, ref_ids)  # noqa: E731
    runner_kw = dict(batch_size=batch_size, memory_mb=memory_mb)
    L = handle.n_layers
    layers, grid, grid_msgs = candidate_grid(dirset, pos_list, L, max_layer_frac)
    msgs += grid_msgs
    n = len(grid)
    with handle.lock:
        run_h, run_n, base_n, s_h, s_n, harmful_val, harmless_val = _val_runners(
            handle, list(harmful_val), list(harmless_val), filter_refusals, score, runner_kw, msgs, layers, screen)
        s = _Search(handle, dirset, run_h, run_n, score, progress)
        # the plan: baseline, induce for all, then bypass + KL for about one candidate (exhaustive: all three)
        s.plan(s.nh + s.nn + (n * (s.nh + 2 * s.nn) if exhaustive else n * s.nn + s.nh + s.nn))
        s.tick(s.nh + s.nn, passes=2)
        lazy = _LazyKL(handle, run_n, base_n)
        screened: dict[str, dict] = {}
        if exhaustive:
            chosen, used_kl, removed, n_checked, searched = _exhaustive(
                s, grid, lazy, kl_threshold, induce_threshold, kl_relaxation, msgs)
        else:
            searched = _screened_induce(s, grid, screen, induce_threshold, screened) if screen else grid
            chosen, used_kl, removed, n_checked = _lazy(s, searched, lazy, kl_threshold, induce_threshold,
                                                        kl_relaxation, msgs)
            removed["screen"] = n - len(searched)
        fallback = chosen is None
        if fallback:
            chosen = _fallback(s, grid, lazy, screen, harmful_val, runner_kw, screened)
    if fallback:
        _warn_fallback(msgs, removed, chosen, n, kl_threshold, induce_threshold, screen)
    report(progress, s.done, s.done)  # finished: the bar ends full at the steps actually taken
    t = s.tables
    i = dirset.pos_index(chosen[0])
    meta = dict(dirset.metadata)
    meta.update({
        "warnings": msgs,
        "selection": {
            "max_layer_frac": max_layer_frac, "kl_threshold": kl_threshold, "induce_threshold": induce_threshold,
            "kl_relaxation": list(kl_relaxation), "kl_threshold_used": None if fallback else used_kl,
            "positions": pos_list, "layers": layers, "exhaustive": exhaustive, "order": "induce first",
            "layers_removed_by_layer_filter": [x for x in range(L) if x not in layers],
            "removed": {"layer": (L - len(layers)) * len(pos_list), **removed},
            "n_candidates": n, "n_checked": n_checked, "fallback": fallback, "passes": s.passes,
            "kl_decided_early": lazy.decided_early,
            "screen": _screen_record(screen, searched, screened),
            "harmful_val_sha": _sha(harmful_val), "harmless_val_sha": _sha(harmless_val),
            "n_harmful_val": len(harmful_val), "n_harmless_val": len(harmless_val),
            "filter_refusals": filter_refusals,
            "baseline_harmful_score": float(s_h.mean()), "baseline_harmless_score": float(s_n.mean()),
            "bypass": float(t["bypass"][i, chosen[1]]), "induce": float(t["induce"][i, chosen[1]]),
            "kl": float(t["kl"][i, chosen[1]]), "seconds": round(time.perf_counter() - t0, 2),
        },
    })
    return dataclasses.replace(dirset, bypass=t["bypass"], induce=t["induce"], kl=t["kl"], selected=chosen,
                               metadata=meta)


def _check_inputs(handle: ModelHandle, dirset: DirectionSet, harmful_val: Sequence[str], harmless_val: Sequence[str],
                  screen: int | None) -> None:
    if handle.n_layers != dirset.n_layers or handle.d_model != dirset.d_model:
        raise ValueError(f"direction set is for {dirset.n_layers} layers × {dirset.d_model}, "
                         f"model has {handle.n_layers} × {handle.d_model}")
    if not harmful_val or not harmless_val:
        raise ValueError("selection needs harmful and harmless validation prompts")
    if screen is not None and screen < 2:
        raise ValueError(f"screen needs at least 2 prompts (a standard error), got {screen}")


def _screened_induce(s: "_Search", grid: list[Candidate], screen: int, induce_threshold: float,
                     screened: dict[str, dict]) -> list[Candidate]:
    """Induce of every candidate on the screen's prompts (into ``screened["induce"]``); the candidates
    whose screened mean + ``SCREEN_Z`` standard errors exceeds the threshold (searched exactly)."""
    k = min(screen, s.nn)
    s.plan(len(grid) * k + SCREEN_SURVIVORS * len(grid) * (s.nn - k) + s.nh + s.nn)
    screened["induce"] = _screen(grid, s.run_n, s.score,
                                 lambda c: add(s.handle, s.dirset.candidate(*c), c[1], 1.0), s.tick,
                                 start=lambda c: c[1], batches=s.run_n.group_batches[0], kept=s.screened_induce)
    return [c for c in grid if screened["induce"][c][0] + SCREEN_Z * screened["induce"][c][1] > induce_threshold]


def _screen_record(screen: int | None, searched: list[Candidate], screened: dict[str, dict]) -> dict | None:
    """The screen's part of the selection metadata: its size, z, how many were searched, and the
    screened (mean, standard error) of every candidate."""
    if not screen:
        return None
    return {"prompts": screen, "z": SCREEN_Z, "searched": len(searched),
            **{f"{what}_mean_se": [[p, layer, m, se] for (p, layer), (m, se) in vals.items()]
               for what, vals in screened.items()}}


def _lazy(s: _Search, searched: list[Candidate], lazy: _LazyKL, kl_threshold: float, induce_threshold: float,
          kl_relaxation: Sequence[float], msgs: list[str]):
    """Induce for every searched candidate, bypass for those above ``induce_threshold``, KL in bypass order
    until one passes, then the relaxed KL thresholds. ``(chosen or None, kl used, removed, n_checked)``."""
    s.plan(len(searched) * s.nn + s.nh + s.nn)
    s.induce(searched)
    feasible = [c for c in searched if s.get("induce", c) > induce_threshold]
    removed = {"induce": len(searched) - len(feasible), "kl": 0}
    s.plan(len(feasible) * s.nh + min(1, len(feasible)) * s.nn)
    s.bypass(feasible)
    order = s.by_bypass(feasible)
    n_checked = 0
    for c in order:
        n_checked += 1
        ok = lazy.below(c, s.dirset.candidate(*c), kl_threshold)
        s.put("kl", c, lazy.value(c))
        s.tick(s.nn)
        if ok:
            return c, kl_threshold, removed, n_checked
        removed["kl"] += 1
        s.plan(s.nn if c != order[-1] else 0)
    chosen, used = _relax(s, order, lazy, kl_threshold, induce_threshold, kl_relaxation, removed, msgs)
    return chosen, used, removed, n_checked


def _relax(s: _Search, order: list[Candidate], lazy: _LazyKL, kl_threshold: float, induce_threshold: float,
           kl_relaxation: Sequence[float], removed: dict, msgs: list[str]) -> tuple[Candidate | None, float]:
    """The first candidate of ``order`` (feasible, by bypass) under each relaxed KL threshold in turn."""
    for relaxed in sorted(t for t in kl_relaxation if t > kl_threshold):
        for c in order:
            if lazy.below(c, s.dirset.candidate(*c), relaxed):
                s.put("kl", c, lazy.value(c))
                msg = (f"no candidate passed KL < {kl_threshold} with induce > {induce_threshold} "
                       f"[{', '.join(f'{k}: {v}' for k, v in removed.items() if v)}]; relaxed the KL "
                       f"threshold to {relaxed}: position {c[0]}, layer {c[1]}")
                msgs.append(msg)
                warnings.warn(msg)
                return c, relaxed
    return None, kl_threshold


def _exhaustive(s: _Search, grid: list[Candidate], lazy: _LazyKL, kl_threshold: float, induce_threshold: float,
                kl_relaxation: Sequence[float], msgs: list[str]):
    """All three scores for every candidate, then the rule's choice (with the same KL relaxation).
    ``(chosen or None, kl used, removed, n_checked, grid)``."""
    s.bypass(grid)
    s.induce(grid)
    removed = {"induce": 0, "kl": 0}
    for c in grid:
        lazy.below(c, s.dirset.candidate(*c), math.inf)
        s.put("kl", c, lazy.value(c))
        s.tick(s.nn)
        if s.get("induce", c) <= induce_threshold:
            removed["induce"] += 1
        elif s.get("kl", c) >= kl_threshold:
            removed["kl"] += 1
    order = [c for c in s.by_bypass(grid) if s.get("induce", c) > induce_threshold]
    ok = [c for c in order if s.get("kl", c) < kl_threshold]
    if ok:
        return ok[0], kl_threshold, removed, len(grid), grid
    chosen, used = _relax(s, order, lazy, kl_threshold, induce_threshold, kl_relaxation, removed, msgs)
    return chosen, used, removed, len(grid), grid


def _fallback(s: _Search, grid: list[Candidate], lazy: _LazyKL, screen: int | None,
              harmful_val: list[str], runner_kw: dict, screened: dict) -> Candidate:
    """The lowest bypass over the whole grid, with its KL and induce in full (the table shows them). Bypass is computed
    for the candidates still without one — or, with ``screen``, screened and computed where it may be lowest."""
    rest = [c for c in grid if math.isnan(s.get("bypass", c))]
    if rest and screen:
        scr_h = BatchRunner(s.handle, tokenize(s.handle, _spread(harmful_val, screen)), **runner_kw)
        s.plan(len(rest) * len(scr_h) + SCREEN_SURVIVORS * len(rest) * s.nh + s.nn)
        screened["bypass"] = _screen(rest, scr_h, s.score, lambda c: ablate(s.handle, s.dirset.candidate(*c)), s.tick)
        known = [(s.get("bypass", c), 0.0) for c in grid if not math.isnan(s.get("bypass", c))]
        bound = min(m + SCREEN_Z * se for m, se in [*known, *screened["bypass"].values()])
        rest = [c for c in rest if screened["bypass"][c][0] - SCREEN_Z * screened["bypass"][c][1] <= bound]
    s.plan(len(rest) * s.nh + s.nn)
    s.bypass(rest)
    chosen = s.by_bypass(grid)[0]
    if math.isnan(s.get("kl", chosen)):
        lazy.below(chosen, s.dirset.candidate(*chosen), math.inf)
        s.put("kl", chosen, lazy.value(chosen))
        s.tick(s.nn)
    s.induce([chosen])  # when it was screened out: the chosen candidate's three scores are always known
    return chosen


def _warn_fallback(msgs: list[str], removed: dict, chosen: Candidate, n: int, kl_threshold: float,
                   induce_threshold: float, screen: int | None) -> None:
    labels = {"kl": f"kl filter (KL < {kl_threshold})", "induce": f"induce filter (induce > {induce_threshold})",
              "screen": f"induce screen (on {screen} prompts)"}
    parts = [labels[name] for name, k in removed.items() if k]
    detail = ", ".join(f"{name}: {k}" for name, k in removed.items() if k)
    msg = (f"every evaluated candidate ({n}) was removed by the {' and '.join(parts)} "
           f"[{detail}]; falling back to the lowest bypass score at position {chosen[0]}, layer {chosen[1]}")
    msgs.append(msg)
    warnings.warn(msg)



def planned_passes(n_candidates: int, n_val: int, *, screen: int | None = None, exhaustive: bool = False) -> float:
    """Expected forward passes over one val set of a search without fallback: the two baselines, induce
    for every candidate (screened: ``screen/n_val`` of a pass each, then :data:`SCREEN_SURVIVORS` of
    them exactly), and bypass + KL for about one candidate; ``exhaustive``: three per candidate."""
    if exhaustive:
        return 2 + 3 * n_candidates
    induce = n_candidates if not screen else n_candidates * (min(screen, n_val) / n_val + SCREEN_SURVIVORS)
    return 2 + induce + 2


def seconds_per_pass(handle: ModelHandle, prompts: Sequence[str], *, sample: int = 8) -> float:
    """Wall seconds of one forward pass over ``prompts`` on this machine, timed on ``sample`` of them
    spread over the set and scaled by token count (a second or so for the default model)."""
    ids = tokenize(handle, prompts)
    few = _spread(list(range(len(ids))), sample)
    runner = BatchRunner(handle, [ids[i] for i in few])
    with handle.lock:
        runner.last_logits()  # warm-up: first-call allocations
        t0 = time.perf_counter()
        runner.last_logits()
        seconds = time.perf_counter() - t0
    share = sum(len(r) for r in runner.rest) / max(1, sum(len(s) - len(runner.prefix) for s in ids))
    return seconds / max(share, 1e-9)
