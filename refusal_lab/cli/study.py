"""``python -m refusal_lab study`` (the whole pipeline) and ``python -m refusal_lab aird`` (repair one variant)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from refusal_lab.cli.args import aird_spec, alpha, count, distill_setting, judge_spec, layer_list, repair_method
from refusal_lab.cli import add_model_args
from refusal_lab.codec import to_json
from refusal_lab.tables import text_table


def _common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    study_options(p)


def study_options(p: argparse.ArgumentParser) -> None:
    """The evaluation and search options of a study (``study``, ``aird``, ``sweep``), besides the model's."""
    p.add_argument("--harmful", default="bundled:harmful:test", help="harmful evaluation prompts (file or bundled:…)")
    p.add_argument("--harmless", default="bundled:harmless:test", help="harmless evaluation prompts")
    p.add_argument("--borderline", default="bundled:borderline:test", help="borderline-but-safe prompts ('' to skip)")
    p.add_argument("--judge", default="substring", type=judge_spec,
                   help="how replies are judged: substring (default) | score | classifier:HUB_ID_OR_FOLDER[@LABEL] | llm:MODEL")
    p.add_argument("--column", default=None, help="the text column of CSV/JSON prompt files (default: detected)")
    p.add_argument("--limit", type=count(1), default=None, help="first N prompts of each evaluation set")
    p.add_argument("--max-new-tokens", type=count(1), default=64)
    p.add_argument("--runs", default="runs", help="run-store directory")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--screen", type=count(0), default=12, metavar="K",
                   help="direction search: screen induce on K val prompts, search the survivors exactly "
                        "(default 12; measured against the exact search in BENCHMARKS.md); 0 = exact search")


def _repair_options(p: argparse.ArgumentParser, auto_note: str = "") -> None:
    """The AIRD options ``study`` and ``aird`` share: how the calibration grid is measured, the re-alignment."""
    p.add_argument("--calibration", default="scored", choices=["scored", "generated"],
                   help="how AIRD's calibration grid is measured: scored = one forward per point, the best "
                        "points generated (fast); generated = every point generated (the reference)")
    p.add_argument("--realign", default="auto", choices=["auto", "on", "off"],
                   help=f"AIRD's fitted re-alignment of layer l*−1: auto (calibration decides{auto_note}), on, off")


def _method_options(p: argparse.ArgumentParser) -> None:
    """The repair method and distill settings ``study`` and ``aird`` take (:mod:`refusal_lab.study_repairs`)."""
    p.add_argument("--method", default="aird", type=repair_method,
                   help="the repair: aird (training-free edit, the paper's idea) | distill (a LoRA trained with the "
                        "original as teacher) | aird+distill (AIRD, then distill from the AIRD-repaired model)")
    p.add_argument("--distill", action="append", default=None, type=distill_setting, metavar="KEY=VALUE",
                   help="a distill setting over its default (repeatable), e.g. steps=20, rank=8, mode=merged, "
                        "per_kind=50; the names: refusal_lab.distill.DistillConfig")


def register(sub) -> None:
    p = sub.add_parser("study", help="directions, compression, drift, evaluation, AIRD and a report, cached")
    _common(p)
    p.add_argument("--scheme", action="append", required=True, help="compression scheme (repeatable)")
    p.add_argument("--aird", default=None, type=aird_spec, help="auto | top:K (repair K layers ending at the source layer)")
    p.add_argument("--aird-mode", default="merged", choices=["merged", "adapter"])
    _repair_options(p)
    _method_options(p)
    p.add_argument("--out", default=None, help="write the HTML report here")
    p.set_defaults(func=run_study)

    a = sub.add_parser("aird", help="repair a compressed variant with AIRD and compare before/after")
    _common(a)
    a.add_argument("--scheme", required=True)
    a.add_argument("--layers", default=None, type=layer_list, help="auto | comma-separated layer indices")
    a.add_argument("--alpha", default=None, type=alpha, help="auto | a number")
    a.add_argument("--mode", default="merged", choices=["merged", "adapter"])
    _repair_options(a, "; off with a given α and layers")
    _method_options(a)
    a.add_argument("--methods", default="all", help="all | comma-separated subset of the comparison methods")
    a.add_argument("--no-budget", action="store_true", help="skip the budget curve")
    a.add_argument("--save", default=None, help="save the repair (adapter: r̂ + α + layers) to this folder")
    a.set_defaults(func=run_aird)


def _progress_bars():
    from refusal_lab.progress import tqdm_progress

    bars: dict = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm_progress(stage)
        bars[stage](done, total)

    return on_progress


def _announce_stages(study, planned: list[str]) -> None:
    """Print a line as each planned stage starts: its number, the time so far and the time left in all."""
    from tqdm.auto import tqdm

    from refusal_lab.progress import format_seconds
    from refusal_lab.study_eta import for_study

    eta = for_study(study, planned)
    t0 = time.perf_counter()

    def on_stage(stage: str, seconds: float | None) -> None:
        eta.on_stage(stage, seconds)
        if seconds is None and stage in planned:
            left = eta.describe()
            tqdm.write(f"[{sum(p in eta.done for p in planned) + 1}/{len(planned)}] {stage} · "
                       f"{format_seconds(time.perf_counter() - t0).lstrip('~')} so far"
                       + (f" · {left}" if left else ""), file=sys.stderr)

    study.on_stage = on_stage


