"""Typed results of a study — evaluation per set, drift, recoverability, verdict, calibration point,
repair, budget point, the whole study — with the one JSON codec of :mod:`refusal_lab.codec`.

Their JSON keys are those of the dicts these classes replaced, so studies stored before and CLI
output stay readable. Rates are fractions 0–1; KL in nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refusal_lab.codec import JsonRecord, optional
from refusal_lab.compression.report import CompressionReport


# -- evaluations ----------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Reply(JsonRecord):
    """One prompt's greedy reply and the judge's call on it: ``outcome`` refused | complied | broken
(absent from results stored before outcomes existed), ``refused`` = outcome is refused;
``refusal_score``: the first-step refusal log-odds."""

    prompt: str
    response: str
    refused: bool
    refusal_score: float
    outcome: str | None = optional()


@dataclass(kw_only=True)
class SetEvaluation(JsonRecord):
    """Refusal on one prompt set: the share of its ``n`` replies refused, complied with and broken
    (the three sum to 1 — with ``unjudged_rate``, present only when an llm judge gave answers it could not
    parse; the last two absent from results stored before outcomes existed), per
    category refusal, the ``judge``, and every reply."""

    n: int
    refusal_rate: float
    compliance_rate: float | None = optional()
    broken_rate: float | None = optional()
    unjudged_rate: float | None = optional()  # an llm judge's answers that were none of the three words
    judge: str | None = optional()
    mean_refusal_score: float | None = None
    by_category: dict[str, float] = field(default_factory=dict)
    results: list[Reply] = field(default_factory=list)


@dataclass(kw_only=True)
class Evaluation(JsonRecord):
    """A model's refusal per evaluation set (``harmful``, ``harmless``, optionally ``borderline``),
    perplexity on the reference text (:data:`refusal_lab.evaluation.PERPLEXITY_LABEL`), mean KL to the
    original on the harmless set's first reply token, and over the first 16 tokens of the original's
    harmless replies, teacher-forced (:func:`refusal_lab.evaluation.multi_token_kl`); both KLs are absent
    for the original itself (the second also from results stored before it existed)."""

    model: str = ""
    sets: dict[str, SetEvaluation] = field(default_factory=dict)
    perplexity: float | None = None
    kl_to_original: float | None = optional()
    kl_multi_token: float | None = optional()
    zero_shot_accuracy: float | None = optional()  # refusal_lab.zero_shot: share of 210 items right
    zero_shot_se: float | None = optional()  # its standard error

    def rate(self, set_name: str, outcome: str = "refused") -> float | None:
        """Share of ``set_name``'s replies with ``outcome`` (refused | complied | broken); None when the
        set was not evaluated (or, for complied/broken, was stored before outcomes existed)."""
        s = self.sets.get(set_name)
        if s is None:
            return None
        return {"refused": s.refusal_rate, "complied": s.compliance_rate, "broken": s.broken_rate,
                "unjudged": s.unjudged_rate}[outcome]


@dataclass(kw_only=True)
class Density(JsonRecord):
    """Non-zero weights of the layers a repair writes to, before or after it."""

    nonzero: int
    total: int
    density: float


# -- AIRD ----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class CalibrationPoint(JsonRecord):
    """One point of AIRD's calibration grid: repair ``layers`` at strength ``alpha`` (with the fitted
    re-alignment when ``realign``), its refusal on the val splits (None where not measured), KL to the
    unrepaired model (``kl``) and to the original, feasibility and whether it was chosen. ``measured``:
    ``scored`` (first-token score) or ``generated``; ``scored_*`` keep the scored values of a point
    that was then generated."""

    realign: bool = False
    layers: list[int] = field(default_factory=list)
    alpha: float
    measured: str | None = optional()
    harmful_refusal: float | None = None
    harmless_refusal: float | None = None
    harmful_score: float | None = None
    kl: float | None = None
    kl_original: float | None = optional()
    feasible: bool = False
    chosen: bool = False
    scored_harmful_refusal: float | None = optional()
    scored_harmless_refusal: float | None = optional()
    scored_feasible: bool | None = optional()
    score_threshold: float | None = optional()  # the unrepaired point of a scored search: the fitted threshold
    threshold_agreement: float | None = optional()  # and its agreement with generated verdicts

    @property
    def unrepaired(self) -> bool:
        return self.alpha == 0 and not self.realign


@dataclass(kw_only=True)
class RepairSummary(JsonRecord):
    """An AIRD repair without its tensors (:meth:`refusal_lab.aird.Repair.summary`)."""

    layers: list[int]
    alpha: float
    mode: str = "merged"
    source_layer: int | None = None
    calibration: list[CalibrationPoint] = field(default_factory=list)
    auto: bool = False
    realign_layer: int | None = None


@dataclass(kw_only=True)
class DistillSummary(JsonRecord):
    """A distill repair without its LoRA weights (:meth:`refusal_lab.distill.DistillResult.summary`): its
    mode, target ``modules`` and blocks, LoRA rank, training steps, LoRA's parameter count, the first and
    last step's loss (mean KL(teacher ‖ student) per reply token, nats), prompts per kind and reply tokens
    trained on, seconds for the teacher's replies and for training, and the ``offset`` applied after it."""

    mode: str
    modules: str
    layers: list[int] = field(default_factory=list)
    rank: int
    steps: int
    trainable_parameters: int
    loss_first: float | None = None
    loss_last: float | None = None
    n_prompts: dict[str, int] = field(default_factory=dict)
    n_reply_tokens: int = 0
    seconds_data: float = 0.0
    seconds_train: float = 0.0
    version: str = ""
    offset: float = 0.0


