"""Refusal directions: difference-in-means candidates, selection, persistence, comparison.

Follows Arditi et al. 2024 ("Refusal in language models is mediated by a single direction"):

1. :func:`generate_candidates` — ``r[pos, layer] = mean_harmful − mean_harmless`` of the residual
   stream at each post-instruction position and block input, shape ``(n_pos, n_layers, d_model)``.
2. :func:`select_direction` — for every candidate below ``max_layer_frac·n_layers``: *bypass* (mean
   refusal score on harmful val prompts with the candidate ablated everywhere), *induce* (mean refusal
   score on harmless val prompts with the candidate added at its layer) and *KL* (next-token KL on
   harmless val prompts under ablation). Keep KL < ``kl_threshold`` and induce > ``induce_threshold``;
   pick the lowest bypass. If nothing survives, fall back to the lowest bypass with a warning naming
   the filters that removed the candidates.

Refusal score: ``log P(R) − log(1 − P(R))`` at the last prompt position, R the first tokens of
typical refusal openings for this tokenizer (:func:`core.judges.refusal_token_ids`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.activations import (DEFAULT_MEMORY_MB, BatchRunner, mean_activations, post_instruction_tokens,
                              tokenize)
from core.evaluation import kl_per_prompt
from core.interventions import ablate, add
from core.judges import refusal_score_from_logits, refusal_token_ids
from core.models import ModelHandle
from core.progress import Progress, report
from core.prompts import PromptSet

FORMAT_VERSION = 1
TENSORS_FILE = "directions.safetensors"
META_FILE = "directions.json"
MIN_KEPT = 4  # fewer prompts than this after a refusal filter → the filter is dropped with a warning


def _sha(prompts: Sequence[str]) -> str:
    return prompts.sha if isinstance(prompts, PromptSet) else PromptSet("prompts", list(prompts)).sha


# ----------------------------------------------------------------------------------------------
# The direction set
# ----------------------------------------------------------------------------------------------

@dataclass
class DirectionSet:
    """Candidates, their selection scores and the chosen direction for one model.

    * ``candidates`` ``(n_pos, n_layers, d_model)`` float32 — raw difference-in-means vectors.
    * ``mean_harmful`` / ``mean_harmless`` ``(n_pos, n_layers + 1, d_model)`` float32 — the means
      (the last layer slot is the final-norm input).
    * ``positions`` — negative offsets of the post-instruction positions (``-1`` = last token).
    * ``bypass`` / ``induce`` / ``kl`` ``(n_pos, n_layers)`` float32, NaN where not evaluated.
    * ``selected`` — ``(position offset, layer)`` or None before selection.
    * ``metadata`` — model fingerprint, prompt-set hashes, thresholds, filter counts, warnings, …
    """

    candidates: torch.Tensor
    mean_harmful: torch.Tensor
    mean_harmless: torch.Tensor
    positions: list[int]
    bypass: torch.Tensor
    induce: torch.Tensor
    kl: torch.Tensor
    selected: tuple[int, int] | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.candidates.shape[1])

    @property
    def n_positions(self) -> int:
        return int(self.candidates.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.candidates.shape[2])

    def pos_index(self, position: int) -> int:
        """Row of ``candidates`` for a position offset (``-1`` …) ."""
        if position not in self.positions:
            raise ValueError(f"position {position} not among {self.positions}")
        return self.positions.index(position)

    def candidate(self, position: int, layer: int) -> torch.Tensor:
        """Raw candidate ``(d_model,)`` at a position offset and layer."""
        return self.candidates[self.pos_index(position), layer]

    @property
    def direction(self) -> torch.Tensor:
        """The selected direction ``(d_model,)``, raw (not normalised: its norm is the mean gap)."""
        if self.selected is None:
            raise ValueError("no direction selected yet: run select_direction first")
        return self.candidate(*self.selected)

    @property
    def warnings(self) -> list[str]:
        return list(self.metadata.get("warnings", []))

    # -- persistence ----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``directions.safetensors`` (tensors) and ``directions.json`` (the rest) to ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().float().contiguous().cpu()
                   for name in ("candidates", "mean_harmful", "mean_harmless", "bypass", "induce", "kl")}
        if self.selected is not None:
            tensors["direction"] = self.direction.detach().float().cpu().clone()
        save_file(tensors, str(folder / TENSORS_FILE))
        meta = {"format_version": FORMAT_VERSION, "positions": self.positions,
                "selected": list(self.selected) if self.selected is not None else None,
                "shape": {"n_positions": self.n_positions, "n_layers": self.n_layers, "d_model": self.d_model},
                "metadata": self.metadata}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "DirectionSet":
        """Read a folder written by :meth:`save` (no pickle involved)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / TENSORS_FILE).exists() or not (folder / META_FILE).exists():
            raise FileNotFoundError(f"{folder} is not a direction set (expected {TENSORS_FILE} and {META_FILE})")
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder}: direction set format {meta['format_version']} is newer than this code")
        t = load_file(str(folder / TENSORS_FILE))
        sel = meta.get("selected")
        return cls(candidates=t["candidates"], mean_harmful=t["mean_harmful"], mean_harmless=t["mean_harmless"],
                   positions=[int(p) for p in meta["positions"]], bypass=t["bypass"], induce=t["induce"],
                   kl=t["kl"], selected=(int(sel[0]), int(sel[1])) if sel else None,
                   metadata=meta.get("metadata", {}))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------

