"""Prompt sets: the project's bundled sets (with deterministic train/val/test splits) and loaders
for user files (``.txt``, ``.csv``, ``.json``, ``.jsonl``) or, when online, hub datasets."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
PROMPTS_DIR = ASSETS / "prompts"
BUNDLED_KINDS = ("harmful", "harmless", "borderline")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"harmful": (0.6, 0.2, 0.2), "harmless": (0.6, 0.2, 0.2), "borderline": (0.4, 0.2, 0.4)}
SPLIT_SEED = 20240611
TEXT_COLUMNS = ("instruction", "goal", "prompt", "behavior", "behaviour", "forbidden_prompt", "query",
                "question", "text", "input", "request")
MAX_PROMPT_CHARS = 4000
MAX_FILE_BYTES = 50 * 1024 * 1024
_TAG = re.compile(r"^\[([^\]]{1,40})\]\s+(.*)$")
_NEWLINE = re.compile(r"\r\n|\r|\n")


class PromptFileError(ValueError):
    """A prompt file could not be read; the message says what is wrong and how to fix it."""


@dataclass
class PromptSet:
    """An ordered list of instructions with optional per-prompt categories."""

    name: str
    prompts: list[str]
    categories: list[str | None] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.categories:
            self.categories = [None] * len(self.prompts)
        if len(self.categories) != len(self.prompts):
            raise ValueError("categories and prompts differ in length")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    @property
    def sha(self) -> str:
        """Content hash (16 hex chars) of the prompts and their categories — part of every cache key that
        depends on them. JSON-encoded: no two different sets share an encoding (a NUL inside a prompt
        is escaped, not a separator)."""
        text = json.dumps([self.prompts, self.categories], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def head(self, n: int | None) -> "PromptSet":
        """The first ``n`` prompts (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n], self.categories[:n], self.source)

    def category_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.categories:
            counts[c or "(none)"] = counts.get(c or "(none)", 0) + 1
        return counts


def _dedupe(name: str, prompts: list[str], cats: list[str | None]) -> tuple[list[str], list[str | None]]:
    seen: set[str] = set()
    out_p, out_c = [], []
    for p, c in zip(prompts, cats):
        key = " ".join(p.lower().split())
        if key in seen:
            continue
        seen.add(key)
        out_p.append(p)
        out_c.append(c)
    if len(out_p) < len(prompts):
        warnings.warn(f"{name}: removed {len(prompts) - len(out_p)} duplicated prompt(s)")
    return out_p, out_c


def split_lines(text: str) -> list[str]:
    """Lines split at line breaks only (\\n, \\r\\n, \\r) — not at U+2028, \\x1c or \\x85, which
    :meth:`str.splitlines` also splits at and which can sit inside one prompt."""
    return _NEWLINE.split(text)


def _validate(name: str, prompts: list[str], cats: list[str | None], source: str) -> PromptSet:
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptFileError(f"{source}: prompt {i + 1} holds an invalid character ({e.reason}: "
                                  f"{p[e.start]!r}); fix the file") from None
    prompts = [p.strip() for p in prompts]
    keep = [i for i, p in enumerate(prompts) if p]
    prompts, cats = [prompts[i] for i in keep], [cats[i] for i in keep]
    if not prompts:
        raise PromptFileError(f"{source}: no prompts found (the file is empty or the text column is blank)")
    too_long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if too_long:
        raise PromptFileError(f"{source}: prompt {too_long[0] + 1} has {len(prompts[too_long[0]]):,} characters "
                              f"(limit {MAX_PROMPT_CHARS:,}); is this really a prompt file?")
    prompts, cats = _dedupe(name, prompts, cats)
    return PromptSet(name, prompts, cats, source)


