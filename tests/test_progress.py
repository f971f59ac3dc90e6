"""Time-left estimates of the progress bars."""

from refusal_lab.progress import Eta, format_seconds


def test_eta_follows_the_pace_of_the_current_stage():
    now = [0.0]
    eta = Eta(clock=lambda: now[0])
    assert eta.update("a", 0, 10) is None  # nothing timed yet
    now[0] = 4.0
    assert eta.update("a", 2, 10) == 16.0  # 2 s per step, 8 steps left
    now[0] = 6.0
    assert eta.update("a", 3, 20) == 34.0  # the total grew: the estimate grows with it
    now[0] = 7.0
    assert eta.update("b", 5, 6) is None  # a new stage starts timing afresh (its first report is not a step)
    now[0] = 10.0
    assert eta.update("b", 6, 6) == 0.0


def test_format_seconds():
    assert format_seconds(None) == ""
    assert format_seconds(0.2) == "~1 s" and format_seconds(40) == "~40 s"
    assert format_seconds(200) == "~3 min" and format_seconds(7200) == "~2.0 h"