@dataclass(kw_only=True)
class RepairedEvaluation(Evaluation):
    """The evaluation of a repaired variant, with the repair and what it cost in density. ``method``: the
    repair method (:data:`refusal_lab.study_repairs.REPAIRS`; absent for AIRD, as stored before methods
    existed); ``repair``: the AIRD repair (AIRD and aird+distill), ``distill``: the distill repair;
    ``parameters_changed``: stored numbers the repair changes or adds; ``seconds``: its compute time
    (teacher replies and training, plus AIRD's calibration for aird+distill). Density: of the matrices
    the repair writes to."""

    repair: RepairSummary | None = None
    density_before: Density | None = None
    density_after: Density | None = None
    densified_weights: int = 0
    method: str | None = optional()
    distill: DistillSummary | None = optional()
    parameters_changed: int | None = optional()
    seconds: float | None = optional()


@dataclass(kw_only=True)
class MethodEvaluation(Evaluation):
    """One repair method of a comparison: its evaluation, or the ``error`` that kept it from applying."""

    method: str
    error: str | None = optional()
    parameters_changed: int | None = optional()
    density_before: Density | None = optional()
    density_after: Density | None = optional()


@dataclass(kw_only=True)
class BudgetPoint(JsonRecord):
    """Refusal with the k = ``n_layers`` repair layers ending at the source, and the weights a merged
    repair of them would densify."""

    n_layers: int
    layers: list[int]
    refusal: float
    densified_weights: int


# -- directions and drift --------------------------------------------------------------------------

@dataclass(kw_only=True)
class DirectionSource(JsonRecord):
    """Where a selected direction comes from (all None when none was selected)."""

    position: int | None = None
    layer: int | None = None
    token: str | None = None
    n_layers: int | None = optional()


@dataclass(kw_only=True)
class DirectionQuality(JsonRecord):
    """The selected direction's bypass / induce / KL scores and their baselines (empty when none)."""

    bypass: float | None = optional()
    induce: float | None = optional()
    kl: float | None = optional()
    baseline_harmful: float | None = optional()
    baseline_harmless: float | None = optional()
    fallback: bool | None = optional()
    norm: float | None = optional()


@dataclass(kw_only=True)
class DirectionSummary(JsonRecord):
    source: DirectionSource = field(default_factory=DirectionSource)
    quality: DirectionQuality = field(default_factory=DirectionQuality)


