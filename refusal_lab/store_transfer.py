"""Parcels: stage artifacts of one study moved between run stores as one ``bytes`` value.

A sweep task (:mod:`refusal_lab.sweep`) runs on a machine that may not see the driver's run store: it
gets a parcel of what its study has stored so far, computes into a scratch store, and returns a parcel
of what it added; only the driver writes the real store (:func:`unpack`). A parcel is a zip (stored, not
compressed) of ``parcel.json`` — per entry its key, stage, kind, meta, seconds and files with their
sha256 — and the files' bytes. Nothing in it is code or a pickle; :func:`unpack` checks every checksum
and writes each entry through :meth:`~refusal_lab.study_record.StudyRecord.put_files` (atomic, sealed).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterable

from refusal_lab.store_files import StoreError
from refusal_lab.study_record import StudyRecord

FORMAT = "refusal-lab-parcel-1"
INDEX = "parcel.json"


def pack(record: StudyRecord, keys: Iterable[str] | None = None) -> bytes:
    """A parcel of ``keys`` of ``record`` (all valid entries when None; invalid ones are left out)."""
    chosen = record.keys() if keys is None else list(keys)
    buf = io.BytesIO()
    entries = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, key in enumerate(chosen):
            if not record.has(key):
                continue
            e = record.entry(key)
            files = []
            for rel, data in sorted(record.read_files(key).items()):
                name = f"objects/{i}/{rel or 'data'}"
                zf.writestr(name, data)
                files.append({"name": name, "path": rel, "sha256": hashlib.sha256(data).hexdigest()})
            entries.append({"key": key, "stage": e["stage"], "kind": e["kind"], "meta": e.get("meta") or {},
                            "seconds": e.get("seconds"), "files": files})
        zf.writestr(INDEX, json.dumps({"format": FORMAT, "study": record.id, "entries": entries}))
    return buf.getvalue()


def entries(parcel: bytes) -> list[dict]:
    """The index entries of a parcel (key, stage, kind, meta, seconds, files); :class:`StoreError` when
    it is not one."""
    try:
        with zipfile.ZipFile(io.BytesIO(parcel)) as zf:
            index = json.loads(zf.read(INDEX).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"not a parcel of stage results ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("entries"), list):
        raise StoreError("not a parcel of stage results (unknown format)")
    return index["entries"]


def unpack(parcel: bytes, record: StudyRecord, *, replace: bool = False) -> list[str]:
    """Write a parcel's entries into ``record``; those it already holds valid are skipped unless
    ``replace``. Returns the stages written, in the parcel's order."""
    written, index = [], entries(parcel)
    with zipfile.ZipFile(io.BytesIO(parcel)) as zf:
        for e in index:
            if not replace and record.has(e["key"]):
                continue
            files = {}
            for f in e["files"]:
                data = zf.read(f["name"])
                if hashlib.sha256(data).hexdigest() != f["sha256"]:
                    raise StoreError(f"parcel entry {e['stage']!r}: file {f['path'] or 'data'} is corrupted")
                files[f["path"]] = data
            record.put_files(e["key"], e["stage"], e["kind"], files, e["meta"], seconds=e["seconds"])
            written.append(e["stage"])
    return written


def _timeless(value):
    """A JSON value without its wall-time fields (``seconds``, ``…_seconds``): what differs between equal
    computations."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "seconds" and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def differences(a: StudyRecord, b: StudyRecord) -> list[str]:
    """How two studies' stored stage results differ, one line per difference (empty: equal). Entries
    must have the same keys and stages, tensors and tables the same bytes, JSON the same values except
    wall times (a compression report's ``seconds``, a direction search's ``extraction_seconds``)."""
    out = []
    keys_a, keys_b = set(a.keys()), set(b.keys())
    stage = {k: (a.entry(k) or b.entry(k))["stage"] for k in keys_a | keys_b}
    out += [f"only in {a.id}: {stage[k]} ({k})" for k in sorted(keys_a - keys_b)]
    out += [f"only in {b.id}: {stage[k]} ({k})" for k in sorted(keys_b - keys_a)]
    for key in sorted(keys_a & keys_b):
        fa, fb = a.read_files(key), b.read_files(key)
        if sorted(fa) != sorted(fb):
            out.append(f"{stage[key]}: different files {sorted(fa)} vs {sorted(fb)}")
            continue
        for rel in fa:
            json_file = a.entry(key)["kind"] == "json" or rel.endswith(".json")
            same = (_timeless(json.loads(fa[rel])) == _timeless(json.loads(fb[rel]))) if json_file else fa[rel] == fb[rel]
            if not same:
                out.append(f"{stage[key]}: {rel or 'value'} differs")
    return out
