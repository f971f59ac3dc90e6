"""The study's repair methods on a tiny saved model (issue #23): distill as a cached stage that survives a
SIGKILL, aird+distill trained from the AIRD-repaired model, --method on the command line, and AIRD alone
keeping the cache keys and outputs it had before methods existed."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from refusal_lab.distill import DISTILL_VERSION, DistillConfig
from refusal_lab.study import Study, StudySpec, summary_rows
from refusal_lab.testing.tiny import tiny_model_folder

SCHEME = "magnitude:0.5"
DISTILL = {"steps": 4, "per_kind": 4, "reply_tokens": 6, "batch_size": 8, "warmup": 1}
CLI_DISTILL = [x for k, v in DISTILL.items() for x in ("--distill", f"{k}={v}")]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("repairs") / "tiny"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run store for the module: the original's stages are computed once and reused by every study."""
    return tmp_path_factory.mktemp("runs")


def _spec(folder, **kw):
    base = dict(model=folder, schemes=[SCHEME], limit=4, max_new_tokens=4, aird="auto", aird_alpha=2.0,
                aird_layers=[1, 2], selection_positions=[-1], device="cpu", repair_method="distill", distill=DISTILL)
    base.update(kw)
    return StudySpec(**base)


def _stages(study) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in study.record.manifest["stages"].values():
        out.setdefault(e["stage"], []).append(e)
    return out


def test_distill_stage_is_stored_without_pickle_and_a_second_run_computes_nothing(tiny_folder, runs, monkeypatch):
    seen = []
    study = Study(_spec(tiny_folder), runs, on_progress=lambda s, d, t: seen.append((s, d, t)))
    assert study.planned_stages()[-3:] == ["distill teacher replies", f"distill {SCHEME}", f"evaluate {SCHEME}+distill"]
    res = study.run()
    bars = {s for s, _, _ in seen}  # three progress bars, each paced on its own (a step costs several batches)
    assert {"distill teacher replies", f"distill {SCHEME}: teacher states", f"distill {SCHEME}: training"} <= bars
    assert {(d, t) for s, d, t in seen if s == f"distill {SCHEME}: training"} == {(i, 4) for i in range(5)}
    v = res.variants[SCHEME]
    assert v.repair_method == "distill" and list(v.repairs) == ["distill"] and v.repaired.method == "distill"
    assert v.repaired.repair is None and v.repaired.distill.steps == 4 and v.repaired.distill.rank == 4
    assert v.repaired.parameters_changed == v.repaired.distill.trainable_parameters > 0
    assert v.repaired.seconds > 0 and v.repaired.densified_weights == 0  # adapter: no zero lost
    assert v.aird_verdict.level in ("recovered", "partial", "not recovered", "nothing lost")
    assert [r["model"] for r in summary_rows(res)] == ["original", SCHEME, f"{SCHEME} + distill"]
    stages = _stages(study)
    [lora] = stages[f"distill {SCHEME}"]
    assert lora["kind"] == "tensors" and lora["path"].endswith(".safetensors")
    assert lora["meta"]["config"]["steps"] == 4 and lora["meta"]["version"] == DISTILL_VERSION
    assert stages["distill teacher replies"][0]["kind"] == "json"

    seen.clear()  # a new process: everything loads, no model is loaded
    again = Study(_spec(tiny_folder), runs, on_progress=lambda s, d, t: seen.append(s))
    assert again.run() == res and seen == [] and again._original is None

    # the key names the settings and the code version: another step count retrains on the same replies …
    other = Study(_spec(tiny_folder, distill={**DISTILL, "steps": 5}), runs, on_progress=lambda s, d, t: seen.append(s))
    from refusal_lab.study_repairs import distilled

    assert distilled(other, SCHEME).result.config.steps == 5
    assert f"distill {SCHEME}: training" in seen and "distill teacher replies" not in seen
    # … an offset does not: it never enters training, so trying one reuses the stored LoRA, shifted
    seen.clear()
    shifted = Study(_spec(tiny_folder, distill={**DISTILL, "offset": 0.1}), runs,
                    on_progress=lambda s, d, t: seen.append(s))
    rep, base = distilled(shifted, SCHEME), distilled(again, SCHEME)  # base: the default offset
    direction = shifted.directions("original").direction
    assert not [s for s in seen if "training" in s] and rep.result.config.offset == 0.1
    assert rep.lora.keys() == base.lora.keys() and all(torch.equal(rep.lora[k], base.lora[k]) for k in rep.lora)
    assert torch.allclose(rep.shift, -0.1 * direction)
    assert torch.allclose(base.shift, -DistillConfig().offset * direction)
    assert shifted.evaluate_method(SCHEME, "distill").distill.offset == 0.1  # evaluated with the shift
    assert res.variants[SCHEME].repaired.distill.offset == DistillConfig().offset
    # … and a new DISTILL_VERSION recomputes both parts
    import refusal_lab.distill as distill_module

    monkeypatch.setattr(distill_module, "DISTILL_VERSION", "distill-test")
    seen.clear()
    bumped = Study(_spec(tiny_folder), runs, on_progress=lambda s, d, t: seen.append(s))
    distilled(bumped, SCHEME)
    assert {"distill teacher replies", f"distill {SCHEME}: training"} <= set(seen)


