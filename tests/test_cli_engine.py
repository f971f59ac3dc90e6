"""``python -m refusal_lab directions`` and ``python -m refusal_lab refusal`` on a tiny model saved to a folder."""

from __future__ import annotations

import importlib.util
import json

import pytest

from refusal_lab.cli import main
from refusal_lab.tables import text_table
from refusal_lab.directions import DirectionSet
from refusal_lab.testing.tiny import tiny_handle


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    h = tiny_handle("llama", n_layers=3)
    h.model.save_pretrained(folder)
    h.tokenizer.save_pretrained(folder)  # keeps the ChatML chat template
    return folder


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # digests of the tiny folder go to a temporary cache
        mp.setenv("REFUSAL_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def dirs(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dirs") / "d"
    code = main(["directions", "--model", str(model_dir), "--out", str(out), "--n-train", "6", "--n-val", "4",
                 "--positions", "-1", "-2", "--kl-threshold", "10", "--induce-threshold=-1e9"])
    assert code == 0
    return out


def test_directions_writes_a_loadable_set(dirs, model_dir, capsys):
    ds = DirectionSet.load(dirs)
    assert ds.selected is not None and ds.selected[0] in (-1, -2)
    assert ds.metadata["n_harmful"] == 6 and ds.metadata["selection"]["n_harmful_val"] == 4
    assert ds.metadata["selection"]["positions"] == [-1, -2]


def test_directions_prints_a_table(model_dir, tmp_path, capsys):
    code = main(["directions", "--model", str(model_dir), "--out", str(tmp_path / "d2"), "--n-train", "4",
                 "--n-val", "4", "--positions", "-1", "--top", "2", "--no-filter"])
    out = capsys.readouterr().out
    assert code == 0
    assert "selected: position -1" in out and "bypass" in out and "saved to" in out
    assert "candidates:" in out and " pos layer" in out


def test_directions_rejects_bad_positions(model_dir, tmp_path, capsys):
    assert main(["directions", "--model", str(model_dir), "--out", str(tmp_path / "x"), "--positions", "3"]) == 2
    assert "negative offsets" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [[], ["--ablate"], ["--add", "--coeff", "4", "--layer", "1"], ["--orthogonalize"]])
def test_refusal_json(mode, dirs, model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I bake bread?\nWrite a poem about the sea.\nHow do I hack a bank?\n")
    args = ["refusal", "--model", str(model_dir), "--prompts", str(prompts), "--limit", "2",
            "--max-new-tokens", "3", "--json", str(tmp_path / "r.json")]
    if mode:
        args += [mode[0], str(dirs), *mode[1:]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "refusal_rate:" in out and "mean_refusal_score:" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) >= {"refusal_rate", "mean_refusal_score", "results"}
    assert len(data["results"]) == 2
    for row in data["results"]:
        assert set(row) == {"prompt", "response", "refused", "refusal_score", "outcome"}
        assert row["outcome"] in ("refused", "complied", "broken") and row["refused"] == (row["outcome"] == "refused")
        assert isinstance(row["refused"], bool) and isinstance(row["refusal_score"], float)
    assert data["refusal_rate"] == sum(r["refused"] for r in data["results"]) / 2
    if mode and mode[0] == "--add":
        assert "coeff 4.0 layer 1" in data["intervention"]


def test_refusal_bundled_prompts_and_argument_errors(dirs, model_dir, capsys):
    assert main(["refusal", "--model", str(model_dir), "--prompts", "bundled:harmless:test", "--limit", "1",
                 "--max-new-tokens", "2"]) == 0
    assert "harmless/test" in capsys.readouterr().out
    assert main(["refusal", "--model", str(model_dir), "--coeff", "2", "--limit", "1"]) == 2
    assert "--add" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --ablate and --add are exclusive
        main(["refusal", "--model", str(model_dir), "--ablate", str(dirs), "--add", str(dirs)])


def test_refusal_scheme(model_dir, capsys):
    args = ["refusal", "--model", str(model_dir), "--scheme", "rtn:4", "--limit", "1", "--max-new-tokens", "2"]
    if importlib.util.find_spec("refusal_lab.compression") is None:
        assert main(args) == 2 and "compression" in capsys.readouterr().err
    else:
        assert main(args) == 0
        assert "rtn" in capsys.readouterr().out.lower()


def test_text_table_aligns_columns_without_trailing_blanks():
    out = text_table(["scheme", "ppl", "note"], [["none", 22.9, ""], ["wanda:0.5", "97.89", "pruned"]])
    lines = out.splitlines()
    assert lines == ["scheme     ppl    note", "none       22.9", "wanda:0.5  97.89  pruned"]
    assert text_table(["scheme", "ppl"], []) == "scheme  ppl"
