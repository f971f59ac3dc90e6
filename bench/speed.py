"""Interactive-speed benchmark: the code of a base commit against this tree, in one run, as ratios.

Each task runs in a fresh child process per side (so peak RSS is the task's own), first on the base
commit (a git worktree, made here if missing), then on this tree, on the same machine in the same
run. Tasks:

* ``gen``         — greedy replies (64 new tokens, float32) to the bundled test prompts (harmful,
  harmless, borderline: 183); tokens/s, and whether the replies are token-identical to the base's.
* ``search-last`` — direction search on ``default``: candidates on the bundled train splits, selection
  at the last post-instruction position only, on the val splits.
* ``search``      — the same at every post-instruction position (the study's default).
* ``aird``        — AIRD auto on wanda:0.5: re-alignment fit + calibration (timed), then the repaired
  model's refusal rates on the bundled test splits; chosen point and val objective compared. A new
  side that computes in bf16 also gives the same repaired model's rates from float32 replies (the
  base's precision), which separates the repair's difference from the replies' precision.
* ``search-screen`` / ``search-last-screen`` — the new side with ``screen=12`` (an approximation:
  :func:`core.selection.select_direction`), against the base's exact search (run once per run).

A task may end in ``@float32`` or ``@bfloat16``: the new side's compute precision (:mod:`core.precision`);
without it, the code's default (``auto``: bf16 autocast on CPUs with native bf16). The base side
always runs the start commit's default (float32).

Prints a table and writes ``bench/results/speed.json``:

    python bench/speed.py [--tasks gen,search-last,search] [--base-commit 530a573] [--base-dir DIR]
                          [--new-commit HEAD --new-dir DIR]

``--new-commit`` runs the new side from a worktree of that commit instead of this tree, so the tree
can change while a long run goes on.

The default base commit is the start of the interactive-speed issue. The child mode
(``--child TASK --root DIR --json FILE``) imports ``core`` from ``DIR``; it is how each side runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "speed.json"
BASE_COMMIT = "530a573"
TASKS = ("gen", "search-last", "search", "search-screen", "search-last-screen", "aird")
PRECISIONS = ("float32", "bfloat16")  # a task may end in @PRECISION: the new side's compute precision
PRECISION: str | None = None  # set in the child; None = the code's default (the base code has no setting)
BASE_TASK = {"search-screen": "search", "search-last-screen": "search-last"}  # base code has no screening
SCREEN = 12


# ----------------------------------------------------------------------------------------------
# Child side: one task on the code under --root
# ----------------------------------------------------------------------------------------------

def _load():
    import transformers

    transformers.logging.set_verbosity_error()
    from core.models import load_model

    t0 = time.perf_counter()
    handle = load_model("default", **({"precision": PRECISION} if PRECISION else {}))
    return handle, time.perf_counter() - t0


def task_gen() -> dict:
    from core.generation import generate
    from core.judges import is_refusal
    from core.prompts import bundled

    handle, load_s = _load()
    prompts = [p for kind in ("harmful", "harmless", "borderline") for p in bundled(kind, "test").prompts]
    generate(handle, prompts[:2], max_new_tokens=4)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    replies = generate(handle, prompts, max_new_tokens=64)
    seconds = time.perf_counter() - t0
    tokens = sum(len(handle.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    return {"seconds": seconds, "load_seconds": load_s, "n_prompts": len(prompts), "reply_tokens": tokens,
            "tokens_per_second": tokens / seconds, "replies": replies,
            "refused": [bool(is_refusal(r)) for r in replies]}


def _search(positions, screen: int | None = None) -> dict:
    from core.directions import generate_candidates, quality
    try:
        from core.selection import select_direction
    except ImportError:  # the start commit's layout (the old side of bench/speed.py)
        from core.directions import select_direction
    from core.prompts import bundled

    handle, load_s = _load()
    t0 = time.perf_counter()
    ds = generate_candidates(handle, bundled("harmful", "train").prompts, bundled("harmless", "train").prompts)
    t1 = time.perf_counter()
    kw = {"screen": screen} if screen else {}
    ds = select_direction(handle, ds, bundled("harmful", "val").prompts, bundled("harmless", "val").prompts,
                          positions=positions, **kw)
    t2 = time.perf_counter()
    q = quality(ds)
    sel = ds.metadata.get("selection", {})
    return {"seconds": t2 - t0, "candidates_seconds": t1 - t0, "selection_seconds": t2 - t1, "load_seconds": load_s,
            "selected": list(ds.selected), "bypass": q["bypass"], "induce": q["induce"], "kl": q["kl"],
            "kl_threshold_used": sel.get("kl_threshold_used"), "n_candidates": sel.get("n_candidates"),
            "n_checked": sel.get("n_checked"), "fallback": sel.get("fallback")}


AIRD_SCHEME, AIRD_SOURCE = "wanda:0.5", (-1, 17)  # the original's selected candidate on both sides (speed.json)


def task_aird() -> dict:
    """AIRD auto on wanda:0.5 as the study runs it: the re-alignment fit on the train splits, then the
    calibration on the val splits (timed together), then the repaired model's refusal rates on the
    bundled test splits (64 tokens, not timed). The direction is the original's selected candidate,
    extracted by each side's own code."""
    from core.aird import applied, bundled_fit_prompts, fit_realignment, mode_for
    from core.compression import apply as compress
    from core.directions import generate_candidates
    from core.generation import generate
    from core.judges import is_refusal
    from core.prompts import bundled

    try:
        from core.aird import calibrate  # the start commit's layout and the package's
    except ImportError:  # the commits in between
        from core.aird_calibration import calibrate
    handle, load_s = _load()
    ds = generate_candidates(handle, bundled("harmful", "train").prompts, bundled("harmless", "train").prompts)
    direction, layer = ds.candidate(*AIRD_SOURCE), AIRD_SOURCE[1]
    c, _ = compress(handle, AIRD_SCHEME)
    t0 = time.perf_counter()
    fit = fit_realignment(handle, c, direction, layer, bundled_fit_prompts())
    t1 = time.perf_counter()
    rep = calibrate(c, direction, layer, mode=mode_for(c, range(c.n_layers), "merged"), realignment=fit,
                    original=handle)
    t2 = time.perf_counter()
    # grid points: dicts in old commits, core.results.CalibrationPoint since
    points = [g if isinstance(g, dict) else g.to_json() for g in rep.calibration]
    best = next(g for g in points if g["chosen"])
    def test_rates(h) -> dict[str, float]:
        rates = {}
        for kind in ("harmful", "harmless", "borderline"):
            replies = generate(h, bundled(kind, "test").prompts, max_new_tokens=64)
            rates[kind] = sum(map(is_refusal, replies)) / len(replies)
        return rates

    extra = {}
    with applied(c, rep) as h:
        rates = test_rates(h)
        if getattr(h, "precision", "float32") != "float32":  # the same repair's replies in float32, as the base's
            from core.precision import running_at

            with running_at(h, "float32"):
                extra["test_refusal_float32_replies"] = test_rates(h)
    return {"seconds": t2 - t0, "fit_seconds": t1 - t0, "calibration_seconds": t2 - t1, "load_seconds": load_s,
            "chosen": {"layers": best["layers"], "alpha": best["alpha"], "realign": best["realign"]},
            "val_objective": best["harmful_refusal"] - best["harmless_refusal"],
            "val_harmful_refusal": best["harmful_refusal"], "val_harmless_refusal": best["harmless_refusal"],
            "grid_points": len(points),
            "generated_points": sum(g.get("measured", "generated") == "generated" for g in points),
            "test_refusal": rates, **extra, "grid": [_grid_row(g) for g in points]}


