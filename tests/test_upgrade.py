"""Upgrading old net formats (V0, V1, net inputs, BatchNorm params) as Caffe's UpgradeNetAsNeeded does.

Expected values are written by hand from the files under the sibling shared/models and from the nets built
here; the reference Caffe (when installed) checks the upgraded view it builds itself.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import ModelFormatError, UnsupportedLayerError
from amct_caffe.log import forget_logged_once
from amct_caffe.model.io import load_caffemodel, load_prototxt, prototxt_text
from amct_caffe.model.upgrade import upgrade_net
from amct_caffe.proto import caffe_pb2

V1 = caffe_pb2.V1LayerParameter


def _parse(text: str) -> caffe_pb2.NetParameter:
    return text_format.Merge(text, caffe_pb2.NetParameter())


def _upgraded(text: str, path: str = "test.prototxt") -> caffe_pb2.NetParameter:
    net = _parse(text)
    upgrade_net(net, path)
    return net


def _by_name(net: caffe_pb2.NetParameter) -> dict[str, caffe_pb2.LayerParameter]:
    return {lp.name: lp for lp in net.layer}


def _params(lp: caffe_pb2.LayerParameter) -> list[dict[str, object]]:
    """The ParamSpecs as dicts of only the fields that are set."""
    return [{fd.name: value for fd, value in spec.ListFields()} for spec in lp.param]


@pytest.fixture
def upgrade_log():
    """Records of the amct_caffe.model.upgrade logger (the package logger does not propagate to root)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    forget_logged_once()  # the upgrade notes come once per file and process; other tests read these files
    logger = logging.getLogger("amct_caffe.model.upgrade")
    handler = _Keep(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- V1 -> V2: the type table ----------------------------------------------------------------------------

# Caffe's UpgradeV1LayerType, written out by hand.
EXPECTED_V2_TYPE = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DATA": "Data",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}


def test_every_v1_enum_value_has_an_expected_type():
    names = {v.name for v in V1.DESCRIPTOR.enum_types_by_name["LayerType"].values}
    assert names - {"NONE"} == set(EXPECTED_V2_TYPE)


@pytest.mark.parametrize("enum_name", sorted(EXPECTED_V2_TYPE))
def test_v1_type_upgrades_to_v2_string(enum_name):
    net = _upgraded(f'layers {{ name: "l" type: {enum_name} bottom: "a" top: "b" }}')
    assert len(net.layers) == 0
    assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in net.layer] == [
        ("l", EXPECTED_V2_TYPE[enum_name], ["a"], ["b"])
    ]


@pytest.mark.parametrize("type_line", ["type: NONE", ""])
def test_v1_layer_without_a_type_is_an_error(type_line):
    text = f'layers {{ name: "ok" type: RELU }} layers {{ name: "typeless" {type_line} bottom: "x" }}'
    with pytest.raises(ModelFormatError) as info:
        _upgraded(text, "old_net.prototxt")
    assert "typeless" in str(info.value)
    assert "old_net.prototxt" in str(info.value)


def test_every_v1_param_message_is_copied():
    v1_params = [f.name for f in V1.DESCRIPTOR.fields
                 if f.name.endswith("_param") and f.message_type is not None]
    assert len(v1_params) == 30  # the 30 per-type messages of BVLC's V1LayerParameter
    net = caffe_pb2.NetParameter()
    layer = net.layers.add(name="all", type=V1.RELU)
    for name in v1_params:
        getattr(layer, name).SetInParent()
    layer.convolution_param.num_output = 7
    layer.threshold_param.threshold = 0.25
    upgrade_net(net, "mem")
    lp = net.layer[0]
    assert sorted(fd.name for fd, _ in lp.ListFields() if fd.name.endswith("_param")) == sorted(v1_params)
    assert lp.convolution_param.num_output == 7
    assert lp.threshold_param.threshold == 0.25


# -- V1 -> V2: everything a layer carries ------------------------------------------------------------------

