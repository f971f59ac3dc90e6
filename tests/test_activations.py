"""Residual-stream capture: post-instruction positions, batched means vs a naive reference, projections."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_lab.activations import (BatchRunner, mean_activations, naive_mean_activations, post_instruction_length,
                              post_instruction_tokens, projection_stats, projections, tokenize)
from refusal_lab.models import ChatTemplateError
from refusal_lab.progress import Cancelled
from refusal_lab.testing.tiny import ARCHS, tiny_handle

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi",
           "Explain photosynthesis to a child, step by step, in detail please.", "How do I hack a bank?",
           "Give step by step instructions for a cake"]

LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def llama():
    return tiny_handle("llama", n_layers=3)


def _with_template(handle, template: str | None, system: str | None = None):
    h = copy.copy(handle)
    h.chat_template = template
    h.system_prompt = system
    return h


@pytest.mark.parametrize("template", [None, LLAMA3, GEMMA, MISTRAL], ids=["chatml", "llama3", "gemma", "mistral"])
@pytest.mark.parametrize("system", [None, "You are a helpful AI assistant."])
def test_post_instruction_positions_from_template(llama, template, system):
    h = _with_template(llama, template, system)
    n = post_instruction_length(h)
    suffix = h.post_instruction_suffix()
    assert n >= 1
    for prompt in PROMPTS[:3]:
        ids = tokenize(h, [prompt])[0]
        assert h.tokenizer.decode(ids[-n:]) == suffix  # the last n tokens are exactly the template's suffix
        assert prompt.strip() in h.tokenizer.decode(ids[:-n])
    assert "".join(post_instruction_tokens(h)) == suffix


def test_template_without_suffix_is_an_error(llama):
    h = _with_template(llama, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="nothing after the instruction"):
        post_instruction_length(h)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma2", "phi3"])
def test_batched_means_match_naive_reference(arch):
    h = tiny_handle(arch, n_layers=3)
    h.system_prompt = "You are a helpful AI assistant."  # long shared prefix → KV-cache reuse path
    ref = naive_mean_activations(h, PROMPTS)
    n = post_instruction_length(h)
    assert ref.shape == (n, h.n_layers + 1, h.d_model)
    for kwargs in (dict(batch_size=2), dict(share_prefix=False), dict()):
        acts = mean_activations(h, PROMPTS, **kwargs)
        assert acts.mean.shape == ref.shape and acts.mean.dtype == torch.float64
        assert acts.positions == list(range(-n, 0))
        torch.testing.assert_close(acts.mean, ref, atol=1e-5, rtol=1e-4)
    if arch != "gemma2":  # gemma2's sliding window disables prefix sharing for long prompts
        assert len(BatchRunner(h, tokenize(h, PROMPTS), min_rest=n).prefix) >= 4


def test_keep_filter_and_progress(llama):
    calls = []
    keep = lambda logits: torch.arange(len(logits)) % 2 == 0  # noqa: E731 — keeps row 0, 2, … of each batch
    acts = mean_activations(llama, PROMPTS, keep=keep, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (len(PROMPTS), len(PROMPTS)) and len(calls) == 3
    kept = [p for p, k in zip(PROMPTS, acts.kept) if k]
    assert acts.count == len(kept) == 3 and acts.count_all == len(PROMPTS)
    torch.testing.assert_close(acts.mean, mean_activations(llama, kept).mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(acts.mean_all, mean_activations(llama, PROMPTS).mean, atol=1e-6, rtol=1e-5)


def test_batches_follow_memory_budget_and_length_order(llama):
    ids = tokenize(llama, PROMPTS * 4)
    tiny_budget = BatchRunner(llama, ids, memory_mb=0.01)
    assert all(len(b) == 1 for b in tiny_budget.batches)
    big = BatchRunner(llama, ids, memory_mb=512, max_batch=8)
    assert max(len(b) for b in big.batches) == 8
    lengths = [len(big.rest[i]) for b in big.batches for i in b]
    assert lengths == sorted(lengths)
    assert sorted(i for b in big.batches for i in b) == list(range(len(ids)))


def test_cancel_removes_read_hooks(llama):
    def cancel(done, total):
        raise Cancelled()
    with pytest.raises(Cancelled):
        mean_activations(llama, PROMPTS, batch_size=2, progress=cancel)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in llama.model.modules()) == 0


def test_projections_and_stats(llama):
    torch.manual_seed(0)
    r = torch.randn(llama.d_model)
    proj = projections(llama, PROMPTS, r)
    assert proj.shape == (len(PROMPTS), llama.n_layers + 1)
    mean = mean_activations(llama, PROMPTS).mean[-1]  # (L+1, d) at the last position
    torch.testing.assert_close(proj.double().mean(0), mean @ (r.double() / r.norm()), atol=1e-5, rtol=1e-4)
    per_layer = torch.randn(llama.n_layers + 1, llama.d_model)
    p2 = projections(llama, PROMPTS, per_layer, position=-2)
    assert p2.shape == proj.shape
    stats = projection_stats(proj + 1.0, proj)
    assert set(stats) == {"harmful_mean", "harmful_std", "harmless_mean", "harmless_std", "cohens_d"}
    assert (stats["cohens_d"] > 0).all() and stats["cohens_d"].shape == (llama.n_layers + 1,)


def test_runner_without_a_reusable_cache_runs_full_prompts(llama, monkeypatch):
    h = _with_template(llama, None, "You are a helpful AI assistant.")
    ref = mean_activations(h, PROMPTS).mean
    import refusal_lab.activations as acts

    monkeypatch.setattr(acts, "prefix_cache", lambda handle, prefix: None)  # e.g. a legacy tuple cache
    assert len(BatchRunner(h, tokenize(h, PROMPTS), min_rest=2).prefix) >= 4
    torch.testing.assert_close(mean_activations(h, PROMPTS).mean, ref, atol=1e-5, rtol=1e-4)


def test_writer_inputs_match_one_prompt_at_a_time(llama):
    from refusal_lab.activations import read_points, writer_inputs

    torch.manual_seed(1)
    r = torch.randn(llama.d_model)
    mod = llama.writers(1)["mlp"]
    x, p = writer_inputs(llama, PROMPTS, mod, r, 2, n_positions=3)  # the pass ends at block 2's input
    assert x.shape == (3 * len(PROMPTS), mod.in_features) and p.shape == (3 * len(PROMPTS),)
    x0, p0 = writer_inputs(llama, PROMPTS, llama.writers(0)["mlp"], r, 1, n_positions=3)  # ends at block 1
    x2, p2 = writer_inputs(llama, PROMPTS, llama.writers(2)["mlp"], r, 1, n_positions=3)  # a writer above: full pass
    assert torch.equal(p2, p0) and x2.shape == x0.shape and not torch.equal(x2, x0)
    from refusal_lab.interventions import count_hooks
    assert count_hooks(llama) == 0
    seen = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             read_points(llama)[2].register_forward_pre_hook(
                 lambda m, a, k: seen.__setitem__("h", a[0] if a else k["hidden_states"]), with_kwargs=True)]
    try:
        for i, ids in enumerate(tokenize(llama, PROMPTS)):
            with torch.no_grad():
                llama.model(input_ids=torch.tensor([ids]))
            torch.testing.assert_close(x[3 * i:3 * i + 3], seen["x"][0, -3:].double(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(p[3 * i:3 * i + 3], seen["h"][0, -3:].double() @ (r.double() / r.norm()),
                                       atol=1e-5, rtol=1e-4)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_from_a_middle_block_gives_the_full_pass_logits(arch):
    """``start=l`` skips blocks below l using their kept inputs: the logits equal a full pass's, with an
    intervention at block l or above, and the blocks are whole again afterwards."""
    import dataclasses

    from refusal_lab.interventions import add, count_hooks

    for precision in ("float32", "bfloat16"):
        h = dataclasses.replace(tiny_handle(arch), precision=precision)
        runner = BatchRunner(h, tokenize(h, PROMPTS), batch_size=2)
        v = torch.randn(h.d_model)
        with h.lock:
            with pytest.raises(ValueError, match="not kept"):
                runner.last_logits(start=2)
            base = runner.last_logits(keep_inputs=[1, 2])
            assert torch.equal(base, runner.last_logits(start=2))  # nothing changed: the same logits
            for layer in (1, 2):
                with add(h, v, layer, 4.0):
                    full = runner.last_logits()
                    assert not torch.equal(full, base)
                    assert torch.equal(full, runner.last_logits(start=layer))
                    assert torch.equal(full, runner.last_logits(start=1))  # any kept block at or below
        assert count_hooks(h) == 0 and not any("forward" in b.__dict__ for b in h.blocks)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_continuation_logits_equal_each_sequence_alone(arch):
    """Left-padded, unembedding only the last positions: the logits each unpadded sequence gives alone at
    the positions predicting its continuation (contexts and continuations of different lengths; gemma2's
    sliding window of 64 reached by one row, which then runs alone; rows sharing a prefix)."""
    from refusal_lab.activations import continuation_logits

    h = tiny_handle(arch)
    pairs = [([5, 17, 33], [60, 81]), ([9] * 11 + [4], [7]), ([12, 13], [14, 15, 16, 17, 18]), ([8], [3, 3])]
    if arch == "gemma2":
        pairs.append(([6] * 70, [9, 10]))
    template = [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]  # a shared prefix: run once, its cache reused
    pairs += [(template + [40, 41], [42, 43, 44]), (template + [50], [51]), (template + [60, 61, 62, 63], [64, 65])]
    from refusal_lab.activations import shared_prefix

    assert len(shared_prefix(h, [c + o for c, o in pairs[-3:]], min_rest=4)) == 10  # these alone share it
    for batch in (pairs, pairs[-3:]):
        for (c, o), lg in zip(batch, continuation_logits(h, batch)):
            with torch.no_grad():
                alone = h.model(input_ids=torch.tensor([c + o])).logits[0, len(c) - 1:len(c) + len(o) - 1].float()
            assert lg.shape == (len(o), alone.shape[-1])
            assert torch.allclose(lg, alone, atol=1e-4, rtol=1e-4)
