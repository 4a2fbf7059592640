"""A new user's first hour: what used to fail silently or noisily now says what to do.

* QAT on a deploy prototxt: ``train`` refuses nets without data layer or loss and retrain models without
  ``--weights``; ``create_quant_retrain_model`` warns; IFMR on an all-zero input warns;
* solvers: ``amct-caffe solver`` writes AMCT's retrain solver; ``train --help`` shows one; a solver without
  ``max_iter`` or with an unreachable relative ``net:`` is refused;
* flags: AMCT's underscore spellings and one output-flag scheme (old spellings hidden);
* noise: the command line's screen has no INFO line repeating its own summary; upgrade notes once per
  file; a friendly single note for retrain layers without clips; no "-0" in logs;
* the demo without h5py, scikit-learn or matplotlib.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import amct
from amct_caffe.caffe import pycaffe
from amct_caffe.cli import build_parser, normalise_spellings
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.model.io import load_prototxt
from amct_caffe.proto import caffe_pb2
from tests.helpers import parse_net

SRC = Path(__file__).resolve().parents[1] / "src"
TEST = caffe_pb2.TEST

DEPLOY = """
name: "deploy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 3 } }
"""
TRAINABLE = DEPLOY.replace(
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }',
    'layer { name: "data" type: "DummyData" top: "data" top: "label" dummy_data_param { '
    'shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { dim: 2 dim: 3 } data_filler { type: "gaussian" } } }'
) + 'layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "label" top: "loss" }\n'


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in _env().items() if k != "AMCT_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "amct_caffe.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _float_model(folder: Path, text: str, name: str) -> tuple[str, str]:
    (folder / f"{name}.prototxt").write_text(text)
    net = Net(parse_net(text), TEST)
    randomize_params(net, 0)
    net.save(folder / f"{name}.caffemodel")
    return str(folder / f"{name}.prototxt"), str(folder / f"{name}.caffemodel")


def _retrain(folder: Path, text: str, name: str) -> tuple[str, str]:
    model, weights = _float_model(folder, text, name)
    amct.create_quant_retrain_config(str(folder / f"{name}.json"), model, weights)
    out = (str(folder / f"{name}_r.prototxt"), str(folder / f"{name}_r.caffemodel"))
    amct.create_quant_retrain_model(model, weights, str(folder / f"{name}.json"), *out,
                                    str(folder / f"{name}_record.txt"))
    return out


# ---------------------------------------------------------------------------------------------------------
# (1) QAT on a deploy prototxt
# ---------------------------------------------------------------------------------------------------------
def test_retrain_model_of_a_deploy_prototxt_warns(tmp_path, amct_log):
    _retrain(tmp_path, DEPLOY, "d")
    warnings = [r.getMessage() for r in amct_log.records if r.levelno == logging.WARNING]
    assert any("no data layer" in w and "no loss layer" in w and "training prototxt" in w for w in warnings)
    amct_log.clear()
    _retrain(tmp_path, TRAINABLE, "t")
    assert not [r for r in amct_log.records if r.levelno >= logging.WARNING]


def test_ifmr_on_zero_input_warns(tmp_path, amct_log):
    model, weights = _retrain(tmp_path, DEPLOY, "d")
    net = pycaffe.Net(model, weights, pycaffe.TRAIN)
    net.forward(data=np.zeros((2, 3, 6, 6), np.float32))
    assert any("all-zero input" in r.getMessage() and r.levelno == logging.WARNING for r in amct_log.records)


def _solver(folder: Path, net: str, extra: str = "max_iter: 2") -> str:
    path = folder / "solver.prototxt"
    path.write_text(f'net: "{net}"\nbase_lr: 0.001\nlr_policy: "fixed"\n{extra}\n')
    return str(path)


def test_train_refuses_what_trains_nothing(tmp_path):
    model, weights = _retrain(tmp_path, DEPLOY, "d")
    proc = cli("train", _solver(tmp_path, model), "--weights", weights, cwd=tmp_path)
    assert proc.returncode == 1 and "no data layer" in proc.stderr and "training prototxt" in proc.stderr
    no_loss = TRAINABLE.replace('type: "EuclideanLoss"', 'type: "Eltwise"').replace(
        'bottom: "label" top: "loss"', 'bottom: "fc" top: "loss"')
    model, weights = _float_model(tmp_path, no_loss, "n")
    proc = cli("train", _solver(tmp_path, model), "--weights", weights, cwd=tmp_path)
    assert proc.returncode == 1 and "no loss layer" in proc.stderr
    model, weights = _retrain(tmp_path, TRAINABLE, "t")
    proc = cli("train", _solver(tmp_path, model), cwd=tmp_path)
    assert proc.returncode == 1 and "no --weights" in proc.stderr and "--weights" in proc.stderr
    proc = cli("train", _solver(tmp_path, model), "--weights", weights, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------------
# (5) solvers
# ---------------------------------------------------------------------------------------------------------
def test_solver_command_writes_amct_rules_and_trains(tmp_path):
    model, weights = _retrain(tmp_path, TRAINABLE, "t")
    (tmp_path / "s").mkdir()
    proc = cli("solver", "--net", model, "--output", "s/solver.prototxt", "--max-iter", "3", "--test-iter",
               "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    param = caffe_pb2.SolverParameter()
    from google.protobuf import text_format

    text_format.Merge((tmp_path / "s" / "solver.prototxt").read_text(), param)
    assert param.net == model and os.path.isabs(param.net)
    assert (param.max_iter, param.snapshot, param.test_interval, list(param.test_iter)) == (3, 3, 3, [2])
    assert param.test_initialization is False and param.base_lr == pytest.approx(1e-4)
    snapshot = str(tmp_path / "s" / "solver_iter_3.caffemodel")
    assert snapshot in proc.stdout
    # it trains from any folder, and its snapshot is what save-retrain takes
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli("train", str(tmp_path / "s" / "solver.prototxt"), "--weights", weights, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(snapshot)


def test_train_help_shows_a_complete_solver(tmp_path):
    proc = cli("train", "--help", cwd=tmp_path)
    for field in ("net:", "max_iter:", "test_initialization: false", "snapshot: 1000", "test_interval:",
                  "amct-caffe solver"):
        assert field in proc.stdout, field
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "amct-caffe solver" in readme and "test_initialization: false" in readme


def test_solver_without_max_iter_or_with_unreachable_net(tmp_path):
    model, weights = _retrain(tmp_path, TRAINABLE, "t")
    proc = cli("train", _solver(tmp_path, model, extra=""), "--weights", weights, cwd=tmp_path)
    assert proc.returncode == 1 and "no max_iter" in proc.stderr
    sub = tmp_path / "sub"
    sub.mkdir()
    proc = cli("train", _solver(sub, "t_r.prototxt"), "--weights", weights, cwd=sub / "..")
    # relative to the working directory it exists: fine (Caffe's rule)
    assert proc.returncode == 0, proc.stderr
    other = tmp_path / "other"
    other.mkdir()
    proc = cli("train", str(sub / "solver.prototxt"), "--weights", weights, cwd=other)
    assert proc.returncode == 1
    assert "relative path" in proc.stderr and str(other) in proc.stderr and "absolute" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# (6) flags
# ---------------------------------------------------------------------------------------------------------
def _parse(*argv: str):
    parser = build_parser()
    return parser.parse_args(normalise_spellings(parser, list(argv)))


def test_amct_spellings_and_one_output_scheme():
    args = _parse("save-retrain", "--model", "m", "--weights", "w", "--save_type", "Both",
                  "--save_path=out/m")
    assert (args.save_type, args.save_path) == ("Both", "out/m")
    assert _parse("retrain-config", "--model", "m", "--weights", "w", "--output", "c.json",
                  "--config_defination", "q.cfg").config_defination == "q.cfg"
    assert _parse("run", "m.prototxt", "--gpu_id", "1").gpu == 1
    assert _parse("train", "s.prototxt", "--gpu_id", "0").gpu == 0
    assert _parse("compare", "--float-model", "a", "--float-weights", "b", "--fake-model", "c",
                  "--fake-weights", "d", "--output-dir", "r", "--batch_num", "3").batches == 3
    # calibration keeps AMCT's underscore names and accepts ours
    assert _parse("calibration", "--model", "m", "--weights", "w", "--save-path", "o/m").save_path == "o/m"
    # output flags: --output FILE, --output-dir DIR; the old spellings still work, hidden from --help
    assert _parse("run", "m.prototxt", "--save", "o.npz").output == "o.npz"
    assert _parse("run", "m.prototxt", "--output", "o.npz", "--output-dir", "d").output_dir == "d"
    assert _parse("compare", "--float-model", "a", "--float-weights", "b", "--fake-model", "c",
                  "--fake-weights", "d", "--output", "r").output_dir == "r"
    assert _parse("demo", "--output", "x").output_dir == "x"
    assert _parse("demo").output_dir.endswith("amct_caffe_demo") or _parse("demo").output_dir
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, hidden in (("run", "--save "), ("compare", "--output "), ("demo", "--output ")):
        assert hidden not in sub.choices[name].format_help(), name
    # values are never rewritten
    assert _parse("run", "m_a.prototxt", "--input", "data=x_y.npy").input == ["data=x_y.npy"]


def test_compare_still_requires_an_output_folder(tmp_path):
    proc = cli("compare", "--float-model", "a", "--float-weights", "b", "--fake-model", "c", "--fake-weights",
               "d", cwd=tmp_path)
    assert proc.returncode == 2 and "--output-dir" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# (8) noise
# ---------------------------------------------------------------------------------------------------------
def test_cli_screen_has_no_info_lines(tmp_path):
    model, weights = _float_model(tmp_path, TRAINABLE, "t")
    proc = cli("retrain-config", "--model", model, "--weights", weights, "--output", "c.json", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("wrote c.json")
    assert "INFO" not in proc.stderr
    assert "INFO" in (tmp_path / "amct_log" / "amct_caffe.log").read_text()  # the log file keeps them


def test_retrain_layers_without_clips_one_friendly_note(tmp_path, amct_log):
    model, weights = _retrain(tmp_path, TRAINABLE, "t")
    amct_log.clear()
    for _ in range(2):
        pycaffe.Net(model, weights, pycaffe.TEST)
    notes = [r.getMessage() for r in amct_log.records if "_act_retrain" in r.getMessage()]
    assert len(notes) == 1 and "IFMR sets their clip values on the first forward" in notes[0]
    assert "not found" not in notes[0] and amct_log.records[0].levelno <= logging.INFO


def test_batch_norm_upgrade_note_once_per_file(tmp_path, amct_log):
    path = tmp_path / "bn.prototxt"
    path.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
                    'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 0 } '
                    "param { lr_mult: 0 } param { lr_mult: 0 } }\n")
    for _ in range(3):
        load_prototxt(str(path))
    notes = [r for r in amct_log.records if "BatchNorm" in r.getMessage() and str(path) in r.getMessage()]
    assert len(notes) == 1


def test_no_negative_zero_in_logs(tmp_path):
    code = ("from amct_caffe.log import get_logger; import numpy as np; "
            "get_logger('t').info('clip_min %.9g, %s, %.3f', -0.0, np.float32(-0.0), -0.0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in _env().items() if not k.startswith("AMCT_LOG")}, timeout=60)
    line = next(line for line in proc.stderr.splitlines() if "clip_min" in line)
    assert line.endswith("clip_min 0, 0.0, 0.000") and "-0" not in line.split("[AMCT]:")[1]
    assert "-0" not in (tmp_path / "amct_log" / "amct_caffe.log").read_text().split("clip_min")[1]


# ---------------------------------------------------------------------------------------------------------
# (10) the demo with no optional package
# ---------------------------------------------------------------------------------------------------------
def test_demo_runs_without_optional_packages(tmp_path):
    code = ("import sys; sys.modules['h5py'] = None; sys.modules['sklearn'] = None; "
            "sys.modules['matplotlib'] = None; from amct_caffe.cli import main; "
            "sys.exit(main(['demo', '--output-dir', 'out', '--float-iters', '40', '--retrain-iters', '4']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib is not installed" in proc.stdout and "[7/7]" in proc.stdout
    results = tmp_path / "out" / "results"
    assert (results / "lenet_digits_deploy_weights.caffemodel").is_file()
    assert (results / "lenet_digits_ptq_deploy_weights.caffemodel").is_file()
    assert not list((tmp_path / "out" / "float").glob("*.h5"))  # the nets read MemoryData


def test_digits_ship_with_the_package():
    from amct_caffe.demo import digits

    images, labels = digits.digits_data()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    assert images.min() == 0.0 and images.max() == 1.0
    x, y = digits.memory_arrays("train", 0, 64)
    assert x.shape == (1472, 1, 8, 8)
    assert np.array_equal(x[1437:], x[:35]) and np.array_equal(y[1437:], y[:35])
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/*"' in pyproject


# ---------------------------------------------------------------------------------------------------------
# (9) progress where no bar shows
# ---------------------------------------------------------------------------------------------------------
def test_progress_lines():
    from amct_caffe.log import ProgressLines

    lines: list[str] = []
    progress = ProgressLines(3, "iteration", lines.append, every_s=0.0, enabled=True)
    for _ in range(3):
        progress.tick()
    assert [line.split(" (")[0] for line in lines] == ["iteration 1/3", "iteration 2/3", "iteration 3/3"]
    assert all(line.endswith("/s)") for line in lines)
    quiet = ProgressLines(3, "iteration", lines.append, every_s=3600.0, enabled=True)
    quiet.tick()
    off = ProgressLines(3, "iteration", lines.append, every_s=0.0, enabled=False)
    off.tick()
    assert len(lines) == 3
