"""The data of the ``distill`` repair (:mod:`refusal_lab.distill`): the original model's (the teacher's)
own greedy replies to the project's bundled *train* prompts, and the teacher-forced batches and KL
the student is trained on.

Prompts come only from the bundled train splits (harmful, harmless, borderline) and two train-only pools
the project wrote: everyday tasks (``refusal_lab/assets/prompts/tasks.txt``) and *contrast* prompts —
benign requests worded with alarming words, like the borderline set but never split into val/test
(``refusal_lab/assets/prompts/contrast.txt``); never from a public set or a val/test split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from refusal_lab.codec import JsonRecord
from refusal_lab.models import ModelHandle
from refusal_lab.precision import compute
from refusal_lab.progress import Progress, report
from refusal_lab.prompts import BUNDLED_KINDS, PROMPTS_DIR, bundled, load_prompts

TASKS_FILE = PROMPTS_DIR / "tasks.txt"
TRAIN_ONLY = {"tasks": TASKS_FILE, "contrast": PROMPTS_DIR / "contrast.txt"}  # kind → its train-only pool
PROMPT_KINDS = BUNDLED_KINDS + tuple(TRAIN_ONLY)  # harmful, harmless, borderline, tasks, contrast
DEFAULT_KINDS = PROMPT_KINDS  # what a repair trains on unless told (the contrast pool since the ninth round)


class DistillError(ValueError):
    """The distill repair cannot run as asked; the message says why and what to do instead."""


def training_prompts(kinds: Sequence[str] = DEFAULT_KINDS, per_kind: int | None = None,
                     split: str = "train") -> list[tuple[str, str]]:
    """``(kind, instruction)`` pairs: the bundled ``split`` of each kind in ``kinds`` (``tasks``,
    ``contrast``: train-only pools, used with ``split="train"`` only), the first ``per_kind`` of each (all
    when None), in file order, duplicates (across kinds too) dropped."""
    bad = [k for k in kinds if k not in PROMPT_KINDS]
    if bad:
        raise DistillError(f"unknown prompt kind(s) {bad}: use {', '.join(PROMPT_KINDS)}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for kind in kinds:
        if kind in TRAIN_ONLY:
            if split != "train" or not TRAIN_ONLY[kind].is_file():
                continue
            prompts = load_prompts(TRAIN_ONLY[kind], name=kind).prompts
        else:
            prompts = bundled(kind, split).prompts
        for p in prompts[:per_kind]:
            if p not in seen:
                seen.add(p)
                out.append((kind, p))
    return out


@dataclass(kw_only=True)
class TeacherReplies(JsonRecord):
    """The teacher's greedy replies to chat-formatted prompts, as token ids: per prompt its ``kind``, the
    instruction, the formatted prompt's ids and the reply's first ``tokens`` ids (its end-of-turn token
    included when it ended on one). ``teacher``: the teacher's fingerprint."""

    teacher: str
    tokens: int
    kinds: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    reply_ids: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_reply_tokens(self) -> int:
        return sum(map(len, self.reply_ids))

    def counts(self) -> dict[str, int]:
        """Prompts per kind."""
        out: dict[str, int] = {}
        for k in self.kinds:
            out[k] = out.get(k, 0) + 1
        return out

    def select(self, rows: Sequence[int]) -> "TeacherReplies":
        """The replies of ``rows`` (indices, in that order)."""
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return TeacherReplies(teacher=self.teacher, tokens=self.tokens, kinds=pick(self.kinds),
                              prompts=pick(self.prompts), prompt_ids=pick(self.prompt_ids),
                              reply_ids=pick(self.reply_ids))

    def answered_only(self, kinds: Sequence[str], decode) -> "TeacherReplies":
        """Without the prompts of ``kinds`` whose reply (``decode``: ids → text) the substring judge calls a
        refusal — e.g. contrast prompts the teacher itself refuses, which would teach its over-refusal."""
        from refusal_lab.judges import is_refusal

        return self.select([i for i, (k, r) in enumerate(zip(self.kinds, self.reply_ids))
                            if k not in kinds or not is_refusal(decode(r))])

    def key(self) -> str:
        """Content hash (16 hex chars): part of the cache key of a repair trained on these replies."""
        text = json.dumps([self.teacher, self.tokens, self.prompt_ids, self.reply_ids], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def greedy_replies(handle: ModelHandle, ids: list[list[int]], tokens: int,
                   progress: Progress | None = None) -> list[list[int]]:
    """Greedy reply ids of tokenized prompts, cut after the first end-of-turn token."""
    from refusal_lab.generation import _generate_hf, eos_ids, fast_greedy_supported, greedy_ids

    if fast_greedy_supported(handle):
        return greedy_ids(handle, ids, max_new_tokens=tokens, progress=progress)
    texts = handle.tokenizer.batch_decode(ids)
    raw = _generate_hf(handle, texts, max_new_tokens=tokens, batch_size=16, do_sample=False, temperature=1.0,
                       seed=0, progress=progress)
    stop = eos_ids(handle)
    return [r[:next((i + 1 for i, t in enumerate(r) if t in stop), len(r))] for r in raw]


def teacher_replies(teacher: ModelHandle, prompts: Sequence[tuple[str, str]], *, tokens: int = 32,
                    max_prompt_tokens: int = 256, progress: Progress | None = None) -> TeacherReplies:
    """The teacher's greedy replies (first ``tokens`` tokens) to ``(kind, instruction)`` pairs. Prompts
    whose chat-formatted text is longer than ``max_prompt_tokens`` tokens are left out; none left is a
    :class:`DistillError`."""
    from refusal_lab.activations import tokenize

    if tokens < 1:
        raise DistillError(f"reply_tokens must be ≥ 1, got {tokens}")
    ids = tokenize(teacher, [p for _, p in prompts])
    keep = [i for i, s in enumerate(ids) if 0 < len(s) <= max_prompt_tokens]
    if not keep:
        raise DistillError(f"no training prompts left after filtering: {len(prompts)} given, none of at most "
                           f"{max_prompt_tokens} tokens once chat-formatted; raise max_prompt_tokens or add prompts")
    replies = greedy_replies(teacher, [ids[i] for i in keep], tokens, progress)
    return TeacherReplies(teacher=teacher.fingerprint, tokens=tokens, kinds=[prompts[i][0] for i in keep],
                          prompts=[prompts[i][1] for i in keep], prompt_ids=[ids[i] for i in keep],
                          reply_ids=[list(r) for r in replies])


# ----------------------------------------------------------------------------------------------
# Teacher-forced batches and the KL
# ----------------------------------------------------------------------------------------------

@dataclass
class ReplyBatch:
    """Prompts left-padded to one width P, then their replies right-padded to the longest reply K:
    ``input_ids``/``attention_mask``/``position_ids`` ``(B, P + K)``, ``keep`` the positions
    ``P−1 … P+K−2`` whose logits predict the reply tokens, ``mask`` ``(B, K)`` true on real reply tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> "ReplyBatch":
        return ReplyBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                    self.keep, self.mask)))


def reply_batch(data: TeacherReplies, rows: Sequence[int], pad_id: int) -> ReplyBatch:
    """The :class:`ReplyBatch` of ``data``'s ``rows`` (every row has ≥ 1 prompt and ≥ 1 reply token)."""
    width_p = max(len(data.prompt_ids[i]) for i in rows)
    width_r = max(len(data.reply_ids[i]) for i in rows)
    ids = torch.full((len(rows), width_p + width_r), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros((len(rows), width_r), dtype=torch.bool)
    for row, i in enumerate(rows):
        p, r = data.prompt_ids[i], data.reply_ids[i]
        ids[row, width_p - len(p):width_p + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[row, width_p - len(p):width_p + len(r)] = 1
        mask[row, :len(r)] = True
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(width_p - 1, width_p - 1 + width_r)
    return ReplyBatch(ids, attn, pos, keep, mask)


def reply_logits(model: torch.nn.Module, batch: ReplyBatch) -> torch.Tensor:
    """Logits ``(B, K, vocab)`` float32 at the positions predicting the reply tokens (the output layer
    runs at those positions only, through the model's own head)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False, logits_to_keep=batch.keep)
    return out.logits.float()


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) (nats) summed over the reply tokens where ``mask`` ``(B, K)`` is true, each
    token's times its ``weights`` ``(B, K)`` when given; logits ``(B, K, vocab)``. Differentiable in
    ``student_logits``."""
    p = torch.log_softmax(teacher_logits[mask], -1)
    q = torch.log_softmax(student_logits[mask], -1)
    terms = p.exp() * (p - q)
    return terms.sum() if weights is None else (terms.sum(-1) * weights[mask].to(terms.dtype)).sum()


def token_weights(mask: torch.Tensor, first: float) -> torch.Tensor:
    """Loss weights ``(B, K)`` float32: ``first`` on each reply's first token (the refuse-or-answer
    decision), 1 on the others, 0 off ``mask``."""
    w = mask.float()
    w[:, 0] = w[:, 0] * first
    return w


def batches(n: int, batch_size: int, steps: int, seed: int, repeats: Sequence[int] | None = None) -> list[list[int]]:
    """``steps`` batches of row indices: epochs of a seeded permutation of ``range(n)`` — each row
    ``repeats[row]`` times per epoch when given — with a batch never spanning two epochs. Same seed,
    same order."""
    pool = list(range(n)) if repeats is None else [i for i in range(n) for _ in range(max(1, int(repeats[i])))]
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    order: list[int] = []
    size = min(batch_size, len(pool))
    while len(out) < steps:
        if len(order) < size:
            order = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
        out.append(order[:size])
        order = order[size:]
    return out


# ----------------------------------------------------------------------------------------------
# Precomputed states: what does not change during training is computed once
# ----------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Ends a forward once the wanted block input is read."""


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def stubbed(blocks: torch.nn.ModuleList, upto: int, value: torch.Tensor) -> Iterator[None]:
    """Blocks ``0 … upto−1`` replaced for the duration by a stub returning ``value`` ``(B, W, d)``: the
    model then runs from block ``upto`` on that residual stream (``upto = len(blocks)``: only the final
    norm and the output layer run). Neither transformers nor peft runs a model from a middle layer."""
    stub = lambda *args, **kwargs: value  # noqa: E731
    saved = [blk.__dict__.get("forward") for blk in blocks[:upto]]  # accelerate's hooks live here too
    try:
        for blk in blocks[:upto]:
            blk.forward = stub
        yield
    finally:
        for blk, fwd in zip(blocks[:upto], saved):
            if fwd is None:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = fwd


@contextlib.contextmanager
def reading(block: torch.nn.Module, where: str, into: list, stop: bool = False) -> Iterator[None]:
    """Append ``block``'s residual input (``where="input"``) or its output (``"output"``) to ``into``
    during the block; with ``stop``, end the forward there (:class:`_Stop`)."""
    def pre(module, args, kwargs):
        into.append(_hidden(args, kwargs))
        if stop:
            raise _Stop

    def post(module, args, output):
        into.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _Stop

    h = (block.register_forward_pre_hook(pre, with_kwargs=True) if where == "input"
         else block.register_forward_hook(post))
    try:
        yield
    finally:
        h.remove()


def _place(rows: Sequence[torch.Tensor], offsets: Sequence[int], width: int) -> torch.Tensor:
    """``(B, width, d)`` zeros with row ``b``'s ``(n_b, d)`` states from column ``offsets[b]`` on."""
    out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
    for b, (x, at) in enumerate(zip(rows, offsets)):
        out[b, at:at + len(x)] = x
    return out


@dataclass
class Precomputed:
    """States of the frozen parts, per row of a :class:`TeacherReplies`: ``teacher`` — the teacher's last
    block output ``(reply len, d)`` at the positions predicting its reply tokens (its logits then cost
    the final norm and output layer only); ``student`` — the student's residual stream ``(prompt +
    reply len, d)`` entering block ``start`` (LoRA sits at ``start`` and above, so nothing below changes
    while training); ``states`` — the teacher's residual stream leaving the state layer at the prompt's
    last positions (:func:`state_distance`), when the training matches it. Any is None where blocks do
    not return a plain tensor."""

    teacher: list[torch.Tensor] | None
    student: list[torch.Tensor] | None
    start: int
    states: list[torch.Tensor] | None = None  # the teacher's post-instruction states (n, d) per row, when asked

    def teacher_input(self, data: TeacherReplies, rows: Sequence[int], batch: ReplyBatch) -> torch.Tensor:
        """The stub value of a batch: ``(B, W, d)`` with the teacher's states at ``batch.keep``."""
        return _place([self.teacher[i] for i in rows], [int(batch.keep[0])] * len(rows), batch.input_ids.shape[1])

    def student_input(self, data: TeacherReplies, rows: Sequence[int], batch: ReplyBatch) -> torch.Tensor:
        """The stub value of a batch: ``(B, W, d)`` with each row's residual stream where its tokens sit."""
        width_p = int(batch.keep[0]) + 1
        return _place([self.student[i] for i in rows], [width_p - len(data.prompt_ids[i]) for i in rows],
                      batch.input_ids.shape[1])


def last_positions(batch: ReplyBatch, n: int) -> slice:
    """The columns of a batch's last ``n`` prompt positions (prompts are left-padded to one width)."""
    width_p = int(batch.keep[0]) + 1
    return slice(width_p - n, width_p)


@torch.no_grad()
def _states(handle: ModelHandle, model: torch.nn.Module, data: TeacherReplies, block: int, where: str,
            batch_size: int, progress: Progress | None, done: int, total: int,
            last: int = 0) -> list[torch.Tensor] | None:
    """Per row, ``model``'s residual stream at block ``block`` (``where``: ``input`` — its input over all
    tokens; ``output`` — its output at the reply-predicting positions; ``last`` — its output at the
    prompt's last ``last`` positions); None when the block does not return a tensor."""
    from refusal_lab.models import find_blocks

    blocks = find_blocks(model)
    pad = handle.tokenizer.pad_token_id or 0
    out: list[torch.Tensor | None] = [None] * len(data)
    order = sorted(range(len(data)), key=lambda i: len(data.prompt_ids[i]) + len(data.reply_ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = reply_batch(data, rows, pad).to(handle.device)
        seen: list = []
        with contextlib.suppress(_Stop), handle.lock, compute(handle), reading(
                blocks[block], "input" if where == "input" else "output", seen, stop=where != "output"):
            reply_logits(model, batch)
        if not seen or not isinstance(seen[0], torch.Tensor):
            return None
        width_p = int(batch.keep[0]) + 1
        for b, i in enumerate(rows):
            p, r = len(data.prompt_ids[i]), len(data.reply_ids[i])
            keep = {"output": slice(width_p - 1, width_p - 1 + r), "input": slice(width_p - p, width_p + r),
                    "last": last_positions(batch, last)}[where]
            out[i] = seen[0][b, keep].float().cpu()
        report(progress, done + start // batch_size + 1, total)
    return out  # type: ignore[return-value]


def precompute(teacher: ModelHandle, student: ModelHandle, model: torch.nn.Module, data: TeacherReplies, start: int,
               *, batch_size: int = 16, state: tuple[int, int] | None = None,
               progress: Progress | None = None) -> Precomputed:
    """:class:`Precomputed` states for training ``model`` (the student's adapted copy, LoRA at blocks ≥
    ``start``): the teacher's once, the student's below ``start`` once (none when ``start`` is 0), and with
    ``state`` = ``(layer, n)`` the teacher's output of block ``layer`` at each prompt's last ``n`` positions.
    ``progress`` gets one step per batch of each pass, out of all the passes' batches."""
    n = -(-len(data) // batch_size)
    total = n * precompute_passes(start, state)
    t = _states(teacher, teacher.model, data, teacher.n_layers - 1, "output", batch_size, progress, 0, total)
    s = states = None
    if start > 0:
        s = _states(student, model, data, start, "input", batch_size, progress, n, total)
    if state is not None:
        states = _states(teacher, teacher.model, data, state[0], "last", batch_size, progress,
                         n * (1 + (start > 0)), total, last=state[1])
    return Precomputed(teacher=t, student=s, start=start, states=states)


def precompute_passes(start: int, state: tuple[int, int] | None) -> int:
    """How many passes over the data :func:`precompute` makes."""
    return 1 + (start > 0) + (state is not None)


def state_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows and positions of ‖s − t‖² / ‖t‖², residual streams ``(B, n, d)``: how far the
    student's stream is from the teacher's, relative to the teacher's size (0 when equal; differentiable
    in ``student``)."""
    t = teacher.to(student.dtype)
    return (((student - t) ** 2).sum(-1) / (t ** 2).sum(-1).clamp_min(1e-12)).mean()


def direction_distance(student: torch.Tensor, teacher: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Mean over rows and positions of (⟨s − t, r̂⟩)², over the same mean of ⟨t, r̂⟩²: how far the
    student's projection on the refusal direction ``direction`` ``(d,)`` is from the teacher's, relative
    to the teacher's (0 when equal; differentiable in ``student``). Residual streams ``(B, n, d)``."""
    r = direction.to(student.device, student.dtype)
    r = r / r.norm().clamp_min(1e-12)
    t = teacher.to(student.dtype) @ r
    return ((student @ r - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)


@torch.no_grad()
def reply_kl(teacher: ModelHandle, model: ModelHandle, data: TeacherReplies, *, batch_size: int = 16,
             progress: Progress | None = None) -> float:
    """Mean KL(teacher ‖ model) (nats) per reply token of ``data``, teacher-forced (prompt positions
    not scored)."""
    pad = teacher.tokenizer.pad_token_id or 0
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = reply_batch(data, list(range(start, min(start + batch_size, len(data)))), pad)
        with teacher.lock, compute(teacher):
            t = reply_logits(teacher.model, batch.to(teacher.device))
        with model.lock, compute(model):
            s = reply_logits(model.model, batch.to(model.device))
        total += float(token_kl(t.to(s.device), s, batch.mask.to(s.device)))
        count += int(batch.mask.sum())
        report(progress, min(start + batch_size, len(data)), len(data))
    return total / count
