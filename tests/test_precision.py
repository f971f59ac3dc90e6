"""Compute precision: bf16 autocast reaches every forward of the library, float32 stays exact, and
results of the two precisions are stored apart."""

import dataclasses

import pytest
import torch

import refusal_lab.precision as precision
from refusal_lab.activations import BatchRunner, prefix_cache, tokenize
from refusal_lab.generation import generate, generate_with_logits
from refusal_lab.precision import compute, resolve_precision
from refusal_lab.study import StudySpec
from refusal_lab.testing.tiny import ARCHS, tiny_handle

PROMPTS = ["How do I bake bread?", "Write a poem about the sea please", "hi", "How do I hack a bank?"]


def test_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "fast_bf16", lambda device: True)
    assert resolve_precision("auto", cpu, torch.float32) == "bfloat16"
    assert resolve_precision("float32", cpu, torch.float32) == "float32"
    assert resolve_precision("auto", cpu, torch.bfloat16) == "bfloat16"  # low-precision weights compute as such
    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)
    assert resolve_precision("auto", cpu, torch.float32) == "float32"  # the clean fallback
    assert resolve_precision("bfloat16", cpu, torch.float32) == "bfloat16"  # asked for: honoured
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu, torch.float32)


def _matmul_dtypes(h, fn) -> set:
    seen = set()
    hooks = [m.register_forward_hook(lambda m, a, o: seen.add(o.dtype)) for m in h.model.modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        fn()
    finally:
        for x in hooks:
            x.remove()
    return seen


def test_bf16_handle_runs_every_forward_in_bf16_and_float32_stays_exact():
    h32 = tiny_handle("llama")
    h16 = dataclasses.replace(h32, precision="bfloat16")
    ids = tokenize(h32, PROMPTS)
    with h32.lock:
        run32 = lambda: BatchRunner(h32, ids).last_logits()  # noqa: E731
        run16 = lambda: BatchRunner(h16, ids).last_logits()  # noqa: E731
        assert _matmul_dtypes(h32, run32) == {torch.float32}
        assert _matmul_dtypes(h16, run16) == {torch.bfloat16}
        a, b = run32(), run16()
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # rounded matmuls, float32 logits out
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)  # close: bf16 keeps ~3 significant digits
    assert _matmul_dtypes(h16, lambda: generate(h16, PROMPTS[:2], max_new_tokens=3)) == {torch.bfloat16}
    assert _matmul_dtypes(h32, lambda: generate(h32, PROMPTS[:2], max_new_tokens=3)) == {torch.float32}
    with compute(h32):
        assert not torch.is_autocast_enabled("cpu")
    with compute(h16):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")  # the context always leaves


def test_spec_keeps_naming_old_float32_studies_and_results_are_keyed_by_precision(tmp_path):
    old = StudySpec(precision="float32", aird_search="generated").to_dict()
    assert "precision" not in old and "aird_search" not in old  # stored as specs were before these fields
    assert StudySpec.from_dict(old) == StudySpec(precision="float32", aird_search="generated")
    assert StudySpec.from_dict(StudySpec(precision="bfloat16").to_dict()).precision == "bfloat16"

    from refusal_lab.study import Study

    h32 = tiny_handle("llama")
    h16 = dataclasses.replace(h32, precision="bfloat16")
    keys = []
    for h in (h32, h16, h32):
        s = Study(StudySpec(model="tiny", schemes=[], precision=h.precision), tmp_path, original=h)
        assert s.precision == h.precision
        keys.append(s._cached("probe", ("x",), lambda: {"precision": h.precision}))
    assert keys == [{"precision": "float32"}, {"precision": "bfloat16"}, {"precision": "float32"}]



def _autocast_only(h, fn):
    """``fn()`` with autocast alone (the cast of every weight on every forward, no cached copies)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "_bf16_weights", lambda model: __import__("contextlib").nullcontext())
        return fn()


def test_cached_bf16_weights_are_bit_identical_to_autocast_and_follow_weight_changes():
    h = dataclasses.replace(tiny_handle("llama"), precision="bfloat16")
    ids = tokenize(h, PROMPTS)

    def logits():
        with h.lock:
            return BatchRunner(h, ids).last_logits()

    precision.clear_shadows()
    assert torch.equal(logits(), _autocast_only(h, logits))
    assert generate(h, PROMPTS, max_new_tokens=5) == _autocast_only(h, lambda: generate(h, PROMPTS, max_new_tokens=5))
    w = h.model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.float32  # swapped back after every forward
    with torch.no_grad():
        w.mul_(3.0)  # an in-place edit: the cached copy must be made again
    try:
        assert torch.equal(logits(), _autocast_only(h, logits))
        saved = w.data
        w.data = saved * 0.5  # new storage
        assert torch.equal(logits(), _autocast_only(h, logits))
        w.data = saved
    finally:
        with torch.no_grad():
            w.div_(3.0)
    assert torch.equal(logits(), _autocast_only(h, logits))
    with torch.enable_grad():  # a forward that builds a graph keeps the float32 parameters
        with precision.compute(h):
            assert h.model.model.layers[0].mlp.down_proj.weight is w


def _float32_kv(fn):
    """``fn()`` with key/value caches left in float32 (no :func:`precision.low_precision_cache`)."""
    import refusal_lab.activations as acts
    import refusal_lab.generation as gen

    with pytest.MonkeyPatch.context() as mp:
        for mod in (acts, gen):
            mp.setattr(mod, "low_precision_cache", lambda handle, cache: cache)
        return fn()


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_kv_cache_is_bit_identical_to_a_float32_one(arch):
    h = dataclasses.replace(tiny_handle(arch), precision="bfloat16")
    ids = tokenize(h, PROMPTS)

    def run():
        with h.lock:
            logits = BatchRunner(h, ids).last_logits()
        return logits, generate_with_logits(h, PROMPTS, max_new_tokens=6)

    (a, (ra, la)), (b, (rb, lb)) = run(), _float32_kv(run)
    assert torch.equal(a, b) and ra == rb and torch.equal(la, lb)


def test_bf16_kv_cache_holds_bf16_only_under_autocast():
    h32 = tiny_handle("llama")
    prefix = tokenize(h32, ["hi"])[0][:6]
    with h32.lock:
        cache = prefix_cache(h32, prefix)
        assert {layer.keys.dtype for layer in cache.layers} == {torch.float32}
        cache = prefix_cache(dataclasses.replace(h32, precision="bfloat16"), prefix)
    assert {layer.keys.dtype for layer in cache.layers} == {layer.values.dtype for layer in cache.layers} == {torch.bfloat16}
    assert all(precision.is_growing_layer(layer) for layer in cache.layers)
