"""Compression scheme specs: parsing, validation and the canonical string form.

Valid forms (case-insensitive, whitespace ignored)::

    bnb-int8 | bnb-nf4 | bnb-fp4                 bitsandbytes LLM.int8 / 4-bit NF4 / 4-bit FP4
    rtn:BITS[:GROUP][:sym|:asym]                 round-to-nearest, BITS 2–8, GROUP a power of two ≥ 8
                                                 or -1 / absent for one group per row; asymmetric by default
    hqq:BITS[:GROUP]                             HQQ, BITS 2, 3, 4 or 8
    magnitude|wanda|sparsegpt:SPARSITY           unstructured pruning, SPARSITY a fraction in [0, 0.95]
    magnitude|wanda|sparsegpt:N:M                N:M semi-structured pruning (keep N of every M inputs)

``str(parse_scheme(s))`` is the canonical form and parses back to an equal :class:`Scheme`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BNB_METHODS = ("bnb-int8", "bnb-nf4", "bnb-fp4")
QUANT_METHODS = BNB_METHODS + ("rtn", "hqq")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
METHODS = QUANT_METHODS + PRUNE_METHODS
RTN_BITS = range(2, 9)
HQQ_BITS = (2, 3, 4, 8)
MAX_SPARSITY = 0.95
MAX_M = 64

VALID_FORMS = (
    "bnb-int8, bnb-nf4, bnb-fp4; "
    "rtn:BITS[:GROUP][:sym] (BITS 2-8; GROUP a power of two >= 8, or -1/absent = one group per row; e.g. rtn:8, "
    "rtn:4:64, rtn:4:128:sym); "
    "hqq:BITS[:GROUP] (BITS 2, 3, 4 or 8; e.g. hqq:4:64); "
    "magnitude:SPARSITY, wanda:SPARSITY, sparsegpt:SPARSITY (SPARSITY a fraction 0-0.95, e.g. wanda:0.5); "
    "N:M variants magnitude:N:M, wanda:N:M, sparsegpt:N:M (1 <= N < M <= 64, e.g. wanda:2:4, magnitude:4:8)")


class SchemeError(ValueError):
    """A scheme spec is unknown or out of range; the message lists the valid forms."""

    def __init__(self, spec: str, problem: str):
        super().__init__(f"invalid compression scheme {spec!r}: {problem}. Valid schemes: {VALID_FORMS}")
        self.spec = spec
        self.problem = problem


@dataclass(frozen=True)
class Scheme:
    """One parsed compression scheme. Fields unused by ``method`` are ``None``.

    ``group`` is ``None`` for one quantization group per output row; ``n``/``m`` are set for N:M pruning.
    """

    method: str
    bits: int | None = None
    group: int | None = None
    symmetric: bool = False
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def family(self) -> str:
        """``quantization`` or ``pruning``."""
        return "pruning" if self.method in PRUNE_METHODS else "quantization"

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def target_sparsity(self) -> float:
        """Fraction of weights the scheme zeroes (0 for quantization)."""
        if self.is_nm:
            return 1.0 - self.n / self.m
        return self.sparsity or 0.0

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")

    @property
    def is_bnb(self) -> bool:
        return self.method in BNB_METHODS

    def __str__(self) -> str:
        if self.is_bnb:
            return self.method
        if self.method in ("rtn", "hqq"):
            s = f"{self.method}:{self.bits}"
            if self.group is not None:
                s += f":{self.group}"
            return s + (":sym" if self.symmetric else "")
        if self.is_nm:
            return f"{self.method}:{self.n}:{self.m}"
        return f"{self.method}:{_fmt_fraction(self.sparsity)}"


def _fmt_fraction(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _int(spec: str, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SchemeError(spec, f"{what} must be an integer, got {text!r}") from None


def _group(spec: str, text: str) -> int | None:
    g = _int(spec, text, "GROUP")
    if g in (-1, 0):
        return None
    if g < 8 or g & (g - 1):
        raise SchemeError(spec, f"GROUP must be a power of two >= 8 (or -1 for per-row), got {g}")
    return g


def parse_scheme(spec: "str | Scheme") -> Scheme:
    """Parse a scheme spec (see module doc); raises :class:`SchemeError` listing the valid forms."""
    if isinstance(spec, Scheme):
        return spec
    if not isinstance(spec, str):
        raise SchemeError(repr(spec), "a scheme spec is a string")
    raw = spec
    spec = "".join(spec.split()).lower()
    if not spec:
        raise SchemeError(raw, "empty spec")
    if spec in BNB_METHODS:
        return Scheme(method=spec)
    method, *args = spec.split(":")
    if method not in METHODS:
        raise SchemeError(raw, f"unknown method {method!r}")
    if method in BNB_METHODS:
        raise SchemeError(raw, f"{method} takes no parameters")

    if method in ("rtn", "hqq"):
        symmetric = False
        if args and args[-1] in ("sym", "asym"):
            if method == "hqq":
                raise SchemeError(raw, "hqq has no sym/asym option (it always fits a zero-point)")
            symmetric = args.pop() == "sym"
        if not 1 <= len(args) <= 2:
            raise SchemeError(raw, f"{method} takes BITS[:GROUP]")
        bits = _int(raw, args[0], "BITS")
        allowed = RTN_BITS if method == "rtn" else HQQ_BITS
        if bits not in allowed:
            raise SchemeError(raw, f"{method} BITS must be one of {list(allowed)}, got {bits}")
        group = _group(raw, args[1]) if len(args) == 2 else None
        return Scheme(method=method, bits=bits, group=group, symmetric=symmetric)

    # pruning
    if len(args) == 1:
        try:
            s = float(args[0])
        except ValueError:
            raise SchemeError(raw, f"SPARSITY must be a number, got {args[0]!r}") from None
        if not math.isfinite(s) or not 0.0 <= s <= MAX_SPARSITY:
            hint = f" (a fraction: did you mean {s / 100:g}?)" if 5 <= s <= 100 * MAX_SPARSITY else ""
            raise SchemeError(raw, f"SPARSITY must be between 0 and {MAX_SPARSITY}, got {args[0]}{hint}")
        return Scheme(method=method, sparsity=s)
    if len(args) == 2:
        n, m = _int(raw, args[0], "N"), _int(raw, args[1], "M")
        if not 1 <= n < m <= MAX_M:
            raise SchemeError(raw, f"N:M needs 1 <= N < M <= {MAX_M}, got {n}:{m}")
        if 1 - n / m > MAX_SPARSITY + 1e-9:
            raise SchemeError(raw, f"{n}:{m} is {1 - n / m:.3f} sparse, above the {MAX_SPARSITY} maximum")
        return Scheme(method=method, n=n, m=m)
    raise SchemeError(raw, f"{method} takes SPARSITY or N:M")
