"""The zero-shot multiple-choice check: the bundled items and lm-eval-style scoring."""

import pytest
import torch

from refusal_lab.testing.tiny import tiny_handle
from refusal_lab.zero_shot import Item, accuracy, bundled_items, option_logprobs


def test_bundled_items_are_ours_and_well_formed():
    items = bundled_items()
    assert len(items) >= 200 and items == bundled_items()  # deterministic
    assert {i.kind for i in items} == {"arithmetic", "word knowledge", "everyday reasoning", "reading"}
    assert all(len(set(i.options)) == 4 and 0 <= i.answer < 4 for i in items)
    sums = [i for i in items if i.kind == "arithmetic" and "+" in i.question]
    a, b = (int(x) for x in sums[0].question[8:-1].split(" + "))
    assert sums[0].options[sums[0].answer] == str(a + b)


def test_option_logprobs_match_one_sequence_at_a_time():
    h = tiny_handle("llama")
    items = bundled_items()[:3]
    batched = option_logprobs(h, items, batch_size=5)
    tok = h.tokenizer
    it = items[1]
    ctx = tok(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"]
    for k, option in enumerate(it.options):
        o = tok(f" {option}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(h.model(input_ids=torch.tensor([ctx + o])).logits[0].double(), -1)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(o))
        assert batched[1, k].item() == pytest.approx(want, rel=1e-4)


def test_accuracy_and_its_standard_error(monkeypatch):
    import refusal_lab.zero_shot as zs

    items = [Item("x", "q", ("a", "b", "c", "d"), i % 4) for i in range(8)]
    picks = torch.zeros(8, 4, dtype=torch.float64)
    picks[torch.arange(8), torch.tensor([i % 4 for i in range(6)] + [0, 0])] = 1.0  # rows 6 and 7 pick option 0: wrong
    monkeypatch.setattr(zs, "option_logprobs", lambda handle, its, progress=None: picks)
    p, se = accuracy(None, items)
    assert p == pytest.approx(0.75) and se == pytest.approx((0.75 * 0.25 / 8) ** 0.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_shared_context_scores_equal_whole_sequences(arch):
    """The fast path (each prompt once, its cache continued by the four options) gives the sums the whole
    prompt + option rows give, and the same answer on every item."""
    from refusal_lab.activations import continuation_logits
    from refusal_lab.zero_shot import _summed

    h = tiny_handle(arch)
    items = bundled_items()[::9]  # every kind, prompts of different lengths (padding in each batch)
    fast = option_logprobs(h, items, batch_size=8)
    tok = h.tokenizer
    rows = [(tok(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"],
             tok(f" {o}", add_special_tokens=False)["input_ids"]) for it in items for o in it.options]
    exact = torch.tensor([float(_summed(lg, o)) for lg, (_, o) in zip(continuation_logits(h, rows), rows)],
                         dtype=torch.float64).view(len(items), 4)
    assert torch.allclose(fast, exact, rtol=1e-5, atol=1e-4)
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))


def test_accuracy_is_measured_once_per_unchanged_weights(monkeypatch):
    import refusal_lab.zero_shot as zs
    from refusal_lab.interventions import intervene

    h = tiny_handle("llama")
    calls = []
    real = zs.option_logprobs
    monkeypatch.setattr(zs, "option_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = accuracy(h)
    assert accuracy(h) == first and len(calls) == 1  # reused
    direction = torch.randn(h.d_model)
    with intervene("ablate", h, direction):  # hooks in place: measured afresh, not remembered
        accuracy(h)
    assert len(calls) == 2
    with intervene("orthogonalize", h, direction):  # weights swapped for edited ones
        accuracy(h)
    assert len(calls) == 3
    accuracy(h)
    assert len(calls) == 3  # the hooks and edits are gone: the remembered value again
    with torch.no_grad():
        h.blocks[0].mlp.down_proj.weight.mul_(0.5)  # an edit in place
    accuracy(h)
    assert len(calls) == 4
    import dataclasses
    accuracy(dataclasses.replace(h, fingerprint="other"))
    assert len(calls) == 5  # another handle remembers its own
