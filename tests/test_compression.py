"""Compression schemes on tiny random models: specs, sparsity, N:M patterns, quantization bounds,
originals untouched, report fields, Wanda/SparseGPT behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_lab.compression import REGISTRY, SchemeError, apply, list_schemes, parse_scheme
from refusal_lab.compression.calibration import Calibration, from_prompts, from_text
from refusal_lab.compression.pruning import magnitude_prune, nm_mask, sparsegpt_prune, wanda_prune
from refusal_lab.compression.quantization import rtn_quantize
from refusal_lab.compression.targets import dense_weight, select_targets
from refusal_lab.testing.tiny import tiny_handle


@pytest.fixture(scope="module")
def handle():
    return tiny_handle("llama", n_layers=3, d_model=64, seed=0)


@pytest.fixture(scope="module")
def calib(handle):
    return from_text(handle.tokenizer, n_samples=4, seq_len=64)


def _snapshot(h):
    return {k: v.detach().clone() for k, v in h.model.state_dict().items()}


def _assert_same(h, snap):
    now = h.model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


# -- specs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,canonical", [
    ("bnb-int8", "bnb-int8"), ("BNB-NF4", "bnb-nf4"), ("bnb-fp4", "bnb-fp4"),
    ("rtn:8", "rtn:8"), ("rtn:4:64", "rtn:4:64"), ("rtn:4:-1", "rtn:4"), ("rtn:3:64:asym", "rtn:3:64"),
    ("rtn:4:128:sym", "rtn:4:128:sym"), ("rtn:2:sym", "rtn:2:sym"), ("hqq:4:64", "hqq:4:64"), ("hqq:8", "hqq:8"),
    ("magnitude:0.5", "magnitude:0.5"), ("wanda: 0.50", "wanda:0.5"), ("sparsegpt:0", "sparsegpt:0"),
    ("sparsegpt:0.95", "sparsegpt:0.95"), ("wanda:2:4", "wanda:2:4"), ("sparsegpt:2:4", "sparsegpt:2:4"),
    ("magnitude:4:8", "magnitude:4:8"), ("magnitude:0.123456789", "magnitude:0.123456789"),
])
def test_spec_round_trip(spec, canonical):
    s = parse_scheme(spec)
    assert str(s) == canonical
    assert parse_scheme(str(s)) == s


@pytest.mark.parametrize("spec", [
    "", "bnb-int4", "bnb-int8:4", "rtn", "rtn:1", "rtn:9", "rtn:4:48", "rtn:4:4", "rtn:4:64:64", "rtn:x",
    "hqq:5:64", "hqq:4:64:sym", "magnitude", "magnitude:0.96", "magnitude:-0.1", "wanda:50", "wanda:1",
    "wanda:4:2", "wanda:0:4", "sparsegpt:1:32", "wanda:2:4:8", "gptq:4", "wanda:nan", "wanda:half",
])
def test_bad_specs_rejected(spec):
    with pytest.raises(SchemeError) as e:
        parse_scheme(spec)
    assert "Valid schemes" in str(e.value) and "rtn:BITS" in str(e.value)


def test_registry_lists_every_method():
    methods = [i.method for i in list_schemes()]
    assert methods == list(REGISTRY)
    assert set(methods) == {"bnb-int8", "bnb-nf4", "bnb-fp4", "rtn", "hqq", "magnitude", "wanda", "sparsegpt"}
    for info in list_schemes():
        for ex in info.examples:
            assert parse_scheme(ex).method == info.method
        assert info.to_dict()["form"]


# -- targets -------------------------------------------------------------------------------------

def test_default_targets_are_block_linears(handle):
    names = [t.name for t in select_targets(handle)]
    assert len(names) == 3 * 7
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert [t.name for t in select_targets(handle, ["q_proj", "down_proj"])] == [
        n for n in names if n.endswith(("q_proj", "down_proj"))]
    assert all("mlp" in t.name for t in select_targets(handle, r"\.mlp\."))
    with pytest.raises(ValueError):
        select_targets(handle, ["nothing_like_this"])


# -- quantization --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,sym", [(8, None, False), (4, 64, False), (3, 16, False), (2, 8, False),
                                            (4, 32, True), (8, None, True), (5, 32, True)])
def test_rtn_error_within_half_step(bits, group, sym):
    torch.manual_seed(1)
    w = torch.randn(24, 100) * torch.linspace(0.1, 3, 100)  # width not a multiple of the group
    w[0, :10] = 5.0
    deq, scale = rtn_quantize(w, bits, group, symmetric=sym)
    g = 100 if group is None else group
    per_col = scale.repeat_interleave(g, dim=1)[:, :100]
    assert deq.shape == w.shape
    assert ((deq - w).abs() <= per_col / 2 * (1 + 1e-5) + 1e-7).all()
    levels = 2 ** bits
    for r in range(3):  # at most 2^bits distinct values per group
        for c0 in range(0, 100, g):
            assert deq[r, c0:c0 + g].unique().numel() <= levels


def test_rtn_apply_and_report(handle):
    snap = _snapshot(handle)
    new, rep = apply(handle, "rtn:4:32")
    _assert_same(handle, snap)
    t = select_targets(handle)[0]
    w0, w1 = dense_weight(handle.model.get_submodule(t.name)), dense_weight(new.model.get_submodule(t.name))
    deq, scale = rtn_quantize(w0, 4, 32)
    assert torch.equal(w1, deq)
    assert rep.bits_per_weight == pytest.approx(4 + (32 + 4) / 32)
    assert rep.original_bits_per_weight == 32
    assert rep.memory_bytes < rep.original_memory_bytes
    assert rep.compressed_bytes == pytest.approx(rep.n_weights * rep.bits_per_weight / 8, abs=1)


def test_hqq_quantizes_and_leaves_original(handle):
    if REGISTRY["hqq"].unavailable_reason:
        with pytest.raises(RuntimeError, match="hqq"):
            apply(handle, "hqq:4:64")
        return
    snap = _snapshot(handle)
    new, rep = apply(handle, "hqq:4:64", modules=["mlp.up_proj", "o_proj"])
    _assert_same(handle, snap)
    assert rep.n_modules == 6 and not rep.saveable
    assert 4 < rep.bits_per_weight <= 4 + 2 * 32 / 64
    t = select_targets(handle, ["o_proj"])[0]
    w0 = dense_weight(handle.model.get_submodule(t.name))
    w1 = dense_weight(new.model.get_submodule(t.name))
    step = (w0.reshape(-1, 64).amax(1) - w0.reshape(-1, 64).amin(1)) / 15
    assert ((w1 - w0).reshape(-1, 64).abs().amax(1) <= step * 1.01 + 1e-6).all()  # HQQ may move zero/scale
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        a, b = handle.model(ids).logits, new.model(ids).logits
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95
    full, _ = apply(handle, "hqq:8")
    assert type(full.writers(1)["mlp"]).__name__ == "HQQLinear"


# -- pruning -------------------------------------------------------------------------------------

def _zeros_per_row(w):
    return (w == 0).sum(1)


@pytest.mark.parametrize("spec", ["magnitude:0.5", "magnitude:0.3", "wanda:0.37", "sparsegpt:0.37", "wanda:0",
                                  "sparsegpt:0.9"])
def test_unstructured_sparsity_matches_request(handle, calib, spec):
    snap = _snapshot(handle)
    new, rep = apply(handle, spec, calib)
    _assert_same(handle, snap)
    s = parse_scheme(spec).sparsity
    for t in select_targets(handle):
        w = dense_weight(new.model.get_submodule(t.name))
        achieved = float((w == 0).float().mean())
        assert abs(achieved - s) <= 1 / t.in_features + 1e-9, (t.name, achieved)
        if not spec.startswith("magnitude"):  # per-row methods: every row within one element
            assert (_zeros_per_row(w) - s * t.in_features).abs().max() <= 1
        assert rep.module_sparsity[t.name] == pytest.approx(achieved)
    assert rep.sparsity == pytest.approx(s, abs=1 / 64)
    assert len(rep.layer_sparsity) == handle.n_layers
    assert all(x == pytest.approx(s, abs=1 / 64) for x in rep.layer_sparsity)
    assert rep.bits_per_weight == 32 and rep.memory_bytes == rep.original_memory_bytes
    assert (rep.calibration is not None) == parse_scheme(spec).needs_calibration


@pytest.mark.parametrize("spec", ["magnitude:4:8", "wanda:2:4", "sparsegpt:1:4"])
def test_nm_pattern_holds_in_every_group(handle, calib, spec):
    snap = _snapshot(handle)
    new, rep = apply(handle, spec, calib)
    _assert_same(handle, snap)
    s = parse_scheme(spec)
    for t in select_targets(handle):
        w = dense_weight(new.model.get_submodule(t.name))
        nonzero = (w != 0).reshape(w.shape[0], -1, s.m).sum(-1)
        assert (nonzero <= s.n).all()
        assert (nonzero == s.n).float().mean() > 0.99  # exact zeros only by coincidence
    assert rep.sparsity == pytest.approx(1 - s.n / s.m, abs=1e-3)
    idx = math.ceil(math.log2(s.m))
    assert rep.bits_per_weight == pytest.approx(s.n / s.m * (32 + idx))


def test_nm_mask_function():
    scores = torch.tensor([[4., 1., 3., 2., 0., 9., 8., 7.]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]
    with pytest.raises(ValueError):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_wanda_differs_from_magnitude_with_skewed_inputs():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    norms = torch.ones(64)
    norms[:8] = 50.0  # a few loud input channels
    norms[8:16] = 0.01
    mag = magnitude_prune(w, 0.5)
    wan = wanda_prune(w, norms, 0.5)
    assert not torch.equal(mag == 0, wan == 0)
    assert (wan[:, :8] != 0).float().mean() > 0.95  # loud channels survive
    assert (wan[:, 8:16] == 0).all()  # near-silent channels go first
    assert torch.equal(wanda_prune(w, torch.ones(64), 0.5) == 0, (w.abs() <= w.abs().median(1, True).values))


def test_sparsegpt_reconstructs_better_than_magnitude():
    torch.manual_seed(0)
    x = torch.randn(2048, 64) @ torch.randn(64, 64) * 0.3 + torch.randn(2048, 64)  # correlated inputs
    x[:, 5] = 0.0  # a dead input
    w = torch.randn(48, 64)
    hessian = 2 * x.T @ x / x.shape[0]
    for sparsity, nm in ((0.5, None), (None, (2, 4)), (0.8, None)):
        kw = dict(sparsity=sparsity) if nm is None else dict(n=nm[0], m=nm[1])
        sg = sparsegpt_prune(w, hessian, **kw)
        mg = magnitude_prune(w, **kw)
        err_sg = float(((x @ (w - sg).T) ** 2).mean())
        err_mg = float(((x @ (w - mg).T) ** 2).mean())
        assert err_sg <= err_mg, (kw, err_sg, err_mg)
        target = sparsity if nm is None else 0.5
        assert (_zeros_per_row(sg) - target * 64).abs().max() <= 1


def test_sparsegpt_model_error_not_worse_than_magnitude(handle, calib):
    """Reconstruction of each block's first projection on the calibration set."""
    sg, _ = apply(handle, "sparsegpt:0.5", calib)
    mg, _ = apply(handle, "magnitude:0.5", calib)
    with torch.no_grad():
        ref = handle.model(calib.input_ids).logits
        e_sg = float(((sg.model(calib.input_ids).logits - ref) ** 2).mean())
        e_mg = float(((mg.model(calib.input_ids).logits - ref) ** 2).mean())
    assert e_sg <= e_mg


