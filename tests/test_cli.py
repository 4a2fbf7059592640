"""The amct-caffe command line, through a subprocess: help, exit codes, one-line errors, the QAT flow.

* every subcommand answers ``--help`` (exit 0) under both console-script spellings;
* usage errors exit 2, failures exit 1 with exactly one line ``amct-caffe: error: ...`` on stderr and no
  traceback (``--debug`` shows it);
* ``run`` feeds .npy arrays and images (decoded as Caffe does: BGR, 0..255, resized to the blob);
* a tiny DummyData + EuclideanLoss net goes through the whole QAT flow on the command line
  (train -> retrain-config -> retrain-model -> train -> save-retrain -> run / inspect / compare), checked
  against a numpy forward written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import caffemodel_blobs, tiny_caffemodel
from tests.references.layers import conv2d, inner_product
from tests.references.metrics import cosine

SRC = Path(__file__).resolve().parents[1] / "src"
SUBCOMMANDS = ["calibration", "retrain-config", "retrain-model", "solver", "train", "save-retrain", "run",
               "inspect", "compare", "demo", "pycaffe-rewrite", "exec"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amct_caffe.cli", *args], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=300)


def run_amct_script(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The ``amct_caffe`` console script (``amct_caffe.cli:main_amct``)."""
    code = "import sys; from amct_caffe.cli import main_amct; sys.exit(main_amct())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, prog: str = "amct-caffe") -> str:
    """Exit 1, exactly one stderr line ``<prog>: error: ...`` containing ``needles``, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- help and usage ----------------------------------------------------------------------------------------
def test_help_texts():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "usage: amct-caffe" in proc.stdout
    for name in SUBCOMMANDS:
        assert name in proc.stdout
    for name in SUBCOMMANDS:
        proc = run_cli(name, "--help")
        assert proc.returncode == 0, (name, proc.stderr)
        assert f"usage: amct-caffe {name}" in proc.stdout and "--debug" in proc.stdout


def test_amct_caffe_script_help_lists_calibration_and_the_same_commands():
    proc = run_amct_script("--help")
    assert proc.returncode == 0 and "usage: amct_caffe" in proc.stdout
    for name in SUBCOMMANDS:
        assert name in proc.stdout
    for proc in (run_amct_script("calibration", "--help"), run_cli("calibration", "--h")):
        assert proc.returncode == 0
        for option in ("--model", "--weights", "--save_path", "--input_shape", "--data_dir", "--data_types",
                       "--evaluator", "--calibration_config", "--batch_num", "--gpu_id"):
            assert option in proc.stdout
    # --model, --weights and --save_path are required
    assert run_cli("calibration", "--model", "m").returncode == 2


def test_usage_error_exit_code():
    assert run_cli("no-such-command").returncode == 2
    assert run_cli().returncode == 2
    proc = run_cli("save-retrain", "--model", "m.prototxt")  # required options missing
    assert proc.returncode == 2 and "--weights" in proc.stderr
    assert run_cli("demo", "--float-iters", "0").returncode == 2


@pytest.mark.parametrize("form", ["equals", "space"])
def test_calibration_without_data_is_one_line_error(tmp_path, form):
    if form == "equals":
        args = ["--model=m.prototxt", "--weights=w.caffemodel", "--save_path=./result/m"]
    else:
        args = ["--model", "m.prototxt", "--weights", "w.caffemodel", "--save_path", "./result/m",
                "--batch_num", "2"]
    proc = run_amct_script("calibration", *args, cwd=tmp_path)
    assert_one_line_error(proc, "calibration data is missing", "--input_shape", "--evaluator",
                          prog="amct_caffe")
    assert not (tmp_path / "result").exists()


# -- one-line errors ---------------------------------------------------------------------------------------
NO_QUANTIZABLE = (
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
    'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n'
)
UNKNOWN_TYPE = (
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
    'layer { name: "odd" type: "NoSuchLayer" bottom: "data" top: "odd" }\n'
)


def test_run_missing_file_is_one_line_error(tmp_path):
    proc = run_cli("run", str(tmp_path / "missing.prototxt"), cwd=tmp_path)
    assert_one_line_error(proc, "missing.prototxt")


def test_debug_shows_the_traceback(tmp_path):
    for args in (["--debug", "run", "missing.prototxt"], ["run", "missing.prototxt", "--debug"]):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "missing.prototxt" in proc.stderr


def test_error_cases_print_one_line(tmp_path):
    (tmp_path / "relu.prototxt").write_text(NO_QUANTIZABLE)
    (tmp_path / "odd.prototxt").write_text(UNKNOWN_TYPE)
    # a caffemodel without weights (one layer, no blobs): a 0-byte file would add a WARNING line
    (tmp_path / "w.caffemodel").write_bytes(tiny_caffemodel({"r": []}, {"r": "ReLU"}))
    np.save(tmp_path / "x.npy", np.zeros((1, 3), np.float32))
    cases = [
        (["retrain-config", "--model", "relu.prototxt", "--weights", "missing.caffemodel", "--output",
          "c.json"], ["missing.caffemodel"]),
        (["retrain-config", "--model", "relu.prototxt", "--weights", "w.caffemodel", "--output", "c.json"],
         ["no layer that QAT can quantize"]),
        (["inspect", "odd.prototxt"], ["NoSuchLayer", "odd"]),
        (["retrain-model", "--model", "relu.prototxt", "--weights", "w.caffemodel", "--config", "none.json",
          "--output-model", "r.prototxt", "--output-weights", "r.caffemodel", "--record", "rec.txt"],
         ["none.json"]),
        (["train", "missing_solver.prototxt"], ["missing_solver.prototxt"]),
        (["train", "s.prototxt", "--weights", "w.caffemodel", "--snapshot", "s.solverstate"],
         ["--snapshot", "--weights", "not both"]),
        (["save-retrain", "--model", "relu.prototxt", "--weights", "w.caffemodel", "--save-type", "fakequant",
          "--save-path", "out/m"], ["'Fakequant', 'Deploy', 'Both'"]),
        (["run", "relu.prototxt", "--input", "x.npy"], ["NAME=FILE"]),
        (["run", "relu.prototxt", "--input", "label=x.npy"], ["no input blob 'label'", "data"]),
        (["run", "relu.prototxt", "--input", "data=nothere.npy"], ["nothere.npy"]),
        (["compare", "--float-model", "relu.prototxt", "--float-weights", "w.caffemodel", "--fake-model",
          "relu.prototxt", "--fake-weights", "w.caffemodel", "--deploy-model", "relu.prototxt", "--output",
          "rep"], ["--deploy-weights"]),
        (["compare", "--float-model", "gone.prototxt", "--float-weights", "w.caffemodel", "--fake-model",
          "relu.prototxt", "--fake-weights", "w.caffemodel", "--output", "rep"], ["gone.prototxt"]),
        (["pycaffe-rewrite", "gone.prototxt", "out.prototxt"], ["gone.prototxt"]),
    ]
    # independent processes: run them side by side (each spends most of its time importing torch)
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(pool.map(lambda case: run_cli(*case[0], cwd=tmp_path), cases))
    for (_, needles), proc in zip(cases, procs):
        assert_one_line_error(proc, *needles)
    # nothing was written by the failed commands
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "r.prototxt").exists() and not (tmp_path / "rep").exists()


# -- run ---------------------------------------------------------------------------------------------------
def test_run_forwards_given_inputs(tmp_path):
    net = tmp_path / "n.prototxt"
    net.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }\n'
        'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n'
    )
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    proc = run_cli("run", str(net), "--input", f"data={tmp_path / 'x.npy'}", "--save", str(out),
                   "--output-dir", str(tmp_path / "blobs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out)["r"], [[0.0, 2.0, 0.0, 4.0]])
    np.testing.assert_array_equal(np.load(tmp_path / "blobs" / "r.npy"), [[0.0, 2.0, 0.0, 4.0]])


def test_run_image_input_is_bgr_resized_like_caffe(tmp_path):
    from PIL import Image

    # a 4x4 RGB image whose 2x2 blocks are constant: an exact 2x downscale (OpenCV's INTER_AREA branch of
    # INTER_LINEAR) gives each block's value; a grey image resized from 2x2 to 4x4 by OpenCV's linear rule
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2, :2] = (10, 20, 30)
    rgb[:2, 2:] = (40, 50, 60)
    rgb[2:, :2] = (70, 80, 90)
    rgb[2:, 2:] = (200, 210, 220)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    net = tmp_path / "n.prototxt"
    net.write_text('layer { name: "data" type: "Input" top: "data" '
                   'input_param { shape { dim: 1 dim: 3 dim: 2 dim: 2 } } }\n'
                   'layer { name: "id" type: "Power" bottom: "data" top: "out" }\n')
    proc = run_cli("run", str(net), "--input", "data=c.png", "--input", "data=c.png", "--output-dir", "o",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "o" / "out.npy")
    expected = np.array([[[30, 60], [90, 220]], [[20, 50], [80, 210]], [[10, 40], [70, 200]]], np.float32)
    assert got.shape == (2, 3, 2, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], expected)  # B, G, R planes, values 0..255
    np.testing.assert_array_equal(got[1], expected)  # the image given twice makes a batch of two

    grey = np.array([[0, 100], [200, 40]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    net.write_text('layer { name: "data" type: "Input" top: "data" '
                   'input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n'
                   'layer { name: "id" type: "Power" bottom: "data" top: "out" }\n')
    proc = run_cli("run", str(net), "--input", "data=g.png", "--output-dir", "o", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # OpenCV bilinear 2x upscale: source coordinate (d + 0.5) / 2 - 0.5, clamped at the borders
    src = grey.astype(np.float64)
    coords = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, 1)
    frac = coords - lo
    rows = src[lo] * (1 - frac)[:, None] + src[hi] * frac[:, None]
    up = rows[:, lo] * (1 - frac)[None, :] + rows[:, hi] * frac[None, :]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "out.npy")[0, 0], up, atol=1.0)


# -- the QAT flow on a tiny net ----------------------------------------------------------------------------
TINY_NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "data" include { phase: TRAIN }
  dummy_data_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "target" type: "DummyData" top: "target" include { phase: TRAIN }
  dummy_data_param { shape { dim: 4 dim: 5 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "data" type: "Input" top: "data" include { phase: TEST }
  input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 3
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "loss"
  include { phase: TRAIN } }
"""


