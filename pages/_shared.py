"""UI glue shared by the dashboard pages: the session's choices (``st.session_state``), the shared
model cache, progress bars with cancel, error boxes. No science and no computed state here — every
computation is a call into ``refusal_lab/``, and what sessions share lives in :mod:`refusal_lab.session`.

Sharing model: the loaded model and what is computed from it (compressed variants, studies, the
refusal direction) live in a :class:`refusal_lab.session.Workspace` held by :func:`workspace`, a
``st.cache_resource`` object shared by every session of the server, so a page reload or a second
browser tab reuses them. Interventions hold ``handle.lock`` (refusal_lab), so sessions never run under each
other's steering; a study reports progress per call (:meth:`refusal_lab.study.Study.observed`).
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import streamlit as st

from refusal_lab import session
from refusal_lab.errors import error_line
from refusal_lab.models import ChatTemplateError, ModelHandle, ModelLoadError, load_model
from refusal_lab.progress import Cancelled, Eta, format_seconds
from refusal_lab.session import DEFAULT_SETTINGS, POSITIONS, ROLES, SCREEN, Workspace, workspace_key

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
    cause = exc if isinstance(exc, str) else error_line(exc)
    msg = f"**{what}.** {cause}"
    if fix:
        msg += f"\n\n**Fix:** {fix}"
    st.error(msg, icon=":material/error:")


def fix_for(exc: BaseException) -> str:
    """A generic fix hint for an exception raised by ``refusal_lab``."""
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

    :class:`~refusal_lab.progress.Cancelled` shows an info box instead. Streamlit's own control-flow
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


def show_table(df, *, decimals: dict[str, int] | None = None, default_decimals: int = 3, where=None,
               column_config: dict | None = None, **kw) -> None:
    """``st.dataframe`` of ``df`` for reading: a missing value shows as "—" (not "None"), float columns
    rounded to ``decimals[column]`` (else ``default_decimals``) places by their column format (not a
    pandas Styler: ~20 ms more per table); the data itself stays numeric."""
    import pandas as pd

    config = {c: st.column_config.NumberColumn(format=f"%.{(decimals or {}).get(c, default_decimals)}f")
              for c in df.columns if pd.api.types.is_float_dtype(df[c])}
    for c, extra in (column_config or {}).items():
        config[c] = extra
    (where or st).dataframe(df, placeholder="—", column_config=config, **kw)


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


class _Throttle:
    """At most one progress-bar update per ``interval`` seconds, besides every stage's first and last
    step: each update is a message to the browser, and a fast loop's hundreds per second cost the
    computation CPU time (the server and the browser share the machine's cores)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.last, self.stage = interval, float("-inf"), None

    def due(self, stage: str, done: int, total: int) -> bool:
        now = time.monotonic()
        if stage != self.stage or done >= total or now - self.last >= self.interval:
            self.stage, self.last = stage, now
            return True
        return False


def progress_callback(stage: str, *, cancel_key: str | None = None, container=None):
    """A library progress callback ``(done, total)`` that drives an ``st.progress`` bar labelled with
    ``stage``; raises :class:`Cancelled` once Cancel (``cancel_key``) is clicked after it was made."""
    where = container if container is not None else st
    bar = where.progress(0.0, text=f"{stage} …")
    cancelled = cancel_check(cancel_key)

    shown = _Throttle()

    def callback(done: int, total: int) -> None:
        if cancelled():
            raise Cancelled(stage)
        if shown.due(stage, done, total):
            frac = 0.0 if total <= 0 else min(1.0, done / total)
            bar.progress(frac, text=f"{stage} · {done}/{total}")

    callback.bar = bar  # type: ignore[attr-defined]
    return callback


# ----------------------------------------------------------------------------------------------
# The shared model and workspace
# ----------------------------------------------------------------------------------------------

def default_cfg() -> dict:
    return {"spec": DEFAULT_SPEC, "device": "auto", "dtype": "auto", "precision": "auto", "trust_remote_code": False,
            "chat_template": None, "device_map": None, "max_memory": None}


def model_cfg() -> dict:
    """The model configuration chosen in this session (the default model unless changed)."""
    cfg = st.session_state.get(MODEL_CFG)
    if not isinstance(cfg, dict):
        cfg = default_cfg()
        st.session_state[MODEL_CFG] = cfg
    return cfg


@st.cache_resource(show_spinner=False, max_entries=2)
def _load(spec: str, device: str, dtype: str, trust_remote_code: bool, chat_template: str | None,
          precision: str = "auto", device_map: str | None = None, max_memory: str | None = None) -> ModelHandle:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            chat_template=chat_template or None, precision=precision, device_map=device_map or None,
                            max_memory=max_memory or None)
    handle.meta.setdefault("warnings", [])
    handle.meta["warnings"] += sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)
                                       and "adapter" in str(w.message)})
    return handle


