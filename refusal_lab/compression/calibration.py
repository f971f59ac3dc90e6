"""Calibration data for Wanda and SparseGPT: fixed-length token windows, no padding.

By default the project's bundled English prose (:func:`refusal_lab.prompts.bundled_text`, ~3,400 tokens for
SmolLM2) is cut into ``n_samples`` evenly spaced windows of ``seq_len`` tokens (windows overlap when the
text is shorter than ``n_samples × seq_len``). Prompts (e.g. the bundled harmless train split) are
chat-formatted, concatenated into one token stream and windowed the same way, so every sample has the
same length and no attention mask is needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 256


@dataclass
class Calibration:
    """``input_ids`` of shape ``(n_samples, seq_len)`` (long, cpu) and where they came from."""

    input_ids: torch.Tensor
    source: str

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return self.n_samples * self.seq_len

    @property
    def sha(self) -> str:
        """Hash of the token windows (16 hex chars); part of the compressed model's fingerprint."""
        ids = self.input_ids.to(torch.int64).contiguous()
        h = hashlib.sha256(str(tuple(ids.shape)).encode())
        h.update(ids.numpy().tobytes())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive ``(≤batch_size, seq_len)`` slices."""
        for i in range(0, self.n_samples, batch_size):
            yield self.input_ids[i:i + batch_size]

    def describe(self) -> dict:
        return {"source": self.source, "n_samples": self.n_samples, "seq_len": self.seq_len, "sha": self.sha}


def _windows(ids: torch.Tensor, n_samples: int, seq_len: int) -> torch.Tensor:
    """``n_samples`` evenly spaced windows of ``seq_len`` tokens from the 1-D ``ids``."""
    total = int(ids.numel())
    if total < 2:
        raise ValueError("calibration text is empty after tokenization")
    seq_len = min(seq_len, total)
    n_samples = max(1, n_samples)
    last = total - seq_len
    starts = [round(i * last / (n_samples - 1)) for i in range(n_samples)] if n_samples > 1 else [0]
    return torch.stack([ids[s:s + seq_len] for s in starts[:n_samples]])


def from_text(tokenizer, text: str | None = None, *, n_samples: int = DEFAULT_SAMPLES,
              seq_len: int = DEFAULT_SEQ_LEN, source: str | None = None) -> Calibration:
    """Windows of ``text`` (default: the bundled English prose)."""
    if text is None:
        from refusal_lab.prompts import bundled_text

        text, source = bundled_text(), source or "bundled English text"
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return Calibration(_windows(ids, n_samples, seq_len), source or f"text ({len(text)} chars)")


def from_prompts(handle, prompts: Sequence[str], *, n_samples: int = DEFAULT_SAMPLES,
                 seq_len: int = DEFAULT_SEQ_LEN, source: str | None = None) -> Calibration:
    """Chat-formatted ``prompts`` (e.g. ``bundled("harmless", "train")``), concatenated and windowed."""
    if not len(prompts):
        raise ValueError("no calibration prompts")
    stream: list[int] = []
    for p in prompts:
        stream.extend(handle.tokenizer(handle.format(p), add_special_tokens=False)["input_ids"])
    ids = torch.tensor(stream, dtype=torch.long)
    name = source or getattr(prompts, "name", None) or f"{len(prompts)} prompts"
    return Calibration(_windows(ids, n_samples, seq_len), f"prompts {name}")


def resolve(handle, calibration) -> Calibration:
    """Accepts ``None`` (bundled text), a :class:`Calibration`, a ``str`` (text), ``"harmless"``
    (the bundled harmless train prompts) or a sequence of prompts / a ``PromptSet``."""
    if calibration is None:
        return from_text(handle.tokenizer)
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, str):
        if calibration == "harmless":
            from refusal_lab.prompts import bundled

            return from_prompts(handle, bundled("harmless", "train"), source="harmless/train")
        if calibration == "text":
            return from_text(handle.tokenizer)
        return from_text(handle.tokenizer, calibration)
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long().cpu()
        return Calibration(ids if ids.dim() == 2 else ids.unsqueeze(0), "token ids")
    return from_prompts(handle, list(calibration), source=getattr(calibration, "name", None))
