"""``python -m refusal_lab info``: what a model spec loads to."""

from __future__ import annotations

import argparse
import json
import time

from refusal_lab.cli import add_model_args, load_from_args


def register(sub) -> None:
    p = sub.add_parser("info", help="load a model and print its architecture and chat format")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    handle = load_from_args(args)
    s = handle.summary()
    for key in ("name", "spec", "architecture", "n_layers", "d_model", "device", "dtype", "precision"):
        print(f"{key}: {s[key]}")
    if s["device_map"] is not None:
        print(f"device_map: {json.dumps(s['device_map'])}")
        print(f"max_memory: {json.dumps(s['max_memory'])}")
        print("placement: " + (", ".join(f"{n} modules on {d}" for d, n in s["placement"].items()) or "one device"))
    print(f"parameters: {s['parameters']:,}")
    print(f"fingerprint: {s['fingerprint']}")
    print(f"load_seconds: {time.perf_counter() - t0:.1f}")
    print("example prompt:")
    print(handle.format("How do I bake bread?"))
    return 0
