"""Weight pruning: magnitude, Wanda and SparseGPT, unstructured or N:M. Written for this project
(device-agnostic, any decoder architectures :mod:`refusal_lab.models` can discover), following the papers:

* **Magnitude** – per layer (one threshold per weight matrix): the ``round(s · numel)`` smallest
  ``|W|`` are zeroed; N:M keeps the N largest ``|W|`` of every M consecutive inputs of a row.
* **Wanda** (Sun et al., 2024) – score ``|W_ij| · ‖X_j‖₂`` (input-channel norm over all calibration
  tokens), compared within each output row: every row loses exactly ``round(s · in_features)`` weights
  (N:M: per group of M). No weight update.
* **SparseGPT** (Frantar & Alistarh, 2023) – per matrix, Hessian ``H = 2/N Σ x xᵀ`` of the layer inputs,
  dampened by 1 % of its mean diagonal; columns are processed left to right in blocks of 128 using the
  upper Cholesky factor ``U`` of ``H⁻¹``: inside a block the mask is chosen by the OBS saliency
  ``w² / U_jj²`` (unstructured: per row, with cumulative rounding so every row ends at exactly
  ``round(s · in_features)`` zeros; N:M: per group of M), each pruned weight's error is spread over
  the not-yet-processed columns (``W[:, j:] −= (w_j − q_j)/U_jj · U_j,j:``), and the block's
  accumulated error is propagated to the remaining columns. Dead inputs (never active in calibration)
  get a unit Hessian diagonal so the factorisation stays defined; they are then pruned like the rest.

Wanda and SparseGPT run block by block: calibration inputs are captured at the first decoder block,
statistics for all targeted linears of a block are gathered in one pass, the block is pruned, and its
outputs (from the *pruned* block) become the next block's inputs, as in both papers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from refusal_lab.compression.calibration import Calibration
from refusal_lab.compression.runtime import few_threads
from refusal_lab.compression.targets import Target, dense_weight, set_weight
from refusal_lab.placement import module_device
from refusal_lab.progress import Progress, report

SPARSEGPT_BLOCK = 128
SPARSEGPT_DAMP = 0.01


# ----------------------------------------------------------------------------------------------
# Masks (True = prune)
# ----------------------------------------------------------------------------------------------

def _smallest_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Boolean mask marking the ``k`` smallest entries along ``dim``."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=dim, largest=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity · numel)`` smallest scores of the whole matrix."""
    k = round(sparsity * scores.numel())
    return _smallest_mask(scores.flatten(), k, 0).reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity · cols)`` smallest scores of every row of a ``(rows, cols)`` matrix."""
    return _smallest_mask(scores, round(sparsity * scores.shape[1]), 1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores along each row (``cols % m == 0``)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs in_features divisible by M: {cols} % {m} != 0")
    return _smallest_mask(scores.reshape(rows, cols // m, m), m - n, 2).reshape(rows, cols)


def check_nm(targets: Sequence[Target], m: int | None) -> None:
    if m is not None:
        bad = [t.name for t in targets if t.in_features % m]
        if bad:
            raise ValueError(f"N:M pruning needs in_features divisible by M={m}; not the case for {bad[:3]}")


# ----------------------------------------------------------------------------------------------
# Per-matrix algorithms
# ----------------------------------------------------------------------------------------------

def magnitude_prune(weight: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                    m: int | None = None) -> torch.Tensor:
    """Pruned copy of an ``(out, in)`` weight (per-matrix threshold, or N:M)."""
    w = weight.float()
    mask = nm_mask(w.abs(), n, m) if n is not None else layer_mask(w.abs(), sparsity or 0.0)
    return w.masked_fill(mask, 0.0)


def wanda_prune(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float | None = None,
                n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Pruned copy of an ``(out, in)`` weight given the ``(in,)`` L2 norms of its input channels."""
    w = weight.float()
    scores = w.abs() * input_norm.to(w.device, torch.float32).unsqueeze(0)
    mask = nm_mask(scores, n, m) if n is not None else row_mask(scores, sparsity or 0.0)
    return w.masked_fill(mask, 0.0)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``; retries with more damping."""
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    lam = damp * float(torch.diag(hessian).mean())
    lam = lam if lam > 0 else 1.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U
        lam *= 10
    raise RuntimeError("SparseGPT: the calibration Hessian is not positive definite even after damping")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    n: int | None = None, m: int | None = None, *, blocksize: int = SPARSEGPT_BLOCK,
                    damp: float = SPARSEGPT_DAMP) -> torch.Tensor:
    """Pruned and updated copy of an ``(out, in)`` weight given the ``(in, in)`` Hessian ``2/N Σ x xᵀ``."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    U = _inverse_cholesky(H, damp)
    if m is not None:
        if cols % m:
            raise ValueError(f"N:M pruning needs in_features divisible by M: {cols} % {m} != 0")
        blocksize = m * max(1, blocksize // m)
    s = sparsity or 0.0
    Wt = W.T.contiguous()  # (cols, rows): a column of W is a contiguous row here
    with few_threads(W.device):
        _obs_columns(Wt, U, s, n, m, blocksize)
    return Wt.T.contiguous()


def _obs_columns(Wt: torch.Tensor, U: torch.Tensor, s: float, n: int | None, m: int | None,
                 blocksize: int) -> None:
    """SparseGPT's blockwise column sweep, in place on the transposed weight ``Wt`` (cols, rows),
    given ``U`` = upper Cholesky factor of H⁻¹. Three BLAS-level ops per column (error, rank-1 update,
    zeroing) so the Python loop stays cheap."""
    cols = Wt.shape[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2]  # (B, rows) view
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        ErrT = torch.empty_like(W1)
        if m is None:
            k = round(s * i2) - round(s * i1)  # cumulative rounding: exact total per row
            keep = ~_smallest_mask(W1 ** 2 / d.unsqueeze(1) ** 2, k, 0)
            pscale = (~keep).to(W1.dtype) / d.unsqueeze(1)  # error = w · pscale
        else:
            keep = torch.ones_like(W1, dtype=torch.bool)
            pscale = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if m is not None and i % m == 0:
                tmp = W1[i:i + m] ** 2 / d[i:i + m].unsqueeze(1) ** 2
                keep[i:i + m] = ~_smallest_mask(tmp, m - n, 0)
                pscale[i:i + m] = (~keep[i:i + m]).to(W1.dtype) / d[i:i + m].unsqueeze(1)
            torch.mul(W1[i], pscale[i], out=ErrT[i])
            W1[i:].addr_(U1[i, i:], ErrT[i], alpha=-1.0)  # spread the error over the remaining columns
            W1[i].mul_(keep[i])  # exact zeros
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, ErrT, alpha=-1.0)


