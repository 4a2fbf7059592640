"""``amct-caffe demo`` end to end (the CLI in a subprocess, with fewer iterations than the default).

The printed table is parsed and checked: for both flows (post-training quantization and QAT) the
fake-quant model is within one point of the float model's held-out accuracy, the deploy model's integer
emulation predicts the same top-1 class as the fake-quant model on at least 99.5 % of the held-out
images, the float accuracy is the one a numpy forward of the float caffemodel gives
(tests/references/nets.py), the printed sizes are the files' sizes, and the model files, the records and
the report exist where the demo says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FLOAT_ITERS = 300
RETRAIN_ITERS = 50
PREFIX = "lenet_digits"
QUANTIZED = ["conv1", "conv2", "pool2", "ip1", "ip2"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@dataclass(frozen=True)
class DemoRun:
    proc: subprocess.CompletedProcess
    output: Path
    cwd: Path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> DemoRun:
    pytest.importorskip("h5py", reason="the demo's nets read HDF5 data")
    pytest.importorskip("matplotlib", reason="the demo's report draws plots")
    cwd = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "amct_caffe.cli", "demo", "--output", "out", "--float-iters", str(FLOAT_ITERS),
         "--retrain-iters", str(RETRAIN_ITERS), "--seed", "0"],
        capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300,
    )
    return DemoRun(proc, cwd / "out", cwd)


def _row(stdout: str, label: str) -> tuple[float, str, str]:
    """(accuracy in %, caffemodel path, size text) of a model row of the results table."""
    match = re.search(rf"^{re.escape(label)}\s+([\d.]+) %\s+(\S+)\s+([\d.]+ [KM]iB)\s", stdout, re.M)
    assert match, f"no table row for {label}:\n{stdout}"
    return float(match.group(1)), match.group(2), match.group(3)


def test_demo_succeeds_with_a_clean_stdout(demo_run):
    proc = demo_run.proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    # progress bars and log lines go to stderr; stdout has the steps and the tables only
    assert "[AMCT]" not in proc.stdout and "\r" not in proc.stdout
    for step in range(1, 9):
        assert f"[{step}/8]" in proc.stdout
    assert f"{FLOAT_ITERS} iterations" in proc.stdout and f"{RETRAIN_ITERS} iterations" in proc.stdout
    assert re.search(r"float [\d.]+ ms/step .*QAT retrain [\d.]+ ms/step", proc.stdout)


@pytest.mark.parametrize("flow", ["PTQ", "QAT"])
def test_demo_accuracies(demo_run, flow):
    stdout = demo_run.proc.stdout
    float_acc, _, _ = _row(stdout, "float")
    fake_acc, _, _ = _row(stdout, f"{flow} fake-quant")
    deploy_acc, _, _ = _row(stdout, f"{flow} deploy")
    print(f"\ndemo {flow}: float {float_acc} %, fake-quant {fake_acc} %, deploy {deploy_acc} %")
    assert float_acc >= 90.0
    assert abs(fake_acc - float_acc) <= 1.0 + 1e-9
    match = re.search(rf"^{flow}: .* same top-1 on (\d+)/(\d+) held-out images \(([\d.]+) %\)", stdout, re.M)
    assert match, stdout
    same, total = int(match.group(1)), int(match.group(2))
    assert total == 360 and same / total >= 0.995
    assert float(match.group(3)) == pytest.approx(100.0 * same / total, abs=0.006)
    # the deploy and fake-quant accuracies can differ only by the images they disagree on
    assert abs(deploy_acc - fake_acc) <= 100.0 * (total - same) / total + 0.006


def test_demo_float_accuracy_is_the_numpy_forward(demo_run):
    from amct_caffe.demo import digits
    from tests.helpers import caffemodel_blobs
    from tests.references.nets import digits_scores

    float_acc, path, _ = _row(demo_run.proc.stdout, "float")
    caffemodel = demo_run.output / path
    assert caffemodel.name == f"{PREFIX}_float_iter_{FLOAT_ITERS}.caffemodel" and caffemodel.is_file()
    x, y = digits.load_split("test", seed=0)
    scores = digits_scores(caffemodel_blobs(str(caffemodel)), x)
    expected = 100.0 * float(np.mean(scores.argmax(axis=1) == y.astype(np.int64)))
    assert float_acc == pytest.approx(expected, abs=100 * 1.5 / 360)


def test_demo_files_and_sizes(demo_run):
    stdout, out = demo_run.proc.stdout, demo_run.output
    results = out / "results"
    files = [results / f"{PREFIX}_{s}" for s in ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel",
                                                   "deploy_model.prototxt", "deploy_weights.caffemodel",
                                                   "scale_offset_record.txt")]
    files += [out / "report" / "report.html", out / "report" / "report.json",
              out / "retrain" / "config.json", out / "ptq" / "config.json"]
    files += [results / f"{PREFIX}_ptq_{s}" for s in ("fake_quant_model.prototxt", "deploy_model.prototxt",
                                                       "scale_offset_record.txt")]
    for path in files:
        assert path.is_file(), path
    # the "files:" list names them (relative to the working directory)
    listing = stdout[stdout.index("files:"):]
    for path in files[:6] + files[-3:]:
        assert str(path.relative_to(demo_run.cwd)) in listing, path
    # printed sizes are the caffemodels' sizes; the deploy weights are INT8 (about a quarter of float)
    sizes = {}
    for label in ("float", "QAT fake-quant", "QAT deploy", "PTQ fake-quant", "PTQ deploy"):
        _, rel, size_text = _row(stdout, label)
        actual = (out / rel).stat().st_size
        value, unit = size_text.split()
        scale = 1024 if unit == "KiB" else 1024 * 1024
        assert float(value) == pytest.approx(actual / scale, abs=0.051), (label, size_text, actual)
        sizes[label] = actual
    assert sizes["QAT deploy"] < sizes["float"] / 3 and sizes["PTQ deploy"] < sizes["float"] / 3
    for name in (f"{PREFIX}_scale_offset_record.txt", f"{PREFIX}_ptq_scale_offset_record.txt"):
        record = (results / name).read_text()
        for layer in QUANTIZED:
            assert layer in record, (name, layer)


def test_demo_prints_the_per_layer_report(demo_run):
    stdout = demo_run.proc.stdout
    report = stdout[stdout.index("[8/8]"):stdout.index("files:")]
    for layer in QUANTIZED:
        assert re.search(rf"^\W?{layer}\s", report, re.M), layer
    assert "float vs fake-quant" in report and "fake-quant vs deploy" in report


def test_run_demo_rejects_bad_iterations(tmp_path):
    from amct_caffe.demo.run import run_demo
    from amct_caffe.errors import ConfigError

    with pytest.raises(ConfigError, match="--retrain-iters must be a positive"):
        run_demo(tmp_path / "out", float_iters=10, retrain_iters=0, report=False)
    assert not (tmp_path / "out").exists()
