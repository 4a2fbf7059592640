"""QAT and PTQ on a small net of fork layers: the depthwise convolutions quantize as Convolution with group,
the other fork layers stay float, and the saved fake-quant and deploy models agree as for other nets (each
quantized layer within 1 LSB of the next Quant's step, the outputs within 1e-3 of their magnitude)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import amct, caffe
from amct_caffe.analysis.compare import compare_models
from amct_caffe.engine.net import Net
from amct_caffe.errors import ConfigError, DuplicateLayerNameError
from amct_caffe.model.io import load_prototxt, prototxt_text, save_caffemodel
from amct_caffe.proto import caffe_pb2
from amct_caffe.workflows.inspect import inspect_net
from tests.helpers import deploy_view, parse_net
from tests.references.nets import synthetic_training_net

FORK_DEPLOY = """
name: "fork_quant"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
  bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "conv1" top: "dw"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
  bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn" type: "BN" bottom: "dw" top: "dw" bn_param { bn_mode: INFERENCE
  scale_filler { type: "constant" value: 0.8 } shift_filler { type: "constant" value: 0.1 } } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "dw" top: "shuffle"
  shuffle_channel_param { group: 2 } }
layer { name: "pool" type: "Pooling" bottom: "shuffle" top: "pool" top: "mask"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 ceil_mode: false } }
layer { name: "unpool" type: "Upsample" bottom: "pool" bottom: "mask" top: "unpool"
  upsample_param { scale: 2 } }
layer { name: "gap" type: "Pooling" bottom: "pool" top: "gap"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "axpy" type: "Axpy" bottom: "gap" bottom: "unpool" bottom: "shuffle" top: "axpy" }
layer { name: "dw2" type: "DepthwiseConvolution" bottom: "axpy" top: "dw2"
  convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
  bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "reorg" type: "Reorg" bottom: "dw2" top: "reorg" reorg_param { stride: 2 } }
