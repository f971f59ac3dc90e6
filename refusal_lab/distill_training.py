"""The training loop of the ``distill`` repair (:mod:`refusal_lab.distill`): AdamW on LoRA's matrices against
the teacher's next-token distributions — teacher-forced KL over the teacher's replies, plus the optional
residual-stream and refusal-direction terms — with the frozen parts' states precomputed once."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refusal_lab.distill_data import (DistillError, Precomputed, TeacherReplies, batches, direction_distance,
                                      greedy_replies, last_positions, precompute, reading, reply_batch, reply_logits,
                                      state_distance, stubbed, token_kl, token_weights)
from refusal_lab.models import ModelHandle, find_blocks
from refusal_lab.precision import compute
from refusal_lab.progress import Progress, report

if TYPE_CHECKING:
    from refusal_lab.distill import DistillConfig


def _schedule(cfg: DistillConfig):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return factor


@dataclass
class _Pair:
    """One batch through teacher and student: logits ``(B, K, vocab)`` (the student's with gradients),
    the reply mask ``(B, K)``, and with a state term both residual streams ``(B, n, d)``."""

    teacher: torch.Tensor
    student: torch.Tensor
    mask: torch.Tensor
    teacher_states: torch.Tensor | None = None
    student_states: torch.Tensor | None = None


def _pair_logits(teacher: ModelHandle, student: ModelHandle, model: torch.nn.Module, data: TeacherReplies,
                 rows: list[int], pre: Precomputed | None, state: tuple[int, int] | None = None) -> _Pair:
    """One batch's :class:`_Pair`. With ``pre``, the frozen parts run from their precomputed states;
    ``state`` = ``(block, n)``: also the output of that block at each prompt's last ``n`` positions."""
    batch = reply_batch(data, rows, teacher.tokenizer.pad_token_id or 0)
    tb, sb = batch.to(teacher.device), batch.to(student.device)
    t_stub = s_stub = t_read = s_read = contextlib.nullcontext()
    t_seen: list = []
    s_seen: list = []
    if pre is not None and pre.teacher is not None:
        t_stub = stubbed(teacher.blocks, teacher.n_layers, pre.teacher_input(data, rows, batch).to(teacher.device))
    if pre is not None and pre.student is not None:
        s_stub = stubbed(find_blocks(model), pre.start, pre.student_input(data, rows, batch).to(student.device))
    if state is not None:
        s_read = reading(find_blocks(model)[state[0]], "output", s_seen)
        if pre is None or pre.states is None:
            if pre is not None and pre.teacher is not None:  # its blocks are stubbed: nothing real to read
                raise DistillError(f"{teacher.name}: block {state[0]}'s output could not be precomputed for the state "
                                   "term; train with precompute_states=False")
            t_read = reading(teacher.blocks[state[0]], "output", t_seen)
    with torch.no_grad(), teacher.lock, compute(teacher), t_stub, t_read:
        t_logits = reply_logits(teacher.model, tb)
    # bf16 autocast when the student's precision asks for it (LoRA stays float32); the copy's own modules run
    with compute(student, model), s_stub, s_read:
        s_logits = reply_logits(model, sb)
    out = _Pair(t_logits.to(s_logits.device), s_logits, sb.mask)
    if state is not None:
        last = last_positions(batch, state[1])
        out.student_states = s_seen[0][:, last].float()
        out.teacher_states = (torch.stack([pre.states[i] for i in rows]) if pre is not None and pre.states is not None
                              else t_seen[0][:, last].float()).to(out.student_states.device)
    return out


def own_replies(student: ModelHandle, model: torch.nn.Module, data: TeacherReplies,
                progress: Progress | None = None) -> TeacherReplies:
    """``data`` with each reply replaced by the greedy reply (as many tokens) of ``model``, the student's
    LoRA'd copy as it is now: the on-policy steps' data, scored by the teacher like its own replies."""
    handle = dataclasses.replace(student, model=model, fingerprint=f"{student.fingerprint}+training",
                                 lock=threading.RLock())
    was = model.training
    model.eval()
    try:
        replies = greedy_replies(handle, data.prompt_ids, data.tokens, progress)
    finally:
        model.train(was)
    return dataclasses.replace(data, reply_ids=[list(r) for r in replies])


def train_lora(teacher: ModelHandle, student: ModelHandle, lora, data: TeacherReplies, cfg: DistillConfig, start: int,
           precompute_states: bool, progress: Progress | None, state: tuple[int, int] | None = None,
           direction: torch.Tensor | None = None, states_progress: Progress | None = None,
           own_progress: Progress | None = None) -> list[float]:
    """AdamW on LoRA's matrices (at blocks ≥ ``start``); returns the loss (mean KL per reply token, nats,
    plus the weighted state and direction terms with ``state``, :func:`state_match`) of each step.
    ``states_progress`` counts the precomputing passes' batches (with ``cfg.on_policy`` again over the
    student's replies, whose making ``own_progress`` counts), ``progress`` the steps: a step costs several
    batches' time, so one count of both would make a pace-based ETA several times too short."""
    params = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    def precomputed(replies: TeacherReplies) -> Precomputed | None:
        return precompute(teacher, student, lora.model, replies, start, batch_size=cfg.batch_size, state=state,
                          progress=states_progress) if precompute_states else None

    pre = precomputed(data)
    report(progress, 0, cfg.steps)
    losses: list[float] = []
    repeats = [cfg.oversample.get(kind, 1) for kind in data.kinds]
    switch = cfg.steps - round(cfg.steps * cfg.on_policy)  # the first step on the student's own replies
    for step, rows in enumerate(batches(len(data), cfg.batch_size, cfg.steps, cfg.seed, repeats)):
        if step == switch and cfg.on_policy:  # same prompts in the same order: the batches' rows still hold
            data = own_replies(student, lora.model, data, own_progress)
            pre = precomputed(data)
        pair = _pair_logits(teacher, student, lora.model, data, rows, pre, state)
        mask = pair.mask
        weights = None if cfg.first_token_weight == 1 else token_weights(mask, cfg.first_token_weight)
        loss = token_kl(pair.teacher, pair.student, mask, weights) / (mask.sum() if weights is None else weights.sum())
        if state is not None and cfg.state_weight:
            loss = loss + cfg.state_weight * state_distance(pair.student_states, pair.teacher_states)
        if state is not None and cfg.direction_weight:
            loss = loss + cfg.direction_weight * direction_distance(pair.student_states, pair.teacher_states, direction)
        opt.zero_grad(set_to_none=True)
        with compute(student, lora.model):  # the forward's autocast: HQQ's backward (no custom_bwd) meets bf16
            loss.backward()  # grads with float32 weights otherwise; plain, pruned, bnb students: same LoRA bit for bit
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.detach().item(), 5))
        report(progress, step + 1, cfg.steps)
    return losses