def study_kwargs(args: argparse.Namespace) -> dict:
    """The :class:`~refusal_lab.study.StudySpec` fields the options of :func:`study_options` and the model
    options set, besides ``model`` and ``schemes``."""
    return dict(harmful=args.harmful, harmless=args.harmless, borderline=args.borderline or None,
                column=args.column, judge=args.judge, limit=args.limit, max_new_tokens=args.max_new_tokens,
                device=args.device, dtype=args.dtype, precision=args.precision,
                device_map=args.device_map, max_memory=args.max_memory, selection_screen=args.screen or None)


def _spec(args, schemes, **kw):
    from refusal_lab.study import StudySpec

    return StudySpec(model=args.model, schemes=schemes, **study_kwargs(args), **kw)


def aird_setting(args: argparse.Namespace) -> str | None:
    """``--aird``, or ``auto`` when the method starts with AIRD (``aird+distill``) and none was given."""
    from refusal_lab.study_repairs import method

    return args.aird or ("auto" if method(args.method).uses_aird and args.method != "aird" else None)


def repair_kwargs(args: argparse.Namespace) -> dict:
    """The spec's repair method and distill settings (``--method``, ``--distill``); empty for AIRD without
    distill settings, so its specs — and study folders — stay those of before the option existed."""
    out = {} if args.method == "aird" else {"repair_method": args.method}
    if args.distill:
        out["distill"] = dict(args.distill)
    return out


def _print_rows(rows: list[dict], cols: list[str]) -> None:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    print(text_table(cols, [[cell(r.get(c)) for c in cols] for r in rows]))


