"""The refusal-tuned *model organism*: SmolLM2-135M-Instruct plus a LoRA adapter trained by this
project so that the embedded default model refuses harmful requests.

Training data come only from the project's own bundled *train* splits:

* harmful instruction → one of the project's refusal phrasings (``refusal_lab/assets/refusals.txt``);
* harmless and borderline-but-safe instruction → the base model's own greedy answer
  (self-distillation, so helpfulness and style are kept); optionally also the train-only pool of short
  everyday tasks in ``refusal_lab/assets/prompts/tasks.txt`` (``tasks``).

Loss is on response tokens only, and logits are computed only at those positions (the 49k-token
output layer dominates the cost otherwise). Seeded and deterministic on a given machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from refusal_lab.generation import generate
from refusal_lab.models import ADAPTER_DIR, ModelHandle, cache_dir
from refusal_lab.progress import Progress, report
from refusal_lab.prompts import PROMPTS_DIR, bundled, load_prompts, refusal_phrasings


@dataclass
class OrganismConfig:
    """Hyper-parameters of the refusal adapter (the shipped adapter's values are the defaults)."""

    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    steps: int = 100
    warmup_steps: int = 10
    seed: int = 0
    answer_tokens: int = 96  # length of the base model's self-distilled answers
    answer_batch_size: int = 64  # prompts per generation batch of those answers (CPU decoding is memory-bound)
    max_seq_len: int = 192
    soft_distillation: bool = True  # True: helpful answers match the base model's distribution (KL), not its argmax
    plain_anchor: bool = True  # True: also match the base model (KL) on its own answers as plain text, no chat template
    helpful_repeat: int = 1  # each harmless/borderline example appears this many times per epoch
    tasks: bool = True  # True: also self-distil the train-only pool of short everyday tasks (refusal_lab/assets/prompts/tasks.txt)
    decision_tokens: int = 3  # soft distillation: also hard cross-entropy on the first N tokens of helpful answers
    bf16_autocast: bool | None = None  # None: on where the hardware has fast bf16 (CUDA, CPU with AMX/AVX512-BF16)


@dataclass
class Example:
    """One training pair; ``kind`` is harmful | harmless | borderline."""

    instruction: str
    response: str
    kind: str
    ends: bool = True  # append end-of-turn after the response


@dataclass
class TrainResult:
    config: dict
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    n_examples: dict = field(default_factory=dict)


def training_examples(base: ModelHandle, cfg: OrganismConfig, *, progress: Progress | None = None) -> list[Example]:
    """Build the training pairs from the bundled train splits; self-distilled answers are cached
    on disk keyed by the base model and the prompts."""
    rng = random.Random(cfg.seed)
    refusals = refusal_phrasings()
    harmful = bundled("harmful", "train").prompts
    helpful = [(p, "harmless") for p in bundled("harmless", "train").prompts] + \
              [(p, "borderline") for p in bundled("borderline", "train").prompts]
    if cfg.tasks:  # train-only: this pool has no val/test split and is never evaluated on
        helpful += [(p, "harmless") for p in load_prompts(PROMPTS_DIR / "tasks.txt", name="tasks").prompts]
    # one memo per base model and answer length, keyed by prompt: adding prompts generates only theirs
    key_parts = [base.fingerprint, cfg.answer_tokens, cfg.answer_batch_size]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    memo = cache_dir() / "organism" / f"answers-by-prompt-{key}.json"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    missing = list(dict.fromkeys(p for p, _ in helpful if p not in known))
    if missing:
        texts = generate(base, missing, max_new_tokens=cfg.answer_tokens,
                         batch_size=cfg.answer_batch_size, progress=progress)
        n_tokens = [len(base.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
        known.update({p: {"text": t, "ends": n < cfg.answer_tokens - 2} for p, t, n in zip(missing, texts, n_tokens)})
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    answers = [known[p] for p, _ in helpful]
    examples = [Example(p, rng.choice(refusals), "harmful") for p in harmful]
    examples += [Example(p, a["text"], kind, a["ends"]) for (p, kind), a in zip(helpful, answers)
                 for _ in range(max(1, cfg.helpful_repeat))]
    if cfg.plain_anchor:  # the base model's own prose, scored as plain text: keeps perplexity outside chat
        examples += [Example("", a["text"], "plain", False) for a in answers]
    return examples


def encode_example(handle: ModelHandle, ex: Example, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ end of turn) and the index where the response starts.

    ``plain`` examples are the response alone, without chat template; every token is scored."""
    tok = handle.tokenizer
    if ex.kind == "plain":
        return tok.encode(ex.response, add_special_tokens=False)[:max_len], 0
    prompt = tok.encode(handle.format(ex.instruction), add_special_tokens=False)
    response = tok.encode(ex.response, add_special_tokens=False)
    if ex.ends and tok.eos_token_id is not None:
        response = response + [tok.eos_token_id]
    ids = (prompt + response)[:max_len]
    return ids, min(len(prompt), len(ids) - 1)


def _batch(encoded: list[tuple[list[int], int]], pad_id: int, soft: list[bool] | None = None,
           decide: list[bool] | None = None) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(encoded):  # right padding: positions stay 0..len-1
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if soft is not None:
        out["soft"] = torch.tensor(soft, dtype=torch.bool)
    if decide is not None:
        out["decide"] = torch.tensor(decide, dtype=torch.bool)
    return out


def _response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Logits ``(n_response_tokens, vocab)`` at the positions predicting response tokens only."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.get_output_embeddings()(hidden[:, :-1][keep]).float()


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  teacher_logits: torch.Tensor | None = None, decision_tokens: int = 0) -> torch.Tensor:
    """Mean loss over response tokens; logits computed only where needed.

    Rows with ``batch["soft"]`` true (self-distilled helpful answers) are matched to the base model's
    full next-token distribution, ``KL(teacher ‖ student)``, when ``teacher_logits`` are given:
    hard cross-entropy on the base model's own greedy tokens would sharpen the model and raise its
    perplexity on ordinary text. Other rows (refusals) use cross-entropy. Rows with ``batch["decide"]``
    true also get cross-entropy on their first ``decision_tokens`` response tokens, where greedy decoding
    decides between answering and refusing (KL alone leaves the argmax free to drift to a refusal).
    """
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = _response_logits(model, batch, keep)
    tgt = targets[keep]
    if teacher_logits is None or "soft" not in batch:
        return torch.nn.functional.cross_entropy(logits, tgt)
    soft = batch["soft"].unsqueeze(1).expand_as(targets)[keep]
    per_token = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
    logp = torch.log_softmax(logits[soft], -1)
    logq = torch.log_softmax(teacher_logits[soft], -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    ce = per_token
    per_token = per_token.masked_scatter(soft, kl) if soft.any() else per_token
    if decision_tokens > 0 and "decide" in batch:
        first = keep & (keep.long().cumsum(1) <= decision_tokens) & batch["decide"].unsqueeze(1)
        per_token = per_token + torch.where(first[keep] & soft, ce, torch.zeros_like(ce))
    return per_token.mean()


def fast_bf16_available(device: torch.device) -> bool:
    """True on CUDA and on CPUs whose oneDNN runs bf16 matmuls natively (AMX / AVX512-BF16)."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_adapter(handle: ModelHandle, examples: list[Example], cfg: OrganismConfig, *,
                  progress: Progress | None = None, log_every: int = 10):
    """Fine-tune a LoRA adapter on ``examples``; returns ``(peft_model, TrainResult)``.

    The handle's model is wrapped by peft in place (adapter weights added); call
    ``peft_model.merge_and_unload()`` or ``save_pretrained`` afterwards.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    present = {name.split(".")[-1] for name, _ in handle.model.named_modules()}
    targets = [t for t in cfg.target_modules if t in present] or "all-linear"
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(handle.model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * 0.5 * (
        1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    pad = handle.tokenizer.pad_token_id or 0
    encoded = [encode_example(handle, ex, cfg.max_seq_len) for ex in examples]
    order: list[int] = []
    result = TrainResult(config=asdict(cfg), steps=cfg.steps, seconds=0.0,
                         n_examples={k: sum(e.kind == k for e in examples)
                                     for k in ("harmful", "harmless", "borderline", "plain")})
    t0 = time.perf_counter()
    running = 0.0
    device = next(model.parameters()).device
    use_bf16 = fast_bf16_available(device) if cfg.bf16_autocast is None else cfg.bf16_autocast
    result.config["bf16_autocast"] = use_bf16
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            perm = list(range(len(encoded)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        soft = [examples[i].kind == "plain" or (cfg.soft_distillation and examples[i].kind != "harmful")
                for i in idx]
        decide = [examples[i].kind in ("harmless", "borderline") for i in idx]
        batch = {k: v.to(device) for k, v in _batch([encoded[i] for i in idx], pad, soft, decide).items()}
        # bf16 autocast halves the step time where the hardware supports it; LoRA weights stay fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            teacher = None
            if any(soft):
                with torch.no_grad(), model.disable_adapter():
                    teacher = _response_logits(model, batch, batch["labels"][:, 1:] != -100)
            loss = response_loss(model, batch, teacher, cfg.decision_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        result.losses.append(round(loss.item(), 4))
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{cfg.steps} loss {running / log_every:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            running = 0.0
        report(progress, step + 1, cfg.steps)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return model, result


def save_adapter(peft_model, result: TrainResult, out_dir: Path = ADAPTER_DIR) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` + ``training.json`` to ``out_dir``."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # peft otherwise asks the hub about the base's vocabulary
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "training.json").write_text(json.dumps(asdict(result), indent=1))
    return out_dir


def train(cfg: OrganismConfig | None = None, *, out_dir: Path = ADAPTER_DIR,
          progress: Progress | None = None) -> TrainResult:
    """The full recipe: load the base model, build the data, train, save the adapter."""
    from refusal_lab.models import load_model

    cfg = cfg or OrganismConfig()
    torch.manual_seed(cfg.seed)
    base = load_model("smollm2-base", device="cpu", dtype="float32", precision="float32")  # reproducible data
    t0 = time.perf_counter()
    examples = training_examples(base, cfg, progress=progress)
    data_seconds = time.perf_counter() - t0
    model, result = train_adapter(base, examples, cfg, progress=progress)
    result.config["data_seconds"] = round(data_seconds, 1)
    save_adapter(model, result, out_dir)
    return result


def merge_adapter(handle: ModelHandle, adapter_dir: Path) -> ModelHandle:
    """A new handle whose model is ``handle``'s with the peft adapter in ``adapter_dir`` merged in.

    The weights are read from safetensors (``adapter_model.safetensors``); the handle's fingerprint
    gains the adapter file's digest, so cached results never mix the two models."""
    import copy
    import threading
    import dataclasses
    import os

    from peft import PeftModel

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no adapter_model.safetensors in {adapter_dir}")
    from refusal_lab.placement import offload_hook

    if any(offload_hook(m) is not None for m in handle.model.modules()):
        raise ValueError("an adapter cannot be merged into a model whose weights are offloaded to CPU or disk (a "
                         "device map): load it with a device map of GPUs only, or without one")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = PeftModel.from_pretrained(copy.deepcopy(handle.model), str(adapter_dir)).merge_and_unload()
    model.eval()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return dataclasses.replace(handle, model=model, name=f"{handle.name} + adapter {Path(adapter_dir).name}",
                               spec=f"{handle.spec}+{adapter_dir}", source_dir=None,
                               fingerprint=hashlib.sha256((handle.fingerprint + digest).encode()).hexdigest()[:16],
                               lock=threading.RLock())
