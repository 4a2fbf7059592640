"""``amct_caffe calibration`` / ``amct-caffe calibration``: AMCT's command with a data folder of raw .bin
batches (or an evaluator script), ``--key=value`` and ``--key value``; bad data -> one error line, exit 1,
nothing written. The record's activation factors are checked against a numpy IFMR over the files' data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import cli
from amct_caffe.errors import CalibrationDataError, ConfigError
from amct_caffe.workflows.calibration_run import parse_data_types, parse_input_shape
from tests.helpers import read_net, read_record
from tests.references import quant
from tests.references.nets import write_random_net

OUTPUTS = ["m_fake_quant_model.prototxt", "m_fake_quant_weights.caffemodel", "m_deploy_model.prototxt",
           "m_deploy_weights.caffemodel", "m_quant.json", "m_quant_config.json", "m_scale_offset_record.txt"]
SRC = Path(__file__).resolve().parents[1] / "src"


def write_bins(folder: Path, count: int, dtype: str = "float32", shape=(2, 3, 6, 6), seed: int = 3) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        if dtype == "uint8":
            x = rng.integers(0, 256, shape).astype(np.uint8)
        else:
            x = (rng.standard_normal(shape) * (i + 1)).astype(dtype)
        x.tofile(folder / f"batch_{i:03d}.bin")
        arrays.append(x)
    (folder / "notes.txt").write_text("not a batch")  # only .bin files count
    return arrays


def run(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main_amct(["calibration", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("form", ["equals", "space"])
def test_calibration_from_bin_files(tmp_path, capsys, form):
    model, weights = write_random_net(tmp_path)
    data = write_bins(tmp_path / "bins", 4)
    options = {"--model": model, "--weights": weights, "--save_path": str(tmp_path / "out" / "m"),
               "--input_shape": "data:2,3,6,6", "--data_dir": str(tmp_path / "bins"),
               "--data_types": "float32", "--batch_num": "3"}
    args = ([f"{k}={v}" for k, v in options.items()] if form == "equals"
            else [x for kv in options.items() for x in kv])
    code, err = run(args, capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == sorted(OUTPUTS)
    record = read_record(tmp_path / "out" / "m_scale_offset_record.txt")
    ref = quant.ifmr(np.concatenate([x.ravel() for x in data[:3]]))  # the first 3 files, by name
    assert ref.gap > 1e-9
    assert (np.float32(record["conv1"].scale_d), record["conv1"].offset_d) == (ref.s, ref.o)
    assert set(record) == {"conv1", "pool1", "conv2a", "conv2b", "ip1"}
    assert all(r.HasField("scale_d") for r in record.values())
    import json

    assert json.loads((tmp_path / "out" / "m_quant_config.json").read_text())["batch_num"] == 3
    deploy = read_net(tmp_path / "out" / "m_deploy_model.prototxt")
    assert any(layer.type == "Quant" for layer in deploy.layer)


def test_uint8_data_cfg_batch_num_and_folder_save_path(tmp_path, capsys):
    model, weights = write_random_net(tmp_path)
    data = write_bins(tmp_path / "bins", 2, "uint8")
    cfg = tmp_path / "quant.cfg"
    cfg.write_text("batch_num: 2\nactivation_offset: true\n")
    (tmp_path / "results").mkdir()
    code, err = run(["--model", model, "--weights", weights, "--save_path", str(tmp_path / "results"),
                     "--input_shape", "data:2,3,6,6", "--data_dir", str(tmp_path / "bins"), "--data_types",
                     "uint8", "--calibration_config", str(cfg)], capsys)
    assert code == 0, err
    # a folder as save_path: the model file's name is the prefix
    record = read_record(tmp_path / "results" / "model_scale_offset_record.txt")
    ref = quant.ifmr(np.concatenate([x.astype(np.float32).ravel() for x in data]))
    assert (np.float32(record["conv1"].scale_d), record["conv1"].offset_d) == (ref.s, ref.o)


BAD = [
    ("wrong size", lambda d: (d / "bins" / "batch_001.bin").write_bytes(b"\0" * 100),
     ["batch_001.bin", "100 bytes", "864 bytes", "float32"]),
    ("too few files", lambda d: os.remove(d / "bins" / "batch_002.bin"),
     ["2 .bin file(s)", "batch_num is 3"]),
    ("no folder", lambda d: os.rename(d / "bins", d / "other"), ["does not exist"]),
]


@pytest.mark.parametrize("name, edit, words", BAD, ids=[b[0] for b in BAD])
def test_bad_data_dir_writes_nothing(tmp_path, capsys, name, edit, words):
    model, weights = write_random_net(tmp_path)
    write_bins(tmp_path / "bins", 3)
    edit(tmp_path)
    code, err = run(["--model", model, "--weights", weights, "--save_path", str(tmp_path / "out" / "m"),
                     "--input_shape", "data:2,3,6,6", "--data_dir", str(tmp_path / "bins"), "--data_types",
                     "float32", "--batch_num", "3"], capsys)
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("amct_caffe: error: ")]
    assert len(line) == 1, err
    for word in words:
        assert word in line[0], (word, line[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [
    (["--input_shape", "label:2,3,6,6"], ["label", "not input blobs"]),
    (["--input_shape", "data:2,3,x"], ["--input_shape", "name:n,c,h,w"]),
    (["--data_types", "float32;float32"], ["--data_types gives 2"]),
    (["--data_types", "complex64"], ["complex64", "not a supported"]),
    (["--evaluator", "e.py"], ["--evaluator cannot be combined"]),
    (["--batch_num", "0"], None),  # argparse: usage error, exit 2
])
def test_bad_options(tmp_path, capsys, args, words):
    model, weights = write_random_net(tmp_path)
    write_bins(tmp_path / "bins", 1, shape=(2, 3, 6, 6))
    options = {"--model": model, "--weights": weights, "--save_path": str(tmp_path / "out" / "m"),
               "--input_shape": "data:2,3,6,6", "--data_dir": str(tmp_path / "bins"),
               "--data_types": "float32"}
    for key, value in zip(args[::2], args[1::2]):
        options[key] = value
    argv = [x for kv in options.items() for x in kv]
    if words is None:
        with pytest.raises(SystemExit) as info:
            cli.main_amct(["calibration", *argv])
        assert info.value.code == 2
        return
    code, err = run(argv, capsys)
    assert code == 1
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()


EVALUATOR = """
import numpy as np
from amct_caffe import caffe