@dataclass(kw_only=True)
class ProjectionStats(JsonRecord):
    """Per-layer ``(n_layers + 1)`` bands of harmful/harmless projections on a direction, and Cohen's d."""

    harmful_mean: list[float]
    harmful_std: list[float]
    harmless_mean: list[float]
    harmless_std: list[float]
    cohens_d: list[float]


@dataclass(kw_only=True)
class Recoverability(JsonRecord):
    """Whether scaling along O's direction can repair C (:func:`refusal_lab.aird.recoverability`): Cohen's d
    per layer in O and C, their ``ratio`` at the source ``layer``, C's harmless shift toward O's harmful
    mean (fraction of O's gap), the ``level`` and its prose."""

    cohens_d_original: list[float]
    cohens_d_compressed: list[float]
    layer: int
    ratio: float
    harmless_shift: float
    level: str
    verdict: str


@dataclass(kw_only=True)
class Verdict(JsonRecord):
    """The measured outcome of a repair (:func:`refusal_lab.aird.repair_verdict`): ``recovered`` share of the
    lost refusal (None when nothing was lost), the diagnostic's ``predicted`` level, prose."""

    level: str
    recovered: float | None = None
    predicted: str | None = None
    verdict: str


@dataclass(kw_only=True)
class Diagnostic(JsonRecord):
    """Projections on O's direction in O and the variant (``projections["original"|"variant"]``) and
    the recoverability verdict."""

    projections: dict[str, ProjectionStats]
    recoverability: Recoverability


@dataclass(kw_only=True)
class Drift(Diagnostic):
    """How a variant's refusal direction moved: per-layer cosine with O's candidates at O's position
    (None where undefined), O's direction against the variant's candidate at O's source and against
    the variant's own selection (None when the variant's was not selected), both sources."""

    scheme: str
    cosine_per_layer: list[float | None]
    cosine_at_source: float | None = optional()  # absent from studies stored before it existed
    cosine_selected: float | None = None
    original: DirectionSummary
    variant: DirectionSummary

    @property
    def cosine(self) -> float | None:
        """The cosine a table shows: between the selected directions when the variant's was selected,
        else between O's direction and the variant's candidate at O's source."""
        return self.cosine_selected if self.cosine_selected is not None else self.cosine_at_source


@dataclass(kw_only=True)
class RepairResult(JsonRecord):
    """One variant's AIRD repair with everything it is judged by: O's and C's evaluations, C's drift,
    the repaired evaluation (which holds the repair), the measured verdict and the budget curve."""

    scheme: str
    original: Evaluation
    variant: Evaluation
    drift: Drift
    repaired: RepairedEvaluation
    verdict: Verdict
    budget: list[BudgetPoint] = field(default_factory=list)
    method: str | None = optional()  # the repair method run (absent: AIRD); ``repaired`` is its evaluation
    repairs: dict[str, RepairedEvaluation] | None = optional()  # every method run, by name, in order


# -- a whole study ---------------------------------------------------------------------------------

@dataclass(kw_only=True)
class OriginalResult(JsonRecord):
    evaluation: Evaluation
    source: DirectionSummary


@dataclass(kw_only=True)
class VariantResult(JsonRecord):
    """One compressed variant: its compression report, drift, evaluation and, with a repair, the repaired
    evaluation and the measured verdict (``aird_verdict``: of the method run, AIRD unless
    ``repair_method`` says otherwise; ``repairs``: every method that method ran, by name, e.g. AIRD and
    AIRD + distill for aird+distill — both absent for AIRD alone, as stored before methods existed)."""

    compression: CompressionReport
    drift: Drift
    evaluation: Evaluation
    repaired: RepairedEvaluation | None = optional()
    aird_verdict: Verdict | None = optional()
    repair_method: str | None = optional()
    repairs: dict[str, RepairedEvaluation] | None = optional()


@dataclass(kw_only=True)
class StudyResults(JsonRecord):
    """Everything a study computed (:meth:`refusal_lab.study.Study.results`); ``budget``: AIRD budget curves
    per scheme when they were asked for."""

    spec: dict
    study_id: str
    variants: dict[str, VariantResult] = field(default_factory=dict)
    original: OriginalResult
    budget: dict[str, list[BudgetPoint]] | None = optional()
