"""AIRD: maths, merged vs adapter equivalence, safety of O and C, calibration data hygiene."""

import pytest
import torch

from core import aird
from core.aird import Repair, applied, merge, method_applied, rank1_edit
from core.compression import apply as compress
from core.models import weight_as_out_in
from tiny import tiny_handle

IDS = torch.tensor([[5, 17, 33, 60, 81, 9, 120]])


def _logits(h):
    with torch.no_grad():
        return h.model(IDS.to(h.device)).logits.float()


def _state(h):
    return {k: v.detach().clone() for k, v in h.model.state_dict().items()}


def _same_state(h, state):
    now = h.model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_rank1_edit_scales_only_the_direction():
    torch.manual_seed(0)
    w = torch.randn(16, 8)
    r = torch.nn.functional.normalize(torch.randn(16), dim=0)
    w2 = rank1_edit(w, r, 2.0)
    x = torch.randn(8)
    y, y2 = w @ x, w2 @ x
    assert torch.allclose(r @ y2, 3.0 * (r @ y), atol=1e-5)  # (1+α)× along r̂
    perp = y - (r @ y) * r
    assert torch.allclose(y2 - (r @ y2) * r, perp, atol=1e-5)  # unchanged elsewhere
    assert torch.equal(rank1_edit(w, r, 0.0), w)
    assert torch.linalg.matrix_rank(rank1_edit(w.double(), r.double(), 2.0) - w.double()) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merged_and_adapter_give_same_logits_on_pruned_model(arch):
    o = tiny_handle(arch, n_layers=4, d_model=64)
    c, _ = compress(o, "magnitude:0.5")
    o_state, c_state = _state(o), _state(c)
    r = torch.randn(64)
    rep = Repair(r, layers=[1, 2], alpha=3.0, mode="merged")
    with applied(c, rep) as merged:
        lm = _logits(merged)
        # merging densifies the repaired writers: the sparsity cost
        w = weight_as_out_in(merged.writers(1)["mlp"])
        assert (w == 0).float().mean() < 0.05
    with applied(c, Repair(r, layers=[1, 2], alpha=3.0, mode="adapter")) as adapted:
        assert adapted is c
        la = _logits(adapted)
    assert torch.allclose(lm, la, atol=1e-4), (lm - la).abs().max()
    assert not torch.allclose(la, _logits(c), atol=1e-4)  # it does something
    assert _same_state(o, o_state) and _same_state(c, c_state)  # O and C unchanged afterwards
    assert aird.densified_weights(c, [1, 2]) > 0


def test_alpha_zero_is_identity():
    o = tiny_handle("llama")
    c, _ = compress(o, "rtn:4:16")
    base = _logits(c)
    for mode in ("merged", "adapter"):
        with applied(c, Repair(torch.randn(64), layers=[0, 1, 2, 3], alpha=0.0, mode=mode)) as h:
            assert torch.allclose(_logits(h), base, atol=1e-6)


def test_adapter_works_on_bitsandbytes_nf4(tmp_path):
    from core.models import load_model

    o = tiny_handle("llama", n_layers=2, d_model=64)
    o.model.save_pretrained(tmp_path / "m")
    o.tokenizer.save_pretrained(tmp_path / "m")
    o = load_model(str(tmp_path / "m"), device="cpu")
    try:
        c, _ = compress(o, "bnb-nf4")
    except RuntimeError as e:  # bitsandbytes cannot run on this device: the scheme says so clearly
        pytest.skip(str(e))
    before = _logits(c)
    with pytest.raises(aird.AIRDError, match="adapter"):
        merge(c, Repair(torch.randn(64), layers=[0], alpha=2.0))
    with applied(c, Repair(torch.randn(64), layers=[0, 1], alpha=2.0, mode="adapter")) as h:
        changed = _logits(h)
    assert not torch.allclose(changed, before, atol=1e-4)
    assert torch.allclose(_logits(c), before)  # hooks gone


