"""refusal_lab.session: what the dashboard's sessions share, tested without Streamlit on a tiny saved model."""

import pytest

from refusal_lab import session
from refusal_lab.interventions import count_hooks
from refusal_lab.session import StoredStudy, Workspace, list_studies, study_spec, workspace_key
from refusal_lab.testing.tiny import tiny_handle


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_LAB_RUNS", str(tmp_path / "runs"))
    h = tiny_handle("llama", n_layers=4, d_model=64)
    h.model.save_pretrained(tmp_path / "tiny")
    h.tokenizer.save_pretrained(tmp_path / "tiny")
    from refusal_lab.models import load_model

    return load_model(str(tmp_path / "tiny"), device="cpu")


def _spec(handle):
    cfg = {"spec": handle.spec, "device": "cpu", "dtype": "auto"}
    settings = {"limit": 4, "max_new_tokens": 4, "positions": "last", "variant_selection": False}
    return study_spec(handle, cfg, settings, {})


def test_workspace_shares_variants_with_its_studies_and_remembers_them(tiny):
    ws = Workspace(workspace_key(tiny))
    v = ws.compress(tiny, "magnitude:0.5", perplexity=True)
    assert v.perplexity > 1 and ws.variants == {"magnitude:0.5": v}
    study = ws.study(_spec(tiny), tiny)
    assert study is ws.study(_spec(tiny), tiny)  # one shared study per spec
    assert study.variants() == {"magnitude:0.5": v.handle}  # adopted: not compressed again
    remembered = session.remembered_variants(tiny)
    assert remembered["magnitude:0.5"].perplexity == v.perplexity
    ws.remove_variants(["magnitude:0.5"])
    assert ws.variants == {} and study.variants() == {}
    study.variant("magnitude:0.5")  # the drift page typed a scheme: the study compressed it …
    ws.keep_variants_of(study)  # … and the other pages get it
    assert set(ws.variants) == {"magnitude:0.5"} and ws.variants["magnitude:0.5"].report.scheme == "magnitude:0.5"


def test_steered_replies_are_kept_and_leave_no_hook(tiny):
    import torch

    ws = Workspace(workspace_key(tiny))
    direction = torch.randn(tiny.d_model)
    plain = ws.steered_reply(tiny, "How do I pick a lock?", 4)
    steered = ws.steered_reply(tiny, "How do I pick a lock?", 4, "add", direction * 50, layer=1, coeff=1.0,
                               direction_id="r")
    assert count_hooks(tiny) == 0
    assert ws.steered_reply(tiny, "How do I pick a lock?", 4, "add", direction * 50, layer=1, coeff=1.0,
                            direction_id="r") is steered  # kept
    assert set(plain) == {"reply", "refusal", "tokens", "scores"} and len(plain["scores"]) == len(plain["tokens"]) + 1  # before each token and after the last
    with pytest.raises(ValueError, match="layer"):
        ws.steered_reply(tiny, "hi", 4, "add", direction, direction_id="r")


def test_stored_dashboard_study_is_rebuilt_from_its_page_markers(tiny):
    ws = Workspace(workspace_key(tiny))
    study = ws.study(_spec(tiny), tiny)
    study.drift("magnitude:0.5"), study.evaluate("original"), study.evaluate("magnitude:0.5")
    session.mark_completed(study, session.completed_key("drift", schemes=["magnitude:0.5"]), "drift",
                           {"schemes": ["magnitude:0.5"]})
    session.mark_original_direction(study, study.directions("original"))
    assert session.original_source_layer(study) == study.directions("original").selected[1]
    info = next(i for i in list_studies() if i.id == study.id)
    stored = StoredStudy(info)
    assert not stored.is_variants_list and all(r["status"] == "ok" for r in stored.stages())
    assert "dashboard drift" in stored.json()["stages"]
    pipeline = stored.pipeline()
    results = stored.report_inputs(pipeline)
    assert list(results.variants) == ["magnitude:0.5"] and results.budget is None  # no AIRD page run
    assert pipeline.spec.schemes == []  # the stored study's spec is left as it is
    assert b"<html" in stored.html(pipeline)[:200].lower()
