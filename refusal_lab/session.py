"""What the dashboard's sessions share, without any UI: the workspace of one loaded model (its
compressed variants, studies and small results), the study spec a session's settings make, the
"everything this page shows is stored" markers, the variants remembered across server restarts,
and stored studies as the Report page reads them. Pages (``pages/``) hold widgets only and call this
module; nothing here imports Streamlit.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_lab.compression.report import CompressionReport
from refusal_lab.evaluation import PERPLEXITY_LABEL
from refusal_lab.models import ModelHandle
from refusal_lab.progress import Progress, format_seconds
from refusal_lab.store import RunStore, StoreError, StudyInfo, cache_key
from refusal_lab.results import BudgetPoint, StudyResults
from refusal_lab.study import Study, StudySpec

__all__ = ["DEFAULT_SETTINGS", "POSITIONS", "SCREEN", "Variant", "RememberedVariant", "Workspace", "StoreError", "StoredStudy",
           "runs_root", "run_store", "prompt_set", "prompt_spec", "study_spec", "completed_key", "is_completed",
           "mark_completed", "original_source_layer", "mark_original_direction", "remember_variant",
           "remembered_variants", "list_studies"]

ROLES = ("harmful", "harmless", "borderline")
DEFAULT_SETTINGS = {"limit": 24, "max_new_tokens": 64, "positions": "screened", "variant_selection": False,
                    "judge": "substring"}
POSITIONS = {"screened": "every post-instruction token, screened (fast; same choice in every measured case)",
             "all": "every post-instruction token, exact (as in the paper; slower)",
             "last": "last prompt token only, screened"}
SCREEN = 12  # val prompts of the induce screen (refusal_lab.selection)


# ----------------------------------------------------------------------------------------------
# The workspace of one loaded model
# ----------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """A compressed variant of the workspace's model, its compression report and perplexity."""

    scheme: str
    handle: ModelHandle
    report: CompressionReport
    perplexity: float | None = None
    zero_shot: float | None = None  # refusal_lab.zero_shot accuracy, measured with the perplexity


@dataclass
class RememberedVariant:
    """A variant compressed before (maybe before a server restart): its report and perplexity, not its model."""

    scheme: str
    report: CompressionReport
    perplexity: float | None = None
    zero_shot: float | None = None


