"""Persistent run store: one folder per study, every stage artifact cached on disk.

Layout of a store (default ``runs/``)::

    runs/
      <slug>-<spechash>/          one study (see :meth:`RunStore.create_study`)
        manifest.json             spec, timestamps and one entry per cached artifact
        spec.json                 the study spec, written once (used to rebuild a corrupt manifest)
        objects/                  artifacts, named ``<sha256(key)[:16]>-<nonce>.<ext>``
        .lock                     OS file lock guarding manifest read-modify-write

An artifact is addressed by a *cache key* chosen by the caller (see :func:`cache_key`) and
tagged with the *stage* that produced it. Manifest entry (``manifest["stages"][key]``)::

    {"stage": str, "key": str, "kind": "tensors" | "json" | "table" | "folder",
     "path": "objects/...",                      # the file (or folder) holding the artifact
     "files": [{"path": "objects/...", "sha256": hex, "bytes": int}, ...],
     "done_at": ISO-8601 UTC, "seconds": float | None, "meta": {...}}

Crash safety: each artifact is written under a hidden temporary name, flushed and fsync'ed,
then renamed (``os.replace``) to a fresh unique name; the manifest is rewritten the same way
*last*. A process killed at any moment (even SIGKILL) therefore leaves a store whose manifest
only lists complete, checksummed files; the interrupted entry is simply absent, and leftovers
are removed by :meth:`Study.gc` (run whenever a study is opened).

Integrity: :meth:`Study.has` is true only if every file of the entry exists, matches its
sha256 and parses (safetensors header, JSON, Parquet footer). ``get_*`` re-check the sha256
of the bytes they read and raise :class:`StoreError` with a clear message otherwise, so the
caller recomputes. Tensors are stored as safetensors only; no code path here deserialises
arbitrary Python objects.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy: listing studies needs neither torch nor pandas
    import pandas
    import torch

__all__ = [
    "RunStore",
    "Study",
    "StudyInfo",
    "StoreError",
    "StoreWarning",
    "cache_key",
]

MANIFEST = "manifest.json"
SPEC = "spec.json"
OBJECTS = "objects"
LOCK = ".lock"
FORMAT_VERSION = 1
KINDS = ("tensors", "json", "table", "folder")
_TMP = ".tmp-"  # prefix of in-flight files: ".tmp-<pid>-<nonce>-<final name>"
_TRASH = ".trash-"  # prefix of studies being deleted (hidden, skipped by listing)
_HASH_CHUNK = 1 << 20
_RACY_NS = 2_000_000_000  # files modified this recently are re-hashed on every has()


class StoreError(Exception):
    """A study or artifact is missing, corrupted or cannot be (de)serialised."""


class StoreWarning(UserWarning):
    """Something was repaired on the fly (e.g. a corrupt manifest was moved aside)."""


# ----------------------------------------------------------------------------- helpers


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


def _slug(name: str, max_len: int = 40) -> str:
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:max_len].rstrip("-") or "study"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(text: Any) -> datetime:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.fromtimestamp(0, timezone.utc)


def _key_hash(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"cache keys must be non-empty strings, got {key!r}")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _fsync(path: Path) -> None:
    """fsync a file, or a folder (to make renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file or folder if present (never raises for a missing path)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _tmp_name(final_name: str) -> str:
    return f"{_TMP}{os.getpid()}-{secrets.token_hex(4)}-{final_name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _racy(mtime_ns: int, ctime_ns: int) -> bool:
    """Git's "racily clean" rule: a file changed within the last ~2 s may change again
    within the same timestamp tick without its stat signature changing, so don't cache it."""
    return time.time_ns() - max(mtime_ns, ctime_ns) < _RACY_NS


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsync'ed temp file in the same folder + ``os.replace``."""
    tmp = path.parent / _tmp_name(path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync(path.parent)


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}") from e


def _validate_format(path: Path) -> str | None:
    """Parse ``path`` according to its extension; return a problem description or None."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                f.keys()
        elif suffix == ".json":
            json.loads(path.read_bytes().decode("utf-8"))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
    except Exception as e:  # any parse failure means "invalid", whatever the library raises
        return f"is not a valid {suffix[1:]} file ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------- locking

_LOCKS_GUARD = threading.Lock()
_LOCKS: dict[str, _StudyLock] = {}


class _StudyLock:
    """Re-entrant per-study lock: a process-wide ``threading.RLock`` plus ``fcntl.flock``.

    One instance per study folder and process (see :func:`_lock_for`), so every ``Study``
    object of one folder shares it; the flock on ``.lock`` excludes other processes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rlock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._rlock:
            if self._depth == 0:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fd, self._fd = self._fd, None
                    try:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)


