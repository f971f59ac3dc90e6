"""Directions: candidates, selection (incl. the fallback), persistence, comparison helpers, refusal tokens."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from refusal_lab.activations import mean_activations
from refusal_lab.directions import (DirectionSet, generate_candidates, layer_cosines, mean_projections, quality,
                             source)
from refusal_lab.selection import SCREEN_SURVIVORS, planned_passes, seconds_per_pass, select_direction
from refusal_lab.interventions import ablate, add
from refusal_lab.judges import REFUSAL_OPENINGS, refusal_scores, refusal_token_ids
from refusal_lab.prompts import bundled
from refusal_lab.testing.tiny import tiny_handle

HARMFUL = bundled("harmful", "train").head(12)
HARMLESS = bundled("harmless", "train").head(12)
H_VAL = bundled("harmful", "val").prompts[:6]
N_VAL = bundled("harmless", "val").prompts[:6]
POS = [-2, -1]


@pytest.fixture(scope="module")
def handle():
    return tiny_handle("llama", n_layers=4)


@pytest.fixture(scope="module")
def cands(handle):
    return generate_candidates(handle, HARMFUL, HARMLESS)


@pytest.fixture(scope="module")
def selected(handle, cands):
    return select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=10.0, induce_threshold=-1e9)


def test_candidates_shapes_and_metadata(handle, cands):
    n_pos = len(cands.positions)
    assert cands.candidates.shape == (n_pos, handle.n_layers, handle.d_model)
    assert cands.candidates.dtype == torch.float32
    assert cands.mean_harmful.shape == cands.mean_harmless.shape == (n_pos, handle.n_layers + 1, handle.d_model)
    assert cands.positions == list(range(-n_pos, 0))
    assert cands.bypass.shape == (n_pos, handle.n_layers) and torch.isnan(cands.bypass).all()
    torch.testing.assert_close(cands.candidates, (cands.mean_harmful - cands.mean_harmless)[:, :handle.n_layers])
    direct = mean_activations(handle, HARMFUL.prompts).mean - mean_activations(handle, HARMLESS.prompts).mean
    torch.testing.assert_close(cands.candidates, direct[:, :handle.n_layers].float(), atol=1e-6, rtol=1e-5)
    m = cands.metadata
    assert m["model_fingerprint"] == handle.fingerprint
    assert m["harmful_sha"] == HARMFUL.sha and m["harmless_sha"] == HARMLESS.sha
    assert len(m["post_instruction_tokens"]) == n_pos
    with pytest.raises(ValueError, match="no direction selected"):
        cands.direction


def test_refusal_filter_falls_back_when_the_model_never_refuses(handle):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = generate_candidates(handle, HARMFUL.head(6), HARMLESS.head(6), filter_refusals=True)
    assert any("refusal filter kept only" in str(x.message) for x in w)  # random weights refuse nothing
    assert ds.metadata["n_harmful"] == 6 and ds.warnings


def test_selection_scores_and_choice(handle, cands, selected):
    sel = selected.metadata["selection"]
    cut = int(0.8 * handle.n_layers)
    assert selected.selected is not None and selected.selected[0] in POS and selected.selected[1] < cut
    assert not sel["fallback"]
    rows = [cands.pos_index(p) for p in POS]
    # bypass everywhere evaluated below the cut (non-zero candidates), NaN at other positions / layers
    assert torch.isnan(selected.bypass[:, cut:]).all()
    assert torch.isnan(selected.bypass[[i for i in range(cands.n_positions) if i not in rows]]).all()
    evaluated = selected.bypass[rows, :cut]
    finite = evaluated[~torch.isnan(evaluated)]
    i, layer = selected.pos_index(selected.selected[0]), selected.selected[1]
    assert float(selected.bypass[i, layer]) == float(finite.min())  # lenient filters: lowest bypass wins
    # the lazy search only checked the winner; its scores are filled in
    assert sel["n_checked"] == 1 and not math.isnan(float(selected.kl[i, layer]))
    # bypass is the mean refusal score with the candidate ablated everywhere; induce is with it added
    r = selected.direction
    assert torch.equal(r, cands.candidate(*selected.selected))
    with ablate(handle, r):
        bypass = float(refusal_scores(handle, H_VAL).mean())
    with add(handle, r, layer):
        induce = float(refusal_scores(handle, N_VAL).mean())
    assert abs(bypass - float(selected.bypass[i, layer])) < 1e-4
    assert abs(induce - float(selected.induce[i, layer])) < 1e-4
    q = quality(selected)
    assert q["bypass"] == float(selected.bypass[i, layer]) and q["fallback"] is False
    assert q["baseline_harmful"] == pytest.approx(float(refusal_scores(handle, H_VAL).mean()), abs=1e-4)
    src = source(selected)
    assert (src["position"], src["layer"]) == selected.selected and isinstance(src["token"], str)


def test_exhaustive_grid_selects_the_same_candidate(handle, cands, selected):
    full = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=10.0,
                            induce_threshold=-1e9, exhaustive=True)
    assert full.selected == selected.selected
    rows = [cands.pos_index(p) for p in POS]
    finite = ~torch.isnan(full.bypass[rows])
    assert torch.equal(finite, ~torch.isnan(full.kl[rows])) and torch.equal(finite, ~torch.isnan(full.induce[rows]))


@pytest.mark.parametrize("kw", [dict(kl_threshold=10.0, induce_threshold=-1e9),  # the first candidate passes
                                dict(kl_threshold=-1.0, kl_relaxation=()),  # every KL check fails
                                dict(kl_threshold=10.0, induce_threshold=-1e9, exhaustive=True)])
def test_selection_progress_counts_the_steps_it_takes(handle, cands, kw):
    calls: list[tuple[int, int]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, progress=lambda d, t: calls.append((d, t)),
                              **kw)
    sel = ds.metadata["selection"]
    n, nh, nn = sel["n_candidates"], sel["n_harmful_val"], sel["n_harmless_val"]
    rows = [cands.pos_index(p) for p in POS]
    n_induce, n_bypass = (int((~torch.isnan(t[rows])).sum()) for t in (ds.induce, ds.bypass))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and all(0 <= d <= t for d, t in calls)
    # progress counts prompts run: baseline, induce, bypass, KL checks (+ the fallback's KL of its choice)
    prompts = nh + nn + n_induce * nn + n_bypass * nh + sel["n_checked"] * nn
    assert calls[-1][0] == calls[-1][1] and 0 <= calls[-1][0] - prompts <= int(sel["fallback"]) * nn
    assert 0 <= sel["passes"] - (2 + n_induce + n_bypass + sel["n_checked"]) <= 2 * int(sel["fallback"])
    assert calls[0][1] == nh + nn + (n * (nh + 2 * nn) if kw.get("exhaustive") else n * nn + nh + nn)


def test_strict_filters_fall_back_with_a_warning(handle, cands, selected):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=-1.0, kl_relaxation=(),
                              induce_threshold=-1e9)
    msgs = [str(x.message) for x in w if "falling back" in str(x.message)]
    assert len(msgs) == 1 and "kl filter" in msgs[0]
    sel = ds.metadata["selection"]
    assert sel["fallback"] and sel["removed"]["kl"] == sel["n_candidates"]
    assert ds.selected == selected.selected  # lowest bypass overall
    assert any("falling back" in m for m in ds.warnings) and quality(ds)["fallback"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds2 = select_direction(handle, cands, H_VAL, N_VAL, positions=[-1], kl_threshold=10.0,
                               induce_threshold=1e9)
    assert any("induce filter" in str(x.message) for x in w) and ds2.metadata["selection"]["fallback"]


def test_kl_threshold_is_relaxed_in_steps_before_falling_back(handle, cands, selected):
    kls = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=-1.0, kl_relaxation=(),
                           induce_threshold=-1e9, exhaustive=True).kl
    middle = float(kls[~torch.isnan(kls)].median())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=-1.0,
                              kl_relaxation=(-0.5, middle, 1e9), induce_threshold=-1e9)
    sel = ds.metadata["selection"]
    assert not sel["fallback"] and sel["kl_threshold_used"] == middle
    assert any("relaxed the KL threshold" in str(x.message) for x in w)
    i = ds.pos_index(ds.selected[0])
    assert float(ds.kl[i, ds.selected[1]]) < middle
    # the lowest-bypass candidate among those under the relaxed threshold
    ok = [(float(ds.bypass[ds.pos_index(p), layer]), (p, layer)) for p in POS for layer in range(ds.n_layers)
          if float(ds.kl[ds.pos_index(p), layer]) < middle]
    assert ds.selected == min(ok)[1]


def test_save_load_round_trip(tmp_path, selected):
    folder = selected.save(tmp_path / "dirs")
    assert sorted(p.name for p in folder.iterdir()) == ["directions.json", "directions.safetensors"]
    back = DirectionSet.load(folder)
    for name in ("candidates", "mean_harmful", "mean_harmless", "bypass", "induce", "kl"):
        torch.testing.assert_close(getattr(back, name), getattr(selected, name), equal_nan=True, atol=0, rtol=0)
    assert back.selected == selected.selected and back.positions == selected.positions
    assert back.metadata == selected.metadata
    assert torch.equal(back.direction, selected.direction)
    with pytest.raises(FileNotFoundError):
        DirectionSet.load(tmp_path / "nowhere")


def test_comparison_helpers(cands, selected):
    cos = layer_cosines(selected, selected)
    assert cos.shape == (selected.n_layers,)
    finite = cos[~torch.isnan(cos)]
    assert len(finite) >= selected.n_layers - 1 and torch.allclose(finite, torch.ones_like(finite))
    flipped = DirectionSet(**{**selected.__dict__, "candidates": -selected.candidates})
    assert torch.allclose(layer_cosines(selected, flipped)[~torch.isnan(cos)], -torch.ones_like(finite))
    per_layer = selected.candidates[selected.pos_index(-1)]
    torch.testing.assert_close(layer_cosines(per_layer, per_layer, position=-1), layer_cosines(selected, selected,
                                                                                              position=-1),
                               equal_nan=True)
    proj = mean_projections(selected)
    assert proj["harmful"].shape == proj["harmless"].shape == (selected.n_layers + 1,)
    layer = selected.selected[1]
    gap = proj["harmful"][layer] - proj["harmless"][layer]
    assert float(gap) == pytest.approx(float(selected.direction.norm()), rel=1e-4)  # r·r̂ = |r|
    assert source(cands)["layer"] is None and quality(cands) == {}


def test_refusal_tokens_come_from_the_tokenizer(handle):
    ids = refusal_token_ids(handle.tokenizer)
    assert ids and len(set(ids)) == len(ids)
    pieces = [handle.tokenizer.decode([i]).strip() for i in ids]
    assert all(any(o.startswith(p) for o in REFUSAL_OPENINGS) for p in pieces if p)
    assert handle.tokenizer.convert_tokens_to_ids("I") in ids  # the tiny BPE has "I" as a token


def test_kl_checks_decided_early_select_what_the_full_grid_selects(handle, cands):
    """One prompt per batch, so a KL check can stop after a few prompts; thresholds between the full
    grid's KL values, so that the strict filter fails everywhere and a relaxed one decides."""
    first = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=-1.0, kl_relaxation=(),
                             induce_threshold=-1e9, exhaustive=True, batch_size=1)
    kls = first.kl[~torch.isnan(first.kl)].sort().values
    k = len(kls) // 2
    low, middle = float(kls[0]) / 2, float(kls[k - 1] + kls[k]) / 2
    kw = dict(positions=POS, kl_threshold=low, kl_relaxation=(middle, 1e9), induce_threshold=-1e9, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = select_direction(handle, cands, H_VAL, N_VAL, **kw)
        full = select_direction(handle, cands, H_VAL, N_VAL, exhaustive=True, **kw)
    sel = lazy.metadata["selection"]
    assert sel["kl_decided_early"] > 0 and full.metadata["selection"]["kl_decided_early"] == 0
    assert lazy.selected == full.selected and sel["kl_threshold_used"] == middle
    assert quality(lazy) == quality(full)
    decided = ~torch.isnan(lazy.kl)
    assert torch.equal(lazy.kl[decided], full.kl[decided])
    stopped = ~decided & ~torch.isnan(full.kl)
    assert bool(stopped.any()) and bool((full.kl[stopped] >= low).all())  # each was a true "KL ≥ threshold"


def test_screened_search_keeps_the_candidates_that_can_induce(handle, cands, selected):
    exact = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=10.0, induce_threshold=-1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=10.0, induce_threshold=-1e9,
                                screen=3)
    sc = fast.metadata["selection"]["screen"]
    assert sc["prompts"] == 3 and len(sc["induce_mean_se"]) == fast.metadata["selection"]["n_candidates"]
    assert sc["searched"] == len(sc["induce_mean_se"])  # every candidate clears −1e9
    # the same candidate and measures; KL up to float32 round-off (the screened search batches the KL prompts
    # differently: 7.8160153e-4 vs 7.8160164e-4 seen on an AMX CPU)
    assert fast.selected == exact.selected and quality(fast) == pytest.approx(quality(exact), rel=1e-5, abs=1e-9)
    # a threshold no candidate can clear: all screened out, the fallback screens bypass and computes the
    # lowest exactly — the same candidate as the exact search's fallback, with its KL in full
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fb = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, induce_threshold=1e9, screen=3)
        ref = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, induce_threshold=1e9)
    sel = fb.metadata["selection"]
    assert sel["fallback"] and sel["removed"]["screen"] == sel["n_candidates"] and "induce screen" in str(w[0].message)
    assert fb.selected == ref.selected and quality(fb)["bypass"] == quality(ref)["bypass"]
    assert not math.isnan(quality(fb)["kl"]) and quality(fb)["kl"] == pytest.approx(quality(ref)["kl"], rel=1e-5)
    assert len(sel["screen"]["bypass_mean_se"]) == sel["n_candidates"]  # screened, then exact where it may be lowest
    with pytest.raises(ValueError, match="screen"):
        select_direction(handle, cands, H_VAL, N_VAL, positions=POS, screen=1)


