"""Run-time helpers shared by the compression algorithms."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def few_threads(device: torch.device | str) -> Iterator[None]:
    """Run a stretch of many small CPU ops on one intra-op thread.

    SparseGPT's column sweep and HQQ's per-layer optimiser issue thousands of small ops; with the
    default 2-thread pool on a busy 2-core machine every op pays a thread barrier, and they ran 3-30×
    slower than single-threaded (measured: SparseGPT on a 576×1536 matrix 38 s vs 1.3 s, HQQ on a
    1536×576 layer 5-7 s vs 2 s). ``torch.set_num_threads`` is process-wide, so the previous value is
    restored on exit and concurrent users are serialised by a lock. No-op off CPU.
    """
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
