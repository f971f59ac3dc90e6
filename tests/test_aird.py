"""AIRD: maths, merged vs adapter equivalence, safety of O and C, calibration data hygiene."""

from dataclasses import replace

import pytest
import torch

from refusal_lab import aird
from refusal_lab.aird import budget as aird_budget
from refusal_lab.aird import calibration as aird_calibration
from refusal_lab.aird import Repair, applied, merge, method_applied, rank1_edit
from refusal_lab.compression import apply as compress
from refusal_lab.generation import generate
from refusal_lab.models import weight_as_out_in
from refusal_lab.results import CalibrationPoint, Recoverability
from refusal_lab.testing.tiny import fixed_logits, same_state, snapshot, tiny_handle



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
    o_state, c_state = snapshot(o), snapshot(c)
    r = torch.randn(64)
    rep = Repair(r, layers=[1, 2], alpha=3.0, mode="merged")
    with applied(c, rep) as merged:
        lm = fixed_logits(merged)
        # merging densifies the repaired writers: the sparsity cost
        w = weight_as_out_in(merged.writers(1)["mlp"])
        assert (w == 0).float().mean() < 0.05
        # only the edited writers are copied: every other parameter is C's own (memory of a merge)
        edited = {id(p) for _, _, m in aird.edited_writers(c, rep) for p in m.parameters()}
        for (name, p_c), (_, p_m) in zip(c.model.named_parameters(), merged.model.named_parameters()):
            assert (p_m is p_c) == (id(p_c) not in edited), name
    with applied(c, Repair(r, layers=[1, 2], alpha=3.0, mode="adapter")) as adapted:
        assert adapted is c
        la = fixed_logits(adapted)
    assert torch.allclose(lm, la, atol=1e-4), (lm - la).abs().max()
    assert not torch.allclose(la, fixed_logits(c), atol=1e-4)  # it does something
    assert same_state(o, o_state) and same_state(c, c_state)  # O and C unchanged afterwards
    assert aird.densified_weights(c, [1, 2]) > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_realignment_merged_and_adapter_give_same_logits(arch):
    o = tiny_handle(arch, n_layers=4, d_model=64)
    c, _ = compress(o, "magnitude:0.5")
    o_state, c_state = snapshot(o), snapshot(c)
    torch.manual_seed(3)
    r = torch.randn(64)
    d_in = weight_as_out_in(c.writers(1)["mlp"]).shape[1]
    u = 0.3 * torch.randn(d_in)
    out = {}
    for mode in ("merged", "adapter"):
        # the re-aligned writer (layer 1's MLP) is also scaled: W′ = (I + α r̂r̂ᵀ)(W + r̂uᵀ)
        with applied(c, Repair(r, layers=[1, 2], alpha=2.0, mode=mode, realign=u, realign_layer=1)) as h:
            out[mode] = fixed_logits(h)
    assert torch.allclose(out["merged"], out["adapter"], atol=1e-4), (out["merged"] - out["adapter"]).abs().max()
    with applied(c, Repair(r, layers=[1, 2], alpha=2.0, mode="adapter")) as h:
        assert not torch.allclose(fixed_logits(h), out["adapter"], atol=1e-4)  # the re-alignment does something
    for mode in ("merged", "adapter"):  # u = 0 and α = 0: the identity
        with applied(c, Repair(r, layers=[1], alpha=0.0, mode=mode, realign=torch.zeros(d_in), realign_layer=1)) as h:
            assert torch.allclose(fixed_logits(h), fixed_logits(c), atol=1e-6)
    assert same_state(o, o_state) and same_state(c, c_state)
    rep = Repair(r, layers=[2], alpha=1.0, realign=u, realign_layer=1)
    assert {(layer, role) for layer, role, _ in aird.edited_writers(c, rep)} == {(1, "mlp"), (2, "mlp"), (2, "attn")}
    assert aird.densified_weights(c, rep) > aird.densified_weights(c, [2])  # the fitted writer densifies too
    assert aird.changed_parameters("aird-adapter", c, rep) == 64 + 1 + d_in
    assert aird.changed_parameters("aird-adapter", c, Repair(r, layers=[2], alpha=0.0)) == 0  # α 0: changes nothing


