"""distill: a LoRA repair trained against the original as teacher — KL goes down, compressed weights stay
as they were (zeros, quantized storage), seeded determinism, storage without pickle, clear errors."""

from dataclasses import replace

import pytest
import torch

from refusal_lab import distill_data as data_mod
from refusal_lab.compression import apply as compress
from refusal_lab.distill import (DistillConfig, DistillError, Distilled, compress_student, distill, distill_data,
                                 reply_kl)
from refusal_lab.progress import Cancelled
from refusal_lab.testing.tiny import fixed_logits, same_state, snapshot, tiny_handle

CFG = DistillConfig(modules="writers", layers=[1, 2], rank=4, steps=12, batch_size=8, lr=5e-3, warmup=2,
                    reply_tokens=6, per_kind=4, state_weight=0.0, direction_weight=0.0, offset=0.0, on_policy=0.0,
                    first_token_weight=1.0, oversample={}, answered_only=[],
                    kinds=["harmful", "harmless", "borderline", "tasks"])  # the KL alone, the first round's
#                   settings (the stream terms, the offset, the contrast pool, the weights: their own tests)


@pytest.fixture(scope="module")
def pair():
    """The original (teacher), its magnitude-pruned copy (student) and the teacher's replies."""
    o = tiny_handle("llama", n_layers=4, d_model=64)
    c, _ = compress(o, "magnitude:0.5")
    return o, c, distill_data(o, CFG)


@pytest.fixture(scope="module")
def trained(pair):
    o, c, data = pair
    state = snapshot(c)
    h, rep = distill(o, c, CFG, data=data)
    return h, rep, state


def test_training_lowers_the_kl_to_the_teacher(pair, trained):
    o, c, data = pair
    h, rep, _ = trained
    before, after = reply_kl(o, c, data), reply_kl(o, h, data)
    assert after < 0.7 * before, (before, after)
    assert len(rep.result.losses) == CFG.steps and rep.result.losses[-1] < rep.result.losses[0]
    assert rep.result.n_prompts == {"harmful": 4, "harmless": 4, "borderline": 4, "tasks": 4}
    assert rep.result.n_reply_tokens == data.n_reply_tokens > 0


def test_adapter_keeps_every_pruned_zero(pair, trained):
    o, c, _ = pair
    h, rep, c_state = trained
    assert same_state(c, c_state)  # the compressed model is bit-identical after training
    assert not torch.allclose(fixed_logits(h), fixed_logits(c), atol=1e-5)  # and the repair does something
    assert set(rep.result.targets) == {f"model.layers.{i}.{m}" for i in (1, 2) for m in ("self_attn.o_proj",
                                                                                        "mlp.down_proj")}
    for name in rep.result.targets:
        base = h.model.get_submodule(name).get_base_layer().weight
        assert torch.equal(base, c.model.get_submodule(name).weight)  # the same zeros, the same values
        assert float((base == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    mods = [c.model.get_submodule(n) for n in rep.result.targets]
    assert rep.result.trainable_parameters == sum(CFG.rank * (m.in_features + m.out_features) for m in mods)
    assert rep.result.density_after == rep.result.density_before and rep.result.densified_weights == 0


def test_merged_mode_folds_lora_in_and_pays_in_density(pair, trained):
    o, c, data = pair
    adapter_h, adapter_rep, c_state = trained
    h, rep = distill(o, c, replace(CFG, mode="merged"), data=data)
    assert same_state(c, c_state)
    assert torch.allclose(fixed_logits(h), fixed_logits(adapter_h), atol=1e-4)  # the same training, folded in
    assert rep.result.density_before.density == pytest.approx(0.5, abs=0.02)
    assert rep.result.density_after.density > 0.95 and rep.result.densified_weights > 0
    assert not any("lora" in n for n, _ in h.model.named_parameters())


def test_precomputed_states_give_the_same_training(pair, trained):
    o, c, data = pair
    _, rep, _ = trained  # trained with precomputed states: the teacher once, the student's block 0 once
    _, full = distill(o, c, CFG, data=data, precompute_states=False)
    assert full.result.losses == pytest.approx(rep.result.losses, rel=1e-3, abs=1e-6)
    assert all(torch.allclose(full.lora[k], rep.lora[k], atol=1e-4) for k in rep.lora)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])  # Conv1D writers; a final logit soft-cap in the head
