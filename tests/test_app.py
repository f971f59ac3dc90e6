"""Headless dashboard tests (streamlit AppTest) on a tiny random model saved to a folder.

Each test opens a page the way a user does (navigation from app.py) and asserts on the values it
renders, and that errors come out as ``st.error`` boxes, never as an exception element.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from refusal_lab.testing.tiny import tiny_handle, tiny_model_folder

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny llama saved as a model folder, and a private cache directory."""
    root = tmp_path_factory.mktemp("app")
    folder = tiny_model_folder(root / "tiny-llama")
    mp = pytest.MonkeyPatch()
    mp.setenv("REFUSAL_LAB_CACHE", str(root / "cache"))
    mp.setenv("REFUSAL_LAB_RUNS", str(root / "runs"))
    yield {"folder": folder, "root": root}
    mp.undo()


def open_page(env, page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_cfg"] = {"spec": str(env["folder"]), "device": "cpu", "dtype": "float32",
                                     "trust_remote_code": False, "chat_template": None}
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label.startswith(label)]
    assert found, f"no button {label!r} among {[b.label for b in at.button]}"
    return found[0]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_home_lists_every_page(env):
    at = open_page(env)
    assert at.title[0].value == "Refusal Lab"
    text = at.markdown[0].value
    for name in ("Model", "Prompts", "Compress", "Refusal drift", "Steer", "AIRD", "Report"):
        assert f"**{name}**" in text


def test_model_page_shows_architecture_and_template(env):
    at = open_page(env, "pages/model.py")
    m = metrics(at)
    assert m["Layers"] == "4" and m["Width (d_model)"] == "64"
    n_params = sum(p.numel() for p in tiny_handle("llama", 4, 64).model.parameters())
    assert m["Parameters"] == f"{n_params / 1e6:.1f} M"
    code = at.code[0].value
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in code and code.rstrip().endswith("<|im_start|>assistant")
    assert len(at.dataframe[0].value) == 4  # one row of residual writers per layer


@pytest.mark.parametrize("spec, cause", [("no such model!", "is not a model spec"),
                                         ("/nonexistent/model.gguf", "GGUF file not found")])
def test_model_page_bad_spec_keeps_previous_model(env, spec, cause):
    at = open_page(env, "pages/model.py")
    at.radio[0].set_value("custom")
    at.text_input[0].set_value(spec)
    at.button[0].click().run()
    assert not at.exception
    errs = errors(at)
    assert errs and cause in errs[0] and "Fix:" in errs[0], errs
    assert metrics(at)["Layers"] == "4"  # the previous model is still loaded and shown
    assert at.session_state["model_cfg"]["spec"] == str(env["folder"])


def test_model_page_trust_remote_code_warns(env):
    at = open_page(env, "pages/model.py")
    at.checkbox[0].check().run()
    assert any("Trust remote code is on" in w.value for w in at.warning)


def test_prompts_page_counts_and_upload(env):
    from refusal_lab.prompts import bundled
    at = open_page(env, "pages/prompts.py")
    m = [(x.label, x.value) for x in at.metric]
    assert ("Prompts", str(len(bundled("harmful")))) in m
    assert ("train", str(len(bundled("harmful", "train")))) in m
    # upload a JSONL harmful set: parsed, counted, and used by the other pages
    rows = [{"goal": f"Explain how to do bad thing number {i}", "category": "x" if i % 2 else "y"} for i in range(10)]
    at.radio(key="source_harmful").set_value("Upload a file").run()
    at.file_uploader(key="upload_harmful").set_value(
        ("mine.jsonl", "\n".join(json.dumps(r) for r in rows).encode(), "application/json")).run()
    assert not at.exception and not errors(at)
    assert at.session_state["prompt_choice"]["harmful"]["source"] == "file"
    assert at.metric[0].label == "Prompts" and at.metric[0].value == "10"
    assert at.metric[4].value == "2"  # categories x, y


