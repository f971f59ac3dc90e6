"""Giving freed memory back to the operating system between the stages of a long run.

glibc keeps the heap pages of freed tensors (a generation's key/value caches, a compression's
copies) mapped, so a process's resident memory only grows from stage to stage: measured on the study
acceptance command, each evaluation left ~1 GB resident after it ended (BENCHMARKS.md). ``malloc_trim``
returns them. Written here because no library exposes it; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        fn = None
    return fn


def release() -> bool:
    """Return freed heap pages to the OS (True when the C library could)."""
    fn = _trim()
    return bool(fn(0)) if fn is not None else False
