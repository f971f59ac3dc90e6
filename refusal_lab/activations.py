"""Residual-stream activations at the post-instruction positions, batched and memory-flat.

The residual stream is read at the input of every decoder block and at the input of the final norm,
so one prompt gives a tensor ``(n_positions, n_layers + 1, d_model)``. The *post-instruction
positions* are the tokens the chat template appends after the user's text (end-of-turn + assistant
header); they are found from the template itself (:func:`post_instruction_length`) and are the last
``n_positions`` tokens of every formatted prompt. Positions are named by negative offsets
``-n_positions … -1`` (``-1`` = the last prompt token).

Speed on CPU comes from three things: prompts are sorted by length and batched under a memory budget
(little padding); the token prefix shared by every prompt (system prompt + user header) is run once
and reused through the KV cache; and means are accumulated in float64 running sums, never keeping
every activation. Every forward and every hook installation holds ``handle.lock``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.models import MARKER, ChatTemplateError, ModelHandle
from refusal_lab.placement import module_device
from refusal_lab.precision import compute, low_precision_cache
from refusal_lab.progress import Progress, report

DEFAULT_MEMORY_MB = 512
DEFAULT_MAX_BATCH = 16  # float32 on CPU: 16 rows are as fast as 32 (measured on SmolLM2) at half the memory
MAX_BATCH = {"bfloat16": 64}  # bf16 autocast: a pass of 67 prompts 2.05 s at 16 rows, 1.79 at 32, 1.68 at 67
MIN_SHARED_PREFIX = 4  # below this many tokens, sharing the prefix is not worth a cache copy per batch


# ----------------------------------------------------------------------------------------------
# Post-instruction positions
# ----------------------------------------------------------------------------------------------

def post_instruction_length(handle: ModelHandle) -> int:
    """Number of tokens the chat template appends after the user's instruction.

    Formats a marker instruction and counts the tokens that start after the marker, tokenized in
    context (so a suffix that would merge differently on its own is still counted right); falls back
    to tokenizing the suffix alone for tokenizers without offset mappings.
    """
    text = handle.format(MARKER)
    if MARKER not in text:
        raise ChatTemplateError(f"the chat template of {handle.name} drops the user's text")
    end = text.rindex(MARKER) + len(MARKER)
    tok = handle.tokenizer
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        n = sum(1 for start, _ in enc["offset_mapping"] if start >= end)
    except (NotImplementedError, TypeError, KeyError, ValueError):
        n = len(tok(text[end:], add_special_tokens=False)["input_ids"])
    if n < 1:
        raise ChatTemplateError(f"the chat template of {handle.name} adds nothing after the instruction; "
                                "there are no post-instruction positions to read")
    return n


def post_instruction_tokens(handle: ModelHandle) -> list[str]:
    """The post-instruction tokens as text, in order (for tables: which token a position is)."""
    n = post_instruction_length(handle)
    ids = handle.tokenizer(handle.format(MARKER), add_special_tokens=False)["input_ids"][-n:]
    return [handle.tokenizer.decode([i]) for i in ids]


def tokenize(handle: ModelHandle, instructions: Sequence[str], *, formatted: bool = False) -> list[list[int]]:
    """Chat-format (unless ``formatted``) and tokenize without padding → one id list per prompt."""
    texts = list(instructions) if formatted else [handle.format(i) for i in instructions]
    if not texts:
        return []
    return [list(ids) for ids in handle.tokenizer(texts, add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------------------------------------
# Batched forward with a shared prefix
# ----------------------------------------------------------------------------------------------

def _per_token_bytes(handle: ModelHandle, kv_len: int) -> int:
    """Rough peak activation bytes per token of one forward (hidden states, MLP, attention scores)."""
    cfg = handle.model.config
    d = handle.d_model
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 8
    elt = max(torch.finfo(handle.dtype).bits // 8, 4)
    return elt * (10 * d + 3 * inter + 2 * heads * kv_len)


def index_keeps_logits(handle: ModelHandle) -> bool:
    """Whether ``logits_to_keep`` may be an index tensor: accelerate moves every tensor argument to the
    device the model's forward starts on, and the hidden states it indexes are on the final norm's device
    — another one when a device map spreads the model over GPUs (an index must be on its tensor's device)."""
    out = handle.final_norm or handle.embedding
    return module_device(handle.model, default=handle.device) == module_device(out, default=handle.device)


def _last_index(handle: ModelHandle, width: int, n: int = 1) -> torch.Tensor | int:
    """``logits_to_keep`` selecting the last ``n`` of ``width`` positions as an index tensor: HF then
    gathers a contiguous ``(B, n, d)`` input for the unembedding; the int form (``n``) passes a strided
    view, which makes ``matmul`` fall back to a batched product with the vocab matrix expanded per row
    (~10× slower, and hundreds of MB for SmolLM2's 49k-token vocabulary) — used only where an index
    cannot be (:func:`index_keeps_logits`)."""
    return torch.arange(width - n, width, device=handle.device) if index_keeps_logits(handle) else n


def shared_prefix(handle: ModelHandle, ids: Sequence[Sequence[int]], *, min_rest: int = 1,
                  extra_tokens: int = 0) -> list[int]:
    """The token prefix every prompt in ``ids`` shares (system prompt + user header), leaving at least
    ``min_rest`` tokens of each prompt outside it; ``[]`` when shorter than ``MIN_SHARED_PREFIX``.

    Padding then sits between the prefix and the rest, which shifts KV-cache indices: a sliding window
    (counted in cache indices) would cut at the wrong token, so nothing is shared when a prompt plus
    ``extra_tokens`` (e.g. generated ones) reaches the model's window."""
    if not ids:
        return []
    limit = min(len(s) for s in ids) - min_rest
    first = ids[0]
    k = 0
    while k < limit and all(s[k] == first[k] for s in ids):
        k += 1
    window = getattr(handle.model.config, "sliding_window", None)
    too_long = bool(window) and max(len(s) for s in ids) + extra_tokens >= int(window)
    return list(first[:k]) if k >= MIN_SHARED_PREFIX and not too_long else []


def prefix_cache(handle: ModelHandle, prefix: Sequence[int]):
    """KV cache of ``prefix`` (one row) under whatever hooks are active, or None when there is no prefix
    or the model's cache cannot be repeated per batch (legacy tuple caches of some remote-code models)."""
    if not prefix:
        return None
    dev = handle.device
    ids = torch.tensor([list(prefix)], device=dev)
    with compute(handle):
        out = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                           logits_to_keep=_last_index(handle, len(prefix)))
    cache = out.past_key_values
    return low_precision_cache(handle, cache) if hasattr(cache, "batch_repeat_interleave") else None


