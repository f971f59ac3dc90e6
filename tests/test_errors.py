"""One line per failure, worded the same on every surface (CLI, sweep tasks, pages)."""

from refusal_lab.errors import error_line
from refusal_lab.models import ModelLoadError


def test_own_and_value_errors_keep_their_wording_on_one_line():
    assert error_line(ValueError("bad\n  scheme  'x'")) == "bad scheme 'x'"
    assert error_line(FileNotFoundError("no such file: a.json")) == "no such file: a.json"
    assert error_line(ModelLoadError("cannot load m")) == "cannot load m"


def test_other_errors_are_prefixed_by_their_type_and_empty_ones_named():
    assert error_line(RuntimeError("boom")) == "RuntimeError: boom"
    assert error_line(KeyError()) == "KeyError"
    assert error_line(KeyError("layer")) == "KeyError: 'layer'"
    assert "\n" not in error_line(RuntimeError("a\nb"))
