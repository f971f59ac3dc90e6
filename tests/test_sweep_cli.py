"""``python -m refusal_lab sweep`` takes the repair method and distill settings as ``study`` does."""

import pytest

from refusal_lab.cli import build_parser
from refusal_lab.cli.sweep import sweep_spec


def _spec(*extra: str):
    return sweep_spec(build_parser().parse_args(["sweep", "--model", "default", "--scheme", "wanda:0.5", *extra]))


def test_default_sweep_spec_is_unchanged_by_the_method_option():
    spec = _spec()
    assert "repair_method" not in spec.study and "distill" not in spec.study and spec.study["aird"] is None


@pytest.mark.parametrize("method, aird", [("distill", None), ("aird+distill", "auto")])
def test_method_and_distill_settings_reach_every_task(method, aird):
    spec = _spec("--method", method, "--distill", "steps=20", "--budget")
    assert spec.study["repair_method"] == method and spec.study["distill"] == {"steps": 20}
    assert spec.study["aird"] == aird and spec.budget == (aird is not None)
    task_spec = spec.study_spec("default")
    assert task_spec.repair_method == method and task_spec.distill == {"steps": 20}


def test_bad_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--scheme", "wanda:0.5", "--method", "finetune"])
    assert "finetune" in capsys.readouterr().err
