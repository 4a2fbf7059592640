"""Runs one measured operation in a fresh interpreter and reports its wall time, CPU time and peak memory.

The benchmarks compose a worker script from a ``setup`` part (imports and helpers, not measured) and a
``body`` (the measured operations); the worker reads its JSON arguments from ``sys.argv[1]`` (``args``) and
prints one JSON line: ``seconds``, ``cpu_seconds``, ``peak_mb`` (VmHWM: the peak RSS of this process image;
``ru_maxrss`` would include the parent's RSS copied at fork) and ``imports_mb`` (RSS after ``setup``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_HEAD = r"""
import json, os, resource, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["src"])
import logging

def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")
"""

_START = r"""
logging.getLogger("amct_caffe").setLevel(logging.WARNING)
after_imports = status_mb("VmRSS")
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
"""

_END = r"""
seconds = time.perf_counter() - start
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
peak = status_mb("VmHWM")
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak, "imports_mb": after_imports}))
"""


def worker_script(setup: str, body: str) -> str:
    """The worker's source: ``setup`` (not measured), then ``body`` between the measurements."""
    return _HEAD + setup + _START + body + _END


def run_worker(script: str, args: dict) -> dict:
    """Run ``script`` in a fresh ``python -c`` with ``args`` (``src`` is added) and return its JSON line."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    payload = json.dumps({"src": str(REPO / "src"), **args})
    proc = subprocess.run([sys.executable, "-c", script, payload], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
