"""Small computations the dashboard shows that have no other home in ``core``.

UI-free (no streamlit): every function here is a plain library call, testable on its own.
"""

from __future__ import annotations

import torch

from core.judges import refusal_score_from_logits, refusal_token_ids
from core.models import ModelHandle


@torch.inference_mode()
def prefix_refusal_scores(handle: ModelHandle, instruction: str, reply: str, *,
                          max_tokens: int = 256) -> tuple[list[str], list[float]]:
    """Refusal score after every prefix of ``reply``, from one forward pass.

    The chat-formatted ``instruction`` followed by the reply's tokens (at most ``max_tokens``) is run
    once; at each position ``t`` (``0`` = before the first reply token) the refusal score
    ``log P(R) − log(1 − P(R))`` of the next token is read, R the first tokens of typical refusal
    openings (:func:`core.judges.refusal_token_ids`) — the same score the direction selection uses, so
    ``scores[0]`` equals ``core.judges.refusal_scores(handle, [instruction])[0]``.

    Run it inside the same intervention as the generation (``with ablate(...):``) to score the steered
    model. Returns ``(tokens, scores)``: the reply's tokens as text (``n``) and ``n + 1`` scores, the
    score *before* each token plus the one after the last.
    """
    tok = handle.tokenizer
    prompt_ids = tok(handle.format(instruction), add_special_tokens=False)["input_ids"]
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"][:max_tokens] if reply else []
    ids = torch.tensor([list(prompt_ids) + list(reply_ids)], device=handle.device)
    with handle.lock:
        logits = handle.model(input_ids=ids, use_cache=False).logits[0]  # (seq, vocab)
    start = len(prompt_ids) - 1
    scores = refusal_score_from_logits(logits[start:].float().cpu(), refusal_token_ids(tok))  # (n + 1,)
    tokens = [tok.decode([i]) for i in reply_ids]
    return tokens, [float(s) for s in scores]
