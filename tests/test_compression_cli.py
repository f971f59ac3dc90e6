"""``python -m refusal_lab compress`` on a tiny model saved to disk: report, JSON, save and reload."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_lab.cli import main
from refusal_lab.compression.targets import dense_weight, select_targets
from refusal_lab.models import load_model
from refusal_lab.testing.tiny import tiny_handle


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_cli")
    h = tiny_handle("llama", n_layers=2, d_model=64, seed=4)
    h.model.save_pretrained(folder, safe_serialization=True)
    h.tokenizer.save_pretrained(folder)
    return folder


def test_list(capsys):
    assert main(["compress", "--list"]) == 0
    out = capsys.readouterr().out
    for form in ("bnb-nf4", "rtn:BITS[:GROUP][:sym]", "hqq:BITS[:GROUP]", "wanda:SPARSITY | wanda:N:M"):
        assert form in out


def test_bad_scheme_exits_2(capsys):
    assert main(["compress", "--model", "x", "--scheme", "wanda:0.99"]) == 2
    assert "Valid schemes" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["wanda:2:4", "rtn:4:32"])
def test_compress_save_reload(folder, tmp_path, capsys, scheme):
    out, js = tmp_path / "model", tmp_path / "r.json"
    assert main(["compress", "--model", str(folder), "--scheme", scheme, "--out", str(out), "--json", str(js),
                 "--calib-samples", "2", "--calib-len", "32", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "bits / weight" in text and "per-layer sparsity" in text and "saved to" in text
    rep = json.loads(js.read_text())
    assert rep["scheme"] == scheme and len(rep["layer_sparsity"]) == 2
    meta = json.loads((out / "refusal_lab.json").read_text())
    assert meta["scheme"] == scheme and meta["parent_fingerprint"]
    reloaded = load_model(str(out), device="cpu")
    for t in select_targets(reloaded):
        w = dense_weight(reloaded.model.get_submodule(t.name))
        if scheme == "wanda:2:4":
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_bnb_nf4_save_reload(folder, tmp_path, capsys):
    from refusal_lab.compression import REGISTRY

    if REGISTRY["bnb-nf4"].unavailable_reason:
        pytest.skip(REGISTRY["bnb-nf4"].unavailable_reason)
    out = tmp_path / "nf4"
    assert main(["compress", "--model", str(folder), "--scheme", "bnb-nf4", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    from refusal_lab.compression import apply

    parent = load_model(str(folder), device="cpu")
    fresh, _ = apply(parent, "bnb-nf4")
    reloaded = load_model(str(out), device="cpu")
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    with torch.no_grad():
        a, b = fresh.model(input_ids=ids).logits, reloaded.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-2, rtol=1e-2)


def test_hqq_out_refused_before_loading(tmp_path, capsys):
    assert main(["compress", "--model", "does-not-exist", "--scheme", "hqq:4:64", "--out", str(tmp_path)]) == 2
    assert "cannot be saved" in capsys.readouterr().err


@pytest.mark.parametrize("modules,count", [("mlp", 6), ("q_proj,o_proj", 4), (r"layers\.1\.", 7)])
def test_modules_option(folder, tmp_path, capsys, modules, count):
    js = tmp_path / "r.json"
    assert main(["compress", "--model", str(folder), "--scheme", "magnitude:0.5", "--modules", modules,
                 "--json", str(js), "--no-layers", "--device", "cpu"]) == 0
    capsys.readouterr()
    rep = json.loads(js.read_text())
    assert rep["n_modules"] == count
