"""``python -m refusal_lab compress``: compress a model with one scheme, print the report, optionally save it.

    python -m refusal_lab compress --list
    python -m refusal_lab compress --model default --scheme wanda:0.5 [--out DIR] [--json OUT] [--perplexity]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refusal_lab.cli.args import count
from refusal_lab.cli import add_model_args, load_from_args
from refusal_lab.tables import text_table


def register(sub) -> None:
    p = sub.add_parser("compress", help="quantize or prune a model and report sparsity, bits and memory")
    add_model_args(p)
    p.add_argument("--scheme", help="a scheme spec, e.g. bnb-nf4, rtn:4:64, hqq:4:64, wanda:0.5, sparsegpt:2:4 "
                                    "(see --list)")
    p.add_argument("--list", action="store_true", help="list the compression schemes and exit")
    p.add_argument("--modules", default=None,
                   help="which linears inside the decoder blocks: a regex searched in the module name (e.g. mlp, "
                        "'layers\\.(0|1)\\.') or comma-separated name suffixes (e.g. q_proj,k_proj); default: all")
    p.add_argument("--calibration", default="text",
                   help="Wanda/SparseGPT calibration: 'text' (bundled English prose), 'harmless' (bundled "
                        "harmless train prompts) or a .txt file of prose")
    p.add_argument("--calib-samples", type=count(1), default=16, help="calibration windows (default 16)")
    p.add_argument("--calib-len", type=count(2), default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--perplexity", action="store_true",
                   help="also measure perplexity on the bundled English text before and after")
    p.add_argument("--out", type=Path, default=None, help="save the compressed model to this folder")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON to this file")
    p.add_argument("--no-layers", action="store_true", help="omit the per-layer sparsity table")
    p.set_defaults(func=run)


def print_schemes() -> None:
    from refusal_lab.compression import VALID_FORMS, list_schemes

    rows = []
    for info in list_schemes():
        reason = info.unavailable_reason
        rows.append((info.form, info.family, ", ".join(info.examples), "yes" if info.saveable else "no",
                     "yes" if reason is None else f"no ({reason})", info.description))
    heads = ("form", "family", "examples", "saveable", "available", "description")
    print(text_table(heads, rows))
    print(f"\nvalid specs: {VALID_FORMS}")


def _modules_arg(text: str | None):
    """``a,b,c`` → name suffixes; anything else → a regex searched in the full module name."""
    if text is None:
        return None
    if "," in text:
        return [s.strip() for s in text.split(",") if s.strip()]
    return text


def _calibration(args, handle):
    from refusal_lab.compression.calibration import from_prompts, from_text

    if args.calibration == "text":
        return from_text(handle.tokenizer, n_samples=args.calib_samples, seq_len=args.calib_len)
    if args.calibration == "harmless":
        from refusal_lab.prompts import bundled

        return from_prompts(handle, bundled("harmless", "train"), n_samples=args.calib_samples,
                            seq_len=args.calib_len, source="harmless/train")
    path = Path(args.calibration).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--calibration: {path} is not a file (use text, harmless or a .txt file)")
    return from_text(handle.tokenizer, path.read_text(encoding="utf-8"), n_samples=args.calib_samples,
                     seq_len=args.calib_len, source=path.name)


def save_compressed(handle, report, out: Path) -> None:
    """``save_pretrained`` (safetensors) + tokenizer + ``refusal_lab.json`` (parent, scheme, report)."""
    if not report.saveable:
        raise ValueError(f"{report.scheme} cannot be saved: {report.save_note}")
    out.mkdir(parents=True, exist_ok=True)
    with handle.lock:
        if report.scheme.startswith("bnb-"):
            from refusal_lab.compression.bnb import unpack_cpu_4bit

            unpack_cpu_4bit(handle.model)  # work around a bitsandbytes CPU save bug (see there)
        handle.model.save_pretrained(out, safe_serialization=True)
    handle.tokenizer.save_pretrained(out)
    meta = {k: v for k, v in handle.meta.items() if k != "report"}
    meta["report"] = {k: v for k, v in report.to_json().items() if k not in ("module_sparsity", "module_bits")}
    (out / "refusal_lab.json").write_text(json.dumps(meta, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    from refusal_lab.compression import REGISTRY, apply, parse_scheme
    from refusal_lab.progress import tqdm_progress

    if args.list:
        print_schemes()
        return 0
    if not args.scheme:
        raise ValueError("--scheme is required (see `python -m refusal_lab compress --list`)")
    scheme = parse_scheme(args.scheme)
    info = REGISTRY[scheme.method]
    if args.out is not None and not info.saveable:
        raise ValueError(f"{scheme} cannot be saved ({info.description}: HQQLinear layers are not serialisable "
                         "with save_pretrained); drop --out, or use rtn:4:64 / bnb-nf4 for a saveable 4-bit model")
    if args.out is not None and Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
        raise ValueError(f"--out {args.out} already exists; give a new (or empty) folder")
    handle = load_from_args(args)
    calibration = _calibration(args, handle) if scheme.needs_calibration else None
    new, rep = apply(handle, scheme, calibration, modules=_modules_arg(args.modules),
                     progress=tqdm_progress(f"compress {scheme}"))
    result = rep.to_json()
    print(rep.table(per_layer=not args.no_layers))
    if args.perplexity:
        from refusal_lab.evaluation import perplexity
        from refusal_lab.prompts import bundled_text

        text = bundled_text()
        before = perplexity(handle, text, progress=tqdm_progress("perplexity (original)"))
        after = perplexity(new, text, progress=tqdm_progress("perplexity (compressed)"))
        result["perplexity"] = {"original": before, "compressed": after, "text": "bundled English text"}
        print(f"perplexity (bundled English text): {before:.2f} → {after:.2f}")
    if args.out is not None:
        save_compressed(new, rep, args.out)
        print(f"saved to {args.out} (reload with --model {args.out})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"report written to {args.json}")
    return 0
