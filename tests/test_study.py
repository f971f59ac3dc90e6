"""The study pipeline on a tiny saved model: stages run, persist, and a rerun computes nothing."""

import pytest

from refusal_lab.progress import Cancelled
from refusal_lab.study import Study, StudySpec, summary_rows
from refusal_lab.testing.tiny import tiny_handle


@pytest.fixture()
def tiny_folder(tmp_path):
    h = tiny_handle("llama", n_layers=4, d_model=64)
    h.model.save_pretrained(tmp_path / "tiny")
    h.tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def _spec(folder, **kw):
    base = dict(model=folder, schemes=["magnitude:0.5"], limit=4, max_new_tokens=4, aird="auto",
                aird_alpha=2.0, aird_layers=[1, 2], selection_positions=[-1], device="cpu")
    base.update(kw)
    return StudySpec(**base)


def test_study_runs_persists_and_reruns_from_cache(tiny_folder, tmp_path):
    stages = []
    study = Study(_spec(tiny_folder), tmp_path / "runs", on_progress=lambda s, d, t: stages.append(s))
    res = study.run()
    assert {"directions original: candidates", "evaluate original: replies"} <= set(stages)
    v = res.variants["magnitude:0.5"]
    assert len(v.drift.cosine_per_layer) == 4
    assert v.compression.sparsity == pytest.approx(0.5, abs=0.02)
    assert v.repaired.repair.alpha == 2.0 and v.repaired.repair.layers == [1, 2]
    assert v.repaired.density_after.density > v.repaired.density_before.density
    assert 0 <= res.original.evaluation.sets["harmful"].refusal_rate <= 1
    assert v.aird_verdict.level in ("recovered", "partial", "not recovered", "nothing lost")
    assert v.aird_verdict.predicted == v.drift.recoverability.level
    rows = summary_rows(res)
    assert [r["model"] for r in rows] == ["original", "magnitude:0.5", "magnitude:0.5 + AIRD"]

    # a fresh process-equivalent: new Study object on the same store computes nothing and loads no model
    stages.clear()
    again = Study(_spec(tiny_folder), tmp_path / "runs", on_progress=lambda s, d, t: stages.append(s))
    assert again.run() == res
    assert stages == [] and again._original is None


def test_planned_stages_are_the_stages_a_run_computes_and_the_eta_follows_them(tiny_folder, tmp_path):
    from refusal_lab.study_eta import for_study

    study = Study(_spec(tiny_folder), tmp_path / "runs")
    planned = study.planned_stages(budget=True)
    eta = for_study(study, planned)
    events = []
    study.on_stage = lambda stage, seconds: (events.append((stage, seconds)), eta.on_stage(stage, seconds))
    study.run(budget=True)
    assert study._variants == {}  # let go once its stages were done
    started = [s for s, sec in events if sec is None]
    assert set(planned) <= set(started)  # every planned stage ran …
    assert set(started) - set(planned) <= {"diagnostic magnitude:0.5"}  # … nested inside a planned one
    assert eta.left() == (0.0, 0)  # all done: nothing left, nothing unknown
    # a rerun loads every stage: no event, and the history now times every kind
    again = Study(_spec(tiny_folder), tmp_path / "runs")
    again.on_stage = lambda stage, seconds: events.append(("again", stage))
    again.run(budget=True)
    assert not [e for e in events if e[0] == "again"]
    eta2 = for_study(again, again.planned_stages(budget=True))
    assert eta2.left() == (0.0, 0)  # stored in this study: they only load


def test_cancel_keeps_completed_stages(tiny_folder, tmp_path):
    def cancel_on_eval(stage, done, total):
        if stage.startswith("evaluate original"):
            raise Cancelled()

    study = Study(_spec(tiny_folder), tmp_path / "runs", on_progress=cancel_on_eval)
    with pytest.raises(Cancelled):
        study.run()
    stages = []
    resumed = Study(_spec(tiny_folder), tmp_path / "runs", on_progress=lambda s, d, t: stages.append(s))
    resumed.run()
    assert not any(s.startswith("directions original") for s in stages)  # already stored
    assert any(s.startswith("evaluate original") for s in stages)



def test_a_second_study_reuses_stages_another_study_computed(tiny_folder, tmp_path):
    """Stage keys name everything a result depends on, so a different study in the same store (other
    evaluation limit) copies the original's directions and drift instead of recomputing them, and
    keeps its own copy (its folder stays complete for export)."""
    first = Study(_spec(tiny_folder), tmp_path / "runs")
    d1 = first.directions("original")
    drift1 = first.drift("magnitude:0.5")
    stages = []
    second = Study(_spec(tiny_folder, limit=3), tmp_path / "runs", on_progress=lambda s, d, t: stages.append(s))
    assert second.record.id != first.record.id
    d2 = second.directions("original")
    assert second.drift("magnitude:0.5") == drift1
    assert d2.selected == d1.selected and (d2.candidates == d1.candidates).all()
    assert stages == [] and second._original is None
    third = Study(_spec(tiny_folder, limit=2), tmp_path / "runs")
    first.store.delete(first.record.id)
    second.store.delete(second.record.id)  # the copies made by the second study are gone too
    assert third.directions("original").selected == d1.selected  # recomputed, no crash


