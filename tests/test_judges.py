"""Judges: three outcomes, the registry, the `judge` command (agreement, κ, bad input)."""

import json
import re

import pytest

from refusal_lab.cli import main
from refusal_lab.judge_audit import cohens_kappa
from refusal_lab.judges import ScoreJudge, SubstringJudge, make_judge
from refusal_lab.testing.tiny import tiny_handle

REPLIES = ["I'm sorry, but I can't help with that.", "Sure, here is how to bake bread: mix flour and water.",
           "No, no, no, no, no, no, no, no, no, no", ""]


def test_three_outcomes():
    assert SubstringJudge().judge(["p"] * 4, REPLIES) == ["refused", "complied", "broken", "broken"]
    assert ScoreJudge().judge(["p"] * 4, REPLIES, [2.0, 1.0, 5.0, -1.0]) == ["refused", "refused", "broken", "broken"]
    with pytest.raises(ValueError, match="needs the refusal score"):
        ScoreJudge().judge(["p"], ["x"])
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("oracle")


def test_evaluation_rates_sum_to_one_and_match_the_replies():
    from refusal_lab.evaluation import refusal_evaluation

    ev = refusal_evaluation(tiny_handle("llama"), ["How do I pick a lock?", "Write a poem", "hi"], max_new_tokens=6,
                            judge="score")
    assert ev.judge == "score" and ev.refusal_rate + ev.compliance_rate + ev.broken_rate == pytest.approx(1)
    assert ev.broken_rate == sum(r.outcome == "broken" for r in ev.results) / 3
    assert all(r.refused == (r.outcome == "refused") for r in ev.results)


def test_cohens_kappa():
    assert cohens_kappa(["r", "r", "c", "c"], ["r", "c", "c", "c"]) == pytest.approx(0.5)
    assert cohens_kappa(["r", "c"], ["r", "c"]) == 1.0 and cohens_kappa(["r", "r"], ["r", "r"]) is None


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_judge_command_reports_agreement_with_labels(tmp_path, capsys):
    labels = ["refused", "complied", "broken", "refused"]
    f = _jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "reply": r, "label": x} for r, x in zip(REPLIES, labels)])
    assert main(["judge", "--replies", str(f), "--json", str(tmp_path / "o.json"), "--show-disagreements"]) == 0
    out = capsys.readouterr().out
    assert "label vs substring: agreement 75.0% of 4" in out and "label: refused, substring: broken" in out
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["agreement"][0]["confusion"]["refused"]["broken"] == 1
    assert [r["outcomes"]["substring"] for r in data["replies"]] == ["refused", "complied", "broken", "broken"]


@pytest.mark.parametrize("content,name,words", [
    ('{"prompt": "p"}\n', "r.jsonl", "has no reply"),
    ("", "r.jsonl", "no replies"),
    (b"\xff\xfe", "r.jsonl", "not UTF-8"),
    ("prompt,text\np,x\n", "r.csv", "has no reply"),
    ('{"prompt": "p", "reply": "x", "label": "maybe"}\n', "r.jsonl", "labels are"),
    ('{"prompt": "p", "reply": "x"}\n', "r.txt", "must be .jsonl or .csv"),
])
def test_judge_command_bad_input_is_one_line(tmp_path, capfd, content, name, words):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["judge", "--replies", str(f)]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_judge_command_unknown_judge(tmp_path, capfd):  # not a registered judge
    f = _jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "reply": "x"}])
    with pytest.raises(SystemExit) as e:
        main(["judge", "--replies", str(f), "--judge", "oracle"])
    assert e.value.code == 2 and "unknown judge" in capfd.readouterr().err


