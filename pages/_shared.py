"""UI glue shared by the dashboard pages: the shared model cache, progress bars with cancel,
error boxes. No science here — every computation is a call into ``core/``.

Sharing model: the loaded model and what is computed from it (compressed variants, the refusal
direction) live in :func:`workspace`, a ``st.cache_resource`` object shared by every session of the
server, so a page reload or a second browser tab reuses them. Interventions hold ``handle.lock``
(core), so sessions never run under each other's steering.
"""

from __future__ import annotations

import os
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from core.models import ChatTemplateError, ModelHandle, ModelLoadError, load_model
from core.progress import Cancelled, Eta, format_seconds

DEFAULT_SPEC = os.environ.get("REFUSAL_LAB_MODEL", "default")
MODEL_CFG = "model_cfg"


def _use_app_navigation() -> None:
    """Streamlit treats a folder named ``pages/`` next to the main script as a legacy multipage app
    until ``st.navigation`` is first called in the process: a first visit straight to ``/drift`` would
    run ``pages/drift.py`` alone, with an auto-generated sidebar listing every file here. Leave that
    mode and rerun, so ``app.py``'s navigation (and page config) serves the URL."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
        from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx
    except ImportError:  # another Streamlit layout: nothing to do
        return
    if PagesManager.uses_pages_directory and get_script_run_ctx() is not None:
        PagesManager.uses_pages_directory = False
        st.rerun()


_use_app_navigation()  # runs once per server process, in whichever page is opened first


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def show_error(what: str, exc: BaseException | str, fix: str | None = None) -> None:
    """An ``st.error`` box with what failed, the cause and how to fix it (never a traceback)."""
    cause = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    msg = f"**{what}.** {cause}"
    if fix:
        msg += f"\n\n**Fix:** {fix}"
    st.error(msg, icon=":material/error:")


def fix_for(exc: BaseException) -> str:
    """A generic fix hint for an exception raised by ``core``."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "cannot allocate" in text:
        return ("the machine ran out of memory: remove compressed variants you no longer need (Compress page), "
                "pick a smaller model or load it in bfloat16.")
    if isinstance(exc, ChatTemplateError):
        return "give a chat template on the Model page (Advanced → chat template)."
    if isinstance(exc, ModelLoadError):
        return "check the model spec on the Model page."
    return "check the inputs above and try again; results computed so far are kept."


def guarded(what: str, fn: Callable[[], Any], *, fix: str | None = None) -> tuple[bool, Any]:
    """Run ``fn``; on an error show it (cause + fix) and return ``(False, None)``.

    :class:`~core.progress.Cancelled` shows an info box instead. Streamlit's own control-flow
    exceptions (rerun/stop, which derive from ``BaseException``) pass through untouched.
    """
    try:
        return True, fn()
    except Cancelled:
        st.info(f"{what}: cancelled. Everything finished before the cancel is kept.", icon=":material/cancel:")
    except Exception as e:  # noqa: BLE001 — the page must show the error, not a traceback
        traceback.print_exc()  # server log keeps the details
        show_error(f"{what} failed", e, fix or fix_for(e))
    return False, None


# ----------------------------------------------------------------------------------------------
# Progress with cancel
# ----------------------------------------------------------------------------------------------

def _cancel_count(key: str) -> int:
    return int(st.session_state.get(f"{key}__count", 0))


def request_cancel(key: str) -> None:
    """What the Cancel button does: sets ``session_state[key]`` (the page's "cancelled" notice, which the
    page may clear at once) and counts the click, which is what stops the running computation."""
    st.session_state[key] = True
    st.session_state[f"{key}__count"] = _cancel_count(key) + 1


def cancel_check(key: str | None) -> Callable[[], bool]:
    """Whether Cancel (``key``) was clicked since this check was made. Counting clicks, not reading the
    notice flag: the rerun a click triggers shows the notice and clears the flag well before the
    running computation reaches its next progress report, which then must still stop."""
    if not key:
        return lambda: False
    start = _cancel_count(key)
    return lambda: _cancel_count(key) > start


