"""Run every benchmark in bench/ (``make bench``); each prints its own table of ratios.

Benchmarks compare peftlab against the reference (transformers / peft) in the same process on
the same inputs, and report ratios, never absolute claims.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

here = Path(__file__).parent
scripts = sorted(p for p in here.glob("bench_*.py"))
if not scripts:
    sys.exit("no bench_*.py scripts in bench/")
for script in scripts:
    print(f"== {script.name}", flush=True)
    runpy.run_path(str(script), run_name="__main__")
