"""Refusal directions: difference-in-means candidates, selection, persistence, comparison.

Follows Arditi et al. 2024 ("Refusal in language models is mediated by a single direction"):

1. :func:`generate_candidates` — ``r[pos, layer] = mean_harmful − mean_harmless`` of the residual
   stream at each post-instruction position and block input, shape ``(n_pos, n_layers, d_model)``.
2. :func:`refusal_lab.selection.select_direction` — for every candidate below ``max_layer_frac·n_layers``: *bypass* (mean
   refusal score on harmful val prompts with the candidate ablated everywhere), *induce* (mean refusal
   score on harmless val prompts with the candidate added at its layer) and *KL* (next-token KL on
   harmless val prompts under ablation). Keep KL < ``kl_threshold`` and induce > ``induce_threshold``;
   pick the lowest bypass. If nothing survives, fall back to the lowest bypass with a warning naming
   the filters that removed the candidates.

Refusal score: ``log P(R) − log(1 − P(R))`` at the last prompt position, R the first tokens of
typical refusal openings for this tokenizer (:func:`refusal_lab.judges.refusal_token_ids`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from refusal_lab.activations import DEFAULT_MEMORY_MB, mean_activations, post_instruction_tokens
from refusal_lab.judges import refusal_score_from_logits, refusal_token_ids
from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress, report
from refusal_lab.prompts import PromptSet

if TYPE_CHECKING:
    from refusal_lab.results import DirectionSummary

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
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            positions = [int(p) for p in meta["positions"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder / META_FILE} is damaged ({type(e).__name__}: {e})") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder}: direction set format {meta['format_version']} is newer than this code")
        try:
            t = load_file(str(folder / TENSORS_FILE))
            names = ("candidates", "mean_harmful", "mean_harmless", "bypass", "induce", "kl")
            tensors = {k: t[k] for k in names}
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{folder / TENSORS_FILE} is damaged ({type(e).__name__}: {e})") from None
        n_pos, n_layers = tensors["candidates"].shape[:2]
        if len(positions) != n_pos:
            raise ValueError(f"{folder}: {META_FILE} lists {len(positions)} positions, the tensors hold {n_pos}")
        sel = meta.get("selected")
        if sel:
            try:
                sel = (int(sel[0]), int(sel[1]))
            except (ValueError, TypeError, IndexError):
                raise ValueError(f"{folder / META_FILE}: selected {sel!r} is not (position, layer)") from None
            if sel[0] not in positions or not 0 <= sel[1] < n_layers:
                raise ValueError(f"{folder / META_FILE}: selected {list(sel)} is outside the candidates (positions "
                                 f"{positions}, layers 0–{n_layers - 1})")
        return cls(**tensors, positions=positions, selected=sel or None, metadata=meta.get("metadata", {}))


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


def summary(dirset: DirectionSet) -> DirectionSummary:
    """:func:`source` and :func:`quality` of the selected direction, typed."""
    from refusal_lab.results import DirectionSummary

    return DirectionSummary.from_json({"source": source(dirset), "quality": quality(dirset)})


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