V1_TRAIN_NET = """
name: "v1train"
layers {
  name: "data" type: DATA top: "data" top: "label"
  data_param { source: "db" batch_size: 4 scale: 0.00390625 mean_file: "mean.binaryproto" crop_size: 20
               mirror: true }
  include { phase: TRAIN }
}
layers {
  name: "idata" type: IMAGE_DATA top: "data" top: "label"
  image_data_param { source: "list.txt" batch_size: 2 crop_size: 8 }
  transform_param { scale: 2 mean_value: 104 }
  include { phase: TEST }
}
layers {
  name: "wdata" type: WINDOW_DATA top: "wd" top: "wl"
  window_data_param { source: "w.txt" batch_size: 3 }
  exclude { stage: "deploy" }
}
layers {
  name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  param: "cw" param: "cb" blob_share_mode: PERMISSIVE
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 3 kernel_size: 3 }
}
layers {
  name: "ip" type: INNER_PRODUCT bottom: "conv" top: "ip"
  blobs_lr: 1 blobs_lr: 2 blobs_lr: 3 weight_decay: 5
  inner_product_param { num_output: 2 }
}
layers {
  name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss"
  loss_weight: 2 loss_param { ignore_label: 1 normalize: false }
}
layers {
  name: "acc" type: ACCURACY bottom: "ip" bottom: "label" top: "acc"
  accuracy_param { top_k: 2 } include { phase: TEST }
}
"""


def test_v1_layers_keep_everything(upgrade_log):
    net = _upgraded(V1_TRAIN_NET, "train_v1.prototxt")
    assert len(net.layers) == 0
    assert net.name == "v1train"
    assert [(lp.name, lp.type) for lp in net.layer] == [
        ("data", "Data"), ("idata", "ImageData"), ("wdata", "WindowData"), ("conv", "Convolution"),
        ("ip", "InnerProduct"), ("loss", "SoftmaxWithLoss"), ("acc", "Accuracy"),
    ]
    layers = _by_name(net)

    data = layers["data"]
    assert list(data.top) == ["data", "label"]
    assert [r.phase for r in data.include] == [caffe_pb2.TRAIN]
    # The old transformation fields moved into transform_param and left data_param.
    assert (data.data_param.source, data.data_param.batch_size) == ("db", 4)
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        assert not data.data_param.HasField(field)
    t = data.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.00390625, "mean.binaryproto", 20, True)

    idata = layers["idata"]
    assert (idata.image_data_param.source, idata.image_data_param.batch_size) == ("list.txt", 2)
    assert not idata.image_data_param.HasField("crop_size")
    # Its own transform_param keeps scale and mean_value and gains crop_size.
    assert (idata.transform_param.scale, list(idata.transform_param.mean_value)) == (2.0, [104.0])
    assert idata.transform_param.crop_size == 8
    assert [r.phase for r in idata.include] == [caffe_pb2.TEST]

    wdata = layers["wdata"]
    assert [list(r.stage) for r in wdata.exclude] == [["deploy"]]
    # Caffe's mutable_transform_param(): once the net needs the data upgrade, every data layer gets one.
    assert wdata.HasField("transform_param")
    assert wdata.transform_param == caffe_pb2.TransformationParameter()

    assert _params(layers["conv"]) == [
        {"name": "cw", "share_mode": caffe_pb2.ParamSpec.PERMISSIVE, "lr_mult": 1.0, "decay_mult": 1.0},
        {"name": "cb", "lr_mult": 2.0, "decay_mult": 0.0},
    ]
    assert (layers["conv"].convolution_param.num_output, list(layers["conv"].convolution_param.kernel_size)) \
        == (3, [3])
    assert _params(layers["ip"]) == [
        {"lr_mult": 1.0, "decay_mult": 5.0}, {"lr_mult": 2.0}, {"lr_mult": 3.0},
    ]
    loss = layers["loss"]
    assert list(loss.bottom) == ["ip", "label"]
    assert list(loss.loss_weight) == [2.0]
    assert (loss.loss_param.ignore_label, loss.loss_param.normalize) == (1, False)
    assert layers["acc"].accuracy_param.top_k == 2

    messages = [r.getMessage() for r in upgrade_log if r.levelno == logging.INFO]
    assert any("V1LayerParameter" in m and "train_v1.prototxt" in m for m in messages)
    assert any("transform" in m and "train_v1.prototxt" in m for m in messages)


def test_v1_data_layer_without_old_fields_gets_no_transform_param():
    net = _upgraded('layers { name: "d" type: DATA top: "x" data_param { source: "db" batch_size: 1 } }')
    assert not net.layer[0].HasField("transform_param")
    assert net.layer[0].data_param.source == "db"