@st.cache_resource(show_spinner=False, max_entries=2)
def workspace(fingerprint: str) -> Workspace:
    return Workspace(fingerprint)


def load_handle(cfg: dict | None = None) -> ModelHandle:
    """Load (or reuse) the model of ``cfg``; raises ``ModelLoadError`` & co."""
    cfg = cfg or model_cfg()
    return _load(cfg["spec"], cfg["device"], cfg["dtype"], bool(cfg["trust_remote_code"]),
                 cfg.get("chat_template"), cfg.get("precision", "auto"), cfg.get("device_map"), cfg.get("max_memory"))


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
    return workspace(workspace_key(handle))


def model_badge(handle: ModelHandle) -> None:
    """A one-line caption saying which model the page works on."""
    st.caption(f"Model: **{handle.name}** · {handle.n_layers} layers × {handle.d_model} · "
               f"fingerprint `{handle.fingerprint}` — change it on the Model page.")


# ----------------------------------------------------------------------------------------------
# Prompt sets chosen on the Prompts page
# ----------------------------------------------------------------------------------------------

PROMPTS = "prompt_choice"


def prompt_choice() -> dict:
    """``{role: {"source": "bundled"} | {"source": "file", "path": str, "name": str}}`` for this session."""
    choice = st.session_state.get(PROMPTS)
    if not isinstance(choice, dict):
        choice = {role: {"source": "bundled"} for role in ROLES}
        st.session_state[PROMPTS] = choice
    return choice


def prompt_set(role: str, split: str | None = None):
    """The session's prompt set for ``role``, optionally one split (:func:`refusal_lab.session.prompt_set`)."""
    return session.prompt_set(prompt_choice(), role, split)


# ----------------------------------------------------------------------------------------------
# The study pipeline (Drift, AIRD pages)
# ----------------------------------------------------------------------------------------------

SETTINGS = "study_settings"


def study_settings() -> dict:
    """Evaluation settings of this session (prompts per set, new tokens per reply, direction search)."""
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
    tokens = c2.select_slider("New tokens per reply", [16, 32, 48, 64, 96, 128, 192, 256],
                              int(cur["max_new_tokens"]),
                              help="greedy replies; short ones can hide a refusal that comes later, or a loop")
    judge = judge_widgets(where, cur.get("judge", "substring"))
    current = cur.get("positions", "screened")
    positions = where.radio("Direction search", list(POSITIONS), format_func=POSITIONS.get,
                            index=list(POSITIONS).index(current if current in POSITIONS else "screened"),
                            help=f"screened: every candidate's induce score is first measured on {SCREEN} val "
                                 "prompts and only those that may induce refusal are scored on all of them "
                                 "(BENCHMARKS.md compares it with the exact search); exact: every candidate on "
                                 "every val prompt")
    if positions == "all":
        handle = require_handle()
        where.caption(f"Exact search: {current_workspace(handle).search_estimate(handle)} per model "
                      "(more if no candidate passes the filters).")
    variant_selection = where.checkbox(
        "Also select each variant's own direction", value=bool(cur.get("variant_selection", False)),
        help="shows where the variant's refusal direction comes from (its source layer) and its scores; one "
             "more direction search per variant. Off, the drift compares the variant's candidates with the "
             "original's direction at the original's source.")
    cur.update(limit=limit, max_new_tokens=tokens, positions=positions, variant_selection=variant_selection,
               judge=judge)
    return cur


JUDGE_HELP = {"substring": "substring (refusal phrases in the reply)",
              "score": "score (refusal log-odds at the first reply token)"}
MODEL_JUDGE = "a model (classifier or LLM)"


def judge_widgets(where, saved: str) -> str:
    """The judge of the evaluation settings: substring, score, or a model judge given by its spec
    (``classifier:…`` / ``llm:…``, loaded when the evaluation runs); a malformed spec keeps ``saved``."""
    options = [*JUDGE_HELP, "model"]
    kind = saved if saved in JUDGE_HELP else "model"
    pick = where.radio("Judge", options, index=options.index(kind), horizontal=True,
                       format_func={**JUDGE_HELP, "model": MODEL_JUDGE}.get,
                       help="how each reply is judged refused, complied or broken (empty, looping or no "
                            "language: neither)")
    if pick != "model":
        return pick
    spec = where.text_input("Judge model", value=saved if kind == "model" else "", key="judge_model",
                            placeholder="classifier:HUB_ID_OR_FOLDER[@LABEL] or llm:MODEL",
                            help="a sequence classifier of refusals, or a chat model asked with a fixed rubric")
    name, _, arg = spec.strip().partition(":")
    if name in ("classifier", "llm") and arg:
        return spec.strip()
    if spec.strip():
        show_error("Not a judge model", f"{spec!r} is neither classifier:… nor llm:…",
                   "write classifier:HUB_ID_OR_FOLDER[@LABEL] or llm:MODEL; the previous judge stays in use.")
    return saved