@dataclass
class Workspace:
    """Everything computed from one loaded model, shared by every session of the server."""

    fingerprint: str
    variants: dict[str, Variant] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)     # small results (perplexity, timed passes, …)
    studies: dict[str, Study] = field(default_factory=dict)  # study-spec key → Study
    lock: threading.RLock = field(default_factory=threading.RLock)
    study_lock: threading.RLock = field(default_factory=threading.RLock)  # one study computation at a time

    def study(self, spec: StudySpec, handle: ModelHandle, root: str | None = None) -> Study:
        """The shared :class:`Study` of ``spec`` on ``handle``, holding the variants compressed so far
        (same scheme, same calibration: the same model), so it does not compress them again."""
        root = root or runs_root()
        key = cache_key(spec.to_dict(), str(Path(root).resolve()))
        with self.lock:
            study = self.studies.get(key)
            if study is None:
                study = self.studies[key] = Study(spec, run_store(root), original=handle)
            for scheme, v in self.variants.items():
                study.adopt_variant(scheme, v.handle)
        return study

    def keep_variants_of(self, study: Study) -> None:
        """Hold the variants ``study`` compressed (e.g. for a scheme typed on the drift page) as workspace
        variants, so the other pages offer them too."""
        with self.lock:
            for scheme, handle in study.variants().items():
                if scheme not in self.variants:
                    self.variants[scheme] = Variant(scheme, handle, study.compression_report(scheme))

    def remove_variants(self, schemes) -> None:
        """Forget variants (frees their memory once no study holds them)."""
        with self.lock:
            for scheme in schemes:
                self.variants.pop(scheme, None)
            for study in self.studies.values():
                study.drop_variants(schemes)

    def original_perplexity(self, handle: ModelHandle, progress: Progress | None = None) -> float:
        """The loaded model's reference perplexity (:func:`refusal_lab.evaluation.reference_perplexity`), once."""
        from refusal_lab.evaluation import reference_perplexity

        from refusal_lab.zero_shot import accuracy

        if "perplexity" not in self.values:
            self.values["perplexity"] = reference_perplexity(handle, progress=progress)
            self.values["zero_shot"] = accuracy(handle)[0]
        return self.values["perplexity"]

    def compress(self, handle: ModelHandle, scheme: str, *, perplexity: bool = True,
                 progress: Progress | None = None, perplexity_progress: Progress | None = None) -> Variant:
        """Compress ``handle`` with ``scheme`` into a workspace variant (with its reference perplexity
        when asked), remembered in the run store so a restarted server lists it."""
        from refusal_lab.compression import apply
        from refusal_lab.evaluation import reference_perplexity

        small, rep = apply(handle, scheme, progress=progress)
        from refusal_lab.zero_shot import accuracy

        ppl = reference_perplexity(small, progress=perplexity_progress) if perplexity else None
        v = Variant(scheme, small, rep, ppl, accuracy(small)[0] if perplexity else None)
        with self.lock:
            self.variants[scheme] = v
        remember_variant(handle, v)
        return v

    def steered_reply(self, h: ModelHandle, prompt: str, max_new_tokens: int, intervention: str = "none",
                      direction=None, *, layer: int | None = None, coeff: float = 1.0,
                      direction_id: str | None = None) -> dict:
        """A greedy reply of ``h`` to ``prompt`` under ``intervention`` (:data:`refusal_lab.interventions.INTERVENTIONS`,
        along ``direction`` named by ``direction_id``), its refusal verdict, reply tokens and the refusal
        score before each; kept per workspace."""
        from refusal_lab.generation import generate
        from refusal_lab.interventions import intervene
        from refusal_lab.judges import is_refusal, prefix_refusal_scores

        steered = intervention != "none"
        params = [intervention, coeff, layer] if steered else ["none"]
        key = cache_key("steer-v1", h.fingerprint, prompt, max_new_tokens, params, direction_id if steered else None)
        if key not in self.values:
            with intervene(intervention, h, direction, layer=layer, coeff=coeff):  # holds h.lock
                reply = generate(h, [prompt], max_new_tokens=max_new_tokens)[0]
                tokens, scores = prefix_refusal_scores(h, prompt, reply)
            self.values[key] = {"reply": reply, "refusal": is_refusal(reply), "tokens": tokens, "scores": scores}
        return self.values[key]

    def direction(self, study: Study):
        """The original's selected direction of ``study`` kept in memory, or None."""
        return self.values.get(("direction", study.record.id))

    def keep_direction(self, study: Study, dirset) -> None:
        self.values[("direction", study.record.id)] = dirset
        mark_original_direction(study, dirset)

    def search_estimate(self, handle: ModelHandle) -> str:
        """How long an exact all-position search takes on this machine: planned passes × a timed pass
        (timed once per workspace)."""
        from refusal_lab.activations import post_instruction_length
        from refusal_lab.prompts import bundled
        from refusal_lab.selection import planned_passes, seconds_per_pass

        key = ("seconds_per_pass", handle.fingerprint, handle.precision)
        if key not in self.values:
            self.values[key] = seconds_per_pass(handle, bundled("harmless", "val").prompts)
        n = post_instruction_length(handle) * int(0.8 * handle.n_layers)
        passes = planned_passes(n, len(bundled("harmless", "val").prompts))
        return f"about {passes:.0f} passes over the val prompts ≈ {format_seconds(passes * self.values[key])}"


def workspace_key(handle: ModelHandle) -> str:
    """A workspace per weights and compute precision (variants inherit the original's precision)."""
    return f"{handle.fingerprint}|{handle.precision}"


# ----------------------------------------------------------------------------------------------
# Run store, prompt sets and the study spec of a session
# ----------------------------------------------------------------------------------------------

def runs_root() -> str:
    """The run store folder (``$REFUSAL_LAB_RUNS`` or ``runs/`` in the working directory)."""
    return os.environ.get("REFUSAL_LAB_RUNS", "runs")


def run_store(root: str | None = None) -> RunStore:
    return RunStore(root or runs_root())


def prompt_set(choice: dict, role: str, split: str | None = None):
    """The prompt set of ``role`` (harmful / harmless / borderline) a session chose — ``choice[role]`` is
    ``{"source": "bundled"}`` or ``{"source": "file", "path", "name", "column"}`` — optionally one split
    (train / val / test; uploaded files are split with the same fixed seed as the bundled sets)."""
    from refusal_lab.prompts import SPLIT_FRACTIONS, PromptSet, bundled, load_prompts, split_indices

    c = choice.get(role, {"source": "bundled"})
    if c.get("source") != "file":
        return bundled(role, split)
    full = load_prompts(c["path"], column=c.get("column") or None, name=c.get("name") or role)
    if split is None:
        return full
    idx = split_indices(len(full), SPLIT_FRACTIONS[role])[split]
    return PromptSet(f"{full.name}/{split}", [full.prompts[i] for i in idx], [full.categories[i] for i in idx],
                     full.source)