def test_v2_data_layer_fields_are_left_alone():
    # Caffe's data transformation upgrade only looks at V1 layers.
    net = _upgraded('layer { name: "d" type: "Data" top: "x" data_param { source: "db" scale: 0.5 } }')
    assert net.layer[0].data_param.scale == 0.5
    assert not net.layer[0].HasField("transform_param")


def test_layer_and_layers_together_are_refused():
    text = 'layer { name: "new" type: "ReLU" } layers { name: "old" type: RELU }'
    with pytest.raises(ModelFormatError) as info:
        _upgraded(text, "mixed.prototxt")
    assert "mixed.prototxt" in str(info.value)
    assert "layers" in str(info.value)


def test_v2_net_is_untouched(upgrade_log):
    text = """
    name: "v2"
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 0 } param { lr_mult: 0 } }
    """
    net = _upgraded(text)
    assert net == _parse(text)
    assert upgrade_log == []


# -- the shared V1 models ----------------------------------------------------------------------------------

def _input_shape(net: caffe_pb2.NetParameter) -> list[list[int]]:
    first = net.layer[0]
    assert (first.name, first.type) == ("input", "Input")
    return [list(s.dim) for s in first.input_param.shape]


def test_lenet_v1format(shared_models, upgrade_log):
    path = shared_models / "lenet_mnist" / "lenet_v1format.prototxt"
    net = load_prototxt(path)
    assert net.name == "LeNet"
    assert len(net.layers) == 0 and len(net.input) == 0 and len(net.input_dim) == 0
    assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in net.layer] == [
        ("input", "Input", [], ["data"]),
        ("conv1", "Convolution", ["data"], ["conv1"]),
        ("pool1", "Pooling", ["conv1"], ["pool1"]),
        ("conv2", "Convolution", ["pool1"], ["conv2"]),
        ("pool2", "Pooling", ["conv2"], ["pool2"]),
        ("ip1", "InnerProduct", ["pool2"], ["ip1"]),
        ("relu1", "ReLU", ["ip1"], ["ip1"]),
        ("ip2", "InnerProduct", ["ip1"], ["ip2"]),
        ("prob", "Softmax", ["ip2"], ["prob"]),
    ]
    assert _input_shape(net) == [[64, 1, 28, 28]]
    layers = _by_name(net)
    for name, num_output in (("conv1", 20), ("conv2", 50)):
        conv = layers[name]
        assert _params(conv) == [{"lr_mult": 1.0}, {"lr_mult": 2.0}]
        cp = conv.convolution_param
        assert (cp.num_output, list(cp.kernel_size), list(cp.stride)) == (num_output, [5], [1])
        assert (cp.weight_filler.type, cp.bias_filler.type) == ("xavier", "constant")
    for name, num_output in (("ip1", 500), ("ip2", 10)):
        ip = layers[name]
        assert _params(ip) == [{"lr_mult": 1.0}, {"lr_mult": 2.0}]
        assert ip.inner_product_param.num_output == num_output
        assert ip.inner_product_param.weight_filler.type == "xavier"
    for name in ("pool1", "pool2"):
        pp = layers[name].pooling_param
        assert (pp.pool, pp.kernel_size, pp.stride) == (caffe_pb2.PoolingParameter.MAX, 2, 2)
    for name in ("pool1", "pool2", "relu1", "prob"):
        assert len(layers[name].param) == 0
    infos = [r.getMessage() for r in upgrade_log if r.levelno == logging.INFO]
    assert any(str(path) in m and "V1" in m for m in infos)
    assert any(str(path) in m and "Input" in m for m in infos)


