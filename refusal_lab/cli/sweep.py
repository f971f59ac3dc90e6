"""``python -m refusal_lab sweep``: models × schemes, each pair a task, in this process or on Ray."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from refusal_lab.cli import add_model_args
from refusal_lab.cli.args import aird_spec, count
from refusal_lab.cli.study import (_method_options, _print_rows, _repair_options, aird_setting, repair_kwargs,
                                   study_kwargs, study_options)

SUMMARY = ["model", "refusal_harmful", "broken_harmful", "over_refusal_harmless", "over_refusal_borderline",
           "perplexity", "zero_shot_accuracy", "kl_to_original", "source_layer", "aird_layers", "aird_alpha"]


def register(sub) -> None:
    p = sub.add_parser("sweep", help="study many models × schemes as tasks, sequentially or on a Ray cluster")
    add_model_args(p, many=True)
    study_options(p)
    p.add_argument("--scheme", action="append", required=True, help="compression scheme (repeatable)")
    p.add_argument("--aird", default=None, type=aird_spec, help="auto | top:K: repair each variant with AIRD")
    p.add_argument("--aird-mode", default="merged", choices=["merged", "adapter"])
    _repair_options(p)
    _method_options(p)
    p.add_argument("--budget", action="store_true", help="with --aird: each variant's AIRD budget curve too")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="auto|local|ADDRESS",
                   help="run the tasks on Ray: local (start Ray on this machine; the default of a bare --ray), "
                        "auto (the cluster this machine belongs to) or HOST:PORT / ray://HOST:PORT; "
                        "without --ray every task runs here, one after another, with the same results")
    p.add_argument("--cpus-per-task", type=count(1), default=None,
                   help="torch threads (and CPUs declared to Ray) per task; default min(4, this machine's CPUs)")
    p.add_argument("--gpus-per-task", type=count(1), default=1,
                   help="GPUs declared to Ray per task where the cluster has GPUs (a model spread over N GPUs "
                        "with --device-map auto: N)")
    p.add_argument("--name", default="", help="a name for the sweep's record (Report page)")
    p.set_defaults(func=run_sweep_command)


def _print_task(task) -> None:
    """One line per task status change: running / done / failed (with the error)."""
    if task.status == "done":
        what = ", ".join(task.computed) if task.computed else "everything from the store"
        line = f"[done]    {task.label} · {task.seconds:.1f} s · computed: {what}"
    elif task.status == "failed":
        line = f"[failed]  {task.label} · {task.error}"
    else:
        line = f"[{task.status}] {task.label}"
    print(line, file=sys.stderr, flush=True)


def sweep_spec(args: argparse.Namespace):
    """The :class:`~refusal_lab.sweep.SweepSpec` of the command line (``--method`` as ``study`` takes it:
    ``aird+distill`` starts from AIRD auto unless ``--aird`` says otherwise)."""
    from refusal_lab.study_repairs import method
    from refusal_lab.sweep import SweepSpec

    uses_aird = method(args.method).uses_aird
    aird = aird_setting(args)
    study = dict(study_kwargs(args), aird=aird, aird_mode=args.aird_mode, aird_realign=args.realign,
                 aird_search=args.calibration, **repair_kwargs(args))
    return SweepSpec(models=args.model or ["default"], schemes=args.scheme, study=study,
                     budget=bool(args.budget and aird and uses_aird), cpus_per_task=args.cpus_per_task,
                     name=args.name)


def run_sweep_command(args: argparse.Namespace) -> int:
    from refusal_lab.study import Study, summary_rows
    from refusal_lab.sweep import SequentialExecutor, run_sweep

    spec = sweep_spec(args)
    if args.ray is None:
        executor = SequentialExecutor()
    else:
        from refusal_lab.sweep_ray import RayExecutor

        executor = RayExecutor(args.ray, spec.threads, args.gpus_per_task)
    t0 = time.perf_counter()
    print(f"sweep {spec.id}: {len(spec.models)} model(s) × {len(spec.schemes)} scheme(s) = "
          f"{len(spec.tasks())} tasks on {executor.name}", file=sys.stderr)
    record = run_sweep(spec, args.runs, executor, on_task=_print_task)
    results = {}
    for model in spec.models:
        if all(t.status == "done" for t in record.tasks if t.model == model):
            results[model] = Study(spec.study_spec(model), args.runs).results()  # all stored: read, not computed
            _print_rows(summary_rows(results[model]), SUMMARY)
    failed = [t for t in record.tasks if t.status == "failed"]
    print(f"sweep {record.id}: {len(record.tasks) - len(failed)} task(s) done, {len(failed)} failed, "
          f"{time.perf_counter() - t0:.1f} s; studies: {', '.join(record.studies.values())}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"sweep": record.to_json(),
                                               "results": {m: r.to_json() for m, r in results.items()}}, indent=1))
    return 1 if failed else 0