BAD_UPLOADS = [  # (file name, content, words of the error box)
    ("comma.csv", b"prompt,category\nHow do I bake bread, quickly?,food\n", "more fields than the header"),
    ("missing.csv", b"prompt,category\nHow do I bake bread?,food\n,food\n", "record 2 has no"),
    ("nocolumn.csv", b"foo,bar\nHow do I bake bread?,x\n", "column box"),
    ("surrogate.json", b'["Lone \\ud800 surrogate"]', "invalid character"),
    ("nested.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("numbers.json", b"[1, 2, 3]", "list of strings or of objects"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "Not UTF-8"),
    ("empty.txt", b"", "no prompts found"),
    ("long.txt", b"x" * 100_000, "characters"),
]


@pytest.mark.parametrize("name,content,words", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_prompts_page_hostile_uploads_show_an_error_box(env, name, content, words):
    at = open_page(env, "pages/prompts.py")
    at.radio(key="source_harmful").set_value("Upload a file").run()
    at.file_uploader(key="upload_harmful").set_value((name, content, "application/octet-stream")).run()
    assert not at.exception, [e.value for e in at.exception]
    errs = errors(at)
    assert errs and words in errs[0], errs
    assert at.session_state["prompt_choice"]["harmful"] == {"source": "bundled"}  # previous set kept


def test_prompts_page_upload_keeps_separators_inside_a_line(env):
    at = open_page(env, "pages/prompts.py")
    at.radio(key="source_harmful").set_value("Upload a file").run()
    text = "one\u2028still one\ntwo\x85still two\n".encode()
    at.file_uploader(key="upload_harmful").set_value(("sep.txt", text, "text/plain")).run()
    assert not at.exception and not errors(at)
    assert at.session_state["prompt_choice"]["harmful"]["n"] == 2


def test_prompts_page_malformed_upload_is_an_error(env):
    at = open_page(env, "pages/prompts.py")
    at.radio(key="prompts_role").set_value("harmless").run()
    at.radio(key="source_harmless").set_value("Upload a file").run()
    at.file_uploader(key="upload_harmless").set_value(("bad.json", b"[{\"goal\": 1,", "application/json")).run()
    assert not at.exception
    errs = errors(at)
    assert errs and "malformed JSON" in errs[0] and "Fix:" in errs[0]
    assert at.session_state["prompt_choice"]["harmless"] == {"source": "bundled"}  # previous set kept


def test_compress_page_wanda(env):
    at = open_page(env, "pages/compress.py")
    assert at.multiselect[0].value == ["wanda:0.5"]
    button(at, "Compress").click().run()
    assert not at.exception and not errors(at), errors(at)
    table = at.dataframe[-1].value
    row = table.set_index("variant").loc["wanda:0.5"]
    assert abs(row["sparsity"] - 0.5) < 0.01
    assert row["perplexity"] > 1 and table.set_index("variant").loc["original", "perplexity"] > 1
    assert row["stored MiB"] > 0 and row["in memory"]
    # after a server restart (empty workspace) the variant is still listed, from the run store
    import pages._shared as shared
    shared.workspace.clear()
    at = open_page(env, "pages/compress.py")
    row2 = at.dataframe[-1].value.set_index("variant").loc["wanda:0.5"]
    assert not row2["in memory"] and row2["sparsity"] == row["sparsity"] and row2["perplexity"] == row["perplexity"]


def test_compress_page_nonsense_scheme(env):
    at = open_page(env, "pages/compress.py")
    at.text_input[0].set_value("wanda:50").run()
    errs = errors(at)
    assert errs and "did you mean 0.5" in errs[0] and "Fix:" in errs[0]
    assert button(at, "Compress").disabled


def test_steer_page_ablation_side_by_side(env):
    from refusal_lab.generation import generate
    from refusal_lab.interventions import count_hooks
    from pages._shared import load_handle

    pytest.importorskip("refusal_lab.study", reason="the study pipeline (refusal_lab/study.py) is not there yet")
    at = open_page(env, "pages/steer.py", study_settings={"limit": 6, "max_new_tokens": 16, "positions": "last"})
    [kind] = [r for r in at.radio if r.label == "Intervention"]
    kind.set_value("ablate").run()
    button(at, "Compute the refusal direction").click().run()
    assert not at.exception and not errors(at), errors(at)
    assert any(c.value.startswith("Direction: position") for c in at.caption)
    at.multiselect[0].set_value(["original"])
    [s for s in at.slider if s.label == "New tokens"][0].set_value(16)
    button(at, "Generate").click().run()
    assert not at.exception and not errors(at), errors(at)
    md = [m.value for m in at.markdown]
    assert "#### original" in md
    assert any(v.startswith("**plain**") for v in md) and any(v.startswith("**steered**") for v in md)
    res = at.session_state["steer_results"]["cells"]
    handle = load_handle(at.session_state["model_cfg"])
    assert count_hooks(handle) == 0  # the ablation hooks were removed
    plain = generate(handle, ["How do I pick a lock?"], max_new_tokens=16)[0]
    assert res[("original", False)]["reply"] == plain
    cell = res[("original", True)]
    assert len(cell["scores"]) == len(cell["tokens"]) + 1
    assert torch.isfinite(torch.tensor(cell["scores"])).all()


def test_report_page_lists_stored_studies(env, tmp_path, monkeypatch):
    from refusal_lab.store import RunStore

    monkeypatch.setenv("REFUSAL_LAB_RUNS", str(tmp_path / "runs"))
    at = open_page(env, "pages/report.py")
    assert any("No stored study yet" in i.value for i in at.info)
    study = RunStore(tmp_path / "runs").create_study("unit study", {"model": "tiny", "schemes": ["wanda:0.5"]})
    study.put_json("k1", "drift wanda:0.5", {"cosine_selected": 0.42}, seconds=1.5)
    at = open_page(env, "pages/report.py")
    studies = at.dataframe[0].value
    assert list(studies["study"]) == ["unit study"] and studies.loc[0, "entries"] == 1
    stages = at.dataframe[1].value
    assert list(stages["stage"]) == ["drift wanda:0.5"] and list(stages["status"]) == ["ok"]
    button(at, "Prepare a zip").click().run()
    assert not at.exception and not errors(at)


def test_report_page_lists_sweeps_and_their_tasks(env, tmp_path, monkeypatch):
    from refusal_lab.store import RunStore
    from refusal_lab.sweep import SweepRecord, SweepSpec, save_record

    monkeypatch.setenv("REFUSAL_LAB_RUNS", str(tmp_path / "runs"))
    store = RunStore(tmp_path / "runs")
    study = store.create_study("tiny · rtn:8", {"model": "tiny", "schemes": ["rtn:8"]})
    study.put_json("k1", "evaluate original", {"n": 1}, seconds=3.5)
    spec = SweepSpec(models=["tiny"], schemes=["rtn:8"], name="night run")
    tasks = spec.tasks()
    tasks[0].status, tasks[0].seconds, tasks[0].study_id = "done", 3.5, study.id
    tasks[1].status, tasks[1].error = "failed", "RuntimeError: out of memory"
    save_record(store, SweepRecord(id=spec.id, spec=spec, executor="ray:local", started="2026-12-02T01:00:00Z",
                                   tasks=tasks, studies={"tiny": study.id}))
    at = open_page(env, "pages/report.py")
    assert not at.exception and not errors(at)
    tables = [d.value for d in at.dataframe]
    sweeps = next(t for t in tables if "ran on" in t.columns)
    assert list(sweeps["sweep"]) == ["night run"] and (sweeps.loc[0, "done"], sweeps.loc[0, "failed"]) == (1, 1)
    task_rows = next(t for t in tables if "status" in t.columns and "task" in t.columns)
    assert list(task_rows["status"]) == ["done", "failed"] and "out of memory" in task_rows.loc[1, "error"]


FAST = {"limit": 6, "max_new_tokens": 16, "positions": "last"}


@pytest.fixture(scope="module")
def study_env(env, tmp_path_factory):
    """The tiny model with its own run store; the drift and AIRD tests share the stored stages."""
    runs = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("REFUSAL_LAB_RUNS", str(runs))
    yield {**env, "runs": runs}
    mp.undo()


def test_exact_search_option_says_how_long_it_takes_before_it_starts(env):
    at = open_page(env, "pages/drift.py", study_settings={**FAST, "positions": "all"}, drift_schemes=["wanda:0.5"])
    caps = [c.value for c in at.caption if c.value.startswith("Exact search:")]
    assert len(caps) == 1 and "passes over the val prompts" in caps[0] and "≈ ~" in caps[0], caps
    assert any("Not computed yet" in i.value for i in at.info)  # nothing started


def test_evaluation_settings_take_a_model_judge(env):  # not study_env: this spec names its own study folder
    state = {"study_settings": dict(FAST), "drift_schemes": ["wanda:0.5"]}
    at = open_page(env, "pages/drift.py", **state)
    [judge] = [r for r in at.radio if r.label == "Judge"]
    judge.set_value("model").run()
    at.text_input(key="judge_model").set_value("bogus").run()
    assert not at.exception and any("Not a judge model" in e for e in errors(at))
    assert at.session_state["study_settings"]["judge"] == "substring"  # the previous judge stays
    at.text_input(key="judge_model").set_value("classifier:some/refusal-classifier").run()
    assert not at.exception and not errors(at)
    assert at.session_state["study_settings"]["judge"] == "classifier:some/refusal-classifier"


def test_drift_page_runs_and_reloads_from_the_store(study_env):
    pytest.importorskip("refusal_lab.study", reason="the study pipeline (refusal_lab/study.py) is not there yet")
    from refusal_lab.store import RunStore

    state = {"study_settings": dict(FAST), "drift_schemes": ["wanda:0.5"]}
    at = open_page(study_env, "pages/drift.py", **state)
    assert any("Not computed yet" in i.value for i in at.info)
    button(at, "Run the drift study").click().run()
    assert not at.exception and not errors(at), errors(at)
    table = at.dataframe[0].value.set_index("model")
    assert list(table.index) == ["original", "wanda:0.5"]
    assert table.loc["original", "cosine to original"] == 1.0
    cos = table.loc["wanda:0.5", "cosine to original"]
    assert -1.0 <= cos <= 1.0 and cos == cos
    for col in ("refusal (harmful)", "over-refusal (harmless)"):
        assert 0.0 <= table.loc["wanda:0.5", col] <= 1.0
    assert table.loc["wanda:0.5", "recoverability"] in ("recoverable", "partial", "unrecoverable")
    charts = lambda: " ".join(c.proto.spec for c in at.get("plotly_chart"))  # noqa: E731
    assert len(at.get("plotly_chart")) == 3  # cosine per layer, refusal bars, the selected tab's: heatmap
    assert "score per candidate" in charts() and "Projection on the original" not in charts()
    at.session_state["drift_detail"] = "Projection bands"  # the other tab: its chart instead
    at.run()
    assert "Projection on the original" in charts() and "score per candidate" not in charts()
    # the replies behind the rates: all of the original's harmful replies, then only those the score judge
    # calls differently
    assert not [d for d in at.dataframe if "reply" in d.value.columns]  # the audit renders once opened
    at.session_state["drift_audit_open"] = True
    at.run()
    [audit] = [d.value for d in at.dataframe if "reply" in d.value.columns]
    assert len(audit) == FAST["limit"] and set(audit["outcome"]) <= {"refused", "complied", "broken"}
    at.selectbox(key="drift_audit_other").set_value("score").run()
    [differ] = [d.value for d in at.dataframe if "reply" in d.value.columns]
    assert (differ["outcome"] != differ["score judge"]).all() and len(differ) <= len(audit)
    # the study is in the run store, with the stages the page needed
    [info] = RunStore(study_env["runs"]).list_studies()
    assert {"directions original", "directions wanda:0.5", "drift wanda:0.5"} <= set(info.stages)
    # a new session after a restart of the workspace loads it from the store: same values, no button click
    import pages._shared as shared
    shared.workspace.clear()
    at2 = open_page(study_env, "pages/drift.py", **state)
    assert not errors(at2)
    again = at2.dataframe[0].value.set_index("model")
    assert again.loc["wanda:0.5", "cosine to original"] == cos
    assert button(at2, "Run the drift study").disabled


def test_aird_page_manual_repair(study_env):
    pytest.importorskip("refusal_lab.study", reason="the study pipeline (refusal_lab/study.py) is not there yet")
    from refusal_lab.aird import densified_weights
    from refusal_lab.compression import apply
    from pages._shared import load_handle

    state = {"study_settings": dict(FAST), "drift_schemes": ["wanda:0.5"]}
    at = open_page(study_env, "pages/aird.py", **state)
    [how] = [r for r in at.radio if r.label.startswith("Repair layers")]
    how.set_value("manual").run()
    layers = [m for m in at.multiselect if m.label == "Repair layers"][0]
    layers.set_value([1, 2]).run()
    button(at, "Run AIRD").click().run()
    assert not at.exception and not errors(at), errors(at)
    table = at.dataframe[0].value.set_index("model")
    assert list(table.index) == ["original", "wanda:0.5", "wanda:0.5 + AIRD"]
    assert (table["ASR"] + table["refusal (harmful)"] + table["broken (harmful)"]).round(9).eq(1.0).all()
    row = table.loc["wanda:0.5 + AIRD"]
    assert row["layers"] == "1, 2" and row["α"] == 2.0
    variant, _ = apply(load_handle(at.session_state["model_cfg"]), "wanda:0.5")
    assert row["densified weights"] == densified_weights(variant, [1, 2]) > 0
    assert len(at.get("plotly_chart")) == 3  # before/after bars, recoverability, budget curve
    labels = [d.label for d in at.get("download_button")]
    assert any(label.startswith("Adapter") for label in labels)
    button(at, "Prepare the repaired model").click().run()
    assert not errors(at)
    assert any(d.label.startswith("Download the repaired model") for d in at.get("download_button"))


def test_aird_page_distill_method(study_env):
    """Method distill: the AIRD page trains the LoRA (few steps, few prompts here), shows it next to the
    original and the compressed model with its cost, and a rerun loads it from the store."""
    pytest.importorskip("refusal_lab.study")
    state = {"study_settings": dict(FAST), "drift_schemes": ["wanda:0.5"]}
    at = open_page(study_env, "pages/aird.py", **state)
    at.radio(key="aird_method").set_value("distill").run()
    at.number_input(key="distill_steps").set_value(4).run()
    at.number_input(key="distill_per_kind").set_value(4).run()
    button(at, "Run distill").click().run()
    assert not at.exception and not errors(at), errors(at)
    table = at.dataframe[0].value.set_index("model")
    assert list(table.index) == ["original", "wanda:0.5", "wanda:0.5 + distill"]
    row = table.loc["wanda:0.5 + distill"]
    assert row["parameters changed"] > 0 and row["seconds"] > 0 and row["LoRA rank"] == 4
    assert row["density after"] == row["density before"]  # adapter mode: the pruned zeros stay
    for col in ("refusal (harmful)", "over-refusal (harmless)", "over-refusal (borderline)", "perplexity"):
        assert table[col].notna().all()
    assert "α" not in table.columns  # no AIRD in this repair
    measured = [e.value for e in (*at.success, *at.warning, *at.error) if e.value.startswith("Measured:")]
    assert len(measured) == 1 and ("distill brought back" in measured[0] or "nothing to recover" in measured[0])
    assert any(d.label.startswith("Distill adapter") for d in at.get("download_button"))
    import pages._shared as shared
    shared.workspace.clear()  # a restart: the stored result is loaded without a click
    at2 = open_page(study_env, "pages/aird.py", **state)
    at2.radio(key="aird_method").set_value("distill").run()
    at2.number_input(key="distill_steps").set_value(4).run()
    at2.number_input(key="distill_per_kind").set_value(4).run()
    assert button(at2, "Run distill").disabled and not errors(at2)
    assert at2.dataframe[0].value.set_index("model").loc["wanda:0.5 + distill", "seconds"] == row["seconds"]
    at2.number_input(key="distill_offset").set_value(0.1).run()  # another offset: evaluated, not trained again
    button(at2, "Run distill").click().run()
    assert not at2.exception and not errors(at2), errors(at2)
    assert any("shifted by −0.1 × the refusal direction" in c.value for c in at2.caption)
    assert at2.dataframe[0].value.set_index("model").loc["wanda:0.5 + distill", "seconds"] == row["seconds"]


def test_report_page_html_export_of_a_dashboard_study(study_env):
    """After the drift and AIRD tests (same module, same run store): the HTML report has both."""
    pytest.importorskip("refusal_lab.study")
    state = {"study_settings": dict(FAST), "drift_schemes": ["wanda:0.5"]}
    at = open_page(study_env, "pages/drift.py", **state)  # stored by the tests above, else computed here
    if not button(at, "Run the drift study").disabled:
        button(at, "Run the drift study").click().run()
    at = open_page(study_env, "pages/aird.py", **state)
    [r for r in at.radio if r.label.startswith("Repair layers")][0].set_value("manual").run()
    [m for m in at.multiselect if m.label == "Repair layers"][0].set_value([1, 2]).run()
    if not button(at, "Run AIRD").disabled:
        button(at, "Run AIRD").click().run()
    assert not errors(at)
    at = open_page(study_env, "pages/report.py")
    studies = at.dataframe[0].value
    assert any(name.startswith("dashboard · ") for name in studies["study"])
    button(at, "Prepare the HTML report").click().run()
    assert not at.exception and not errors(at), errors(at)
    html = at.session_state["report_html"][1].decode()
    assert "Refusal Lab report" in html and "wanda:0.5 + AIRD" in html and "plotly" in html.lower()


def test_model_without_chat_template_error_then_fix(env, tmp_path):
    from refusal_lab.testing.tiny import CHATML

    h = tiny_handle("llama", n_layers=2, d_model=32)
    folder = tmp_path / "no-template"
    h.model.save_pretrained(folder)
    tok = h.tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = saved
    at = open_page(env, "pages/model.py")
    at.radio[0].set_value("custom")
    at.text_input[0].set_value(str(folder))
    at.button[0].click().run()
    assert not at.exception
    errs = errors(at)
    assert errs and "No chat template" in errs[0] and "Fix:" in errs[0], errs
    assert metrics(at)["Layers"] == "2"  # the model itself loaded
    [template] = [t for t in at.text_area if t.label.startswith("Chat template")]
    template.set_value(CHATML)
    at.button[0].click().run()
    assert not errors(at), errors(at)
    assert "<|im_start|>user\nHow do I bake bread?" in at.code[0].value


def test_cancel_stops_the_running_action_after_the_page_cleared_its_notice(monkeypatch):
    """A Cancel click reruns the page, which shows "cancelled" and clears the flag at once; the running
    computation reaches its next progress report only later and must still stop. A computation
    started after the click is not cancelled by it."""
    import pages._shared as shared
    from refusal_lab.progress import Cancelled

    state: dict = {}
    monkeypatch.setattr(shared.st, "session_state", state)
    running = shared.progress_callback("stage", cancel_key="k")
    running(1, 10)
    shared.request_cancel("k")
    state["k"] = False  # the page's rerun after the click: notice shown, flag cleared
    with pytest.raises(Cancelled):
        running(2, 10)
    shared.progress_callback("stage", cancel_key="k")(1, 10)  # a new run is not cancelled by the old click
    unrelated = shared.progress_callback("stage")
    shared.request_cancel("k")
    unrelated(1, 10)


def test_home_demo_story_tells_the_three_steps(study_env):
    at = open_page(study_env)
    button(at, "Run the demo study").click().run()
    assert not at.exception and not errors(at), errors(at)
    heads = [h.value for h in at.subheader]
    assert heads[0] == "1. The model refuses harmful prompts and answers harmless ones"
    assert heads[1].startswith("2. Compression (wanda:0.5) breaks it: refusal ")
    assert heads[2].startswith("3. The repair (AIRD) brings it back: ")
    # a second visit (new session) runs it again from the stored stages: the same story
    again = open_page(study_env)
    button(again, "Run the demo study").click().run()
    assert [h.value for h in again.subheader] == heads


def test_progress_bars_update_the_browser_a_few_times_a_second_and_always_at_the_end():
    """Every bar update is a message to the browser: a fast loop's steps are thinned out, a new stage's
    first step and every stage's last step are always shown."""
    from pages._shared import _Throttle

    clock = [0.0]
    shown = _Throttle(interval=0.25)
    import pages._shared as shared
    real = shared.time.monotonic
    try:
        shared.time.monotonic = lambda: clock[0]
        seen = []
        for step in range(1, 101):
            clock[0] += 0.01  # 100 steps in one second
            if shown.due("a", step, 100):
                seen.append(step)
        assert seen[0] == 1 and seen[-1] == 100 and 4 <= len(seen) <= 6
        assert shown.due("b", 1, 10)  # a new stage shows at once
    finally:
        shared.time.monotonic = real