def test_caffenet_v1format(shared_models):
    net = load_prototxt(shared_models / "caffenet_v1format" / "deploy.prototxt")
    assert net.name == "CaffeNet"
    assert len(net.layers) == 0
    expected_types = {
        "conv": "Convolution", "relu": "ReLU", "pool": "Pooling", "norm": "LRN", "fc": "InnerProduct",
        "drop": "Dropout", "prob": "Softmax", "input": "Input",
    }
    names = ["input", "conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "pool2", "norm2", "conv3",
             "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6", "drop6", "fc7", "relu7",
             "drop7", "fc8", "prob"]
    assert [lp.name for lp in net.layer] == names
    for lp in net.layer:
        prefix = lp.name.rstrip("0123456789")
        assert lp.type == expected_types[prefix], lp.name
        assert len(lp.param) == 0  # no blobs_lr / weight_decay in this file
    assert _input_shape(net) == [[10, 3, 227, 227]]
    layers = _by_name(net)
    convs = {  # name: (num_output, pad, kernel_size, stride, group)
        "conv1": (96, [], [11], [4], 1), "conv2": (256, [2], [5], [], 2), "conv3": (384, [1], [3], [], 1),
        "conv4": (384, [1], [3], [], 2), "conv5": (256, [1], [3], [], 2),
    }
    for name, (num_output, pad, kernel, stride, group) in convs.items():
        cp = layers[name].convolution_param
        assert (cp.num_output, list(cp.pad), list(cp.kernel_size), list(cp.stride), cp.group) == (
            num_output, pad, kernel, stride, group), name
    for name in ("norm1", "norm2"):
        lrn = layers[name].lrn_param
        assert lrn.local_size == 5
        assert lrn.alpha == pytest.approx(0.0001)
        assert lrn.beta == 0.75
    for name in ("drop6", "drop7"):
        assert layers[name].dropout_param.dropout_ratio == 0.5
        assert list(layers[name].top) == ["fc6" if name == "drop6" else "fc7"]
    assert [layers[n].inner_product_param.num_output for n in ("fc6", "fc7", "fc8")] == [4096, 4096, 1000]
    assert layers["relu1"].bottom == layers["relu1"].top == ["conv1"]


def test_prototxt_round_trip(shared_models):
    paths = sorted(shared_models.glob("*/*.prototxt"))
    assert len(paths) >= 10
    for path in paths:
        net = load_prototxt(path)
        assert len(net.layers) == 0 and len(net.input) == 0, path
        again = caffe_pb2.NetParameter()
        text_format.Merge(prototxt_text(net), again)
        upgrade_net(again, str(path))
        assert again == net, path


# -- binary caffemodels ------------------------------------------------------------------------------------

def _v1_caffemodel(rng: np.random.Generator) -> tuple[caffe_pb2.NetParameter, dict[str, list[np.ndarray]]]:
    """An old-style snapshot: V1 ``layers`` (field 2) with blobs in legacy num/channels/height/width form."""
    arrays = {
        "conv1": [rng.standard_normal((2, 1, 3, 3)), rng.standard_normal(2)],
        "ip": [rng.standard_normal((3, 18)), rng.standard_normal(3)],
    }
    arrays = {name: [a.astype(np.float32) for a in pair] for name, pair in arrays.items()}
    net = caffe_pb2.NetParameter(name="old_snapshot")
    net.input.append("data")  # how old Caffe recorded net inputs in weights files: names only
    conv = net.layers.add(name="conv1", type=V1.CONVOLUTION, bottom=["data"], top=["conv1"])
    conv.convolution_param.num_output = 2
    conv.convolution_param.kernel_size.append(3)
    conv.blobs_lr.extend([1, 2])
    conv.weight_decay.extend([1, 0])
    w, b = arrays["conv1"]
    conv.blobs.add(num=2, channels=1, height=3, width=3).data.extend(w.ravel().tolist())
    conv.blobs.add(num=1, channels=1, height=1, width=2).data.extend(b.tolist())
    net.layers.add(name="relu1", type=V1.RELU, bottom=["conv1"], top=["conv1"])
    ip = net.layers.add(name="ip", type=V1.INNER_PRODUCT, bottom=["conv1"], top=["ip"])
    ip.inner_product_param.num_output = 3
    w, b = arrays["ip"]
    blob = ip.blobs.add()
    blob.shape.dim.extend([3, 18])
    blob.data.extend(w.ravel().tolist())
    blob = ip.blobs.add()
    blob.shape.dim.extend([3])
    blob.data.extend(b.tolist())
    return net, arrays


