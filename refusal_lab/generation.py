"""Batched generation, greedy or sampled.

Greedy replies (every evaluation, calibration and budget curve) take :func:`greedy_ids`, our own
decode loop, because ``model.generate`` can do neither of the two things that make it fast on a CPU:

* the chat-template prefix every prompt shares (system prompt + user header, about half of a bundled
  prompt) is run once per call and its KV cache copied per batch, as in
  :class:`refusal_lab.activations.BatchRunner`;
* a row leaves the batch the step it ends (end-of-turn or ``max_new_tokens``): refusals end after
  ~15 tokens, and ``generate`` would keep computing them, padded, until the longest reply of the
  batch is done; waiting prompts take the free rows (continuous batching), so steps run full.
  Batches are larger (memory-bounded, ≤ ``MAX_GEN_BATCH`` rows) for the same reason: a CPU decode
  step reads every weight once, whatever the number of rows.

Each step picks ``argmax`` of the float32 next-token logits, as ``generate`` does greedily. Sampling,
and models whose generation config asks for logits processing (repetition penalty, banned words, …)
or whose cache cannot be copied, go through ``model.generate`` (:func:`_generate_hf`).

Interventions are applied by the caller around the call (``with ablate(...): generate(...)``); the
prefix is computed under them, and every forward holds ``handle.lock``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from refusal_lab.activations import _last_index, batch_cache, left_pad, prefix_cache, shared_prefix, tokenize
from refusal_lab.models import ModelHandle
from refusal_lab.precision import compute, is_growing_layer, kv_dtype, low_precision_cache
from refusal_lab.progress import Progress, report

DEFAULT_GEN_MEMORY_MB = 1024
MAX_GEN_BATCH = 128  # rows decoded together; on 2 cores a cap of 128 gave 229 tok/s, 64 gave 199 (same tokens)
# Generation-config fields that change greedy decoding, with their neutral values: if a model sets
# one of them, its replies come from model.generate, which applies them.
_PROCESSORS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
               "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
               "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,),
               "renormalize_logits": (None, False), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0)}


class _CacheUnsupported(RuntimeError):
    """The model returns no cache :func:`greedy_ids` can select rows of (legacy tuple caches)."""


def tokenize_prompts(handle: ModelHandle, instructions: Sequence[str], *, formatted: bool = False) -> dict:
    """Chat-format (unless ``formatted``) and tokenize with left padding → ``input_ids``/``attention_mask``
    of shape ``(batch, seq)`` on the model's device."""
    texts = list(instructions) if formatted else [handle.format(i) for i in instructions]
    enc = handle.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(handle.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def eos_ids(handle: ModelHandle) -> set[int]:
    """Token ids that end a reply: the generation config's ``eos_token_id`` (int or list), else the tokenizer's."""
    eos = getattr(getattr(handle.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = handle.tokenizer.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def fast_greedy_supported(handle: ModelHandle) -> bool:
    """True when :func:`greedy_ids` decodes exactly as ``model.generate`` would: the generation config
    asks for no logits processing."""
    cfg = getattr(handle.model, "generation_config", None)
    return cfg is None or all(getattr(cfg, k, None) in neutral for k, neutral in _PROCESSORS.items())


def _kv_bytes_per_token(handle: ModelHandle) -> int:
    cfg = handle.model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 8
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or handle.d_model // heads
    elt = torch.finfo(kv_dtype(handle)).bits // 8
    return 2 * handle.n_layers * kv * head_dim * elt


def _rows_cap(handle: ModelHandle, longest: int, batch_size: int | None, memory_mb: float) -> int:
    """Rows decoded together: ``batch_size``, or as many as ``memory_mb`` of KV cache (plus one row of
    float32 logits each) holds for sequences of ``longest`` tokens, at most ``MAX_GEN_BATCH``."""
    if batch_size is not None:
        return batch_size
    per_row = longest * _kv_bytes_per_token(handle) + 4 * int(getattr(handle.model.config, "vocab_size", 0) or 0)
    return max(1, min(MAX_GEN_BATCH, int(memory_mb * 2**20 // max(per_row, 1))))


def _mergeable(cache) -> bool:
    """Whether rows of another cache can be appended: every layer a plain growing DynamicLayer (sliding
    windows and other cache kinds keep per-layer state we would have to re-derive)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(is_growing_layer(layer) and layer.keys is not None for layer in layers)


def _left_pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    if x.shape[dim] == length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@dataclass
class _Rows:
    """Rows being decoded together: their cache, attention mask ``(B, S)``, next position ``(B, 1)``,
    last chosen token ``(B,)`` and prompt indices."""

    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    tok: torch.Tensor
    idx: list[int]

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask, self.next_pos, self.tok = self.mask[keep], self.next_pos[keep], self.tok[keep]
        self.idx = [self.idx[j] for j in keep.tolist()]

    def extend(self, other: "_Rows") -> None:
        """Append ``other``'s rows; the shorter cache is left-padded with masked zeros."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([_left_pad_to(a.keys, length, -2), _left_pad_to(b.keys, length, -2)])
            a.values = torch.cat([_left_pad_to(a.values, length, -2), _left_pad_to(b.values, length, -2)])
        self.mask = torch.cat([_left_pad_to(self.mask, length, 1), _left_pad_to(other.mask, length, 1)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.tok = torch.cat([self.tok, other.tok])
        self.idx = self.idx + other.idx


@torch.inference_mode()
def greedy_ids(handle: ModelHandle, ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
               batch_size: int | None = None, memory_mb: float = DEFAULT_GEN_MEMORY_MB,
               share_prefix: bool = True,
               on_first_logits: Callable[[list[int], torch.Tensor], None] | None = None,
               stop_when: Callable[[list[int]], bool] | None = None,
               progress: Progress | None = None) -> list[list[int]]:
    """Greedy continuation of tokenized prompts → the new token ids of each (its end-of-turn token
    included when it ended on one), in input order. ``on_first_logits(prompt indices, logits (B, vocab))``
    receives the float32 next-token logits at the prompts' last position (those the first reply token
    is chosen from), once per prefilled batch. ``stop_when(new ids so far)`` ends a row early when true
    (e.g. once its verdict can no longer change).

    Prompts enter in order of length; a row leaves the step it ends, and once a quarter of the rows
    are free the next prompts are prefilled and join the running batch (continuous batching)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    ids = [list(s) for s in ids]
    if any(not s for s in ids):
        raise ValueError("a prompt has no tokens")
    model, dev = handle.model, handle.device
    pad = handle.tokenizer.pad_token_id or 0
    stop = torch.tensor(sorted(eos_ids(handle)) or [-1], device=dev)
    out: list[list[int]] = [[] for _ in ids]
    done = 0
    with handle.lock:
        prefix = shared_prefix(handle, ids, extra_tokens=max_new_tokens) if share_prefix else []
        cache0 = prefix_cache(handle, prefix)
        p = len(prefix) if cache0 is not None else 0
        rest = [s[p:] for s in ids]
        queue = deque(sorted(range(len(ids)), key=lambda i: len(rest[i])))
        cap = _rows_cap(handle, p + max(map(len, rest)) + max_new_tokens, batch_size, memory_mb)

        def prefill(idx: list[int]) -> _Rows:
            x, mask = left_pad([rest[i] for i in idx], pad)
            pos = (mask.cumsum(-1) - 1).clamp(min=0) + p
            if p:
                mask = torch.cat([torch.ones((len(idx), p), dtype=torch.long), mask], dim=1)
            x, mask, pos = x.to(dev), mask.to(dev), pos.to(dev)
            cache = batch_cache(cache0, len(idx)) if cache0 is not None else None
            with compute(handle):
                o = model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True, logits_to_keep=_last_index(handle, x.shape[1]))
            if not hasattr(o.past_key_values, "batch_select_indices"):
                raise _CacheUnsupported(f"{handle.name}: its cache cannot drop finished rows")
            logits = o.logits[:, -1, :].float()
            if on_first_logits is not None:
                on_first_logits(idx, logits)
            return _Rows(low_precision_cache(handle, o.past_key_values), mask, pos[:, -1:] + 1, logits.argmax(-1), idx)

        def emit(r: _Rows) -> _Rows | None:
            """Record each row's newly chosen token; drop the rows that ended (None when all did)."""
            nonlocal done
            for j, t in zip(r.idx, r.tok.tolist()):
                out[j].append(t)
            ended = torch.isin(r.tok, stop) | torch.tensor(
                [len(out[j]) >= max_new_tokens or (stop_when is not None and stop_when(out[j])) for j in r.idx],
                device=dev)
            if bool(ended.any()):
                done += int(ended.sum())
                report(progress, done, len(ids))
                if bool(ended.all()):
                    return None
                r.select((~ended).nonzero().squeeze(-1))
            return r

        rows: _Rows | None = None
        while queue or rows is not None:
            free = cap - (len(rows.idx) if rows is not None else 0)
            if queue and (rows is None or (free >= max(1, cap // 4) and _mergeable(rows.cache))):
                new = emit(prefill([queue.popleft() for _ in range(min(free, len(queue)))]))
                if rows is None or new is None:
                    rows = rows or new
                else:
                    rows.extend(new)
                continue
            # one decode step for every running row
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows.idx), 1))], dim=1)
            with compute(handle):
                o = model(input_ids=rows.tok.unsqueeze(-1), attention_mask=rows.mask, position_ids=rows.next_pos,
                          past_key_values=rows.cache, use_cache=True)
            rows.next_pos = rows.next_pos + 1
            rows.tok = o.logits[:, -1, :].float().argmax(-1)
            rows = emit(rows)
    return out


@torch.inference_mode()
def _generate_hf(handle: ModelHandle, texts: Sequence[str], *, max_new_tokens: int, batch_size: int,
                 do_sample: bool, temperature: float, seed: int, progress: Progress | None) -> list[list[int]]:
    """``model.generate`` on formatted ``texts`` in length-sorted batches → new token ids per text."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[list[int]] = [[] for _ in texts]
    tok = handle.tokenizer
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenize_prompts(handle, [texts[i] for i in idx], formatted=True)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id)
        if do_sample:
            torch.manual_seed(seed + start)
            kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with handle.lock, compute(handle):
            ids = handle.model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1]:]
        for j, i in enumerate(idx):
            out[i] = new[j].tolist()
        report(progress, min(start + batch_size, len(order)), len(order))
    return out


def _decode(handle: ModelHandle, new: Sequence[Sequence[int]]) -> list[str]:
    return [handle.tokenizer.decode(n, skip_special_tokens=True).strip() for n in new]


def _fast_replies(handle: ModelHandle, texts: Sequence[str], *, stop_when: Callable[[str], bool] | None = None,
                  **kw) -> list[str] | None:
    """:func:`greedy_ids` on formatted ``texts`` (``kw`` passed on; ``stop_when`` sees the decoded reply
    so far), decoded; None where it does not decode as ``model.generate`` would (logits processing, a
    cache that cannot drop rows)."""
    if not fast_greedy_supported(handle):
        return None
    tok = handle.tokenizer
    stop = None if stop_when is None else (lambda ids: stop_when(tok.decode(ids, skip_special_tokens=True)))
    try:
        return _decode(handle, greedy_ids(handle, tokenize(handle, texts, formatted=True), stop_when=stop, **kw))
    except _CacheUnsupported:
        return None


def generate(handle: ModelHandle, instructions: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int | None = None, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
             formatted: bool = False, fast: bool = True, share_prefix: bool = True,
             stop_when: Callable[[str], bool] | None = None, progress: Progress | None = None) -> list[str]:
    """Generate one reply per instruction; returns the decoded replies (prompt removed), in input order.

    Greedy decoding uses :func:`greedy_ids` (same tokens as ``model.generate``, measured in
    BENCHMARKS.md) unless ``fast=False`` or the model needs ``generate``'s logits processing;
    ``batch_size`` None sizes batches by memory (``model.generate``: 16). ``stop_when(reply so far)``
    ends a greedy reply early (the fast path only; the reply is then a prefix of the full one).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    texts = list(instructions) if formatted else [handle.format(i) for i in instructions]
    if not texts:
        return []
    if fast and not do_sample:
        replies = _fast_replies(handle, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                share_prefix=share_prefix, stop_when=stop_when, progress=progress)
        if replies is not None:
            return replies
    return _decode(handle, _generate_hf(handle, texts, max_new_tokens=max_new_tokens, batch_size=batch_size or 16,
                                        do_sample=do_sample, temperature=temperature, seed=seed, progress=progress))


def generate_with_logits(handle: ModelHandle, instructions: Sequence[str], *, max_new_tokens: int = 64,
                         batch_size: int | None = None, stop_when: Callable[[str], bool] | None = None,
                         progress: Progress | None = None) -> tuple[list[str], torch.Tensor]:
    """Greedy replies and the next-token logits at each prompt's last position, ``(n, vocab)`` float32
    on the CPU: the logits the first reply token is chosen from, so a refusal score costs no second
    pass (equal to :func:`refusal_lab.judges.last_logits` up to batching round-off; tests/test_generation.py).
    ``stop_when(reply so far)`` ends a reply early (the fast path only; the reply is then a prefix)."""
    from refusal_lab.judges import last_logits

    texts = [handle.format(i) for i in instructions]
    if not texts:
        return [], torch.empty(0)
    parts: list[tuple[list[int], torch.Tensor]] = []
    replies = _fast_replies(handle, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_when=stop_when,
                            on_first_logits=lambda idx, lg: parts.append((idx, lg.cpu())), progress=progress)
    if replies is None:
        replies = _decode(handle, _generate_hf(handle, texts, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size or 16, do_sample=False, temperature=1.0,
                                               seed=0, progress=progress))
        return replies, last_logits(handle, list(instructions))
    logits = torch.empty(len(texts), parts[0][1].shape[-1])
    for idx, lg in parts:
        logits[idx] = lg
    return replies, logits