def test_alternative_methods_leave_o_and_c_untouched():
    o = tiny_handle("llama")
    c, _ = compress(o, "magnitude:0.5")
    o_state, c_state = _state(o), _state(c)
    rep = Repair(torch.randn(64), layers=[2], alpha=1.0, source_layer=2)
    outs = {}
    for method in aird.METHODS:
        with method_applied(method, o, c, rep, direction_raw=torch.randn(64)) as h:
            outs[method] = _logits(h)
    assert _same_state(o, o_state) and _same_state(c, c_state)
    assert torch.allclose(outs["none"], _logits(c))
    assert torch.allclose(outs["aird-merged"], outs["aird-adapter"], atol=1e-4)
    # dense copy of every layer gives back the original model
    with method_applied("dense-copy", o, c, Repair(torch.randn(64), layers=[0, 1, 2, 3], alpha=1.0)) as h:
        assert torch.allclose(_logits(h), _logits(o), atol=1e-5)


def test_calibration_reads_only_validation_prompts(monkeypatch):
    from core.prompts import bundled

    test_prompts = {p for k in ("harmful", "harmless", "borderline") for p in bundled(k, "test").prompts}
    seen: list[str] = []
    real_generate, real_logits = aird.generate, aird.last_logits

    def spy_generate(h, prompts, **kw):
        seen.extend(prompts)
        return real_generate(h, prompts, **kw)

    def spy_logits(h, prompts, **kw):
        seen.extend(prompts)
        return real_logits(h, prompts, **kw)

    monkeypatch.setattr(aird, "generate", spy_generate)
    monkeypatch.setattr(aird, "last_logits", spy_logits)
    sets = aird.CalibrationSets.bundled()
    sets = aird.CalibrationSets(sets.harmful[:6], sets.harmless[:6])
    c = tiny_handle("llama", n_layers=4)
    rep = aird.calibrate(c, torch.randn(64), 2, sets=sets, alphas=(1.0, 4.0), gen_tokens=3)
    assert seen and not (set(seen) & test_prompts)
    assert set(seen) <= set(aird.CalibrationSets.bundled().harmful) | set(aird.CalibrationSets.bundled().harmless)
    assert rep.auto and rep.calibration[0]["alpha"] == 0.0 and sum(g["chosen"] for g in rep.calibration) == 1
    assert rep.alpha in (0.0, 1.0, 4.0)


def test_repair_save_load_roundtrip(tmp_path):
    rep = Repair(torch.randn(64), layers=[3, 2], alpha=2.5, mode="adapter", source_layer=3)
    back = Repair.load(rep.save(tmp_path / "a"))
    assert back.layers == [2, 3] and back.alpha == 2.5 and back.mode == "adapter"
    assert torch.allclose(back.direction, rep.direction)
    assert abs(float(back.direction.norm()) - 1) < 1e-6


def test_recoverability_verdicts():
    torch.manual_seed(0)
    o = {"harmful": torch.randn(50, 5) + 4, "harmless": torch.randn(50, 5)}
    kept = {"harmful": torch.randn(50, 5) + 3.5, "harmless": torch.randn(50, 5)}
    gone = {"harmful": torch.randn(50, 5) + 0.2, "harmless": torch.randn(50, 5)}
    assert aird.recoverability(o, kept, 3)["level"] == "recoverable"
    v = aird.recoverability(o, gone, 3)
    assert v["level"] == "unrecoverable" and "Not recoverable" in v["verdict"]
    # still separated, but harmless prompts moved most of the way toward the harmful ones (over-refusal)
    shifted = {"harmful": torch.randn(50, 5) + 6.0, "harmless": torch.randn(50, 5) + 2.0}
    v = aird.recoverability(o, shifted, 3)
    assert v["level"] == "partial" and abs(v["harmless_shift"] - 0.5) < 0.15 and "over-refuses" in v["verdict"]
    assert aird.recoverability(o, kept, 3)["harmless_shift"] < 0.25