def cancel_button(key: str):
    """A cancel button for a long action; a click stops the running computation at its next progress
    report (see :func:`request_cancel`). Returns its placeholder: call ``.empty()`` on it when the
    action is over."""
    st.session_state.setdefault(key, False)
    slot = st.empty()
    slot.button("Cancel", key=f"{key}__btn", on_click=request_cancel, args=(key,), icon=":material/cancel:")
    return slot


def progress_callback(stage: str, *, cancel_key: str | None = None, container=None):
    """A core progress callback ``(done, total)`` that drives an ``st.progress`` bar labelled with
    ``stage``; raises :class:`Cancelled` once Cancel (``cancel_key``) is clicked after it was made."""
    where = container if container is not None else st
    bar = where.progress(0.0, text=f"{stage} …")
    cancelled = cancel_check(cancel_key)

    def callback(done: int, total: int) -> None:
        if cancelled():
            raise Cancelled(stage)
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        bar.progress(frac, text=f"{stage} · {done}/{total}")

    callback.bar = bar  # type: ignore[attr-defined]
    return callback


# ----------------------------------------------------------------------------------------------
# The shared model and workspace
# ----------------------------------------------------------------------------------------------

def default_cfg() -> dict:
    return {"spec": DEFAULT_SPEC, "device": "auto", "dtype": "auto", "precision": "auto", "trust_remote_code": False,
            "chat_template": None}


def model_cfg() -> dict:
    """The model configuration chosen in this session (the default model unless changed)."""
    cfg = st.session_state.get(MODEL_CFG)
    if not isinstance(cfg, dict):
        cfg = default_cfg()
        st.session_state[MODEL_CFG] = cfg
    return cfg


@st.cache_resource(show_spinner=False, max_entries=2)
def _load(spec: str, device: str, dtype: str, trust_remote_code: bool, chat_template: str | None,
          precision: str = "auto") -> ModelHandle:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            chat_template=chat_template or None, precision=precision)
    handle.meta.setdefault("warnings", [])
    handle.meta["warnings"] += sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)
                                       and "adapter" in str(w.message)})
    return handle


@dataclass
class Variant:
    """A compressed variant of the workspace's model."""

    scheme: str
    handle: ModelHandle
    report: dict
    perplexity: float | None = None


@dataclass
class Workspace:
    """Everything computed from one loaded model, shared by all sessions of the server."""

    fingerprint: str
    variants: dict[str, Variant] = field(default_factory=dict)
    directions: dict[str, Any] = field(default_factory=dict)  # key → DirectionSet
    values: dict[str, Any] = field(default_factory=dict)     # small cached results (perplexity, …)
    studies: dict[str, Any] = field(default_factory=dict)    # study-spec key → core.study.Study
    lock: threading.RLock = field(default_factory=threading.RLock)
    study_lock: threading.RLock = field(default_factory=threading.RLock)  # one study computation at a time


@st.cache_resource(show_spinner=False, max_entries=2)
def workspace(fingerprint: str) -> Workspace:
    return Workspace(fingerprint)


def load_handle(cfg: dict | None = None) -> ModelHandle:
    """Load (or reuse) the model of ``cfg``; raises ``ModelLoadError`` & co."""
    cfg = cfg or model_cfg()
    return _load(cfg["spec"], cfg["device"], cfg["dtype"], bool(cfg["trust_remote_code"]),
                 cfg.get("chat_template"), cfg.get("precision", "auto"))


def require_handle() -> ModelHandle:
    """The session's model, loaded with a spinner; on failure an error box and ``st.stop()``."""
    cfg = model_cfg()
    try:
        with st.spinner(f"Loading model `{cfg['spec']}` (once per server) …"):
            return load_handle(cfg)
    except Exception as e:  # noqa: BLE001
        show_error(f"Could not load model `{cfg['spec']}`", e,
                   "open the **Model** page and pick another spec (e.g. `default`).")
        st.stop()
        raise  # unreachable


def current_workspace(handle: ModelHandle | None = None) -> Workspace:
    handle = handle or require_handle()
    return workspace(ws_key(handle))


def ws_key(handle: ModelHandle) -> str:
    """A workspace per weights and compute precision (variants inherit the original's precision)."""
    return f"{handle.fingerprint}|{handle.precision}"


