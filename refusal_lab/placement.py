"""Where a model's modules run and where their tensors are stored, for models on one device and for models
spread by accelerate's big-model loading (``device_map``: several GPUs, CPU and disk offload).

Three things are read here:

* **device maps and memory limits** as a user writes them (:func:`parse_device_map`,
  :func:`parse_max_memory`), checked against a model's module names (:func:`check_device_map`);
* **the device a module's forward runs on** (:func:`module_device`): accelerate's hook execution device
  when the model is dispatched, else the device of the module's tensors;
* **a module's tensors where they are stored** (:func:`read_tensor`, :func:`write_tensors`,
  :func:`replaced`). An offloaded module holds ``meta`` parameters; its values live in its accelerate
  hook's ``weights_map`` (CPU memory, or memory-mapped files on disk). Edits to those go where the
  originals are: CPU tensors stay in memory, disk tensors are written to disk (accelerate's
  ``offload_weight`` ``.dat`` files, read back through an ``OffloadedWeightsLoader``) in a private folder
  next to the offloaded weights. The original weights map is never changed: edits are an overlay put in
  front of it, which is how a copy of a model shares its unedited offloaded weights with the original.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from refusal_lab.store_files import pid_alive

DeviceMap = Union[str, dict[str, Union[int, str]]]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device-map strategies
MEMORY_KEYS = ("cpu", "mps", "disk")  # max_memory keys besides GPU indices
Edit = tuple[nn.Module, str, torch.Tensor]  # (module, tensor name, new value in the tensor's own layout)


# ----------------------------------------------------------------------------------------------
# Device maps and memory limits as users write them
# ----------------------------------------------------------------------------------------------

def _device_value(value: Any, where: str) -> int | str:
    """One device of a device map: a GPU index (int, or ``"N"``, ``"cuda"``, ``"cuda:N"``), ``cpu``, ``mps`` or
    ``disk`` → accelerate's form (an int for a GPU)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"device map entry {where!r}: {value!r} is not a device (use a GPU index, cpu, mps or disk)")
    if isinstance(value, int) or value.isdigit():
        if int(value) < 0:
            raise ValueError(f"device map entry {where!r}: GPU index {value} is negative")
        return int(value)
    if value in ("cpu", "mps", "disk"):
        return value
    kind, _, index = value.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        return int(index or 0)
    raise ValueError(f"device map entry {where!r}: {value!r} is not a device (use a GPU index, cpu, mps or disk)")


def parse_device_map(value: DeviceMap | None) -> DeviceMap | None:
    """A device map as given (``None``/``""`` = none; a strategy of :data:`STRATEGIES`; a dict or a JSON
    object mapping module names to devices) → ``None``, the strategy, or ``{module name: GPU index | "cpu" |
    "mps" | "disk"}``. ``ValueError`` with one clear line for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in STRATEGIES:
            return text
        if not text.startswith("{"):
            raise ValueError(f"device map {value!r}: use {', '.join(STRATEGIES)} or a JSON object "
                             '(e.g. {"model.layers.0": 0, "model.layers.1": "cpu", "": "disk"})')
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"device map is not valid JSON ({e})") from None
    if not isinstance(value, Mapping) or not value:
        raise ValueError("a device map must be a non-empty JSON object of module name → device")
    if any(not isinstance(k, str) for k in value):
        raise ValueError("device map keys must be module names (strings)")
    return {k: _device_value(v, k) for k, v in value.items()}


def parse_max_memory(value: str | Mapping | None) -> dict[str, str] | None:
    """Memory limits per device for accelerate's placement, written ``KEY=SIZE[,KEY=SIZE…]`` (or a dict),
    KEY a GPU index, ``cpu``, ``mps`` or ``disk``, SIZE bytes or a number with a unit (``10GiB``, ``500MB``)
    → ``{"0": "10GiB", "cpu": "30GiB"}`` (string keys: the stored, JSON-stable form). ``None``/``""`` = none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        pairs = []
        for part in value.split(","):
            key, sep, size = part.partition("=")
            if not sep or not key.strip() or not size.strip():
                raise ValueError(f"max memory {value!r}: write KEY=SIZE pairs separated by commas, "
                                 "e.g. 0=10GiB,cpu=30GiB")
            pairs.append((key.strip(), size.strip()))
        value = dict(pairs)
    if not isinstance(value, Mapping) or not value:
        raise ValueError("max memory must name at least one device, e.g. 0=10GiB,cpu=30GiB")
    from accelerate.utils import convert_file_size_to_int

    out: dict[str, str] = {}
    for key, size in value.items():
        key = str(key)
        if not (key.isdigit() or key in MEMORY_KEYS):
            raise ValueError(f"max memory: {key!r} is not a device (use a GPU index, cpu, mps or disk)")
        try:
            convert_file_size_to_int(size if isinstance(size, (int, str)) and not isinstance(size, bool) else "?")
        except ValueError:
            raise ValueError(f"max memory for {key}: {size!r} is not a size (use bytes or e.g. 10GiB, 500MB)") from None
        out[key] = str(size)
    return out


