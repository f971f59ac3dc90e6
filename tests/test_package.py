"""The package: `refusal_lab` importable from anywhere (installed, not found through the checkout's
path), its assets inside it, and `core` as an alias of the very same modules."""

import subprocess
import sys
from pathlib import Path

import refusal_lab
from refusal_lab.prompts import ASSETS


def test_installed_and_self_contained(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import refusal_lab, sys; print(refusal_lab.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == Path(refusal_lab.__file__).resolve()
    assert ASSETS.is_relative_to(Path(refusal_lab.__file__).parent) and (ASSETS / "prompts" / "harmful.txt").is_file()


def test_core_is_an_alias_of_the_same_modules(tmp_path):
    import core.study
    from core.results import Evaluation

    import refusal_lab.results
    import refusal_lab.study

    assert core.study is refusal_lab.study and Evaluation is refusal_lab.results.Evaluation
    for module in ("core", "refusal_lab"):
        run = subprocess.run([sys.executable, "-m", module, "compress", "--list"], cwd=tmp_path,
                             capture_output=True, text=True)
        assert run.returncode == 0 and "wanda:SPARSITY" in run.stdout, run.stderr[-500:]