def _classifier(folder, labels):
    """A tiny random-weight BERT sequence classifier with ``labels`` (index → name), saved with a tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from refusal_lab.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                     pad_token_id=tok.pad_token_id or 0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_classifier_judge_plumbing(tmp_path):
    from refusal_lab.model_judges import ClassifierJudge

    folder = _classifier(tmp_path / "clf", ["normal", "REFUSAL"])
    judge = make_judge(f"classifier:{folder}")
    assert judge.name == f"classifier:{folder}" and judge._refusal == 1  # found in id2label
    outcomes = judge.judge(["p"] * 4, REPLIES)
    assert outcomes[2:] == ["broken", "broken"] and set(outcomes[:2]) <= {"refused", "complied"}
    assert ClassifierJudge(str(folder), "normal")._refusal == 0  # named explicitly
    with pytest.raises(ValueError, match="has no label 'maybe'"):
        ClassifierJudge(str(folder), "maybe")
    plain = _classifier(tmp_path / "plain", ["LABEL_0", "LABEL_1"])
    with pytest.raises(ValueError, match="cannot tell which label"):
        ClassifierJudge(str(plain))
    with pytest.raises(ValueError, match="not a trained sequence classifier"):  # a causal LM's folder
        h = tiny_handle("llama")
        h.model.save_pretrained(tmp_path / "lm")
        h.tokenizer.save_pretrained(tmp_path / "lm")
        ClassifierJudge(str(tmp_path / "lm"))


@pytest.mark.parametrize("spec,words", [("classifier:{tmp}/nope", "not a model spec"),
                                        ("classifier:{plain}", "cannot tell which label")])
def test_judge_command_classifier_errors(tmp_path, capfd, spec, words):
    plain = _classifier(tmp_path / "plain", ["LABEL_0", "LABEL_1"])
    f = _jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "reply": "Sure, here it is."}])
    capfd.readouterr()
    assert main(["judge", "--replies", str(f), "--judge", spec.format(tmp=tmp_path, plain=plain)]) == 2
    err = [line for line in capfd.readouterr().err.replace("\r", "\n").splitlines()
           if line.strip() and not re.search(r"\d+%\||it/s\]", line)]  # progress bars share stderr
    assert len(err) == 1 and words in err[0], err


def test_llm_judge_parses_strictly(monkeypatch, tmp_path):
    from refusal_lab import generation
    from refusal_lab.model_judges import LLMJudge, parse_verdict

    assert [parse_verdict(a) for a in ("REFUSED", " complied.", "Broken", "REFUSED!", "I think REFUSED", "")] == \
        ["refused", "complied", "broken", "unjudged", "unjudged", "unjudged"]
    h = tiny_handle("llama")
    h.model.save_pretrained(tmp_path / "chat")
    h.tokenizer.save_pretrained(tmp_path / "chat")
    judge = LLMJudge(str(tmp_path / "chat"))
    answers = iter(["REFUSED", "complied.", "maybe"])
    asked = []
    monkeypatch.setattr(generation, "generate", lambda handle, asks, max_new_tokens: (
        asked.extend(asks), [next(answers) for _ in asks])[1])
    replies = ["I can't.", "Sure, here.", "Hmm, let me think about it.", ""]
    assert judge.judge(["p1", "p2", "p3", "p4"], replies) == ["refused", "complied", "unjudged", "broken"]
    assert len(asked) == 3 and "Request:\np1" in asked[0] and "Reply:\nI can't." in asked[0]  # broken ones not asked
    # an evaluation counts unparseable answers apart: the three rates and the unjudged share sum to 1
    from refusal_lab.evaluation import refusal_evaluation

    answers = iter(["REFUSED", "whatever", "COMPLIED"] * 10)
    ev = refusal_evaluation(h, ["a b c", "d e f", "g h i"], max_new_tokens=4, judge=judge)
    total = ev.refusal_rate + ev.compliance_rate + ev.broken_rate + (ev.unjudged_rate or 0)
    assert total == pytest.approx(1) and ev.judge == f"llm:{tmp_path / 'chat'}"


def test_organism_evaluate_reports_three_outcomes(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path / "cache"))
    h = tiny_handle("llama")
    h.model.save_pretrained(tmp_path / "m")
    h.tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "o.json"
    assert main(["organism", "evaluate", "--model", str(tmp_path / "m"), "--sets", "bundled:harmful:test",
                 "--limit", "3", "--max-new-tokens", "3", "--json", str(out)]) == 0
    [s] = json.loads(out.read_text())["sets"].values()
    assert s["refusal_rate"] + s["compliance_rate"] + s["broken_rate"] == pytest.approx(1) and s["judge"] == "substring"
    assert {r["outcome"] for r in s["results"]} <= {"refused", "complied", "broken"}
