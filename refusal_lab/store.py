"""Persistent run store: one folder per study, every stage artifact cached on disk.

Layout of a store (default ``runs/``)::

    runs/
      <slug>-<spechash>/          one study (see :meth:`RunStore.create_study`)
        manifest.json             spec, timestamps and one entry per cached artifact
        spec.json                 the study spec, written once (used to rebuild a corrupt manifest)
        objects/                  artifacts, named ``<sha256(key)[:16]>-<nonce>.<ext>``, each with its
                                  entry record ``<name>.entry.json`` (a copy of its manifest entry)
        orphans/                  files a damaged manifest's rebuild found no record for (kept, never deleted)
        .lock                     OS file lock guarding manifest read-modify-write

An artifact is addressed by a *cache key* chosen by the caller (see :func:`cache_key`) and
tagged with the *stage* that produced it. Manifest entry (``manifest["stages"][key]``)::

    {"stage": str, "key": str, "kind": "tensors" | "json" | "table" | "folder",
     "path": "objects/...",                      # the file (or folder) holding the artifact
     "files": [{"path": "objects/...", "sha256": hex, "bytes": int}, ...],
     "done_at": ISO-8601 UTC, "seconds": float | None, "meta": {...},
     "entry_sha256": hex}                         # seal: sha256 of the entry's other fields

Crash safety: each artifact is written under a hidden temporary name, flushed and fsync'ed,
then renamed (``os.replace``) to a fresh unique name; the manifest is rewritten the same way
*last*. A process killed at any moment (even SIGKILL) therefore leaves a store whose manifest
only lists complete, checksummed files; the interrupted entry is simply absent, and leftovers
are removed by :meth:`StudyRecord.gc` (run whenever a study is opened).

Integrity: :meth:`StudyRecord.has` is true only if the entry's seal holds (so no value a result
depends on — its meta, e.g. an AIRD repair's α — was edited) and every file of the entry exists,
matches its sha256 and parses (safetensors header, JSON, Parquet footer). The index can be lost
without the data: a missing or corrupt manifest is rebuilt from the objects' records, and an entry
that is missing or fails its seal is restored from its object's record when that is intact; gc
records a write killed between its record and the manifest, and never deletes what a damaged index
no longer lists (``orphans/``). ``get_*`` re-check the sha256
of the bytes they read and raise :class:`StoreError` with a clear message otherwise, so the
caller recomputes. Tensors are stored as safetensors only; no code path here deserialises
arbitrary Python objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from refusal_lab.store_files import (FORMAT_VERSION, MANIFEST, SPEC, TRASH, StoreError, StoreWarning, atomic_write_bytes,
                             forget_lock, fsync, json_bytes, lock_for, parse_time, remove, slug, tmp_name,
                             tree_size, utc_now)
from refusal_lab.study_record import StudyRecord

__all__ = [
    "RunStore",
    "StudyRecord",
    "StudyInfo",
    "StoreError",
    "StoreWarning",
    "cache_key",
]


def cache_key(*parts: Any) -> str:
    """Stable 16-hex-digit key of JSON-serialisable ``parts`` (dict keys sorted).

    Tuples hash like lists. Raises ``TypeError`` for anything JSON cannot encode
    (convert paths, sets and tensors to plain values first).
    """
    try:
        text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cache_key parts must be JSON-serialisable: {e}") from e
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tensor_key(t: Any) -> str:
    """16-hex-digit digest of a tensor's values (its bytes on the CPU), for cache keys."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]




@dataclass(frozen=True)
class StudyInfo:
    """Summary of one study for listings."""

    id: str
    name: str
    created: datetime
    updated: datetime
    stages: dict[str, int]  # stage name -> number of cached entries
    size_bytes: int
    path: Path
    problem: str | None = None  # set when the manifest could not be read
    spec: dict = field(default_factory=dict, repr=False)

    @property
    def entries(self) -> int:
        """Total number of cached entries."""
        return sum(self.stages.values())


