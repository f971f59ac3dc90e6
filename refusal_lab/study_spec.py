"""What a study computes: :class:`StudySpec` (its stored form names the study's folder)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from refusal_lab.aird.calibration import Search
from refusal_lab.aird.repair import Mode

Realign = Literal["auto", "on", "off"]  # the fitted re-alignment: calibration decides, always, never

LEGACY = {"precision": "float32", "aird_search": "generated", "selection_screen": None, "variant_selection": True,
          "column": None, "judge": "substring",
          "device_map": None, "max_memory": None,
          "repair_method": "aird", "distill": None}  # what a stored spec without the field ran


@dataclass
class StudySpec:
    """What to compute. ``harmful``/``harmless``/``borderline``: ``bundled:KIND:SPLIT`` or a file.
    ``aird``: ``None`` (no repair), ``auto`` (calibrate layers and α), or ``top:K`` (the K layers
    ending at the source layer, α calibrated); ``aird_alpha``/``aird_layers`` override calibration.
    ``aird_realign``: the fitted re-alignment of :mod:`refusal_lab.aird` — ``auto`` (calibration decides;
    not used with a manual α and layers), ``on`` (always) or ``off``. ``aird_search``: how the
    calibration grid is measured (:mod:`refusal_lab.aird.calibration`). ``precision``: of forward passes
    (:mod:`refusal_lab.precision`). ``device_map``/``max_memory``: where accelerate puts the model's modules
    (:mod:`refusal_lab.placement`; instead of ``device``) — placement only: the results are the same.
    ``repair_method``: ``aird`` (the default: repair with AIRD when ``aird`` is set), ``distill`` (a LoRA
    trained with the original as teacher, :mod:`refusal_lab.distill`; ``aird`` not needed) or ``aird+distill``
    (AIRD, then distill from the AIRD-repaired model); ``distill``: :class:`~refusal_lab.distill.DistillConfig`
    settings over its defaults, e.g. ``{"steps": 20}`` (:mod:`refusal_lab.study_repairs`)."""

    model: str = "default"
    schemes: list[str] = field(default_factory=lambda: ["wanda:0.5"])
    harmful: str = "bundled:harmful:test"
    harmless: str = "bundled:harmless:test"
    borderline: str | None = "bundled:borderline:test"
    column: str | None = None  # the text column of CSV/JSON prompt files (None: detected)
    judge: str = "substring"  # how replies are judged (refusal_lab.judges.JUDGES)
    limit: int | None = None
    max_new_tokens: int = 64
    aird: str | None = "auto"
    aird_mode: Mode = "merged"
    aird_alpha: float | None = None
    aird_layers: list[int] | None = None
    aird_realign: Realign = "auto"
    aird_search: Search = "scored"  # calibration grid: scored (one forward, best points generated) | generated
    selection_positions: list[int] | None = None  # None: every post-instruction position
    selection_screen: int | None = 12  # induce screened on this many val prompts (refusal_lab.selection); None: exact
    variant_selection: bool = False  # select each variant's own direction too (its source layer); drift needs
    #                                  only the variant's candidates
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | dict | None = None  # auto | balanced | sequential | {module name: GPU index | cpu | disk}
    max_memory: str | dict | None = None  # "0=10GiB,cpu=30GiB" or {"0": "10GiB", …} (placement.parse_max_memory)
    precision: str = "auto"  # of forward passes (refusal_lab.precision); part of every cache key but compression's
    repair_method: str = "aird"  # aird | distill | aird+distill (refusal_lab.study_repairs.REPAIRS)
    distill: dict | None = None  # DistillConfig settings over its defaults (None: the defaults)
    name: str = ""

    def __post_init__(self) -> None:
        """Impossible values are refused here, whatever the caller (CLI, page, library)."""
        import math

        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1 (or None for every prompt), got {self.limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        top = self.aird is not None and self.aird.startswith("top:")
        if self.aird not in (None, "auto", "manual") and not (top and self.aird[4:].isdigit() and int(self.aird[4:]) >= 1):
            raise ValueError(f"aird must be None, auto, manual or top:K with K ≥ 1, got {self.aird!r}")
        if self.aird_alpha is not None and not (math.isfinite(self.aird_alpha) and self.aird_alpha >= 0):
            raise ValueError(f"aird_alpha must be a finite number ≥ 0, got {self.aird_alpha}")
        if self.aird_layers is not None and (not self.aird_layers or min(self.aird_layers) < 0):
            raise ValueError(f"aird_layers must be layer indices ≥ 0, got {self.aird_layers}")
        from refusal_lab.judges import JUDGES

        if self.judge.partition(":")[0] not in JUDGES:
            raise ValueError(f"unknown judge {self.judge!r}: use one of {', '.join(JUDGES)}")
        if self.selection_screen is not None and self.selection_screen < 0:
            raise ValueError(f"selection_screen must be ≥ 0 (or None), got {self.selection_screen}")
        if self.repair_method != "aird" or self.distill is not None:
            from refusal_lab.study_repairs import check_method

            check_method(self.repair_method, self.aird, self.distill)
        if self.device_map is not None or self.max_memory is not None:
            from refusal_lab.placement import parse_device_map, parse_max_memory

            self.device_map, self.max_memory = parse_device_map(self.device_map), parse_max_memory(self.max_memory)

    def to_dict(self) -> dict:
        """The stored form. Fields added after specs were first stored are left out when they hold the
        value those older specs meant (:data:`LEGACY`), so that old specs keep naming the same folder."""
        return {k: v for k, v in asdict(self).items() if k not in LEGACY or v != LEGACY[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "StudySpec":
        """The inverse of :meth:`to_dict` (a stored spec without a newer field meant its legacy value)."""
        return cls(**{**LEGACY, **d})

    @property
    def repairing(self) -> bool:
        """Whether a study of this spec repairs its variants: AIRD when ``aird`` is set, the other methods always."""
        return bool(self.aird) or self.repair_method != "aird"

    @property
    def title(self) -> str:
        return self.name or f"{self.model} · {' + '.join(self.schemes)}"