def accelerate_max_memory(max_memory: Mapping[str, str] | None) -> dict[int | str, str] | None:
    """The stored form of :func:`parse_max_memory` with GPU keys as ints (what accelerate expects)."""
    return None if max_memory is None else {int(k) if k.isdigit() else k: v for k, v in max_memory.items()}


def check_devices(device_map: DeviceMap | None, max_memory: Mapping[str, str] | None) -> None:
    """Refuse devices this machine does not have (``ValueError``)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = [(k, v) for k, v in (device_map.items() if isinstance(device_map, dict) else ())]
    wanted += [(f"max memory {k}", int(k) if k.isdigit() else k) for k in (max_memory or {})]
    for where, dev in wanted:
        if isinstance(dev, int) and dev >= gpus:
            raise ValueError(f"{where or '(whole model)'} is placed on GPU {dev}, but this machine has "
                             f"{gpus} CUDA device(s)")
        if dev == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"{where or '(whole model)'} is placed on mps, which this machine does not have")


def check_device_map(device_map: dict[str, int | str], model: nn.Module) -> None:
    """Every key of ``device_map`` must name a module of ``model`` (``""`` = the whole model), and every
    parameter and buffer must fall under one of them — ``ValueError`` naming what does not."""
    names = {name for name, _ in model.named_modules()}
    unknown = [k for k in device_map if k not in names]
    if unknown:
        shallow = [n for n in sorted(names) if n and n.count(".") <= 1]
        lists = [f"{n}.0 … {n}.{len(m) - 1}" for n, m in model.named_modules()
                 if n in shallow and isinstance(m, nn.ModuleList) and len(m)]
        raise ValueError(f"device map names {', '.join(map(repr, unknown))}, which {type(model).__name__} does not "
                         f"have (its modules include {', '.join(shallow[:8] + lists)})")

    def covered(name: str) -> bool:
        return "" in device_map or any(name == k or name.startswith(k + ".") for k in device_map)

    tensors = [n for n, _ in itertools.chain(model.named_parameters(), model.named_buffers())]
    missing = sorted({n.rsplit(".", 1)[0] for n in tensors if not covered(n)})
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"device map places no device for {', '.join(missing[:5])}{more}: add them, or an "
                         '"" entry for everything not named')


def resolve_placement(device: str, device_map: DeviceMap | None, max_memory: str | Mapping | None,
                      ) -> tuple[torch.device, DeviceMap, dict[str, str] | None]:
    """``(device the input embeddings will run on, parsed device map, parsed max memory)`` for a load with
    a device map (``device`` must then be ``auto``: the map places the model). ``ValueError`` for a bad map,
    limit, or a device this machine does not have."""
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if device_map is None:
        raise ValueError("a max memory only applies with a device map: add --device-map auto (or balanced, sequential)")
    if device != "auto":
        raise ValueError(f"give a device ({device}) or a device map, not both: the device map places the model")
    check_devices(device_map, max_memory)
    return planned_device(device_map, max_memory), device_map, max_memory


def planned_device(device_map: DeviceMap, max_memory: Mapping[str, str] | None = None) -> torch.device:
    """The device the input embeddings will run on under ``device_map``, before loading (to pick the default
    dtype and the precision): a GPU when the map uses one (the first it names: accelerate runs CPU- and
    disk-offloaded modules there), else the CPU (or mps)."""
    if isinstance(device_map, dict):
        gpus = [v for v in device_map.values() if isinstance(v, int)]
        if gpus:
            return torch.device("cuda", gpus[0])
        return torch.device("mps") if "mps" in device_map.values() else torch.device("cpu")
    if torch.cuda.is_available() and (max_memory is None or any(k.isdigit() for k in max_memory)):
        return torch.device("cuda", min((int(k) for k in (max_memory or {}) if k.isdigit()), default=0))
    return torch.device("cpu")


def describe(model: nn.Module) -> dict[str, int]:
    """How many modules accelerate placed on each device (``{"cuda:0": 14, "disk": 3}``); ``{}`` when the
    model was not dispatched."""
    counts: dict[str, int] = {}
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[key] = counts.get(key, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------
# Scratch folders for offloaded weights and their edits
# ----------------------------------------------------------------------------------------------

def _owner_tag(pid: int | None = None) -> str:
    """``p<PID>-<host digest>``: which process of which machine a scratch folder belongs to (a cache on a
    shared filesystem is seen by processes of other machines, whose PIDs mean nothing here)."""
    import hashlib
    import socket

    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"p{os.getpid() if pid is None else pid}-{host}"


def _purge_stale(root: Path) -> None:
    """Remove scratch folders this machine's processes left and that no longer run."""
    here = _owner_tag(0).split("-", 1)[1]
    for path in root.glob(f"p*-{here}-*"):
        pid = path.name[1:].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def scratch_folder(kind: str, parent: str | Path | None = None) -> Path:
    """A new private folder ``p<PID>-<host>-<kind>-…`` under ``parent`` (default: ``offload`` in the project cache),
    which must be a directory this process can write to, or be creatable in one (``ValueError`` otherwise):
    nothing already in ``parent`` is read or overwritten. Folders of processes that have ended are removed
    on the way (in the default place only)."""
    if parent is None:
        from refusal_lab.models import cache_dir

        parent = cache_dir() / "offload"
        parent.mkdir(parents=True, exist_ok=True)
        _purge_stale(parent)
    parent = Path(parent).expanduser()
    if not parent.exists() and parent.parent.is_dir() and os.access(parent.parent, os.W_OK):
        parent.mkdir()
    if not parent.is_dir():
        raise ValueError(f"offload folder {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"offload folder {str(parent)!r} is not writable")
    return Path(tempfile.mkdtemp(prefix=f"{_owner_tag()}-{kind}-", dir=parent))


def remove_with(owner: object, folder: Path) -> weakref.finalize:
    """Delete ``folder`` when ``owner`` is garbage-collected (or at exit)."""
    return weakref.finalize(owner, shutil.rmtree, str(folder), True)


def remove_with_model(model: nn.Module, folder: Path) -> weakref.finalize:
    """Delete a model's offload ``folder`` once nothing reads from it: when the weights map its offload
    hooks share is garbage-collected (copies of the model share it too, and their edits live inside the
    folder), or with the model when it has no offloaded weights."""
    from accelerate.utils import PrefixedDataset

    roots = {}
    for m in model.modules():
        if (hook := offload_hook(m)) is not None:
            root = hook.weights_map
            while isinstance(root, (_Overlay, PrefixedDataset)):
                root = root.base if isinstance(root, _Overlay) else root.dataset
            roots[id(root)] = root
    return remove_with(next(iter(roots.values())) if len(roots) == 1 else model, folder)


# ----------------------------------------------------------------------------------------------
# Where a module runs
# ----------------------------------------------------------------------------------------------

def _hooks(module: nn.Module) -> list:
    """accelerate's hooks on ``module`` (a ``SequentialHook`` unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _as_device(dev: int | str | torch.device) -> torch.device:
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def module_device(module: nn.Module, default: torch.device | str | None = None) -> torch.device:
    """The device ``module``'s forward runs on: its accelerate hook's execution device when it has one,
    else the device of its first tensor that is not on ``meta``, else ``default`` (or the CPU)."""
    for hook in _hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device(default) if default is not None else torch.device("cpu")


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks place ``model``'s modules (a device map of several devices, or offload)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


# ----------------------------------------------------------------------------------------------
# Where a module's tensors are stored
# ----------------------------------------------------------------------------------------------

def offload_hook(module: nn.Module):
    """The accelerate ``AlignDevicesHook`` that keeps ``module``'s own tensors offloaded (its weights map
    holds their values; the module holds ``meta`` placeholders), or None."""
    hooks = _hooks(module)
    if not hooks:
        return None
    from accelerate.hooks import AlignDevicesHook

    return next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None),
                None)


def _offloaded(module: nn.Module, name: str):
    """The offload hook holding ``module.<name>``'s value, when the module holds only a ``meta`` placeholder."""
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor) or t.device.type != "meta":
        return None
    hook = offload_hook(module)
    if hook is None:
        raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook says where "
                           "its value is stored (offloaded with preload_module_classes?): it cannot be read or edited")
    return hook


