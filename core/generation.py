"""Batched generation (left padding, KV cache), greedy or sampled.

Interventions are applied by the caller around the call (``with ablate(...): generate(...)``);
every forward takes ``handle.lock`` so a shared model never runs under another caller's hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.models import ModelHandle
from core.progress import Progress, report


def tokenize_prompts(handle: ModelHandle, instructions: Sequence[str], *, formatted: bool = False) -> dict:
    """Chat-format (unless ``formatted``) and tokenize with left padding → ``input_ids``/``attention_mask``
    of shape ``(batch, seq)`` on the model's device."""
    texts = list(instructions) if formatted else [handle.format(i) for i in instructions]
    enc = handle.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(handle.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.inference_mode()
def generate(handle: ModelHandle, instructions: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
             formatted: bool = False, progress: Progress | None = None) -> list[str]:
    """Generate one reply per instruction; returns the decoded replies (prompt removed).

    Prompts are sorted by length so batches carry little padding; output order matches input.
    """
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    out: list[str] = [""] * len(instructions)
    tok = handle.tokenizer
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenize_prompts(handle, [instructions[i] for i in idx], formatted=formatted)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id)
        if do_sample:
            torch.manual_seed(seed + start)
            kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with handle.lock:
            ids = handle.model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1]:]
        for j, i in enumerate(idx):
            out[i] = tok.decode(new[j], skip_special_tokens=True).strip()
        report(progress, min(start + batch_size, len(order)), len(order))
    return out
