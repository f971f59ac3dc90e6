"""Run store: round-trips, crash safety (simulated and real SIGKILL), corruption, concurrency."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import refusal_lab.store as store_mod
import refusal_lab.store_files as store_files_mod
import refusal_lab.study_record as study_record_mod
from refusal_lab.store import RunStore, StoreError, StoreWarning, StudyRecord, cache_key
from refusal_lab.store_files import ENTRY, sealed

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"model": "tiny", "schemes": ["wanda:0.5", "bnb-nf4"], "limit": 10}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "runs")


@pytest.fixture
def study(store: RunStore) -> StudyRecord:
    return store.create_study("Test study", SPEC)


def visible_objects(st: StudyRecord) -> list[str]:
    """The objects (not temp files, not their entry records)."""
    return sorted(p.name for p in st.objects.iterdir() if not p.name.startswith(".") and not p.name.endswith(ENTRY))


def all_objects(st: StudyRecord) -> list[str]:
    return sorted(p.name for p in st.objects.iterdir() if not p.name.endswith(ENTRY))


def referenced_objects(st: StudyRecord) -> list[str]:
    return sorted(e["path"].split("/")[1] for e in st.manifest["stages"].values())


def make_old(path: Path) -> None:
    """Backdate a file so the store's stat-based validation cache may trust it."""
    t = time.time() - 3600
    os.utime(path, (t, t))


# ----------------------------------------------------------------------------- basics


def test_cache_key_is_stable_and_order_independent() -> None:
    a = cache_key("directions", {"b": 1, "a": [1, 2.5, None]}, "v1")
    assert a == cache_key("directions", {"a": [1, 2.5, None], "b": 1}, "v1")
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    assert a != cache_key("directions", {"b": 2, "a": [1, 2.5, None]}, "v1")
    assert a != cache_key("directions", {"b": 1, "a": [1, 2.5, None]}, "v2")
    assert cache_key((1, 2)) == cache_key([1, 2])
    with pytest.raises(TypeError, match="JSON"):
        cache_key({1, 2})


def test_create_study_is_idempotent(store: RunStore) -> None:
    a = store.create_study("Qwen 0.5B / NF4 study!", SPEC)
    assert a.id.startswith("qwen-0-5b-nf4-study-")
    a.put_json("k", "stage", {"x": 1})
    b = store.create_study("Qwen 0.5B / NF4 study!", dict(reversed(list(SPEC.items()))))
    assert b.path == a.path and b.has("k")
    assert b.spec == SPEC and b.name == "Qwen 0.5B / NF4 study!"
    c = store.create_study("Qwen 0.5B / NF4 study!", {**SPEC, "limit": 11})
    assert c.path != a.path and c.keys() == []
    m = b.manifest
    assert m["spec"] == SPEC and m["created"] <= m["updated"]


def test_tensor_round_trip(study: StudyRecord) -> None:
    base = torch.randn(6, 8)
    tensors = {
        "dirs": base,
        "view": base.t()[1:4],  # non-contiguous view sharing storage with "dirs"
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "ints": torch.arange(10, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
    }
    study.put_tensors("t", "directions", tensors, {"layers": 6}, seconds=1.25)
    assert study.has("t")
    back = study.get_tensors("t")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)
    e = study.entry("t")
    assert e is not None
    assert e["stage"] == "directions" and e["kind"] == "tensors" and e["key"] == "t"
    assert e["meta"] == {"layers": 6} and e["seconds"] == 1.25 and e["done_at"]
    assert e["files"][0]["path"].endswith(".safetensors") and len(e["files"][0]["sha256"]) == 64
    assert study.get_meta("t") == {"layers": 6}


