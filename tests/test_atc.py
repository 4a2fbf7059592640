"""ATC-ready models (``for_atc`` / ``--atc-ready``): the inference view and ATC's type strings.

* the passes on small hand-written nets, each checked against an expected prototxt written by hand;
* the save functions (QAT save, convert_model, PTQ save_model) with ``for_atc``: the prototxts hold Input
  layers with the right shapes and no loss/accuracy; the fake-quant model in inference form computes what
  the AMCT-form one computes on the same input; the engine and the report run the results;
* the command line (``save-retrain --atc-ready``, then ``run`` and ``compare`` on the result).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amct_caffe import amct
from amct_caffe.caffe import pycaffe
from amct_caffe.engine.layers.registry import layer_class
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.errors import ConfigError
from amct_caffe.model.io import load_caffemodel
from amct_caffe.model.io import load_prototxt as load_prototxt_file
from amct_caffe.passes.atc import ATC_LAYER_TYPES, AtcUnsupportedLayerError, atc_net, inference_net
from amct_caffe.proto import caffe_pb2
from tests.helpers import parse_net, read_net

TEST = caffe_pb2.TEST
SRC = Path(__file__).resolve().parents[1] / "src"

# ---------------------------------------------------------------------------------------------------------
# the passes
# ---------------------------------------------------------------------------------------------------------
TRAIN_TEST = """
name: "n"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "train_lmdb" batch_size: 32 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        data_param { source: "test_lmdb" batch_size: 10 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop1" type: "Dropout" bottom: "conv1" top: "drop1" }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "drop1" top: "dw"
        convolution_param { num_output: 7 kernel_size: 3 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "dw" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
layer { name: "argmax" type: "ArgMax" bottom: "fc" top: "argmax" }
layer { name: "label_r" type: "Reshape" bottom: "label" top: "label_r" reshape_param { shape { dim: -1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label_r" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "argmax" bottom: "label" top: "acc" include { phase: TEST } }
"""
# By hand: the TEST data layer becomes an Input of 'data' only (label is read by loss/accuracy only); loss,
# accuracy and the label's Reshape (it reads the label, only the loss reads it) are removed; the ArgMax reads
# the prediction, so it stays as an output; the Dropout goes and 'dw' reads 'conv1'.
INFERENCE = """
name: "n"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "conv1" top: "dw"
        convolution_param { num_output: 7 kernel_size: 3 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "dw" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
layer { name: "argmax" type: "ArgMax" bottom: "fc" top: "argmax" }
"""
SHAPES = {"data": (1, 3, 9, 9)}


def test_inference_net_by_hand():
    result = inference_net(parse_net(TRAIN_TEST), SHAPES, "n.prototxt")
    assert result.net == parse_net(INFERENCE)
    assert result.inputs == {"data": (1, 3, 9, 9)}
    assert sorted(result.removed) == ["acc", "drop1", "label_r", "loss"]


def test_atc_net_grouped_convolution_from_the_weight():
    """The fork's weight is (C, 1, kh, kw): group = num_output = C = 4, whatever num_output said (7)."""
    result = atc_net(parse_net(TRAIN_TEST), SHAPES, {"dw": (4, 1, 3, 3), "fc": (10, 196)}, "n.prototxt")
    expected = parse_net(INFERENCE.replace(
        'type: "ConvolutionDepthwise" bottom: "conv1" top: "dw"\n        convolution_param { num_output: 7',
        'type: "Convolution" bottom: "conv1" top: "dw"\n        convolution_param { num_output: 4 group: 4'))
    assert result.net == expected
    assert result.retyped == {"dw": ("ConvolutionDepthwise", "Convolution")}
    # DepthwiseConvolution computes what Convolution computes with its own convolution_param: only the type
    # changes (here no group was written, so the rewritten layer has none either)
    result = atc_net(parse_net(TRAIN_TEST.replace("ConvolutionDepthwise", "DepthwiseConvolution")), SHAPES)
    dw = {layer.name: layer for layer in result.net.layer}["dw"]
    assert (dw.type, dw.convolution_param.num_output, dw.convolution_param.HasField("group")) == \
        ("Convolution", 7, False)


@pytest.mark.parametrize("old, new", [("DetectionOutput", "SSDDetectionOutput"), ("Region", "Yolo"),
                                      ("Detection", "Yolo")])
def test_atc_renames(old, new):
    text = f"""
    layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 1 dim: 8 }} }} }}
    layer {{ name: "head" type: "{old}" bottom: "x" top: "y" }}
    """
    result = atc_net(parse_net(text), {})
    assert [layer.type for layer in result.net.layer] == ["Input", new]
    assert result.retyped == {"head": (old, new)}
    assert result.inputs == {"x": (1, 8)}  # an Input keeps the shape it was written with


def test_atc_refuses_unsupported_layers_by_name():
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 8 } } }
    layer { name: "sw" type: "Swish" bottom: "x" top: "y" }
    layer { name: "mine" type: "MyLayer" bottom: "y" top: "z" }
    layer { name: "ok" type: "ReLU" bottom: "z" top: "z" }
    """
    with pytest.raises(AtcUnsupportedLayerError) as info:
        atc_net(parse_net(text), {}, path="m.prototxt")
    message = str(info.value)
    for word in ("m.prototxt", "'sw' (Swish)", "'mine' (MyLayer)", "ATC-ready"):
        assert word in message
    assert "'ok'" not in message
    assert inference_net(parse_net(text), {}).net.layer[1].type == "Swish"  # the inference view keeps it


def test_python_proposal_layer_gets_a_hint():
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 8 } } }
    layer { name: "proposal" type: "Python" bottom: "x" top: "rois"
            python_param { module: "rpn.proposal_layer" layer: "ProposalLayer"
                           param_str: "'feat_stride': 16" } }
    """
    with pytest.raises(AtcUnsupportedLayerError,
                       match=r"'proposal' \(Python\).*'Proposal' layer with proposal_param"):
        atc_net(parse_net(text), {})


def test_missing_input_shape_is_a_config_error():
    with pytest.raises(ConfigError, match=r"top 'data' of Data layer 'data'.*--input-shape"):
        inference_net(parse_net(TRAIN_TEST), {})


def test_atc_types_cover_amct_layers():
    assert {"Quant", "DeQuant", "AntiQuant", "Input", "SSDDetectionOutput"} <= ATC_LAYER_TYPES
    assert "DetectionOutput" not in ATC_LAYER_TYPES and "Dropout" not in ATC_LAYER_TYPES


def test_engine_runs_ssd_detection_output():
    assert layer_class("SSDDetectionOutput") is layer_class("DetectionOutput")


# ---------------------------------------------------------------------------------------------------------
# the save functions
# ---------------------------------------------------------------------------------------------------------
DUMMY = """layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 }
                           data_filler { type: "gaussian" std: 1 }
                           data_filler { type: "constant" value: 1 } } }"""
SMALL = 'name: "small"\n' + DUMMY + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop1" type: "Dropout" bottom: "conv1" top: "drop1" }
layer { name: "pool1" type: "Pooling" bottom: "drop1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
"""
TRAINING_ONLY = {"DummyData", "Dropout", "SoftmaxWithLoss", "Accuracy"}


def _retrained(folder: Path) -> tuple[str, str, str, str]:
    """SMALL as float model, its retrain model after one TRAIN forward (IFMR clips), the snapshot."""
    (folder / "m.prototxt").write_text(SMALL)
    net = Net(parse_net(SMALL), TEST)
    randomize_params(net, 1)
    net.save(folder / "m.caffemodel")
    amct.create_quant_retrain_config(str(folder / "c.json"), str(folder / "m.prototxt"),
                                     str(folder / "m.caffemodel"))
    amct.create_quant_retrain_model(str(folder / "m.prototxt"), str(folder / "m.caffemodel"),
                                    str(folder / "c.json"), str(folder / "r.prototxt"),
                                    str(folder / "r.caffemodel"), str(folder / "record.txt"))
    train = pycaffe.Net(str(folder / "r.prototxt"), str(folder / "r.caffemodel"), pycaffe.TRAIN)
    train.forward()
    train.save(str(folder / "t.caffemodel"))
    return str(folder / "m.prototxt"), str(folder / "m.caffemodel"), str(folder / "r.prototxt"), \
        str(folder / "t.caffemodel")


def _check_inference_prototxt(path: str | Path, shape: list[int], atc: bool) -> caffe_pb2.NetParameter:
    net = read_net(path)
    types = [layer.type for layer in net.layer]
    assert types[0] == "Input" and list(net.layer[0].top) == ["data"]
    assert list(net.layer[0].input_param.shape[0].dim) == shape
    assert not TRAINING_ONLY & set(types), types
    assert not any(layer.include or layer.exclude for layer in net.layer)
    assert {layer.name: layer for layer in net.layer}["pool1"].bottom[0] != "drop1"
    if atc:
        assert set(types) <= ATC_LAYER_TYPES
    return net


def test_save_quant_retrain_model_for_atc(tmp_path):
    _, _, model, weights = _retrained(tmp_path)
    plain, ready = tmp_path / "plain" / "m", tmp_path / "atc" / "m"
    amct.save_quant_retrain_model(model, weights, "Both", str(plain), str(tmp_path / "r1.txt"))
    amct.save_quant_retrain_model(model, weights, "Both", str(ready), str(tmp_path / "r2.txt"), for_atc=True)
    # the DummyData's batch is 4; the Input gets batch 1 (from the data layer built alone at batch 1)
    _check_inference_prototxt(f"{ready}_fake_quant_model.prototxt", [1, 3, 8, 8], atc=False)
    _check_inference_prototxt(f"{ready}_deploy_model.prototxt", [1, 3, 8, 8], atc=True)
    # the caffemodels are those of the AMCT-form save
    for suffix in ("_fake_quant_weights.caffemodel", "_deploy_weights.caffemodel"):
        assert load_caffemodel(f"{plain}{suffix}") == load_caffemodel(f"{ready}{suffix}")
    # same input, same outputs: the inference form changes no computation (Dropout is the identity in TEST)
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)  # the label's batch
    ours = pycaffe.Net(f"{ready}_fake_quant_model.prototxt", f"{ready}_fake_quant_weights.caffemodel",
                       pycaffe.TEST)
    ours.blobs["data"].reshape(4, 3, 8, 8)
    out = ours.forward(data=x)
    assert list(out) == ["fc"]
    theirs = pycaffe.Net(f"{plain}_fake_quant_model.prototxt", f"{plain}_fake_quant_weights.caffemodel",
                         pycaffe.TEST)
    theirs.blobs["data"].data[...] = x
    theirs.forward(start="conv1_quant_layer")
    np.testing.assert_array_equal(out["fc"], theirs.blobs["fc"].data)


def test_given_input_shape_and_argument_checks(tmp_path):
    _, _, model, weights = _retrained(tmp_path)
    out = tmp_path / "o" / "m"
    amct.save_quant_retrain_model(model, weights, "Deploy", str(out), str(tmp_path / "r.txt"), for_atc=True,
                                  input_shape={"data": (2, 3, 8, 8)})
    _check_inference_prototxt(f"{out}_deploy_model.prototxt", [2, 3, 8, 8], atc=True)
    with pytest.raises(ConfigError, match="for_atc=True"):
        amct.save_quant_retrain_model(model, weights, "Deploy", str(out), None, input_shape={"data": (1,)})
    with pytest.raises(ConfigError, match="for_atc must be True or False"):
        amct.save_quant_retrain_model(model, weights, "Deploy", str(out), None, for_atc="yes")
    with pytest.raises(ConfigError, match="not a shape"):
        amct.save_quant_retrain_model(model, weights, "Deploy", str(out), None, for_atc=True,
                                      input_shape={"data": (1, 0)})
    with pytest.raises(ConfigError, match="'nope'"):
        amct.save_quant_retrain_model(model, weights, "Deploy", str(tmp_path / "x" / "m"), None,
                                      for_atc=True, input_shape={"nope": (1, 3)})
    assert not (tmp_path / "x").exists()


def test_unsupported_layer_writes_nothing(tmp_path):
    """A layer ATC does not convert (Swish): a named error, no file; without for_atc the save works."""
    text = SMALL.replace('layer { name: "relu1" type: "ReLU"', 'layer { name: "relu1" type: "Swish"')
    (tmp_path / "m.prototxt").write_text(text)
    net = Net(parse_net(text), TEST)
    randomize_params(net, 2)
    net.save(tmp_path / "m.caffemodel")
    record = tmp_path / "rec.txt"
    record.write_text('record { key: "fc" value { scale_d: 0.05 offset_d: -10 scale_w: 0.01 offset_w: 0 } '
                      "}\n")
    with pytest.raises(AtcUnsupportedLayerError, match=r"'relu1' \(Swish\)"):
        amct.convert_model(str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), str(record),
                           str(tmp_path / "out" / "m"), for_atc=True)
    assert not (tmp_path / "out").exists()
    amct.convert_model(str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), str(record),
                       str(tmp_path / "out" / "m"))
    assert read_net(tmp_path / "out" / "m_deploy_model.prototxt").layer[0].type == "DummyData"


def test_convert_model_for_atc_with_record_shape(tmp_path):
    """A Data layer whose source is absent: the Input shape comes from the record (conv1 reads 'data')."""
    text = SMALL.replace(
        DUMMY,
        'layer { name: "data" type: "Data" top: "data" top: "label" '
        'data_param { source: "absent_lmdb" batch_size: 8 backend: LMDB } }')
    (tmp_path / "m.prototxt").write_text(text)
    net = Net(parse_net(SMALL), TEST)
    randomize_params(net, 4)
    net.save(tmp_path / "m.caffemodel")
    record = tmp_path / "rec.txt"
    record.write_text(
        'record { key: "conv1" value { scale_d: 0.02 offset_d: 0 scale_w: 0.01 scale_w: 0.01 scale_w: 0.01 '
        "scale_w: 0.01 offset_w: 0 offset_w: 0 offset_w: 0 offset_w: 0 channels: 3 height: 8 width: 8 } }\n")
    amct.convert_model(str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), str(record),
                       str(tmp_path / "out" / "m"), for_atc=True)
    _check_inference_prototxt(tmp_path / "out" / "m_deploy_model.prototxt", [1, 3, 8, 8], atc=True)
    deploy = Net(str(tmp_path / "out" / "m_fake_quant_model.prototxt"), TEST,
                 weights=str(tmp_path / "out" / "m_fake_quant_weights.caffemodel"))
    assert deploy.inputs == ["data"]


def test_ptq_save_model_for_atc(tmp_path):
    """PTQ on an Input net with a TEST Accuracy on a DummyData label: the label layer goes entirely."""
    text = SMALL.replace(DUMMY, """
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "lab" type: "DummyData" top: "label"
        dummy_data_param { shape { dim: 2 } data_filler { type: "constant" value: 1 } } }""")
    (tmp_path / "m.prototxt").write_text(text)
    net = Net(parse_net(text), TEST)
    randomize_params(net, 5)
    net.save(tmp_path / "m.caffemodel")
    files = {k: str(tmp_path / v) for k, v in (("cfg", "c.json"), ("model", "m.prototxt"),
                                               ("weights", "m.caffemodel"), ("rec", "rec.txt"))}
    amct.create_quant_config(files["cfg"], files["model"], files["weights"])
    graph = amct.init(files["cfg"], files["model"], files["weights"], files["rec"])
    amct.quantize_model(graph, str(tmp_path / "cal.prototxt"), str(tmp_path / "cal.caffemodel"))
    cal = pycaffe.Net(str(tmp_path / "cal.prototxt"), str(tmp_path / "cal.caffemodel"), pycaffe.TEST)
    cal.forward(data=np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    amct.save_model(graph, "Both", str(tmp_path / "out" / "m"), for_atc=True)
    deploy = read_net(tmp_path / "out" / "m_deploy_model.prototxt")
    assert [layer.name for layer in deploy.layer if layer.type == "Input"] == ["in"]
    assert list(deploy.layer[0].input_param.shape[0].dim) == [2, 3, 8, 8]  # as the Input was written
    assert not {"lab", "loss", "acc", "drop1"} & {layer.name for layer in deploy.layer}
    assert json.loads((tmp_path / "out" / "m_quant.json").read_text())["quantized_layers"]


def test_accuracy_based_auto_calibration_for_atc(tmp_path):
    """The goal is met at once (plain PTQ); the saved models are written in ATC-ready form."""
    from amct_caffe.common.auto_calibration import AutoCalibrationEvaluatorBase

    layers = SMALL.replace(DUMMY, 'layer { name: "in" type: "Input" top: "data" '
                                  'input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }').splitlines()
    text = "\n".join(line for line in layers if '"label"' not in line)  # no loss, no accuracy
    (tmp_path / "m.prototxt").write_text(text)
    net = Net(parse_net(text), TEST)
    randomize_params(net, 8)
    net.save(tmp_path / "m.caffemodel")
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)

    class Evaluator(AutoCalibrationEvaluatorBase):
        def calibration(self, model_file: str, weights_file: str) -> None:
            pycaffe.Net(model_file, weights_file, pycaffe.TEST).forward(data=x)

        def evaluate(self, model_file: str, weights_file: str) -> float:
            return 1.0

        def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
            return True, 0.0

    model, weights = str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel")
    amct.create_quant_config(str(tmp_path / "c.json"), model, weights)
    amct.accuracy_based_auto_calibration(model, weights, Evaluator(), str(tmp_path / "c.json"),
                                         str(tmp_path / "out" / "rec.txt"), str(tmp_path / "out" / "m"),
                                         for_atc=True)
    deploy = read_net(tmp_path / "out" / "m_deploy_model.prototxt")
    assert deploy.layer[0].type == "Input" and "Dropout" not in {layer.type for layer in deploy.layer}
    assert {layer.type for layer in deploy.layer} <= ATC_LAYER_TYPES


# ---------------------------------------------------------------------------------------------------------
# the command line: save-retrain --atc-ready, run and compare on the result
# ---------------------------------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "amct_caffe.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_atc_ready_run_and_compare(tmp_path):
    float_model, float_weights, model, weights = _retrained(tmp_path)
    proc = _cli("save-retrain", "--model", model, "--weights", weights, "--save_type", "Both", "--save_path",
                "out/m", "--atc-ready", "--input-shape", "data:1,3,8,8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "record.txt") in proc.stdout  # the record the retrain model names
    _check_inference_prototxt(tmp_path / "out" / "m_deploy_model.prototxt", [1, 3, 8, 8], atc=True)
    np.save(tmp_path / "x.npy", np.ones((1, 3, 8, 8), np.float32))
    proc = _cli("run", "out/m_fake_quant_model.prototxt", "--weights", "out/m_fake_quant_weights.caffemodel",
                "--input", "data=x.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fc: shape (1, 5)" in proc.stdout
    # the float model reads its DummyData; the inference-form models are fed what it read
    proc = _cli("compare", "--float-model", float_model, "--float-weights", float_weights,
                "--fake-model", "out/m_fake_quant_model.prototxt",
                "--fake-weights", "out/m_fake_quant_weights.caffemodel",
                "--deploy-model", "out/m_deploy_model.prototxt",
                "--deploy-weights", "out/m_deploy_weights.caffemodel", "--output", "report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["inputs"] == "data layers"
    fc = {entry["layer"]: entry for entry in report["layers"]}["fc"]
    assert fc["float_vs_fake"]["cosine"] > 0.9 and fc["fake_vs_deploy"]["cosine"] > 0.99
    proc = _cli("save-retrain", "--model", model, "--weights", weights, "--save-type", "Both",
                "--save-path", "out2/m", "--input-shape", "data:1,3,8,8", cwd=tmp_path)
    assert proc.returncode == 1 and "--atc-ready" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# bundled and shared nets
# ---------------------------------------------------------------------------------------------------------
def test_bundled_digits_train_test_net(tmp_path):
    """The demo's train/test net (MemoryData, SoftmaxWithLoss, TEST Accuracy) through convert_model with
    for_atc: Input 1x1x8x8 from the MemoryData parameters; the inference-form fake-quant model classifies the
    held-out images exactly as the AMCT-form one does (digits.evaluate feeds both)."""
    from amct_caffe.demo import digits
    from amct_caffe.model.io import prototxt_text

    net = digits.train_test_net("", "", feed="memory")
    (tmp_path / "m.prototxt").write_text(prototxt_text(net))
    float_net = Net(digits.input_fed_net(str(tmp_path / "m.prototxt"), 1), TEST)
    randomize_params(float_net, 6)
    float_net.save(tmp_path / "m.caffemodel")
    record = tmp_path / "rec.txt"
    record.write_text('record { key: "ip2" value { scale_d: 0.02 offset_d: -3 scale_w: 0.004 offset_w: 0 } '
                      "}\n")
    args = (str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"), str(record))
    amct.convert_model(*args, str(tmp_path / "plain" / "m"))
    amct.convert_model(*args, str(tmp_path / "atc" / "m"), for_atc=True)
    deploy = _check_inference_prototxt(tmp_path / "atc" / "m_deploy_model.prototxt", [1, 1, 8, 8], atc=True)
    assert [layer.name for layer in deploy.layer][-1] == "ip2_dequant_layer"  # the scores are the output
    fake = [f"{tmp_path}/{form}/m_fake_quant_model.prototxt" for form in ("plain", "atc")]
    weights = f"{tmp_path}/plain/m_fake_quant_weights.caffemodel"
    accuracies = [digits.evaluate(model, weights, batch_size=60) for model in fake]
    assert accuracies[0] == accuracies[1]


def test_mobilenet_ssd_atc_view_runs_in_the_engine(shared_models):
    """MobileNet-SSD's deploy prototxt: DetectionOutput becomes SSDDetectionOutput, every type is ATC's,
    and the engine computes the same detections from both prototxts."""
    path = shared_models / "mobilenet_ssd" / "MobileNetSSD_deploy.prototxt"
    original = load_prototxt_file(path)
    result = atc_net(original, {}, path=str(path))
    assert result.retyped == {"detection_out": ("DetectionOutput", "SSDDetectionOutput")}
    assert {layer.type for layer in result.net.layer} <= ATC_LAYER_TYPES
    nets = [Net(original, TEST), Net(result.net, TEST)]
    randomize_params(nets[0], 7)
    params = nets[0].to_proto()
    nets[1].copy_from(params)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, 3, 300, 300)).astype(np.float32))
    outs = []
    for net in nets:
        net.set_tensor("data", x)
        net.run()
        outs.append(net.tensor("detection_out").detach().numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