def model_badge(handle: ModelHandle) -> None:
    """A one-line caption saying which model the page works on."""
    st.caption(f"Model: **{handle.name}** · {handle.n_layers} layers × {handle.d_model} · "
               f"fingerprint `{handle.fingerprint}` — change it on the Model page.")


# ----------------------------------------------------------------------------------------------
# Prompt sets chosen on the Prompts page
# ----------------------------------------------------------------------------------------------

PROMPTS = "prompt_choice"
ROLES = ("harmful", "harmless", "borderline")


def prompt_choice() -> dict:
    """``{role: {"source": "bundled"} | {"source": "file", "path": str, "name": str}}`` for this session."""
    choice = st.session_state.get(PROMPTS)
    if not isinstance(choice, dict):
        choice = {role: {"source": "bundled"} for role in ROLES}
        st.session_state[PROMPTS] = choice
    return choice


def prompt_set(role: str, split: str | None = None):
    """The session's prompt set for ``role`` (harmful / harmless / borderline), optionally one split
    (train / val / test; uploaded files are split with the same fixed seed as the bundled sets)."""
    from core.prompts import SPLIT_FRACTIONS, PromptSet, bundled, load_prompts, split_indices

    c = prompt_choice().get(role, {"source": "bundled"})
    if c.get("source") != "file":
        return bundled(role, split)
    full = load_prompts(c["path"], column=c.get("column") or None, name=c.get("name") or role)
    if split is None:
        return full
    idx = split_indices(len(full), SPLIT_FRACTIONS[role])[split]
    return PromptSet(f"{full.name}/{split}", [full.prompts[i] for i in idx], [full.categories[i] for i in idx],
                     full.source)


def prompt_spec(role: str) -> str:
    """The role's *evaluation* set as a study spec string: ``bundled:KIND:test`` or an uploaded file."""
    c = prompt_choice().get(role, {"source": "bundled"})
    return c["path"] if c.get("source") == "file" else f"bundled:{role}:test"


# ----------------------------------------------------------------------------------------------
# Run store
# ----------------------------------------------------------------------------------------------

def runs_root() -> str:
    """The run store folder (``$REFUSAL_LAB_RUNS`` or ``runs/`` in the working directory)."""
    return os.environ.get("REFUSAL_LAB_RUNS", "runs")


def run_store():
    from core.store import RunStore
    return RunStore(runs_root())


# ----------------------------------------------------------------------------------------------
# The study pipeline (Drift, AIRD pages)
# ----------------------------------------------------------------------------------------------

SETTINGS = "study_settings"
DEFAULT_SETTINGS = {"limit": 24, "max_new_tokens": 32, "positions": "screened", "variant_selection": False}
POSITIONS = {"screened": "every post-instruction token, screened (fast; same choice in every measured case)",
             "all": "every post-instruction token, exact (as in the paper; slower)",
             "last": "last prompt token only, screened"}
SCREEN = 12  # val prompts of the induce screen (core.selection)


def study_settings() -> dict:
    """Evaluation settings of this session (prompts per set, new tokens per reply)."""
    cur = st.session_state.get(SETTINGS)
    if not isinstance(cur, dict):
        cur = dict(DEFAULT_SETTINGS)
        st.session_state[SETTINGS] = cur
    return cur