def test_other_architectures(arch):
    o = tiny_handle(arch, n_layers=4, d_model=64)
    c, _ = compress(o, "magnitude:0.5")
    cfg = replace(CFG, modules="all", layers=[2, 3], steps=4, per_kind=2, reply_tokens=4)
    data = distill_data(o, cfg)
    h, rep = distill(o, c, cfg, data=data)
    _, full = distill(o, c, cfg, data=data, precompute_states=False)
    assert full.result.losses == pytest.approx(rep.result.losses, rel=1e-3, abs=1e-6)
    assert reply_kl(o, h, data) < reply_kl(o, c, data)


def test_seeded_runs_are_identical(pair, trained):
    o, c, data = pair
    _, rep, _ = trained
    _, again = distill(o, c, CFG, data=data)
    assert again.lora.keys() == rep.lora.keys()
    assert all(torch.equal(again.lora[k], rep.lora[k]) for k in rep.lora)
    assert again.result.losses == rep.result.losses
    _, other = distill(o, c, replace(CFG, seed=1), data=data)
    assert any(not torch.equal(other.lora[k], rep.lora[k]) for k in rep.lora)


def test_saved_as_safetensors_and_reapplied(pair, trained, tmp_path):
    o, c, _ = pair
    h, rep, _ = trained
    rep.save(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["distill_adapter.json",
                                                                  "distill_adapter.safetensors"]
    back = Distilled.load(tmp_path / "d")
    assert back.result == rep.result and back.key() == rep.key()
    assert torch.allclose(fixed_logits(back.apply(c)), fixed_logits(h), atol=1e-6)


def test_only_bundled_train_prompts(monkeypatch):
    asked = []
    real = data_mod.bundled
    monkeypatch.setattr(data_mod, "bundled", lambda kind, split=None: asked.append(split) or real(kind, split))
    prompts = data_mod.training_prompts()
    assert set(asked) == {"train"} and {k for k, _ in prompts} == {"harmful", "harmless", "borderline", "tasks",
                                                                   "contrast"}


@pytest.mark.parametrize("scheme,precision", [("hqq:4:64", "float32"), ("bnb-nf4", "float32"),
                                              ("hqq:4:64", "bfloat16"), ("bnb-nf4", "bfloat16")])
def test_quantized_base_stays_quantized(scheme, precision, tmp_path):
    """Also under bf16 autocast (the default model's precision here): the backward through the quantized
    layers must meet their own dtypes."""
    from refusal_lab.models import load_model

    o = tiny_handle("llama", n_layers=2, d_model=64)
    o.model.save_pretrained(tmp_path / "m")
    o.tokenizer.save_pretrained(tmp_path / "m")
    o = load_model(str(tmp_path / "m"), device="cpu", precision=precision)
    try:
        c, _ = compress(o, scheme)
    except RuntimeError as e:  # the scheme cannot run on this machine: it says so
        pytest.skip(str(e))
    kind = type(c.writers(0)["mlp"]).__name__
    state = snapshot(c)
    cfg = replace(CFG, layers=[0, 1], steps=6, per_kind=2)
    data = distill_data(o, cfg)
    h, rep = distill(o, c, cfg, data=data)
    assert same_state(c, state)
    for name in rep.result.targets:
        wrapped = h.model.get_submodule(name)
        assert type(wrapped.get_base_layer()).__name__ == kind  # still quantized storage, LoRA beside it
        assert wrapped.get_base_layer() is not c.model.get_submodule(name)
    assert reply_kl(o, h, data) < reply_kl(o, c, data)
    with pytest.raises(DistillError, match="adapter"):
        distill(o, c, replace(cfg, mode="merged"), data=data)


def test_bad_input_is_a_clear_error(pair):
    o, c, data = pair
    with pytest.raises(DistillError, match="rank 65 is larger"):
        distill(o, c, replace(CFG, rank=65), data=data)
    with pytest.raises(DistillError, match="no training prompts left"):
        distill(o, c, replace(CFG, max_prompt_tokens=1))
    with pytest.raises(DistillError, match="cannot take the compression scheme 'magnitude:3:7'"):
        compress_student(o, "magnitude:3:7")  # 64 inputs are not a multiple of 7
    with pytest.raises(DistillError, match="cannot take the compression scheme 'bnb-nf4'"):
        compress_student(o, "bnb-nf4")  # an in-memory model has no folder to reload quantized
    with pytest.raises(DistillError, match="cannot take the compression scheme"):
        compress_student(o, "zip:9")
    with pytest.raises(DistillError, match="source layer"):
        distill(o, c, replace(CFG, layers=None), data=data)
    with pytest.raises(DistillError, match="another reply length"):
        distill(o, c, replace(CFG, reply_tokens=7), data=data)


@pytest.mark.parametrize("bar", ["progress", "states_progress", "own_progress"])  # cancelled in training, in the
def test_cancelled_training_changes_nothing(pair, bar):  # teacher passes, in the student's own replies (on-policy)
    o, c, data = pair
    state = snapshot(c)

    def cancel(done, total):
        if done >= 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        distill(o, c, replace(CFG, on_policy=0.5), data=data, **{bar: cancel})
    assert same_state(c, state)


def test_oversampling_and_first_token_weight():
    from refusal_lab.distill_data import batches, token_kl, token_weights

    # a kind oversampled k times appears k times per epoch; the default order is unchanged
    plain = batches(6, 4, 3, seed=1)
    assert batches(6, 4, 3, seed=1, repeats=[1] * 6) == plain
    epoch = [i for b in batches(6, 4, 3, seed=1, repeats=[1, 1, 1, 1, 3, 1]) for i in b]  # 8 rows a epoch, 12 drawn
    assert sorted(epoch[:8]) == [0, 1, 2, 3, 4, 4, 4, 5]
    # the weighted loss: first token × w, the others × 1, padding × 0
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w = token_weights(mask, 4.0)
    assert w.tolist() == [[4.0, 1.0, 0.0], [4.0, 0.0, 0.0]]
    torch.manual_seed(0)
    t, s = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    per = [float(token_kl(t[i:i + 1, j:j + 1], s[i:i + 1, j:j + 1], torch.ones(1, 1, dtype=torch.bool)))
           for i, j in ((0, 0), (0, 1), (1, 0))]
    assert float(token_kl(t, s, mask, w)) == pytest.approx(4 * per[0] + per[1] + 4 * per[2], rel=1e-5)
    assert float(token_kl(t, s, mask)) == pytest.approx(sum(per), rel=1e-5)


def test_oversampling_and_first_token_weight_train_and_are_checked(pair):
    o, c, data = pair
    cfg = replace(CFG, steps=4, first_token_weight=3.0, oversample={"borderline": 2})
    h, rep = distill(o, c, cfg, data=data)
    assert rep.result.config.oversample == {"borderline": 2} and len(rep.result.losses) == 4
    assert cfg.key_json()["first_token_weight"] == 3.0 and "oversample" not in CFG.key_json()  # old keys kept
    with pytest.raises(DistillError, match="first_token_weight must be > 0"):
        distill(o, c, replace(CFG, first_token_weight=0.0), data=data)
    with pytest.raises(DistillError, match="oversample maps a prompt kind"):
        distill(o, c, replace(CFG, oversample={"jokes": 2}), data=data)


def test_contrast_prompts_are_train_only_and_unlike_every_val_and_test_prompt():
    """The contrast pool (benign prompts with alarming words) is used for training only, is asked for by
    name, and shares no prompt — nor a near copy — with any bundled val or test split."""
    import re

    from refusal_lab.prompts import BUNDLED_KINDS, bundled

    assert "contrast" not in {k for k, _ in data_mod.training_prompts(["harmful", "tasks"])}  # asked for by name
    contrast = [p for k, p in data_mod.training_prompts(["contrast"]) if k == "contrast"]
    assert len(contrast) >= 150 and data_mod.training_prompts(["contrast"], split="val") == []
    words = lambda p: set(re.findall(r"[a-z]+", p.lower()))  # noqa: E731
    held_out = [p for kind in BUNDLED_KINDS for split in ("val", "test") for p in bundled(kind, split).prompts]
    for p in contrast:
        assert p not in held_out
        near = [q for q in held_out if len(words(p) & words(q)) / len(words(p) | words(q)) > 0.6]
        assert not near, (p, near)


def test_answered_only_drops_the_teachers_refusals_of_those_kinds_only():
    data = data_mod.TeacherReplies(teacher="t", tokens=3, kinds=["contrast", "contrast", "harmful", "tasks"],
                                   prompts=["a", "b", "c", "d"], prompt_ids=[[1], [2], [3], [4]],
                                   reply_ids=[[10], [11], [10], [11]])
    decode = {10: "I'm sorry, but I can't help with that.", 11: "Sure, here is how."}
    kept = data.answered_only(["contrast"], lambda ids: decode[ids[0]])
    assert kept.prompts == ["b", "c", "d"] and kept.kinds == ["contrast", "harmful", "tasks"]
    assert kept.reply_ids == [[11], [10], [11]] and kept.key() != data.key()
    with pytest.raises(DistillError, match="answered_only"):
        DistillConfig(answered_only=["nonsense"]).check()
    assert "answered_only" not in DistillConfig(answered_only=[]).key_json()  # repairs stored before it keep their keys


def test_a_config_stored_before_a_setting_existed_decodes_with_that_settings_value_of_then():
    """Defaults move (chosen by later benchmark rounds); a stored repair's settings must not move with them."""
    from refusal_lab.distill import ADDED_SETTINGS, DistillResult

    first_round = {"mode": "adapter", "modules": "all", "layers": None, "window": 2, "rank": 4, "lora_alpha": 8,
                   "steps": 50, "batch_size": 16, "lr": 0.002, "warmup": 10, "reply_tokens": 32,
                   "kinds": ["harmful", "harmless", "borderline", "tasks"], "per_kind": None,
                   "max_prompt_tokens": 256, "seed": 0}
    cfg = DistillConfig.from_json(first_round)
    assert {name: getattr(cfg, name) for name, _ in ADDED_SETTINGS} == dict(ADDED_SETTINGS)
    assert cfg.key_json() == first_round and DistillConfig().offset != 0.0 and DistillConfig().state_weight != 0.0
    assert DistillConfig().on_policy != 0.0 and cfg.on_policy == 0.0
    res = DistillResult.from_json({"config": first_round, "layers": [0], "targets": ["x"], "trainable_parameters": 1})
    assert res.config == cfg
    assert DistillConfig.from_json(DistillConfig().to_json()) == DistillConfig()  # today's settings round-trip


def _state_distance(o, h, data, layer: int, direction: torch.Tensor | None = None) -> float:
    """state_distance of h's and o's residual streams leaving ``layer`` at the post-instruction positions
    (direction_distance along ``direction`` when given)."""
    from refusal_lab.activations import post_instruction_length
    from refusal_lab.distill_data import (direction_distance, last_positions, reading, reply_batch, reply_logits,
                                          state_distance)

    batch = reply_batch(data, list(range(len(data))), o.tokenizer.pad_token_id or 0)
    last = last_positions(batch, post_instruction_length(o))
    out = []
    for handle in (o, h):
        seen: list = []
        with torch.no_grad(), reading(handle.blocks[layer], "output", seen):
            reply_logits(handle.model, batch)
        out.append(seen[0][:, last].float())
    if direction is not None:
        return float(direction_distance(out[1], out[0], direction))
    return float(state_distance(out[1], out[0]))


def test_state_term_moves_the_residual_stream_toward_the_teachers(pair, trained):
    o, c, data = pair
    plain, _, _ = trained
    cfg = replace(CFG, state_weight=20.0, state_layer=2)
    h, rep = distill(o, c, cfg, data=data)
    before, kl_only, with_term = (_state_distance(o, m, data, 2) for m in (c, plain, h))
    assert with_term < 0.7 * kl_only and with_term < before, (before, kl_only, with_term)
    assert reply_kl(o, h, data) < reply_kl(o, c, data)
    _, full = distill(o, c, cfg, data=data, precompute_states=False)  # the teacher's states read on the fly
    assert full.result.losses == pytest.approx(rep.result.losses, rel=1e-3, abs=1e-6)
    assert cfg.key_json()["state_weight"] == 20.0 and "state_weight" not in CFG.key_json()  # old keys kept
    with pytest.raises(DistillError, match="state layer 0 must be in"):
        distill(o, c, replace(cfg, state_layer=0), data=data)  # below the lowest adapted block (1)
    with pytest.raises(DistillError, match="state_weight must be a finite number ≥ 0"):
        distill(o, c, replace(cfg, state_weight=-1.0), data=data)
    with pytest.raises(DistillError, match="need a state_layer or the source layer"):
        distill(o, c, replace(cfg, state_layer=None), data=data)


def test_direction_term_moves_the_projection_toward_the_teachers(pair, trained):
    """The refusal-direction term: the student's projection on the direction gets closer to the teacher's
    than the KL alone brings it; it needs the direction; old cache keys stay."""
    o, c, data = pair
    plain, _, _ = trained
    r = torch.randn(o.d_model, generator=torch.Generator().manual_seed(3))
    cfg = replace(CFG, direction_weight=50.0, state_layer=2)
    h, rep = distill(o, c, cfg, data=data, direction=r)
    before, kl_only, with_term = (_state_distance(o, m, data, 2, r) for m in (c, plain, h))
    assert with_term < 0.5 * kl_only and with_term < before, (before, kl_only, with_term)
    assert reply_kl(o, h, data) < reply_kl(o, c, data)
    assert cfg.needs_direction() and not CFG.needs_direction() and "direction_weight" not in CFG.key_json()
    with pytest.raises(DistillError, match="the original's refusal direction"):
        distill(o, c, cfg, data=data)
    with pytest.raises(DistillError, match="direction_weight must be a finite number ≥ 0"):
        distill(o, c, replace(cfg, direction_weight=-1.0), data=data, direction=r)


def test_offset_shifts_the_stream_leaving_its_block_against_the_raw_direction(pair, tmp_path):
    """``offset``: the repaired model is the trained one with ``−offset × r`` added to the output of the state
    block (the same as that activation addition), training itself unchanged; stored with the adapter and
    re-applied; the compressed model carries no hook; old cache keys stay; bad values are clear errors."""
    from refusal_lab.interventions import add, count_hooks

    o, c, data = pair
    r = torch.randn(o.d_model, generator=torch.Generator().manual_seed(5))
    cfg = replace(CFG, steps=3, offset=0.5, state_layer=2)
    h, rep = distill(o, c, cfg, data=data, direction=r)
    plain, rep0 = distill(o, c, replace(cfg, offset=0.0), data=data, direction=r)
    assert rep.lora.keys() == rep0.lora.keys() and all(torch.equal(rep.lora[k], rep0.lora[k]) for k in rep.lora)
    assert rep0.shift is None and torch.equal(rep.shift, -0.5 * r) and rep.key() != rep0.key()
    with add(plain, r, 3, coeff=-0.5):  # block 3's input is block 2's output
        shifted = fixed_logits(plain)
    assert torch.allclose(fixed_logits(h), shifted, atol=1e-5)
    assert not torch.allclose(fixed_logits(h), fixed_logits(plain), atol=1e-3)
    assert count_hooks(c) == 0 and count_hooks(plain) == 0
    rep.save(tmp_path / "d")
    back = Distilled.load(tmp_path / "d")
    assert torch.equal(back.shift, rep.shift) and back.key() == rep.key() and back.lora.keys() == rep.lora.keys()
    assert torch.allclose(fixed_logits(back.apply(c)), fixed_logits(h), atol=1e-6)
    assert "offset" not in CFG.key_json() and cfg.key_json()["offset"] == 0.5 and cfg.needs_direction()
    with pytest.raises(DistillError, match="offset must be a finite number ≥ 0"):
        distill(o, c, replace(cfg, offset=-1.0), data=data, direction=r)
    with pytest.raises(DistillError, match="the original's refusal direction"):
        distill(o, c, cfg, data=data)
    with pytest.raises(DistillError, match="offset shifts the output"):
        distill(o, c, replace(cfg, state_layer=None), data=data, direction=r)
    retuned = rep0.with_offset(0.5, r)  # the same repair as training with the offset, without training
    assert retuned.key() == rep.key() and retuned.result.config == cfg
    assert torch.allclose(fixed_logits(retuned.apply(c)), fixed_logits(h), atol=1e-6)
    assert rep.with_offset(0.0, r).shift is None and rep.with_offset(0.0, r).key() == rep0.key()
    with pytest.raises(DistillError, match="offset must be a finite number ≥ 0"):
        rep0.with_offset(float("nan"), r)


def test_a_packed_4bit_student_trains_with_gradients_through_its_quantized_layers(tmp_path, monkeypatch):
    """bitsandbytes' packed CPU 4-bit kernel has no autograd: once the student has run (an evaluation packs
    it), training must not go through it — the LoRA copy's 4-bit layers take the dequantized matmul."""
    import bitsandbytes.functional as bnb_functional

    from refusal_lab import precision
    from refusal_lab.models import load_model

    o = tiny_handle("llama", n_layers=2, d_model=64)
    o.model.save_pretrained(tmp_path / "m")
    o.tokenizer.save_pretrained(tmp_path / "m")
    o = load_model(str(tmp_path / "m"), device="cpu", precision="float32")
    try:
        c, _ = compress(o, "bnb-nf4")
    except RuntimeError as e:
        pytest.skip(str(e))
    with torch.no_grad(), precision.compute(c):
        c.model(input_ids=torch.tensor([[1, 5, 9, 12]]))  # as an evaluation does: packs where the CPU can
    if not any(precision._packed_4bit(m) for m in c.model.modules()):
        pytest.skip("this CPU runs bitsandbytes' 4-bit layers without the repacked kernel")
    kernel = bnb_functional.gemv_4bit

    def no_graph(A, *args, **kw):
        assert not (torch.is_grad_enabled() and A.requires_grad), "a graph went through the packed kernel"
        return kernel(A, *args, **kw)

    monkeypatch.setattr(bnb_functional, "gemv_4bit", no_graph)
    cfg = replace(CFG, layers=[0, 1], steps=3, per_kind=2)
    h, rep = distill(o, c, cfg, data=distill_data(o, cfg))
    assert len(rep.result.losses) == 3


def test_own_replies_are_the_models_greedy_replies_to_the_same_prompts(pair):
    from refusal_lab.distill_data import greedy_replies
    from refusal_lab.distill_training import own_replies

    o, c, data = pair
    own = own_replies(c, c.model, data)
    assert own.prompt_ids == data.prompt_ids and own.kinds == data.kinds and own.tokens == data.tokens
    assert own.reply_ids == greedy_replies(c, data.prompt_ids, data.tokens)
    assert own.reply_ids != data.reply_ids  # the pruned student's, not the teacher's


def test_on_policy_steps_train_on_the_students_replies_made_mid_training(pair, monkeypatch):
    from refusal_lab import distill_training

    o, c, data = pair
    real, calls = distill_training.own_replies, []

    def spy(student, model, d, progress=None):
        trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        calls.append(any(bool(p.detach().abs().sum()) for p in trained_b))  # LoRA already trained then
        return real(student, model, d, progress)

    monkeypatch.setattr(distill_training, "own_replies", spy)
    cfg = replace(CFG, steps=6, on_policy=0.5)
    ticks: list = []
    h, rep = distill(o, c, cfg, data=data, own_progress=lambda done, total: ticks.append((done, total)))
    assert calls == [True] and len(rep.result.losses) == 6
    assert ticks and ticks[-1][0] == ticks[-1][1] > 0  # the student's replies are reported
    _, plain = distill(o, c, replace(CFG, steps=6), data=data)
    assert rep.result.losses[:3] == plain.result.losses[:3] and rep.result.losses[3:] != plain.result.losses[3:]
    assert "on_policy" not in CFG.key_json() and cfg.key_json()["on_policy"] == 0.5  # old keys kept
    with pytest.raises(DistillError, match="on_policy is a share"):
        distill(o, c, replace(CFG, on_policy=1.0), data=data)