def test_aird_plus_distill_trains_from_the_aird_repaired_model(tiny_folder, runs):
    study = Study(_spec(tiny_folder, repair_method="aird+distill", aird_mode="adapter"), runs)
    res = study.run()
    v = res.variants[SCHEME]
    assert list(v.repairs) == ["aird", "aird+distill"] and v.repaired is v.repairs["aird+distill"]
    both, aird = v.repairs["aird+distill"], v.repairs["aird"]
    assert both.repair.alpha == 2.0 and both.repair.layers == [1, 2] and both.distill is not None
    # AIRD adapter (r̂, α) plus the LoRA: the parameters of both
    assert both.parameters_changed == 64 + 1 + both.distill.trainable_parameters
    assert aird.parameters_changed is None  # AIRD's own evaluation is stored as it always was
    assert [r["model"] for r in summary_rows(res)] == ["original", SCHEME, f"{SCHEME} + AIRD",
                                                       f"{SCHEME} + AIRD + distill"]
    assert (v.aird_verdict.verdict.startswith("AIRD + distill brought back")
            or "nothing to recover" in v.aird_verdict.verdict)
    # trained from another student than distill alone: another adapter
    from refusal_lab.study_repairs import distilled

    plain = distilled(study.with_spec(repair_method="distill"), SCHEME, "distill")
    mixed = distilled(study, SCHEME, "aird+distill")
    assert mixed.key() != plain.key() and mixed.result.targets == plain.result.targets
    page = study.repair_result(SCHEME, budget_layers=2)  # the page's view: costs filled in for AIRD too
    assert page.method == "aird+distill" and page.repairs["aird"].parameters_changed == 65 and page.budget


def test_aird_alone_keeps_its_cache_keys_and_outputs(tiny_folder, runs):
    from refusal_lab.store import cache_key
    from refusal_lab.study import CODE_VERSION, REPAIR_VERSION

    spec = _spec(tiny_folder, repair_method="aird", distill=None)
    assert spec.to_dict() == {k: v for k, v in _spec(tiny_folder, distill=None).to_dict().items()
                              if k != "repair_method"}  # the field is left out: the same study folder
    assert "repair_method" not in spec.to_dict() and "distill" not in spec.to_dict()
    study = Study(spec, runs)
    res = study.run()
    legacy = cache_key(f"aird {SCHEME}", CODE_VERSION, study.original_fingerprint(), SCHEME, "auto", "merged", 2.0,
                       [1, 2], "auto", REPAIR_VERSION, "search=scored", *study.numerics)  # as before methods existed
    assert study.record.has(legacy)
    data = res.to_json()["variants"][SCHEME]
    assert {"repair_method", "repairs"}.isdisjoint(data)
    assert {"method", "distill", "parameters_changed", "seconds"}.isdisjoint(data["repaired"])
    assert data["aird_verdict"]["verdict"].startswith(("AIRD brought back", "Compression cost almost no refusal"))
    assert not any(s.startswith(("distill", "evaluate magnitude:0.5+distill")) for s in _stages(study))