def test_budget_curve_counts_the_realigned_writer(monkeypatch):
    o = tiny_handle("llama", n_layers=4, d_model=64)
    c, _ = compress(o, "magnitude:0.5")
    d_in = weight_as_out_in(c.writers(1)["mlp"]).shape[1]
    rep = Repair(torch.randn(64), layers=[2, 3], alpha=1.0, source_layer=3, realign=torch.randn(d_in), realign_layer=1)
    monkeypatch.setattr(aird_budget, "refusal_rate", lambda h, prompts, max_new_tokens, **kw: (0.5, []))
    rows = aird.budget_curve(c, rep, ["a"], max_layers=2)
    assert [r.layers for r in rows] == [[3], [2, 3]]
    # k = 1 repairs block 3 only, but a merged repair still densifies the re-aligned MLP writer of block 1
    assert rows[0].densified_weights == aird.densified_weights(c, Repair(rep.direction, [3], 1.0, realign=rep.realign,
                                                                            realign_layer=1))
    assert rows[0].densified_weights > aird.densified_weights(c, [3])


def test_ridge_is_least_squares_with_shrinkage():
    torch.manual_seed(0)
    x = torch.randn(200, 12, dtype=torch.float64)
    u_true = torch.randn(12, dtype=torch.float64)
    y = x @ u_true
    assert torch.allclose(aird.ridge(x, y, 0.0), u_true, atol=1e-8)
    assert aird.ridge(x, y, 1.0).norm() < aird.ridge(x, y, 0.01).norm() < u_true.norm() + 1e-9
    assert torch.allclose(aird.ridge(10 * x, 10 * y, 0.1), aird.ridge(x, y, 0.1), atol=1e-8)  # scale-free λ
    # fewer rows than features: the dual form gives the primal solution
    wide, yw = torch.randn(30, 80, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    c = 0.1 * float((wide * wide).sum()) / 80
    primal = torch.linalg.solve(wide.T @ wide + c * torch.eye(80, dtype=torch.float64), wide.T @ yw)
    assert torch.allclose(aird.ridge(wide, yw, 0.1), primal, atol=1e-9)


def test_fit_realignment_moves_c_projections_toward_o():
    from refusal_lab.activations import writer_inputs
    from refusal_lab.prompts import bundled

    o = tiny_handle("llama", n_layers=4, d_model=64)
    c, _ = compress(o, "magnitude:0.5")
    o_state, c_state = snapshot(o), snapshot(c)
    torch.manual_seed(0)
    r = torch.randn(64)
    prompts = bundled("harmful", "train").prompts[:12] + bundled("harmless", "train").prompts[:12]
    layer, u = aird.fit_realignment(o, c, r, 2, prompts, lam=1e-3)
    assert layer == 1 and u.shape == (weight_as_out_in(c.writers(1)["mlp"]).shape[1],)
    given = aird.fit_realignment(o, c, r, 2, prompts, lam=1e-3, original_proj=aird.original_projection(o, r, 2, prompts))
    assert given[0] == layer and torch.equal(given[1], u)  # O's side computed once serves every scheme
    assert same_state(o, o_state) and same_state(c, c_state)

    def gap(handle, rep=None):
        _, p_o = writer_inputs(o, prompts, o.writers(1)["mlp"], r, 2)
        with aird.realigned(handle, rep) if rep else applied(handle, Repair(r, [1], 0.0, "adapter")):
            _, p_c = writer_inputs(handle, prompts, handle.writers(1)["mlp"], r, 2)
        return float(((p_o - p_c) ** 2).mean())

    before, after = gap(c), gap(c, Repair(r, [], 0.0, "adapter", realign=u, realign_layer=1))
    assert after < 0.5 * before, (before, after)
    with pytest.raises(aird.AIRDError, match="source layer is 0"):
        aird.fit_realignment(o, c, r, 0, prompts)
    # the fit's data are the train splits: never a validation or test prompt
    fit = set(aird.bundled_fit_prompts())
    held_out = {p for k in ("harmful", "harmless", "borderline") for s in ("val", "test") for p in bundled(k, s).prompts}
    assert fit and not fit & held_out


def test_alpha_zero_is_identity():
    o = tiny_handle("llama")
    c, _ = compress(o, "rtn:4:16")
    base = fixed_logits(c)
    for mode in ("merged", "adapter"):
        with applied(c, Repair(torch.randn(64), layers=[0, 1, 2, 3], alpha=0.0, mode=mode)) as h:
            assert torch.allclose(fixed_logits(h), base, atol=1e-6)


def test_adapter_works_on_bitsandbytes_nf4(tmp_path):
    from refusal_lab.models import load_model

    o = tiny_handle("llama", n_layers=2, d_model=64)
    o.model.save_pretrained(tmp_path / "m")
    o.tokenizer.save_pretrained(tmp_path / "m")
    o = load_model(str(tmp_path / "m"), device="cpu")
    try:
        c, _ = compress(o, "bnb-nf4")
    except RuntimeError as e:  # bitsandbytes cannot run on this device: the scheme says so clearly
        pytest.skip(str(e))
    before = fixed_logits(c)
    with pytest.raises(aird.AIRDError, match="adapter"):
        merge(c, Repair(torch.randn(64), layers=[0], alpha=2.0))
    with applied(c, Repair(torch.randn(64), layers=[0, 1], alpha=2.0, mode="adapter")) as h:
        changed = fixed_logits(h)
    assert not torch.allclose(changed, before, atol=1e-4)
    d_in = c.writers(0)["mlp"].in_features
    with applied(c, Repair(torch.randn(64), layers=[1], alpha=0.0, mode="adapter", realign=torch.randn(d_in),
                           realign_layer=0)) as h:  # the fitted re-alignment as a hook on a 4-bit writer
        assert not torch.allclose(fixed_logits(h), before, atol=1e-4)
    assert torch.allclose(fixed_logits(c), before)  # hooks gone


def test_alternative_methods_leave_o_and_c_untouched():
    o = tiny_handle("llama")
    c, _ = compress(o, "magnitude:0.5")
    o_state, c_state = snapshot(o), snapshot(c)
    rep = Repair(torch.randn(64), layers=[2], alpha=1.0, source_layer=2)
    outs = {}
    for method in aird.METHODS:
        with method_applied(method, o, c, rep, direction_raw=torch.randn(64)) as h:
            outs[method] = fixed_logits(h)
    assert same_state(o, o_state) and same_state(c, c_state)
    assert torch.allclose(outs["none"], fixed_logits(c))
    assert torch.allclose(outs["aird-merged"], outs["aird-adapter"], atol=1e-4)
    # dense copy of every layer gives back the original model
    with method_applied("dense-copy", o, c, Repair(torch.randn(64), layers=[0, 1, 2, 3], alpha=1.0)) as h:
        assert torch.allclose(fixed_logits(h), fixed_logits(o), atol=1e-5)


def _calibrate(search: str, precision: str = "float32", **kw):
    sets = aird_calibration.CalibrationSets.bundled()
    sets = aird_calibration.CalibrationSets(sets.harmful[:6], sets.harmless[:6])
    c = tiny_handle("llama", n_layers=4)
    c.precision = precision
    o = tiny_handle("llama", n_layers=4, seed=1)
    d_in = weight_as_out_in(c.writers(1)["mlp"]).shape[1]
    torch.manual_seed(0)
    return aird_calibration.calibrate(c, torch.randn(64), 2, sets=sets, alphas=(1.0, 4.0), gen_tokens=3,
                                      realignment=(1, 0.1 * torch.randn(d_in)), original=o, search=search, **kw)


@pytest.mark.parametrize("search", aird_calibration.SEARCHES)
def test_calibration_reads_only_validation_prompts(monkeypatch, search):
    from refusal_lab.prompts import bundled

    test_prompts = {p for k in ("harmful", "harmless", "borderline") for p in bundled(k, "test").prompts}
    seen: list[str] = []
    for name in ("generate_with_logits", "last_logits", "tokenize"):  # every way calibration reads prompts
        def spy(h, prompts, _real=getattr(aird_calibration, name), **kw):
            seen.extend(prompts)
            return _real(h, prompts, **kw)

        monkeypatch.setattr(aird_calibration, name, spy)
    rep = _calibrate(search)
    bundled_val = aird_calibration.CalibrationSets.bundled()
    assert seen and not (set(seen) & test_prompts)
    assert set(seen) <= set(bundled_val.harmful) | set(bundled_val.harmless)
    assert rep.auto and rep.calibration[0].alpha == 0.0 and sum(g.chosen for g in rep.calibration) == 1
    assert rep.alpha in (0.0, 1.0, 4.0)
    # both branches were searched: without and with the re-alignment, against the same baseline
    assert {g.realign for g in rep.calibration} == {False, True}
    assert all(g.kl_original is not None for g in rep.calibration)
    # every generated point's feasibility is the over-refusal limit and the KL rule, against the
    # unrepaired baseline; the chosen point is a generated one
    base = rep.calibration[0]
    gen = [g for g in rep.calibration if g.measured == "generated"]
    assert base in gen and next(g for g in rep.calibration if g.chosen) in gen
    assert all(g.feasible == (g.harmless_refusal - base.harmless_refusal <= 0.02 + 1e-9
                                 and aird_calibration.kl_acceptable(g.kl, g.kl_original, base.kl_original,
                                                                    0.1))
               for g in gen)
    assert (rep.realign is not None) == next(g for g in rep.calibration if g.chosen).realign


def test_scored_calibration_generates_the_best_scored_points_and_chooses_among_them():
    scored, generated = _calibrate("scored", confirm=2), _calibrate("generated")
    ref = {(g.realign, tuple(g.layers), g.alpha): g for g in generated.calibration}
    gen = [g for g in scored.calibration if g.measured == "generated"]
    assert 1 <= len(gen) <= 3  # the unrepaired model + at most 2 confirmed points
    for g in gen:  # a confirmed point's numbers are those the generated search measures for it
        r = ref.get((g.realign, tuple(g.layers), g.alpha))
        if r is not None:
            assert (g.harmful_refusal, g.harmless_refusal, g.feasible) == \
                   (r.harmful_refusal, r.harmless_refusal, r.feasible)
            assert g.kl == pytest.approx(r.kl, rel=1e-5, abs=1e-7)
    # the confirmed points are the best scored feasible ones, and the choice is made among them
    scored_feasible = sorted((g for g in scored.calibration if g.scored_feasible and g.alpha + g.realign > 0),
                             key=lambda g: (round(g.scored_harmful_refusal - g.scored_harmless_refusal, 6),
                                            g.harmful_score, -g.realign, -len(g.layers), -g.alpha),
                             reverse=True)
    assert [g for g in gen if g.alpha + g.realign > 0] == [g for g in scored.calibration if
                                                                 any(g is x for x in scored_feasible[:2])]
    assert next(g for g in scored.calibration if g.chosen) is aird_calibration.choose(gen)
    assert all(not g.feasible for g in scored.calibration if g.measured == "scored")


def test_scored_calibration_on_a_bf16_model_confirms_in_float32(monkeypatch):
    """A bf16 model scores the grid in bf16 and generates (the unrepaired model and the confirmed points)
    in float32: those points' numbers are the float32 generated search's, and the model's precision is
    back to bf16 afterwards."""
    runs = []
    real_generate = aird_calibration.generate_with_logits

    def generate_at(h, *a, **kw):
        runs.append(("generate_with_logits", h.precision))
        return real_generate(h, *a, **kw)

    monkeypatch.setattr(aird_calibration, "generate_with_logits", generate_at)
    seen = {}
    real = aird_calibration._Measure._last_logits

    def scored_at(self, kind, start, keep):
        seen.setdefault("scored", set()).add(self.handle.precision)
        return real(self, kind, start, keep)

    monkeypatch.setattr(aird_calibration._Measure, "_last_logits", scored_at)
    rep = _calibrate("scored", precision="bfloat16", confirm=2)
    assert {p for n, p in runs if n == "generate_with_logits"} == {"float32"} and seen["scored"] == {"bfloat16"}
    reference = {(g.realign, tuple(g.layers), g.alpha): g for g in _calibrate("generated").calibration}
    gen = [g for g in rep.calibration if g.measured == "generated"]
    assert len(gen) >= 2 and gen[0].unrepaired
    for g in gen:
        r = reference[(g.realign, tuple(g.layers), g.alpha)]
        assert (g.harmful_refusal, g.harmless_refusal) == (r.harmful_refusal, r.harmless_refusal)
    c = tiny_handle("llama", n_layers=4)
    c.precision = "bfloat16"
    with pytest.raises(RuntimeError), aird_calibration.running_at(c, "float32"):
        assert c.precision == "float32"
        raise RuntimeError("the block fails")
    assert c.precision == "bfloat16"  # restored whatever happens


def test_scored_calibration_from_the_first_repaired_block_equals_full_passes(monkeypatch):
    """Scored passes start at the lowest block a trial touches (the blocks below are the unrepaired
    model's): the grid is the one full passes give, to the bit."""
    skipped = _calibrate("scored", confirm=2)
    starts = []
    real = aird_calibration._Measure._last_logits

    def full(self, kind, start, keep):
        starts.append(start)
        return real(self, kind, 0, keep)

    monkeypatch.setattr(aird_calibration._Measure, "_last_logits", full)
    assert _calibrate("scored", confirm=2).calibration == skipped.calibration
    assert max(starts) > 0  # the first run did skip blocks


def test_budget_curve_settled_replies_give_the_full_replies_rates(monkeypatch):
    """The budget curve ends a reply once it holds a refusal phrase: the rates are those of full replies."""
    import refusal_lab.judges as judges
    from refusal_lab.aird import budget_curve, refusal_rate

    c = tiny_handle("llama", n_layers=4)
    with c.lock:
        for m in c.model.modules():  # a livelier random model: replies that vary between prompts
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.3)
    prompts = [f"Tell me about topic number {i}" for i in range(8)]
    full = generate(c, prompts, max_new_tokens=10)
    letter = max("etaoinsr", key=lambda x: sum(x in r.lower() for r in full))  # in some replies, not all
    monkeypatch.setattr(judges, "REFUSAL_PHRASES", (letter,))
    assert 0 < sum(judges.is_refusal(r) for r in full) < len(full)
    rep = Repair(torch.randn(64), layers=[2], alpha=1.0, source_layer=2)
    curve = budget_curve(c, rep, prompts, max_layers=2, gen_tokens=10)
    for row in curve:
        with applied(c, replace(rep, layers=row.layers, mode="adapter")):
            assert row.refusal == refusal_rate(c, prompts, max_new_tokens=10)[0]


