"""How each kind of stage artifact of a :class:`~refusal_lab.study.Study` is written to and read from its
study record: ``json`` (typed results through their codec, :mod:`refusal_lab.codec`), ``directions`` (a
:class:`~refusal_lab.directions.DirectionSet` folder), ``repair`` (an AIRD repair's tensors and meta),
``distill`` (a distill repair's LoRA tensors, safetensors, with its result as the JSON meta)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_lab.codec import from_json, to_json
from refusal_lab.study_record import StudyRecord


@dataclass(frozen=True)
class ArtifactKind:
    read: Callable[[StudyRecord, str, Any], Any]  # (record, key, codec) → value
    write: Callable[[StudyRecord, str, str, Any, float], None]  # (record, key, stage, value, seconds)


def _read_json(record: StudyRecord, key: str, codec) -> Any:
    data = record.get_json(key)
    return data if codec is None else from_json(codec, data)


def _read_directions(record: StudyRecord, key: str, codec) -> Any:
    from refusal_lab.directions import DirectionSet

    return DirectionSet.load(record.get_path(key))


def _write_directions(record: StudyRecord, key: str, stage: str, value, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        value.save(Path(tmp) / "d")
        record.put_folder(key, stage, Path(tmp) / "d", seconds=seconds)


def _read_repair(record: StudyRecord, key: str, codec) -> Any:
    from refusal_lab.aird import Repair

    return Repair.from_tensors(record.get_tensors(key), record.get_meta(key))


def _read_distill(record: StudyRecord, key: str, codec) -> Any:
    from refusal_lab.distill import Distilled

    return Distilled.from_tensors(record.get_tensors(key), record.get_meta(key))


KINDS: dict[str, ArtifactKind] = {
    "json": ArtifactKind(_read_json, lambda r, key, stage, v, s: r.put_json(key, stage, to_json(v), seconds=s)),
    "directions": ArtifactKind(_read_directions, _write_directions),
    "repair": ArtifactKind(_read_repair, lambda r, key, stage, v, s: r.put_tensors(
        key, stage, v.tensors(), meta=v.describe(), seconds=s)),
    "distill": ArtifactKind(_read_distill, lambda r, key, stage, v, s: r.put_tensors(
        key, stage, v.tensors(), meta=v.describe(), seconds=s)),
}