def read_text_file(path: Path) -> str:
    """The file's text: a regular file (not a folder, FIFO or device) of at most ``MAX_FILE_BYTES``,
    counted by the bytes actually read (a device reports size 0), in UTF-8."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PromptFileError(f"{path}: file not found") from None
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise PromptFileError(f"{path}: is a folder; give a prompt file (.txt, .csv, .json, .jsonl)")
    if not stat.S_ISREG(mode):
        raise PromptFileError(f"{path}: not a regular file (a pipe or device?); give a prompt file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read it ({e.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise PromptFileError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from e


def _pick_column(columns: list[str], column: str | None, source: str) -> str:
    if column is not None:
        if column not in columns:
            raise PromptFileError(f"{source}: no column {column!r}; columns are {columns}")
        return column
    lower = {c.lower(): c for c in columns}
    for cand in TEXT_COLUMNS:
        if cand in lower:
            return lower[cand]
    raise PromptFileError(f"{source}: cannot tell which column holds the prompts among {columns}; "
                          f"name one of {list(TEXT_COLUMNS)}, or name the column (--column on the "
                          "command line, the column box on the Prompts page)")


def _from_records(records: list, column: str | None, source: str) -> tuple[list[str], list[str | None]]:
    if all(isinstance(r, str) for r in records):
        return list(records), [None] * len(records)
    if not all(isinstance(r, dict) for r in records):
        raise PromptFileError(f"{source}: expected a list of strings or of objects")
    columns = list(dict.fromkeys(k for r in records for k in r))
    if None in columns:  # csv.DictReader puts the fields beyond the header under None
        row = next(i for i, r in enumerate(records) if None in r)
        raise PromptFileError(f"{source}: row {row + 1} has more fields than the header (an unquoted comma in "
                              "the text?); put the text in double quotes")
    col = _pick_column(columns, column, source)
    cat_col = next((c for c in columns if c.lower() in ("category", "categories", "semantic_category")), None)
    prompts, cats = [], []
    for i, r in enumerate(records):
        v = r.get(col)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise PromptFileError(f"{source}: record {i + 1} has no {col!r} (a missing field?); fix or remove it")
        if not isinstance(v, str):
            raise PromptFileError(f"{source}: record {i + 1} has a non-text {col!r}")
        prompts.append(v)
        c = r.get(cat_col) if cat_col else None
        cats.append(str(c) if c not in (None, "") else None)
    return prompts, cats


def csv_records(text: str, source: str) -> list[dict]:
    """The rows of CSV ``text`` as dicts keyed by its header (fields beyond the header under None)."""
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
    except csv.Error as e:
        raise PromptFileError(f"{source}: malformed CSV ({e})") from e
    if not reader.fieldnames:
        raise PromptFileError(f"{source}: empty CSV")
    return rows


def jsonl_records(text: str, source: str) -> list:
    """The JSON value of every non-blank line of ``text``."""
    records = []
    for n, line in enumerate(split_lines(text), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{source}: malformed JSON on line {n}: {e.msg}") from e
            except RecursionError:
                raise PromptFileError(f"{source}: line {n}: JSON nested too deeply") from None
    return records


def parse_prompts(text: str, fmt: str, *, column: str | None = None, name: str = "prompts",
                  source: str = "<upload>") -> PromptSet:
    """Parse prompt-file content of format ``fmt`` (txt, csv, json, jsonl) into a :class:`PromptSet`.

    ``.txt``: one prompt per line, an optional ``[category]`` tag in front. Others: the text column
    is detected (``instruction``, ``goal``, ``prompt``, ``behavior``, ``forbidden_prompt``, …) or named
    by ``column``; a ``category`` column is kept.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt == "txt":
        prompts, cats = [], []
        for line in split_lines(text):
            m = _TAG.match(line.strip())
            prompts.append(m.group(2) if m else line)
            cats.append(m.group(1) if m else None)
    elif fmt == "csv":
        prompts, cats = _from_records(csv_records(text, source), column, source)
    elif fmt == "json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{source}: malformed JSON at line {e.lineno}: {e.msg}") from e
        except RecursionError:
            raise PromptFileError(f"{source}: JSON nested too deeply to be a prompt list") from None
        if isinstance(data, dict):  # {"data": [...]} or {"prompts": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise PromptFileError(f"{source}: expected a JSON list of prompts")
            data = lists[0]
        if not isinstance(data, list):
            raise PromptFileError(f"{source}: expected a JSON list of prompts")
        prompts, cats = _from_records(data, column, source)
    elif fmt == "jsonl":
        prompts, cats = _from_records(jsonl_records(text, source), column, source)
    else:
        raise PromptFileError(f"{source}: unsupported format {fmt!r}; use .txt, .csv, .json or .jsonl")
    return _validate(name, prompts, cats, source)