def test_screened_induce_completes_the_screen_pass_instead_of_repeating_it(handle, cands):
    """A candidate searched after the screen runs only the prompts the screen did not: its induce is the
    mean over the same batches a full pass of that runner makes, to the bit."""
    from refusal_lab.activations import BatchRunner, tokenize
    from refusal_lab.judges import refusal_score_from_logits
    from refusal_lab.selection import _spread_index

    passes = []
    real = BatchRunner.last_logits

    def spy(self, *a, **kw):
        passes.append(len(self) if kw.get("batches") is None else sum(len(self.batches[b]) for b in kw["batches"]))
        return real(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BatchRunner, "last_logits", spy)
        fast = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=10.0,
                                induce_threshold=-1e9, screen=2)
    n_cands = fast.metadata["selection"]["n_candidates"]
    exact = int((~torch.isnan(fast.induce)).sum())
    assert passes.count(2) == n_cands and passes.count(len(N_VAL) - 2) == exact > 0  # screen, then the rest only
    runner = BatchRunner(handle, tokenize(handle, N_VAL), groups=[_spread_index(len(N_VAL), 2)])
    ids = refusal_token_ids(handle.tokenizer)
    for pos in POS:
        for layer in range(handle.n_layers):
            value = float(fast.induce[fast.pos_index(pos), layer])
            if math.isnan(value):
                continue
            with handle.lock, add(handle, cands.candidate(pos, layer), layer, 1.0):
                full = refusal_score_from_logits(runner.last_logits(), ids).double().mean()
            assert value == float(full.float())