def run_study(args: argparse.Namespace) -> int:
    from refusal_lab.report import write_report
    from refusal_lab.study import Study, summary_rows

    from refusal_lab.study_repairs import method

    t0 = time.perf_counter()
    uses_aird = method(args.method).uses_aird
    aird = aird_setting(args)
    study = Study(_spec(args, args.scheme, aird=aird, aird_mode=args.aird_mode,
                        aird_realign=args.realign, aird_search=args.calibration, **repair_kwargs(args)), args.runs,
                  on_progress=_progress_bars())
    budget = bool(aird) and uses_aird
    _announce_stages(study, study.planned_stages(budget=budget))
    results = study.run(budget=budget)
    if budget:
        results.budget = {s: study.budget(s) for s in args.scheme}  # stored by the run
    rows = summary_rows(results)
    costs = [] if args.method == "aird" else ["distill_rank", "parameters_changed", "density_after", "seconds"]
    _print_rows(rows, ["model", "refusal_harmful", "asr", "broken_harmful", "over_refusal_harmless", "broken_harmless",
                       "over_refusal_borderline", "perplexity", "zero_shot_accuracy", "kl_to_original", "kl_multi_token",
                       "cosine_to_original", "source_layer", "aird_layers", "aird_alpha",
                       "aird_realign_layer"] + costs)
    for s, v in results.variants.items():
        print(f"{s}: predicted from projections: {v.drift.recoverability.verdict}")
        if v.aird_verdict is not None:
            print(f"{s}: measured: {v.aird_verdict.verdict}")
    if args.out:
        print(f"report: {write_report(results, args.out)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results.to_json(), indent=1))
    stage_times = {k: round(v, 1) for k, v in study.timings.items()}
    print(f"study {study.record.id}: {time.perf_counter() - t0:.1f}s; computed stages: {stage_times or '{}'}")
    return 0


def run_aird(args: argparse.Namespace) -> int:
    from refusal_lab.aird import METHODS
    from refusal_lab.study import Study
    from refusal_lab.study_repairs import method

    layers, alpha = args.layers, args.alpha  # parsed: None = auto
    repair = method(args.method)
    methods = METHODS if args.methods == "all" else tuple(m.strip() for m in args.methods.split(","))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {list(METHODS)}")
    if not repair.uses_aird and args.methods != "all":
        raise ValueError(f"--methods compares AIRD with other repairs: use it with --method aird or aird+distill, "
                         f"not {args.method}")
    study = Study(_spec(args, [args.scheme], aird="auto", aird_mode=args.mode, aird_alpha=alpha, aird_layers=layers,
                        aird_realign=args.realign, aird_search=args.calibration, **repair_kwargs(args)),
                  args.runs, on_progress=_progress_bars())
    budget = repair.uses_aird and not args.no_budget
    planned = [p for p in study.planned_stages([args.scheme], aird=True, budget=budget)
               if p != f"evaluate {args.scheme}+aird"]
    if repair.uses_aird:
        planned += [f"method {args.scheme}: {m}" for m in methods]
    _announce_stages(study, planned)
    d_o = study.directions("original")
    drift = study.drift(args.scheme)
    original = study.evaluate("original")
    print(f"original source: layer {d_o.selected[1]}, position {d_o.selected[0]}; "
          + (f"{args.scheme} source: layer {drift.variant.source.layer}; cosine of selected directions "
             f"{drift.cosine_selected:.3f}" if drift.cosine_selected is not None else
             f"cosine to {args.scheme}'s candidate at that source {drift.cosine_at_source:.3f}"))
    result = {"scheme": args.scheme, "drift": drift, "original": original}
    rows, verdict_of, unrepaired = _AIRD_PARTS[repair.uses_aird](study, args, methods, result)
    if repair.uses_distill:
        rows.append(_distill_part(study, args, result))
        verdict_of, unrepaired = result["repaired"], unrepaired or study.evaluate(args.scheme)
    costs = [] if args.method == "aird" else ["seconds"]
    _print_rows(rows, ["method", "refusal_harmful", "broken_harmful", "over_refusal_harmless", "broken_harmless",
                       "over_refusal_borderline", "perplexity",
                       "kl_to_original", "parameters_changed", "density_before", "density_after"] + costs + ["error"])
    print(f"diagnostic (predicted from projections): {drift.recoverability.verdict}")
    if verdict_of is not None:
        result["aird_verdict"] = _verdict(study, args, original, unrepaired, verdict_of, drift)
        print(f"diagnostic (measured): {result['aird_verdict'].verdict}")
    if budget:
        result["budget"] = study.budget(args.scheme)
        print("budget curve: " + ", ".join(f"{r.n_layers} layer(s) → {100 * r.refusal:.0f}% "
                                           f"({r.densified_weights:,} weights densified)" for r in result["budget"]))
    if args.save:
        print(f"repair saved to {_save(study, args)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(to_json(result), indent=1))
    return 0


def _aird_part(study, args, methods: tuple[str, ...], result: dict):
    """AIRD and the repairs it is compared against (``--methods``) → (rows, the evaluation the verdict is
    on: AIRD in its mode, when it was run next to no repair; the unrepaired variant's, when run)."""
    from refusal_lab.aird import METHOD_LABELS
    from refusal_lab.study import method_row

    rep = study.repair(args.scheme)
    comparison = study.compare_methods(args.scheme, methods)
    fit = ("" if rep.realign is None else
           f", re-alignment of layer {rep.realign_layer}'s MLP output (fitted on the train splits)")
    print(f"AIRD repair: layers {rep.layers}, α = {rep.alpha:g}, mode {rep.mode}{fit} "
          f"({'calibrated on val splits' if rep.auto else 'as given'})")
    rows = [method_row("original (uncompressed)", result["original"])]
    for m, ev in comparison.items():
        row = method_row(METHOD_LABELS[m], ev)
        if args.method != "aird" and m.startswith("aird-"):
            from refusal_lab.study_repairs import aird_seconds

            row["seconds"] = aird_seconds(study, args.scheme)
        rows.append(row)
    result.update(repair=rep.summary(), methods=comparison)
    repaired = comparison.get(f"aird-{rep.mode}")
    ok = repaired is not None and repaired.error is None and "none" in comparison
    return rows, repaired if ok else None, comparison.get("none")


def _plain_part(study, args, methods: tuple[str, ...], result: dict):
    """Without AIRD: the original and the unrepaired variant → (rows, None, the variant's evaluation)."""
    from refusal_lab.study import method_row

    unrepaired = study.evaluate(args.scheme)
    return [method_row("original (uncompressed)", result["original"]), method_row("No repair", unrepaired)], \
        None, unrepaired


_AIRD_PARTS = {True: _aird_part, False: _plain_part}  # by whether the method starts with AIRD


def _distill_part(study, args, result: dict) -> dict:
    """The distill repair (``--method distill`` or ``aird+distill``): trained or loaded, evaluated → its row."""
    from refusal_lab.study_repairs import distilled, method_label
    from refusal_lab.study_rows import repaired_row

    ev = study.evaluate_method(args.scheme, args.method)
    d = distilled(study, args.scheme, args.method).result
    print(f"distill repair ({method_label(args.method)}): {d.config.modules} linears of blocks "
          f"{d.layers[0]}–{d.layers[-1]}, LoRA rank {d.config.rank}, {d.config.steps} steps, mode {d.config.mode}; "
          f"KL to the original per reply token {d.losses[0]:.4f} → {d.losses[-1]:.4f} nats")
    result.update(method=args.method, distill=d, repaired=ev)
    row = repaired_row(method_label(args.method), ev)
    row["method"] = row.pop("model")
    return row


def _verdict(study, args, original, unrepaired, repaired, drift):
    from refusal_lab.study import measured_verdict
    from refusal_lab.study_repairs import method_label

    return measured_verdict(original, unrepaired, repaired, drift,
                            study.eval_sets()["harmful"].name, method=method_label(args.method))


def _save(study, args) -> Path:
    """``--save``: the AIRD repair (r̂ + α + layers) and/or the distill adapter, into one folder."""
    from refusal_lab.study_repairs import distilled, method

    m = method(args.method)
    folder = Path(args.save)
    if m.uses_aird:
        study.repair(args.scheme).save(folder)
    if m.uses_distill:
        distilled(study, args.scheme, args.method).save(folder)
    return folder