def settings_widgets(container=None) -> dict:
    """Sliders for :func:`study_settings` (they change the evaluation, hence the cache keys)."""
    where = container if container is not None else st
    cur = study_settings()
    c1, c2 = where.columns(2)
    limit = c1.slider("Prompts per evaluation set", 4, 200, int(cur["limit"]), step=4,
                      help="first N prompts of the harmful / harmless / borderline test sets (Prompts page)")
    tokens = c2.slider("New tokens per reply", 16, 128, int(cur["max_new_tokens"]), step=16,
                       help="greedy generation judged by the substring refusal judge")
    current = cur.get("positions", "screened")
    positions = where.radio("Direction search", list(POSITIONS), format_func=POSITIONS.get,
                            index=list(POSITIONS).index(current if current in POSITIONS else "screened"),
                            help=f"screened: every candidate's induce score is first measured on {SCREEN} val "
                                 "prompts and only those that may induce refusal are scored on all of them "
                                 "(BENCHMARKS.md compares it with the exact search); exact: every candidate on "
                                 "every val prompt")
    if positions == "all":
        where.caption(f"Exact search: {search_estimate(require_handle())} per model "
                      "(more if no candidate passes the filters).")
    variant_selection = where.checkbox(
        "Also select each variant's own direction", value=bool(cur.get("variant_selection", False)),
        help="shows where the variant's refusal direction comes from (its source layer) and its scores; one "
             "more direction search per variant. Off, the drift compares the variant's candidates with the "
             "original's direction at the original's source.")
    cur.update(limit=limit, max_new_tokens=tokens, positions=positions, variant_selection=variant_selection)
    return cur


def search_estimate(handle: ModelHandle) -> str:
    """How long an exact all-position search takes on this machine: planned passes × a timed pass."""
    from core.activations import post_instruction_length
    from core.prompts import bundled
    from core.selection import planned_passes, seconds_per_pass

    ws = current_workspace(handle)
    key = ("seconds_per_pass", handle.fingerprint, handle.precision)
    if key not in ws.values:
        ws.values[key] = seconds_per_pass(handle, bundled("harmless", "val").prompts)
    n = post_instruction_length(handle) * int(0.8 * handle.n_layers)
    passes = planned_passes(n, len(bundled("harmless", "val").prompts))
    return f"about {passes:.0f} passes over the val prompts ≈ {format_seconds(passes * ws.values[key])}"


def study_spec(handle: ModelHandle, **aird):
    """The dashboard's study spec for this session: model, evaluation sets and settings (schemes are
    attached per call, so adding a variant never changes where earlier results are stored)."""
    from core.study import StudySpec

    cfg, s = model_cfg(), study_settings()
    return StudySpec(model=cfg["spec"], schemes=[], harmful=prompt_spec("harmful"), harmless=prompt_spec("harmless"),
                     borderline=prompt_spec("borderline"), limit=int(s["limit"]),
                     max_new_tokens=int(s["max_new_tokens"]), device=cfg["device"], dtype=cfg["dtype"],
                     precision=handle.precision,
                     selection_positions=[-1] if s.get("positions") == "last" else None,
                     selection_screen=None if s.get("positions") == "all" else SCREEN,
                     variant_selection=bool(s.get("variant_selection", False)),
                     name=f"dashboard · {handle.name}", **aird)


def get_study(handle: ModelHandle, **aird):
    """The shared :class:`core.study.Study` of this session's spec, with the Compress page's variants."""
    from core.store import cache_key
    from core.study import Study

    spec = study_spec(handle, **aird)
    key = cache_key(spec.to_dict(), str(Path(runs_root()).resolve()))
    ws = workspace(ws_key(handle))
    with ws.lock:
        study = ws.studies.get(key)
        if study is None:
            study = ws.studies[key] = Study(spec, run_store(), original=handle)
        attach_variants(study, ws)
    return study


def attach_variants(study, ws: Workspace) -> None:
    """Give the study the variants already compressed on the Compress page (same scheme, same
    calibration: the same model), so it does not compress them again."""
    variants = getattr(study, "_variants", None)
    if isinstance(variants, dict):
        for key, v in ws.variants.items():
            variants.setdefault(key, v.handle)


