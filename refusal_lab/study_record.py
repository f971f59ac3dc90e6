"""One study folder of the run store: :class:`StudyRecord` — its manifest, typed artifacts, integrity
checks and garbage collection. Layout and crash safety: :mod:`refusal_lab.store`."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_lab.store_files import (ENTRY, FORMAT_VERSION, KINDS, MANIFEST, OBJECTS, ORPHANS, SPEC, TMP, StoreError,
                                     StoreWarning, atomic_write_bytes, fsync, json_bytes, key_hash, lock_for, pid_alive,
                                     racy, remove, seal_problem, sealed, sha256_file, tmp_name, tree_size, utc_now,
                                     validate_format)

if TYPE_CHECKING:  # heavy imports stay lazy: listing studies needs neither torch nor pandas
    import pandas
    import torch

_EXT = {"tensors": ".safetensors", "json": ".json", "table": ".parquet", "folder": ".dir"}  # object name suffixes


class StudyRecord:
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
        self._lock = lock_for(self.path)
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
        self._cache = (sig, data) if sig is not None and not racy(sig[2], sig[3]) else None

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
        if sig is not None and not racy(sig[2], sig[3]):
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
        """Move a corrupt manifest aside and write a new one from the objects' own entry records (lock
        must be held): nothing intact is lost; objects no record vouches for go to ``orphans/``."""
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
        stages = self._records()
        kept = {e["path"].split("/")[1] for e in stages.values()}
        aside = [q for q in self.objects.iterdir() if not q.name.startswith(TMP)
                 and q.name.removesuffix(ENTRY) not in kept]
        if aside:
            (self.path / ORPHANS).mkdir(exist_ok=True)
            for q in aside:
                os.replace(q, self.path / ORPHANS / q.name)
        warnings.warn(
            f"study {self.id}: {problem}{moved}; rebuilt the manifest from the objects' entry records: "
            f"{len(stages)} cached stage(s) kept" + (f", {len(aside)} file(s) no record vouches for kept in "
                                                       f"{ORPHANS}/" if aside else ""),
            StoreWarning,
            stacklevel=4,
        )
        now = utc_now()
        data = {
            "format": FORMAT_VERSION,
            "id": self.id,
            "name": name,
            "spec": spec,
            "created": now,
            "updated": now,
            "stages": stages,
        }
        atomic_write_bytes(p, json_bytes(data, "manifest"))
        return data

    def _record(self, path: Path) -> dict | None:
        """The sealed entry an object's record holds, when it and every file it lists are intact."""
        try:
            e = json.loads(path.read_bytes().decode("utf-8"))
            ok = (isinstance(e, dict) and "entry_sha256" in e and seal_problem(e) is None
                  and e.get("path") == f"{OBJECTS}/{path.name.removesuffix(ENTRY)}" and e.get("kind") in KINDS
                  and isinstance(e.get("files"), list) and isinstance(e.get("key"), str))
            if ok and not any(self._file_problem(f["path"], f["sha256"]) for f in e["files"]):
                return e
        except (OSError, ValueError, TypeError, KeyError, StoreError):
            pass
        return None

    def _records(self, pattern: str = "*") -> dict[str, dict]:
        """Intact entry records of ``objects/<pattern>``, the newest per key."""
        out: dict[str, dict] = {}
        for path in sorted(self.objects.glob(pattern + ENTRY)):
            e = self._record(path)
            if e is not None and (e["key"] not in out or e.get("done_at", "") > out[e["key"]].get("done_at", "")):
                out[e["key"]] = e
        return out

    def _recover(self, key: str) -> bool:
        """Put ``key``'s entry back into the manifest from its object's record (the manifest lost it or
        was modified); whether an intact one was found."""
        found = self._records(f"{key_hash(key)}-*").get(key)
        if found is None:
            return False
        self._update(lambda m: m["stages"].__setitem__(key, found))
        warnings.warn(f"study {self.id}: the manifest entry of stage {found.get('stage')!r} was missing or "
                      "modified; restored it from the object's own record", StoreWarning, stacklevel=4)
        return True

    def _update(self, mutate: Callable[[dict], Any]) -> Any:
        """Read-modify-write the manifest under the lock; returns what ``mutate`` returns."""
        with self._lock.hold():
            data = self._load_locked()
            result = mutate(data)
            data["updated"] = utc_now()
            atomic_write_bytes(self.path / MANIFEST, json_bytes(data, "manifest"))
            self._remember(data)
            return result

    # -- validation -------------------------------------------------------------------

    def _resolve(self, rel: Any) -> Path:
        """Manifest path -> absolute path, refusing anything outside ``objects/``."""
        if not isinstance(rel, str) or not rel.startswith(OBJECTS + "/") or ".." in rel.split("/"):
            raise StoreError(f"manifest lists an invalid path {rel!r}")
        return self.path / rel

    def _entry_or_error(self, key: str, kind: str | None = None) -> dict:
        key_hash(key)
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
        if (sealed_problem := seal_problem(e)) is not None:
            raise StoreError(f"study {self.id}: key {key!r}: {sealed_problem}")
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
        if sha256_file(path) != sha:
            problem = f"file {rel} is corrupted (sha256 mismatch)"
        else:
            problem = validate_format(path)
            if problem is not None:
                problem = f"file {rel} {problem}"
        if not racy(st.st_mtime_ns, st.st_ctime_ns):
            self._valid[rel] = (sig, problem)
        return problem

    def problem(self, key: str) -> str | None:
        """Why ``key`` cannot be used (missing entry, missing/corrupt file), or None if valid. An entry
        the manifest lost or that was modified is restored from its object's record when that is intact."""
        found = self._problem(key)
        if found is not None and self._recover(key):
            return self._problem(key)
        return found

    def _problem(self, key: str) -> str | None:
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
        json_bytes(meta, f"meta of key {key!r}")  # fail before writing anything
        final_name = f"{key_hash(key)}-{secrets.token_hex(4)}{ext}"
        final = self.objects / final_name
        tmp = self.objects / tmp_name(final_name)
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
                fsync(p)
                rel_inside = p.relative_to(tmp).as_posix() if tmp.is_dir() else ""
                rel = f"{OBJECTS}/{final_name}" + (f"/{rel_inside}" if rel_inside else "")
                files.append({"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size})
            if tmp.is_dir():
                for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                    fsync(d)
                fsync(tmp)
            entry = sealed({
                "stage": stage,
                "key": key,
                "kind": kind,
                "path": f"{OBJECTS}/{final_name}",
                "files": files,
                "done_at": utc_now(),
                "seconds": None if seconds is None else float(seconds),
                "meta": meta,
            })
            with self._lock.hold():  # rename under the lock so gc() never sees it half-done
                os.replace(tmp, final)
                # the object's own record: the manifest can be rebuilt from the records
                atomic_write_bytes(self.objects / (final_name + ENTRY), json_bytes(entry, "entry record"))

                def record(m: dict) -> Any:
                    old = m["stages"].get(key)
                    m["stages"][key] = entry
                    return old

                old = self._update(record)
                committed = True
        except BaseException:
            remove(tmp)
            if not committed:
                remove(final)
                remove(self.objects / (final_name + ENTRY))
            raise
        if isinstance(old, dict) and isinstance(old.get("path"), str) and old["path"] != entry["path"]:
            self._remove_object(old["path"])

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

        self._put(key, stage, "tensors", _EXT["tensors"], write, meta, seconds)

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
        data = json_bytes(obj, f"value of key {key!r}")
        self._put(key, stage, "json", _EXT["json"], lambda tmp: tmp.write_bytes(data), meta, seconds)

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

        self._put(key, stage, "table", _EXT["table"], write, meta, seconds)

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
        self._put(key, stage, "folder", _EXT["folder"], lambda tmp: shutil.copytree(src, tmp), meta, seconds)

    def put_files(self, key: str, stage: str, kind: str, files: dict[str, bytes], meta: dict | None = None, *,
                  seconds: float | None = None) -> None:
        """Store an artifact given as its files' bytes (what :meth:`read_files` returned, e.g. from another
        store): ``{"": data}`` for a one-file kind, ``{relative path: data}`` for a ``folder``."""
        if kind not in _EXT:
            raise StoreError(f"put_files: unknown kind {kind!r}")
        if (kind == "folder") == ("" in files) or not files:
            raise StoreError(f"put_files: {kind} artifact of key {key!r} given as the wrong files")

        def write(tmp: Path) -> None:
            for rel, data in files.items():
                parts = rel.split("/")
                if rel and (any(p in ("", ".", "..") for p in parts) or rel.startswith("/")):
                    raise StoreError(f"put_files: invalid file name {rel!r}")
                path = tmp / rel if rel else tmp
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

        self._put(key, stage, kind, _EXT[kind], write, meta, seconds)

    def read_files(self, key: str) -> dict[str, bytes]:
        """The files of ``key`` as :meth:`put_files` takes them (validated first; checksums re-checked)."""
        root = self.get_path(key)
        e = self._entry_or_error(key)
        out = {}
        for f in e["files"]:
            path = self._resolve(f["path"])
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise StoreError(f"study {self.id}: key {key!r}: file {f['path']} changed while read")
            out[path.relative_to(root).as_posix() if e["kind"] == "folder" else ""] = data
        return out

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
        key_hash(key)
        old = self._update(lambda m: m["stages"].pop(key, None))
        for path in self.objects.glob(f"{key_hash(key)}-*{ENTRY}"):  # every version: none may come back
            self._remove_object(f"{OBJECTS}/{path.name.removesuffix(ENTRY)}")
        if isinstance(old, dict) and isinstance(old.get("path"), str):
            self._remove_object(old["path"])
        return old is not None

    def _remove_object(self, rel: str) -> None:
        """Delete an object and its record (superseded or invalidated)."""
        with contextlib.suppress(StoreError):
            path = self._resolve(rel)
            remove(path.with_name(path.name + ENTRY))
            remove(path)

    def gc(self) -> int:
        """Delete unreferenced objects and temp files of dead writers; returns how many.

        Safe to run concurrently with writers: renames and manifest updates happen under the
        same lock, and temp files of live processes are kept.
        """
        removed = 0
        with self._lock.hold():
            data = self._load_locked()
            # a write killed between its object's record and the manifest update is complete: record it
            unrecorded = {k: e for k, e in self._records().items() if k not in data["stages"]}
            if unrecorded:
                data["stages"].update(unrecorded)
                data["updated"] = utc_now()
                atomic_write_bytes(self.path / MANIFEST, json_bytes(data, "manifest"))
                self._remember(data)
            referenced = set()
            for e in data["stages"].values():
                if isinstance(e, dict) and isinstance(e.get("path"), str):
                    referenced.add(e["path"].split("/")[1] if "/" in e["path"] else "")
            for p in self.objects.iterdir():
                if p.name.startswith(TMP):
                    pid = p.name[len(TMP) :].split("-", 1)[0]
                    if pid.isdigit() and pid_alive(int(pid)):
                        continue
                elif p.name.removesuffix(ENTRY) in referenced:
                    continue
                remove(p)
                removed += 1
            for p in self.path.iterdir():  # temp manifests of dead writers
                if p.name.startswith(TMP):
                    pid = p.name[len(TMP) :].split("-", 1)[0]
                    if not (pid.isdigit() and pid_alive(int(pid))):
                        remove(p)
                        removed += 1
        return removed

    def size_bytes(self) -> int:
        """Total size of every file in the study folder."""
        return tree_size(self.path)
