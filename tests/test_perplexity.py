"""Sliding-window perplexity on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_lab.evaluation import perplexity
from refusal_lab.testing.tiny import tiny_handle

TEXT = ("The quick brown fox jumps over the lazy dog. Write a poem about the sea. "
        "Explain photosynthesis to a child. Give step by step instructions for a cake. ") * 2


def _reference(handle, text):
    """Whole-text perplexity in one forward pass (the text fits the context)."""
    ids = handle.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = handle.model(input_ids=ids).logits[0, :-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))


def test_perplexity_finite_deterministic_and_matches_full_pass():
    h = tiny_handle("llama", n_layers=2, d_model=64, seed=0)
    n_tokens = len(h.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert 40 < n_tokens < 256
    p = perplexity(h, TEXT)
    assert math.isfinite(p) and p > 1
    assert perplexity(h, TEXT) == p
    assert p == pytest.approx(_reference(h, TEXT), rel=1e-4)  # one window covers it all
    # sliding windows: every token scored once; short context only changes it a little
    seen = []
    p_small = perplexity(h, TEXT, max_length=32, stride=16, progress=lambda d, t: seen.append((d, t)))
    assert math.isfinite(p_small) and p_small > 1 and seen[-1][0] == seen[-1][1]
    assert perplexity(h, TEXT, max_length=32, stride=16, batch_size=1) == pytest.approx(p_small, rel=1e-5)
    assert perplexity(h, TEXT, max_length=32, stride=31) > 1


def test_perplexity_rejects_bad_arguments():
    h = tiny_handle("llama", n_layers=1, d_model=64)
    with pytest.raises(ValueError):
        perplexity(h, "a")
    with pytest.raises(ValueError):
        perplexity(h, TEXT, max_length=32, stride=32)


def test_perplexity_caps_window_at_context_length():
    h = tiny_handle("llama", n_layers=1, d_model=64)  # max_position_embeddings = 256
    long = TEXT * 3
    assert len(h.tokenizer(long, add_special_tokens=False)["input_ids"]) > 256
    p = perplexity(h, long, max_length=4096)
    assert p == perplexity(h, long, max_length=256) and math.isfinite(p)


def test_reference_perplexity_is_measured_once_per_unchanged_weights(monkeypatch):
    """The Compress page and the study's evaluation share a handle: the second asks the first's value,
    unless the weights changed in place or a hook is on the model."""
    import refusal_lab.evaluation as ev

    h = tiny_handle("llama")
    calls = []
    monkeypatch.setattr(ev, "perplexity", lambda *a, **k: calls.append(1) or 7.0 + len(calls))
    done = []
    assert ev.reference_perplexity(h) == 8.0
    assert ev.reference_perplexity(h, progress=lambda d, t: done.append((d, t))) == 8.0
    assert len(calls) == 1 and done == [(1, 1)]  # reused; its progress bar told it is complete
    hook = h.blocks[0].register_forward_hook(lambda *a: None)
    try:
        assert ev.reference_perplexity(h) == 9.0  # hooked: measured afresh
    finally:
        hook.remove()
    assert ev.reference_perplexity(h) == 8.0
    with torch.no_grad():
        h.blocks[1].self_attn.o_proj.weight.add_(1.0)
    assert ev.reference_perplexity(h) == 10.0 and len(calls) == 3
