"""Fingerprints of model weights: stable ids that key the run store and the caches — of a folder's files
(their contents, each digest memoised per file state) and of a model's tensors as they are in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def file_digest(path: Path) -> str:
    """sha256 of a file, memoised in the cache keyed by (path, inode, size, mtime, ctime): a file replaced
    by another of the same size with its mtime set back still gets a new inode or ctime (the kernel
    sets ctime on every change; no user call can set it back)."""
    from refusal_lab.models import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
                         .encode()).hexdigest()[:32]
    memo = cache_dir() / "digests" / key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def folder_fingerprint(folder: Path) -> str:
    """Stable id of a model folder: hash of its weight and config files' contents."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json", ".gguf"}
                   and p.name not in {"refusal_lab.json"})
    for p in files:
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()[:16]


def tensors_fingerprint(model: nn.Module) -> str:
    """Hash of a model's parameters as they are in memory (for in-memory variants; offloaded ones read where
    they are stored)."""
    from refusal_lab.placement import model_tensors

    h = hashlib.sha256()
    for name, t in sorted(model_tensors(model), key=lambda item: item[0]):
        h.update(name.encode())
        t = t.detach()
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
