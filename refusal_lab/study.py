"""A *study*: one model, its compressed variants, prompt sets, refusal directions, AIRD repairs and
evaluations, computed in stages. Every stage's artifact is keyed by what it depends on (model
fingerprint, scheme, prompt-set hashes, settings, code version) and persisted in the run store, so
nothing is computed twice — across restarts too — and a killed run resumes where it stopped. Stages: load →
directions(original) → compress(scheme) → directions(variant) → drift → evaluate(original, variants) →
repair(variant) → evaluate(repaired) → report. The repair is AIRD, distill or AIRD then distill
(``StudySpec.repair_method``; the methods and the distill stage: :mod:`refusal_lab.study_repairs`).

Directions are always extracted from the project's bundled train splits and selected on its val
splits; AIRD is calibrated on val splits; user files (``harmful``/``harmless``) are evaluation sets.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from refusal_lab import study_repairs
from refusal_lab.judges import JUDGE_VERSION
from refusal_lab.memory import release
from refusal_lab.models import ModelHandle
from refusal_lab.progress import report
from refusal_lab.artifacts import KINDS
from refusal_lab.compression.report import CompressionReport
from refusal_lab.results import (BudgetPoint, Diagnostic, Drift, Evaluation, MethodEvaluation,
                          OriginalResult, ProjectionStats, RepairedEvaluation, RepairResult, StudyResults,
                          VariantResult)
from refusal_lab.prompts import PromptSet, bundled, resolve_prompt_arg
from refusal_lab.store import RunStore, StoreError, StudyRecord, cache_key, tensor_key
from refusal_lab.study_rows import evaluation_row, measured_verdict, method_row, repair_rows, summary_rows
from refusal_lab.study_spec import LEGACY, StudySpec

__all__ = ["Study", "StudySpec", "LEGACY", "summary_rows", "evaluation_row", "method_row", "repair_rows",
           "measured_verdict"]

log = logging.getLogger(__name__)
CODE_VERSION = "study-2"  # part of every stage's cache key
# Versions of single stages' computations, part of their cache keys: bump one when what its stage
# computes changes, and stored results of the older version are computed again.
VERDICT_VERSION = "verdict-3"  # the recoverability verdict (diagnostic and drift stages)
REPAIR_VERSION = "realign-4"  # AIRD's re-alignment fit and calibration (4: float32 confirmation of 4 points)
BUDGET_VERSION = "budget-2"  # the budget curve
StageProgress = Callable[[str, int, int], None]


class Study:
    """Runs a :class:`StudySpec` stage by stage against a :class:`~refusal_lab.store.RunStore`.

    ``original`` may be passed (e.g. the dashboard's shared cached model) to avoid reloading.
    ``on_progress(stage, done, total)`` is called between batches; raising
    :class:`~refusal_lab.progress.Cancelled` from it stops the run (completed stages stay stored).
    ``on_stage(stage, seconds)`` is called when a stage starts computing (``seconds`` None) and when it
    has (loaded stages call nothing): what :class:`refusal_lab.study_eta.StudyEta` follows.
    """

    def __init__(self, spec: StudySpec, store: RunStore | str | Path = "runs", *,
                 original: ModelHandle | None = None, on_progress: StageProgress | None = None) -> None:
        self.spec = spec
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.record: StudyRecord = self.store.create_study(spec.title, spec.to_dict())
        self._original = original
        self._variants: dict[str, ModelHandle] = {}
        self.on_progress = on_progress
        self.on_stage: Callable[[str, float | None], None] | None = None
        self.timings: dict[str, float] = {}
        self._memo: dict[str, object] = {}
        self._sets: dict[str, PromptSet] | None = None
        # observers of the calls made inside observed() — per thread, so that one shared study serves
        # several dashboard sessions at once, each seeing only its own calls
        self._observers: contextvars.ContextVar = contextvars.ContextVar(f"study-observers-{id(self)}",
                                                                          default=(None, None))

    # -- what a view needs ----------------------------------------------------------------
    @property
    def id(self) -> str:
        """The id of this study's folder in the run store."""
        return self.record.id

    @contextlib.contextmanager
    def observed(self, on_progress: StageProgress | None = None,
                 on_stage: Callable[[str, float | None], None] | None = None) -> Iterator["Study"]:
        """Report the progress (``on_progress(stage, done, total)``; raising
        :class:`~refusal_lab.progress.Cancelled` from it stops the call) and the stages (``on_stage``, as the
        attribute) of the calls this thread makes inside the block — besides the study's own observers.
        Other threads using the same study see none of it."""
        token = self._observers.set((on_progress, on_stage))
        try:
            yield self
        finally:
            self._observers.reset(token)

    def variants(self) -> dict[str, ModelHandle]:
        """The compressed variants this study holds in memory, by scheme (a copy of the mapping)."""
        return dict(self._variants)

    def adopt_variant(self, scheme: str, handle: ModelHandle) -> None:
        """Use ``handle`` as the variant of ``scheme`` (compressed elsewhere with the same scheme and
        calibration: the same model) instead of compressing again; a variant already held stays."""
        self._variants.setdefault(scheme, handle)

    def drop_variants(self, schemes: Sequence[str]) -> None:
        """Let go of the in-memory variants of ``schemes`` (their stored results stay)."""
        for scheme in schemes:
            self._variants.pop(scheme, None)

    def with_spec(self, **changes) -> "Study":
        """A study with the same folder, store, models and in-memory results but a spec with ``changes``
        (settings that are part of their stages' cache keys, e.g. AIRD's: every result it shares with
        this one is keyed by all it depends on). This study is left as it is."""
        sibling = copy.copy(self)
        sibling.spec = dataclasses.replace(self.spec, **changes)
        sibling._sets = None
        return sibling

    # -- plumbing -------------------------------------------------------------------------
    def _progress(self, stage: str):
        own, observer = self.on_progress, self._observers.get()[0]
        if own is None and observer is None:
            return None

        def progress(done: int, total: int) -> None:
            for fn in (own, observer):
                if fn is not None:
                    fn(stage, done, total)
        return progress

    def _announce(self, stage: str, seconds: float | None) -> None:
        for fn in (self.on_stage, self._observers.get()[1]):
            if fn is not None:
                fn(stage, seconds)

    def _cached(self, stage: str, key_parts: tuple, compute, kind: str = "json", codec=None):
        """Return the stored artifact for ``(stage, key_parts)`` or compute, store and return it.
        ``codec``: the result type (:mod:`refusal_lab.results`) a JSON artifact is read back as."""
        key = cache_key(stage, CODE_VERSION, *key_parts, *self.numerics)
        if key in self._memo:
            return self._memo[key]
        if self.record.has(key):
            try:
                self._memo[key] = self._get(kind, key, codec=codec)
                return self._memo[key]
            except Exception as e:  # corrupt entry: recompute
                log.warning("stored %s unreadable (%s); recomputing", stage, e)
        found = self._from_other_studies(kind, key, codec)
        if found is not None:  # keys name everything a result depends on, so another study's is ours too
            value, other = found
            self._put(kind, key, stage, value, 0.0)
            log.info("%s: reused from study %s", stage, other)
            self._memo[key] = value
            return value
        value, seconds = self._timed(stage, compute)
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self._put(kind, key, stage, value, seconds)
        self._memo[key] = value
        return value

    def _timed(self, stage: str, compute):
        """``(compute(), seconds)``, announced to ``on_stage`` before and after; what the stage freed
        (caches, copies) then goes back to the OS, so the next one starts lower."""
        self._announce(stage, None)
        t0 = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - t0
        self._announce(stage, seconds)
        release()
        return value, seconds

    def _from_other_studies(self, kind: str, key: str, codec=None):
        """``(value, study id)`` of the artifact ``key`` stored by another study of the run store, or
        None. Unreadable studies and entries are skipped."""
        for study_id, other, _ in self.store.holders(key, besides=self.record.id):
            try:
                return self._get(kind, key, other, codec), study_id
            except Exception as e:
                log.debug("study %s: %s unreadable (%s)", study_id, key, e)
        return None

    def _get(self, kind: str, key: str, record: StudyRecord | None = None, codec=None):
        return KINDS[kind].read(record or self.record, key, codec)

    def _put(self, kind: str, key: str, stage: str, value, seconds: float) -> None:
        KINDS[kind].write(self.record, key, stage, value, seconds)

    @property
    def numerics(self) -> tuple[str, ...]:
        """Cache-key parts for what changes numbers besides the inputs — compute precision, weight dtype,
        device type — each only when it is not the float32-on-CPU default (whose keys stay those of the
        code before these parts existed)."""
        device, dtype = self._placement()
        parts = {"precision": self.precision, "dtype": str(dtype).removeprefix("torch."), "device": device.type}
        default = {"precision": "float32", "dtype": "float32", "device": "cpu"}
        return tuple(f"{k}={v}" for k, v in parts.items() if v != default[k])

    @property
    def precision(self) -> str:
        """The compute precision of this study's forward passes (the loaded original's, else the spec's)."""
        if self._original is not None:
            return self._original.precision
        from refusal_lab.precision import resolve_precision
        return resolve_precision(self.spec.precision, *self._placement())

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        """The original's device and weight dtype: the loaded model's, else what the spec resolves to."""
        if self._original is not None:
            return self._original.device, self._original.dtype
        s = self.spec
        key = f"placement {s.device} {s.dtype} {s.device_map} {s.max_memory}"
        if key not in self._memo:
            from refusal_lab.models import resolve_device, resolve_dtype
            from refusal_lab.placement import planned_device
            device = resolve_device(s.device) if s.device_map is None else planned_device(s.device_map, s.max_memory)
            self._memo[key] = device, resolve_dtype(s.dtype, device)
        return self._memo[key]

    # -- inputs ---------------------------------------------------------------------------
    @property
    def original(self) -> ModelHandle:
        if self._original is None:
            from refusal_lab.models import load_model
            report(self._progress("load"), 0, 1)
            self._original = load_model(self.spec.model, device=self.spec.device, dtype=self.spec.dtype,
                                        precision=self.spec.precision, device_map=self.spec.device_map,
                                        max_memory=self.spec.max_memory)
            report(self._progress("load"), 1, 1)
        return self._original

    def original_fingerprint(self) -> str:
        """The original model's fingerprint without loading it: the content hash of its folder (local
        specs; a retrained adapter or edited folder gets a new one), else the one a stored run of
        this store recorded (hub ids), else from loading the model."""
        if self._original is not None:
            return self._original.fingerprint
        if "fingerprint" not in self._memo:
            from refusal_lab.models import spec_fingerprint

            fp = spec_fingerprint(self.spec.model)
            key = cache_key("fingerprint", self.spec.model)
            if fp is None:
                if self.record.has(key):
                    fp = self.record.get_json(key)["fingerprint"]
                else:
                    found = self._from_other_studies("json", key)
                    fp = found[0]["fingerprint"] if found else self.original.fingerprint
            if not self.record.has(key) or self.record.get_json(key)["fingerprint"] != fp:
                self.record.put_json(key, "load", {"fingerprint": fp})
            self._memo["fingerprint"] = fp
        return self._memo["fingerprint"]

    def eval_sets(self) -> dict[str, PromptSet]:
        """The evaluation prompt sets (first ``limit`` of each)."""
        if self._sets is None:
            s = self.spec
            kinds = ("harmful", "harmless") + (("borderline",) if s.borderline else ())
            sets = {k: resolve_prompt_arg(getattr(s, k), k, column=s.column).head(s.limit) for k in kinds}
            self._sets = sets
        return self._sets

    def variant(self, scheme: str) -> ModelHandle:
        """The compressed model for ``scheme`` (computed once per process; its report is stored)."""
        if scheme not in self._variants:
            from refusal_lab.compression import apply

            original = self.original  # loaded first: a model load is not part of the compression
            (handle, rep), _ = self._timed(f"compress {scheme}", lambda: apply(
                original, scheme, progress=self._progress(f"compress {scheme}")))
            self._variants[scheme] = handle
            key = cache_key("compress", CODE_VERSION, self.original_fingerprint(), scheme, *self.numerics)
            if not self.record.has(key):
                self.record.put_json(key, "compress", rep.to_json(), seconds=rep.seconds)
        return self._variants[scheme]

    def model_for(self, which: str) -> ModelHandle:
        return self.original if which == "original" else self.variant(which)

    # -- stages ---------------------------------------------------------------------------
    def compression_report(self, scheme: str) -> CompressionReport:
        key = cache_key("compress", CODE_VERSION, self.original_fingerprint(), scheme, *self.numerics)
        if not self.record.has(key):
            handle = self.variant(scheme)
            if not self.record.has(key):  # adopted: compressed elsewhere, its report travels with it
                report = handle.meta.get("report")
                if report is None:
                    raise StoreError(f"the variant {scheme} was adopted without its compression report")
                self.record.put_json(key, "compress", report, seconds=report.get("seconds"))
        return CompressionReport.from_json(self.record.get_json(key))

    def directions(self, which: str = "original"):
        """Refusal directions of the original (``which="original"``) or of a variant (its scheme)."""
        from refusal_lab.directions import generate_candidates
        from refusal_lab.selection import select_direction

        select = which == "original" or self.spec.variant_selection

        def compute():
            h = self.model_for(which)
            harmful, harmless = bundled("harmful", "train"), bundled("harmless", "train")
            ds = generate_candidates(h, harmful.prompts, harmless.prompts,
                                     progress=self._progress(f"directions {which}: candidates"))
            if not select:
                return ds
            return select_direction(h, ds, bundled("harmful", "val").prompts, bundled("harmless", "val").prompts,
                                    positions=self.spec.selection_positions, screen=self.spec.selection_screen,
                                    progress=self._progress(f"directions {which}: selection"))

        screen = () if self.spec.selection_screen is None else (f"screen={self.spec.selection_screen}",)
        if not select:  # candidates only: no selection setting applies
            return self._cached(f"directions {which}", (self.original_fingerprint(), which, "candidates"), compute,
                                "directions")
        return self._cached(f"directions {which}", (self.original_fingerprint(), which,
                                                    self.spec.selection_positions) + screen, compute, "directions")

    def diagnostic(self, scheme: str) -> Diagnostic:
        """Harmful/harmless projections on O's refusal direction (val splits, O's selected position) in
        O and in the variant, and the recoverability verdict of :func:`refusal_lab.aird.recoverability`.
        Needs only O's direction, not the variant's (cheaper than :meth:`drift`)."""
        from refusal_lab.activations import projection_stats, projections
        from refusal_lab.aird import recoverability

        def compute():
            d_o = self.directions("original")
            r, pos = d_o.direction, d_o.selected[0]
            harmful, harmless = bundled("harmful", "val").prompts, bundled("harmless", "val").prompts

            def of(h: ModelHandle) -> dict[str, torch.Tensor]:
                return {"harmful": projections(h, harmful, r, position=pos,
                                               progress=self._progress(f"diagnostic {scheme}: projections")),
                        "harmless": projections(h, harmless, r, position=pos)}

            proj = {"original": self._original_side(("projections", pos, tensor_key(r)), lambda: of(self.original)),
                    scheme: of(self.variant(scheme))}
            stats = {w: ProjectionStats(**{k: v.tolist() for k, v in projection_stats(p["harmful"], p["harmless"]).items()})
                     for w, p in (("original", proj["original"]), ("variant", proj[scheme]))}
            return Diagnostic(projections=stats,
                              recoverability=recoverability(proj["original"], proj[scheme], d_o.selected[1]))

        return self._cached(f"diagnostic {scheme}", (self.original_fingerprint(), scheme, VERDICT_VERSION), compute,
                            codec=Diagnostic)

    def drift(self, scheme: str) -> Drift:
        """Per-layer cosine between O's and the variant's candidates (at O's selected position), the
        variant's source and quality, and (from :meth:`diagnostic`) harmful/harmless projections on
        O's direction in both with the recoverability verdict."""
        from refusal_lab.directions import layer_cosines, summary

        def compute():
            d_o, d_c = self.directions("original"), self.directions(scheme)
            cos_sel = layer_cosines(d_o, d_c)
            cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))  # noqa: E731
            diag = self.diagnostic(scheme)
            return Drift(
                scheme=scheme, cosine_per_layer=[None if x != x else float(x) for x in cos_sel.tolist()],
                # O's direction against the variant's candidate at O's source, and against its own selection
                cosine_at_source=cos(d_o.direction, d_c.candidate(*d_o.selected)),
                cosine_selected=None if d_c.selected is None else cos(d_o.direction, d_c.direction),
                original=summary(d_o), variant=summary(d_c),
                projections=diag.projections, recoverability=diag.recoverability)

        parts = (self.original_fingerprint(), scheme, VERDICT_VERSION) + (() if self.spec.variant_selection else
                                                                     ("candidates",))
        return self._cached(f"drift {scheme}", parts, compute, codec=Drift)

    def _original_side(self, what, compute):
        """A computation on the original alone that every scheme shares (in this process),
        named by ``what`` (with everything it depends on besides the original)."""
        key = f"original side: {what}"
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _original_harmless_logits(self) -> torch.Tensor:
        """The original's last-position logits on the harmless evaluation set, once per study (every
        variant's KL is measured against them)."""
        from refusal_lab.judges import last_logits

        return self._original_side("harmless logits",
                                   lambda: last_logits(self.original, self.eval_sets()["harmless"].prompts))

    def _evaluate_handle(self, handle: ModelHandle, label: str, reference_logits: torch.Tensor | None,
                         kind: type[Evaluation] = Evaluation, **fields) -> Evaluation:
        """An evaluation of ``handle`` as ``kind`` (with its further ``fields``)."""
        from refusal_lab.evaluation import kl_divergence, multi_token_kl, reference_perplexity, refusal_evaluations
        from refusal_lab.zero_shot import accuracy as zero_shot_accuracy

        sets, first = refusal_evaluations(handle, self.eval_sets(), max_new_tokens=self.spec.max_new_tokens,
                                          judge=self.spec.judge, progress=self._progress(f"evaluate {label}: replies"))
        ppl = reference_perplexity(handle, progress=self._progress(f"evaluate {label}: perplexity"))
        kl = kl16 = None  # for a variant: KL to O at the first step (no second pass) and along O's replies
        if reference_logits is not None:
            kl = kl_divergence(reference_logits, first["harmless"])
            paths = self.evaluate("original").sets["harmless"].results
            memo = self._original_side(("multi-token KL logits", self._eval_key("original")), list)
            kl16 = multi_token_kl(self.original, handle, [r.prompt for r in paths], [r.response for r in paths],
                                  reference_memo=memo, progress=self._progress(f"evaluate {label}: multi-token KL"))
        acc, se = zero_shot_accuracy(handle, progress=self._progress(f"evaluate {label}: zero-shot check"))
        return kind(model=handle.name, sets=sets, perplexity=ppl, kl_to_original=kl, kl_multi_token=kl16,
                    zero_shot_accuracy=acc, zero_shot_se=se, **fields)

    def _eval_key(self, which: str) -> tuple:
        s = self.spec
        sets = {k: v.sha for k, v in self.eval_sets().items()}
        judged = () if s.judge == "substring" else (f"judge={s.judge}",)
        return (self.original_fingerprint(), which, sets, s.max_new_tokens, JUDGE_VERSION) + judged

    def evaluate(self, which: str = "original") -> Evaluation:
        """Refusal / over-refusal / perplexity / KL-to-original of the original or a variant."""
        def compute():
            ref = None if which == "original" else self._original_harmless_logits()
            return self._evaluate_handle(self.model_for(which), which, ref)

        return self._cached(f"evaluate {which}", self._eval_key(which), compute, codec=Evaluation)

    def repair(self, scheme: str):
        """The AIRD repair of ``scheme`` (calibrated on val splits unless overridden)."""
        from refusal_lab.aird import (AIRDError, CalibrationSets, Repair, bundled_fit_prompts, calibrate,
                               candidate_layer_sets, fit_realignment, original_projection)
        from refusal_lab.judges import last_logits

        s = self.spec
        if s.aird_realign not in ("auto", "on", "off"):
            raise AIRDError(f"aird_realign must be auto, on or off, got {s.aird_realign!r}")

        def compute():
            from refusal_lab.aird import mode_for

            d_o = self.directions("original")
            layer = d_o.selected[1]
            c = self.variant(scheme)
            # merged on quantized writers is impossible: the adapter computes the same function there
            mode = mode_for(c, range(c.n_layers), s.aird_mode)
            layer_sets = None
            if s.aird and s.aird.startswith("top:"):
                k = int(s.aird.split(":")[1])
                layer_sets = [list(range(max(0, layer - k + 1), layer + 1))]
            if s.aird_layers:
                layer_sets = [list(s.aird_layers)]
            manual = s.aird_alpha is not None and layer_sets and len(layer_sets) == 1
            fit = None
            if layer >= 1 and (s.aird_realign == "on" or s.aird_realign == "auto" and not manual):
                fit = fit_realignment(self.original, c, d_o.direction, layer, bundled_fit_prompts(),
                                      original_proj=self._original_side(("realign", layer, tensor_key(d_o.direction)),
                                                                        lambda: original_projection(
                                          self.original, d_o.direction, layer, bundled_fit_prompts())),
                                      progress=self._progress(f"AIRD {scheme}: re-alignment fit"))
            if manual:
                return Repair(d_o.direction, layer_sets[0], s.aird_alpha, mode, layer,
                              realign=None if fit is None else fit[1], realign_layer=None if fit is None else fit[0])
            alphas = (s.aird_alpha,) if s.aird_alpha is not None else None
            kwargs = {"alphas": alphas} if alphas else {}
            return calibrate(c, d_o.direction, layer, layer_sets=layer_sets or candidate_layer_sets(layer, c.n_layers),
                             mode=mode, realignment=fit, require_realignment=s.aird_realign == "on",
                             original=self.original, search=s.aird_search,
                             original_logits=self._original_side("calibration logits", lambda: last_logits(
                                 self.original, CalibrationSets.bundled().harmless)),
                             progress=self._progress(f"AIRD {scheme}: calibration"), **kwargs)

        return self._cached(f"aird {scheme}", self._repair_parts(scheme), compute, "repair")

    def _repair_parts(self, scheme: str) -> tuple:
        """The cache-key parts of :meth:`repair`."""
        s = self.spec
        return ((self.original_fingerprint(), scheme, s.aird, s.aird_mode, s.aird_alpha, s.aird_layers, s.aird_realign,
                 REPAIR_VERSION) + (() if s.aird_search == "generated" else (f"search={s.aird_search}",)))

    def stage_seconds(self, stage: str, key_parts: tuple) -> float | None:
        """Seconds the stored stage ``(stage, key_parts)`` took to compute — where this study reused another
        study's copy (stored with 0 s, so ETAs do not count it), the computing study's seconds (0 when no
        study of the store has them any more); None when it is not stored in this study."""
        key = cache_key(stage, CODE_VERSION, *key_parts, *self.numerics)
        entry = self.record.entry(key)
        if entry is None:
            return None
        if entry.get("seconds"):
            return entry["seconds"]
        peers = self.store.holders(key, besides=self.record.id)
        return next((e["seconds"] for _, _, e in peers if e.get("seconds")), entry.get("seconds"))

    def evaluate_repaired(self, scheme: str) -> RepairedEvaluation:
        """The same evaluation on the AIRD-repaired variant, plus the repair's cost (density)."""
        from refusal_lab.aird import applied, densified_weights, writer_density

        rep = self.repair(scheme)

        def compute():
            c = self.variant(scheme)
            ref = self._original_harmless_logits()
            before = writer_density(c, rep)
            densified = densified_weights(c, rep) if rep.mode == "merged" else 0
            with applied(c, rep) as h:
                out = self._evaluate_handle(h, f"{scheme}+AIRD", ref, RepairedEvaluation, repair=rep.summary(),
                                            density_before=before, densified_weights=densified)
                out.density_after = writer_density(h, rep)
            return out

        return self._cached(f"evaluate {scheme}+aird", self._eval_key(f"{scheme}+aird") + rep.key(), compute,
                            codec=RepairedEvaluation)

    def compare_methods(self, scheme: str, methods: tuple[str, ...] | None = None) -> dict[str, MethodEvaluation]:
        """Every repair of :data:`refusal_lab.aird.METHODS` (AIRD and what it is compared against) on
        ``scheme``: :func:`refusal_lab.study_repairs.compare_methods`."""
        return study_repairs.compare_methods(self, scheme, methods)

    def budget(self, scheme: str, max_layers: int = 8) -> list[BudgetPoint]:
        """AIRD budget curve for ``scheme`` on the harmful evaluation set (adapter form, same α)."""
        from refusal_lab.aird import budget_curve

        rep = self.repair(scheme)

        def compute():
            return budget_curve(self.variant(scheme), rep, self.eval_sets()["harmful"].prompts, max_layers=max_layers,
                                progress=self._progress(f"AIRD {scheme}: budget curve"))

        return self._cached(f"budget {scheme}", self._eval_key(f"{scheme}:budget") + rep.key() + (max_layers, BUDGET_VERSION),
                            compute, codec=list[BudgetPoint])

    def evaluate_method(self, scheme: str, method: str) -> RepairedEvaluation:
        """The evaluation of ``scheme`` repaired by ``method`` (aird | distill | aird+distill)."""
        return study_repairs.evaluate_method(self, scheme, method)

    def repair_result(self, scheme: str, budget_layers: int = 8) -> RepairResult:
        """The spec's repair method on ``scheme`` with what it is judged by (the AIRD page's view):
        :func:`refusal_lab.study_repairs.repair_result`."""
        return study_repairs.repair_result(self, scheme, budget_layers)

    def repaired_direction_cosines(self, scheme: str) -> list[float | None]:
        """Per-layer cosine of the repaired model's own candidates with O's (does the source survive?)."""
        from refusal_lab.aird import applied
        from refusal_lab.directions import generate_candidates, layer_cosines

        rep = self.repair(scheme)

        def compute():
            d_o = self.directions("original")
            with applied(self.variant(scheme), rep) as h:
                ds = generate_candidates(h, bundled("harmful", "train").prompts, bundled("harmless", "train").prompts,
                                         progress=self._progress(f"AIRD {scheme}: repaired directions"))
            return [None if x != x else float(x) for x in layer_cosines(d_o, ds).tolist()]

        return self._cached(f"repaired directions {scheme}", (self.original_fingerprint(), scheme) + rep.key(),
                            compute)

    # -- the whole pipeline ---------------------------------------------------------------
    def planned_stages(self, schemes: Sequence[str] | None = None, *, evaluate: bool = True,
                       aird: bool | None = None, budget: bool = False) -> list[str]:
        """The stages :meth:`run` goes through (``budget``: and :meth:`budget`), by name, for the time
        left in all (:mod:`refusal_lab.study_eta`); ``schemes``/``evaluate``/``aird`` narrow it to a page's part."""
        aird = self.spec.repairing if aird is None else aird
        out = ["directions original"] + (["evaluate original"] if evaluate else [])
        for s in self.spec.schemes if schemes is None else schemes:
            out += ([] if s in self._variants else [f"compress {s}"]) + [f"directions {s}", f"drift {s}"]
            out += [f"evaluate {s}"] if evaluate else []
            out += study_repairs.planned_stages(self, s, budget) if aird else []
        return out

    def run(self, budget: bool = False) -> StudyResults:
        """Every stage for every scheme (``budget``: and its AIRD budget curve); returns :meth:`results`.
        A variant's model is let go once its stages are done (every later read is from the store)."""
        self.run_original()
        for scheme in self.spec.schemes:
            self.run_scheme(scheme, budget)
        return self.results()

    def run_original(self) -> None:
        """The original model's stages (what every scheme's stages start from)."""
        self.original_fingerprint()
        self.directions("original")
        self.evaluate("original")

    def run_scheme(self, scheme: str, budget: bool = False) -> None:
        """Every stage of one ``scheme`` (those of the original first, when not stored yet); its variant is
        let go at the end."""
        self.compression_report(scheme)
        self.directions(scheme)
        self.drift(scheme)
        self.evaluate(scheme)
        if self.spec.repairing:
            study_repairs.run_repairs(self, scheme, budget)
        if self._variants.pop(scheme, None) is not None:
            release()

    def results(self) -> StudyResults:
        """Every stage's result for every scheme of the spec (computing what is not stored yet)."""
        from refusal_lab.directions import summary

        original = OriginalResult(evaluation=self.evaluate("original"), source=summary(self.directions("original")))
        out = StudyResults(spec=self.spec.to_dict(), study_id=self.record.id, original=original)
        for scheme in self.spec.schemes:
            v = VariantResult(compression=self.compression_report(scheme), drift=self.drift(scheme),
                              evaluation=self.evaluate(scheme))
            if self.spec.repairing:
                study_repairs.fill_variant(self, scheme, v, original.evaluation)
            out.variants[scheme] = v
        return out

