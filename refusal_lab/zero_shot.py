"""A zero-shot multiple-choice check of what a model still knows — utility beyond perplexity.

The items are this project's own (never a public benchmark): four kinds, 60 + 50 + 50 + 50 = 210 items,
made deterministically from the hand-written lists below — arithmetic, word knowledge (opposites),
everyday reasoning (what an object is for) and reading (one fact stated, then asked). Each has four
options. Scoring follows lm-eval's multiple choice: the prompt ``Question: …\\nAnswer:`` and each option
``" <option>"``; the option whose tokens have the highest summed log-likelihood is the model's answer.
:func:`accuracy` returns the share right and its standard error ``sqrt(p(1 − p)/n)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress, report

SEED = 20261201

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("early", "late"), ("full", "empty"), ("open", "closed"), ("hard", "soft"), ("high", "low"),
             ("young", "old"), ("rich", "poor"), ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"),
             ("thick", "thin"), ("clean", "dirty"), ("heavy", "light"), ("long", "short"), ("deep", "shallow"),
             ("easy", "difficult"), ("near", "far"), ("push", "pull"), ("buy", "sell"), ("win", "lose"),
             ("up", "down"), ("inside", "outside"), ("before", "after"), ("first", "last"), ("true", "false"),
             ("begin", "end"), ("arrive", "leave"), ("remember", "forget"), ("accept", "refuse"), ("add", "subtract"),
             ("increase", "decrease"), ("north", "south"), ("east", "west"), ("day", "night"), ("summer", "winter"),
             ("question", "answer"), ("friend", "enemy"), ("victory", "defeat"), ("entrance", "exit"),
             ("sweet", "sour"), ("cheap", "expensive"), ("wide", "narrow"), ("sharp", "blunt"), ("tight", "loose"),
             ("smooth", "rough")]

USES = [("scissors", "cutting paper"), ("an umbrella", "staying dry in the rain"), ("a key", "opening a lock"),
        ("a spoon", "eating soup"), ("a ladder", "reaching high places"), ("a pillow", "resting your head"),
        ("a thermometer", "measuring temperature"), ("a broom", "sweeping the floor"),
        ("a kettle", "boiling water"), ("a map", "finding your way"), ("a towel", "drying yourself"),
        ("a hammer", "driving nails"), ("a toothbrush", "cleaning teeth"), ("a clock", "telling the time"),
        ("a refrigerator", "keeping food cold"), ("glasses", "seeing clearly"), ("a pen", "writing"),
        ("a camera", "taking photographs"), ("a lamp", "lighting a room"), ("a wallet", "carrying money"),
        ("a bicycle", "riding to places"), ("soap", "washing hands"), ("a needle", "sewing cloth"),
        ("a shovel", "digging holes"), ("a calculator", "doing sums"), ("a blanket", "keeping warm in bed"),
        ("a ruler", "measuring length"), ("an oven", "baking bread"), ("a comb", "tidying hair"),
        ("a telephone", "calling people"), ("a net", "catching fish"), ("a fence", "keeping animals in"),
        ("a bucket", "carrying water"), ("a stapler", "joining sheets of paper"), ("a mirror", "seeing yourself"),
        ("sunscreen", "protecting skin from the sun"), ("a backpack", "carrying books"),
        ("a whistle", "making a loud signal"), ("a compass", "finding north"), ("a helmet", "protecting your head"),
        ("a sponge", "soaking up water"), ("a fan", "cooling the air"), ("a candle", "giving light"),
        ("a vase", "holding flowers"), ("a saw", "cutting wood"), ("a plate", "serving food"),
        ("a lock", "keeping a door shut"), ("a kite", "flying in the wind"), ("glue", "sticking things together"),
        ("an alarm", "waking you up")]

NAMES = ["Anna", "Tom", "Maria", "Ravi", "Lena", "Omar", "Sofia", "Ken", "Aisha", "Peter", "Yuki", "Carlos"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["bike", "car", "hat", "coat", "bag", "boat", "house", "kite", "scarf", "cup"]


@dataclass(frozen=True)
class Item:
    """One question, its four options and the index of the right one."""

    kind: str
    question: str
    options: tuple[str, str, str, str]
    answer: int


def _item(kind: str, question: str, right: str, wrong: Sequence[str], rng: random.Random) -> Item:
    options = [right, *wrong[:3]]
    rng.shuffle(options)
    return Item(kind, question, tuple(options), options.index(right))


def bundled_items() -> list[Item]:
    """The 210 items, the same on every machine (seeded)."""
    rng = random.Random(SEED)
    items = []
    for _ in range(60):
        a, b, op = rng.randint(2, 60), rng.randint(2, 40), rng.choice("+-×")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        wrong = rng.sample([v for v in range(value - 12, value + 13) if v != value], 3)
        items.append(_item("arithmetic", f"What is {a} {op} {b}?", str(value), [str(w) for w in wrong], rng))
    for word, opposite in OPPOSITES:
        others = rng.sample([o for w, o in OPPOSITES if o not in (opposite, word)], 3)
        items.append(_item("word knowledge", f"What is the opposite of \"{word}\"?", opposite, others, rng))
    for thing, use in USES:
        others = rng.sample([u for t, u in USES if u != use], 3)
        items.append(_item("everyday reasoning", f"What is {thing} mostly used for?", use, others, rng))
    for _ in range(50):
        a, b = rng.sample(NAMES, 2)
        ca, cb = rng.sample(COLORS, 2)
        ta, tb = rng.sample(THINGS, 2)
        art = lambda word: "an" if word[0] in "aeiou" else "a"  # noqa: E731
        story = f"{a} has {art(ca)} {ca} {ta} and {b} has {art(cb)} {cb} {tb}."
        if rng.random() < 0.5:
            q, right = f"{story} What color is {b}'s {tb}?", cb
            wrong = [ca, *rng.sample([c for c in COLORS if c not in (ca, cb)], 2)]
        else:
            q, right = f"{story} What does {a} have?", f"{art(ca)} {ca} {ta}"
            wrong = [f"{art(cb)} {cb} {tb}", f"{art(cb)} {cb} {ta}", f"{art(ca)} {ca} {tb}"]
        items.append(_item("reading", q, right, wrong, rng))
    return items


def option_logprobs(handle: ModelHandle, items: Sequence[Item], *, batch_size: int = 16,
                    progress: Progress | None = None) -> torch.Tensor:
    """Summed log-likelihood of each option's tokens after its item's prompt, ``(n_items, 4)`` float64.

    Items run ``batch_size`` at a time, shortest prompts together: one forward over their prompts keeps
    the key/value cache, one over the four options of each continues from it
    (:func:`shared_context_logprobs`); where the model's cache cannot be shared, one forward per batch of
    whole prompt + option sequences (:func:`refusal_lab.activations.continuation_logits`)."""
    tok = handle.tokenizer
    ctx = [tok(f"Question: {it.question}\nAnswer:", add_special_tokens=False)["input_ids"] for it in items]
    opts = [[tok(f" {o}", add_special_tokens=False)["input_ids"] for o in it.options] for it in items]
    scores = torch.empty(len(items), 4, dtype=torch.float64)
    order = sorted(range(len(items)), key=lambda i: len(ctx[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        scores[idx] = shared_context_logprobs(handle, [ctx[i] for i in idx], [opts[i] for i in idx])
        report(progress, 4 * min(start + batch_size, len(order)), 4 * len(order))
    return scores


def _shareable(handle: ModelHandle, longest: int) -> bool:
    """Whether a left-padded context's cache may be continued: no sliding window the padded sequence
    reaches (windows count cache indices, which padding shifts)."""
    window = getattr(handle.model.config, "sliding_window", None)
    return not window or longest < int(window)


@torch.inference_mode()
def shared_context_logprobs(handle: ModelHandle, contexts: Sequence[Sequence[int]],
                            continuations: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """Summed log-likelihood of each continuation after its context, ``(n_contexts, k)`` float64 for
    ``k`` continuations per context. The contexts run once (left-padded, cache kept) and their cache is
    repeated for the continuations, instead of running every context once per continuation: the same
    sums up to floating-point order (``tests/test_zero_shot.py``; BENCHMARKS.md "Interactive speed"). Written
    here because transformers scores one sequence per row."""
    from refusal_lab.activations import _last_index, left_pad
    from refusal_lab.precision import compute

    k = len(continuations[0])
    flat = [list(o) for opts in continuations for o in opts]
    width = max(len(c) for c in contexts) + max(len(o) for o in flat)
    if any(len(opts) != k for opts in continuations) or not all(flat):
        raise ValueError("every context needs the same number of non-empty continuations")
    rows = [(list(c), o) for c, opts in zip(contexts, continuations) for o in opts]
    if not _shareable(handle, width):
        return _one_row_each(handle, rows, k)
    ids, mask = left_pad(contexts, handle.tokenizer.pad_token_id or 0)
    dev = handle.device
    with handle.lock, compute(handle):
        out = handle.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                           position_ids=((mask.cumsum(-1) - 1).clamp(min=0)).to(dev), use_cache=True,
                           logits_to_keep=_last_index(handle, ids.shape[1]))
        cache = out.past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):  # a legacy tuple cache
            return _one_row_each(handle, rows, k)
        first = torch.log_softmax(out.logits[:, -1].double().cpu(), -1).repeat_interleave(k, 0)  # (n k, vocab)
        scores = first[torch.arange(len(flat)), torch.tensor([o[0] for o in flat])]
        rest = max(len(o) for o in flat) - 1  # tokens fed after the context (the last is only predicted)
        if rest:
            cache.batch_repeat_interleave(k)
            oids = torch.zeros((len(flat), rest), dtype=torch.long)
            omask = torch.zeros_like(oids)
            for r, o in enumerate(flat):
                oids[r, :len(o) - 1], omask[r, :len(o) - 1] = torch.tensor(o[:-1]), 1
            seen = mask.sum(-1).repeat_interleave(k)[:, None]
            logits = handle.model(input_ids=oids.to(dev), past_key_values=cache, use_cache=True,
                                  attention_mask=torch.cat([mask.repeat_interleave(k, 0), omask], 1).to(dev),
                                  position_ids=(seen + torch.arange(rest)).to(dev)).logits
            for r, o in enumerate(flat):
                if len(o) > 1:
                    scores[r] += _summed(logits[r, :len(o) - 1].float().cpu(), o[1:])
    return scores.view(len(contexts), k)


def _one_row_each(handle: ModelHandle, rows: list[tuple[list[int], list[int]]], k: int) -> torch.Tensor:
    """:func:`shared_context_logprobs` without sharing: every (context, continuation) row whole."""
    from refusal_lab.activations import continuation_logits

    sums = [float(_summed(lg, o)) for lg, (_, o) in zip(continuation_logits(handle, rows), rows)]
    return torch.tensor(sums, dtype=torch.float64).view(len(rows) // k, k)


def _summed(logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Summed log-probability of ``tokens`` under ``logits`` ``(len(tokens), vocab)``, float64."""
    logp = torch.log_softmax(logits.double(), -1)
    return logp[torch.arange(len(tokens)), torch.tensor(list(tokens))].sum()


def accuracy(handle: ModelHandle, items: Sequence[Item] | None = None, *,
             progress: Progress | None = None) -> tuple[float, float]:
    """``(share of items answered right, its standard error)`` on ``items`` (default :func:`bundled_items`,
    measured once per unchanged weights: :func:`refusal_lab.measurements.measured`)."""
    from refusal_lab.measurements import measured

    def compute() -> tuple[float, float]:
        chosen = option_logprobs(handle, todo, progress=progress).argmax(-1)
        p = float((chosen == torch.tensor([it.answer for it in todo])).double().mean())
        return p, math.sqrt(p * (1 - p) / len(todo))

    todo = list(items) if items is not None else bundled_items()
    return compute() if items is not None else measured(handle, "zero-shot bundled", compute, progress)
