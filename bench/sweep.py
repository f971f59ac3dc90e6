"""A sweep's overhead on this machine: Ray's own costs (start-up, a task's round trip, a parcel's transfer,
shut-down), then the same work three ways in one run — ``study`` (one process, the reference), ``sweep``
without Ray, ``sweep --ray local`` — each on an empty run store, the Ray sweep once more on its full store
(served from the store), and whether the three stores hold the same results, stage for stage.

    .venv/bin/python bench/sweep.py [--model default] [--scheme rtn:8 --scheme rtn:4:64] [--limit 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, also when another one is installed

from bench.common import write_results  # noqa: E402
from refusal_lab.tables import text_table  # noqa: E402


def ray_costs(n_tasks: int = 20, parcel_mib: int = 8) -> dict:
    """Seconds: ``init`` (a local instance), ``first_task`` (a worker started), ``per_task`` (mean of
    ``n_tasks`` no-op round trips on warm workers), ``parcel`` (put + get of ``parcel_mib`` MiB), ``shutdown``."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = {"init": time.perf_counter() - t}

    @ray.remote(num_cpus=1)
    def echo(x):
        return len(x)

    t = time.perf_counter()
    ray.get(echo.remote(b""))
    out["first_task"] = time.perf_counter() - t
    t = time.perf_counter()
    ray.get([echo.remote(b"") for _ in range(n_tasks)])
    out["per_task"] = (time.perf_counter() - t) / n_tasks
    blob = os.urandom(parcel_mib * 2**20)
    t = time.perf_counter()
    assert ray.get(echo.remote(ray.put(blob))) == len(blob)
    out["parcel"] = time.perf_counter() - t
    t = time.perf_counter()
    ray.shutdown()
    out["shutdown"] = time.perf_counter() - t
    return out


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "refusal_lab", *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> int:
    from refusal_lab.store import RunStore
    from refusal_lab.store_transfer import differences
    from refusal_lab.sweep import list_sweeps

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--scheme", action="append", default=None)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep.json"))
    args = ap.parse_args()
    schemes = args.scheme or ["rtn:8", "rtn:4:64"]
    common = ["--model", args.model, "--limit", str(args.limit)] + [a for s in schemes for a in ("--scheme", s)]
    ray = ray_costs()
    print(text_table(["Ray (local, this machine)", "seconds"], [[k, f"{v:.3f}"] for k, v in ray.items()]))
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        stores = {k: Path(tmp) / k for k in ("study", "sweep", "ray")}
        seconds = {
            "study": timed(["study", *common, "--runs", str(stores["study"])]),
            "sweep": timed(["sweep", *common, "--runs", str(stores["sweep"])]),
            "sweep --ray local": timed(["sweep", *common, "--runs", str(stores["ray"]), "--ray", "local"]),
            "sweep --ray local, rerun": timed(["sweep", *common, "--runs", str(stores["ray"]), "--ray", "local"]),
        }
        sid = list_sweeps(stores["ray"])[0].studies[args.model]
        diffs = {k: differences(RunStore(stores["study"]).open(sid), RunStore(stores[k]).open(sid))
                 for k in ("sweep", "ray")}
    base = seconds["study"]
    print(text_table(["run (empty store unless rerun)", "seconds", "× study"],
                     [[k, f"{v:.1f}", f"{v / base:.2f}"] for k, v in seconds.items()]))
    for k, d in diffs.items():
        print(f"{k} vs study: {'the same stored results, stage for stage' if not d else d}")
    write_results(args.out, {"command": " ".join(sys.argv), "model": args.model, "schemes": schemes,
                             "limit": args.limit, "ray": ray, "seconds": seconds,
                             "ratio_to_study": {k: v / base for k, v in seconds.items()},
                             "differences": diffs})
    return 0 if not any(diffs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