def run_study(handle: ModelHandle | None, study, fn, *, what: str, cancel_key: str | None = None,
              planned: list[str] | None = None):
    """Run ``fn(study)`` with one progress bar labelled with the current stage and its time left (and,
    given the ``planned`` stages, the time left in all: :mod:`core.study_eta`); errors become error
    boxes. Returns ``(ok, value)``. One computation per workspace at a time (others wait)."""
    from core.study_eta import for_study

    ws = workspace(ws_key(handle) if handle is not None else "-")
    bar = st.progress(0.0, text=f"{what} …")
    cancelled = cancel_check(cancel_key)
    eta = Eta()
    whole = None

    def on_progress(stage: str, done: int, total: int) -> None:
        if cancelled():
            raise Cancelled(stage)
        here = eta.update(stage, done, total)
        left = format_seconds(here)
        text = f"{what} · {stage} · {done}/{total}" + (f" · {left} left in this step" if left else "")
        if whole is not None:
            overall = whole.describe(here)
            text += f" · {overall}" if overall else ""
        bar.progress(0.0 if total <= 0 else min(1.0, done / total), text=text)

    def call():
        nonlocal whole
        with ws.study_lock:
            if planned:
                whole = for_study(study, planned)
                study.on_stage = whole.on_stage
            study.on_progress = on_progress
            try:
                return fn(study)
            finally:
                study.on_progress = None
                study.on_stage = None

    ok, value = guarded(what, call)
    bar.empty()
    return ok, value


def completed_key(page: str, **parts) -> str:
    """Key of the dashboard's "everything this page shows is stored" marker in the study folder."""
    from core.store import cache_key
    return cache_key("dashboard-complete", page, parts)


def is_completed(study, key: str) -> bool:
    """Whether a page's results were fully computed and stored (so loading them computes nothing)."""
    try:
        return study.record.has(key)
    except Exception:  # noqa: BLE001 — an unreadable marker just means "compute again"
        return False


def mark_completed(study, key: str, page: str, info: dict | None = None) -> None:
    """Record in the study folder that a page's results are all stored (after a successful run)."""
    study.record.put_json(key, f"dashboard {page}", {"complete": True, **(info or {})})


def original_source_layer(study) -> int | None:
    """The original's source layer if its direction is already stored (read from the marker)."""
    key = completed_key("original-direction")
    if is_completed(study, key):
        return study.record.get_json(key).get("layer")
    return None


def mark_original_direction(study, dirset) -> None:
    if dirset is not None and dirset.selected is not None:
        mark_completed(study, completed_key("original-direction"), "original direction",
                       {"position": dirset.selected[0], "layer": dirset.selected[1]})


def study_direction(handle: ModelHandle, study, *, compute: bool = False, cancel_key: str | None = None):
    """The original model's selected refusal direction from the study (the one the Drift and AIRD pages
    use): from memory, else loaded from the run store when stored, else computed when ``compute``.
    Returns a :class:`core.directions.DirectionSet` or None."""
    ws = workspace(ws_key(handle))
    key = ("direction", study.record.id)
    if key in ws.values:
        return ws.values[key]
    if not compute and original_source_layer(study) is None:
        return None
    ok, ds = run_study(handle, study, lambda s: s.directions("original"), cancel_key=cancel_key,
                       what="Refusal direction of the original" if compute else "Loading the stored refusal direction")
    if not ok:
        return None
    ws.values[key] = ds
    mark_original_direction(study, ds)
    return ds


# ----------------------------------------------------------------------------------------------
# Compressed variants made on the Compress page, remembered in the run store
# ----------------------------------------------------------------------------------------------

def variants_record(handle: ModelHandle):
    """A run-store study (one per model) listing the variants compressed on the Compress page, with
    their compression reports and perplexities, so a restarted server still shows them."""
    return run_store().create_study(f"dashboard variants · {handle.name}",
                                    {"kind": "dashboard-variants", "model_fingerprint": handle.fingerprint})


def remember_variant(handle: ModelHandle, v: Variant) -> None:
    from core.store import cache_key
    report = {k: val for k, val in v.report.items() if k not in ("module_sparsity", "module_bits")}
    variants_record(handle).put_json(cache_key("variant", v.scheme), "dashboard compress",
                                     {"scheme": v.scheme, "report": report, "perplexity": v.perplexity},
                                     seconds=report.get("seconds"))


def remembered_variants(handle: ModelHandle) -> dict[str, dict]:
    """``{scheme: {"scheme", "report", "perplexity"}}`` stored by :func:`remember_variant`."""
    rec = variants_record(handle)
    out = {}
    for key, e in rec.manifest["stages"].items():
        if e.get("stage") == "dashboard compress" and rec.has(key):
            d = rec.get_json(key)
            out[d["scheme"]] = d
    return out
