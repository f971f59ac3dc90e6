"""``distill``: a trained repair of a compressed model, with the original model as its teacher.

A peft LoRA adapter on the compressed model (the student) is trained so that its next-token
distributions match the original's (the teacher's): the loss is KL(teacher ‖ student), teacher-forced
over the first ``reply_tokens`` tokens of the teacher's own greedy replies to the bundled *train*
prompts (harmful, harmless, borderline, the everyday-task pool; :mod:`refusal_lab.distill_data`), with
prompt positions masked out. Never a public set.

The compressed weights are never changed: the student's model is copied with every parameter shared
(only LoRA's own matrices are new), so pruned matrices keep their zeros and bitsandbytes / HQQ layers
stay quantized (peft wraps them: the QLoRA set-up). Modes:

* ``adapter`` — LoRA kept separate; costs its parameters (:attr:`DistillResult.trainable_parameters`).
* ``merged`` — LoRA folded into copies of the targeted matrices (W + s·BA): they become dense, the
  density cost AIRD's merged mode reports too. Quantized targets cannot be merged (use ``adapter``).

Targets (``modules``): ``writers`` — the residual writers (attention and MLP output projections) of a
few blocks around the source layer of the original's refusal direction; ``all`` — every linear layer of
the decoder blocks. The defaults were chosen by measurement on the bundled val splits (``bench/distill.py``,
default + wanda:0.5, ten rounds, public sets evaluated only after each choice): ``all`` at rank 4 (it beat
the writers of blocks l*−2…l*+2 at rank 16); the state and refusal-direction terms at the source layer; the
train-only contrast pool (benign prompts with alarming words) where the original answers, with it and the
borderline prompts twice per epoch and the first reply token weighted 4; 160 steps (two epochs); and an
offset of 0.04 of the original's refusal direction after training. Deterministic for a seed (LoRA
initialisation and data order).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import torch

from refusal_lab.codec import JsonRecord, from_json, optional
from refusal_lab.distill_data import (DEFAULT_KINDS, PROMPT_KINDS, DistillError, TeacherReplies, reply_kl,
                                      teacher_replies, training_prompts)
from refusal_lab.distill_training import train_lora
from refusal_lab.models import (ModelHandle, find_blocks, is_plain_linear, linear_kind, linear_out_features,
                                weight_as_out_in)
from refusal_lab.precision import kept_4bit_packing
from refusal_lab.progress import Progress
from refusal_lab.results import Density, DistillSummary

__all__ = ["DISTILL_VERSION", "MODES", "MODULES", "DistillConfig", "DistillError", "DistillResult", "Distilled",
           "TeacherReplies", "distill", "distill_data", "reply_kl", "target_modules", "training_prompts",
           "compress_student", "config_from", "kept_replies"]

DISTILL_VERSION = "distill-5"  # bump when what training computes changes (part of cache keys); 2–5: bitsandbytes
#   4-bit students whose CPU weights were packed trained without gradient through them, or on garbage
Mode = Literal["adapter", "merged"]
Modules = Literal["writers", "all"]
MODES: tuple[str, ...] = get_args(Mode)
MODULES: tuple[str, ...] = get_args(Modules)
ADAPTER_FILE = "distill_adapter.safetensors"
SHIFT_KEY = "refusal_lab.shift"  # the offset's vector among the adapter's tensors (no peft name looks like it)
META_FILE = "distill_adapter.json"


@dataclass(kw_only=True)
class DistillConfig(JsonRecord):
    """Settings of a distill repair. ``layers`` None: for ``writers`` the blocks ``source − window …
    source + window``, for ``all`` every block. ``rank``/``lora_alpha``: LoRA's r and α (scale α/r);
    ``lr`` AdamW's peak learning rate (linear warm-up over ``warmup`` steps, then cosine to 0);
    ``reply_tokens``: teacher reply tokens scored per prompt; ``per_kind``: first N prompts of each kind
    (all when None); ``max_prompt_tokens``: longer chat-formatted prompts are left out;
    ``first_token_weight``: the loss weight of each reply's first token relative to the others (the
    loss is the weighted mean KL per reply token); ``oversample``: how many times each prompt of a kind
    appears per epoch (e.g. ``{"borderline": 3}``; others once); ``answered_only``: kinds whose prompts
    are kept only where the teacher's reply is not a refusal (e.g. ``["contrast"]``); ``state_weight``:
    adds that times :func:`~refusal_lab.distill_data.state_distance` between the student's and the
    teacher's residual stream leaving block ``state_layer`` (default: the source layer) at the
    post-instruction positions — where the refusal direction is read — to the loss; ``direction_weight``:
    adds that times :func:`~refusal_lab.distill_data.direction_distance` there, the same streams'
    gap along the original's refusal direction only (training then needs that direction); ``on_policy``:
    the last share of the steps scores the KL on the student's *own* greedy replies (made once, by the
    LoRA'd student as it is when that share starts) instead of the teacher's — the prefixes it will
    really continue, loops included (on-policy distillation; 0: teacher replies throughout)."""

    mode: str = "adapter"
    modules: str = "all"  # measured on default + wanda:0.5 (bench/distill.py): all at rank 4 beat writers at rank 16
    layers: list[int] | None = None
    window: int = 2
    rank: int = 4
    lora_alpha: float = 8.0
    steps: int = 160  # two epochs of the default prompts; chosen on val over 80 and 200 (bench/distill.py)
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 10
    reply_tokens: int = 32
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    per_kind: int | None = None
    max_prompt_tokens: int = 256
    seed: int = 0
    first_token_weight: float = 4.0  # loss weight of each reply's first token (the others weigh 1; 4 chosen on val)
    oversample: dict[str, int] = field(default_factory=lambda: {"contrast": 2, "borderline": 2})  # kind → times its
    #                                                             prompts appear per epoch (chosen on val, round 7)
    answered_only: list[str] = field(default_factory=lambda: ["contrast"])  # kinds trained on where the teacher
    #                                                                         answered only
    state_weight: float = 4.0  # weight of the residual-stream term (0: the KL alone); 4 chosen on val among
    #                            0/4/16 (bench/distill.py, fourth round)
    state_layer: int | None = None  # block whose output the term matches (None: the source layer)
    direction_weight: float = 8.0  # weight of the refusal-direction term (0: none); 8 chosen on val among
    #                                0/8/32 with the state term at 4 (bench/distill.py, fifth round)
    on_policy: float = 0.5  # share of the steps (the last ones) trained on the student's own replies (0.5 chosen
    #                         on val among 0/0.25/0.5/0.75, bench/distill.py round 11)
    offset: float = 0.12  # after training, the stream leaving the state block shifted by −offset × the original's
    #                       raw refusal direction (a fraction of its harmful − harmless mean gap; 0: none; 0.12
    #                       chosen on val among 0.04/0.08/0.12 with on_policy 0.5, bench/distill.py round 11)

    def needs_source_layer(self) -> bool:
        """Whether training needs the original's refusal source layer: ``writers`` without explicit layers
        (they sit around it), or a state or direction term or an offset without its own ``state_layer``."""
        writers_around_source = self.modules == "writers" and self.layers is None
        return writers_around_source or bool((self.matches_states() or self.offset) and self.state_layer is None)

    def matches_states(self) -> bool:
        """Whether the loss compares residual streams (a state or a direction term)."""
        return bool(self.state_weight or self.direction_weight)

    def state_block(self, source_layer: int | None) -> int | None:
        """The block whose output the state and direction terms match and the offset shifts: ``state_layer``,
        else the source layer."""
        return self.state_layer if self.state_layer is not None else source_layer

    def needs_direction(self) -> bool:
        """Whether training needs the original's refusal direction (a direction term or an offset)."""
        return bool(self.direction_weight or self.offset)

    def check(self) -> None:
        """Raise :class:`DistillError` for a setting out of range."""
        if self.mode not in MODES:
            raise DistillError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.modules not in MODULES:
            raise DistillError(f"modules must be one of {', '.join(MODULES)}, got {self.modules!r}")
        for name in ("rank", "steps", "batch_size", "reply_tokens", "max_prompt_tokens"):
            if int(getattr(self, name)) < 1:
                raise DistillError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.window < 0 or self.warmup < 0 or not self.lr > 0 or not self.lora_alpha > 0:
            raise DistillError("window and warmup must be ≥ 0, lr and lora_alpha > 0")
        if self.per_kind is not None and self.per_kind < 1:
            raise DistillError(f"per_kind must be ≥ 1 or None, got {self.per_kind}")
        if not self.first_token_weight > 0:
            raise DistillError(f"first_token_weight must be > 0, got {self.first_token_weight}")
        bad = {k: v for k, v in self.oversample.items() if k not in PROMPT_KINDS or int(v) < 1}
        if bad:
            raise DistillError(f"oversample maps a prompt kind ({', '.join(PROMPT_KINDS)}) to a count ≥ 1, got {bad}")
        for name in ("state_weight", "direction_weight", "offset"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise DistillError(f"{name} must be a finite number ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.on_policy < 1:
            raise DistillError(f"on_policy is a share of the steps in [0, 1), got {self.on_policy}")
        unknown = [k for k in self.answered_only if k not in PROMPT_KINDS]
        if unknown:
            raise DistillError(f"answered_only takes prompt kinds ({', '.join(PROMPT_KINDS)}), got {unknown}")

    def key_json(self) -> dict:
        """:meth:`to_json` without the settings added after the first stored repairs while they are at
        the value they had before they existed: a repair stored before them keeps its cache key."""
        out = self.to_json()
        for name, before in ADDED_SETTINGS:
            if out.get(name) == before:
                out.pop(name, None)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "DistillConfig":
        """The settings stored as ``data``; one stored before a setting existed gets that setting's value
        of then (not today's default, which later rounds moved): it decodes as the repair it was."""
        return from_json(cls, _as_stored_then(data))


# settings added after the first stored repairs, with the value they had before (which they keep when absent)
ADDED_SETTINGS = (("first_token_weight", 1.0), ("oversample", {}), ("answered_only", []), ("state_weight", 0.0),
                  ("state_layer", None), ("direction_weight", 0.0), ("offset", 0.0), ("on_policy", 0.0))


def _as_stored_then(data: dict) -> dict:
    """Stored settings ``data`` with each setting added after they were stored at its value of then."""
    return {**{name: copy.deepcopy(before) for name, before in ADDED_SETTINGS}, **data}


def config_from(overrides: dict | None = None) -> DistillConfig:
    """:class:`DistillConfig` with ``overrides`` (field name → value, e.g. ``{"steps": 20}``) over its
    defaults, checked: an unknown name, a value of the wrong type or out of range is a :class:`DistillError`."""
    import dataclasses

    overrides = dict(overrides or {})
    names = [f.name for f in dataclasses.fields(DistillConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise DistillError(f"unknown distill setting(s) {', '.join(unknown)}: use {', '.join(names)}")
    try:
        cfg = DistillConfig.from_json({**DistillConfig().to_json(), **overrides})
    except ValueError as e:  # pydantic's ValidationError: name the setting, not pydantic's layout
        errors = e.errors() if hasattr(e, "errors") else []
        bad = sorted({str(err["loc"][0]) for err in errors if err.get("loc")})
        shown = ", ".join(f"{k}={overrides[k]!r}" for k in bad if k in overrides) or str(e).splitlines()[0]
        raise DistillError(f"distill setting of the wrong type: {shown}") from None
    cfg.check()
    return cfg


@dataclass(kw_only=True)
class DistillResult(JsonRecord):
    """What a distill repair did and cost: the settings, the LoRA'd modules (names in the model) and
    blocks, LoRA's parameter count, the loss per step (mean KL(teacher ‖ student) per reply token,
    nats), prompts per kind and reply tokens trained on, seconds (teacher replies, training), and the
    density of the targeted matrices before and after (after = before in ``adapter`` mode)."""

    config: DistillConfig
    layers: list[int]
    targets: list[str]
    source_layer: int | None = None
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    n_prompts: dict[str, int] = field(default_factory=dict)
    n_reply_tokens: int = 0
    data_key: str = ""
    seconds_data: float = 0.0
    seconds_train: float = 0.0
    precision: str = "float32"
    density_before: Density | None = optional()
    density_after: Density | None = optional()
    densified_weights: int = 0
    version: str = DISTILL_VERSION

    @property
    def seconds(self) -> float:
        return self.seconds_data + self.seconds_train

    @classmethod
    def from_json(cls, data: dict) -> "DistillResult":
        """The result stored as ``data``, its settings decoded by :meth:`DistillConfig.from_json`."""
        return from_json(cls, {**data, "config": _as_stored_then(data["config"])})

    def summary(self) -> DistillSummary:
        """The result without the per-step losses and module names (what an evaluation carries)."""
        c = self.config
        return DistillSummary(mode=c.mode, modules=c.modules, layers=list(self.layers), rank=c.rank, steps=c.steps,
                              trainable_parameters=self.trainable_parameters,
                              loss_first=self.losses[0] if self.losses else None,
                              loss_last=self.losses[-1] if self.losses else None, n_prompts=dict(self.n_prompts),
                              n_reply_tokens=self.n_reply_tokens, seconds_data=self.seconds_data,
                              seconds_train=self.seconds_train, version=self.version, offset=c.offset)


# ----------------------------------------------------------------------------------------------
# Targets and checks
# ----------------------------------------------------------------------------------------------

def _in_features(mod: torch.nn.Module) -> int:
    if is_plain_linear(mod):
        return int(weight_as_out_in(mod).shape[1])
    return int(getattr(mod, "in_features"))


def repair_layers(handle: ModelHandle, cfg: DistillConfig, source_layer: int | None) -> list[int]:
    """The blocks whose linears get LoRA (see :class:`DistillConfig`)."""
    n = handle.n_layers
    if cfg.layers is not None:
        layers = sorted({int(x) for x in cfg.layers})
        bad = [x for x in layers if not 0 <= x < n]
        if bad or not layers:
            raise DistillError(f"distill layers {bad or '[]'} outside [0, {n})")
        return layers
    if cfg.modules == "all":
        return list(range(n))
    if source_layer is None:
        raise DistillError("modules 'writers' needs the source layer of the original's refusal direction "
                           "(source_layer) or explicit layers")
    if not 0 <= source_layer < n:
        raise DistillError(f"source layer {source_layer} outside [0, {n})")
    return list(range(max(0, source_layer - cfg.window), min(n, source_layer + cfg.window + 1)))


def state_match(handle: ModelHandle, cfg: DistillConfig, source_layer: int | None,
                lowest: int) -> tuple[int, int] | None:
    """``(block, positions)`` the residual-stream term matches (block ``cfg.state_layer`` or the source
    layer, the prompt's post-instruction positions), or None when the loss has no state or direction
    term (:meth:`DistillConfig.matches_states`); a block
    outside the model, or below the lowest adapted block ``lowest`` (the term could not move), is a
    :class:`DistillError`."""
    from refusal_lab.activations import post_instruction_length

    if not cfg.matches_states():
        return None
    layer = cfg.state_block(source_layer)
    if layer is None:
        raise DistillError("state and direction terms need a state_layer or the source layer of the original's "
                           "refusal direction")
    if not lowest <= layer < handle.n_layers:
        raise DistillError(f"state layer {layer} must be in [{lowest}, {handle.n_layers}): the lowest adapted "
                           f"block is {lowest}")
    return int(layer), post_instruction_length(handle)


def target_modules(handle: ModelHandle, cfg: DistillConfig, layers: Sequence[int]) -> dict[str, torch.nn.Module]:
    """``{name in the model: module}`` of the linears LoRA adapts, in model order; a LoRA rank larger
    than a target's smaller dimension, or a merge into quantized storage, is a :class:`DistillError`."""
    names = {id(m): name for name, m in handle.model.named_modules()}
    mods: list[torch.nn.Module] = []
    for layer in layers:
        if cfg.modules == "writers":
            mods += list(handle.writers(layer).values())
        else:
            mods += [m for _, m in handle.blocks[layer].named_modules() if linear_kind(m) is not None]
    out = {names[id(m)]: m for m in mods}
    for name, mod in out.items():
        small = min(_in_features(mod), linear_out_features(mod))
        if cfg.rank > small:
            raise DistillError(f"LoRA rank {cfg.rank} is larger than {name} allows ({_in_features(mod)} in, "
                               f"{linear_out_features(mod)} out): use a rank ≤ {small}")
        if cfg.mode == "merged" and not is_plain_linear(mod):
            raise DistillError(f"merged mode folds LoRA into the weights, but {name} is {type(mod).__name__} "
                               "(quantized storage); use mode 'adapter', which keeps it quantized")
    order = {name: i for i, name in enumerate(names.values())}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def density(mods: Sequence[torch.nn.Module]) -> Density:
    """Non-zero weights / total of ``mods`` (quantized layers count as dense)."""
    nnz = total = 0
    for mod in mods:
        if is_plain_linear(mod):
            nnz += int((mod.weight != 0).sum())
            total += mod.weight.numel()
        else:
            n = _in_features(mod) * linear_out_features(mod)
            nnz, total = nnz + n, total + n
    return Density(nonzero=nnz, total=total, density=nnz / total if total else math.nan)


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------

def _lora_config(cfg: DistillConfig, targets: dict[str, torch.nn.Module]):
    from peft import LoraConfig

    conv1d = any(linear_kind(m) == "conv1d" for m in targets.values())  # GPT-2 stores its weights (in, out)
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(targets),
                      bias="none", fan_in_fan_out=conv1d)


def _adapted_copy(student: ModelHandle, cfg: DistillConfig, targets: dict[str, torch.nn.Module], seed: int):
    """A :class:`peft.LoraModel` over a copy of the student's model: every parameter shared with the
    student (in ``merged`` mode the targets' own are copied, so merging leaves the student as it was),
    fresh LoRA matrices initialised from ``seed`` (B = 0: the copy starts as the student)."""
    from peft import LoraModel

    own = {id(p) for m in targets.values() for p in m.parameters()} if cfg.mode == "merged" else set()
    memo = {id(p): p for p in student.model.parameters() if id(p) not in own}
    with student.lock:
        model = copy.deepcopy(student.model, memo)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = LoraModel(model, _lora_config(cfg, targets), "default")
    return lora


def _lora_state(lora) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    with kept_4bit_packing(lora.model):  # bitsandbytes unpacks CPU-packed 4-bit weights on state_dict()
        return {k: v.detach().cpu().contiguous().clone() for k, v in get_peft_model_state_dict(lora).items()}


@dataclass
class Distilled:
    """A trained distill repair: the LoRA weights ``lora`` (peft state-dict names → tensors), the
    :class:`DistillResult` and, with an ``offset``, the ``shift`` ``(d_model,)`` added to the stream leaving
    block :attr:`shift_layer`; :meth:`apply` puts it on the compressed model it was trained on."""

    lora: dict[str, torch.Tensor]
    result: DistillResult
    shift: torch.Tensor | None = None

    @property
    def shift_layer(self) -> int | None:
        """The block whose output the shift moves (the state layer, else the source layer)."""
        return self.result.config.state_block(self.result.source_layer)

    def key(self) -> tuple:
        """What the repaired model's function depends on (for cache keys): mode and a digest of the weights."""
        h = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(t.float().numpy().tobytes())
        return (self.result.config.mode, h.hexdigest()[:16])

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.lora) if self.shift is None else {**self.lora, SHIFT_KEY: self.shift}

    def with_offset(self, offset: float, direction: torch.Tensor) -> "Distilled":
        """This repair with another ``offset`` (the same trained LoRA: the offset never enters training),
        ``direction`` the original's raw refusal direction ``(d_model,)`` — an offset is tuned without
        training again."""
        cfg = replace(self.result.config, offset=float(offset))
        cfg.check()
        if cfg.offset and self.shift_layer is None:
            raise DistillError("offset shifts the output of the state layer or the source layer; "
                               "this repair has neither")
        result = replace(self.result, config=cfg)
        return Distilled(lora=dict(self.lora), result=result, shift=_shift(cfg, direction))

    def describe(self) -> dict:
        return self.result.to_json()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "Distilled":
        lora = dict(tensors)
        return cls(lora=lora, result=DistillResult.from_json(meta), shift=lora.pop(SHIFT_KEY, None))

    def save(self, folder: str | Path) -> Path:
        """``distill_adapter.safetensors`` (LoRA weights) + ``distill_adapter.json`` (the result) in ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(folder / ADAPTER_FILE))
        (folder / META_FILE).write_text(json.dumps(self.describe(), indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Distilled":
        from safetensors.torch import load_file

        folder = Path(folder)
        return cls.from_tensors(load_file(str(folder / ADAPTER_FILE)), json.loads((folder / META_FILE).read_text()))

    def apply(self, student: ModelHandle) -> ModelHandle:
        """A new handle: ``student`` (the compressed model) with this repair — LoRA attached in ``adapter``
        mode, folded into copies of the targets in ``merged`` mode. ``student`` is not modified."""
        from peft import set_peft_model_state_dict

        r = self.result
        targets = target_modules(student, r.config, r.layers)
        if sorted(targets) != sorted(r.targets):
            raise DistillError("this distill repair was trained on another model: its target modules differ")
        lora = _adapted_copy(student, r.config, targets, r.config.seed)
        with kept_4bit_packing(lora.model):
            set_peft_model_state_dict(lora, self.lora)
        return _handle(student, lora, self)


def _shift(cfg: DistillConfig, direction: torch.Tensor | None) -> torch.Tensor | None:
    """The offset's shift ``−offset × direction`` ``(d_model,)`` (None without an offset)."""
    if not cfg.offset:
        return None
    if direction is None:
        raise DistillError("an offset needs the original's refusal direction")
    return (-cfg.offset * direction.detach().float().cpu()).contiguous()


def _handle(student: ModelHandle, lora, repair: Distilled) -> ModelHandle:
    """The repaired handle around a trained :class:`peft.LoraModel` (merged into its copy in ``merged`` mode)."""
    model = lora.merge_and_unload() if repair.result.config.mode == "merged" else lora.model
    model.eval()
    model.requires_grad_(False)
    if repair.shift is not None:
        _shift_stream(find_blocks(model)[repair.shift_layer], repair.shift)
    digest = repair.key()[1]
    suffix = f"distill({repair.result.config.mode},{digest})"
    return ModelHandle(model=model, tokenizer=student.tokenizer, name=f"{student.name} + distill",
                       spec=f"{student.spec}+{suffix}",
                       fingerprint=hashlib.sha256(f"{student.fingerprint}|{suffix}".encode()).hexdigest()[:16],
                       chat_template=student.chat_template, system_prompt=student.system_prompt,
                       precision=student.precision,
                       meta={**student.meta, "parent_fingerprint": student.fingerprint, "edit": suffix},
                       lock=threading.RLock())


def _shift_stream(block: torch.nn.Module, shift: torch.Tensor) -> None:
    """``block``'s output residual stream + ``shift`` at every position, as a forward hook on ``block`` —
    a block of the repaired handle's own copy of the model (never the compressed model's: that copy's
    modules are new, only parameters are shared), so the hook lives and goes with that copy."""
    from refusal_lab.interventions import _Cast, _out_hook  # the activation addition's own cast and hook

    v = _Cast(shift)
    block.register_forward_hook(_out_hook(lambda x: x + v.like(x)))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def distill_data(teacher: ModelHandle, cfg: DistillConfig, *, progress: Progress | None = None) -> TeacherReplies:
    """The teacher's replies to the bundled train prompts of ``cfg.kinds`` (first ``cfg.per_kind`` each)."""
    cfg.check()
    prompts = training_prompts(cfg.kinds, cfg.per_kind)
    if not prompts:
        raise DistillError(f"no training prompts left after filtering (kinds {cfg.kinds}, per_kind {cfg.per_kind})")
    return kept_replies(teacher, teacher_replies(teacher, prompts, tokens=cfg.reply_tokens,
                                                 max_prompt_tokens=cfg.max_prompt_tokens, progress=progress), cfg)


def kept_replies(teacher: ModelHandle, data: TeacherReplies, cfg: DistillConfig) -> TeacherReplies:
    """``data`` without the replies ``cfg.answered_only`` leaves out (the teacher's refusals of those kinds);
    none left is a :class:`DistillError`."""
    if not cfg.answered_only:
        return data
    kept = data.answered_only(cfg.answered_only, lambda ids: teacher.tokenizer.decode(ids, skip_special_tokens=True))
    if not len(kept):
        raise DistillError(f"no training prompts left after filtering: the teacher refused every prompt of "
                           f"{cfg.answered_only} and there are no others")
    return kept


def _check_pair(teacher: ModelHandle, student: ModelHandle) -> None:
    t, s = teacher.model.config, student.model.config
    same = (teacher.n_layers == student.n_layers and teacher.d_model == student.d_model
            and getattr(t, "vocab_size", None) == getattr(s, "vocab_size", None))
    if not same:
        raise DistillError(f"the student {student.name} is not a compressed copy of the teacher {teacher.name}: "
                           "layers, width or vocabulary differ")


def _lowest_block(handle: ModelHandle, targets: dict[str, torch.nn.Module]) -> int:
    """The lowest block holding a target (blocks below it are frozen as a whole)."""
    ids = {id(m) for m in targets.values()}
    return min(i for i, blk in enumerate(handle.blocks) if any(id(m) in ids for m in blk.modules()))


def distill(teacher: ModelHandle, student: ModelHandle, cfg: DistillConfig | None = None, *,
            source_layer: int | None = None, data: TeacherReplies | None = None,
            data_progress: Progress | None = None, progress: Progress | None = None,
            states_progress: Progress | None = None, own_progress: Progress | None = None,
            precompute_states: bool = True, direction: torch.Tensor | None = None) -> tuple[ModelHandle, Distilled]:
    """Train a distill repair of ``student`` (a compressed copy of ``teacher``) → ``(repaired handle,
    the repair)``. ``data``: the teacher's replies (:func:`distill_data`; built when None, reported to
    ``data_progress``); ``states_progress`` gets the batches of the precomputed passes, then ``progress``
    ``(step, steps)`` (with ``cfg.on_policy``, ``own_progress`` the student's replies mid-training);
    raising :class:`~refusal_lab.progress.Cancelled` from any of them stops the training (nothing is left
    changed).
    ``source_layer``: the original's refusal source layer (``writers`` without explicit layers, the state
    and direction terms); ``direction``: the original's refusal direction ``(d_model,)`` (the direction term).
    ``precompute_states``: run the teacher once and the student's blocks below the lowest LoRA'd block
    once, instead of at every step (:func:`~refusal_lab.distill_data.precompute`; the same loss up to
    batching round-off). Neither handle is modified."""
    cfg = cfg or DistillConfig()
    cfg.check()
    _check_pair(teacher, student)
    layers = repair_layers(student, cfg, source_layer)
    targets = target_modules(student, cfg, layers)  # before the costly part: bad settings fail at once
    lowest = _lowest_block(student, targets)
    state = state_match(student, cfg, source_layer, lowest)
    if cfg.needs_direction() and (direction is None or tuple(direction.shape) != (student.d_model,)):
        raise DistillError("direction_weight and offset need the original's refusal direction of shape "
                           f"({student.d_model},), "
                           f"got {None if direction is None else tuple(direction.shape)}")
    shift_layer = cfg.state_block(source_layer)
    if cfg.offset and (shift_layer is None or not 0 <= shift_layer < student.n_layers):
        raise DistillError(f"offset shifts the output of the state layer or the source layer, got {shift_layer} "
                           f"(the model has {student.n_layers} blocks)")
    t0 = time.perf_counter()
    if data is None:
        data = distill_data(teacher, cfg, progress=data_progress)
    elif data.tokens != cfg.reply_tokens or data.teacher != teacher.fingerprint:
        raise DistillError("the teacher replies given were made by another teacher or with another reply length")
    if not len(data):
        raise DistillError("no training prompts left after filtering: the teacher replies given are empty")
    seconds_data = time.perf_counter() - t0
    lora = _adapted_copy(student, cfg, targets, cfg.seed)
    t1 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        losses = train_lora(teacher, student, lora, data, cfg, lowest, precompute_states, progress, state,
                        None if direction is None else direction.detach().float(), states_progress, own_progress)
    before = density(list(targets.values()))
    result = DistillResult(config=cfg, layers=layers, targets=list(targets), source_layer=source_layer,
                           trainable_parameters=sum(p.numel() for p in lora.parameters() if p.requires_grad),
                           losses=losses, n_prompts=data.counts(), n_reply_tokens=data.n_reply_tokens,
                           data_key=data.key(), seconds_data=round(seconds_data, 2),
                           seconds_train=round(time.perf_counter() - t1, 2), precision=student.precision,
                           density_before=before)
    repair = Distilled(lora=_lora_state(lora), result=result, shift=_shift(cfg, direction))
    repaired = _handle(student, lora, repair)
    after = density([repaired.model.get_submodule(name) for name in targets]) if cfg.mode == "merged" else before
    result.density_after = after
    result.densified_weights = after.nonzero - before.nonzero
    return repaired, repair


def compress_student(teacher: ModelHandle, scheme: str, *, progress: Progress | None = None) -> ModelHandle:
    """The compressed model ``scheme`` makes of ``teacher`` (:func:`refusal_lab.compression.apply`), with a
    scheme the model cannot take (unknown, unavailable here, impossible for its shapes) as a
    :class:`DistillError`."""
    from refusal_lab.compression import apply

    try:
        student, _ = apply(teacher, scheme, progress=progress)
    except (ValueError, RuntimeError) as e:
        raise DistillError(f"{teacher.name} cannot take the compression scheme {scheme!r}: {e}") from e
    return student