def _lock_for(study_dir: Path) -> _StudyLock:
    key = str(study_dir.resolve())
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = _StudyLock(Path(key) / LOCK)
        return lock


# ----------------------------------------------------------------------------- study


class Study:
    """One study folder: a manifest of cached stage artifacts (see the module docstring).

    Normally obtained from :meth:`RunStore.create_study` or :meth:`RunStore.open`.
    Thread- and process-safe: every manifest update is a read-modify-write under the lock.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"study folder {self.path} does not exist")
        self.id: str = self.path.name
        self.objects = self.path / OBJECTS
        self.objects.mkdir(exist_ok=True)
        self._lock = _lock_for(self.path)
        self._cache: tuple[tuple[int, int, int, int], dict] | None = None  # (stat sig, manifest)
        self._valid: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}
        self._load()  # repairs a missing/corrupt manifest right away

    def __repr__(self) -> str:
        return f"Study({str(self.path)!r})"

    # -- manifest ---------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        """A deep copy of the current manifest (``spec``, ``created``, ``updated``, ``stages``)."""
        return copy.deepcopy(self._load())

    @property
    def spec(self) -> dict:
        """The study spec given to :meth:`RunStore.create_study`."""
        return copy.deepcopy(self._load()["spec"])

    @property
    def name(self) -> str:
        """Human-readable study name."""
        return str(self._load().get("name", self.id))

    def keys(self) -> list[str]:
        """Cache keys listed in the manifest (not validated; see :meth:`has`)."""
        return list(self._load()["stages"])

    def entry(self, key: str) -> dict | None:
        """A copy of the manifest entry of ``key``, or None."""
        e = self._load()["stages"].get(key)
        return copy.deepcopy(e) if isinstance(e, dict) else None

    def _read_manifest_file(self) -> dict:
        """Parse manifest.json; raise StoreError if missing, unreadable or malformed."""
        p = self.path / MANIFEST
        try:
            data = json.loads(p.read_bytes().decode("utf-8"))
        except FileNotFoundError as e:
            raise StoreError("manifest.json is missing") from e
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise StoreError(f"manifest.json is not valid JSON ({e})") from e
        if not (
            isinstance(data, dict)
            and isinstance(data.get("stages"), dict)
            and isinstance(data.get("spec"), dict)
        ):
            raise StoreError("manifest.json does not have the expected structure")
        return data

    def _stat_sig(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path / MANIFEST)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _remember(self, data: dict) -> None:
        """Cache the parsed manifest against its stat signature (unless racily recent)."""
        sig = self._stat_sig()
        self._cache = (sig, data) if sig is not None and not _racy(sig[2], sig[3]) else None

    def _load(self) -> dict:
        """The current manifest (cached while the file is unchanged; repaired if corrupt)."""
        sig = self._stat_sig()
        if sig is not None and self._cache is not None and self._cache[0] == sig:
            return self._cache[1]
        try:
            data = self._read_manifest_file()
        except StoreError:
            with self._lock.hold():
                return self._load_locked()
        if sig is not None and not _racy(sig[2], sig[3]):
            self._cache = (sig, data)
        return data

    def _load_locked(self) -> dict:
        """Read the manifest under the lock, moving a corrupt one aside and rebuilding it."""
        try:
            data = self._read_manifest_file()
        except StoreError as e:
            data = self._rebuild(str(e))
        self._remember(data)
        return data

    def _rebuild(self, problem: str) -> dict:
        """Move a corrupt manifest aside and write an empty one (lock must be held)."""
        p = self.path / MANIFEST
        moved = ""
        if p.exists():
            ts = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            aside = p.with_name(f"{MANIFEST}.corrupt-{ts}")
            os.replace(p, aside)
            moved = f"; moved aside to {aside.name}"
        spec: dict = {}
        name = self.id
        try:
            saved = json.loads((self.path / SPEC).read_bytes().decode("utf-8"))
            spec, name = dict(saved["spec"]), str(saved["name"])
        except Exception:
            if (self.path / SPEC).exists():
                problem += "; spec.json is unreadable too, spec reset to {}"
        warnings.warn(
            f"study {self.id}: {problem}{moved}; rebuilt an empty manifest "
            "(cached stages will be recomputed)",
            StoreWarning,
            stacklevel=4,
        )
        now = _now()
        data = {
            "format": FORMAT_VERSION,
            "id": self.id,
            "name": name,
            "spec": spec,
            "created": now,
            "updated": now,
            "stages": {},
        }
        _atomic_write_bytes(p, _json_bytes(data, "manifest"))
        return data

    def _update(self, mutate: Callable[[dict], Any]) -> Any:
        """Read-modify-write the manifest under the lock; returns what ``mutate`` returns."""
        with self._lock.hold():
            data = self._load_locked()
            result = mutate(data)
            data["updated"] = _now()
            _atomic_write_bytes(self.path / MANIFEST, _json_bytes(data, "manifest"))
            self._remember(data)
            return result

    # -- validation -------------------------------------------------------------------

    def _resolve(self, rel: Any) -> Path:
        """Manifest path -> absolute path, refusing anything outside ``objects/``."""
        if not isinstance(rel, str) or not rel.startswith(OBJECTS + "/") or ".." in rel.split("/"):
            raise StoreError(f"manifest lists an invalid path {rel!r}")
        return self.path / rel

    def _entry_or_error(self, key: str, kind: str | None = None) -> dict:
        _key_hash(key)
        e = self._load()["stages"].get(key)
        if e is None:
            raise StoreError(f"study {self.id}: no cached entry for key {key!r}")
        if not (
            isinstance(e, dict)
            and e.get("kind") in KINDS
            and isinstance(e.get("path"), str)
            and isinstance(e.get("files"), list)
            and all(isinstance(f, dict) and "path" in f and "sha256" in f for f in e["files"])
        ):
            raise StoreError(f"study {self.id}: manifest entry for key {key!r} is malformed")
        if kind is not None and e["kind"] != kind:
            raise StoreError(
                f"study {self.id}: key {key!r} holds {e['kind']}, not {kind} "
                f"(stage {e.get('stage')!r})"
            )
        return e

    def _file_problem(self, rel: str, sha: str) -> str | None:
        """Check one listed file (size/mtime-cached unless recently modified)."""
        path = self._resolve(rel)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"file {rel} is missing"
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._valid.get(rel)
        if cached is not None and cached[0] == sig:
            return cached[1]
        problem: str | None
        if _sha256_file(path) != sha:
            problem = f"file {rel} is corrupted (sha256 mismatch)"
        else:
            problem = _validate_format(path)
            if problem is not None:
                problem = f"file {rel} {problem}"
        if not _racy(st.st_mtime_ns, st.st_ctime_ns):
            self._valid[rel] = (sig, problem)
        return problem

    def problem(self, key: str) -> str | None:
        """Why ``key`` cannot be used (missing entry, missing/corrupt file), or None if valid."""
        try:
            e = self._entry_or_error(key)
            if e["kind"] == "folder" and not self._resolve(e["path"]).is_dir():
                return f"study {self.id}: key {key!r}: folder {e['path']} is missing"
            for f in e["files"]:
                msg = self._file_problem(f["path"], f["sha256"])
                if msg is not None:
                    return f"study {self.id}: key {key!r} (stage {e.get('stage')!r}): {msg}"
        except StoreError as err:
            return str(err)
        except OSError as err:
            return f"study {self.id}: key {key!r}: {err}"
        return None

    def has(self, key: str) -> bool:
        """True only if ``key`` is in the manifest and all its files exist and validate."""
        return self.problem(key) is None

    # -- writing ----------------------------------------------------------------------

    def _put(
        self,
        key: str,
        stage: str,
        kind: str,
        ext: str,
        write: Callable[[Path], None],
        meta: dict | None,
        seconds: float | None,
    ) -> None:
        """Write an artifact to a temp name, then rename it and record it in the manifest."""
        if not isinstance(stage, str) or not stage:
            raise TypeError(f"stage must be a non-empty string, got {stage!r}")
        meta = dict(meta or {})
        _json_bytes(meta, f"meta of key {key!r}")  # fail before writing anything
        final_name = f"{_key_hash(key)}-{secrets.token_hex(4)}{ext}"
        final = self.objects / final_name
        tmp = self.objects / _tmp_name(final_name)
        committed = False
        try:
            try:
                write(tmp)
            except StoreError:
                raise
            except Exception as e:
                raise StoreError(f"study {self.id}: cannot write {kind} for key {key!r}: {e}") from e
            files = []
            paths = sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else [tmp]
            for p in paths:
                _fsync(p)
                rel_inside = p.relative_to(tmp).as_posix() if tmp.is_dir() else ""
                rel = f"{OBJECTS}/{final_name}" + (f"/{rel_inside}" if rel_inside else "")
                files.append({"path": rel, "sha256": _sha256_file(p), "bytes": p.stat().st_size})
            if tmp.is_dir():
                for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                    _fsync(d)
                _fsync(tmp)
            entry = {
                "stage": stage,
                "key": key,
                "kind": kind,
                "path": f"{OBJECTS}/{final_name}",
                "files": files,
                "done_at": _now(),
                "seconds": None if seconds is None else float(seconds),
                "meta": meta,
            }
            with self._lock.hold():  # rename under the lock so gc() never sees it half-done
                os.replace(tmp, final)
                _fsync(self.objects)

                def record(m: dict) -> Any:
                    old = m["stages"].get(key)
                    m["stages"][key] = entry
                    return old

                old = self._update(record)
                committed = True
        except BaseException:
            _remove(tmp)
            if not committed:
                _remove(final)
            raise
        if isinstance(old, dict) and isinstance(old.get("path"), str) and old["path"] != entry["path"]:
            with contextlib.suppress(StoreError):
                _remove(self._resolve(old["path"]))

    def put_tensors(
        self,
        key: str,
        stage: str,
        tensors: dict[str, torch.Tensor],
        meta: dict | None = None,
        *,
        seconds: float | None = None,
    ) -> None:
        """Store named tensors as one safetensors file (copied to CPU, made contiguous).

        ``meta`` (JSON-serialisable) and ``seconds`` (the stage's compute time) go into
        the manifest entry. Replaces any previous entry of ``key``.
        """
        import torch
        from safetensors.torch import save_file

        clean = {}
        for name, t in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be strings, got {name!r}")
            # one private contiguous copy: safetensors refuses views/shared storage
            clean[name] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)

        def write(tmp: Path) -> None:
            save_file(clean, str(tmp))

        self._put(key, stage, "tensors", ".safetensors", write, meta, seconds)

    def put_json(
        self,
        key: str,
        stage: str,
        obj: Any,
        meta: dict | None = None,
        *,
        seconds: float | None = None,
    ) -> None:
        """Store a JSON-serialisable object (NaN/inf allowed, as Python's json writes them)."""
        data = _json_bytes(obj, f"value of key {key!r}")
        self._put(key, stage, "json", ".json", lambda tmp: tmp.write_bytes(data), meta, seconds)

    def put_table(
        self,
        key: str,
        stage: str,
        df: pandas.DataFrame,
        meta: dict | None = None,
        *,
        seconds: float | None = None,
    ) -> None:
        """Store a DataFrame as Parquet (pyarrow; index and dtypes round-trip)."""

        def write(tmp: Path) -> None:
            df.to_parquet(tmp, engine="pyarrow")

        self._put(key, stage, "table", ".parquet", write, meta, seconds)

    def put_folder(
        self,
        key: str,
        stage: str,
        src_dir: Path | str,
        meta: dict | None = None,
        *,
        seconds: float | None = None,
    ) -> None:
        """Copy a folder tree (e.g. a saved model) into the store; symlinks are followed."""
        src = Path(src_dir)
        if not src.is_dir():
            raise StoreError(f"put_folder: {src} is not a folder")
        self._put(key, stage, "folder", ".dir", lambda tmp: shutil.copytree(src, tmp), meta, seconds)

    # -- reading ----------------------------------------------------------------------

    def _read_checked(self, key: str, kind: str) -> bytes:
        e = self._entry_or_error(key, kind)
        f = e["files"][0] if e["files"] else None
        if f is None:
            raise StoreError(f"study {self.id}: manifest entry for key {key!r} lists no file")
        try:
            data = self._resolve(f["path"]).read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"study {self.id}: key {key!r} (stage {e.get('stage')!r}): file {f['path']} "
                "is missing; recompute it"
            ) from None
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise StoreError(
                f"study {self.id}: key {key!r} (stage {e.get('stage')!r}): file {f['path']} "
                "is corrupted (sha256 mismatch); recompute it"
            )
        return data

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """Load the tensors of ``key`` (from safetensors; checksum verified)."""
        from safetensors.torch import load

        data = self._read_checked(key, "tensors")
        try:
            return load(data)
        except Exception as e:
            raise StoreError(f"study {self.id}: key {key!r}: invalid safetensors data ({e})") from e

    def get_json(self, key: str) -> Any:
        """Load the JSON value of ``key`` (checksum verified)."""
        data = self._read_checked(key, "json")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise StoreError(f"study {self.id}: key {key!r}: invalid JSON ({e})") from e

    def get_table(self, key: str) -> pandas.DataFrame:
        """Load the DataFrame of ``key`` from Parquet (checksum verified)."""
        import pandas as pd

        data = self._read_checked(key, "table")
        try:
            return pd.read_parquet(io.BytesIO(data), engine="pyarrow")
        except Exception as e:
            raise StoreError(f"study {self.id}: key {key!r}: invalid Parquet data ({e})") from e

    def get_path(self, key: str) -> Path:
        """Path of the artifact of ``key`` (a file, or the folder of :meth:`put_folder`).

        Every file is validated first; raises :class:`StoreError` if anything is wrong.
        Treat the path as read-only.
        """
        msg = self.problem(key)
        if msg is not None:
            raise StoreError(msg + "; recompute it")
        return self._resolve(self._entry_or_error(key)["path"])

    def get_meta(self, key: str) -> dict:
        """The ``meta`` dict stored with ``key`` (manifest only; files not validated)."""
        return copy.deepcopy(self._entry_or_error(key).get("meta") or {})

    # -- maintenance ------------------------------------------------------------------

    def invalidate(self, key: str) -> bool:
        """Forget ``key`` and delete its files; returns whether it was present."""
        _key_hash(key)
        old = self._update(lambda m: m["stages"].pop(key, None))
        if isinstance(old, dict) and isinstance(old.get("path"), str):
            with contextlib.suppress(StoreError):
                _remove(self._resolve(old["path"]))
        return old is not None

    def gc(self) -> int:
        """Delete unreferenced objects and temp files of dead writers; returns how many.

        Safe to run concurrently with writers: renames and manifest updates happen under the
        same lock, and temp files of live processes are kept.
        """
        removed = 0
        with self._lock.hold():
            data = self._load_locked()
            referenced = set()
            for e in data["stages"].values():
                if isinstance(e, dict) and isinstance(e.get("path"), str):
                    referenced.add(e["path"].split("/")[1] if "/" in e["path"] else "")
            for p in self.objects.iterdir():
                if p.name.startswith(_TMP):
                    pid = p.name[len(_TMP) :].split("-", 1)[0]
                    if pid.isdigit() and _pid_alive(int(pid)):
                        continue
                elif p.name in referenced:
                    continue
                _remove(p)
                removed += 1
            for p in self.path.iterdir():  # temp manifests of dead writers
                if p.name.startswith(_TMP):
                    pid = p.name[len(_TMP) :].split("-", 1)[0]
                    if not (pid.isdigit() and _pid_alive(int(pid))):
                        _remove(p)
                        removed += 1
        return removed

    def size_bytes(self) -> int:
        """Total size of every file in the study folder."""
        return _tree_size(self.path)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# ----------------------------------------------------------------------------- store


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
        return f"{_slug(name)}-{cache_key(spec)[:10]}"

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

    def create_study(self, name: str, spec: dict) -> Study:
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
            _fsync(self.root)
        with _lock_for(path).hold():
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
                _atomic_write_bytes(
                    saved_spec, _json_bytes({"name": name, "spec": spec}, "study spec")
                )
            if not (path / MANIFEST).exists():
                now = _now()
                data = {
                    "format": FORMAT_VERSION,
                    "id": sid,
                    "name": name,
                    "spec": spec,
                    "created": now,
                    "updated": now,
                    "stages": {},
                }
                _atomic_write_bytes(path / MANIFEST, _json_bytes(data, "manifest"))
        study = Study(path)
        study.gc()
        return study

    def open(self, study_id: str) -> Study:
        """Open an existing study (repairing a corrupt manifest, cleaning crash leftovers)."""
        study = Study(self._dir(study_id))
        study.gc()
        return study

    def list_studies(self) -> list[StudyInfo]:
        """All studies, newest update first. Never raises for a damaged study (see ``problem``)."""
        infos = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                if path.name.startswith(_TRASH):
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
                    created=_parse_time(data["created"]) if "created" in data else mtime,
                    updated=_parse_time(data["updated"]) if "updated" in data else mtime,
                    stages=stages,
                    size_bytes=_tree_size(path),
                    path=path,
                    problem=problem,
                    spec=spec if isinstance(spec, dict) else {},
                )
            )
        infos.sort(key=lambda i: i.updated, reverse=True)
        return infos

    def delete(self, study_id: str) -> None:
        """Delete a study folder (renamed away first, so a crash never leaves half a study)."""
        path = self._dir(study_id)
        trash = self.root / f"{_TRASH}{study_id}-{secrets.token_hex(4)}"
        with _lock_for(path).hold():
            os.replace(path, trash)
        with _LOCKS_GUARD:
            _LOCKS.pop(str(path.resolve()), None)
        _fsync(self.root)
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
        tmp = dest.parent / _tmp_name(dest.name)
        try:
            with study._lock.hold(), zipfile.ZipFile(tmp, "w") as zf:
                data = study._load_locked()
                zf.writestr(f"{study_id}/{MANIFEST}", _json_bytes(data, "manifest"))
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
            _fsync(tmp)
            os.replace(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise
        return dest