def test_json_table_folder_round_trip(study: StudyRecord, tmp_path: Path) -> None:
    obj = {"rates": [0.1, 0.25], "nested": {"ü": "ok"}, "nan": float("nan"), "n": None}
    study.put_json("j", "evaluate", obj)
    got = study.get_json("j")
    assert got["rates"] == [0.1, 0.25] and got["nested"] == {"ü": "ok"} and got["n"] is None
    assert got["nan"] != got["nan"]  # NaN survives

    df = pd.DataFrame(
        {"layer": [0, 1, 2], "cos": [0.99, 0.5, -0.1], "scheme": ["a", "b", "c"]},
        index=pd.Index([10, 20, 30], name="row"),
    )
    study.put_table("tab", "drift", df)
    pd.testing.assert_frame_equal(study.get_table("tab"), df)

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"hidden": 8}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    (src / "empty.txt").write_bytes(b"")
    study.put_folder("m", "compress", src)
    dst = study.get_path("m")
    assert dst.is_dir() and dst != src
    for rel in ["config.json", "sub/weights.bin", "empty.txt"]:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert len(study.entry("m")["files"]) == 3
    assert study.get_path("j").read_bytes()  # single-file entries give the file
    for key in ["j", "tab", "m"]:
        assert study.has(key)

    with pytest.raises(StoreError, match="holds json, not tensors"):
        study.get_tensors("j")
    with pytest.raises(StoreError, match="no cached entry"):
        study.get_json("nope")
    assert not study.has("nope")
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        study.put_json("bad", "s", {"x": object()})
    assert not study.has("bad") and len(visible_objects(study)) == 3


def test_overwrite_and_invalidate_remove_old_files(study: StudyRecord) -> None:
    study.put_json("k", "s", 1)
    first = visible_objects(study)
    study.put_json("k", "s", 2)
    assert study.get_json("k") == 2
    assert len(visible_objects(study)) == 1 and visible_objects(study) != first
    assert study.invalidate("k") is True
    assert not study.has("k") and visible_objects(study) == []
    assert study.invalidate("k") is False


# ----------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize("fail_at", [1, 2], ids=["object-rename", "manifest-rename"])
def test_simulated_crash_between_write_and_rename(
    store: RunStore, study: StudyRecord, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """os.replace fails after the temp file is fully written: nothing half-done is visible."""
    study.put_tensors("keep", "s", {"w": torch.ones(4)})
    study.put_json("over", "s", {"v": "old"})
    manifest_before = (study.path / "manifest.json").read_bytes()
    objects_before = all_objects(study)

    real_replace = os.replace
    calls = {"n": 0, "tmp_seen": []}

    def flaky_replace(src, dst):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == fail_at:
            assert Path(src).exists() and Path(src).stat().st_size > 0  # temp written
            calls["tmp_seen"].append(Path(src).name)
            raise OSError("simulated crash before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated crash"):
        study.put_tensors("new", "s", {"w": torch.randn(16, 16)})  # a new key
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated crash"):
        study.put_json("over", "s", {"v": "new"})  # overwriting an existing key
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls["tmp_seen"]) == 2
    assert calls["tmp_seen"] and all(n.startswith(".tmp-") for n in calls["tmp_seen"])

    # the store still loads; interrupted entries are absent; nothing stray is left
    assert (study.path / "manifest.json").read_bytes() == manifest_before
    assert all_objects(study) == objects_before
    assert not [p for p in study.path.iterdir() if p.name.startswith(".tmp-")]
    reopened = RunStore(store.root).open(study.id)
    assert not reopened.has("new")
    assert reopened.get_json("over") == {"v": "old"}
    assert torch.equal(reopened.get_tensors("keep")["w"], torch.ones(4))
    # and the next put succeeds
    reopened.put_tensors("new", "s", {"w": torch.zeros(2)})
    assert torch.equal(reopened.get_tensors("new")["w"], torch.zeros(2))


WRITER = textwrap.dedent(
    """
    # Imports torch/pandas once, then forks one writer per "run <start>" line on stdin, so
    # each killed run costs no import time. A writer loops until it is SIGKILLed.
    import os, sys, tempfile, traceback
    import pandas as pd, torch
    from refusal_lab.store import RunStore

    def write_forever(i):
        study = RunStore(sys.argv[2]).create_study("crash", {"x": 1})
        print("started", os.getpid(), flush=True)
        while True:  # keys are reused so overwrites are exercised too
            key, kind = f"k{i % 40}", i % 4
            if kind == 3:  # a folder of two files, e.g. a saved model
                with tempfile.TemporaryDirectory() as d:
                    open(os.path.join(d, "a.json"), "w").write(str(i))
                    open(os.path.join(d, "b.bin"), "wb").write(bytes([i % 256]) * 4096)
                    study.put_folder(key, "folder", d, {"i": i})
            elif kind == 0:
                study.put_tensors(key, "tensors", {"w": torch.full((64, 64), float(i))}, {"i": i})
            elif kind == 1:
                study.put_json(key, "json", {"i": i, "pad": "x" * 2000}, {"i": i})
            else:
                study.put_table(key, "table", pd.DataFrame({"i": [i] * 200}), {"i": i})
            i += 1

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            if os.fork() == 0:
                try:
                    write_forever(int(cmd[1]))
                except BaseException:
                    traceback.print_exc()
                os._exit(1)
        elif cmd[0] == "reap":
            _, status = os.waitpid(int(cmd[1]), 0)
            print("signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)
    """
)