def replies_audit(evaluations: dict, key: str) -> None:
    """The replies behind the rates above: ``evaluations`` by model label
    (:class:`refusal_lab.results.Evaluation`), filtered by outcome; compared with another judge, the
    replies where the two disagree. Its content runs only while the expander is open."""
    import pandas as pd

    from refusal_lab.judge_audit import rejudge, reply_rows
    from refusal_lab.judges import OUTCOMES

    box = st.expander("Replies behind these rates", key=f"{key}_open", on_change="rerun")
    if not box.open:  # rendered only when opened: a page switch does not send every reply to the browser
        return
    with box:
        c1, c2, c3, c4 = st.columns(4)
        model = c1.selectbox("Model", list(evaluations), key=f"{key}_model")
        ev = evaluations[model]
        set_name = c2.selectbox("Set", list(ev.sets), key=f"{key}_set")
        shown = c3.multiselect("Outcome", [*OUTCOMES, "unjudged"], default=[*OUTCOMES, "unjudged"],
                               key=f"{key}_outcomes")
        judged = ev.sets[set_name].judge or "substring"
        others = [j for j in JUDGE_HELP if j != judged]
        other = c4.selectbox("Compare with judge", ["—", *others], key=f"{key}_other",
                             help="only the replies where the two judges disagree")
        replies = ev.sets[set_name].results
        compare = None if other == "—" else (f"{other} judge", rejudge(replies, other))
        rows = [r for r in reply_rows(replies, other=compare) if r["outcome"] in shown
                and (compare is None or r[compare[0]] != r["outcome"])]
        columns = ["outcome", *([compare[0]] if compare else []), "prompt", "reply", "refusal score"]
        st.dataframe(pd.DataFrame(rows, columns=columns), hide_index=True, width="stretch", placeholder="—",
                     column_config={"refusal score": st.column_config.NumberColumn(format="%.2f")})
        st.caption(f"{len(rows)} of {len(replies)} replies, judged by the {judged} judge"
                   + (f"; shown where the {other} judge disagrees" if compare else "") + ".")


def get_study(handle: ModelHandle):
    """The shared :class:`refusal_lab.study.Study` of this session's settings, with the workspace's variants."""
    spec = session.study_spec(handle, model_cfg(), study_settings(), prompt_choice())
    return current_workspace(handle).study(spec, handle)


def run_study(handle: ModelHandle | None, study, fn, *, what: str, cancel_key: str | None = None,
              planned: list[str] | None = None):
    """Run ``fn(study)`` with one progress bar labelled with the current stage and its time left (and,
    given the ``planned`` stages, the time left in all: :mod:`refusal_lab.study_eta`); errors become error
    boxes. Returns ``(ok, value)``. One computation per workspace at a time (others wait)."""
    from refusal_lab.study_eta import for_study

    ws = workspace(workspace_key(handle) if handle is not None else "-")
    bar = st.progress(0.0, text=f"{what} …")
    cancelled = cancel_check(cancel_key)
    eta = Eta()
    whole = None
    shown = _Throttle()

    def on_progress(stage: str, done: int, total: int) -> None:
        if cancelled():
            raise Cancelled(stage)
        here = eta.update(stage, done, total)
        if not shown.due(stage, done, total):
            return
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
            with study.observed(on_progress, whole.on_stage if whole is not None else None):
                return fn(study)

    ok, value = guarded(what, call)
    bar.empty()
    return ok, value


def study_direction(handle: ModelHandle, study, *, compute: bool = False, cancel_key: str | None = None):
    """The original model's selected refusal direction from the study (the one the Drift, AIRD and
    Steer pages use): from memory, else loaded from the run store when stored, else computed when
    ``compute``. Returns a :class:`refusal_lab.directions.DirectionSet` or None."""
    ws = current_workspace(handle)
    ds = ws.direction(study)
    if ds is not None:
        return ds
    if not compute and session.original_source_layer(study) is None:
        return None
    ok, ds = run_study(handle, study, lambda s: s.directions("original"), cancel_key=cancel_key,
                       what="Refusal direction of the original" if compute else "Loading the stored refusal direction")
    if not ok:
        return None
    ws.keep_direction(study, ds)
    return ds
