"""Typed results and their one JSON codec: round trips, the JSON of studies stored before the types
existed, and optional fields left out as the old dicts left them out."""

import json
import math
from pathlib import Path

import pytest

from refusal_lab.codec import from_json, to_json
from refusal_lab.results import (BudgetPoint, CalibrationPoint, Evaluation, MethodEvaluation, Recoverability, Reply,
                          SetEvaluation, StudyResults, VariantResult)

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "bench" / "results" / "study_results.json"  # a CLI study's JSON, written before the types


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN as text


def test_a_study_stored_before_the_types_reads_back_to_the_same_json():
    data = json.loads(STORED.read_text())
    res = StudyResults.from_json(data)
    assert _same(res.to_json(), data)
    v = res.variants["wanda:0.5"]
    assert v.evaluation.rate("harmful") == data["variants"]["wanda:0.5"]["evaluation"]["sets"]["harmful"]["refusal_rate"]
    assert isinstance(v.repaired.repair.calibration[0], CalibrationPoint) and v.aird_verdict is None
    assert math.isnan(v.drift.variant.quality.induce)  # NaN survives
    assert v.drift.cosine == v.drift.cosine_selected and v.compression.family == "pruning"


def test_optional_fields_are_left_out_while_none():
    ev = Evaluation(model="m", sets={"harmful": SetEvaluation(n=1, refusal_rate=1.0, results=[
        Reply(prompt="p", response="I can't.", refused=True, refusal_score=2.0)])}, perplexity=20.0)
    assert "kl_to_original" not in ev.to_json() and ev.rate("borderline") is None
    assert Evaluation.from_json(ev.to_json()) == ev
    failed = MethodEvaluation(method="aird-merged", error="quantized writer")
    assert set(failed.to_json()) == {"model", "sets", "perplexity", "method", "error"}
    assert MethodEvaluation.from_json(failed.to_json()) == failed


def test_containers_and_validation():
    curve = [BudgetPoint(n_layers=1, layers=[3], refusal=0.5, densified_weights=10)]
    assert from_json(list[BudgetPoint], to_json(curve)) == curve
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        Recoverability.from_json({"layer": 2})
    point = CalibrationPoint.from_json({"alpha": 0, "layers": [], "feasible": True, "unknown": 1})
    assert point.unrepaired and point.measured is None and "unknown" not in point.to_json()


def test_variant_without_repair_has_no_repair_keys():
    data = json.loads(STORED.read_text())["variants"]["bnb-nf4"]
    plain = {k: data[k] for k in ("compression", "drift", "evaluation")}
    v = VariantResult.from_json(plain)
    assert v.repaired is None and set(v.to_json()) == {"compression", "drift", "evaluation"}