def _solver(net: str, iters: int, prefix: str, lr: float) -> str:
    return (f'net: "{net}"\nbase_lr: {lr}\nlr_policy: "fixed"\nmomentum: 0.9\nmax_iter: {iters}\n'
            f'snapshot_prefix: "{prefix}"\nrandom_seed: 1\n')


def numpy_tiny(caffemodel: Path, x: np.ndarray) -> np.ndarray:
    """TINY_NET's TEST forward by the numpy references: conv 3x3 (valid, stride 1) + bias -> ReLU ->
    InnerProduct, in float64."""
    blobs = caffemodel_blobs(caffemodel)
    return inner_product(np.maximum(conv2d(x, *blobs["conv1"]), 0.0), *blobs["ip1"])


def test_qat_flow_on_the_command_line(tmp_path):
    (tmp_path / "train.prototxt").write_text(TINY_NET)
    (tmp_path / "float_solver.prototxt").write_text(_solver("train.prototxt", 5, "float", 0.01))

    # float training
    proc = run_cli("train", "float_solver.prototxt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "iteration 5" in proc.stdout and "float_iter_5.caffemodel" in proc.stdout
    float_weights = tmp_path / "float_iter_5.caffemodel"
    assert float_weights.is_file() and (tmp_path / "float_iter_5.solverstate").is_file()

    # inspect: shapes from the engine (TEST phase: the Input of batch 4), QAT support
    proc = run_cli("inspect", "train.prototxt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "data 4x2x6x6 -> conv1 4x3x4x4" in rows["conv1"] and rows["conv1"].rstrip().endswith("yes")
    assert "3x2x3x3, 3 (57)" in rows["conv1"]  # 3*2*3*3 weights + 3 biases
    assert "conv1 4x3x4x4 -> ip1 4x5" in rows["ip1"] and "5x48, 5 (245)" in rows["ip1"]
    assert rows["relu1"].rstrip().endswith("no")
    assert "QAT can quantize 2 layer(s): conv1, ip1" in proc.stdout
    proc = run_cli("inspect", "train.prototxt", "--phase", "TRAIN", cwd=tmp_path)
    assert proc.returncode == 0 and "loss" in proc.stdout and "EuclideanLoss" in proc.stdout

    # retrain-config -> retrain-model
    proc = run_cli("retrain-config", "--model", "train.prototxt", "--weights", str(float_weights), "--output",
                   "qat/config.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "qat" / "config.json").read_text())
    assert sorted(k for k in config if k != "version") == ["conv1", "ip1"]
    assert "2 enabled" in proc.stdout
    proc = run_cli("retrain-model", "--model", "train.prototxt", "--weights", str(float_weights), "--config",
                   "qat/config.json", "--output-model", "qat/retrain.prototxt", "--output-weights",
                   "qat/retrain.caffemodel", "--record", "qat/record.txt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    retrain_text = (tmp_path / "qat" / "retrain.prototxt").read_text()
    assert "ActivationQAT" in retrain_text and "WeightQAT" in retrain_text

    # retraining, starting from the retrain caffemodel
    (tmp_path / "qat" / "solver.prototxt").write_text(_solver("qat/retrain.prototxt", 3, "qat/retrained",
                                                              0.001))
    proc = run_cli("train", "qat/solver.prototxt", "--weights", "qat/retrain.caffemodel", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    retrained = tmp_path / "qat" / "retrained_iter_3.caffemodel"
    assert retrained.is_file()

    # save-retrain (both models)
    proc = run_cli("save-retrain", "--model", "qat/retrain.prototxt", "--weights", str(retrained),
                   "--save-type", "Both", "--save-path", "results/tiny", "--record", "qat/record.txt",
                   "--config", "qat/config.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    suffixes = ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
                "deploy_weights.caffemodel")
    saved = [tmp_path / "results" / f"tiny_{s}" for s in suffixes]
    for path in saved:
        assert path.is_file() and f"results/tiny_{path.name[5:]}" in proc.stdout
    assert "scale_d" in (tmp_path / "qat" / "record.txt").read_text()

    # run the float, fake-quant and deploy models on the same input
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    outs = {}
    for key, model, weights in (("float", "train.prototxt", float_weights), ("fake", saved[0], saved[1]),
                                ("deploy", saved[2], saved[3])):
        proc = run_cli("run", str(model), "--weights", str(weights), "--input", "data=x.npy", "--output-dir",
                       f"out_{key}", cwd=tmp_path)
        assert proc.returncode == 0, (key, proc.stderr)
        outs[key] = np.load(tmp_path / f"out_{key}" / "ip1.npy")
    reference = numpy_tiny(float_weights, x.astype(np.float64))
    np.testing.assert_allclose(outs["float"], reference, rtol=1e-4, atol=1e-5)
    # 8-bit activations and weights: close to the float model, not equal to it
    assert cosine(outs["fake"], reference) > 0.99
    assert not np.allclose(outs["fake"], reference, rtol=1e-6, atol=1e-7)
    assert cosine(outs["deploy"], outs["fake"]) > 0.9999

    # the per-layer report on the same input
    proc = run_cli("compare", "--float-model", "train.prototxt", "--float-weights", str(float_weights),
                   "--fake-model", str(saved[0]), "--fake-weights", str(saved[1]), "--deploy-model",
                   str(saved[2]), "--deploy-weights", str(saved[3]), "--input", "data=x.npy", "--output",
                   "report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "conv1" in proc.stdout and "ip1" in proc.stdout and "report.html" in proc.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [layer["layer"] for layer in report["layers"]] == ["conv1", "ip1"]
    assert (tmp_path / "report" / "report.html").is_file()


def test_run_input_blob_named_like_a_forward_keyword(tmp_path: Path) -> None:
    """An input blob called 'start' is fed like any other (not taken for forward's start layer)."""
    from amct_caffe import cli

    model = tmp_path / "m.prototxt"
    model.write_text('layer { name: "in" type: "Input" top: "start" '
                     'input_param { shape { dim: 1 dim: 3 } } }\n'
                     'layer { name: "r" type: "ReLU" bottom: "start" top: "out" }\n')
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    assert cli.main(["run", str(model), "--input", f"start={tmp_path / 'x.npy'}", "--output", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out)["out"], np.maximum(x, 0))  # ReLU by hand
