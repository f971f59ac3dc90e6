"""Crash-safe files of the run store (:mod:`refusal_lab.store`): the on-disk names, atomic writes, checksums,
format checks and the per-study OS lock. File handling only: the studies' semantics live in
:mod:`refusal_lab.study_record`."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SPEC = "spec.json"
OBJECTS = "objects"
LOCK = ".lock"
FORMAT_VERSION = 1
KINDS = ("tensors", "json", "table", "folder")
TMP = ".tmp-"  # prefix of in-flight files: ".tmp-<pid>-<nonce>-<final name>"
TRASH = ".trash-"  # prefix of studies being deleted (hidden, skipped by listing)
HASH_CHUNK = 1 << 20
RACY_NS = 2_000_000_000  # files modified this recently are re-hashed on every has()


class StoreError(Exception):
    """A study or artifact is missing, corrupted or cannot be (de)serialised."""


class StoreWarning(UserWarning):
    """Something was repaired on the fly (e.g. a corrupt manifest was moved aside)."""


def slug(name: str, max_len: int = 40) -> str:
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:max_len].rstrip("-") or "study"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(text: Any) -> datetime:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.fromtimestamp(0, timezone.utc)


def key_hash(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"cache keys must be non-empty strings, got {key!r}")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def fsync(path: Path) -> None:
    """fsync a file, or a folder (to make renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or folder if present (never raises for a missing path)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def tmp_name(final_name: str) -> str:
    return f"{TMP}{os.getpid()}-{secrets.token_hex(4)}-{final_name}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def racy(mtime_ns: int, ctime_ns: int) -> bool:
    """Git's "racily clean" rule: a file changed within the last ~2 s may change again
    within the same timestamp tick without its stat signature changing, so don't cache it."""
    return time.time_ns() - max(mtime_ns, ctime_ns) < RACY_NS


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsync'ed temp file in the same folder + ``os.replace``."""
    tmp = path.parent / tmp_name(path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync(path.parent)


def json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}") from e


ENTRY = ".entry.json"  # suffix of an object's entry record: <object name>.entry.json
ORPHANS = "orphans"  # objects kept aside when a damaged manifest could not be rebuilt around them


def entry_digest(entry: dict) -> str:
    """sha256 of a manifest entry's canonical JSON, its own ``entry_sha256`` left out: every value a
    result depends on (key, kind, files and their checksums, meta) is covered."""
    body = {k: v for k, v in entry.items() if k != "entry_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def sealed(entry: dict) -> dict:
    """``entry`` with its ``entry_sha256``."""
    return {**entry, "entry_sha256": entry_digest(entry)}


def seal_problem(entry: dict) -> str | None:
    """Why a sealed entry cannot be trusted (it was modified), or None; entries written before seals
    existed carry none and are taken as they are."""
    want = entry.get("entry_sha256")
    if want is None:
        return None
    return None if want == entry_digest(entry) else "its manifest entry was modified (checksum mismatch)"


def validate_format(path: Path) -> str | None:
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
_LOCKS: dict[str, StudyLock] = {}


class StudyLock:
    """Re-entrant per-study lock: a process-wide ``threading.RLock`` plus ``fcntl.flock``.

    One instance per study folder and process (see :func:`lock_for`), so every ``StudyRecord``
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


def lock_for(study_dir: Path) -> StudyLock:
    key = str(study_dir.resolve())
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = StudyLock(Path(key) / LOCK)
        return lock


def forget_lock(study_dir: Path) -> None:
    """Drop the in-process lock object of a deleted study folder."""
    with _LOCKS_GUARD:
        _LOCKS.pop(str(study_dir.resolve()), None)


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total
