"""Interventions: ablation kills the direction, orthogonalization ≡ ablation, clean exits, thread safety."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers

from refusal_lab.generation import generate, tokenize_prompts
from refusal_lab.interventions import ablate, add, count_hooks, orthogonalize, scale_writers
from refusal_lab.judges import refusal_scores
from refusal_lab.models import handle_from_model
from refusal_lab.testing.tiny import ARCHS, tiny_config, tiny_handle, tiny_tokenizer

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi"]
POST_NORM = {"gemma2", "gemma3_text"}  # norms *after* the attention/MLP writers


def _handle(arch: str, n_layers: int = 3):
    """A tiny model whose norm weights are randomised (so norms are not direction-preserving)."""
    h = tiny_handle(arch, n_layers=n_layers)
    g = torch.Generator().manual_seed(1)
    for name, p in h.model.named_parameters():
        if "norm" in name or "ln" in name:
            p.data.add_(0.5 * torch.randn(p.shape, generator=g))
    return h


def _direction(h, seed: int = 2) -> torch.Tensor:
    return torch.randn(h.d_model, generator=torch.Generator().manual_seed(seed))


def _logits(h) -> torch.Tensor:
    enc = tokenize_prompts(h, PROMPTS)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with h.lock:
        return h.model(**enc, position_ids=pos).logits


def _read_points(h):
    return [*h.blocks, h.final_norm]


@pytest.mark.parametrize("arch", ARCHS)
def test_ablate_removes_direction_from_every_block_input(arch):
    h = _handle(arch)
    r = _direction(h)
    unit = r / r.norm()
    seen: list[torch.Tensor] = []
    with ablate(h, r):
        hooks = [m.register_forward_pre_hook(lambda mod, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                             with_kwargs=True) for m in _read_points(h)]
        try:
            _logits(h)
        finally:
            for x in hooks:
                x.remove()
    assert len(seen) == h.n_layers + 1
    assert max(float((x @ unit).abs().max()) for x in seen) < 1e-5
    # without the intervention the direction is present
    assert count_hooks(h) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_orthogonalize_equals_ablate(arch):
    if arch in POST_NORM:
        pytest.skip(f"{arch} applies a norm after the attention/MLP output projections: orthogonal writer "
                    "weights no longer give an orthogonal residual update, so weight editing ≠ runtime ablation")
    h = _handle(arch)
    r = _direction(h)
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    base = _logits(h)
    with ablate(h, r):
        ablated = _logits(h)
    with orthogonalize(h, r):
        ortho = _logits(h)
    assert float((ablated - base).abs().max()) > 1e-3  # the intervention does something
    torch.testing.assert_close(ortho, ablated, atol=1e-4, rtol=0)
    after = h.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical after exit
    torch.testing.assert_close(_logits(h), base, atol=0, rtol=0)


def test_orthogonalize_keeps_tied_unembedding():
    cfg = tiny_config("llama", n_layers=2)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    h = handle_from_model(model, tiny_tokenizer())
    assert h.model.lm_head.weight is h.embedding.weight
    original = h.embedding.weight
    snapshot = original.detach().clone()
    r = _direction(h)
    with ablate(h, r):
        ablated = _logits(h)
    with orthogonalize(h, r):
        assert h.model.lm_head.weight is original and torch.equal(original, snapshot)
        assert float((h.embedding.weight @ (r / r.norm())).abs().max()) < 1e-5
        ortho = _logits(h)
    torch.testing.assert_close(ortho, ablated, atol=1e-4, rtol=0)
    assert h.embedding.weight is original and h.model.lm_head.weight is original
    assert torch.equal(original, snapshot)


@pytest.mark.parametrize("kind", ["ablate", "ablate_layers", "add", "scale", "orthogonalize"])
def test_clean_exit_after_exception(kind):
    h = _handle("gpt2")
    r = _direction(h)
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    ctx = {"ablate": lambda: ablate(h, r), "ablate_layers": lambda: ablate(h, r, layers=[0, 2]),
           "add": lambda: add(h, r, 1, 3.0), "scale": lambda: scale_writers(h, r, [1], 2.0),
           "orthogonalize": lambda: orthogonalize(h, r)}[kind]
    base = _logits(h)
    with pytest.raises(RuntimeError, match="boom"):
        with ctx():
            assert count_hooks(h) > 0 or kind == "orthogonalize"
            _logits(h)
            raise RuntimeError("boom")
    assert count_hooks(h) == 0
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())
    torch.testing.assert_close(_logits(h), base, atol=0, rtol=0)
    assert h.lock.acquire(blocking=False)  # the lock was released
    h.lock.release()


def test_add_shifts_block_input_and_composes():
    h = _handle("llama")
    v1, v2 = _direction(h, 3), _direction(h, 4)
    seen = {}

    def capture(m, a, k):
        seen["x"] = a[0].clone()

    hook = h.blocks[1].register_forward_pre_hook(capture, with_kwargs=True)
    _logits(h)
    hook.remove()
    plain = seen["x"]
    with add(h, v1, 1, 2.0):
        hook = h.blocks[1].register_forward_pre_hook(capture, with_kwargs=True)  # runs after add's hook
        _logits(h)
        hook.remove()
    torch.testing.assert_close(seen["x"], plain + 2.0 * v1, atol=1e-6, rtol=0)
    with add(h, v1, 1, 0.5), add(h, v2, 1, -1.0):  # nesting composes
        nested = _logits(h)
    with add(h, 0.5 * v1 - v2, 1):
        single = _logits(h)
    torch.testing.assert_close(nested, single, atol=1e-5, rtol=0)
    assert count_hooks(h) == 0


def test_scale_writers_scales_the_written_component():
    h = _handle("qwen2")
    r = _direction(h)
    unit = r / r.norm()
    outs: dict[float, list[torch.Tensor]] = {}
    for alpha in (0.0, -1.0, 1.0):
        got: list[torch.Tensor] = []
        with scale_writers(h, r, [0, 1], alpha):
            hooks = [w.register_forward_hook(lambda m, a, o: got.append(o @ unit))
                     for layer in (0, 1) for w in h.writers(layer).values()]
            _logits(h)
            for x in hooks:
                x.remove()
        outs[alpha] = got
    # every written component is removed with alpha = -1
    assert all(float(x.abs().max()) < 1e-5 for x in outs[-1.0])
    # layer 0's attention output projection sees identical inputs in every run: scaled by (1 + alpha)
    torch.testing.assert_close(outs[1.0][0], 2 * outs[0.0][0], atol=1e-5, rtol=1e-5)
    assert float((outs[1.0][0] - outs[0.0][0]).abs().max()) > 1e-4


def test_generation_inside_intervention_and_nesting():
    h = _handle("llama")
    r = _direction(h)
    with orthogonalize(h, r):
        with ablate(h, r):  # ablation of an already orthogonal model changes (almost) nothing
            a = generate(h, PROMPTS, max_new_tokens=4)
        b = generate(h, PROMPTS, max_new_tokens=4)
    assert a == b
    assert count_hooks(h) == 0


def test_eight_threads_steering_one_model_get_serial_results():
    h = _handle("llama", n_layers=2)
    v = _direction(h) * 3
    coeffs = [None, 0.5, 1.0, 2.0, None, -1.0, 4.0, None]  # None = unsteered caller

    def job(c):
        if c is None:
            return refusal_scores(h, PROMPTS)
        with add(h, v, 1, c):
            return refusal_scores(h, PROMPTS)

    serial = [job(c) for c in coeffs]
    assert len({tuple(s.tolist()) for s in serial}) == len(set(coeffs))  # coefficients matter
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(coeffs))}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(coeffs))

    def worker(i):
        try:
            barrier.wait()
            for _ in range(4):
                results[i].append(job(coeffs[i]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(coeffs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, s in enumerate(serial):
        assert len(results[i]) == 4
        for got in results[i]:
            assert torch.equal(got, s), f"thread {i} (coeff {coeffs[i]}) saw another caller's hooks"
    assert count_hooks(h) == 0


def test_bad_directions_are_rejected():
    h = tiny_handle("llama", n_layers=2)
    with pytest.raises(ValueError, match="shape"):
        with ablate(h, torch.ones(h.d_model + 1)):
            pass
    with pytest.raises(ValueError, match="zero"):
        with orthogonalize(h, torch.zeros(h.d_model)):
            pass
    with pytest.raises(ValueError, match="layers"):
        with add(h, torch.ones(h.d_model), 7):
            pass
    assert count_hooks(h) == 0


def test_orthogonalize_rejects_quantized_writers_and_leaves_weights_alone():
    h = tiny_handle("llama", n_layers=2)
    writer = h.writers(1)["mlp"]
    writer.weight = torch.nn.Parameter(torch.zeros_like(writer.weight, dtype=torch.int8), requires_grad=False)
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    with pytest.raises(TypeError, match="use ablate"):
        with orthogonalize(h, torch.ones(h.d_model)):
            pass
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())
    assert h.lock.acquire(blocking=False)
    h.lock.release()


def test_prefix_refusal_scores_match_the_prompt_score_and_follow_steering():
    from refusal_lab.judges import prefix_refusal_scores

    h = _handle("llama")
    tokens, scores = prefix_refusal_scores(h, PROMPTS[0], "Sure, here is how to do it.")
    assert len(scores) == len(tokens) + 1 and len(tokens) > 3
    assert scores[0] == pytest.approx(float(refusal_scores(h, PROMPTS[:1])[0]), abs=1e-4)
    r = torch.randn(h.d_model)
    with add(h, r, 1, 4.0):
        _, steered = prefix_refusal_scores(h, PROMPTS[0], "Sure, here is how to do it.")
        assert steered[0] == pytest.approx(float(refusal_scores(h, PROMPTS[:1])[0]), abs=1e-4)
    assert steered != scores and count_hooks(h) == 0
