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
