"""bitsandbytes schemes on a tiny model saved to disk (bnb reloads from the handle's source_dir)."""

from __future__ import annotations

import pytest
import torch

from refusal_lab.compression import REGISTRY, apply
from refusal_lab.compression.bnb import BnbUnavailable
from refusal_lab.compression.targets import dense_weight, select_targets
from refusal_lab.models import load_model
from refusal_lab.testing.tiny import tiny_handle

pytestmark = pytest.mark.skipif(REGISTRY["bnb-int8"].unavailable_reason is not None,
                                reason=str(REGISTRY["bnb-int8"].unavailable_reason))


@pytest.fixture(scope="module")
def disk_handle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    h = tiny_handle("llama", n_layers=2, d_model=128, seed=3)
    h.model.save_pretrained(folder, safe_serialization=True)
    h.tokenizer.save_pretrained(folder)
    return load_model(str(folder), device="cpu")


def _logits(h, ids):
    with h.lock, torch.no_grad():
        return h.model(input_ids=ids).logits.float()


@pytest.mark.parametrize("spec,min_corr", [("bnb-int8", 0.98), ("bnb-nf4", 0.9), ("bnb-fp4", 0.85)])
def test_bnb_model_works_and_original_untouched(disk_handle, spec, min_corr):
    snap = {k: v.clone() for k, v in disk_handle.model.state_dict().items()}
    ids = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 3]])
    ref = _logits(disk_handle, ids)
    new, rep = apply(disk_handle, spec)
    assert not new.model.training
    for k, v in snap.items():
        assert torch.equal(disk_handle.model.state_dict()[k], v), k
    names = {type(new.model.get_submodule(t.name)).__name__ for t in select_targets(disk_handle)}
    assert names == {"Linear8bitLt" if spec == "bnb-int8" else "Linear4bit"}
    assert type(new.model.get_output_embeddings()).__name__ == "Linear"  # lm_head stays
    out = _logits(new, ids)
    assert torch.isfinite(out).all()
    corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
    assert corr > min_corr, corr
    # the report: dequantized weights near the originals, 8 or ~4.5 bits per weight
    t = select_targets(disk_handle)[0]
    w0, w1 = dense_weight(disk_handle.model.get_submodule(t.name)), dense_weight(new.model.get_submodule(t.name))
    assert w1.shape == w0.shape and float((w1 - w0).abs().mean()) < 0.2 * float(w0.abs().mean())
    if spec == "bnb-int8":
        assert rep.module_bits[t.name] == pytest.approx(8 + 32 / t.in_features)
    else:  # float32 absmax per 64, or bfloat16 once repacked for AVX512-BF16 CPUs
        assert 4 + 16 / 64 - 0.01 <= rep.bits_per_weight <= 4 + 32 / 64 + 0.05
    assert rep.memory_bytes < rep.original_memory_bytes and len(rep.layer_sparsity) == 2
    assert new.spec.endswith("+" + spec) and new.meta["parent_fingerprint"] == disk_handle.fingerprint
    assert set(new.writers(0)) == {"attn", "mlp"}  # architecture discovery works on quantized layers


def test_bnb_respects_module_selection(disk_handle):
    new, rep = apply(disk_handle, "bnb-nf4", modules=["mlp.down_proj"])
    kinds = {t.name: type(new.model.get_submodule(t.name)).__name__ for t in select_targets(disk_handle)}
    assert all((k == "Linear4bit") == n.endswith("down_proj") for n, k in kinds.items())
    assert rep.n_modules == 2


def test_bnb_needs_source_dir():
    h = tiny_handle("llama", n_layers=2, d_model=64)
    with pytest.raises(BnbUnavailable, match="rtn:4:64"):
        apply(h, "bnb-nf4")


def test_bnb_failure_is_explained(disk_handle, monkeypatch):
    import transformers

    import refusal_lab.compression.bnb as bnb_mod

    def broken(*a, **k):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(BnbUnavailable, match="cannot run on this device.*rtn:8"):
        apply(disk_handle, "bnb-int8")
    monkeypatch.setattr(bnb_mod, "availability", lambda: "bitsandbytes cannot run on this device: x; use rtn:8")
    with pytest.raises(BnbUnavailable, match="rtn:8"):
        bnb_mod.load_quantized(disk_handle, bnb_mod.Scheme("bnb-nf4"), [])