def prompt_spec(choice: dict, role: str) -> str:
    """The role's *evaluation* set as a study spec string: ``bundled:KIND:test`` or an uploaded file."""
    c = choice.get(role, {"source": "bundled"})
    return c["path"] if c.get("source") == "file" else f"bundled:{role}:test"


def study_spec(handle: ModelHandle, cfg: dict, settings: dict, choice: dict, **aird) -> StudySpec:
    """The dashboard's study spec for a session: its model configuration ``cfg``, evaluation
    ``settings`` (:data:`DEFAULT_SETTINGS`) and prompt ``choice`` (schemes are attached per call, so
    adding a variant never changes where earlier results are stored)."""
    positions = settings.get("positions")
    return StudySpec(model=cfg["spec"], schemes=[], harmful=prompt_spec(choice, "harmful"),
                     harmless=prompt_spec(choice, "harmless"), borderline=prompt_spec(choice, "borderline"),
                     limit=int(settings["limit"]), max_new_tokens=int(settings["max_new_tokens"]),
                     device=cfg["device"], dtype=cfg["dtype"], precision=handle.precision,
                     device_map=cfg.get("device_map"), max_memory=cfg.get("max_memory"),
                     selection_positions=[-1] if positions == "last" else None,
                     selection_screen=None if positions == "all" else SCREEN,
                     variant_selection=bool(settings.get("variant_selection", False)),
                     judge=str(settings.get("judge", "substring")), name=f"dashboard · {handle.name}", **aird)


# ----------------------------------------------------------------------------------------------
# "Everything this page shows is stored" markers
# ----------------------------------------------------------------------------------------------

def completed_key(page: str, **parts) -> str:
    """Key of a page's "everything it shows is stored" marker in the study folder."""
    return cache_key("dashboard-complete", page, parts)


def is_completed(study: Study, key: str) -> bool:
    """Whether a page's results were fully computed and stored (so loading them computes nothing)."""
    try:
        return study.record.has(key)
    except Exception:  # noqa: BLE001 — an unreadable marker just means "compute again"
        return False


def mark_completed(study: Study, key: str, page: str, info: dict | None = None) -> None:
    """Record in the study folder that a page's results are all stored (after a successful run)."""
    study.record.put_json(key, f"dashboard {page}", {"complete": True, **(info or {})})


def completed_markers(study: Study) -> list[dict]:
    """Every page marker stored in ``study`` (what the Report page rebuilds a dashboard study from)."""
    rec = study.record
    return [rec.get_json(k) for k, e in rec.manifest["stages"].items()
            if str(e.get("stage", "")).startswith("dashboard ") and e.get("kind") == "json" and rec.has(k)]


def original_source_layer(study: Study) -> int | None:
    """The original's source layer if its direction is already stored (read from the marker)."""
    key = completed_key("original-direction")
    if is_completed(study, key):
        return study.record.get_json(key).get("layer")
    return None


def mark_original_direction(study: Study, dirset) -> None:
    if dirset is not None and dirset.selected is not None:
        mark_completed(study, completed_key("original-direction"), "original direction",
                       {"position": dirset.selected[0], "layer": dirset.selected[1]})


# ----------------------------------------------------------------------------------------------
# Compressed variants, remembered in the run store
# ----------------------------------------------------------------------------------------------

def _variants_record(handle: ModelHandle, root: str | None = None):
    """A run-store study (one per model) listing the variants compressed on the Compress page, with
    their compression reports and perplexities, so a restarted server still shows them."""
    return run_store(root).create_study(f"dashboard variants · {handle.name}",
                                        {"kind": "dashboard-variants", "model_fingerprint": handle.fingerprint})


def remember_variant(handle: ModelHandle, v: Variant, root: str | None = None) -> None:
    report = {k: val for k, val in v.report.to_json().items() if k not in ("module_sparsity", "module_bits")}
    _variants_record(handle, root).put_json(cache_key("variant", v.scheme), "dashboard compress",
                                            {"scheme": v.scheme, "report": report, "perplexity": v.perplexity,
                                             "zero_shot": v.zero_shot,
                                             "perplexity_of": PERPLEXITY_LABEL},
                                            seconds=v.report.seconds)