def test_kl_rule_accepts_moves_toward_the_original_only():
    assert aird_calibration.kl_acceptable(0.05, None, None, 0.1)  # close to C
    assert not aird_calibration.kl_acceptable(0.2, None, None, 0.1)  # far from C, O unknown
    assert aird_calibration.kl_acceptable(0.29, 1.78, 2.45, 0.1)  # far from C, back toward O (wanda:0.5's pick)
    # far from C and farther from O than C itself (bnb-nf4's earlier pick): rejected
    assert not aird_calibration.kl_acceptable(0.185, 0.577, 0.528, 0.1)


def test_choose_trades_refusal_against_over_refusal():
    def point(h, n, feasible=True, **kw):
        return CalibrationPoint(harmful_refusal=h, harmless_refusal=n, harmful_score=0.0, feasible=feasible,
                                layers=kw.get("layers", [1]), alpha=kw.get("alpha", 1.0), realign=kw.get("realign", False))

    base = point(0.6, 0.37, layers=[], alpha=0.0)
    edge = point(0.91, 0.32, alpha=3.0)  # most refusal, at the edge of the over-refusal limit
    balanced = point(0.88, 0.20, alpha=1.0, realign=True)
    assert aird_calibration.choose([base, edge, balanced]) is balanced
    assert aird_calibration.choose([base, point(0.99, 0.0, feasible=False)]) is base
    assert aird_calibration.choose([base, point(0.7, 0.47)]) is base  # +10 points refusal for +10 over-refusal: no gain
    with pytest.raises(aird.AIRDError):
        aird_calibration.choose([point(0.9, 0.1, feasible=False)])


