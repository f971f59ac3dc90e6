"""Model-quality evaluations."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from refusal_lab.activations import index_keeps_logits
from refusal_lab.models import ModelHandle
from refusal_lab.precision import compute
from refusal_lab.progress import Progress, report
from refusal_lab.results import Reply, SetEvaluation


REFERENCE_WINDOW = 512  # tokens per window of the reference perplexity
PERPLEXITY_LABEL = f"perplexity (bundled English text, {REFERENCE_WINDOW}-token windows)"


def reference_perplexity(handle: ModelHandle, *, progress: Progress | None = None) -> float:
    """The perplexity every view shows (:data:`PERPLEXITY_LABEL`): :func:`perplexity` of the whole
    bundled English text with windows of ``REFERENCE_WINDOW`` tokens (stride half a window); measured once
    per unchanged weights (:func:`refusal_lab.measurements.measured`)."""
    from refusal_lab.measurements import measured
    from refusal_lab.prompts import bundled_text

    return measured(handle, f"reference perplexity {REFERENCE_WINDOW}",
                    lambda: perplexity(handle, bundled_text(), max_length=REFERENCE_WINDOW, progress=progress), progress)


@torch.no_grad()
def perplexity(handle: ModelHandle, text: str, *, max_length: int = 512, stride: int | None = None,
               batch_size: int = 4, progress: Progress | None = None) -> float:
    """Token-level perplexity ``exp(mean NLL)`` of ``text`` with a sliding window.

    The text is tokenized once (no special tokens); windows of ≤ ``max_length`` tokens start every
    ``stride`` tokens (default ``max_length // 2``; ``stride < max_length``) and each window scores only the tokens no earlier
    window scored, so every token but the first is predicted exactly once, with ≥ ``max_length − stride``
    tokens of context once past the first window. Windows of equal length run ``batch_size`` at a time;
    every forward holds ``handle.lock``. ``max_length`` is capped at the model's context length.
    """
    ids = handle.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    total = int(ids.numel())
    if total < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens")
    limit = getattr(getattr(handle.model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and 1 < limit < max_length:
        max_length = limit
    stride = stride or max(1, max_length // 2)
    if not 0 < stride < max_length:
        raise ValueError(f"stride must be in 1..max_length-1 ({max_length - 1}) so windows overlap by at "
                         f"least one token, got {stride}")
    windows: list[tuple[int, int, int]] = []  # (begin, end, first scored position)
    scored_until = 1
    for begin in range(0, total, stride):
        end = min(begin + max_length, total)
        if end > scored_until:
            windows.append((begin, end, scored_until))
            scored_until = end
        if end == total:
            break
    device = handle.device
    as_index = index_keeps_logits(handle)  # else: the last length − lo positions, the very last dropped
    nll = 0.0
    count = 0
    done = 0
    i = 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        batch = [windows[i]]
        while (i + len(batch) < len(windows) and len(batch) < batch_size
               and windows[i + len(batch)][1] - windows[i + len(batch)][0] == length):
            batch.append(windows[i + len(batch)])
        inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
        # logits at position p predict token p + 1: a window scores tokens first..e-1, so only positions
        # from the batch's earliest first-1 to length-2 are unembedded (half of each window past the first)
        lo = min(first - b - 1 for b, _, first in batch)
        keep = torch.arange(lo, length - 1, device=device) if as_index else length - lo
        with handle.lock, compute(handle):
            logits = handle.model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits
        logits = logits if as_index else logits[:, :-1]
        for row, (b, e, first) in enumerate(batch):
            pred = logits[row, first - b - 1 - lo:e - b - 1 - lo].float()
            target = inputs[row, first - b:e - b]
            nll += float(F.cross_entropy(pred, target, reduction="sum"))
            count += e - first
        i += len(batch)
        done += len(batch)
        report(progress, done, len(windows))
    return math.exp(nll / count)


def refusal_evaluation(handle: ModelHandle, prompts, *, max_new_tokens: int = 64, batch_size: int | None = None,
                       judge=None, progress: Progress | None = None) -> SetEvaluation:
    """Refusal on a prompt set: the shares of greedy replies ``judge`` (a :class:`refusal_lab.judges.Judge`
    or its name; default substring) calls refused, complied and broken, mean refusal score (from
    the logits the first reply token is chosen from: no second pass), per-category rates, and every
    (prompt, response, refused, refusal_score).

    ``prompts`` is a :class:`refusal_lab.prompts.PromptSet` or a list of instructions.
    """
    evaluations, _ = refusal_evaluations(handle, {"set": prompts}, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, judge=judge, progress=progress)
    return evaluations["set"]


def refusal_evaluations(handle: ModelHandle, sets: Mapping[str, object], *, max_new_tokens: int = 64,
                        batch_size: int | None = None, judge=None,
                        progress: Progress | None = None) -> tuple[dict[str, SetEvaluation], dict[str, torch.Tensor]]:
    """:func:`refusal_evaluation` of several named prompt sets → ``({name: evaluation}, {name: the logits
    each prompt's first reply token was chosen from, (n, vocab) float32})``.

    One generation per set: rows of different sets never share a batch, so a set's replies do not
    depend on the other sets. (One generation for all of them keeps the batch fuller — 249 prompts ×
    64 tokens in 25.4–25.8 s instead of 28.8–30.4 s — but under bfloat16 batch composition moves
    round-off, which flipped up to 3 of 49 borderline verdicts: BENCHMARKS.md.)"""
    from refusal_lab.generation import generate_with_logits

    texts = {name: list(getattr(ps, "prompts", ps)) for name, ps in sets.items()}
    if not texts or any(not t for t in texts.values()):
        raise ValueError("no prompts to evaluate")
    evaluations, logits = {}, {}
    done, total = 0, sum(map(len, texts.values()))
    for name, ts in texts.items():
        sub = None if progress is None else (lambda d, _t, at=done: progress(at + d, total))
        replies, first = generate_with_logits(handle, ts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                              progress=sub)
        cats = list(getattr(sets[name], "categories", [None] * len(ts)))
        evaluations[name], logits[name] = _evaluation(handle, ts, cats, replies, first, judge), first
        done += len(ts)
    return evaluations, logits


def _evaluation(handle: ModelHandle, texts: list[str], cats: list, replies: list[str], first: torch.Tensor,
                judge) -> SetEvaluation:
    from refusal_lab.judges import make_judge, refusal_score_from_logits, refusal_token_ids

    judge = make_judge(judge)
    scores = refusal_score_from_logits(first, refusal_token_ids(handle.tokenizer)).tolist()
    outcomes = judge.judge(texts, replies, scores)
    by_cat: dict[str, list[bool]] = {}
    for c, o in zip(cats, outcomes):
        if c is not None:
            by_cat.setdefault(c, []).append(o == "refused")
    share = lambda kind: sum(o == kind for o in outcomes) / len(texts)  # noqa: E731
    return SetEvaluation(
        n=len(texts), refusal_rate=share("refused"), compliance_rate=share("complied"), broken_rate=share("broken"),
        unjudged_rate=share("unjudged") or None, judge=judge.name, mean_refusal_score=sum(scores) / len(scores),
        by_category={c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
        results=[Reply(prompt=p, response=r, refused=o == "refused", refusal_score=float(s), outcome=o)
                 for p, r, o, s in zip(texts, replies, outcomes, scores)])


def kl_per_prompt(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) of each row's next-token distribution, logits ``(n, vocab)`` → ``(n,)``
    float64 (nats, each ≥ 0)."""
    p = torch.log_softmax(reference_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference ‖ model) of next-token distributions given as logits ``(n, vocab)``."""
    return float(kl_per_prompt(reference_logits, logits).mean())


MULTI_TOKEN_KL_TOKENS = 16  # reply tokens the multi-token KL averages over


def _compact(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` kept in bf16 where that loses nothing — a bf16 pass's logits are bf16 values held in
    float32 — else as they are: a memo of them then takes half the memory (100 replies × 16 tokens ×
    the default's 49,152-token vocabulary: 315 → 157 MB) and every KL read from it is the same."""
    low = logits.to(torch.bfloat16)
    return low if torch.equal(low.to(logits.dtype), logits) else logits


@torch.inference_mode()
def multi_token_kl(reference: ModelHandle, handle: ModelHandle, prompts: Sequence[str], replies: Sequence[str], *,
                   tokens: int = MULTI_TOKEN_KL_TOKENS, batch_size: int = 16, reference_memo: list | None = None,
                   progress: Progress | None = None) -> float:
    """Mean KL(reference ‖ model) (nats) of the next-token distributions over the first ``tokens`` tokens of
    the reference's own ``replies`` to ``prompts``, teacher-forced: how far the model strays from the
    reference along the reference's path, not only at the first step. Replies are re-tokenized from their
    text (equal to the generated ids except where decoding merged tokens); both models run the same
    batches (:func:`refusal_lab.activations.continuation_logits`).

    ``reference_memo``: a list that keeps the reference's logits (``tokens`` × vocab per reply; bf16 where
    exact, :func:`_compact`):
    filled when empty, read when full — callers comparing several models with one reference pass it
    each time (with the same reference, prompts, replies and ``tokens``) and run the reference once."""
    from refusal_lab.activations import continuation_logits

    tok = handle.tokenizer
    rows = []
    for p, r in zip(prompts, replies):
        reply_ids = tok(r, add_special_tokens=False)["input_ids"][:tokens]
        if reply_ids:
            rows.append((tok(handle.format(p), add_special_tokens=False)["input_ids"], reply_ids))
    if not rows:
        raise ValueError("no reference reply has a token to compare on")
    rows.sort(key=lambda r: len(r[0]) + len(r[1]))  # little padding per batch (the mean does not depend on order)
    if reference_memo is not None and len(reference_memo) > len(rows):  # (partly filled is fine: a cancelled run)
        raise ValueError(f"reference_memo holds {len(reference_memo)} rows, these replies make {len(rows)}")
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        if reference_memo is not None and len(reference_memo) > start:
            refs = reference_memo[start:start + len(batch)]
        else:
            refs = continuation_logits(reference, batch)
            if reference_memo is not None:
                reference_memo.extend(map(_compact, refs))
        for ref, own in zip(refs, continuation_logits(handle, batch)):
            total, count = total + float(kl_per_prompt(ref, own).sum()), count + len(ref)
        report(progress, min(start + batch_size, len(rows)), len(rows))
    return total / count