@pytest.mark.parametrize("spec", ["bnb-int8", "bnb-nf4"])
def test_bnb_variant_runs_under_bf16_compute(disk_handle, spec):
    """Quantized layers under bf16 autocast (the default precision on CPUs with native bf16): they run,
    and their logits stay close to the float32 compute of the same variant."""
    import dataclasses

    from refusal_lab.activations import BatchRunner, tokenize

    new, _ = apply(disk_handle, spec)
    assert new.precision == disk_handle.precision  # a variant computes as its original does
    ids = tokenize(new, ["How do I bake bread?", "hi", "Write a poem about the sea"])
    with new.lock:
        a = BatchRunner(dataclasses.replace(new, precision="float32"), ids).last_logits()
        b = BatchRunner(dataclasses.replace(new, precision="bfloat16"), ids).last_logits()
    assert torch.isfinite(b).all()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99


def test_4bit_cpu_kernel_runs_as_a_dequantized_once_matmul(disk_handle, monkeypatch):
    """Under ``compute``, 4-bit layers on bitsandbytes' fused CPU kernel run as a bf16 matmul with their
    weight read out of the kernel once: the weight is the kernel's, outputs agree to the last bit of bf16
    (summation order), the swap is undone after the block, and a forward that builds a graph takes it too —
    whatever ``DENSE_4BIT`` says — with the gradient of the dequantized matmul (the kernel has no autograd)."""
    from refusal_lab import precision

    new, _ = apply(disk_handle, "bnb-nf4")
    ids = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 3], [9, 8, 7, 6, 5, 4, 3, 2]])
    _logits(new, ids)  # the first forward repacks for the CPU kernel where the CPU has AVX512-BF16
    packed = [m for m in new.model.modules() if precision._packed_4bit(m)]
    if not packed:
        pytest.skip("this CPU runs bitsandbytes' 4-bit layers without the repacked kernel")
    m = packed[0]
    w = precision.read_4bit_weight(m, chunk=16)
    assert w.dtype == torch.bfloat16 and w.shape == (m.out_features, m.in_features)
    ref = dense_weight(m)
    assert torch.allclose(w.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
    x = torch.randn(5, m.in_features)
    with torch.no_grad():
        a, b = m(x), precision._dense_4bit_forward(m, w, x)
    assert a.dtype == b.dtype == torch.float32
    assert torch.allclose(a, b, rtol=2 ** -7, atol=2 ** -7 * float(a.abs().max()))
    with new.lock, torch.no_grad(), precision.compute(new):
        assert all("forward" in p.__dict__ for p in packed)
        dense = new.model(input_ids=ids).logits.float()
    assert not any("forward" in p.__dict__ for p in packed)
    monkeypatch.setattr(precision, "DENSE_4BIT", False)
    with new.lock, torch.no_grad(), precision.compute(new):
        assert not any("forward" in p.__dict__ for p in packed)
        kernel = new.model(input_ids=ids).logits.float()
    assert torch.corrcoef(torch.stack([dense.flatten(), kernel.flatten()]))[0, 1] > 0.9999
    x = torch.randn(5, m.in_features, requires_grad=True)
    new.model.train()  # a training's mode: bitsandbytes still runs the packed kernel
    with new.lock, torch.enable_grad(), precision.compute(new):  # DENSE_4BIT still False: a graph needs it anyway
        assert all("forward" in p.__dict__ for p in packed)
        (m(x) * torch.arange(m.out_features)).sum().backward()
    want = torch.arange(m.out_features, dtype=torch.float32) @ w.float()  # d/dx of Σ_o c_o (W x)_o = cᵀW
    assert torch.allclose(x.grad, want.expand_as(x), rtol=2 ** -6, atol=1e-3 * float(want.abs().max()))
    assert not any("forward" in p.__dict__ for p in packed)
    new.model.eval()


def test_state_dict_of_a_packed_4bit_model_leaves_it_computing_the_same(disk_handle):
    """bitsandbytes unpacks CPU-packed 4-bit weights in place on ``state_dict()`` and then packs them again
    inconsistently (garbage outputs); fingerprints, snapshots and distill's LoRA state read it safely."""
    from refusal_lab import precision
    from refusal_lab.models import tensors_fingerprint

    new, _ = apply(disk_handle, "bnb-nf4")
    ids = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 3]])
    before = _logits(new, ids)
    if not any(precision._packed_4bit(m) for m in new.model.modules()):
        pytest.skip("this CPU runs bitsandbytes' 4-bit layers without the repacked kernel")
    fingerprint = tensors_fingerprint(new.model)
    assert torch.equal(_logits(new, ids), before) and tensors_fingerprint(new.model) == fingerprint
    with precision.kept_4bit_packing(new.model):
        new.model.state_dict()
    assert torch.equal(_logits(new, ids), before)
    new.model.state_dict()  # bitsandbytes' own behaviour, which the guard exists for
    assert not torch.allclose(_logits(new, ids), before, atol=1e-2)