def _refusal_keep(handle: ModelHandle, refused: bool):
    ids = refusal_token_ids(handle.tokenizer)

    def keep(logits: torch.Tensor) -> torch.Tensor:
        s = refusal_score_from_logits(logits, ids)
        return s > 0 if refused else s < 0
    return keep


def generate_candidates(handle: ModelHandle, harmful: Sequence[str], harmless: Sequence[str], *,
                        filter_refusals: bool = False, batch_size: int | None = None,
                        memory_mb: float = DEFAULT_MEMORY_MB, progress: Progress | None = None) -> DirectionSet:
    """Difference-in-means candidates at every post-instruction position and block input.

    ``filter_refusals`` keeps (as in the anchor) only harmful prompts the model refuses (refusal score
    > 0) and harmless prompts it does not (< 0), decided in the same forward pass; if fewer than
    ``MIN_KEPT`` prompts survive, all are used and a warning is recorded.
    """
    t0 = time.perf_counter()
    total = len(harmful) + len(harmless)
    offset = {"n": 0}

    def sub(done: int, _total: int) -> None:
        report(progress, offset["n"] + done, total)

    msgs: list[str] = []
    means = {}
    for kind, prompts, refused in (("harmful", harmful, True), ("harmless", harmless, False)):
        keep = _refusal_keep(handle, refused) if filter_refusals else None
        acts = mean_activations(handle, list(prompts), keep=keep, batch_size=batch_size, memory_mb=memory_mb,
                                progress=sub)
        offset["n"] += len(prompts)
        if keep is not None and acts.count < MIN_KEPT:
            msgs.append(f"refusal filter kept only {acts.count}/{acts.count_all} {kind} prompts; "
                        f"using all {acts.count_all}")
            means[kind] = (acts.mean_all, acts.count_all)
        else:
            means[kind] = (acts.mean, acts.count)
        positions = acts.positions
    for m in msgs:
        warnings.warn(m)
    mh, mn = means["harmful"][0].float(), means["harmless"][0].float()
    n_pos, n_layers = mh.shape[0], handle.n_layers
    cand = (means["harmful"][0] - means["harmless"][0])[:, :n_layers].float().contiguous()
    nan = torch.full((n_pos, n_layers), math.nan)
    meta = {
        "model": handle.name, "model_spec": handle.spec, "model_fingerprint": handle.fingerprint,
        "n_layers": n_layers, "d_model": handle.d_model,
        "post_instruction_tokens": post_instruction_tokens(handle),
        "harmful_sha": _sha(harmful), "harmless_sha": _sha(harmless),
        "n_harmful": means["harmful"][1], "n_harmless": means["harmless"][1],
        "n_harmful_given": len(harmful), "n_harmless_given": len(harmless),
        "filter_refusals": filter_refusals, "warnings": msgs,
        "extraction_seconds": round(time.perf_counter() - t0, 2),
    }
    return DirectionSet(candidates=cand, mean_harmful=mh, mean_harmless=mn, positions=positions,
                        bypass=nan.clone(), induce=nan.clone(), kl=nan.clone(), metadata=meta)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------

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
        self.state: dict[tuple[int, int], tuple[float, int]] = {}  # candidate → (running sum, batches run)

    def below(self, key: tuple[int, int], direction: torch.Tensor, threshold: float) -> bool:
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

    def value(self, key: tuple[int, int]) -> float:
        """The mean KL when every batch was run, else NaN; rounded to float32 as the grid stores it, so
        that a check and the stored value always agree."""
        total, done = self.state.get(key, (0.0, 0))
        return float(torch.tensor(total / self.n, dtype=torch.float32)) if done == len(self.runner.batches) else math.nan

    @property
    def decided_early(self) -> int:
        return sum(done < len(self.runner.batches) for _, done in self.state.values())