def batch_cache(cache, rows: int):
    """A copy of a one-row prefix ``cache`` repeated for ``rows`` rows."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists → ``(ids, mask)`` both ``(len(seqs), longest)`` int64 on the CPU."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def continuation_logits(handle: ModelHandle, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[torch.Tensor]:
    """Teacher-forced: for each ``(context ids, continuation ids)`` pair (context not empty), the float32
    CPU logits ``(len(continuation), vocab)`` at the positions that predict the continuation's tokens, from
    one forward of the batch left-padded (positions counted from each row's first real token), unembedding
    only the last ``max(len(continuation)) + 1`` positions (every row's continuation ends the batch); a
    prefix every row shares runs once (:func:`shared_prefix`, :func:`prefix_cache`)."""
    if any(not c for c, _ in pairs):
        raise ValueError("every continuation needs a context token before it")
    seqs = [list(c) + list(o) for c, o in pairs]
    window = getattr(handle.model.config, "sliding_window", None)
    if window and max(len(s) for s in seqs) >= int(window):  # left padding would shift the window (indices)
        return [_whole_row_logits(handle, s)[len(c) - 1:len(s) - 1] for s, (c, _) in zip(seqs, pairs)]
    keep = max(len(o) for _, o in pairs)
    dev = handle.device
    with handle.lock, compute(handle):
        prefix = shared_prefix(handle, seqs, min_rest=keep + 1)  # e.g. the chat template's system prompt
        cache = prefix_cache(handle, prefix)
        p = len(prefix) if cache is not None else 0
        ids, mask = left_pad([s[p:] for s in seqs], handle.tokenizer.pad_token_id or 0)
        kwargs: dict = dict(use_cache=False)
        if cache is not None:
            kwargs = dict(past_key_values=batch_cache(cache, len(seqs)), use_cache=True)
        full_mask = torch.cat([torch.ones((len(seqs), p), dtype=torch.long), mask], dim=1)
        out = handle.model(input_ids=ids.to(dev), attention_mask=full_mask.to(dev),
                           position_ids=((mask.cumsum(-1) - 1).clamp(min=0) + p).to(dev),
                           logits_to_keep=_last_index(handle, ids.shape[1], keep + 1), **kwargs)
        logits = out.logits.float().cpu()
    # kept position j is sequence position width − keep − 1 + j; n continuation tokens are predicted at
    # sequence positions width − n − 1 … width − 2, i.e. kept positions keep − n … keep − 1
    return [logits[row, keep - len(o):keep] for row, (_, o) in enumerate(pairs)]


def _whole_row_logits(handle: ModelHandle, seq: Sequence[int]) -> torch.Tensor:
    """Float32 CPU logits ``(len(seq), vocab)`` of one unpadded sequence."""
    with handle.lock, compute(handle):
        ids = torch.tensor([list(seq)], device=handle.device)
        return handle.model(input_ids=ids, use_cache=False).logits[0].float().cpu()


class BatchRunner:
    """Runs pre-tokenized prompts through the model in length-sorted, memory-bounded batches.

    ``min_rest`` tokens of every prompt are never folded into the shared prefix, so hooks always see
    the last ``min_rest`` positions of every prompt. Call :meth:`run` with ``handle.lock`` held and
    with whatever hooks/interventions should apply — the prefix is recomputed under them on each run.
    """

    def __init__(self, handle: ModelHandle, ids: Sequence[Sequence[int]], *, min_rest: int = 1,
                 batch_size: int | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                 max_batch: int | None = None, share_prefix: bool = True,
                 groups: Sequence[Sequence[int]] = ()) -> None:
        self.handle = handle
        ids = [list(s) for s in ids]
        if any(len(s) < min_rest for s in ids):
            raise ValueError(f"a prompt has fewer than {min_rest} tokens")
        prefix = shared_prefix(handle, ids, min_rest=min_rest) if share_prefix else []
        self.prefix = prefix
        self.ids = ids
        self.rest = [s[len(prefix):] for s in ids]
        budget = memory_mb * 2**20
        vocab_bytes = 8 * int(getattr(handle.model.config, "vocab_size", 0) or 0)
        limit_rows = batch_size or max_batch or MAX_BATCH.get(handle.precision, DEFAULT_MAX_BATCH)

        def pack(indices: Sequence[int]) -> list[list[int]]:
            out: list[list[int]] = []
            cur: list[int] = []
            for i in sorted(indices, key=lambda i: len(self.rest[i])):
                trial = cur + [i]
                cost = len(trial) * (len(self.rest[i]) * _per_token_bytes(handle, len(prefix) + len(self.rest[i]))
                                     + vocab_bytes)
                if cur and (len(trial) > limit_rows or (batch_size is None and cost > budget)):
                    out.append(cur)
                    cur = [i]
                else:
                    cur = trial
            return out + ([cur] if cur else [])

        # each group of prompts is batched on its own (a screen runs the group's batches alone, and a
        # full pass the others: together the same batches, so the same logits), then the rest
        self.batches: list[list[int]] = []
        self.group_batches: list[list[int]] = []
        placed: set[int] = set()
        for group in groups:
            fresh = [i for i in dict.fromkeys(group) if i not in placed]
            placed.update(fresh)
            packed = pack(fresh)
            self.group_batches.append(list(range(len(self.batches), len(self.batches) + len(packed))))
            self.batches += packed
        self.batches += pack([i for i in range(len(ids)) if i not in placed])
        self.inputs: dict[int, dict[int, torch.Tensor]] = {}  # block → batch → kept residual input
        self.skippable: bool | None = None  # blocks return a tensor (known once inputs were kept)

    def __len__(self) -> int:
        return len(self.rest)

    @torch.inference_mode()
    def run(self, batches: Sequence[int] | None = None, *, start: int = 0, keep_inputs: Sequence[int] = (),
            stop_at: torch.nn.Module | None = None) -> Iterator[tuple[list[int], torch.Tensor | None]]:
        """Yield ``(prompt indices, last-position logits (B, vocab) float32)`` per batch (only the
        batches numbered in ``batches``, when given: a batch's logits do not depend on the others).

        ``keep_inputs``: keep each batch's residual input of these blocks. ``start``: run only blocks
        ``start…``, from the kept input of block ``start`` (blocks below are skipped) — the same
        logits as a full pass, provided nothing below ``start`` differs from the pass that kept it
        (no hook, no weight change): the caller's guarantee. Skipping needs blocks that return a
        tensor (``ValueError`` otherwise, or when ``start``'s input was not kept). ``stop_at``: the
        forward ends on entering this module, once the pre-hooks registered before the run have read
        its input; the logits are then None (for passes that only read activations below it)."""
        model, dev = self.handle.model, self.handle.device
        pad = self.handle.tokenizer.pad_token_id or 0
        cache = prefix_cache(self.handle, self.prefix)
        p = len(self.prefix) if cache is not None else 0
        for b in (range(len(self.batches)) if batches is None else batches):
            idx = self.batches[b]
            seqs = [self.rest[i] if cache is not None else self.ids[i] for i in idx]
            ids, mask = left_pad(seqs, pad)
            width = ids.shape[1]
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + p
            kwargs: dict = dict(input_ids=ids.to(dev), position_ids=position_ids.to(dev),
                                logits_to_keep=_last_index(self.handle, width))
            if cache is not None:
                mask = torch.cat([torch.ones((len(seqs), p), dtype=torch.long), mask], dim=1)
                kwargs.update(past_key_values=batch_cache(cache, len(seqs)), use_cache=True)
            else:
                kwargs.update(use_cache=False)
            try:
                with compute(self.handle), self._keeping(b, keep_inputs), self._skipping(b, start), \
                        _stopping(stop_at):
                    out = model(attention_mask=mask.to(dev), **kwargs)
            except _Stop:
                yield idx, None
                continue
            yield idx, out.logits[:, -1, :].float()

    @contextlib.contextmanager
    def _keeping(self, b: int, layers: Sequence[int]) -> Iterator[None]:
        """Keep batch ``b``'s residual input of blocks ``layers`` (and whether blocks return tensors)."""
        blocks = self.handle.blocks
        hooks = []

        def keep(layer: int):
            def hook(module, args, kwargs):
                self.inputs.setdefault(layer, {})[b] = _hidden(args, kwargs)
            return hook

        def returns(module, args, output):
            self.skippable = self.skippable is not False and isinstance(output, torch.Tensor)

        try:
            for layer in layers:
                hooks.append(blocks[layer].register_forward_pre_hook(keep(layer), with_kwargs=True))
                hooks.append(blocks[layer].register_forward_hook(returns))
            yield
        finally:
            for h in hooks:
                h.remove()

    @contextlib.contextmanager
    def _skipping(self, b: int, start: int) -> Iterator[None]:
        """Blocks below ``start`` replaced for one forward by a stub returning block ``start``'s kept input.
        Written here because neither transformers nor accelerate runs a model from a middle layer."""
        if start == 0:
            yield
            return
        kept = self.inputs.get(start, {}).get(b)
        if kept is None or self.skippable is not True:
            raise ValueError(f"block {start}'s inputs were not kept for this batch, or blocks do not return "
                             "a tensor: run with keep_inputs first")
        stub = lambda *args, **kwargs: kept  # noqa: E731
        blocks = list(self.handle.blocks)[:start]
        saved = [blk.__dict__.get("forward") for blk in blocks]  # accelerate's hooks live here too
        try:
            for blk in blocks:
                blk.forward = stub
            yield
        finally:
            for blk, fwd in zip(blocks, saved):
                if fwd is None:
                    blk.__dict__.pop("forward", None)
                else:
                    blk.forward = fwd

    def last_logits(self, progress: Progress | None = None, *, start: int = 0, keep_inputs: Sequence[int] = (),
                    batches: Sequence[int] | None = None) -> torch.Tensor:
        """Last-position logits of every prompt, ``(n, vocab)`` float32 on the CPU, in input order
        (call with ``handle.lock`` held, under whatever interventions should apply; ``start``,
        ``keep_inputs`` and ``batches``: :meth:`run` — rows of prompts not run are NaN)."""
        out: torch.Tensor | None = None
        done = 0
        n = len(self) if batches is None else sum(len(self.batches[b]) for b in batches)
        for idx, logits in self.run(batches, start=start, keep_inputs=keep_inputs):
            if out is None:
                out = torch.full((len(self), logits.shape[-1]), math.nan)
            out[idx] = logits.cpu()
            done += len(idx)
            report(progress, done, n)
        return out if out is not None else torch.empty(0)


class _Stop(Exception):
    """Ends a forward early (:func:`_stopping`)."""


@contextlib.contextmanager
def _stopping(module: torch.nn.Module | None) -> Iterator[None]:
    """A pre-hook on ``module`` that ends the forward there (no library exits a forward midway)."""
    if module is None:
        yield
        return

    def hook(mod, args, kwargs):
        raise _Stop

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def read_points(handle: ModelHandle) -> list[torch.nn.Module]:
    """Modules whose *input* is the residual stream we read: every block, then the final norm."""
    norm = handle.final_norm
    if norm is None:
        raise ValueError(f"{handle.name}: no final norm found, cannot read the last residual stream")
    return [*handle.blocks, norm]


def _capture(handle: ModelHandle, runner: BatchRunner, n_positions: int,
             on_batch: Callable[[list[int], torch.Tensor, torch.Tensor], None],
             progress: Progress | None) -> None:
    """Run ``runner`` with read hooks; ``on_batch(idx, acts (B, n_pos, L+1, d), logits (B, vocab))``."""
    points = read_points(handle)
    buf: list[torch.Tensor | None] = [None] * len(points)

    def make_hook(i: int):
        def hook(module, args, kwargs):
            buf[i] = _hidden(args, kwargs)[:, -n_positions:, :].clone()  # a copy: don't pin the full tensor
        return hook

    done = 0
    with handle.lock:
        hooks = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(points)]
        try:
            for idx, logits in runner.run():
                if len({t.device for t in buf}) > 1:  # read points on several devices (a device map)
                    buf[:] = [t.cpu() for t in buf]
                acts = torch.stack(buf, dim=2)  # type: ignore[arg-type]
                buf[:] = [None] * len(points)
                on_batch(idx, acts, logits)
                done += len(idx)
                report(progress, done, len(runner))
        finally:
            for h in hooks:
                h.remove()


# ----------------------------------------------------------------------------------------------
# Means, projections, naive reference
# ----------------------------------------------------------------------------------------------

@dataclass
class Activations:
    """Mean residual stream over a prompt set.

    ``mean``: ``(n_positions, n_layers + 1, d_model)`` float64 over the *kept* prompts (all prompts
    when no ``keep`` filter was given); ``mean_all`` over every prompt. ``kept[i]`` tells whether
    prompt ``i`` (input order) passed the filter; ``positions`` are the negative offsets.
    """

    mean: torch.Tensor
    count: int
    mean_all: torch.Tensor
    count_all: int
    positions: list[int]
    kept: list[bool] = field(default_factory=list)


@torch.inference_mode()
def mean_activations(handle: ModelHandle, instructions: Sequence[str], *, n_positions: int | None = None,
                     keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     batch_size: int | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                     share_prefix: bool = True, formatted: bool = False,
                     progress: Progress | None = None) -> Activations:
    """Mean residual stream at the post-instruction positions, ``(n_positions, n_layers + 1, d_model)``.

    ``keep(last_logits (B, vocab)) → bool (B,)`` optionally filters prompts by the model's own
    next-token distribution (e.g. "refused" for harmful prompts) in the same pass. Memory stays flat in
    the number of prompts: only float64 running sums are kept.
    """
    if not instructions:
        raise ValueError("no prompts given")
    n = n_positions or post_instruction_length(handle)
    runner = BatchRunner(handle, tokenize(handle, instructions, formatted=formatted), min_rest=n,
                         batch_size=batch_size, memory_mb=memory_mb, share_prefix=share_prefix)
    shape = (n, handle.n_layers + 1, handle.d_model)
    sum_all = torch.zeros(shape, dtype=torch.float64)
    sum_kept = torch.zeros(shape, dtype=torch.float64)
    kept = [keep is None] * len(instructions)

    def on_batch(idx: list[int], acts: torch.Tensor, logits: torch.Tensor) -> None:
        acts = acts.double().cpu()
        sum_all.add_(acts.sum(0))
        if keep is not None:
            mask = keep(logits).bool().cpu()
            if mask.any():
                sum_kept.add_(acts[mask].sum(0))
            for j, i in enumerate(idx):
                kept[i] = bool(mask[j])

    _capture(handle, runner, n, on_batch, progress)
    count = sum(kept)
    mean_all = sum_all / len(instructions)
    mean = mean_all if keep is None else (sum_kept / count if count else torch.full(shape, math.nan,
                                                                                      dtype=torch.float64))
    return Activations(mean=mean, count=count, mean_all=mean_all, count_all=len(instructions),
                       positions=list(range(-n, 0)), kept=kept)


def _unit_per_layer(direction: torch.Tensor, n_points: int) -> torch.Tensor:
    d = direction.detach().double().cpu()
    if d.dim() == 1:
        d = d.expand(n_points, -1)
    if d.shape[0] != n_points:
        raise ValueError(f"direction has {d.shape[0]} rows, expected 1 or {n_points}")
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def projections(handle: ModelHandle, instructions: Sequence[str], direction: torch.Tensor, *,
                position: int = -1, batch_size: int | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                share_prefix: bool = True, progress: Progress | None = None) -> torch.Tensor:
    """Per-prompt projection of the residual stream at ``position`` (negative offset) onto the unit
    direction, at every read point → ``(n_prompts, n_layers + 1)`` float32.

    ``direction`` is ``(d_model,)`` (one direction for all layers) or ``(n_layers + 1, d_model)``.
    """
    if position >= 0:
        raise ValueError("position is a negative offset from the end of the prompt (-1 = last token)")
    n = -position
    unit = _unit_per_layer(direction, handle.n_layers + 1)
    runner = BatchRunner(handle, tokenize(handle, instructions), min_rest=n, batch_size=batch_size,
                         memory_mb=memory_mb, share_prefix=share_prefix)
    out = torch.zeros(len(instructions), handle.n_layers + 1, dtype=torch.float64)

    def on_batch(idx: list[int], acts: torch.Tensor, logits: torch.Tensor) -> None:
        x = acts[:, 0].double().cpu()  # (B, L+1, d) at the requested position
        out[idx] = (x * unit).sum(-1)

    _capture(handle, runner, n, on_batch, progress)
    return out.float()


def projection_stats(harmful: torch.Tensor, harmless: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer bands of two projection matrices ``(n_prompts, n_layers + 1)``: mean/std of each set
    and Cohen's d (difference of means over the pooled std)."""
    mh, mn = harmful.double().mean(0), harmless.double().mean(0)
    sh = harmful.double().std(0) if len(harmful) > 1 else torch.zeros_like(mh)
    sn = harmless.double().std(0) if len(harmless) > 1 else torch.zeros_like(mn)
    nh, nn_ = len(harmful), len(harmless)
    dof = max(nh + nn_ - 2, 1)
    pooled = (((nh - 1) * sh**2 + (nn_ - 1) * sn**2) / dof).sqrt()
    d = (mh - mn) / pooled.clamp_min(1e-12)
    return {k: v.float() for k, v in dict(harmful_mean=mh, harmful_std=sh, harmless_mean=mn, harmless_std=sn,
                                          cohens_d=d).items()}


@torch.inference_mode()
def naive_mean_activations(handle: ModelHandle, instructions: Sequence[str], *, n_positions: int | None = None,
                           progress: Progress | None = None) -> torch.Tensor:
    """Reference implementation: one prompt at a time with ``output_hidden_states=True``, every hidden
    state kept until the end → same result as :func:`mean_activations` (``mean``), slowly.

    HF's last hidden state is *after* the final norm, so the final-norm input is read with one hook.
    """
    n = n_positions or post_instruction_length(handle)
    L = handle.n_layers
    per_prompt = []
    norm_in: dict[str, torch.Tensor] = {}
    with handle.lock:
        hook = handle.final_norm.register_forward_pre_hook(
            lambda m, args, kwargs: norm_in.__setitem__("x", _hidden(args, kwargs)), with_kwargs=True)
        try:
            for k, text in enumerate(instructions):
                ids = torch.tensor([tokenize(handle, [text])[0]], device=handle.device)
                out = handle.model(input_ids=ids, output_hidden_states=True)
                hs = [h[0, -n:].cpu() for h in out.hidden_states[:L]] + [norm_in["x"][0, -n:].cpu()]
                per_prompt.append(torch.stack(hs, dim=1).double().cpu())
                report(progress, k + 1, len(instructions))
        finally:
            hook.remove()
    return torch.stack(per_prompt).mean(0)


@torch.inference_mode()
def writer_inputs(handle: ModelHandle, instructions: Sequence[str], module: torch.nn.Module, direction: torch.Tensor,
                  layer: int, *, n_positions: int = 5, progress: Progress | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of ``module`` (a residual writer, e.g. an MLP output projection) and the projection of
    the residual stream entering block ``layer`` onto the unit ``direction`` ``(d_model,)``, at the last
    ``n_positions`` positions of every prompt → ``(x (N·n_positions, d_in), proj (N·n_positions,))``,
    float64, rows in prompt order. The data a fitted re-alignment (:func:`refusal_lab.aird.fit_realignment`)
    regresses on."""
    r = _unit_per_layer(direction, 1)[0]
    runner = BatchRunner(handle, tokenize(handle, instructions), min_rest=n_positions)
    seen: dict[str, torch.Tensor] = {}
    xs: list[torch.Tensor | None] = [None] * len(instructions)
    ps: list[torch.Tensor | None] = [None] * len(instructions)

    def grab(name: str):
        def hook(mod, args, kwargs):
            seen[name] = _hidden(args, kwargs)[:, -n_positions:, :].double().cpu()
        return hook

    read = read_points(handle)[layer]
    below = any(module is m for block in list(handle.blocks)[:layer] for m in block.modules())
    done = 0
    with handle.lock:
        hooks = [module.register_forward_pre_hook(grab("x"), with_kwargs=True),
                 read.register_forward_pre_hook(grab("h"), with_kwargs=True)]
        try:
            for idx, _ in runner.run(stop_at=read if below else None):  # nothing above both is needed
                for j, i in enumerate(idx):
                    xs[i], ps[i] = seen["x"][j], seen["h"][j] @ r
                seen.clear()
                done += len(idx)
                report(progress, done, len(runner))
        finally:
            for h in hooks:
                h.remove()
    return torch.cat(xs), torch.cat(ps)  # type: ignore[arg-type]
