import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never need the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
SHARED_BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session", autouse=True)
def repository_run_store_untouched():
    """Tests keep their studies in private stores: the repository's ``runs/`` (the user's) must not grow.
    The real-model browser run (``REFUSAL_LAB_BROWSER_MODEL``) uses it on purpose, like ``make run``."""
    runs = ROOT / "runs"
    before = set(os.listdir(runs)) if runs.is_dir() else set()
    yield
    after = set(os.listdir(runs)) if runs.is_dir() else set()
    if not os.environ.get("REFUSAL_LAB_BROWSER_MODEL"):
        assert after <= before, f"tests wrote studies into the repository's run store: {sorted(after - before)}"
