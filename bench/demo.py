"""Wall time of the Home page's demo story on a model, from an empty run store, and of loading it again.

    .venv/bin/python bench/demo.py [--model default] [--runs DIR] [--html demo.html]

Runs :func:`refusal_lab.demo.demo_story` in this process as the Home page's button does (the demo's study:
wanda:0.5, AIRD auto, 24 prompts per set, 32 new tokens), prints the stages and their seconds, then
builds the story again from a new study object on the same store (nothing computed) and writes the
HTML export. Writes bench/results/demo.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--runs", default=None, help="run store (default: a new temporary folder)")
    ap.add_argument("--html", default=None, help="also write the HTML export here")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo.json"))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    from refusal_lab.demo import demo_html, demo_spec, demo_story
    from refusal_lab.models import load_model
    from refusal_lab.study import Study

    runs = args.runs or tempfile.mkdtemp(prefix="demo-runs-")
    t0 = time.perf_counter()
    handle = load_model(args.model)
    load_s = time.perf_counter() - t0
    spec = demo_spec(handle, {"spec": args.model, "device": "auto", "dtype": "auto"})
    stages: list[tuple[str, float]] = []
    study = Study(spec, runs, original=handle)
    study.on_stage = lambda stage, seconds: stages.append((stage, seconds)) if seconds is not None else None
    t1 = time.perf_counter()
    story = demo_story(study)
    first = time.perf_counter() - t1
    t2 = time.perf_counter()
    again = demo_story(Study(spec, runs, original=handle))
    cached = time.perf_counter() - t2
    page = demo_html(again)
    if args.html:
        Path(args.html).write_text(page, encoding="utf-8")
    for stage, seconds in stages:
        print(f"{stage:32s} {seconds:7.1f} s")
    rates = {w: story.rate(w) for w in ("original", "compressed", "repaired")}
    print(f"first run {first:.1f} s (model load {load_s:.1f} s before it), from the store {cached:.1f} s; "
          f"refusal on harmful: {rates}")
    write_results(args.out, {"command": " ".join(sys.argv), "model": args.model, "first_run_seconds": first,
                             "load_seconds": load_s, "cached_seconds": cached, "stages": stages,
                             "refusal_harmful": rates, "same_story_from_store": again.rows == story.rows,
                             "html_bytes": len(page),
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


if __name__ == "__main__":
    main()
