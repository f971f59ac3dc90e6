"""How an exception is told to a user in one line — the CLI's ``error:`` line, a sweep task's failure, a
page's error box — so every surface words the same failure the same way (never a traceback)."""

from __future__ import annotations


def error_line(e: BaseException) -> str:
    """One line for an exception: its message with whitespace collapsed, prefixed by its type where the
    message alone is unclear (this project's errors, ``ValueError`` and ``OSError`` carry their own wording)."""
    from refusal_lab.models import ModelLoadError
    from refusal_lab.store import StoreError

    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    own = isinstance(e, (ModelLoadError, StoreError, ValueError, OSError))
    return text if own else f"{type(e).__name__}: {text}"