layer { name: "interp" type: "Interp" bottom: "reorg" top: "interp" interp_param { zoom_factor: 2 } }
layer { name: "up" type: "Upsample" bottom: "interp" top: "up" upsample_param { scale: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "up" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.2 } } }
"""

DEPTHWISE = ("dw", "dw2")
FLOAT_FORK_LAYERS = {"bn": "BN", "shuffle": "ShuffleChannel", "unpool": "Upsample", "axpy": "Axpy",
                     "reorg": "Reorg", "interp": "Interp", "up": "Upsample"}


@pytest.fixture
def fork_model(tmp_path: Path) -> tuple[caffe_pb2.NetParameter, str, str]:
    deploy = parse_net(FORK_DEPLOY)
    torch.manual_seed(0)
    net = Net(deploy, caffe_pb2.TEST)
    weights = tmp_path / "fork.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    model = tmp_path / "fork.prototxt"
    model.write_text(FORK_DEPLOY)
    return deploy, str(model), str(weights)


def _check_saved_models(fake_m: str, fake_w: str, dep_m: str, dep_w: str) -> None:
    """The depthwise layers are quantized Convolutions with group, the fork layers stay as written, and the
    fake-quant and deploy models agree."""
    deploy_net = load_prototxt(dep_m)
    by_name = {layer.name: layer for layer in deploy_net.layer}
    for name in DEPTHWISE:
        assert by_name[name].type == "Convolution" and by_name[name].convolution_param.group == 8
        assert f"{name}_quant_layer" in by_name and f"{name}_dequant_layer" in by_name
    for name, kind in FLOAT_FORK_LAYERS.items():
        assert by_name[name].type == kind
        assert f"{name}_quant_layer" not in by_name
    probe = caffe.Net(fake_m, caffe.TEST)
    rng = np.random.default_rng(7)
    inputs = {name: rng.uniform(-1.0, 1.0, probe.blobs[name].data.shape).astype(np.float32)
              for name in probe.inputs}
    rows = compare_models(fake_m, fake_w, dep_m, dep_w, inputs)
    by_blob = {r.blob: r for r in rows}
    assert {r.blob for r in rows if r.kind == "accumulator"}, "the deploy net has integer layers"
    fake = caffe.Net(fake_m, fake_w, caffe.TEST)
    readers = {b for layer in fake.layers if layer.type == "Quant" for b in fake.bottom_names[layer.name]}
    checked = 0
    for layer in fake.layers:
        if layer.type != "DeQuant":
            continue
        top = fake.top_names[layer.name][0]
        if top in readers and by_blob[top].max_lsb is not None:
            assert by_blob[top].max_lsb <= 1.0, (top, by_blob[top])
            checked += 1
    assert checked >= 1
    fake_out = fake.forward(**inputs)
    for name in fake.outputs:
        scale = float(np.abs(fake_out[name]).max()) or 1.0
        assert by_blob[name].max_abs_diff <= 1e-3 * scale, (name, by_blob[name], scale)


def test_qat_on_a_net_with_fork_layers(fork_model, tmp_path):
    deploy, _, weights = fork_model
    train = tmp_path / "train.prototxt"
    train.write_text(prototxt_text(synthetic_training_net(deploy, 2, None)))
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_retrain_config(config, str(train), weights)
    listed = set(json.loads(Path(config).read_text()))
    assert {"conv1", "dw", "dw2", "conv2"} <= listed
    assert not listed & set(FLOAT_FORK_LAYERS)
    r_model, r_weights = str(tmp_path / "retrain.prototxt"), str(tmp_path / "retrain.caffemodel")
    amct.create_quant_retrain_model(str(train), weights, config, r_model, r_weights, record)
    param = caffe_pb2.SolverParameter(net=r_model, base_lr=0.01, lr_policy="fixed", momentum=0.9, max_iter=3,
                                      clip_gradients=1.0, random_seed=0, display=0,
                                      snapshot_prefix=str(tmp_path / "solver"))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(text_format.MessageToString(param))
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(r_weights)
    solver.solve()
    prefix = str(tmp_path / "out" / "fork")
    amct.save_quant_retrain_model(r_model, str(tmp_path / "solver_iter_3.caffemodel"), "Both", prefix, record,
                                  config)
    fake_m, dep_m = str(tmp_path / "fake.prototxt"), str(tmp_path / "deploy.prototxt")
    deploy_view(f"{prefix}_fake_quant_model.prototxt", deploy, fake_m)
    deploy_view(f"{prefix}_deploy_model.prototxt", deploy, dep_m)
    _check_saved_models(fake_m, f"{prefix}_fake_quant_weights.caffemodel",
                        dep_m, f"{prefix}_deploy_weights.caffemodel")


def test_ptq_on_a_net_with_fork_layers(fork_model, tmp_path):
    _, model, weights = fork_model
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, model, weights, batch_num=2)
    listed = set(json.loads(Path(config).read_text()))
    assert {"conv1", "dw", "dw2", "conv2"} <= listed
    graph = amct.init(config, model, weights, record)
    cal_model, cal_weights = str(tmp_path / "calibration.prototxt"), str(tmp_path / "calibration.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    net = caffe.Net(cal_model, caffe.TEST, weights=cal_weights)
    rng = np.random.default_rng(3)
    for _ in range(2):
        net.forward(data=rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    prefix = str(tmp_path / "out" / "fork")
    amct.save_model(graph, "Both", prefix)
    _check_saved_models(f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel",
                        f"{prefix}_deploy_model.prototxt", f"{prefix}_deploy_weights.caffemodel")


def test_convolution_depthwise_without_num_output_is_refused_with_the_fix(tmp_path):
    head = 'type: "ConvolutionDepthwise" bottom: "conv1" top: "dw"\n  convolution_param {'
    text = FORK_DEPLOY.replace(head + " num_output: 8", head)
    assert text != FORK_DEPLOY
    model = tmp_path / "no_num_output.prototxt"
    model.write_text(text)
    net = Net(parse_net(text), caffe_pb2.TEST)  # the engine runs it: num_output is ignored
    weights = tmp_path / "w.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    with pytest.raises(ConfigError, match="'dw'.*set num_output to the layer's input channel count"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(model), str(weights))


def test_quantization_refuses_duplicate_layer_names_naming_both(fork_model, tmp_path):
    _, _, weights = fork_model
    text = FORK_DEPLOY.replace('name: "interp"', 'name: "reorg"')
    model = tmp_path / "dup.prototxt"
    model.write_text(text)
    Net(parse_net(text), caffe_pb2.TEST)  # runs, as in Caffe
    expected = (r"two layers named 'reorg': layer 11 \(type Reorg\) and layer 12 \(type Interp\)"
                r".*rename one")
    with pytest.raises(DuplicateLayerNameError, match=expected):
        amct.create_quant_config(str(tmp_path / "c.json"), str(model), weights)
    with pytest.raises(DuplicateLayerNameError, match=expected):
        amct.create_quant_retrain_config(str(tmp_path / "q.json"), str(model), weights)


def test_inspect_shows_what_quantization_does_with_fork_layers(fork_model, tmp_path):
    _, model, _ = fork_model
    rows = {layer.name: layer for layer in inspect_net(model).layers}
    assert rows["dw"].type == "ConvolutionDepthwise" and rows["dw"].qat == "yes"
    assert rows["dw2"].qat == "yes" and rows["bn"].qat == "no" and rows["interp"].qat == "no"
    dup = tmp_path / "dup.prototxt"
    dup.write_text(FORK_DEPLOY.replace('name: "dw2"', 'name: "dw"'))
    rows_by_index = inspect_net(str(dup)).layers
    assert [r.qat for r in rows_by_index if r.name == "dw"] == ["no: another layer has this name (rename one "
                                                               "to quantize)"] * 2
    assert {r.name: r for r in rows_by_index}["conv2"].qat == "yes"