def test_repair_save_load_roundtrip(tmp_path):
    rep = Repair(torch.randn(64), layers=[3, 2], alpha=2.5, mode="adapter", source_layer=3)
    back = Repair.load(rep.save(tmp_path / "a"))
    assert back.layers == [2, 3] and back.alpha == 2.5 and back.mode == "adapter"
    assert torch.allclose(back.direction, rep.direction)
    assert abs(float(back.direction.norm()) - 1) < 1e-6
    fitted = Repair(torch.randn(64), layers=[2], alpha=1.0, source_layer=3, realign=torch.randn(96), realign_layer=2)
    back = Repair.load(fitted.save(tmp_path / "b"))
    assert torch.equal(back.realign, fitted.realign) and back.realign_layer == 2 and back.key() == fitted.key()
    assert back.key() != Repair(torch.randn(64), layers=[2], alpha=1.0).key()
    with pytest.raises(aird.AIRDError, match="both"):
        Repair(torch.randn(64), layers=[2], alpha=1.0, realign=torch.randn(96))


def test_recoverability_verdicts():
    torch.manual_seed(0)
    o = {"harmful": torch.randn(50, 5) + 4, "harmless": torch.randn(50, 5)}
    kept = {"harmful": torch.randn(50, 5) + 3.5, "harmless": torch.randn(50, 5)}
    gone = {"harmful": torch.randn(50, 5) + 0.2, "harmless": torch.randn(50, 5)}
    assert aird.recoverability(o, kept, 3).level == "recoverable"
    v = aird.recoverability(o, gone, 3)
    assert v.level == "unrecoverable" and "Not recoverable" in v.verdict
    # still separated, but harmless prompts moved most of the way toward the harmful ones (over-refusal)
    shifted = {"harmful": torch.randn(50, 5) + 6.0, "harmless": torch.randn(50, 5) + 2.0}
    v = aird.recoverability(o, shifted, 3)
    assert v.level == "partial" and abs(v.harmless_shift - 0.5) < 0.15 and "over-refuses" in v.verdict
    assert aird.recoverability(o, kept, 3).harmless_shift < 0.25


