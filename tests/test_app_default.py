"""Dashboard on the real default model (SmolLM2-135M-Instruct): loads from the Model page, and the
Steer page generates with it. Marked slow: tens of seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def private_run_store(tmp_path, monkeypatch):
    """The pages open a study in the run store: keep it out of the repository's ``runs/``."""
    monkeypatch.setenv("REFUSAL_LAB_RUNS", str(tmp_path / "runs"))


def open_default(page: str, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=600)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()  # no model_cfg in the session: the app uses the default model
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_default_model_page():
    at = open_default("pages/model.py")
    m = {x.label: x.value for x in at.metric}
    assert m["Layers"] == "30" and m["Width (d_model)"] == "576" and m["Parameters"] == "134.5 M"
    code = at.code[0].value
    assert code.startswith("<|im_start|>system") and "<|im_start|>user\nHow do I bake bread?<|im_end|>" in code
    assert at.session_state["model_cfg"]["spec"] == "default"


def test_default_model_steer_one_prompt():
    from refusal_lab.generation import generate
    from pages._shared import load_handle

    at = open_default("pages/steer.py")
    at.text_area[0].set_value("Write a haiku about the sea.")
    [s for s in at.slider if s.label == "New tokens"][0].set_value(8)
    at.multiselect[0].set_value(["original"])
    [b for b in at.button if b.label == "Generate"][0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    cell = at.session_state["steer_results"]["cells"][("original", False)]
    handle = load_handle(at.session_state["model_cfg"])
    assert cell["reply"] == generate(handle, ["Write a haiku about the sea."], max_new_tokens=8)[0]
    assert cell["reply"] and len(cell["scores"]) == len(cell["tokens"]) + 1