@pytest.mark.parametrize("method", ["aird", "distill", "aird+distill"])
def test_aird_command_runs_each_method(method, tiny_folder, runs, tmp_path, capsys):
    from refusal_lab.cli import main

    out = tmp_path / "out.json"
    extra = (CLI_DISTILL if method != "aird" else []) + (["--methods", "none,aird-merged"] if "aird" in method else [])
    assert main(["aird", "--model", tiny_folder, "--scheme", SCHEME, "--layers", "1,2", "--alpha", "2", "--limit", "4",
                 "--max-new-tokens", "4", "--no-budget", "--device", "cpu",
                 "--runs", str(runs), "--json", str(out), "--method", method, *extra,
                 "--save", str(tmp_path / "saved")]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "diagnostic (measured):" in text and res["aird_verdict"]["level"]
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    if method == "aird":
        [header] = [line for line in text.splitlines() if line.startswith("method ")]
        assert "method" not in res and "seconds" not in header  # the table as before
        assert saved == {"aird_adapter.json", "aird_adapter.safetensors"}
        return
    assert res["method"] == method and res["repaired"]["method"] == method and res["distill"]["config"]["steps"] == 4
    label = {"distill": "distill", "aird+distill": "AIRD + distill"}[method]
    [row] = [line for line in text.splitlines() if line.startswith(label + "  ")]  # a padded table cell
    assert str(res["repaired"]["parameters_changed"]) in row
    assert res["aird_verdict"]["verdict"].startswith((f"{label} brought back", "Compression cost almost no refusal"))
    assert {"distill_adapter.json", "distill_adapter.safetensors"} <= saved
    assert ("aird_adapter.json" in saved) == (method == "aird+distill")


@pytest.mark.parametrize("args, message", [
    (["aird", "--method", "bogus"], "unknown repair method 'bogus'"),
    (["study", "--method", "distil"], "unknown repair method 'distil'"),
    (["aird", "--method", "distill", "--distill", "stepz=3"], "unknown distill setting(s) stepz"),
    (["aird", "--method", "distill", "--distill", "steps=0"], "steps must be ≥ 1"),
    (["aird", "--method", "distill", "--distill", "steps"], "expected KEY=VALUE"),
    (["aird", "--distill", "steps=3"], "distill settings need a method that trains one"),
    (["aird", "--method", "distill", "--methods", "none"], "--methods compares AIRD with other repairs"),
])
def test_bad_method_input_is_one_error_line(args, message, tiny_folder, tmp_path, capsys):
    from refusal_lab.cli import main

    command, rest = args[0], args[1:]
    try:
        code = main([command, "--model", tiny_folder, "--scheme", SCHEME, "--device", "cpu",
                     "--runs", str(tmp_path / "runs"), *rest])
    except SystemExit as e:  # argparse's own one-line errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_a_killed_distill_run_resumes_with_only_what_is_missing(tiny_folder, tmp_path):
    """SIGKILL a study process once the teacher replies are stored (training under way); the resumed study
    loads every stored stage and computes only the training and its evaluation."""
    runs = tmp_path / "runs"
    spec = _spec(tiny_folder, distill={**DISTILL, "steps": 30})
    script = ("import sys; from refusal_lab.study import Study, StudySpec; "
              "Study(StudySpec.from_dict(__import__('json').loads(sys.argv[1])), sys.argv[2]).run()")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(spec.to_dict()), str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        stages = set()
        for manifest in runs.glob("*/manifest.json"):
            try:
                stages |= {e["stage"] for e in json.loads(manifest.read_text())["stages"].values()}
            except (OSError, ValueError):
                continue
        if "distill teacher replies" in stages:
            proc.send_signal(signal.SIGKILL)
            killed = stages
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed is not None, f"the run ended before the teacher replies were stored: {proc.stderr.read()[-2000:]}"
    assert f"distill {SCHEME}" not in killed, "training had finished before the kill"
    resumed = Study(spec, runs)
    res = resumed.run()
    assert set(resumed.timings) == {f"distill {SCHEME}", f"evaluate {SCHEME}+distill"}  # only what was missing
    assert res.variants[SCHEME].repaired.distill.steps == 30  # trained in full (seeded: test_distill.py)
    assert Study(spec, runs).run() == res  # and stored


def test_a_stage_copied_from_another_study_reports_the_computing_studys_seconds(tiny_folder, runs):
    """A study that reuses another's AIRD repair stores it at 0 s (ETAs must not count it), but the repair's
    cost it reports is what computing it took."""
    from refusal_lab.study_repairs import aird_seconds

    first = Study(_spec(tiny_folder, repair_method="aird", distill=None, name="computes"), runs)
    first.repair(SCHEME)
    second = Study(_spec(tiny_folder, repair_method="aird", distill=None, name="copies"), runs)
    assert second.id != first.id
    second.repair(SCHEME)
    [copied] = _stages(second)[f"aird {SCHEME}"]
    assert copied["seconds"] == 0.0
    assert aird_seconds(second, SCHEME) == aird_seconds(first, SCHEME) > 0