def test_repair_verdict_weighs_the_measured_recovery():
    diag = Recoverability(layer=2, level="partial", cohens_d_original=[0, 1, 3.13], cohens_d_compressed=[0, 1, 2.17],
                          ratio=2.17 / 3.13, harmless_shift=0.0, verdict="")
    # the projections say "partly recoverable", the repair brings back 7% of the lost refusal (rtn:3:64 on v2)
    v = aird.repair_verdict(diag, 0.910, 0.090, 0.149)
    assert v.level == "not recovered" and v.predicted == "partial"
    assert v.recovered == pytest.approx(0.059 / 0.82)
    assert "after the direction is written" in v.verdict and "2.17 vs 3.13" in v.verdict
    assert aird.repair_verdict(replace(diag, level="recoverable"), 0.910, 0.731, 0.925).level == "recovered"
    v = aird.repair_verdict(diag, 0.948, 0.692, 0.844)
    assert v.level == "partial" and "after the direction" not in v.verdict
    v = aird.repair_verdict(diag, 0.91, 0.89, 0.95)  # compression lost 2 points: nothing to recover
    assert v.level == "nothing lost" and v.recovered is None
    assert aird.recovered_share(0.9, 0.5, 0.3) == pytest.approx(-0.5)  # a repair can make it worse
    # magnitude:0.5 on v2: perplexity 37× the original's, refusal 0% before and after — a broken model
    v = aird.repair_verdict(diag, 0.910, 0.0, 0.0, perplexity_ratio=848.37 / 22.83)
    assert v.level == "not recovered" and "37×" in v.verdict and "after the direction" not in v.verdict
    assert "37×" not in aird.repair_verdict(diag, 0.910, 0.0, 0.0, perplexity_ratio=1.6).verdict


def test_refusal_threshold_reproduces_generated_verdicts():
    t, agree = aird_calibration.refusal_threshold(torch.tensor([-3.0, -2.0, -1.0, 0.5, 1.0, 2.0]),
                                                  [False, False, True, True, True, True])
    assert t == -1.5 and agree == 1.0  # refusals that start with little mass on the refusal openings
    t, agree = aird_calibration.refusal_threshold(torch.tensor([-1.0, 1.0, 2.0]), [True, False, True])
    assert agree == pytest.approx(2 / 3) and (torch.tensor([-1.0, 1.0, 2.0]) > t).tolist().count(True) >= 1
    t, agree = aird_calibration.refusal_threshold(torch.tensor([0.0, 1.0]), [False, False])
    assert t > 1.0 and agree == 1.0  # nobody refuses: above every score
