"""Time left in a whole study: stage kinds, the run store's history, nested stages, a fresh store."""

import pytest

from refusal_lab.store import RunStore
from refusal_lab.study_eta import StudyEta, stage_history, stage_kind, stage_model


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_stage_kinds():
    assert stage_kind("directions original") == "directions original"
    assert stage_kind("directions wanda:0.5") == "directions variant"
    assert stage_kind("evaluate bnb-nf4+aird") == stage_kind("evaluate original") == "evaluate"
    assert stage_kind("compress wanda:0.5") == stage_kind("compress") == "compress"
    assert stage_kind("aird wanda:0.5") == "aird" and stage_kind("budget x") == "budget"
    assert stage_kind("something new") == "something new"
    assert stage_model("evaluate wanda:0.5+aird") == stage_model("method wanda:0.5: distill") == "wanda:0.5"
    assert stage_model("aird+distill bnb-nf4") == stage_model("repaired directions bnb-nf4") == "bnb-nf4"
    assert stage_model("directions original") == stage_model("distill teacher replies") == "original"


def test_a_slower_variant_scales_the_rest_of_its_stages():
    """A variant whose first stages ran 3× the first variant's: its later stages are estimated at 3× too
    (measured: bnb-nf4's stages take 2–4× wanda's on the CPU), its repaired evaluation at its own evaluation's."""
    clock = Clock()
    planned = ["directions a", "evaluate a", "aird a", "evaluate a+aird",
               "compress b", "directions b", "evaluate b", "aird b", "evaluate b+aird"]
    eta = StudyEta(planned, clock=clock)
    for stage, seconds in (("directions a", 10.0), ("evaluate a", 20.0), ("aird a", 40.0), ("evaluate a+aird", 20.0),
                           ("compress b", 5.0), ("directions b", 30.0)):
        eta.started(stage)
        eta.finished(stage, seconds)
    assert eta.estimate("evaluate b") == 60.0 and eta.estimate("aird b") == 120.0  # 3× a's, like b's directions
    assert eta.left() == (240.0, 0)  # evaluate b+aird: b's pace too, until b's own evaluation has run
    eta.started("evaluate b")
    eta.finished("evaluate b", 50.0)  # pace now (30 + 50) / (10 + 20)
    assert eta.estimate("evaluate b+aird") == 50.0  # b's own evaluation time
    assert eta.estimate("aird b") == pytest.approx(40.0 * 80 / 30)


def test_a_fresh_run_learns_each_kind_once_and_says_what_it_does_not_know():
    clock = Clock()
    planned = ["directions original", "evaluate original", "evaluate a", "evaluate b", "aird a"]
    eta = StudyEta(planned, clock=clock)
    assert eta.left() == (0.0, 5)  # nothing timed: no number is claimed
    assert eta.describe() == ""
    eta.started("directions original")
    clock.t = 60
    eta.finished("directions original", 60.0)
    eta.started("evaluate original")
    assert eta.left(current_left=30.0) == (30.0, 3)  # the current stage's own estimate; 3 kinds unknown
    clock.t = 100
    eta.finished("evaluate original", 40.0)
    assert eta.left() == (80.0, 1)  # two evaluations at the measured 40 s; the AIRD kind is still unknown
    assert eta.describe() == "at least ~80 s left in all (1 stage not timed yet)"
    eta.started("evaluate a")
    clock.t = 110
    assert eta.left() == (70.0, 1)  # 30 s left of this one by its estimate, 40 for the next


def test_history_and_stored_stages(tmp_path):
    store = RunStore(tmp_path)
    spec = {"model": "m", "precision": "bfloat16"}
    old = store.create_study("old", spec)
    old.put_json("k1", "evaluate original", {}, seconds=50.0)
    old.put_json("k2", "evaluate wanda:0.5", {}, seconds=30.0)
    old.put_json("k3", "aird wanda:0.5", {}, seconds=120.0)
    old.put_json("k4", "aird copied", {}, seconds=0.0)  # copied from another study: not a cost
    other = store.create_study("other model", {"model": "n", "precision": "bfloat16"})
    other.put_json("k5", "aird x", {}, seconds=999.0)
    assert stage_history(store, "m", "bfloat16") == {"evaluate": 40.0, "aird": 120.0}
    assert stage_history(store, "m", "float32") == {}
    eta = StudyEta(["evaluate original", "evaluate b", "aird b"], stage_history(store, "m", "bfloat16"),
                   stored={"evaluate original"})
    assert eta.left() == (160.0, 0)  # the stored evaluation only loads
    assert eta.describe() == "~3 min left in all"


def test_nested_stages_are_timed_without_what_ran_inside_them():
    clock = Clock()
    eta = StudyEta(["drift a", "directions a", "evaluate a"], {"drift": 10.0, "directions variant": 20.0},
                   clock=clock)
    eta.started("drift a")
    clock.t = 2
    eta.started("directions a")  # a drift computes its variant's candidates first
    clock.t = 22
    eta.finished("directions a", 20.0)
    assert eta.left()[0] == pytest.approx(8.0)  # the drift's own 10 s minus its own 2 s; evaluate unknown
    clock.t = 30
    eta.finished("drift a", 30.0)
    assert eta.measured == {"directions variant": 20.0, "drift": 10.0}
    assert eta.left() == (0.0, 1)
