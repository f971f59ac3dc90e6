"""The one JSON codec of typed results (:mod:`refusal_lab.results`, :class:`refusal_lab.compression.report.CompressionReport`).

A result is a dataclass deriving :class:`JsonRecord`: ``obj.to_json()`` gives plain data (what the
store keeps, the CLI writes and the report embeds), ``Cls.from_json(data)`` reads it back, validated by
pydantic (unknown keys are ignored, missing optional ones take their defaults). :func:`to_json` /
:func:`from_json` do the same for containers of results, e.g. ``list[BudgetPoint]``. Fields declared
with :func:`optional` are left out of the JSON while they are None.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import field
from typing import Any, TypeVar

T = TypeVar("T")


def optional(default: Any = None) -> Any:
    """A field that is absent from the JSON while it is None."""
    return field(default=default, metadata={"omit_none": True})


def to_json(value: Any) -> Any:
    """Plain data (dicts, lists, numbers, strings) of a result, or of a list/dict of results."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


@functools.cache
def _adapter(tp: Any):
    from pydantic import TypeAdapter  # validates nested dataclasses from plain data; no hand-written parser

    return TypeAdapter(tp)


def from_json(tp: type[T] | Any, data: Any) -> T:
    """The result of type ``tp`` (a result class, or e.g. ``list[BudgetPoint]``) from :func:`to_json`'s data."""
    return _adapter(tp).validate_python(data)


class JsonRecord:
    """The codec every result class shares."""

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls: type[T], data: Any) -> T:
        return from_json(cls, data)