class Evaluator:
    def calibration(self, model_file, weights_file):
        net = caffe.Net(model_file, caffe.TEST, weights=weights_file)
        for i in range(2):
            net.forward(data=np.load(DATA)[i])

evaluator = Evaluator()
"""


def test_evaluator_script(tmp_path, capsys):
    model, weights = write_random_net(tmp_path)
    rng = np.random.default_rng(4)
    data = rng.standard_normal((2, 2, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "data.npy", data)
    script = tmp_path / "evaluator.py"
    script.write_text(f"DATA = {str(tmp_path / 'data.npy')!r}\n" + EVALUATOR)
    code, err = run(["--model", model, "--weights", weights, "--save_path", str(tmp_path / "out" / "m"),
                     "--evaluator", str(script), "--batch_num", "2"], capsys)
    assert code == 0, err
    record = read_record(tmp_path / "out" / "m_scale_offset_record.txt")
    ref = quant.ifmr(data.ravel())
    assert (np.float32(record["conv1"].scale_d), record["conv1"].offset_d) == (ref.s, ref.o)
    (tmp_path / "empty.py").write_text("x = 1\n")
    code, err = run(["--model", model, "--weights", weights, "--save_path", str(tmp_path / "o2" / "m"),
                     "--evaluator", str(tmp_path / "empty.py")], capsys)
    assert code == 1 and "defines no evaluator" in err and not (tmp_path / "o2").exists()


def test_evaluator_running_too_few_batches_is_a_record_error(tmp_path, capsys):
    model, weights = write_random_net(tmp_path)
    np.save(tmp_path / "data.npy", np.zeros((2, 2, 3, 6, 6), np.float32))
    script = tmp_path / "evaluator.py"
    script.write_text(f"DATA = {str(tmp_path / 'data.npy')!r}\n" + EVALUATOR)
    code, err = run(["--model", model, "--weights", weights, "--save_path", str(tmp_path / "out" / "m"),
                     "--evaluator", str(script), "--batch_num", "3"], capsys)
    assert code == 1 and "calibration has not run" in err and not (tmp_path / "out").exists()


def test_amct_caffe_spelling_in_a_subprocess(tmp_path):
    model, weights = write_random_net(tmp_path)
    write_bins(tmp_path / "bins", 1)
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               AMCT_LOG_LEVEL="ERROR")
    proc = subprocess.run([sys.executable, "-m", "amct_caffe.cli", "calibration", f"--model={model}",
                           "--weights", weights, f"--save_path={tmp_path / 'out' / 'm'}",
                           "--input_shape=data:2,3,6,6", f"--data_dir={tmp_path / 'bins'}", "--data_types",
                           "float32"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "calibration done" in proc.stdout and sorted(os.listdir(tmp_path / "out")) == sorted(OUTPUTS)


def test_parsers():
    assert parse_input_shape("data:1,3,224,224;im_info:1,3") == [("data", (1, 3, 224, 224)),
                                                                  ("im_info", (1, 3))]
    assert parse_input_shape("ns:data:2,2") == [("ns:data", (2, 2))]
    assert [d.name for d in parse_data_types("float32;uint8", 2)] == ["float32", "uint8"]
    for text in ("data", "data:", ":1,2", "data:1,-2", "a:1;a:2", "data:1;"):
        with pytest.raises(ConfigError):
            parse_input_shape(text)
    assert issubclass(CalibrationDataError, ConfigError)


REFINE_NET = """
name: "refine"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { num_output: 3 } }
"""


def test_refine_equalization_and_end_to_end_from_the_command_line(tmp_path, capsys):
    import json

    model, weights = write_random_net(tmp_path, REFINE_NET)
    write_bins(tmp_path / "bins", 2)
    base = ["--model", model, "--weights", weights, "--input_shape", "data:2,3,6,6", "--data_dir",
            str(tmp_path / "bins"), "--data_types", "float32", "--batch_num", "2"]
    code, err = run([*base, "--save_path", str(tmp_path / "plain" / "m")], capsys)
    assert code == 0, err
    out = str(tmp_path / "out" / "m")
    code, err = run([*base, "--save_path", out, "--refine", "equalization, end_to_end"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == sorted(OUTPUTS)
    info = json.loads((tmp_path / "out" / "m_quant.json").read_text())
    assert [(e["producer"], e["consumer"]) for e in info["equalizations"]] == [("conv1", "ip")]
    plain = (tmp_path / "plain" / "m_deploy_weights.caffemodel").read_bytes()
    assert (tmp_path / "out" / "m_deploy_weights.caffemodel").read_bytes() != plain
    # the record file written beside the models is the calibration's, as without --refine
    assert (tmp_path / "out" / "m_scale_offset_record.txt").read_text() == \
        (tmp_path / "plain" / "m_scale_offset_record.txt").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--refine", "equalize"], "refine must be None"),
    (["--refine", "adaround,end_to_end"], "at most one of"),
    (["--refine", "equalization,,end_to_end"], "empty name"),
])
def test_bad_refine_writes_nothing(tmp_path, capsys, extra, words):
    model, weights = write_random_net(tmp_path)
    write_bins(tmp_path / "bins", 1)
    code, err = run(["--model", model, "--weights", weights, "--save_path", str(tmp_path / "out" / "m"),
                     "--input_shape", "data:2,3,6,6", "--data_dir", str(tmp_path / "bins"),
                     "--data_types", "float32", *extra], capsys)
    assert code != 0 and words in err, err
    assert not (tmp_path / "out").exists()


def test_refine_with_an_evaluator_is_refused(tmp_path, capsys):
    model, weights = write_random_net(tmp_path)
    script = tmp_path / "evaluator.py"
    script.write_text("class Evaluator:\n    def calibration(self, model, weights):\n        pass\n")
    code, err = run(["--model", model, "--weights", weights, "--save_path", str(tmp_path / "out" / "m"),
                     "--evaluator", str(script), "--refine", "end_to_end"], capsys)
    assert code == 1 and "--refine" in err and "--evaluator" in err, err
    assert not (tmp_path / "out").exists()