def test_merged_aird_on_a_quantized_variant_runs_as_adapter(tiny_folder, tmp_path):
    """`--aird-mode merged` (the default) with a bitsandbytes scheme: merging into 4-bit storage is
    impossible, so that variant is repaired in adapter mode (same function) instead of failing."""
    spec = _spec(tiny_folder, schemes=["magnitude:0.5", "bnb-nf4"], aird_mode="merged")
    try:
        res = Study(spec, tmp_path / "runs").run()
    except RuntimeError as e:  # bitsandbytes cannot run on this device: the scheme says so clearly
        pytest.skip(str(e))
    assert res.variants["magnitude:0.5"].repaired.repair.mode == "merged"
    nf4 = res.variants["bnb-nf4"].repaired
    assert nf4.repair.mode == "adapter" and nf4.densified_weights == 0


def test_aird_cli_reports_the_measured_verdict(tiny_folder, tmp_path, capsys):
    import json

    from refusal_lab.aird import repair_verdict
    from refusal_lab.cli import main
    from refusal_lab.results import Recoverability

    out = tmp_path / "aird.json"
    assert main(["aird", "--model", tiny_folder, "--scheme", "magnitude:0.5", "--layers", "1,2", "--alpha", "2",
                 "--limit", "4", "--max-new-tokens", "4", "--methods", "none,aird-merged", "--no-budget",
                 "--device", "cpu", "--runs", str(tmp_path / "runs"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rate = lambda ev: ev["sets"]["harmful"]["refusal_rate"]  # noqa: E731
    # O = the uncompressed model, C = no repair, R = the AIRD repair in the chosen mode
    want = repair_verdict(Recoverability.from_json(res["drift"]["recoverability"]), rate(res["original"]),
                          rate(res["methods"]["none"]), rate(res["methods"]["aird-merged"])).to_json()
    assert {k: res["aird_verdict"][k] for k in ("level", "recovered", "predicted")} == \
        {k: want[k] for k in ("level", "recovered", "predicted")}
    assert "diagnostic (measured):" in capsys.readouterr().out


def test_variant_selection_is_optional(tiny_folder, tmp_path):
    """By default a variant's candidates are compared with the original's direction (no selection of its
    own); ``variant_selection`` adds its selected direction and source, on the same candidates."""
    off = Study(_spec(tiny_folder), tmp_path / "runs")
    d = off.drift("magnitude:0.5")
    assert off.directions("magnitude:0.5").selected is None
    assert d.cosine_selected is None and d.variant.source.layer is None and d.variant.quality.to_json() == {}
    d_o = off.directions("original")
    cand = off.directions("magnitude:0.5").candidate(*d_o.selected)
    assert d.cosine_at_source == pytest.approx(
        float((d_o.direction.double() @ cand.double()) / (d_o.direction.double().norm() * cand.double().norm())))
    on = Study(_spec(tiny_folder, variant_selection=True), tmp_path / "runs")
    d2 = on.drift("magnitude:0.5")
    assert on.directions("magnitude:0.5").selected is not None and -1 <= d2.cosine_selected <= 1
    assert d2.variant.source.layer is not None
    assert d2.cosine_at_source == d.cosine_at_source and d2.cosine_per_layer == d.cosine_per_layer


def test_observed_reports_only_this_threads_calls_and_with_spec_shares_the_folder(tiny_folder, tmp_path):
    import threading

    study = Study(_spec(tiny_folder, schemes=[], aird=None), tmp_path / "runs")
    mine, theirs, stages = [], [], []
    with study.observed(lambda s, d, t: mine.append(s), lambda s, sec: stages.append((s, sec))):
        other = threading.Thread(target=lambda: study.evaluate("original"))  # another session's call
        other.start()
        other.join()
        study.directions("original")
    assert mine and all(s.startswith("directions original") for s in mine)  # not the other thread's evaluation
    assert ("directions original", None) in stages and not any(s.startswith("evaluate") for s, _ in stages)
    variant = study.variant("magnitude:0.5")

    def cancel(stage, done, total):
        raise Cancelled(stage)

    with study.observed(lambda s, d, t: theirs.append(s)):
        with pytest.raises(Cancelled), study.observed(cancel):  # the inner block's observer is the one told
            study.evaluate("magnitude:0.5")
    assert theirs == [] and study.variants() == {"magnitude:0.5": variant}
    study.evaluate("magnitude:0.5")  # outside observed(): nobody is told, nothing raises

    manual = study.with_spec(aird="manual", aird_alpha=1.0, aird_layers=[2])
    assert manual.id == study.id and study.spec.aird is None  # same folder; this study's spec untouched
    assert manual.repair("magnitude:0.5").alpha == 1.0 and manual.variants() == study.variants()
    study.drop_variants(["magnitude:0.5"])
    assert study.variants() == {} == manual.variants()


def test_adopted_variant_is_not_compressed_again(tiny_folder, tmp_path):
    from refusal_lab.compression import apply

    study = Study(_spec(tiny_folder, schemes=[], aird=None), tmp_path / "runs")
    small, _ = apply(study.original, "magnitude:0.5")
    study.adopt_variant("magnitude:0.5", small)
    stages = []
    with study.observed(on_stage=lambda s, sec: stages.append(s)):
        assert study.variant("magnitude:0.5") is small
        report = study.compression_report("magnitude:0.5")  # the report travels with the adopted variant
    assert stages == [] and report.scheme == "magnitude:0.5" and report.sparsity == pytest.approx(0.5, abs=0.02)