def test_handle_identity_and_report_fields(handle, calib):
    new, rep = apply(handle, "wanda:0.5", calib, modules=["mlp.down_proj"])
    assert new.name == f"{handle.name} · wanda:0.5"
    assert new.spec == f"{handle.spec}+wanda:0.5"
    assert new.meta["parent_fingerprint"] == handle.fingerprint and new.meta["scheme"] == "wanda:0.5"
    assert new.fingerprint != handle.fingerprint and len(new.fingerprint) == 16
    again, _ = apply(handle, "wanda:0.5", calib, modules=["mlp.down_proj"])
    assert again.fingerprint == new.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), new.model.state_dict().values()))
    other, _ = apply(handle, "wanda:0.5", from_text(handle.tokenizer, n_samples=3, seq_len=32))
    assert other.fingerprint != new.fingerprint
    assert new.tokenizer is handle.tokenizer and new.chat_template == handle.chat_template
    assert new.format("hi") == handle.format("hi")
    assert new.model is not handle.model and new.source_dir is None
    d = rep.to_json()
    assert d["n_modules"] == handle.n_layers and rep.n_weights == handle.n_layers * 128 * 64
    assert all(v == pytest.approx(0.5) for v in rep.layer_sparsity)
    assert rep.seconds > 0 and rep.calibration["n_samples"] == 4 and rep.calibration["seq_len"] == 64
    assert rep.original_memory_bytes == sum(p.numel() * 4 for p in handle.model.parameters())
    assert "per-layer sparsity" in rep.table()
    # untouched modules stay bit-identical
    q = select_targets(handle, ["q_proj"])[0].name
    assert torch.equal(new.model.get_submodule(q).weight, handle.model.get_submodule(q).weight)