def read_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The value of ``module``'s tensor ``name`` (e.g. ``"weight"``) where it is stored: the module's own
    tensor, or — offloaded — its value from the weights map (CPU memory, or read from disk: a copy)."""
    hook = _offloaded(module, name)
    return getattr(module, name) if hook is None else hook.weights_map[name]


def is_offloaded(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is offloaded (a ``meta`` placeholder; the value in an accelerate weights map)."""
    return _offloaded(module, name) is not None


class _DiskEdits:
    """Edited tensors as accelerate ``.dat`` files (``offload_weight``) in a private folder, read back through
    an ``OffloadedWeightsLoader``; the folder is deleted with this object (or by :meth:`close`)."""

    _ids = itertools.count()

    def __init__(self, near: str | None) -> None:
        from accelerate.utils import OffloadedWeightsLoader

        parent = near if near is not None and Path(near).is_dir() and os.access(near, os.W_OK) else None
        self.folder = scratch_folder("edits", parent)
        self.loader = OffloadedWeightsLoader(save_folder=str(self.folder), index={})
        self.close = remove_with(self, self.folder)

    def put(self, value: torch.Tensor) -> str:
        from accelerate.utils import offload_weight

        key = f"t{next(self._ids)}"
        offload_weight(value.detach().contiguous(), key, str(self.folder), self.loader.index)
        return key

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.loader[key]