def _grid_row(g: dict) -> dict:
    """One calibration point, the fields both sides have (the base commit's points lack the scored ones)."""
    keys = ("layers", "alpha", "realign", "measured", "feasible", "chosen", "harmful_refusal", "harmless_refusal",
            "kl", "kl_original", "scored_harmful_refusal", "scored_harmless_refusal", "scored_feasible")
    return {k: g[k] for k in keys if k in g}


CHILD_TASKS = {"aird": task_aird, "gen": task_gen, "search-last": lambda: _search([-1]), "search": lambda: _search(None),
               "search-screen": lambda: _search(None, SCREEN), "search-last-screen": lambda: _search([-1], SCREEN)}


def child(task: str, root: str, out: str) -> None:
    global PRECISION
    sys.path.insert(0, root)
    os.chdir(root)
    task, _, PRECISION = task.partition("@")
    result = CHILD_TASKS[task]()
    result["precision"] = PRECISION or "code default"
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def ensure_worktree(commit: str, folder: Path) -> Path:
    """A git worktree of ``commit`` at ``folder`` (created when missing; must be at that commit)."""
    if not folder.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit], check=True,
                       capture_output=True)
    head, want = _rev("HEAD", folder), _rev(commit)
    if head != want:
        raise SystemExit(f"{folder} is at {head[:10]}, not {commit}: remove it or pass another --base-dir")
    return folder