def test_prompt_calibration_and_gpt2(calib):
    h = tiny_handle("gpt2", n_layers=2, d_model=64, seed=1)
    snap = _snapshot(h)
    c = from_prompts(h, ["Write a poem about the sea.", "How do I bake bread?"] * 5, n_samples=3, seq_len=32)
    assert c.input_ids.shape == (3, 32)
    for spec in ("wanda:2:4", "sparsegpt:0.5", "rtn:4:32"):
        new, rep = apply(h, spec, c)
        assert rep.n_modules == 2 * 4  # c_attn, c_proj (attn), c_fc, c_proj (mlp)
        if spec != "rtn:4:32":
            assert rep.sparsity == pytest.approx(0.5, abs=1e-3)
    _assert_same(h, snap)


def test_compressing_a_compressed_handle(handle, calib):
    pruned, _ = apply(handle, "magnitude:0.5")
    both, rep = apply(pruned, "rtn:8")
    assert both.meta["parent_fingerprint"] == pruned.fingerprint
    assert rep.sparsity >= 0.5
    with pytest.raises(RuntimeError, match="source_dir"):
        apply(pruned, "bnb-nf4")


def test_calibration_windows(handle):
    c = from_text(handle.tokenizer, "one two three four five six seven eight nine ten " * 3, n_samples=5, seq_len=8)
    assert c.input_ids.shape == (5, 8) and len(c.sha) == 16
    assert isinstance(c, Calibration)