class _Overlay(Mapping):
    """A module's weights map ``base`` with some tensors replaced: ``edits`` maps a name to a tensor kept in
    memory, or to the key of one written to ``disk``. Never changed once made (copies of a model share it)."""

    def __init__(self, base: Mapping, edits: dict[str, torch.Tensor | str], disk: _DiskEdits | None) -> None:
        self.base, self.edits, self.disk = base, edits, disk

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.edits:
            e = self.edits[name]
            return self.disk[e] if isinstance(e, str) else e
        return self.base[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def _storage(weights_map: Mapping, name: str) -> tuple[bool, str | None]:
    """Whether ``weights_map[name]`` is read from disk, and the folder of the offloaded files (if any)."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    if isinstance(weights_map, _Overlay):
        if name in weights_map.edits:
            disk = isinstance(weights_map.edits[name], str)
            return disk, str(weights_map.disk.folder.parent) if disk else None
        return _storage(weights_map.base, name)
    if isinstance(weights_map, PrefixedDataset):
        return _storage(weights_map.dataset, weights_map.prefix + name)
    if isinstance(weights_map, OffloadedWeightsLoader):
        on_disk = name not in weights_map.state_dict and name in weights_map.index
        folder = weights_map.save_folder
        return on_disk, None if folder is None else str(folder)
    return False, None


def _offload_edits(edits: Sequence[Edit]) -> list[tuple[Any, Mapping, _Overlay]]:
    """For the offloaded tensors among ``edits``: ``(hook, its weights map, the map with the edits)``; disk
    tensors are written to disk, the others kept in memory on their storage device."""
    by_hook: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}
    for module, name, value in edits:
        hook = _offloaded(module, name)
        if hook is not None:
            by_hook.setdefault(id(hook), (hook, {}))[1][name] = value
    disk: _DiskEdits | None = None
    out = []
    for hook, values in by_hook.values():
        stored: dict[str, torch.Tensor | str] = {}
        for name, value in values.items():
            on_disk, folder = _storage(hook.weights_map, name)
            old = hook.weights_map[name]
            value = value.detach().to(device=old.device, dtype=old.dtype)
            if on_disk:
                disk = disk or _DiskEdits(folder)
                stored[name] = disk.put(value)
            else:
                stored[name] = value
        uses_disk = any(isinstance(v, str) for v in stored.values())
        out.append((hook, hook.weights_map, _Overlay(hook.weights_map, stored, disk if uses_disk else None)))
    return out


def write_tensors(edits: Sequence[Edit]) -> None:
    """Write each ``(module, name, value)`` where the tensor is stored, for good: in place into the module's
    own tensor, or — offloaded — as an overlay of its hook's weights map (disk tensors to disk)."""
    for hook, _, overlay in _offload_edits(edits):
        hook.weights_map = overlay
    with torch.no_grad():
        for module, name, value in edits:
            if _offloaded(module, name) is None:
                getattr(module, name).copy_(value)


@contextlib.contextmanager
def replaced(edits: Sequence[Edit]) -> Iterator[None]:
    """Each ``(module, name, value)`` in place of the module's tensor for the duration; everything is put
    back on exit, also when the block raises. A module's own tensor is swapped for a new ``Parameter`` (the
    original object is never modified, so tied weights keep reading it); an offloaded one is replaced by
    an overlay of its hook's weights map (disk tensors written to a private folder, deleted on exit)."""
    swapped: list[tuple[nn.Module, str, Any]] = []
    maps: list[tuple[Any, Mapping, _Overlay]] = []
    try:
        maps = _offload_edits(edits)
        for hook, _, overlay in maps:
            hook.weights_map = overlay
        for module, name, value in edits:
            if _offloaded(module, name) is None:
                original = module._parameters[name]
                module._parameters[name] = nn.Parameter(value.to(original.device, original.dtype),
                                                        requires_grad=False)
                swapped.append((module, name, original))
        yield
    finally:
        for module, name, original in reversed(swapped):
            module._parameters[name] = original
        for hook, base, overlay in maps:
            hook.weights_map = base
            if overlay.disk is not None:
                overlay.disk.close()


def model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()``'s entries with offloaded (``meta``) tensors read from where they are stored
    (bitsandbytes' CPU-packed 4-bit weights in their standard layout, the layers left packed)."""
    from refusal_lab.precision import kept_4bit_packing

    with kept_4bit_packing(model):
        entries = model.state_dict()
    for key, t in entries.items():
        if t.device.type == "meta":
            owner, _, name = key.rpartition(".")
            t = read_tensor(model.get_submodule(owner), name)
        yield key, t


def copy_memo(model: nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo under which a copy of ``model`` shares its offloaded tensors (the hooks'
    weights maps) instead of duplicating them; edits of the copy go to overlays of its own hooks."""
    return {id(h.weights_map): h.weights_map for m in model.modules() if (h := offload_hook(m)) is not None}


# ----------------------------------------------------------------------------------------------
# Loading with a device map
# ----------------------------------------------------------------------------------------------

def placement_options(source: Path | str, device_map: DeviceMap, max_memory: Mapping[str, str] | None,
                      offload_folder: str | Path | None, *, trust_remote_code: bool, local_only: bool) -> dict:
    """``from_pretrained`` keyword arguments placing a model by ``device_map`` (parsed: :func:`parse_device_map`)
    and ``max_memory`` (:func:`parse_max_memory`), after checking — on an empty (``meta``) copy of the model,
    before any weight is read — that a dict map names only modules the model has and places all of them.
    Disk offload goes to a new private folder under ``offload_folder`` (default: the project cache), which
    the caller removes with the model (:func:`remove_with`). ``ValueError`` for anything wrong."""
    if isinstance(device_map, dict):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local_only)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        check_device_map(device_map, skeleton)
    return {"device_map": device_map, "max_memory": accelerate_max_memory(max_memory),
            "offload_folder": str(scratch_folder("model", offload_folder))}