def run_side(task: str, root: Path) -> dict:
    out = Path(f"/tmp/refusal-lab-speed-{os.getpid()}-{task}.json")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", task, "--root", str(root),
                           "--json", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{task} on {root} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def compare(task: str, old: dict, new: dict) -> dict:
    row = {"task": task, "base_seconds": old["seconds"], "new_seconds": new["seconds"],
           "speedup": old["seconds"] / new["seconds"], "base_peak_rss_mb": old["peak_rss_mb"],
           "new_peak_rss_mb": new["peak_rss_mb"]}
    if task.startswith("gen"):
        same = [a == b for a, b in zip(old["replies"], new["replies"])]
        agree = [a == b for a, b in zip(old["refused"], new["refused"])]
        row.update(base_tokens_per_second=old["tokens_per_second"], new_tokens_per_second=new["tokens_per_second"],
                   tokens_per_second_ratio=new["tokens_per_second"] / old["tokens_per_second"],
                   identical_replies=f"{sum(same)}/{len(same)}", verdict_agreement=sum(agree) / len(agree))
    elif task.startswith("aird"):
        row.update({f"{side}_{k}": d[k] for side, d in (("base", old), ("new", new))
                    for k in ("chosen", "val_objective", "fit_seconds", "calibration_seconds", "generated_points",
                              "test_refusal")})
        row["same_chosen_point"] = old["chosen"] == new["chosen"]
        row["val_objective_difference"] = new["val_objective"] - old["val_objective"]
        for key in ("test_refusal", "test_refusal_float32_replies"):
            if key in new:
                row[f"{key}_difference_points"] = {k: round(100 * (new[key][k] - old["test_refusal"][k]), 1)
                                                   for k in old["test_refusal"]}
    else:
        row.update({f"{side}_{k}": d[k] for side, d in (("base", old), ("new", new))
                    for k in ("selected", "bypass", "induce", "kl", "kl_threshold_used", "candidates_seconds",
                              "selection_seconds", "n_checked")})
        row["same_selection"] = old["selected"] == new["selected"]
        row.update({f"{k}_relative_difference": abs(new[k] - old[k]) / max(abs(old[k]), 1e-12)
                    for k in ("bypass", "induce", "kl")})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--base-commit", default=BASE_COMMIT)
    ap.add_argument("--base-dir", default=None, help="worktree of the base commit (default: ../speed-base-COMMIT)")
    ap.add_argument("--new-commit", default=None, help="run the new side from a worktree of this commit")
    ap.add_argument("--new-dir", default=None, help="that worktree (default: ../speed-new-COMMIT)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.root, args.json)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t.partition("@")[0] not in TASKS or t.partition("@")[2] not in ("", *PRECISIONS)]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {TASKS}")
    base = ensure_worktree(args.base_commit, Path(args.base_dir or ROOT.parent / f"speed-base-{args.base_commit}"))
    new_root = ROOT
    if args.new_commit:
        sha = _rev(args.new_commit)
        new_root = ensure_worktree(sha, Path(args.new_dir or ROOT.parent / f"speed-new-{sha[:10]}"))
    commit = _rev("HEAD", new_root)[:10] + ("" if args.new_commit or not _dirty() else "+dirty")
    rows, raw, base_runs = [], {}, {}
    for task in tasks:
        name = task.partition("@")[0]
        base_task = BASE_TASK.get(name, name)
        try:
            if base_task not in base_runs:
                base_runs[base_task] = run_side(base_task, base)
            old = base_runs[base_task]
            new = run_side(task, new_root)
        except SystemExit as e:  # one failed task never loses the others' measurements
            print(e, file=sys.stderr, flush=True)
            continue
        raw[task] = {"base": old, "new": new}
        rows.append(compare(task, old, new))
        r = rows[-1]
        print(f"{task:12s} base {r['base_seconds']:8.1f} s  new {r['new_seconds']:8.1f} s  "
              f"speed-up {r['speedup']:5.2f}×  peak RSS {r['new_peak_rss_mb']:.0f} MB", flush=True)
    print()
    for r in rows:
        print(json.dumps({k: v for k, v in r.items()}, default=str))
    sys.path.insert(0, str(ROOT))
    from bench.common import write_results

    for side in raw.values():
        for d in side.values():
            d.pop("replies", None)
    write_results(args.out, {"command": "python bench/speed.py --tasks " + ",".join(tasks),
                             "base_commit": args.base_commit, "new_commit": commit,
                             "rows": rows, "raw": raw})


def _rev(commit: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(root), "rev-parse", commit], check=True, capture_output=True,
                          text=True).stdout.strip()


def _dirty() -> bool:
    return bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