def check_entry(st: StudyRecord, key: str) -> None:
    """Every listed key reads back intact and matches the value its manifest meta records."""
    assert st.has(key), st.problem(key)
    e = st.entry(key)
    assert e is not None
    i = e["meta"]["i"]
    assert key == f"k{i % 40}"
    if e["kind"] == "tensors":
        w = st.get_tensors(key)["w"]
        assert w.shape == (64, 64) and bool((w == float(i)).all())
    elif e["kind"] == "json":
        assert st.get_json(key) == {"i": i, "pad": "x" * 2000}
    elif e["kind"] == "folder":
        folder = st.get_path(key)
        assert (folder / "a.json").read_text() == str(i) and (folder / "b.bin").read_bytes() == bytes([i % 256]) * 4096
    else:
        df = st.get_table(key)
        assert len(df) == 200 and (df["i"] == i).all()


def test_sigkill_at_random_moments_leaves_a_loadable_store(store: RunStore) -> None:
    """Writers killed mid-loop (a run, then reruns on the same store) never break the store."""
    rng = random.Random()
    start, written = 0, set()
    server = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(ROOT), str(store.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None

    def ask(cmd: str) -> list[str]:
        server.stdin.write(cmd + "\n")
        server.stdin.flush()
        return server.stdout.readline().split()

    writer_pid = None
    try:
        assert server.stdout.readline().strip() == "ready"
        for _ in range(3):
            reply = ask(f"run {start}")
            assert reply[:1] == ["started"], reply
            writer_pid = int(reply[1])
            time.sleep(rng.uniform(0.15, 0.5))
            os.kill(writer_pid, signal.SIGKILL)  # a real SIGKILL at a random moment
            assert ask(f"reap {writer_pid}") == ["signal", str(int(signal.SIGKILL))]
            writer_pid = None

            study = RunStore(store.root).open(RunStore.study_id("crash", {"x": 1}))
            keys = study.keys()
            assert keys, "the writer should have committed something before being killed"
            for key in keys:
                check_entry(study, key)
            # gc on open removed the killed writer's temp files and unreferenced objects
            assert all_objects(study) == referenced_objects(study)
            written |= {study.entry(k)["meta"]["i"] for k in keys}
            start += 1000 + rng.randrange(40)
    finally:
        if writer_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer_pid, signal.SIGKILL)
        server.kill()
        server.wait()
    assert {i // 1000 for i in written} >= {2}  # the last rerun committed entries too


# ----------------------------------------------------------------------------- corruption


def flip_bytes(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    for j in range(4):
        data[offset + j] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_or_missing_files_are_detected(study: StudyRecord, tmp_path: Path) -> None:
    study.put_tensors("t", "directions", {"w": torch.randn(32, 32)})
    study.put_json("j", "evaluate", {"a": 1})
    study.put_table("p", "drift", pd.DataFrame({"x": range(100)}))
    src = tmp_path / "model"
    src.mkdir()
    (src / "w.bin").write_bytes(b"\x00" * 256)
    study.put_folder("f", "compress", src)
    for key in ["t", "j", "p", "f"]:
        assert study.has(key)
        make_old(study.get_path(key) if key != "f" else study.get_path(key) / "w.bin")
        assert study.has(key)  # now cached by stat signature; corruption must still show

    def path_of(key: str) -> Path:
        return study.path / study.entry(key)["files"][0]["path"]

    flip_bytes(path_of("t"))  # same size, different bytes
    with open(path_of("p"), "r+b") as f:
        f.truncate(40)
    path_of("j").unlink()
    (path_of("f")).write_bytes(b"\x01" * 256)

    for key in ["t", "j", "p", "f"]:
        assert not study.has(key)
    with pytest.raises(StoreError, match=r"key 't' \(stage 'directions'\).*corrupted \(sha256"):
        study.get_tensors("t")
    with pytest.raises(StoreError, match=r"key 'p'.*corrupted.*recompute"):
        study.get_table("p")
    with pytest.raises(StoreError, match=r"key 'j'.*missing"):
        study.get_json("j")
    with pytest.raises(StoreError, match=r"key 'f'.*w.bin is corrupted"):
        study.get_path("f")
    assert "corrupted" in (study.problem("t") or "")

    # listing and reopening still work, and recomputing (putting again) repairs each key
    store = RunStore(study.path.parent)
    assert [i.id for i in store.list_studies()] == [study.id]
    again = store.open(study.id)
    again.put_tensors("t", "directions", {"w": torch.ones(2)})
    again.put_json("j", "evaluate", {"a": 2})
    assert again.has("t") and again.get_json("j") == {"a": 2}


def test_valid_checksum_but_unparsable_file_fails_validation(study: StudyRecord) -> None:
    """has() parses files by format, not only by checksum."""
    import hashlib

    study.put_tensors("t", "s", {"w": torch.zeros(3)})
    e = study.entry("t")
    path = study.path / e["files"][0]["path"]
    garbage = b"not a safetensors header at all"
    path.write_bytes(garbage)
    sha = hashlib.sha256(garbage).hexdigest()
    manifest = json.loads((study.path / "manifest.json").read_text())
    manifest["stages"]["t"]["files"][0]["sha256"] = sha
    manifest["stages"]["t"] = sealed(manifest["stages"]["t"])  # a consistent entry, only its file unparsable
    (study.path / "manifest.json").write_text(json.dumps(manifest))
    assert not study.has("t")
    assert "not a valid safetensors file" in (study.problem("t") or "")
    with pytest.raises(StoreError, match="invalid safetensors"):
        study.get_tensors("t")


def test_malformed_manifest_entries_are_rejected(study: StudyRecord) -> None:
    study.put_json("j", "s", 1)
    manifest = json.loads((study.path / "manifest.json").read_text())
    manifest["stages"]["evil"] = {**manifest["stages"]["j"], "key": "evil", "path": "../../x"}
    manifest["stages"]["evil"]["files"] = [{"path": "objects/../../../etc/passwd", "sha256": "0"}]
    manifest["stages"]["evil"] = sealed(manifest["stages"]["evil"])  # sealed: the path check is what refuses it
    manifest["stages"]["junk"] = "not a dict"
    (study.path / "manifest.json").write_text(json.dumps(manifest))
    assert study.has("j")
    assert not study.has("evil") and not study.has("junk")
    with pytest.raises(StoreError, match="invalid path"):
        study.get_json("evil")
    with pytest.raises(StoreError, match="malformed"):
        study.get_json("junk")


@pytest.mark.parametrize("content", [b"{ truncated", b"\xff\xfe\x00garbage", b"[]", None])
def test_corrupt_or_missing_manifest_is_rebuilt_from_the_objects_records(
    store: RunStore, study: StudyRecord, content: bytes | None
) -> None:
    study.put_json("j", "s", {"a": 1})
    manifest = study.path / "manifest.json"
    if content is None:
        manifest.unlink()
    else:
        manifest.write_bytes(content)

    infos = store.list_studies()  # listing never raises
    assert [i.id for i in infos] == [study.id] and infos[0].problem
    with pytest.warns(StoreWarning, match="rebuilt the manifest from the objects' entry records: 1 cached"):
        reopened = RunStore(store.root).open(study.id)
    # nothing is lost to a damaged index: the stage is back, read from its checksummed object
    assert reopened.keys() == ["j"] and reopened.has("j") and reopened.get_json("j") == {"a": 1}
    assert reopened.spec == SPEC and reopened.name == "Test study"  # restored from spec.json
    aside = list(study.path.glob("manifest.json.corrupt-*"))
    assert len(aside) == (0 if content is None else 1)
    if content is not None:
        assert aside[0].read_bytes() == content
    assert list(json.loads(manifest.read_text())["stages"]) == ["j"]
    assert len(visible_objects(reopened)) == 1 and not (study.path / "orphans").exists()
    reopened.put_json("j", "s", {"a": 2})
    assert reopened.get_json("j") == {"a": 2}
    assert store.list_studies()[0].problem is None


def test_gc_keeps_live_temp_files_only(study: StudyRecord) -> None:
    study.put_json("j", "s", 1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    (study.objects / f".tmp-{dead_pid}-abcd-x.json").write_bytes(b"partial")
    (study.objects / f".tmp-{os.getpid()}-abcd-y.json").write_bytes(b"in flight")
    (study.objects / "0123456789abcdef-deadbeef.json").write_bytes(b"orphan")
    (study.path / f".tmp-{dead_pid}-abcd-manifest.json").write_bytes(b"{")
    assert study.gc() == 3
    assert all_objects(study) == sorted(
        [f".tmp-{os.getpid()}-abcd-y.json", *referenced_objects(study)]
    )
    assert study.get_json("j") == 1


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_threads_lose_no_entries(store: RunStore, study: StudyRecord) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            st = study if t % 2 else store.open(study.id)  # shared and separate StudyRecord objects
            for n in range(12):
                st.put_json(f"t{t}-{n}", f"stage{t}", {"t": t, "n": n})
                assert st.has(f"t{t}-{n}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    fresh = RunStore(store.root).open(study.id)
    assert len(fresh.keys()) == 8 * 12
    for t in range(8):
        for n in range(12):
            assert fresh.get_json(f"t{t}-{n}") == {"t": t, "n": n}
    assert all_objects(fresh) == referenced_objects(fresh)


PROC_WRITER = textwrap.dedent(
    """
    import sys, time
    from refusal_lab.store import RunStore
    study = RunStore(sys.argv[2]).open(sys.argv[3])
    tag, start_at = sys.argv[4], float(sys.argv[5])
    time.sleep(max(0.0, start_at - time.time()))  # both processes start together
    for n in range(40):
        study.put_json(f"{tag}-{n}", tag, {"tag": tag, "n": n})
    """
)


def test_two_processes_lose_no_entries(store: RunStore, study: StudyRecord) -> None:
    start_at = time.time() + 0.4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROC_WRITER, str(ROOT), str(store.root), study.id, tag,
             str(start_at)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    fresh = RunStore(store.root).open(study.id)
    assert sorted(fresh.keys()) == sorted(f"{t}-{n}" for t in "ab" for n in range(40))
    for t in "ab":
        for n in range(40):
            assert fresh.get_json(f"{t}-{n}") == {"tag": t, "n": n}
    assert all_objects(fresh) == referenced_objects(fresh)


# ----------------------------------------------------------------------------- store level


def test_list_delete_export(store: RunStore, tmp_path: Path) -> None:
    a = store.create_study("alpha", {"n": 1})
    a.put_tensors("t", "directions", {"w": torch.randn(5)})
    a.put_json("j1", "evaluate", [1])
    a.put_json("j2", "evaluate", [2])
    b = store.create_study("beta", {"n": 2})
    (store.root / "not-a-study").mkdir()  # ignored by listing

    infos = {i.id: i for i in store.list_studies()}
    assert set(infos) == {a.id, b.id}
    ia = infos[a.id]
    assert ia.name == "alpha" and ia.stages == {"directions": 1, "evaluate": 2}
    assert ia.entries == 3 and ia.size_bytes > 0 and ia.problem is None
    assert ia.created <= ia.updated and ia.spec == {"n": 1}
    assert infos[b.id].entries == 0

    out = store.export_zip(a.id, tmp_path)
    assert out == tmp_path / f"{a.id}.zip"
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read(f"{a.id}/manifest.json"))
        assert f"{a.id}/spec.json" in names
        assert set(manifest["stages"]) == {"t", "j1", "j2"}
        for e in manifest["stages"].values():
            for f in e["files"]:
                assert zf.read(f"{a.id}/{f['path']}") == (a.path / f["path"]).read_bytes()
        assert not any("/." in n for n in names)  # no lock or temp files
    named = store.export_zip(a.id, tmp_path / "sub" / "export.zip")
    assert named.name == "export.zip" and zipfile.is_zipfile(named)

    store.delete(b.id)
    assert [i.id for i in store.list_studies()] == [a.id]
    assert not b.path.exists()
    with pytest.raises(StoreError, match="no study"):
        store.open(b.id)
    for bad in ["../x", ".lock", "", "a/b"]:
        with pytest.raises(StoreError):
            store.open(bad)
    with pytest.raises(StoreError):
        store.delete("missing")


def test_module_never_uses_pickle() -> None:
    for module in (store_mod, study_record_mod, store_files_mod):
        source = Path(module.__file__).read_text()
        assert "pickle" not in source
        assert "torch.load" not in source
        assert "torch.save" not in source


def test_import_is_light() -> None:
    """Listing studies (CLI, dashboard) must not pay for importing torch or pandas."""
    code = "import sys; import refusal_lab.store; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def _fill(study: StudyRecord, tmp: Path) -> dict:
    """One stored artifact of each kind; what each must read back as."""
    folder = tmp / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"layers": 4}')
    (folder / "weights.bin").write_bytes(b"\x01" * 1000)
    study.put_tensors("t", "directions", {"w": torch.arange(6.0)}, {"alpha": 2.0, "layers": [1, 2]})
    study.put_json("j", "evaluate", {"rate": 0.75})
    study.put_table("tab", "table", pd.DataFrame({"x": [1, 2, 3]}))
    study.put_folder("f", "folder", folder)
    return {"t": ("tensors", {"alpha": 2.0, "layers": [1, 2]}), "j": ("json", {"rate": 0.75}),
            "tab": ("table", [1, 2, 3]), "f": ("folder", '{"layers": 4}')}


def _read(study: StudyRecord, key: str, kind: str):
    if kind == "tensors":
        assert torch.equal(study.get_tensors(key)["w"], torch.arange(6.0))
        return study.get_meta(key)
    if kind == "json":
        return study.get_json(key)
    if kind == "table":
        return study.get_table(key)["x"].tolist()
    return (study.get_path(key) / "config.json").read_text()


FAULTS = {"truncate": lambda b: b[: len(b) // 2], "delete": None,
          "flip": lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0x55]) + b[len(b) // 2 + 1:],
          "tamper alpha": lambda b: b.replace(b'"alpha": 2.0', b'"alpha": 9.0')}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_injection_never_deletes_intact_objects_nor_returns_tampered_values(tmp_path, fault) -> None:
    """Every file of a study (manifest, spec, each object and each object's record), one fault at a time:
    reopened, every stage reads back its true value or is unavailable (then recomputed) — never a
    tampered one — and every object the fault did not touch is still there (objects/ or orphans/)."""
    probe = RunStore(tmp_path / "probe").create_study("Test study", SPEC)
    _fill(probe, tmp_path / "p")
    def files(st: StudyRecord) -> dict[str, Path]:  # role (the path without its random nonce) → file
        return {re.sub(r"-[0-9a-f]{8}(?=\.)", "", p.relative_to(st.path).as_posix()): p
                for p in st.path.rglob("*") if p.is_file() and not p.name.startswith(".")}

    targets = sorted(files(probe))
    assert len(targets) >= 11  # manifest, spec, 4 objects (+1 file in the folder), 4 records
    for i, rel in enumerate(targets):
        store = RunStore(tmp_path / f"s{i}")
        study = store.create_study("Test study", SPEC)
        want = _fill(study, tmp_path / f"m{i}")
        target = files(study)[rel]
        data = target.read_bytes()
        if FAULTS[fault] is None:
            target.unlink()
        elif (new := FAULTS[fault](data)) != data:
            target.write_bytes(new)
        else:
            continue  # this fault does not apply to this file
        before = {p.name: p.read_bytes() for p in study.objects.rglob("*") if p.is_file()
                  and p != target and not p.name.startswith(".")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)
            reopened = RunStore(store.root).open(study.id)
            for key, (kind, value) in want.items():
                if reopened.has(key):
                    assert _read(reopened, key, kind) == value, (rel, key)
                else:
                    with pytest.raises(StoreError):
                        _read(reopened, key, kind)
        after = {p.name: p.read_bytes() for p in study.path.rglob("*") if p.is_file()}
        for name, content in before.items():
            assert after.get(name) == content, f"{fault} of {rel}: intact {name} was lost"
