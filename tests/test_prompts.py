"""Bundled prompt sets, splits and user-file loaders."""

import json

import pytest

from conftest import SHARED_BENCHMARKS
from refusal_lab.prompts import (BUNDLED_KINDS, SPLITS, PromptFileError, bundled, bundled_text, load_prompts,
                          parse_prompts, refusal_phrasings)


def test_bundled_sizes_and_categories():
    harmful, harmless, borderline = (bundled(k) for k in BUNDLED_KINDS)
    assert len(harmful) >= 150 and len(harmless) >= 150 and len(borderline) >= 40
    assert len(set(harmful.categories)) >= 8
    assert None not in harmful.categories
    assert len(refusal_phrasings()) >= 12
    assert len(bundled_text().split()) >= 1500  # ≥ 2,000 tokens


@pytest.mark.parametrize("kind", BUNDLED_KINDS)
def test_splits_are_disjoint_complete_and_deterministic(kind):
    parts = {s: bundled(kind, s) for s in SPLITS}
    all_prompts = [p for s in SPLITS for p in parts[s].prompts]
    assert sorted(all_prompts) == sorted(bundled(kind).prompts)
    assert len(set(all_prompts)) == len(all_prompts)
    assert bundled(kind, "test").prompts == parts["test"].prompts
    assert all(len(parts[s]) > 0 for s in SPLITS)


def test_bundled_sets_do_not_overlap():
    sets = [set(p.lower() for p in bundled(k).prompts) for k in BUNDLED_KINDS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_txt_with_tags_and_dedup():
    with pytest.warns(UserWarning, match="duplicated"):
        ps = parse_prompts("[a] one\n\ntwo\n[b] One\n", "txt")
    assert ps.prompts == ["one", "two"] and ps.categories == ["a", None]


@pytest.mark.parametrize("fmt,text,column", [
    ("csv", "id,goal,category\n1,do x,c1\n2,do y,c2\n", None),
    ("json", json.dumps([{"instruction": "do x", "category": "c1"}, {"instruction": "do y", "category": "c2"}]), None),
    ("jsonl", '{"forbidden_prompt": "do x", "category": "c1"}\n{"forbidden_prompt": "do y", "category": "c2"}\n', None),
    ("csv", "a,b\n1,do x\n2,do y\n", "b"),
])
def test_formats_and_column_detection(fmt, text, column):
    ps = parse_prompts(text, fmt, column=column)
    assert ps.prompts == ["do x", "do y"]
    if column is None:
        assert ps.categories == ["c1", "c2"]


@pytest.mark.parametrize("fmt,text,match", [
    ("txt", "", "no prompts"),
    ("csv", "a,b\n1,2\n", "cannot tell which column"),
    ("json", "{not json", "malformed JSON"),
    ("jsonl", '{"prompt": "x"}\nnope\n', "line 2"),
    ("txt", "x" * 5000, "characters"),
    ("xml", "<a/>", "unsupported format"),
])
def test_bad_content_is_a_clear_error(fmt, text, match):
    with pytest.raises(PromptFileError, match=match):
        parse_prompts(text, fmt)


def test_wrong_named_column_and_encoding(tmp_path):
    with pytest.raises(PromptFileError, match="no column 'nope'"):
        parse_prompts("goal\nx\n", "csv", column="nope")
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(bad)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


@pytest.mark.skipif(not SHARED_BENCHMARKS.exists(), reason="../shared/benchmarks not present")
@pytest.mark.parametrize("name,minimum,has_categories", [
    ("advbench.json", 500, False), ("jailbreakbench.json", 100, True), ("harmbench_val.json", 30, True),
    ("alpaca_harmless_test.json", 900, False), ("alpaca_harmless_val.json", 900, False)])
def test_public_benchmark_files_load(name, minimum, has_categories):
    ps = load_prompts(SHARED_BENCHMARKS / name)
    assert len(ps) >= minimum
    assert all(isinstance(p, str) and p for p in ps.prompts)
    assert (ps.categories[0] is not None) == has_categories


@pytest.mark.skipif(not SHARED_BENCHMARKS.exists(), reason="../shared/benchmarks not present")
def test_public_benchmarks_are_not_in_the_project():
    """Data rule: nothing from ../shared enters the project's own prompt sets."""
    ours = {" ".join(p.lower().split()) for k in BUNDLED_KINDS for p in bundled(k).prompts}
    for f in SHARED_BENCHMARKS.glob("*.json"):
        theirs = {" ".join(p.lower().split()) for p in load_prompts(f).prompts}
        assert not (ours & theirs), f.name