# ----------------------------------------------------------------------------------------------
# Block-sequential calibration driver
# ----------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calibration: Calibration, *,
                         batch_size: int = 8) -> list[dict]:
    """Run the calibration windows up to the last block; per batch return ``{"hidden": (b, seq, d),
    "calls": [(extra_args, kwargs) for each block]}`` so blocks can be re-run one at a time."""
    device = module_device(model.get_input_embeddings())  # where input ids go (also under a device map)
    records: list[dict] = []
    current: dict = {}
    last = len(blocks) - 1

    def make_hook(i: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                current["hidden"] = hidden.detach()
            current["calls"][i] = (rest, kwargs)
            if i == last:
                raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for ids in calibration.batches(batch_size):
            current = {"calls": [None] * len(blocks)}
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            if any(c is None for c in current["calls"]):
                raise RuntimeError("could not capture the inputs of every decoder block")
            records.append(current)
    finally:
        for h in handles:
            h.remove()
    return records


def _stat_hook(kind: str, acc: dict, in_features: int, cache: dict):
    """Forward hook accumulating ``Σ x²`` per input channel (Wanda) or ``Σ x xᵀ`` (SparseGPT).

    Linears fed the very same tensor (q/k/v, gate/up) share one computation through ``cache``."""
    def hook(module, inputs, output):
        raw = inputs[0]
        # identity, not address: the cache holds the tensor, so its memory cannot be reused meanwhile
        if cache.get("tensor") is not raw or cache.get("version") != raw._version:
            x = raw.detach().reshape(-1, in_features).float()
            cache["tensor"], cache["version"] = raw, raw._version
            cache["value"] = (x * x).sum(0) if kind == "wanda" else x.T @ x
            cache["rows"] = x.shape[0]
        name = "sumsq" if kind == "wanda" else "H"
        acc[name] = acc[name] + cache["value"] if name in acc else cache["value"].clone()
        acc["n"] = acc.get("n", 0) + cache["rows"]
    return hook


@torch.no_grad()
def prune_sequential(model: nn.Module, blocks: nn.ModuleList, modules: dict[str, nn.Module],
                     targets: Sequence[Target], calibration: Calibration, method: str, *,
                     sparsity: float | None = None, n: int | None = None, m: int | None = None,
                     batch_size: int = 8, progress: Progress | None = None) -> None:
    """Prune ``targets`` in place with Wanda or SparseGPT, block by block (see module doc).

    ``modules`` maps each target's name to its module in ``model``."""
    if method not in ("wanda", "sparsegpt"):
        raise ValueError(method)
    check_nm(targets, m)
    by_layer: dict[int, list[Target]] = defaultdict(list)
    for t in targets:
        by_layer[t.layer].append(t)
    last_layer = max(by_layer)
    records = capture_block_inputs(model, blocks, calibration, batch_size=batch_size)
    for layer, block in enumerate(blocks):
        if layer > last_layer:
            break
        todo = by_layer.get(layer, [])
        if todo:
            stats: dict[str, dict] = {t.name: {} for t in todo}
            cache: dict = {}
            hooks = [modules[t.name].register_forward_hook(_stat_hook(method, stats[t.name], t.in_features, cache))
                     for t in todo]
            try:
                for rec in records:
                    rest, kwargs = rec["calls"][layer]
                    block(rec["hidden"], *rest, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
                cache.clear()
            for t in todo:
                mod, acc = modules[t.name], stats[t.name]
                # on the device it runs on, with its statistics (an offloaded weight is stored elsewhere)
                W = dense_weight(mod).to(module_device(mod))
                if method == "wanda":
                    new = wanda_prune(W, acc["sumsq"].sqrt(), sparsity, n, m)
                else:
                    new = sparsegpt_prune(W, 2.0 * acc["H"] / acc["n"], sparsity, n, m)
                set_weight(mod, new)
                del acc
        if layer < last_layer:
            for rec in records:
                rest, kwargs = rec["calls"][layer]
                rec["hidden"] = _block_output(block(rec["hidden"], *rest, **kwargs))
        report(progress, layer + 1, last_layer + 1)