@pytest.mark.parametrize("induce_q,kl_q", [(0.0, 1.0), (0.5, 1.0), (0.8, 0.5), (0.5, 0.2), (1.0, 1.0), (0.3, 0.0)])
def test_induce_first_search_selects_what_the_full_grid_selects(handle, cands, induce_q, kl_q):
    """Thresholds at quantiles of the full grid's own scores, so that the filters bite in every way
    (most candidates feasible, few, none; KL failing for some, all): same choice, same scores."""
    grid = select_direction(handle, cands, H_VAL, N_VAL, positions=POS, kl_threshold=1e9, induce_threshold=-1e9,
                            exhaustive=True)
    ind = grid.induce[~torch.isnan(grid.induce)].sort().values
    kls = grid.kl[~torch.isnan(grid.kl)].sort().values
    kw = dict(positions=POS, induce_threshold=float(ind[round(induce_q * (len(ind) - 1))]) - 1e-6,
              kl_threshold=float(kls[round(kl_q * (len(kls) - 1))]) + 1e-6, kl_relaxation=(float(kls[-1]) * 2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = select_direction(handle, cands, H_VAL, N_VAL, **kw)
        full = select_direction(handle, cands, H_VAL, N_VAL, exhaustive=True, **kw)
    a, b = lazy.metadata["selection"], full.metadata["selection"]
    assert lazy.selected == full.selected and quality(lazy) == quality(full)
    assert (a["fallback"], a["kl_threshold_used"]) == (b["fallback"], b["kl_threshold_used"])
    assert a["passes"] <= b["passes"]
    done = ~torch.isnan(lazy.induce)
    assert torch.equal(lazy.induce[done], full.induce[done]) and bool(done[[cands.pos_index(p) for p in POS]].any())


def test_search_cost_estimate(handle):
    assert planned_passes(138, 67) == 142
    assert planned_passes(138, 67, exhaustive=True) == 2 + 3 * 138
    assert planned_passes(138, 67, screen=12) == pytest.approx(4 + 138 * (12 / 67 + SCREEN_SURVIVORS))
    assert planned_passes(10, 5, screen=12) == 4 + 10 * (1 + SCREEN_SURVIVORS)  # a screen as big as the set
    s = seconds_per_pass(handle, N_VAL, sample=2)
    assert 0 < s < 60
