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