def load_prompts(path: str | Path, *, column: str | None = None, name: str | None = None) -> PromptSet:
    """Load a user's prompt file (format from its extension). ``hf:ID[:SPLIT]`` loads a hub dataset
    (online only, needs the ``datasets`` package)."""
    if str(path).startswith("hf:"):
        return load_hub_prompts(str(path)[3:], column=column)
    path = Path(path).expanduser()
    return parse_prompts(read_text_file(path), path.suffix or "txt", column=column, name=name or path.stem,
                         source=str(path))


def load_hub_prompts(dataset_id: str, *, column: str | None = None) -> PromptSet:
    """``ID[:SPLIT]`` from the Hugging Face hub (online only)."""
    try:
        import datasets
    except ImportError as e:
        raise PromptFileError("loading from the hub needs `pip install datasets` and a network") from e
    ds_id, _, split = dataset_id.partition(":")
    ds = datasets.load_dataset(ds_id, split=split or "train")
    prompts, cats = _from_records(list(ds), column, f"hf:{dataset_id}")
    return _validate(ds_id.split("/")[-1], prompts, cats, f"hf:{dataset_id}")


def split_indices(n: int, fractions: tuple[float, float, float], seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Deterministic seeded shuffle of ``range(n)`` cut into train/val/test by ``fractions``."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    return {"train": sorted(idx[:n_train]), "val": sorted(idx[n_train:n_train + n_val]),
            "test": sorted(idx[n_train + n_val:])}


def bundled(kind: str, split: str | None = None) -> PromptSet:
    """A bundled prompt set: ``kind`` in harmful | harmless | borderline; ``split`` in train | val | test
    or None for all. Splits are stratified by nothing but fixed by :data:`SPLIT_SEED`."""
    if kind not in BUNDLED_KINDS:
        raise PromptFileError(f"unknown bundled set {kind!r}; choose from {BUNDLED_KINDS}")
    full = load_prompts(PROMPTS_DIR / f"{kind}.txt", name=kind)
    if split is None:
        return full
    if split not in SPLITS:
        raise PromptFileError(f"unknown split {split!r}; choose from {SPLITS}")
    idx = split_indices(len(full), SPLIT_FRACTIONS[kind])[split]
    return PromptSet(f"{kind}/{split}", [full.prompts[i] for i in idx], [full.categories[i] for i in idx],
                     full.source)


def bundled_text() -> str:
    """The project's own English prose (perplexity and compression calibration)."""
    return (ASSETS / "english_text.txt").read_text(encoding="utf-8")


def refusal_phrasings() -> list[str]:
    """The project's own refusal replies (organism training targets)."""
    return [line.strip() for line in (ASSETS / "refusals.txt").read_text().splitlines() if line.strip()]


def resolve_prompt_arg(arg: str | None, default_kind: str, default_split: str = "test", *,
                       column: str | None = None) -> PromptSet:
    """A CLI/page prompt argument: None → bundled ``default_kind/default_split``; ``bundled:KIND[:SPLIT]``
    → a bundled set; otherwise a file path or ``hf:`` id (``column``: its text column)."""
    if arg is None:
        return bundled(default_kind, default_split)
    if arg.startswith("bundled:"):
        _, kind, *rest = arg.split(":")
        return bundled(kind, rest[0] if rest else None)
    return load_prompts(arg, column=column)
