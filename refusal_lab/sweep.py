"""Sweeps: many models × compression schemes, each (model, scheme) pair one task, run one after another in
this process or fanned out on a Ray cluster (:mod:`refusal_lab.sweep_ray`) — with the same results.

A sweep of models ``M`` and schemes ``S`` is one study per model (``StudySpec(model=m, schemes=S, …)``,
the folder ``python -m refusal_lab study`` would use). Per model, one task computes the original's
stages (directions, evaluation); once it is done, one task per scheme computes that scheme's stages
(:meth:`~refusal_lab.study.Study.run_scheme`), starting from the original's — computed once, not per task.

**Only the driver writes the run store.** A task gets a parcel (:mod:`refusal_lab.store_transfer`) of what
its study has stored, computes into a scratch store of its own machine and returns a parcel of what it
added; the driver writes it as soon as it arrives. So no filesystem needs to be shared, a task that dies
writes nothing, and a killed sweep, started again, recomputes only the stages that never reached the
driver (every stored one is in the parcels and is loaded, not computed). Each task pins its torch threads
(``cpus_per_task``), in either executor, so the two give bit-identical results on the same machine.

The sweep's own record — its spec and each task's outcome — is ``<store>/sweeps/<id>.json``
(:func:`list_sweeps`, the Report page).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from refusal_lab.codec import JsonRecord, optional
from refusal_lab.errors import error_line
from refusal_lab.store import RunStore, cache_key
from refusal_lab.store_files import atomic_write_bytes, json_bytes, slug, utc_now
from refusal_lab.study_spec import StudySpec

Status = Literal["queued", "running", "done", "failed"]
SWEEPS = "sweeps"  # the folder of sweep records inside a run store (no manifest: never taken for a study)


class SweepError(ValueError):
    """A sweep that cannot start (bad spec, unreachable cluster); its message is one line for the user."""


@dataclass
class SweepSpec(JsonRecord):
    """Models × schemes with the shared study options ``study`` (any :class:`StudySpec` field but
    ``model``/``schemes``). ``cpus_per_task``: torch threads (and, on Ray, CPUs declared) per task;
    None → ``min(4, CPUs of this machine)``. ``budget``: AIRD budget curves too."""

    models: list[str]
    schemes: list[str]
    study: dict = field(default_factory=dict)
    budget: bool = False
    cpus_per_task: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        from refusal_lab.compression import parse_scheme

        if not self.models:
            raise SweepError("a sweep needs at least one --model")
        if not self.schemes:
            raise SweepError("a sweep needs at least one --scheme")
        bad = [k for k in self.study if k in ("model", "schemes")]
        if bad:
            raise SweepError(f"study options may not set {bad}: give them as models/schemes")
        canonical = []
        for s in self.schemes:
            try:
                canonical.append(str(parse_scheme(s)))
            except ValueError as e:
                raise SweepError(f"scheme {s!r}: {e}") from None
        self.schemes = list(dict.fromkeys(canonical))
        self.models = list(dict.fromkeys(self.models))
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SweepError(f"cpus_per_task must be ≥ 1, got {self.cpus_per_task}")
        for m in self.models:
            self.study_spec(m)  # every option is checked before any task starts

    def study_spec(self, model: str) -> StudySpec:
        """The study of ``model``: every scheme of the sweep, the shared options."""
        try:
            return StudySpec(model=model, schemes=list(self.schemes), **self.study)
        except TypeError as e:
            raise SweepError(f"unknown study option: {e}") from None

    @property
    def threads(self) -> int:
        return self.cpus_per_task or max(1, min(4, os.cpu_count() or 1))

    @property
    def id(self) -> str:
        """The sweep's record name: its name (or ``sweep``) and a hash of what it computes."""
        what = {k: v for k, v in self.to_json().items() if k not in ("name", "cpus_per_task")}
        return f"{slug(self.name or 'sweep')}-{cache_key(what)[:10]}"

    def tasks(self) -> list["TaskOutcome"]:
        """Every task, queued: per model its original's task, then one per scheme."""
        return [TaskOutcome(model=m, scheme=s) for m in self.models for s in (None, *self.schemes)]