def test_v1_binary_caffemodel_loads_as_v2(tmp_path, upgrade_log):
    old, arrays = _v1_caffemodel(np.random.default_rng(0))
    raw = old.SerializeToString()
    path = tmp_path / "old.caffemodel"
    path.write_bytes(raw)
    # On the wire: field 1 (name, tag 0x0a) first, then the V1 layers as field 2 (tag 0x12).
    assert raw[0] == 0x0A and raw[2 + raw[1]] == 0x12
    net = load_caffemodel(path)
    assert len(net.layers) == 0 and len(net.input) == 0
    assert [(lp.name, lp.type) for lp in net.layer] == [
        ("conv1", "Convolution"), ("relu1", "ReLU"), ("ip", "InnerProduct"),
    ]
    layers = _by_name(net)
    for v1 in old.layers:
        assert list(layers[v1.name].blobs) == list(v1.blobs)  # protobuf equality, blob by blob
    assert _params(layers["conv1"]) == [
        {"lr_mult": 1.0, "decay_mult": 1.0}, {"lr_mult": 2.0, "decay_mult": 0.0},
    ]
    conv_w = layers["conv1"].blobs[0]
    assert (conv_w.num, conv_w.channels, conv_w.height, conv_w.width) == (2, 1, 3, 3)
    np.testing.assert_array_equal(np.array(conv_w.data, dtype=np.float32), arrays["conv1"][0].ravel())
    np.testing.assert_array_equal(np.array(layers["ip"].blobs[0].data, dtype=np.float32),
                                  arrays["ip"][0].ravel())
    assert list(layers["ip"].blobs[0].shape.dim) == [3, 18]
    assert any("old.caffemodel" in r.getMessage() for r in upgrade_log if r.levelno == logging.INFO)


# -- net inputs --------------------------------------------------------------------------------------------

def test_v2_net_with_input_dim_gets_an_input_layer():
    text = """
    name: "two_inputs"
    input: "data" input: "im_info"
    input_dim: 1 input_dim: 3 input_dim: 32 input_dim: 48
    input_dim: 1 input_dim: 3 input_dim: 1 input_dim: 1
    layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }
    layer { name: "scale" type: "Power" bottom: "im_info" top: "s" }
    """
    net = _upgraded(text)
    assert [lp.name for lp in net.layer] == ["input", "relu", "scale"]
    first = net.layer[0]
    assert first.type == "Input"
    assert list(first.top) == ["data", "im_info"]
    assert [list(s.dim) for s in first.input_param.shape] == [[1, 3, 32, 48], [1, 3, 1, 1]]
    assert len(first.bottom) == 0
    assert len(net.input) == 0 and len(net.input_dim) == 0 and len(net.input_shape) == 0


def test_input_shape_gets_an_input_layer():
    text = """
    input: "data" input_shape { dim: 2 dim: 5 }
    layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }
    """
    net = _upgraded(text)
    assert [(lp.name, lp.type, list(lp.top)) for lp in net.layer] == [
        ("input", "Input", ["data"]), ("relu", "ReLU", ["r"]),
    ]
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[2, 5]]
    assert len(net.input_shape) == 0


def test_input_names_without_shapes_are_dropped():
    # Old caffemodels record only the input names; Caffe strips them without adding a layer.
    net = _upgraded('input: "data" layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }')
    assert [lp.name for lp in net.layer] == ["relu"]
    assert len(net.input) == 0


@pytest.mark.parametrize("dims", ["input_dim: 1 input_dim: 3 input_dim: 8",
                                  "input_shape { dim: 1 } input_shape { dim: 2 }"])
def test_input_dims_that_do_not_match_the_inputs_are_an_error(dims):
    with pytest.raises(ModelFormatError) as info:
        _upgraded(f'input: "data" {dims} layer {{ name: "r" type: "ReLU" bottom: "data" top: "r" }}',
                  "bad_inputs.prototxt")
    assert "bad_inputs.prototxt" in str(info.value)


# -- BatchNorm params --------------------------------------------------------------------------------------

def test_batchnorm_with_three_params_loses_them(upgrade_log):
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
    layer { name: "bn_old" type: "BatchNorm" bottom: "x" top: "y"
            param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 decay_mult: 0 } }
    layer { name: "bn_named" type: "BatchNorm" bottom: "x" top: "z"
            param { name: "m" lr_mult: 1 } param { name: "v" lr_mult: 1 } param { name: "c" lr_mult: 1 } }
    layer { name: "bn_two" type: "BatchNorm" bottom: "x" top: "w" param { lr_mult: 0 } param { lr_mult: 0 } }
    layer { name: "conv" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 1 }
            param { lr_mult: 1 } param { lr_mult: 2 } param { lr_mult: 3 } }
    """
    net = _upgraded(text, "bn.prototxt")
    layers = _by_name(net)
    assert len(layers["bn_old"].param) == 0
    assert len(layers["bn_named"].param) == 0
    assert _params(layers["bn_two"]) == [{"lr_mult": 0.0}, {"lr_mult": 0.0}]
    assert _params(layers["conv"]) == [{"lr_mult": 1.0}, {"lr_mult": 2.0}, {"lr_mult": 3.0}]
    assert any("BatchNorm" in r.getMessage() and "bn.prototxt" in r.getMessage() for r in upgrade_log)


# -- V0 -> V1 -> V2 ----------------------------------------------------------------------------------------

V0_NET = """
name: "v0net"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 12 input_dim: 12
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 5 stride: 1 group: 1 biasterm: false
          weight_filler { type: "gaussian" std: 0.01 }
          blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.25 k: 2 }
         bottom: "pool1" top: "norm1" }
