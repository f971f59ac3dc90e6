"""Argument types of the command line: every numeric and enum option is checked once, here, and a bad
value ends the run before any work with argparse's one-line error (exit code 2) naming the allowed range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def count(minimum: int = 1) -> Callable[[str], int]:
    """An integer ≥ ``minimum`` (prompt counts, token counts, batch sizes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {value}")
        return value
    parse.__name__ = f"integer ≥ {minimum}"
    return parse


def number(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False) -> Callable[[str], float]:
    """A finite float in [``low``, ``high``] (``(low, high]`` with ``open_low``); nan and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or value > high or (open_low and value == low):
            span = f"{'(' if open_low else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


def layer_list(text: str) -> list[int] | None:
    """``auto`` (None) or comma-separated layer indices ≥ 0."""
    if text == "auto":
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or comma-separated layer indices, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"layer indices must be ≥ 0, got {text!r}")
    return layers


def alpha(text: str) -> float | None:
    """``auto`` (None) or a finite α ≥ 0."""
    return None if text == "auto" else number(0.0)(text)


def aird_spec(text: str) -> str:
    """``auto`` or ``top:K`` with K ≥ 1."""
    if text == "auto":
        return text
    head, _, k = text.partition(":")
    if head != "top" or not k.isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or top:K with K ≥ 1, got {text!r}")
    return text


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it exists is checked when the model loads)."""
    kind, _, index = text.partition(":")
    if text == "auto" or (kind in ("cpu", "mps") and not index) or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


DTYPES = ("auto", "float32", "float16", "bfloat16")


def device_map(text: str) -> str | dict | None:
    """``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or a JSON object of module name → device (a GPU
    index, ``cpu`` or ``disk``); the module names are checked against the model when it loads."""
    from refusal_lab.placement import parse_device_map

    try:
        return parse_device_map(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def max_memory(text: str) -> dict[str, str] | None:
    """``KEY=SIZE[,KEY=SIZE…]`` with KEY a GPU index, ``cpu``, ``mps`` or ``disk`` (e.g. ``0=10GiB,cpu=30GiB``)."""
    from refusal_lab.placement import parse_max_memory

    try:
        return parse_max_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def judge_spec(text: str) -> str:
    """A judge of :data:`refusal_lab.judges.JUDGES` (``NAME`` or ``NAME:ARG``)."""
    from refusal_lab.judges import JUDGES

    if text.partition(":")[0] not in JUDGES:
        raise argparse.ArgumentTypeError(f"unknown judge {text!r}: use one of {', '.join(JUDGES)}")
    return text


def repair_method(text: str) -> str:
    """A repair method of :data:`refusal_lab.study_repairs.REPAIRS`: ``aird``, ``distill`` or ``aird+distill``."""
    from refusal_lab.study_repairs import METHOD_NAMES

    if text not in METHOD_NAMES:
        raise argparse.ArgumentTypeError(f"unknown repair method {text!r}: use {' | '.join(METHOD_NAMES)}")
    return text


def distill_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` for a :class:`~refusal_lab.distill.DistillConfig` setting; VALUE is read as JSON (``20``,
    ``2e-3``, ``[1,2]``, ``null``) and else kept as text (``merged``). Names and ranges are checked with the
    whole set (:func:`refusal_lab.distill.config_from`)."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. steps=20), got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value.strip()
    return key.strip(), parsed