SCREEN_Z = 3.0  # standard errors a screened mean must clear to stay in the search


def _spread(prompts: Sequence[str], k: int) -> list[str]:
    """``k`` prompts spread evenly over ``prompts`` (all of them when ``k ≥ len``)."""
    n = len(prompts)
    return list(prompts) if k >= n else [prompts[round(i * n / k)] for i in range(k)]


def _screen(candidates: Sequence[tuple[int, int]], runner: BatchRunner, score, intervention, tick) -> dict:
    """``{candidate: (mean, standard error)}`` of the per-prompt ``score`` of ``runner``'s prompts under
    ``intervention(candidate)`` (a context manager)."""
    out = {}
    for c in candidates:
        with intervention(c):
            s = score(runner.last_logits()).double()
        se = float(s.std() / math.sqrt(len(s))) if len(s) > 1 else math.inf
        out[c] = (float(s.mean()), se)
        tick()
    return out


def select_direction(handle: ModelHandle, dirset: DirectionSet, harmful_val: Sequence[str],
                     harmless_val: Sequence[str], *, max_layer_frac: float = 0.8, kl_threshold: float = 0.1,
                     induce_threshold: float = 0.0, kl_relaxation: Sequence[float] = (0.25, 0.5, 1.0),
                     positions: Sequence[int] | None = None,
                     filter_refusals: bool = False, exhaustive: bool = False, screen: int | None = None,
                     batch_size: int | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                     progress: Progress | None = None) -> DirectionSet:
    """Score candidates and select one; returns a new :class:`DirectionSet` with scores and ``selected``.

    Cost: one forward over ``harmful_val`` per candidate evaluated (bypass) plus two over
    ``harmless_val`` (KL, induce) per candidate checked against the filters. Candidates are evaluated
    at ``positions`` (offsets; default all post-instruction positions) × layers below
    ``int(max_layer_frac·n_layers)`` — e.g. 5 × 24 = 120 bypass passes for SmolLM2-135M. Unless
    ``exhaustive``, KL/induce are computed lazily in order of increasing bypass and the search stops
    at the first candidate passing both filters: that is exactly the candidate the full grid would
    select, at a fraction of the cost (unevaluated grid cells stay NaN). A KL check also stops as soon
    as the harmless prompts run so far prove KL ≥ the threshold (:class:`_LazyKL`; exact, its KL
    cell stays NaN).

    ``filter_refusals`` keeps only harmful val prompts the unmodified model refuses and harmless ones it
    does not (the anchor's val filtering); dropped with a warning if fewer than ``MIN_KEPT`` remain.

    When no candidate passes the KL filter and the induce filter together, the KL threshold is relaxed
    step by step through ``kl_relaxation`` (each step recorded as a warning; a small model's harmless
    next-token distribution moves more than a 7B model's); only when those fail too does selection
    fall back to the lowest bypass. ``kl_relaxation=()`` keeps the anchor's strict behaviour.

    ``screen=k`` (an approximation, off by default; its agreement with the exact search is measured in
    BENCHMARKS.md): induce is first measured for every candidate on ``k`` harmless val prompts spread
    over the set, and only candidates whose screened mean + ``SCREEN_Z`` standard errors exceeds the
    induce threshold are searched exactly (a candidate that cannot induce refusal cannot be chosen
    before the fallback). When the fallback is reached, bypass is screened the same way on ``k``
    harmful val prompts and computed exactly for the candidates that may hold the lowest value.
    """
    if handle.n_layers != dirset.n_layers or handle.d_model != dirset.d_model:
        raise ValueError(f"direction set is for {dirset.n_layers} layers × {dirset.d_model}, "
                         f"model has {handle.n_layers} × {handle.d_model}")
    if not harmful_val or not harmless_val:
        raise ValueError("selection needs harmful and harmless validation prompts")
    if screen is not None and screen < 2:
        raise ValueError(f"screen needs at least 2 prompts (a standard error), got {screen}")
    screen = None if exhaustive else screen
    t0 = time.perf_counter()
    msgs = list(dirset.metadata.get("warnings", []))
    pos_list = list(positions) if positions is not None else list(dirset.positions)
    for p in pos_list:
        dirset.pos_index(p)
    ref_ids = refusal_token_ids(handle.tokenizer)
    score = lambda logits: refusal_score_from_logits(logits, ref_ids)  # noqa: E731
    runner_kw = dict(batch_size=batch_size, memory_mb=memory_mb)
    harmful_val, harmless_val = list(harmful_val), list(harmless_val)
    L = handle.n_layers
    cut = int(max_layer_frac * L)
    layers = list(range(min(cut, L)))
    if not layers:
        msgs.append(f"layer filter (< {max_layer_frac}·{L}) removed every layer; evaluating all layers")
        layers = list(range(L))
    grid = [(p, layer) for p in pos_list for layer in layers
            if float(dirset.candidate(p, layer).norm()) > 0]
    if not grid and len(layers) < L:
        # e.g. a 2-layer model: only layer 0 passes, and its candidates at template tokens are zero.
        msgs.append(f"no non-zero candidate below layer {cut} (layer filter < {max_layer_frac}·{L}); "
                    "evaluating all layers")
        layers = list(range(L))
        grid = [(p, layer) for p in pos_list for layer in layers
                if float(dirset.candidate(p, layer).norm()) > 0]
    if not grid:
        raise ValueError("every candidate direction is zero: the harmful and harmless means are identical "
                         "at the evaluated positions (are the two prompt sets the same?)")
    bypass = torch.full_like(dirset.bypass, math.nan)
    induce = torch.full_like(dirset.induce, math.nan)
    kl = torch.full_like(dirset.kl, math.nan)
    # Progress steps: baseline, bypass on every candidate, then KL (+ induce) in bypass order. Unless
    # exhaustive, the checks stop at the first candidate that passes, so the bar plans one candidate's
    # two checks and grows by two when one fails (a 3×candidates total would overstate the ETA).
    full = 1 + len(grid) * 3
    total = full if exhaustive else min(full, 1 + len(grid) + 2)
    done = 0

    def tick(k: int = 1) -> None:
        nonlocal done
        done += k
        report(progress, min(done, total), total)

    def plan_next_check() -> None:
        nonlocal total
        total = min(full, max(total, done + 2))

    with handle.lock:
        run_h = BatchRunner(handle, tokenize(handle, harmful_val), **runner_kw)
        run_n = BatchRunner(handle, tokenize(handle, harmless_val), **runner_kw)
        base_h, base_n = run_h.last_logits(), run_n.last_logits()
        s_h, s_n = score(base_h), score(base_n)
        if filter_refusals:
            keep_h, keep_n = (s_h > 0), (s_n < 0)
            for kind, keep, vals in (("harmful", keep_h, harmful_val), ("harmless", keep_n, harmless_val)):
                if int(keep.sum()) < MIN_KEPT:
                    msgs.append(f"val refusal filter kept only {int(keep.sum())}/{len(vals)} {kind} prompts; "
                                "using all")
                    keep[:] = True
            if not bool(keep_h.all()):
                harmful_val = [q for q, k in zip(harmful_val, keep_h.tolist()) if k]
                run_h = BatchRunner(handle, tokenize(handle, harmful_val), **runner_kw)
            if not bool(keep_n.all()):
                harmless_val = [q for q, k in zip(harmless_val, keep_n.tolist()) if k]
                run_n = BatchRunner(handle, tokenize(handle, harmless_val), **runner_kw)
                base_n = base_n[keep_n]
            s_h, s_n = s_h[keep_h], s_n[keep_n]
        tick()

        searched, screened = grid, {}
        if screen:
            full += 2 * len(grid)  # the induce screen, and a bypass screen if the fallback is reached
            total += len(grid)
            scr_n = BatchRunner(handle, tokenize(handle, _spread(harmless_val, screen)), **runner_kw)
            screened["induce"] = _screen(grid, scr_n, score, lambda c: add(handle, dirset.candidate(*c), c[1], 1.0),
                                         tick)
            searched = [c for c in grid if screened["induce"][c][0] + SCREEN_Z * screened["induce"][c][1]
                        > induce_threshold]
            total = min(full, done + len(searched) + 2)

        def exact_bypass(cands) -> None:
            for p, layer in cands:
                with ablate(handle, dirset.candidate(p, layer)):
                    bypass[dirset.pos_index(p), layer] = float(score(run_h.last_logits()).mean())
                tick()

        exact_bypass(searched)
        order = sorted(searched, key=lambda c: float(bypass[dirset.pos_index(c[0]), c[1]]))
        chosen: tuple[int, int] | None = None
        removed = {"kl": 0, "induce": 0, "screen": len(grid) - len(searched)}
        n_checked = 0
        lazy = _LazyKL(handle, run_n, base_n)
        for p, layer in order:
            plan_next_check()
            i = dirset.pos_index(p)
            r = dirset.candidate(p, layer)
            kl_ok = lazy.below((p, layer), r, math.inf if exhaustive else kl_threshold)
            kl[i, layer] = lazy.value((p, layer))
            tick()
            kl_ok = float(kl[i, layer]) < kl_threshold if exhaustive else kl_ok
            if kl_ok or exhaustive:
                with add(handle, r, layer, 1.0):
                    induce[i, layer] = float(score(run_n.last_logits()).mean())
                tick()
            n_checked += 1
            induce_ok = kl_ok and float(induce[i, layer]) > induce_threshold
            if not kl_ok:
                removed["kl"] += 1
            elif not induce_ok:
                removed["induce"] += 1
            if kl_ok and induce_ok and chosen is None:
                chosen = (p, layer)
                if not exhaustive:
                    break
        used_kl = kl_threshold
        if chosen is None:
            for relaxed in sorted(t for t in kl_relaxation if t > kl_threshold):
                for p, layer in order:
                    i = dirset.pos_index(p)
                    if not lazy.below((p, layer), dirset.candidate(p, layer), relaxed):
                        continue
                    kl[i, layer] = lazy.value((p, layer))
                    if math.isnan(float(induce[i, layer])):
                        with add(handle, dirset.candidate(p, layer), layer, 1.0):
                            induce[i, layer] = float(score(run_n.last_logits()).mean())
                    if float(induce[i, layer]) > induce_threshold:
                        chosen, used_kl = (p, layer), relaxed
                        break
                if chosen is not None:
                    msg = (f"no candidate passed KL < {kl_threshold} with induce > {induce_threshold} "
                           f"[{', '.join(f'{k}: {n}' for k, n in removed.items() if n)}]; relaxed the KL "
                           f"threshold to {relaxed}: position {chosen[0]}, layer {chosen[1]}")
                    msgs.append(msg)
                    warnings.warn(msg)
                    break
        fallback = chosen is None
        if fallback:  # the lowest bypass of every candidate, and its KL in full (the table shows it)
            kept = set(searched)
            rest = [c for c in grid if c not in kept]
            if rest:
                scr_h = BatchRunner(handle, tokenize(handle, _spread(harmful_val, screen)), **runner_kw)
                screened["bypass"] = _screen(rest, scr_h, score, lambda c: ablate(handle, dirset.candidate(*c)), tick)
                exact = [(float(bypass[dirset.pos_index(p), layer]), 0.0) for p, layer in searched]
                bound = min(m + SCREEN_Z * se for m, se in [*exact, *screened["bypass"].values()])
                exact_bypass([c for c in rest if screened["bypass"][c][0] - SCREEN_Z * screened["bypass"][c][1]
                              <= bound])
                order = sorted((c for c in grid if not math.isnan(float(bypass[dirset.pos_index(c[0]), c[1]]))),
                               key=lambda c: float(bypass[dirset.pos_index(c[0]), c[1]]))
            chosen = order[0]
            lazy.below(chosen, dirset.candidate(*chosen), math.inf)
            kl[dirset.pos_index(chosen[0]), chosen[1]] = lazy.value(chosen)
    if fallback:
        labels = {"kl": f"kl filter (KL < {kl_threshold})", "induce": f"induce filter (induce > {induce_threshold})",
                  "screen": f"induce screen (on {screen} prompts)"}
        parts = [labels[name] for name, n in removed.items() if n]
        detail = ", ".join(f"{name}: {n}" for name, n in removed.items() if n)
        msg = (f"every evaluated candidate ({len(grid)}) was removed by the {' and '.join(parts)} "
               f"[{detail}]; falling back to the lowest bypass score at position {chosen[0]}, layer {chosen[1]}")
        msgs.append(msg)
        warnings.warn(msg)
    report(progress, done, done)  # finished: the bar ends full at the steps actually taken
    i = dirset.pos_index(chosen[0])
    meta = dict(dirset.metadata)
    meta.update({
        "warnings": msgs,
        "selection": {
            "max_layer_frac": max_layer_frac, "kl_threshold": kl_threshold, "induce_threshold": induce_threshold,
            "kl_relaxation": list(kl_relaxation), "kl_threshold_used": None if fallback else used_kl,
            "positions": pos_list, "layers": layers, "exhaustive": exhaustive,
            "layers_removed_by_layer_filter": [x for x in range(L) if x not in layers],
            "removed": {"layer": (L - len(layers)) * len(pos_list), **removed},
            "n_candidates": len(grid), "n_checked": n_checked, "fallback": fallback,
            "kl_decided_early": lazy.decided_early,
            "screen": None if not screen else {
                "prompts": screen, "z": SCREEN_Z, "searched": len(searched),
                **{f"{what}_mean_se": [[p, layer, m, se] for (p, layer), (m, se) in vals.items()]
                   for what, vals in screened.items()}},
            "harmful_val_sha": _sha(harmful_val), "harmless_val_sha": _sha(harmless_val),
            "n_harmful_val": len(harmful_val), "n_harmless_val": len(harmless_val),
            "filter_refusals": filter_refusals,
            "baseline_harmful_score": float(s_h.mean()), "baseline_harmless_score": float(s_n.mean()),
            "bypass": float(bypass[i, chosen[1]]), "induce": float(induce[i, chosen[1]]),
            "kl": float(kl[i, chosen[1]]), "seconds": round(time.perf_counter() - t0, 2),
        },
    })
    return dataclasses.replace(dirset, bypass=bypass, induce=induce, kl=kl, selected=chosen, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Comparison helpers (drift view)
# ----------------------------------------------------------------------------------------------

def _per_layer(x: DirectionSet | torch.Tensor, position: int | None) -> torch.Tensor:
    if isinstance(x, DirectionSet):
        pos = position if position is not None else (x.selected[0] if x.selected else -1)
        return x.candidates[x.pos_index(pos)]
    return torch.as_tensor(x)


def layer_cosines(a: DirectionSet | torch.Tensor, b: DirectionSet | torch.Tensor, *,
                  position: int | None = None) -> torch.Tensor:
    """Cosine similarity per layer ``(n_layers,)`` between two sets' candidates at one position
    (``position``, else ``a``'s selected position, else -1); NaN where a vector is zero. Tensors
    ``(n_layers, d_model)`` also work."""
    if position is None and isinstance(a, DirectionSet) and a.selected:
        position = a.selected[0]
    va, vb = _per_layer(a, position).double(), _per_layer(b, position).double()
    if va.shape != vb.shape:
        raise ValueError(f"cannot compare direction sets of shapes {tuple(va.shape)} and {tuple(vb.shape)}")
    cos = torch.nn.functional.cosine_similarity(va, vb, dim=-1, eps=1e-30)
    cos[(va.norm(dim=-1) == 0) | (vb.norm(dim=-1) == 0)] = math.nan  # undefined (e.g. layer 0 at a template token)
    return cos.float()


def source(dirset: DirectionSet) -> dict:
    """Where the selected direction comes from: position offset, layer, the template token there."""
    if dirset.selected is None:
        return {"position": None, "layer": None, "token": None}
    pos, layer = dirset.selected
    toks = dirset.metadata.get("post_instruction_tokens") or []
    token = toks[pos] if toks and -len(toks) <= pos < 0 else None
    return {"position": pos, "layer": layer, "token": token, "n_layers": dirset.n_layers}


def quality(dirset: DirectionSet) -> dict:
    """The selected direction's bypass/induce/KL scores and the baselines they compare to."""
    sel = dirset.metadata.get("selection", {})
    if dirset.selected is None:
        return {}
    i = dirset.pos_index(dirset.selected[0])
    layer = dirset.selected[1]
    return {"bypass": float(dirset.bypass[i, layer]), "induce": float(dirset.induce[i, layer]),
            "kl": float(dirset.kl[i, layer]), "baseline_harmful": sel.get("baseline_harmful_score"),
            "baseline_harmless": sel.get("baseline_harmless_score"), "fallback": sel.get("fallback", False),
            "norm": float(dirset.direction.norm())}


def mean_projections(dirset: DirectionSet, direction: torch.Tensor | None = None, *,
                     position: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer projection ``(n_layers + 1,)`` of the stored harmful and harmless means at ``position``
    (default: the selected one) onto the unit ``direction`` (default: the selected direction)."""
    r = (direction if direction is not None else dirset.direction).double()
    r = r / r.norm().clamp_min(1e-12)
    pos = position if position is not None else (dirset.selected[0] if dirset.selected else -1)
    i = dirset.pos_index(pos)
    return {"harmful": (dirset.mean_harmful[i].double() @ r).float(),
            "harmless": (dirset.mean_harmless[i].double() @ r).float()}