layers {
  layer { name: "fc" type: "innerproduct" num_output: 10 bias_filler { type: "constant" value: 0.1 } }
  bottom: "norm1" top: "fc"
}
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "fc" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
"""


def test_v0_net_upgrades_to_v2(upgrade_log):
    net = _upgraded(V0_NET, "v0.prototxt")
    assert len(net.layers) == 0
    assert [(lp.name, lp.type, list(lp.bottom), list(lp.top)) for lp in net.layer] == [
        ("input", "Input", [], ["data"]),
        ("conv1", "Convolution", ["data"], ["conv1"]),  # the padding layer is folded into the conv
        ("relu1", "ReLU", ["conv1"], ["conv1"]),
        ("pool1", "Pooling", ["conv1"], ["pool1"]),
        ("norm1", "LRN", ["pool1"], ["norm1"]),
        ("fc", "InnerProduct", ["norm1"], ["fc"]),
        ("drop", "Dropout", ["fc"], ["fc"]),
        ("prob", "Softmax", ["fc"], ["prob"]),
    ]
    assert _input_shape(net) == [[2, 3, 12, 12]]
    layers = _by_name(net)
    cp = layers["conv1"].convolution_param
    assert (cp.num_output, list(cp.pad), list(cp.kernel_size), list(cp.stride), cp.group, cp.bias_term) == (
        4, [2], [5], [1], 1, False)
    assert (cp.weight_filler.type, cp.weight_filler.std) == ("gaussian", pytest.approx(0.01))
    assert _params(layers["conv1"]) == [
        {"lr_mult": 1.0, "decay_mult": 1.0}, {"lr_mult": 2.0, "decay_mult": 0.0},
    ]
    pp = layers["pool1"].pooling_param
    assert (pp.pool, pp.kernel_size, pp.stride) == (caffe_pb2.PoolingParameter.AVE, 3, 2)
    lrn = layers["norm1"].lrn_param
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (3, 0.5, 0.25, 2.0)
    ip = layers["fc"].inner_product_param
    assert (ip.num_output, ip.bias_filler.type, ip.bias_filler.value) == (10, "constant", pytest.approx(0.1))
    assert layers["drop"].dropout_param.dropout_ratio == pytest.approx(0.3)
    assert any("V0" in r.getMessage() and "v0.prototxt" in r.getMessage() for r in upgrade_log)


def test_v0_data_layer_fields():
    text = """
    layers {
      layer { name: "d" type: "data" source: "db" batchsize: 8 scale: 0.5 meanfile: "m.binaryproto"
              cropsize: 10 mirror: true rand_skip: 3 }
      top: "data" top: "label"
    }
    layers {
      layer { name: "w" type: "window_data" source: "w.txt" batchsize: 4 det_fg_threshold: 0.6
              det_bg_threshold: 0.4 det_fg_fraction: 0.3 det_context_pad: 16 det_crop_mode: "square" }
      top: "wd" top: "wl"
    }
    layers {
      layer { name: "im" type: "images" source: "l.txt" batchsize: 2 shuffle_images: true new_height: 32
              new_width: 24 }
      top: "imd" top: "iml"
    }
    layers { layer { name: "cat" type: "concat" concat_dim: 0 } bottom: "data" bottom: "imd" top: "cat" }
    """
    net = _upgraded(text)
    assert [(lp.name, lp.type) for lp in net.layer] == [
        ("d", "Data"), ("w", "WindowData"), ("im", "ImageData"), ("cat", "Concat"),
    ]
    d = net.layer[0]
    assert (d.data_param.source, d.data_param.batch_size, d.data_param.rand_skip) == ("db", 8, 3)
    t = d.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.5, "m.binaryproto", 10, True)
    w = net.layer[1].window_data_param
    assert (w.source, w.batch_size, w.context_pad, w.crop_mode) == ("w.txt", 4, 16, "square")
    assert (w.fg_threshold, w.bg_threshold, w.fg_fraction) == pytest.approx((0.6, 0.4, 0.3))
    im = net.layer[2].image_data_param
    assert (im.source, im.batch_size, im.shuffle, im.new_height, im.new_width) == ("l.txt", 2, True, 32, 24)
    assert net.layer[3].concat_param.concat_dim == 0
    assert net.layer[3].concat_param.HasField("concat_dim")


def test_v0_parameter_for_another_type_is_dropped_with_a_warning(upgrade_log):
    text = 'input: "x" layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "x" top: "x" }'
    net = _upgraded(text, "v0.txt")
    assert net.layer[0].type == "ReLU"
    assert not net.layer[0].HasField("convolution_param")
    assert not net.layer[0].HasField("inner_product_param")
    warnings = [r.getMessage() for r in upgrade_log if r.levelno == logging.WARNING]
    assert any("num_output" in m and "'r'" in m for m in warnings)


@pytest.mark.parametrize(("text", "layer"), [
    ('layers { layer { name: "odd" type: "sparkle" } top: "x" }', "odd"),
    ('input: "x" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }'
     ' layers { layer { name: "after" type: "relu" } bottom: "p" top: "r" }', "after"),
    ('input: "x" layers { layer { name: "reader" type: "relu" } bottom: "nowhere" top: "r" }', "reader"),
])
def test_v0_errors_name_the_layer(text, layer):
    with pytest.raises(ModelFormatError) as info:
        _upgraded(text, "ancient.prototxt")
    assert f"'{layer}'" in str(info.value)
    assert "ancient.prototxt" in str(info.value)


# -- the reference Caffe's own view ------------------------------------------------------------------------

_REFERENCE_SCRIPT = r'''
import json, sys
import caffe
caffe.set_mode_cpu()
out = {}
def auto_split(name):  # the Split layers and blobs Caffe's InsertSplits adds for blobs read twice
    return "_split" in name
for path in sys.argv[1:]:
    net = caffe.Net(path, caffe.TEST)
    k = 0
    for blobs in net.params.values():
        for b in blobs:
            k += 1
            b.data[...] = k
    out[path] = {
        "layers": [[n, l.type] for n, l in zip(net._layer_names, net.layers)
                   if not (l.type == "Split" and auto_split(n))],
        "inputs": list(net.inputs),
        "blobs": {n: list(b.shape) for n, b in net.blobs.items() if not auto_split(n)},
        "params": {n: [list(b.shape) for b in bs] for n, bs in net.params.items()},
        # Blobs that share memory read back the value written last to any of them.
        "fill": {n: [float(b.data.flat[0]) for b in bs] for n, bs in net.params.items()},
    }
print(json.dumps(out))
'''

_SHARE_NET = """
name: "shares"
input: "data" input: "extra"
input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5
input_dim: 2 input_dim: 3 input_dim: 1 input_dim: 1
layers { name: "c1" type: CONVOLUTION bottom: "data" top: "c1" param: "w" param: "b1"
         blobs_lr: 1 blobs_lr: 2 convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "c2" type: CONVOLUTION bottom: "data" top: "c2" param: "w" param: "b2"
         convolution_param { num_output: 2 kernel_size: 3 } }