def remembered_variants(handle: ModelHandle, root: str | None = None) -> dict[str, RememberedVariant]:
    """The variants stored by :func:`remember_variant`, by scheme (perplexity None when it was measured
    by an earlier definition)."""
    rec = _variants_record(handle, root)
    out = {}
    for key, e in rec.manifest["stages"].items():
        if e.get("stage") == "dashboard compress" and rec.has(key):
            d = rec.get_json(key)
            ppl = d.get("perplexity") if d.get("perplexity_of") == PERPLEXITY_LABEL else None
            out[d["scheme"]] = RememberedVariant(d["scheme"], CompressionReport.from_json(d["report"]), ppl,
                                                 d.get("zero_shot"))
    return out


# ----------------------------------------------------------------------------------------------
# Stored studies (the Report page)
# ----------------------------------------------------------------------------------------------

def list_studies(root: str | None = None) -> list[StudyInfo]:
    """Every study of the run store (``StoreError``/``OSError`` when it cannot be read)."""
    return run_store(root).list_studies()


class StoredStudy:
    """One stored study as the Report page reads it: stages, stored JSON, the HTML report, a zip."""

    def __init__(self, info: StudyInfo, root: str | None = None) -> None:
        self.info, self.id = info, info.id
        self.store = run_store(root)
        self.record = self.store.open(info.id)

    @property
    def is_variants_list(self) -> bool:
        return self.info.spec.get("kind") == "dashboard-variants"

    def stages(self) -> list[dict]:
        """One row per stored entry: stage, kind, when, seconds, key and its integrity status."""
        return [{"stage": e.get("stage"), "kind": e.get("kind"), "done": e.get("done_at", "")[:19],
                 "seconds": e.get("seconds"), "key": k,
                 "status": "ok" if (p := self.record.problem(k)) is None else p}
                for k, e in self.record.manifest["stages"].items()]

    def json(self) -> dict:
        """The study's spec and every stored JSON artifact, by stage."""
        out: dict = {"study": self.id, "name": self.info.name, "spec": self.info.spec, "stages": {}}
        for k, e in self.record.manifest["stages"].items():
            if e.get("kind") == "json" and self.record.has(k):
                out["stages"].setdefault(e["stage"], []).append(self.record.get_json(k))
        return out

    def pipeline(self) -> Study:
        """The stored study as a :class:`Study` (nothing is loaded or computed here)."""
        study = Study(StudySpec.from_dict(self.info.spec), self.store)
        if study.record.id != self.id:
            raise StoreError(f"the stored spec of {self.id} maps to another folder ({study.record.id}); the study "
                             "was made by another version of the code")
        return study

    def report_inputs(self, study: Study) -> StudyResults:
        """The results :func:`refusal_lab.report.html_report` shows, from ``study``'s stored stages (a
        stage that is missing is computed), with the AIRD budget curves its pages computed. CLI studies
        list their schemes in the spec; dashboard studies take the schemes their pages completed, and
        the AIRD settings each AIRD run used."""
        if study.spec.schemes:
            return study.results()
        budgets: dict[str, list[BudgetPoint]] = {}
        markers = completed_markers(study)
        schemes = sorted({s for m in markers for s in m.get("schemes", [])} | {m["scheme"] for m in markers
                                                                               if "scheme" in m})
        results = study.with_spec(schemes=schemes, aird=None).results()
        for m in markers:
            if m.get("scheme") in results.variants and isinstance(m.get("settings"), dict):
                repaired = study.with_spec(schemes=schemes, **m["settings"])
                results.variants[m["scheme"]].repaired = repaired.evaluate_repaired(m["scheme"])
                budgets[m["scheme"]] = repaired.budget(m["scheme"], max_layers=int(m.get("budget", 8)))
        results.budget = budgets or None
        return results

    def html(self, study: Study) -> bytes:
        """The self-contained HTML report of ``study`` (:meth:`pipeline`)."""
        from refusal_lab.report import html_report

        results = self.report_inputs(study)
        if not results.variants:
            raise ValueError("this study has no compressed variant with a drift result yet: run the Refusal drift page")
        return html_report(results).encode("utf-8")

    def zip_bytes(self) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return self.store.export_zip(self.id, Path(tmp) / f"{self.id}.zip").read_bytes()

    def delete(self) -> None:
        self.store.delete(self.id)
