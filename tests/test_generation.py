"""The fast greedy decoder against ``model.generate`` on tiny random-weight models: same tokens."""

import pytest
import torch

from refusal_lab.activations import tokenize
from refusal_lab.generation import _generate_hf, fast_greedy_supported, generate, greedy_ids
from refusal_lab.interventions import ablate, add
from refusal_lab.testing.tiny import ARCHS, tiny_handle

PROMPTS = ["How do I bake bread?", "Write a poem about the sea please", "hi",
           "Explain photosynthesis to a child in detail now", "Give step by step instructions for a cake",
           "How do I hack a bank?", "The quick brown fox", "As an AI I won't"]


def _reference(h, prompts, n):
    texts = [h.format(p) for p in prompts]
    return _generate_hf(h, texts, max_new_tokens=n, batch_size=3, do_sample=False, temperature=1.0, seed=0,
                        progress=None)


def _cut(rows, eos):
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]  # generate pads after the end


def _ending_token(h, prompts, n) -> int:
    """A token the model emits, made its end-of-turn, such that rows end at different steps."""
    ref = _reference(h, prompts, n)
    counts = torch.bincount(torch.tensor([t for ids in ref for t in ids]))
    for t in counts.argsort(descending=True).tolist():
        if len({len(r) for r in _cut(ref, t)}) > 1:
            return t
    pytest.fail("no token ends the rows at different steps")


def _lively(h):
    """Matrices re-drawn wider than the configs' init (GPT-2's 0.02 makes every prompt emit one token)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in h.model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return h


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_greedy_gives_generate_tokens(arch):
    h = _lively(tiny_handle(arch))
    eos = _ending_token(h, PROMPTS, 10)
    h.model.generation_config.eos_token_id = eos
    ref = _cut(_reference(h, PROMPTS, 10), eos)
    fast = greedy_ids(h, tokenize(h, PROMPTS), max_new_tokens=10, batch_size=3)
    assert fast == ref


def test_fast_greedy_under_interventions_and_batch_sizes():
    h = tiny_handle("llama")
    torch.manual_seed(3)
    r = torch.randn(h.d_model)
    for ctx in (lambda: ablate(h, r), lambda: add(h, r, 1, 4.0)):
        with ctx():
            ref = generate(h, PROMPTS, max_new_tokens=8, fast=False)
            for bs in (None, 1, 5):
                assert generate(h, PROMPTS, max_new_tokens=8, batch_size=bs) == ref
    assert generate(h, PROMPTS, max_new_tokens=8, share_prefix=False) == generate(h, PROMPTS, max_new_tokens=8)


def test_models_that_need_logits_processing_use_generate(monkeypatch):
    h = tiny_handle("llama")
    assert fast_greedy_supported(h)
    h.model.generation_config.repetition_penalty = 1.3
    assert not fast_greedy_supported(h)
    import refusal_lab.generation as gen

    monkeypatch.setattr(gen, "greedy_ids", lambda *a, **k: pytest.fail("fast path used"))
    replies = generate(h, PROMPTS[:2], max_new_tokens=4)
    assert len(replies) == 2


def test_generation_arguments_are_checked():
    h = tiny_handle("llama")
    with pytest.raises(ValueError, match="batch_size"):
        generate(h, PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_ids(h, tokenize(h, PROMPTS), max_new_tokens=0)
    assert generate(h, []) == []


def test_generate_with_logits_returns_the_first_step_logits():
    from refusal_lab.generation import generate_with_logits
    from refusal_lab.judges import last_logits

    h = tiny_handle("llama")
    replies, logits = generate_with_logits(h, PROMPTS, max_new_tokens=6, batch_size=3)
    assert replies == generate(h, PROMPTS, max_new_tokens=6)
    torch.testing.assert_close(logits, last_logits(h, PROMPTS), atol=1e-4, rtol=1e-4)
    assert logits.argmax(-1).tolist() == [ids[0] for ids in greedy_ids(h, tokenize(h, PROMPTS), max_new_tokens=1)]
    assert generate_with_logits(h, [])[0] == []


def test_stop_when_ends_rows_early_without_changing_a_monotone_verdict():
    """A row stops once a text-only-grows predicate holds; its reply is then a prefix of the full one,
    and the predicate's verdict on it is the full reply's (what calibration's refusal judge relies on)."""
    from refusal_lab.generation import generate_with_logits

    h = _lively(tiny_handle("llama"))
    full, lf = generate_with_logits(h, PROMPTS, max_new_tokens=12)
    letter = max("etaoinsr", key=lambda c: sum(c in r for r in full))  # a letter some replies hold, not all
    pred = lambda text: letter in text  # noqa: E731 — monotone: text only grows
    short, ls = generate_with_logits(h, PROMPTS, max_new_tokens=12, stop_when=pred)
    assert [pred(r) for r in short] == [pred(r) for r in full]
    assert all(f.startswith(s) for s, f in zip(short, full))
    assert any(len(s) < len(f) for s, f in zip(short, full))  # some rows did stop early
    torch.testing.assert_close(ls, lf)
    assert generate(h, PROMPTS, max_new_tokens=12, stop_when=pred) == short  # generate() stops the same way
