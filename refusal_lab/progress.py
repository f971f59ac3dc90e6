"""Progress reporting and cancellation shared by every slow call.

A progress callback is ``callback(done, total)``; stages bind their name with :func:`staged`.
Raising :class:`Cancelled` from a callback stops the computation between batches.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]


class Cancelled(Exception):
    """Raised (by a progress callback) to stop a computation between batches."""


def report(progress: Progress | None, done: int, total: int) -> None:
    """Call ``progress`` if given."""
    if progress is not None:
        progress(done, total)


def tqdm_progress(desc: str) -> Progress:
    """A callback that drives a tqdm bar (for the command line)."""
    from tqdm.auto import tqdm

    bar: dict = {}

    def callback(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        b = bar["bar"]
        b.total = total
        b.n = done
        b.refresh()
        if done >= total:
            b.close()
            bar.clear()

    return callback


class Eta:
    """Time left in a stage, from the pace so far: ``elapsed · (total − done) / done``.

    The pace is measured from the first report of a stage (its setup is not a step), and a stage whose
    total grows (a search that learns it must check more candidates) gets a longer estimate at once.
    ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        import time

        self.clock = clock or time.monotonic
        self.stage: str | None = None
        self.start = 0.0
        self.first_done = 0

    def update(self, stage: str, done: int, total: int) -> float | None:
        """Seconds left in ``stage`` (None until one step has been timed)."""
        now = self.clock()
        if stage != self.stage:
            self.stage, self.start, self.first_done = stage, now, done
            return None
        steps = done - self.first_done
        if steps <= 0 or now <= self.start:
            return None
        return max(0.0, (now - self.start) / steps * (total - done))


def format_seconds(seconds: float | None) -> str:
    """``~40 s`` / ``~3 min`` / ``~1.2 h``; empty when unknown."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"
