import sys
from pathlib import Path

# the benchmark scripts import their shared module as a top-level ``_common``
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
