"""Hostile input, table-driven: bad prompt files, model specs, compression specs, numeric and enum
arguments and direction sets, each run through the command line. Every case ends in one of two ways:

* ``error``: exit code 2 and exactly one line on stderr, ``error: …`` holding the expected words —
  never a traceback, never a partial result;
* ``ok``: exit code 0 and a correct result (checked by the case).

Store corruption is in tests/test_store.py (fault injection, SIGKILL); the dashboard's uploads in
tests/test_app.py."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch

from refusal_lab.cli import main
from refusal_lab.testing.tiny import tiny_handle

PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]")  # progress bars share stderr
SURROGATE = '["How do I bake bread?", "Lone \\ud800 surrogate"]'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model folder, its direction set, and a folder of hostile files."""
    root = tmp_path_factory.mktemp("hostile")
    model = root / "tiny"
    h = tiny_handle("llama", n_layers=3)
    h.model.save_pretrained(model)
    h.tokenizer.save_pretrained(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_LAB_CACHE", str(root / "cache"))
        dirs = root / "dirs"
        assert main(["directions", "--model", str(model), "--out", str(dirs), "--n-train", "6", "--n-val", "4",
                     "--positions", "-1", "--kl-threshold", "10", "--induce-threshold=-1e9"]) == 0
        yield {"root": root, "model": model, "dirs": dirs}


def _files(root: Path, dirs: Path, model: Path) -> dict[str, Path]:
    """Every hostile file by name (made once per test session)."""
    f = root / "files"
    if f.exists():
        return {p.name: p for p in f.iterdir()}
    f.mkdir()
    w = lambda name, data: (f / name).write_bytes(data if isinstance(data, bytes) else data.encode()) or f / name  # noqa: E731
    w("empty.txt", "")
    w("blank.txt", "  \n\t\n")
    w("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))
    w("comma.csv", "prompt,category\nHow do I bake bread, quickly?,food\n")
    w("missing.csv", "prompt,category\nHow do I bake bread?,food\n,food\n")
    w("nocolumn.csv", "foo,bar\nHow do I bake bread?,x\n")
    w("good.csv", "text,kind\nHow do I bake bread?,food\nWrite a poem,art\n")
    w("surrogate.json", SURROGATE)
    w("nested.json", "[" * 100_000 + "]" * 100_000)
    w("nested.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    w("malformed.json", '["a", ')
    w("twolists.json", '{"a": ["x"], "b": ["y"]}')
    w("numbers.json", "[1, 2, 3]")
    w("badline.jsonl", '{"prompt": "ok"}\n{"prompt": \n')
    w("doc.pdf", "%PDF-1.4")
    w("long.txt", "x" * 100_000 + "\n")
    w("separators.txt", "one\u2028still one\ntwo\x1cstill two\nthree\x85still three\n")
    w("bom.txt", "\ufeffHow do I bake bread?\nWrite a poem\n")
    w("crlf.txt", "How do I bake bread?\r\nWrite a poem\r\nTell a joke\r\n")
    with open(f / "huge.txt", "wb") as fh:  # sparse: 60 MiB of nothing on disk
        fh.truncate(60 * 2 ** 20)
    os.mkfifo(f / "fifo.txt")
    (f / "folder.txt").mkdir()
    # model specs
    (f / "notamodel").mkdir()
    (f / "notamodel" / "weights.bin").write_bytes(b"x")
    w("weights.txt", "not a model")
    w("truncated.gguf", b"GGUF" + struct.pack("<I", 3) + b"\x00" * 10)
    pickled = f / "pickled"
    h = tiny_handle("llama", n_layers=2)
    h.model.save_pretrained(pickled)
    h.tokenizer.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()  # a legacy checkpoint: the weights as a pickle only
    torch.save(h.model.state_dict(), pickled / "pytorch_model.bin")
    remote = f / "remote"
    h.model.save_pretrained(remote)
    h.tokenizer.save_pretrained(remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    # direction sets
    for name, damage in (("dirs_truncated", "truncate"), ("dirs_selected", "selected"), ("dirs_json", "json")):
        d = f / name
        d.mkdir()
        for p in dirs.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        if damage == "truncate":
            st = d / "directions.safetensors"
            st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
        elif damage == "selected":
            meta = json.loads((d / "directions.json").read_text())
            meta["selected"] = [-1, 99]
            (d / "directions.json").write_text(json.dumps(meta))
        else:
            (d / "directions.json").write_text("{not json")
    other = f / "dirs_other_model"
    big = tiny_handle("llama", n_layers=3, d_model=96)
    big.model.save_pretrained(f / "wide")
    big.tokenizer.save_pretrained(f / "wide")
    assert main(["directions", "--model", str(f / "wide"), "--out", str(other), "--n-train", "4", "--n-val", "2",
                 "--positions", "-1", "--kl-threshold", "10", "--induce-threshold=-1e9"]) == 0
    w("exists.bin", "taken")
    return {p.name: p for p in f.iterdir()}


def _replies(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]


# (id, argv with {model} {dirs} {f:name} {out} placeholders, "error" + words | "ok" + check)
R = ["refusal", "--model", "{model}", "--max-new-tokens", "2"]
CASES = [
    # prompt files
    ("folder as prompt file", R + ["--prompts", "{f:folder.txt}"], "error", "is a folder"),
    ("missing prompt file", R + ["--prompts", "{f:nope.txt}"], "error", "file not found"),
    ("/dev/zero", R + ["--prompts", "/dev/zero"], "error", "not a regular file"),
    ("FIFO", R + ["--prompts", "{f:fifo.txt}"], "error", "not a regular file"),
    ("empty file", R + ["--prompts", "{f:empty.txt}"], "error", "no prompts found"),
    ("blank file", R + ["--prompts", "{f:blank.txt}"], "error", "no prompts found"),
    ("not UTF-8", R + ["--prompts", "{f:latin1.txt}"], "error", "not UTF-8"),
    ("CSV unquoted comma", R + ["--prompts", "{f:comma.csv}"], "error", "more fields than the header"),
    ("CSV row without text", R + ["--prompts", "{f:missing.csv}"], "error", "record 2 has no"),
    ("CSV without a known column", R + ["--prompts", "{f:nocolumn.csv}"], "error", "--column"),
    ("CSV --column unknown", R + ["--prompts", "{f:nocolumn.csv}", "--column", "baz"], "error", "no column 'baz'"),
    ("CSV --column given", R + ["--prompts", "{f:nocolumn.csv}", "--column", "foo", "--json", "{out}"], "ok",
     lambda out: [r["prompt"] for r in _replies(out)] == ["How do I bake bread?"]),
    ("CSV text column detected", R + ["--prompts", "{f:good.csv}", "--json", "{out}"], "ok",
     lambda out: len(_replies(out)) == 2),
    ("JSON lone surrogate", R + ["--prompts", "{f:surrogate.json}"], "error", "invalid character"),
    ("JSON nested deeply", R + ["--prompts", "{f:nested.json}"], "error", "nested too deeply"),
    ("JSONL nested deeply", R + ["--prompts", "{f:nested.jsonl}"], "error", "nested too deeply"),
    ("JSON malformed", R + ["--prompts", "{f:malformed.json}"], "error", "malformed JSON"),
    ("JSON two lists", R + ["--prompts", "{f:twolists.json}"], "error", "expected a JSON list"),
    ("JSON numbers", R + ["--prompts", "{f:numbers.json}"], "error", "list of strings or of objects"),
    ("JSONL bad line", R + ["--prompts", "{f:badline.jsonl}"], "error", "line 2"),
    ("unsupported format", R + ["--prompts", "{f:doc.pdf}"], "error", "unsupported format"),
    ("prompt too long", R + ["--prompts", "{f:long.txt}"], "error", "characters"),
    ("file over 50 MiB", R + ["--prompts", "{f:huge.txt}"], "error", "larger than 50 MiB"),
    ("separators inside a line", R + ["--prompts", "{f:separators.txt}", "--json", "{out}"], "ok",
     lambda out: [r["prompt"] for r in _replies(out)] == ["one\u2028still one", "two\x1cstill two",
                                                           "three\x85still three"]),
    ("BOM", R + ["--prompts", "{f:bom.txt}", "--json", "{out}"], "ok",
     lambda out: _replies(out)[0]["prompt"] == "How do I bake bread?"),
    ("CRLF", R + ["--prompts", "{f:crlf.txt}", "--json", "{out}"], "ok", lambda out: len(_replies(out)) == 3),
    ("unknown bundled set", R + ["--prompts", "bundled:evil"], "error", "unknown bundled set"),
    ("unknown bundled split", R + ["--prompts", "bundled:harmful:dev"], "error", "unknown split"),
    # numeric and enum arguments
    ("--batch-size -1", R + ["--batch-size", "-1"], "error", "must be ≥ 1"),
    ("--batch-size 0", R + ["--batch-size", "0"], "error", "must be ≥ 1"),
    ("--limit -5", R + ["--limit", "-5"], "error", "must be ≥ 1"),
    ("--limit 0", R + ["--limit", "0"], "error", "must be ≥ 1"),
    ("--limit abc", R + ["--limit", "abc"], "error", "whole number"),
    ("--max-new-tokens 0", ["refusal", "--model", "{model}", "--max-new-tokens", "0"], "error", "must be ≥ 1"),
    ("--coeff nan", R + ["--add", "{dirs}", "--coeff", "nan"], "error", "finite"),
    ("--coeff inf", R + ["--add", "{dirs}", "--coeff", "inf"], "error", "finite"),
    ("--layer -99", R + ["--add", "{dirs}", "--layer", "-99"], "error", "must be ≥ 0"),
    ("--layer 99", R + ["--add", "{dirs}", "--layer", "99", "--limit", "1"], "error", "layers must be in [0, 3)"),
    ("--coeff without --add", R + ["--coeff", "2"], "error", "only apply with --add"),
    ("--show -1", R + ["--show", "-1"], "error", "must be ≥ 0"),
    ("--dtype float8", R + ["--dtype", "float8"], "error", "invalid choice"),
    ("--device foo", R + ["--device", "foo"], "error", "expected auto, cpu"),
    ("--device cuda:x", R + ["--device", "cuda:x"], "error", "expected auto, cpu"),
    ("--device cuda without CUDA", R + ["--device", "cuda"], "error", "CUDA is not available"),
    ("--precision fp8", R + ["--precision", "fp8"], "error", "invalid choice"),
    ("study --aird top:abc", ["study", "--model", "{model}", "--aird", "top:abc"], "error", "top:K"),
    ("study --aird top:0", ["study", "--model", "{model}", "--aird", "top:0"], "error", "top:K"),
    ("study --aird bogus", ["study", "--model", "{model}", "--aird", "bogus"], "error", "top:K"),
    ("study --screen -1", ["study", "--model", "{model}", "--screen", "-1"], "error", "must be ≥ 0"),
    ("study --limit 0", ["study", "--model", "{model}", "--limit", "0"], "error", "must be ≥ 1"),
    ("aird --alpha -1", ["aird", "--model", "{model}", "--scheme", "wanda:0.5", "--alpha", "-1"], "error", "[0,"),
    ("aird --alpha nan", ["aird", "--model", "{model}", "--scheme", "wanda:0.5", "--alpha", "nan"], "error", "finite"),
    ("aird --layers 1,x", ["aird", "--model", "{model}", "--scheme", "wanda:0.5", "--layers", "1,x"], "error",
     "layer indices"),
    ("aird --layers -1", ["aird", "--model", "{model}", "--scheme", "wanda:0.5", "--layers=-1"], "error", "≥ 0"),
    ("aird --mode bogus", ["aird", "--model", "{model}", "--scheme", "wanda:0.5", "--mode", "x"], "error",
     "invalid choice"),
    ("directions --max-layer-frac 0", ["directions", "--model", "{model}", "--out", "{out}", "--max-layer-frac", "0"],
     "error", "must be in (0, 1]"),
    ("directions --max-layer-frac 1.5", ["directions", "--model", "{model}", "--out", "{out}",
                                         "--max-layer-frac", "1.5"], "error", "must be in (0, 1]"),
    ("directions --kl-threshold -1", ["directions", "--model", "{model}", "--out", "{out}", "--kl-threshold=-1"],
     "error", "must be in [0,"),
    ("directions --n-train 0", ["directions", "--model", "{model}", "--out", "{out}", "--n-train", "0"], "error",
     "must be ≥ 1"),
    ("compress --calib-samples 0", ["compress", "--model", "{model}", "--scheme", "wanda:0.5", "--calib-samples", "0"],
     "error", "must be ≥ 1"),
    # compression specs
    ("scheme wanda:1.5", ["compress", "--model", "{model}", "--scheme", "wanda:1.5"], "error", "wanda"),
    ("scheme nonsense", ["compress", "--model", "{model}", "--scheme", "zip:9"], "error", "zip"),
    ("scheme rtn:0", ["compress", "--model", "{model}", "--scheme", "rtn:0"], "error", "rtn"),
    ("compress --out an existing file", ["compress", "--model", "{model}", "--scheme", "magnitude:0.5", "--out",
                                         "{f:exists.bin}"], "error", "already exists"),
    ("refusal --scheme nonsense", R + ["--scheme", "zip:9"], "error", "zip"),
    # model specs
    ("missing model folder", ["info", "--model", "{f:nope}"], "error", "not a model spec"),
    ("folder without config.json", ["info", "--model", "{f:notamodel}"], "error", "no config.json"),
    ("a text file as model", ["info", "--model", "{f:weights.txt}"], "error", "is a file"),
    ("truncated GGUF", ["info", "--model", "{f:truncated.gguf}"], "error", "GGUF"),
    ("missing GGUF", ["info", "--model", "{f:nope.gguf}"], "error", "GGUF file not found"),
    ("pickle checkpoint", ["info", "--model", "{f:pickled}"], "error", "safetensors"),
    ("auto_map without the flag", ["info", "--model", "{f:remote}"], "error", "trust-remote-code"),
    ("chat template typo", ["info", "--model", "{model}", "--chat-template", "{f:tempalte.jinja}"], "error",
     "chat template file"),
    ("hub id offline", ["info", "--model", "nobody-xyz/not-a-model"], "error", "offline"),
    # direction sets
    ("direction set missing", R + ["--ablate", "{f:nodirs}"], "error", "nodirs"),
    ("direction set truncated", R + ["--ablate", "{f:dirs_truncated}"], "error", "directions.safetensors"),
    ("selected out of range", R + ["--ablate", "{f:dirs_selected}"], "error", "selected"),
    ("directions.json garbage", R + ["--ablate", "{f:dirs_json}"], "error", "directions.json"),
    ("direction of another model", R + ["--ablate", "{f:dirs_other_model}"], "error", "d_model"),
]


def _argv(template: list[str], env: dict, files: dict, out: Path) -> list[str]:
    def fill(a: str) -> str:
        if a.startswith("{f:"):
            name = a[3:-1]
            return str(files.get(name, env["root"] / "files" / name))
        return a.format(model=env["model"], dirs=env["dirs"], out=out)
    return [fill(a) for a in template]


@pytest.mark.parametrize("name,argv,outcome,expect", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(name, argv, outcome, expect, env, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(env["root"] / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = _files(env["root"], env["dirs"], env["model"])
    out = tmp_path / "out.json"
    t0 = time.perf_counter()
    try:
        rc = main(_argv(argv, env, files, out))
    except SystemExit as e:  # argparse
        rc = e.code
    seconds = time.perf_counter() - t0
    err = capfd.readouterr().err
    assert "Traceback" not in err
    if outcome == "ok":
        assert rc == 0, err
        assert expect(out)
        return
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not PROGRESS.search(line) and not line.startswith(("WARNING", "warning"))]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], lines[0]
    assert seconds < 30, f"{name}: {seconds:.0f} s before the error"


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60


def test_prompt_set_keys_cover_categories_and_nul():
    from refusal_lab.prompts import PromptSet

    a = PromptSet("a", ["How?", "Why?"], ["x", "y"])
    assert a.sha != PromptSet("a", ["How?", "Why?"], ["x", "z"]).sha  # categories change results by category
    assert PromptSet("a", ["x\0y"]).sha != PromptSet("a", ["x", "y"]).sha  # a NUL is not a separator


def test_study_keys_cover_dtype_and_device(tmp_path):
    from refusal_lab.study import Study, StudySpec

    base = StudySpec(model=str(tmp_path), schemes=[], device="cpu", precision="float32")
    assert Study(base, tmp_path / "runs").numerics == ()  # float32 on CPU: the keys stored before
    bf16 = Study(StudySpec(model=str(tmp_path), schemes=[], device="cpu", dtype="bfloat16"), tmp_path / "runs")
    assert "dtype=bfloat16" in bf16.numerics
    meta = Study(StudySpec(model=str(tmp_path), schemes=[], device="meta"), tmp_path / "runs")
    assert "device=meta" in meta.numerics


def test_core_rejects_impossible_values():
    from refusal_lab.generation import generate
    from refusal_lab.interventions import add
    from refusal_lab.study import StudySpec

    h = tiny_handle("llama", n_layers=3)
    with pytest.raises(ValueError, match="batch_size"):
        generate(h, ["hi"], max_new_tokens=2, batch_size=0)
    with pytest.raises(ValueError, match="finite"):
        with add(h, torch.ones(h.d_model), 1, float("nan")):
            pass
    with pytest.raises(ValueError, match="layers must be in"):
        with add(h, torch.ones(h.d_model), -99):
            pass
    for bad in ({"limit": 0}, {"max_new_tokens": 0}, {"aird": "top:abc"}, {"aird_alpha": float("inf")},
                {"aird_layers": [-1]}):
        with pytest.raises(ValueError):
            StudySpec(**bad)


def test_weights_replaced_with_their_mtime_restored_get_a_new_fingerprint(tmp_path, monkeypatch):
    from refusal_lab.models import folder_fingerprint

    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    h = tiny_handle("llama", n_layers=2)
    h.model.save_pretrained(folder)
    before = folder_fingerprint(folder)
    weights = folder / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, different weights
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and folder_fingerprint(folder) != before


def test_study_and_directions_take_a_column(env, tmp_path, monkeypatch):
    from refusal_lab.study import Study, StudySpec

    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(env["root"] / "cache"))
    files = _files(env["root"], env["dirs"], env["model"])
    spec = StudySpec(model=str(env["model"]), schemes=[], harmful=str(files["nocolumn.csv"]),
                     harmless="bundled:harmless:test", borderline=None, column="foo")
    assert Study(spec, tmp_path / "runs").eval_sets()["harmful"].prompts == ["How do I bake bread?"]
    assert "column" not in StudySpec().to_dict()  # specs stored before the field name the same folder
    rc = main(["directions", "--model", str(env["model"]), "--out", str(tmp_path / "d"), "--harmful",
               str(files["nocolumn.csv"]), "--column", "foo", "--skip-selection", "--n-train", "4"])
    assert rc == 0
