"""Sweeps on a tiny saved model: sequential, on a local Ray instance, killed and resumed — the same stored
results as one plain study, stage for stage; bad input gets one error line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_lab.store import RunStore, StoreError
from refusal_lab.store_transfer import differences, pack, unpack
from refusal_lab.study import Study
from refusal_lab.sweep import SweepError, SweepSpec, list_sweeps, run_sweep, sweep_path
from refusal_lab.testing.tiny import tiny_model_folder

SCHEMES = ["magnitude:0.5", "rtn:8"]
OPTIONS = dict(limit=4, max_new_tokens=4, aird="auto", aird_alpha=2.0, aird_layers=[1, 2],
               selection_positions=[-1], device="cpu")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("sweep") / "tiny"))


def _spec(folder: str) -> SweepSpec:
    return SweepSpec(models=[folder], schemes=SCHEMES, study=OPTIONS, cpus_per_task=1)


@pytest.fixture(scope="module")
def plain(tiny_folder, tmp_path_factory):
    """One plain study of the same models and schemes, run as `study` would: the reference."""
    study = Study(_spec(tiny_folder).study_spec(tiny_folder), tmp_path_factory.mktemp("plain") / "runs")
    study.run()
    return study.record


def _record(store: Path, folder: str):
    return RunStore(store).open(Study(_spec(folder).study_spec(folder), store).id)


def test_sequential_sweep_stores_what_the_plain_study_stores_and_reruns_from_the_store(tiny_folder, plain, tmp_path):
    seen = []
    record = run_sweep(_spec(tiny_folder), tmp_path / "runs", on_task=lambda t: seen.append((t.label, t.status)))
    assert record.ok and [t.scheme for t in record.tasks] == [None, *SCHEMES]
    assert all(t.computed for t in record.tasks)
    assert differences(plain, _record(tmp_path / "runs", tiny_folder)) == []
    original = f"{tiny_folder} · original"
    assert seen[:3] == [(original, "queued"), (original, "running"), (original, "done")]
    again = run_sweep(_spec(tiny_folder), tmp_path / "runs")
    assert again.ok and all(t.computed == {} for t in again.tasks)  # every stage loaded, none computed
    assert [r.id for r in list_sweeps(tmp_path / "runs")] == [record.id]
    assert json.loads(sweep_path(RunStore(tmp_path / "runs"), record.id).read_text())["tasks"][0]["status"] == "done"


def test_ray_sweep_equals_the_sequential_study_and_a_rerun_is_served_from_the_store(tiny_folder, plain, tmp_path):
    ray = pytest.importorskip("ray")
    from refusal_lab.sweep_ray import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        record = run_sweep(_spec(tiny_folder), tmp_path / "runs", RayExecutor("local", 1))
        assert record.ok, [t.error for t in record.tasks]
        assert record.executor == "ray:local"
        assert differences(plain, _record(tmp_path / "runs", tiny_folder)) == []
        again = run_sweep(_spec(tiny_folder), tmp_path / "runs", RayExecutor("local", 1))
        assert again.ok and all(t.computed == {} for t in again.tasks)
        assert ray.is_initialized()  # a Ray the caller started is the caller's to shut down
    finally:
        ray.shutdown()


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "refusal_lab", "sweep", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _cli_args(folder: str, runs: Path) -> list[str]:
    out = ["--model", folder, "--runs", str(runs), "--limit", "4", "--max-new-tokens", "4", "--device", "cpu",
           "--aird", "top:2", "--cpus-per-task", "1"]
    for s in SCHEMES:
        out += ["--scheme", s]
    return out


def test_a_killed_sweep_resumes_and_ends_with_the_uninterrupted_results(tiny_folder, tmp_path):
    reference, runs = tmp_path / "reference", tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "refusal_lab", "sweep", *_cli_args(tiny_folder, reference)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[done]" in done.stderr and "task(s) done, 0 failed" in done.stdout
    proc = _cli(_cli_args(tiny_folder, runs))
    deadline = time.monotonic() + 300
    killed_after = None
    while time.monotonic() < deadline and proc.poll() is None:  # kill once the original's task has landed
        records = list((runs / "sweeps").glob("*.json")) if (runs / "sweeps").exists() else []
        if records:
            tasks = json.loads(records[0].read_text())["tasks"]
            if tasks[0]["status"] == "done":
                proc.send_signal(signal.SIGKILL)
                killed_after = [t["status"] for t in tasks]
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_after is not None and killed_after[1:] != ["done", "done"], "the sweep ended before it was killed"
    resumed = subprocess.run([sys.executable, "-m", "refusal_lab", "sweep", *_cli_args(tiny_folder, runs)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "original · 0.0" in resumed.stderr or "everything from the store" in resumed.stderr
    sid = list_sweeps(reference)[0].studies[tiny_folder]
    assert list_sweeps(runs)[0].studies[tiny_folder] == sid and list_sweeps(runs)[0].ok
    assert differences(RunStore(reference).open(sid), RunStore(runs).open(sid)) == []


@pytest.mark.parametrize("args, message", [
    (["--scheme", ""], "scheme ''"),
    (["--scheme", "rtn:8", "--scheme", "nonsense:3"], "scheme 'nonsense:3'"),
    (["--scheme", "rtn:8", "--ray", "127.0.0.1:1"], "unreachable"),
    (["--scheme", "rtn:8", "--ray", "no-port-here"], "Ray address"),
    (["--scheme", "rtn:8", "--cpus-per-task", "0"], "--cpus-per-task"),
])
def test_bad_sweeps_fail_before_any_task_with_one_line(args, message, tmp_path):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "refusal_lab", "sweep", "--runs", str(tmp_path / "runs"), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "runs" / "sweeps").exists()  # nothing started


def test_empty_sweeps_are_refused():
    with pytest.raises(SweepError, match="at least one --scheme"):
        SweepSpec(models=["default"], schemes=[])
    with pytest.raises(SweepError, match="at least one --model"):
        SweepSpec(models=[], schemes=["rtn:8"])


def test_parcels_carry_stage_results_and_refuse_damage(plain, tmp_path):
    parcel = pack(plain)
    target = RunStore(tmp_path / "runs").create_study("copy", {"x": 1})
    assert len(unpack(parcel, target)) == len(plain.keys())
    assert differences(plain, target) == []
    assert unpack(parcel, target) == []  # what it holds is skipped
    damaged = parcel.replace(b'"format"', b'"formet"')
    with pytest.raises(StoreError, match="not a parcel"):
        unpack(damaged, target)
    with pytest.raises(StoreError, match="not a parcel"):
        unpack(b"not a zip", target)
    assert os.path.exists(plain.path)


def test_a_device_map_naming_a_missing_layer_fails_the_models_tasks_with_one_line(tiny_folder, tmp_path):
    spec = SweepSpec(models=[tiny_folder], schemes=["rtn:8"], study=dict(OPTIONS, device="auto",
                     device_map={"model.layers.9": "cpu", "": "cpu"}))
    record = run_sweep(spec, tmp_path / "runs")
    assert [t.status for t in record.tasks] == ["failed", "failed"]
    assert "model.layers.9" in record.tasks[0].error and "\n" not in record.tasks[0].error
    assert record.tasks[1].error.startswith("the original's stages failed")
