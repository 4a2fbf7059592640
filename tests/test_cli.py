"""The amct-caffe command line, through a subprocess: help, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "amct_caffe.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_help_texts():
    for args in ([], ["run"], ["demo"]):
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0
        assert "usage: amct-caffe" in proc.stdout


def test_usage_error_exit_code():
    proc = run_cli("no-such-command")
    assert proc.returncode == 2


def test_run_missing_file_is_one_line_error(tmp_path):
    proc = run_cli("run", str(tmp_path / "missing.prototxt"), cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.prototxt" in lines[0] and "Traceback" not in proc.stderr


def test_run_forwards_given_inputs(tmp_path):
    net = tmp_path / "n.prototxt"
    net.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }\n'
        'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n'
    )
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    proc = run_cli("run", str(net), "--input", f"data={tmp_path / 'x.npy'}", "--save", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out)["r"], [[0.0, 2.0, 0.0, 4.0]])


def test_demo_runs(tmp_path):
    proc = run_cli("demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prob: shape (1, 10)" in proc.stdout
