import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never need the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
SHARED_BENCHMARKS = ROOT.parent / "shared" / "benchmarks"