"""

_BN_NET = """
name: "bn"
input: "x" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
layer { name: "bn1" type: "BatchNorm" bottom: "x" top: "y"
  param { name: "m" lr_mult: 1 } param { name: "v" lr_mult: 1 } param { name: "c" lr_mult: 1 } }
layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "z"
  param { name: "m" lr_mult: 1 } param { name: "v" lr_mult: 1 } param { name: "c" lr_mult: 1 } }
layer { name: "bn3" type: "BatchNorm" bottom: "x" top: "u" param { name: "m3" } param { name: "v3" } }
layer { name: "bn4" type: "BatchNorm" bottom: "x" top: "t" param { name: "m3" } param { name: "v3" } }
"""


@functools.cache
def _reference_views(python: str, paths: tuple[str, ...], script: str) -> dict[str, dict]:
    env = dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([python, script, *paths], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def reference_views(reference_caffe, shared_models, tmp_path_factory):
    """The reference Caffe's upgraded view of the V1 models and the nets above (one subprocess for all)."""
    folder = tmp_path_factory.getbasetemp() / "upgrade_reference"
    folder.mkdir(exist_ok=True)
    script = folder / "view.py"
    script.write_text(_REFERENCE_SCRIPT)
    (folder / "share.prototxt").write_text(_SHARE_NET)
    (folder / "bn.prototxt").write_text(_BN_NET)
    paths = {
        "lenet": str(shared_models / "lenet_mnist" / "lenet_v1format.prototxt"),
        "caffenet": str(shared_models / "caffenet_v1format" / "deploy.prototxt"),
        "share": str(folder / "share.prototxt"),
        "bn": str(folder / "bn.prototxt"),
    }
    views = _reference_views(reference_caffe, tuple(paths.values()), str(script))
    return {key: (path, views[path]) for key, path in paths.items()}


