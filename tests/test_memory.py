"""Freed memory goes back to the OS between stages (glibc); elsewhere the call is a harmless no-op."""

import re
import sys

import pytest
import torch

from refusal_lab.memory import release


def _rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_release_returns_freed_heap_memory():
    if not release():
        pytest.skip("not glibc")
    chunks = [torch.ones(64 * 1024) for _ in range(4000)]  # ~1 GB in 256 KB tensors on the heap
    keep = chunks[::400]
    del chunks
    before = _rss_mb()
    assert release()
    assert _rss_mb() < before - 300  # most of the freed gigabyte left the process
    del keep