@dataclass
class TaskOutcome(JsonRecord):
    """One task: ``scheme`` None is the model's original stages. ``computed``: stage → seconds of the
    stages it computed (stored ones were loaded); ``error``: one line, when it failed."""

    model: str
    scheme: str | None = None
    status: Status = "queued"
    seconds: float | None = optional()
    computed: dict[str, float] = field(default_factory=dict)
    error: str | None = optional()
    study_id: str | None = optional()

    @property
    def label(self) -> str:
        return f"{self.model} · {self.scheme or 'original'}"


@dataclass
class SweepRecord(JsonRecord):
    """A sweep as stored: its spec, where it ran, when, and each task's outcome."""

    id: str
    spec: SweepSpec
    executor: str
    started: str
    tasks: list[TaskOutcome]
    finished: str | None = optional()
    studies: dict[str, str] = field(default_factory=dict)  # model → study id

    @property
    def ok(self) -> bool:
        return all(t.status == "done" for t in self.tasks)


# -- the task (runs in a Ray worker or in this process) -------------------------------------------

def run_task(payload: dict, parcel: bytes) -> dict:
    """Compute one task's stages into a scratch store seeded with ``parcel``; return the new stages.

    ``payload``: ``study`` (a :meth:`StudySpec.to_dict`), ``scheme`` (None: the original's stages),
    ``budget``, ``threads``. Returns ``{"parcel": bytes, "computed": {stage: seconds}, "seconds": float}``.
    Plain data in and out: all that crosses a process or machine boundary.
    """
    import torch

    from refusal_lab import __version__
    from refusal_lab.store_transfer import pack, unpack
    from refusal_lab.study import Study

    if payload.get("version", __version__) != __version__:
        raise SweepError(f"this worker runs Refusal Lab {__version__}, the driver {payload['version']}: install "
                         "the same version on every node")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(payload["threads"]))
    try:
        with tempfile.TemporaryDirectory(prefix="refusal-lab-task-") as tmp:
            study = Study(StudySpec.from_dict(payload["study"]), Path(tmp) / "runs")
            unpack(parcel, study.record)
            before = {k: study.record.entry(k)["path"] for k in study.record.keys()}
            if payload["scheme"] is None:
                study.run_original()
            else:
                study.run_scheme(payload["scheme"], bool(payload["budget"]))
            new = [k for k in study.record.keys() if before.get(k) != (study.record.entry(k) or {}).get("path")]
            return {"parcel": pack(study.record, new), "computed": dict(study.timings),
                    "seconds": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(threads)


# -- executors ------------------------------------------------------------------------------------

class Executor(Protocol):
    """Runs tasks: ``submit`` returns a handle at once; ``wait`` returns ``(done, pending)`` with at
    least one done; ``result`` is the task's return value or raises its error."""

    name: str

    def submit(self, payload: dict, parcel: bytes) -> Any: ...

    def wait(self, pending: list) -> tuple[list, list]: ...

    def result(self, handle: Any) -> dict: ...

    def shutdown(self) -> None: ...


class SequentialExecutor:
    """Every task in this process, one after another, in submission order."""

    name = "sequential"

    def __init__(self) -> None:
        self._queued: dict[int, tuple[dict, bytes]] = {}
        self._results: dict[int, tuple[dict | None, BaseException | None]] = {}
        self._count = 0
        self.on_start: Callable[[int], None] | None = None  # called as a task starts

    def submit(self, payload: dict, parcel: bytes) -> int:
        self._count += 1
        number = self._count
        self._queued[number] = (payload, parcel)
        return number

    def wait(self, pending: list) -> tuple[list, list]:
        number = pending[0]
        payload, parcel = self._queued.pop(number)
        if self.on_start is not None:
            self.on_start(number)
        try:
            self._results[number] = (run_task(payload, parcel), None)
        except Exception as e:  # noqa: BLE001 — a failed task is an outcome, as on Ray
            self._results[number] = (None, e)
        return [number], pending[1:]

    def result(self, handle: int) -> dict:
        value, error = self._results.pop(handle)
        if error is not None:
            raise error
        return value

    def shutdown(self) -> None:
        self._queued.clear()
        self._results.clear()


# -- the driver -----------------------------------------------------------------------------------

def sweep_path(store: RunStore, sweep_id: str) -> Path:
    return store.root / SWEEPS / f"{sweep_id}.json"


def save_record(store: RunStore, record: SweepRecord) -> Path:
    """Write the sweep's record (atomically; replaces the previous one of the same sweep)."""
    path = sweep_path(store, record.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json_bytes(record.to_json(), "sweep record"))
    return path


def list_sweeps(store: RunStore | str | Path) -> list[SweepRecord]:
    """The sweeps recorded in a run store, newest first (unreadable records are skipped)."""
    store = store if isinstance(store, RunStore) else RunStore(store)
    out = []
    for path in sorted((store.root / SWEEPS).glob("*.json")):
        try:
            out.append(SweepRecord.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.started, reverse=True)


def run_sweep(spec: SweepSpec, store: RunStore | str | Path, executor: Executor | None = None, *,
              on_task: Callable[[TaskOutcome], None] | None = None) -> SweepRecord:
    """Run every task of ``spec`` with ``executor`` (default: in this process), writing each task's stages
    to ``store`` as it finishes; ``on_task`` is called at every status change. Returns the record (also
    saved under ``<store>/sweeps/``). A failed task fails its model's scheme tasks if it was the original's;
    other tasks go on."""
    from refusal_lab import __version__
    from refusal_lab.store_transfer import pack, unpack
    from refusal_lab.study import Study

    store = store if isinstance(store, RunStore) else RunStore(store)
    executor = executor or SequentialExecutor()
    studies = {m: Study(spec.study_spec(m), store) for m in spec.models}
    record = SweepRecord(id=spec.id, spec=spec, executor=executor.name, started=utc_now(), tasks=spec.tasks(),
                         studies={m: s.id for m, s in studies.items()})
    for t in record.tasks:
        t.study_id = studies[t.model].id
    save_record(store, record)
    by_handle: dict[Any, TaskOutcome] = {}  # executor's handle (hashable) → its task

    def change(task: TaskOutcome, status: Status, **fields) -> None:
        task.status = status
        for k, v in fields.items():
            setattr(task, k, v)
        save_record(store, record)
        if on_task is not None:
            on_task(task)

    def submit(task: TaskOutcome, parcel: bytes) -> None:
        payload = {"study": studies[task.model].spec.to_dict(), "scheme": task.scheme, "budget": spec.budget,
                   "threads": spec.threads, "version": __version__}
        handle = executor.submit(payload, parcel)
        by_handle[handle] = task
        # an executor that says when a task starts (this process's) marks it running then; Ray runs a
        # task as soon as a worker with its resources is free, which it does not report: running at once
        change(task, "queued" if hasattr(executor, "on_start") else "running")

    if hasattr(executor, "on_start"):
        executor.on_start = lambda handle: change(by_handle[handle], "running")
    try:
        for m in spec.models:
            submit(next(t for t in record.tasks if t.model == m and t.scheme is None), pack(studies[m].record))
        while by_handle:
            done, _ = executor.wait(list(by_handle))
            for handle in done:
                task = by_handle.pop(handle)
                try:
                    value = executor.result(handle)
                    unpack(value["parcel"], studies[task.model].record)
                except Exception as e:  # noqa: BLE001 — reported per task; the sweep goes on
                    change(task, "failed", error=error_line(e))
                    if task.scheme is None:
                        for t in record.tasks:
                            if t.model == task.model and t.scheme is not None:
                                change(t, "failed", error=f"the original's stages failed: {task.error}")
                    continue
                change(task, "done", seconds=round(float(value["seconds"]), 3),
                       computed={k: round(float(v), 3) for k, v in value["computed"].items()})
                if task.scheme is None:  # its schemes start from the stored original stages
                    parcel = pack(studies[task.model].record)
                    for t in record.tasks:
                        if t.model == task.model and t.scheme is not None:
                            submit(t, parcel)
    finally:
        record.finished = utc_now()
        save_record(store, record)
        executor.shutdown()
    return record

