"""Command line: ``python -m refusal_lab <command> …``. Each module in this package that defines
``register(subparsers)`` adds one command, so commands live next to nothing else."""

from __future__ import annotations

import argparse

from refusal_lab.cli.args import DTYPES, device, device_map, max_memory
from refusal_lab.errors import error_line
import importlib
import logging
import pkgutil
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see <prog> --help)``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m refusal_lab", description="Refusal Lab command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def add_model_args(p: argparse.ArgumentParser, *, many: bool = False) -> None:
    """The model options every command shares (``many``: ``--model`` repeatable, e.g. for a sweep)."""
    if many:
        p.add_argument("--model", action="append", default=None, metavar="MODEL",
                       help="default | smollm2-base | HF id | folder | file.gguf (repeatable; default: default)")
    else:
        p.add_argument("--model", default="default", help="default | smollm2-base | HF id | folder | file.gguf")
    p.add_argument("--device", default="auto", type=device, help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device-map", default=None, type=device_map, metavar="MAP",
                   help="spread the model over devices with accelerate instead of --device: auto | balanced | "
                        'sequential | JSON {"module name": GPU index | "cpu" | "disk", …}')
    p.add_argument("--max-memory", default=None, type=max_memory, metavar="LIMITS",
                   help="memory per device for --device-map, e.g. 0=10GiB,1=10GiB,cpu=30GiB")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="of forward passes: auto = bfloat16 autocast (float32 weights and accumulation) where "
                        "the hardware has native bf16 matmuls, else float32 (exact)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own Python code (off by default: only for repos you trust)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template (file) for models without one")


def load_from_args(args: argparse.Namespace):
    from refusal_lab.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, chat_template=args.chat_template,
                      precision=getattr(args, "precision", "auto"), device_map=getattr(args, "device_map", None),
                      max_memory=getattr(args, "max_memory", None))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # bitsandbytes warns on import that an optional CPU kernel package is absent; its fallback works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from refusal_lab.progress import Cancelled

    try:
        return int(args.func(args) or 0)
    except (KeyboardInterrupt, Cancelled):
        print("cancelled", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the boundary: one line, never a traceback (-v shows it)
        if args.verbose:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