class RunStore:
    """A folder of studies (default ``runs/``), one sub-folder per study."""

    def __init__(self, root: Path | str = "runs") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    @staticmethod
    def study_id(name: str, spec: dict) -> str:
        """Folder name of a study: ``<slug of name>-<first 10 hex of cache_key(spec)>``."""
        return f"{slug(name)}-{cache_key(spec)[:10]}"

    def _dir(self, study_id: str) -> Path:
        if (
            not isinstance(study_id, str)
            or not study_id
            or study_id.startswith(".")
            or "/" in study_id
            or "\\" in study_id
        ):
            raise StoreError(f"invalid study id {study_id!r}")
        path = self.root / study_id
        if not (path / SPEC).is_file() and not (path / MANIFEST).is_file():
            raise StoreError(f"no study {study_id!r} in {self.root}")
        return path

    def create_study(self, name: str, spec: dict) -> StudyRecord:
        """Create (or return the existing) study for ``name`` + ``spec``; idempotent.

        ``spec`` must be JSON-serialisable; the same name and spec always map to the same
        folder, so a rerun after a crash finds its cached stages.
        """
        if not isinstance(spec, dict):
            raise TypeError("spec must be a dict")
        sid = self.study_id(name, spec)
        path = self.root / sid
        if not path.is_dir():
            path.mkdir(exist_ok=True)
            fsync(self.root)
        with lock_for(path).hold():
            saved_spec = path / SPEC
            if saved_spec.exists():
                try:
                    saved = json.loads(saved_spec.read_bytes().decode("utf-8"))
                    if cache_key(saved["spec"]) != cache_key(spec):
                        raise StoreError(
                            f"study folder {sid} already holds a different spec (hash collision)"
                        )
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    saved_spec.unlink()  # unreadable: rewritten below
            if not saved_spec.exists():
                atomic_write_bytes(
                    saved_spec, json_bytes({"name": name, "spec": spec}, "study spec")
                )
            if not (path / MANIFEST).exists():
                now = utc_now()
                data = {
                    "format": FORMAT_VERSION,
                    "id": sid,
                    "name": name,
                    "spec": spec,
                    "created": now,
                    "updated": now,
                    "stages": {},
                }
                atomic_write_bytes(path / MANIFEST, json_bytes(data, "manifest"))
        study = StudyRecord(path)
        study.gc()
        return study

    def open(self, study_id: str) -> StudyRecord:
        """Open an existing study (repairing a corrupt manifest, cleaning crash leftovers)."""
        study = StudyRecord(self._dir(study_id))
        study.gc()
        return study

    def list_studies(self) -> list[StudyInfo]:
        """All studies, newest update first. Never raises for a damaged study (see ``problem``)."""
        infos = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                if path.name.startswith(TRASH):
                    shutil.rmtree(path, ignore_errors=True)  # leftover of an interrupted delete
                continue
            if not (path / MANIFEST).exists() and not (path / SPEC).exists():
                continue
            problem = None
            try:
                data = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
                if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
                    raise ValueError("unexpected structure")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                problem = f"manifest unreadable ({e}); it is rebuilt when the study is opened"
                data = {"stages": {}}
            stages: dict[str, int] = {}
            for e in data["stages"].values():
                stage = str(e.get("stage", "?")) if isinstance(e, dict) else "?"
                stages[stage] = stages.get(stage, 0) + 1
            mtime = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            spec = data.get("spec")
            infos.append(
                StudyInfo(
                    id=path.name,
                    name=str(data.get("name", path.name)),
                    created=parse_time(data["created"]) if "created" in data else mtime,
                    updated=parse_time(data["updated"]) if "updated" in data else mtime,
                    stages=stages,
                    size_bytes=tree_size(path),
                    path=path,
                    problem=problem,
                    spec=spec if isinstance(spec, dict) else {},
                )
            )
        infos.sort(key=lambda i: i.updated, reverse=True)
        return infos

    def holders(self, key: str, *, besides: str | None = None) -> Iterator[tuple[str, StudyRecord, dict]]:
        """``(study id, record, manifest entry)`` of every study but ``besides`` that stores ``key`` with
        all its files, newest update first; read-only (no gc of a study another process may be writing),
        damaged studies skipped."""
        for info in self.list_studies():
            if info.id == besides or info.problem:
                continue
            try:
                record = StudyRecord(info.path)
                entry = record.entry(key) if record.has(key) else None
            except Exception:  # a damaged peer never stops the caller
                continue
            if entry is not None:
                yield info.id, record, entry

    def delete(self, study_id: str) -> None:
        """Delete a study folder (renamed away first, so a crash never leaves half a study)."""
        path = self._dir(study_id)
        trash = self.root / f"{TRASH}{study_id}-{secrets.token_hex(4)}"
        with lock_for(path).hold():
            os.replace(path, trash)
        forget_lock(path)
        fsync(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def export_zip(self, study_id: str, dest: Path | str) -> Path:
        """Write ``<study_id>/manifest.json``, ``spec.json`` and all listed files to a zip.

        ``dest`` is the zip path, or an existing folder (then ``<dest>/<study_id>.zip``).
        The snapshot is taken under the study lock, so it is consistent. Returns the path.
        """
        study = self.open(study_id)
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{study_id}.zip"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / tmp_name(dest.name)
        try:
            with study._lock.hold(), zipfile.ZipFile(tmp, "w") as zf:
                data = study._load_locked()
                zf.writestr(f"{study_id}/{MANIFEST}", json_bytes(data, "manifest"))
                if (study.path / SPEC).is_file():
                    zf.write(study.path / SPEC, f"{study_id}/{SPEC}")
                for e in data["stages"].values():
                    for f in e.get("files", []) if isinstance(e, dict) else []:
                        with contextlib.suppress(StoreError):
                            src = study._resolve(f.get("path"))
                            if src.is_file():
                                method = (
                                    zipfile.ZIP_STORED
                                    if src.suffix == ".safetensors"
                                    else zipfile.ZIP_DEFLATED
                                )
                                zf.write(src, f"{study_id}/{f['path']}", compress_type=method)
            fsync(tmp)
            os.replace(tmp, dest)
        except BaseException:
            remove(tmp)
            raise
        return dest