def _shared_groups(net: caffe_pb2.NetParameter, view: dict) -> dict[str, list[object]]:
    """Our ParamSpec names turned into the reference's readback values: blobs sharing a name share a value."""
    order = [(lp, i) for lp in net.layer if lp.name in view["params"]
             for i in range(len(view["params"][lp.name]))]
    last: dict[str, int] = {}
    for k, (lp, i) in enumerate(order, start=1):
        if i < len(lp.param) and lp.param[i].name:
            last[lp.param[i].name] = k
    groups: dict[str, list[object]] = {}
    for k, (lp, i) in enumerate(order, start=1):
        name = lp.param[i].name if i < len(lp.param) else ""
        groups.setdefault(lp.name, []).append(float(last[name]) if name else float(k))
    return groups


@pytest.mark.reference
@pytest.mark.parametrize("key", ["lenet", "caffenet", "share", "bn"])
def test_reference_upgraded_view_agrees(reference_views, key):
    path, view = reference_views[key]
    net = load_prototxt(path)
    assert [[lp.name, lp.type] for lp in net.layer] == view["layers"]
    inputs = [top for lp in net.layer if lp.type == "Input" for top in lp.top]
    assert inputs == view["inputs"]
    for lp in net.layer:
        if lp.type == "Input":
            assert [list(s.dim) for s in lp.input_param.shape] == [view["blobs"][t] for t in lp.top]
    assert _shared_groups(net, view) == view["fill"]


@pytest.mark.reference
@pytest.mark.parametrize("key", ["lenet", "caffenet", "share"])
def test_reference_blob_shapes_match_our_engine(reference_views, key):
    from amct_caffe.engine.net import Net

    path, view = reference_views[key]
    try:
        net = Net(path, caffe_pb2.TEST)
    except UnsupportedLayerError as exc:
        pytest.skip(f"the engine cannot build this net yet: {exc}")
    assert net.layer_names == [name for name, _ in view["layers"]]
    assert {name: list(net.tensor(name).shape) for name in net.blob_names} == view["blobs"]
    ours = {name: [list(b.shape) for b in layer.blobs]
            for name, layer in zip(net.layer_names, net.engine_layers) if layer.blobs}
    assert ours == view["params"]


@pytest.mark.reference
def test_reference_reads_our_v1_caffemodel_the_same(reference_caffe, tmp_path):
    from tests.references.real_caffe import run_reference

    old, arrays = _v1_caffemodel(np.random.default_rng(1))
    path = tmp_path / "old.caffemodel"
    path.write_bytes(old.SerializeToString())
    deploy = """
    layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 5 dim: 5 } } }
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
            convolution_param { num_output: 2 kernel_size: 3 } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { num_output: 3 } }
    """
    ref = run_reference(deploy, inputs={"data": np.zeros((1, 1, 5, 5), np.float32)}, weights=path)
    ours = _by_name(load_caffemodel(path))
    for name, expected in arrays.items():
        for i, array in enumerate(expected):
            np.testing.assert_array_equal(ref["params"][f"{name}/{i}"], array)
            np.testing.assert_array_equal(
                np.array(ours[name].blobs[i].data, dtype=np.float32).reshape(array.shape), array)


def test_upgrade_module_does_not_import_torch():
    code = (
        "import sys; import amct_caffe.model.upgrade, amct_caffe.model.io; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src)
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
