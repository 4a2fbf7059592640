"""save_quant_retrain_model: the four saved files field by field, output sets, errors, consistency, engine
runs, BatchNorm folded at save time, the real Caffe reading our caffemodels, and the QAT flow end to end.

Expected values are computed by hand (the tiny case: power-of-two scales, so every number is exact) or by
the numpy references of tests/references.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import amct
from amct_caffe.caffe import pycaffe
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.errors import AmctError, ConfigError, ModelFormatError, RecordError
from amct_caffe.model.io import load_caffemodel, save_caffemodel
from amct_caffe.proto import caffe_pb2
from amct_caffe.workflows import qat
from amct_caffe.workflows.save import MissingRecordPathError
from tests.helpers import parse_net, read_record
from tests.references.layers import conv2d, fold_batchnorm
from tests.references.quant import arq_codes, arq_scales, data_scale_offset, round_away
from tests.references.real_caffe import run_reference

TEST = caffe_pb2.TEST

# ---------------------------------------------------------------------------------------------------------
# The hand-built tiny retrain model (the retrain-layer conventions of docs/decisions.md §5)
# ---------------------------------------------------------------------------------------------------------
TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "conv1_act_retrain" type: "ActivationQAT" bottom: "data" top: "conv1_act_retrain"
        param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
        retrain_data_quant_param { clip_max: 3 clip_min: -1 ifmr_init: false with_offset: true
                                   fixed_min: false object_layer: "conv1"
                                   record_file_path: "RECORD" } }
layer { name: "conv1_wts_retrain" type: "WeightQAT" bottom: "conv1_act_retrain" top: "conv1_wts_retrain"
        param { name: "conv1_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 decay_mult: 1 }
        retrain_weight_quant_param { cout: 2 cin: 2 h: 2 w: 2 channel_wise: CW layer_type: "Convolution"
                                     with_offset: false } }
layer { name: "conv1" type: "Convolution" bottom: "conv1_wts_retrain" top: "conv1"
        param { name: "conv1_wts_retrain_w" lr_mult: 0 decay_mult: 0 }
        convolution_param { num_output: 2 kernel_size: 2 bias_term: BIAS } }
TAIL
"""
RELU_TAIL = 'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }'

# Learned clips: clip_max = 223/32, clip_min = -32/32, so s_d = (223 + 32)/32/255 = 1/32 exactly and
# o_d = -round(-1 / (1/32)) - 128 = 32 - 128 = -96. The prototxt's clips (3, -1) are initial values only.
CLIP_MAX, CLIP_MIN = 6.96875, -1.0
S_D, O_D = 0.03125, -96
# Shadow weights: channel 0's extreme is +0.9921875 = 127/128 -> s_w = 1/128; channel 1's extreme is -2.0 ->
# s_w = 2/128 = 1/64 (a dominant negative extreme divides by 128). Entries 3/4 of ch 0 and 4 of ch 1 are ties.
SHADOW = np.array([
    [[[0.9921875, 0.5], [-0.3, 0.01171875]], [[-0.01171875, 0.25], [0.1, -0.9]]],
    [[[-2.0, 1.0], [0.7, -0.5]], [[0.0234375, 1.99], [-0.01, 0.3]]],
], dtype=np.float32)
S_W = np.array([2.0**-7, 2.0**-6], dtype=np.float32)
# round_away(w / s_w): 0.9921875*128 = 127, 0.5*128 = 64, -0.3*128 = -38.4, 1.5 -> 2, -1.5 -> -2, 32,
# 12.8 -> 13, -115.2 -> -115; -2*64 = -128, 64, 44.8 -> 45, -32, 1.5 -> 2, 127.36 -> 127, -0.64 -> -1,
# 19.2 -> 19.
CODES = np.array([[127, 64, -38, 2, -2, 32, 13, -115], [-128, 64, 45, -32, 2, 127, -1, 19]],
                 dtype=np.int8).reshape(2, 2, 2, 2)
W_HAT = np.array([[c * 2.0**-7 for c in CODES[0].ravel()], [c * 2.0**-6 for c in CODES[1].ravel()]],
                 dtype=np.float32).reshape(2, 2, 2, 2)
# deq_scale = s_d * s_w = 2^-12, 2^-11. Bias: 0.3 * 4096 = 1228.8 -> 1229; -2.5 * 2^-11 / 2^-11 = -2.5 -> -3.
BIAS = np.array([0.3, -2.5 * 2.0**-11], dtype=np.float32)
DEQ = np.array([2.0**-12, 2.0**-11], dtype=np.float32)
BIAS_Q = [1229, -3]
FAKE_BIAS = np.array([1229 * 2.0**-12, -3 * 2.0**-11], dtype=np.float32)
DEQ_U64 = [0x39800000, 0x3A000000]  # IEEE-754 bits of 2^-12 (exponent 115) and 2^-11 (exponent 116)

EXPECTED_TINY_SAVED = r"""
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "conv1_quant_layer" type: "Quant" bottom: "data" top: "conv1_quant_layer"
        quant_param { with_offset: true scale: 32 offset: "\240" object_layer: "conv1" } }
layer { name: "conv1" type: "Convolution" bottom: "conv1_quant_layer" top: "conv1_dequant_layer_in"
        convolution_param { num_output: 2 bias_term: true kernel_size: 2 } }
layer { name: "conv1_dequant_layer" type: "DeQuant" bottom: "conv1_dequant_layer_in" top: "conv1"
        dequant_param { channel_wise: true object_layer: "conv1" layer_type: "Convolution" } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
"""

FILES = {
    "Fakequant": ["m_fake_quant_model.prototxt", "m_fake_quant_weights.caffemodel"],
    "Deploy": ["m_deploy_model.prototxt", "m_deploy_weights.caffemodel"],
}
FILES["Both"] = FILES["Fakequant"] + FILES["Deploy"]


# -- helpers -------------------------------------------------------------------------------------------------
def float_blob(blob: caffe_pb2.BlobProto, array: np.ndarray) -> None:
    array = np.asarray(array, dtype=np.float32)
    blob.shape.dim.extend(array.shape)
    blob.data.extend(array.ravel().tolist())


def caffemodel(net_text: str, blobs: dict[str, list[np.ndarray]]) -> caffe_pb2.NetParameter:
    """A caffemodel holding ``blobs`` for the named layers of ``net_text`` (as Caffe's ToProto writes it)."""
    net = parse_net(net_text)
    out = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        if layer.name in blobs:
            lp = out.layer.add()
            lp.CopyFrom(layer)
            for array in blobs[layer.name]:
                float_blob(lp.blobs.add(), array)
    return out


def tiny_text(channel_wise: bool = True, bias: bool = True, tail: str = RELU_TAIL) -> str:
    return (TINY.replace("CW", str(channel_wise).lower()).replace("BIAS", str(bias).lower())
            .replace("TAIL", tail))


def tiny_blobs(bias: np.ndarray | None = BIAS, clips: bool = True) -> dict[str, list[np.ndarray]]:
    junk = np.full((2, 2, 2, 2), 7.0, np.float32)  # stale fake-quantized copies: the shadow must be used
    blobs = {
        "conv1_wts_retrain": [np.zeros((2, 2, 2, 2), np.float32), SHADOW],
        "conv1": [junk] + ([] if bias is None else [bias]),
    }
    if clips:
        blobs["conv1_act_retrain"] = [np.float32([CLIP_MAX]), np.float32([CLIP_MIN])]
    return blobs


def write_tiny(folder: Path, text: str | None = None, blobs: dict | None = None) -> tuple[str, str]:
    """The tiny retrain model in ``folder``; its ActivationQAT names ``folder/train_record.txt``."""
    text = (tiny_text() if text is None else text).replace("RECORD", str(folder / "train_record.txt"))
    blobs = tiny_blobs() if blobs is None else blobs
    model, weights = folder / "retrain.prototxt", folder / "retrain.caffemodel"
    model.write_text(text)
    save_caffemodel(caffemodel(text, blobs), weights)
    return str(model), str(weights)


def load_text_net(path: str | Path) -> caffe_pb2.NetParameter:
    return text_format.Merge(Path(path).read_text(), caffe_pb2.NetParameter())


def along(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape) if scale.size > 1 else scale.reshape([1] * ndim)


def blob_layers(net: caffe_pb2.NetParameter) -> dict[str, caffe_pb2.LayerParameter]:
    return {layer.name: layer for layer in net.layer}


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture(autouse=True)
def no_remembered_paths(monkeypatch):
    """Each test starts without a remembered create_quant_retrain_model (the record default)."""
    monkeypatch.setattr(qat, "_LAST_RETRAIN", None)


# ---------------------------------------------------------------------------------------------------------
# (1) the tiny case, every field of every file against hand-computed values
# ---------------------------------------------------------------------------------------------------------
def test_tiny_both_field_by_field(tmp_path):
    model, weights = write_tiny(tmp_path)
    out = tmp_path / "out"
    record = out / "record.txt"
    amct.save_quant_retrain_model(model, weights, "Both", str(out / "m"), str(record), None)
    assert listing(out) == sorted(FILES["Both"] + ["record.txt"])

    # prototxts: identical, exactly the expected net
    expected = parse_net(EXPECTED_TINY_SAVED)
    for name in ("m_fake_quant_model.prototxt", "m_deploy_model.prototxt"):
        saved = load_text_net(out / name)
        assert saved == expected, name
    quant = blob_layers(load_text_net(out / "m_deploy_model.prototxt"))["conv1_quant_layer"].quant_param
    assert quant.scale == 32.0 and quant.offset == b"\xa0" and quant.offset[0] - 256 == O_D

    # fake-quant caffemodel
    fake = load_caffemodel(out / "m_fake_quant_weights.caffemodel", upgrade=False)
    layers = blob_layers(fake)
    assert [(layer.name, layer.type, list(layer.bottom), list(layer.top)) for layer in fake.layer] == [
        ("conv1", "Convolution", ["conv1_quant_layer"], ["conv1_dequant_layer_in"]),
        ("conv1_dequant_layer", "DeQuant", ["conv1_dequant_layer_in"], ["conv1"])]
    w, b = layers["conv1"].blobs
    assert list(w.shape.dim) == [2, 2, 2, 2] and list(b.shape.dim) == [2]
    np.testing.assert_array_equal(np.array(w.data, np.float32).reshape(2, 2, 2, 2), W_HAT)
    np.testing.assert_array_equal(np.array(b.data, np.float32), FAKE_BIAS)
    assert not w.int8_data and not b.int32_data
    deq, shift, offset = layers["conv1_dequant_layer"].blobs
    for blob in (deq, shift, offset):
        assert list(blob.shape.dim) == [2]
    np.testing.assert_array_equal(np.array(deq.data, np.float32), DEQ)
    assert list(shift.data) == [0.0, 0.0] and list(offset.data) == [0.0, 0.0]

    # deploy caffemodel
    deploy = load_caffemodel(out / "m_deploy_weights.caffemodel", upgrade=False)
    layers = blob_layers(deploy)
    assert [layer.name for layer in deploy.layer] == ["conv1", "conv1_dequant_layer"]
    w, b = layers["conv1"].blobs
    assert list(w.shape.dim) == [2, 2, 2, 2] and len(w.data) == 0
    assert w.int8_data == CODES.tobytes()
    assert w.int8_data[:4] == bytes([127, 64, 256 - 38, 2])
    assert list(b.shape.dim) == [2] and len(b.data) == 0 and list(b.int32_data) == BIAS_Q
    (packed,) = layers["conv1_dequant_layer"].blobs
    assert list(packed.shape.dim) == [2] and len(packed.data) == 0
    assert list(packed.uint64_data) == DEQ_U64
    assert [struct.unpack("<I", struct.pack("<f", v))[0] for v in DEQ] == DEQ_U64

    # record
    rec = read_record(record)
    assert list(rec) == ["conv1"]
    r = rec["conv1"]
    assert r.scale_d == S_D and r.offset_d == O_D
    assert list(r.scale_w) == [0.0078125, 0.015625] and list(r.offset_w) == [0, 0]
    assert (r.channels, r.height, r.width) == (2, 3, 3)
    assert not r.shift_bit


def test_tiny_per_tensor_and_no_bias(tmp_path):
    """channel_wise false: one weight scale (the extreme -2.0 gives 1/64), DeQuant blobs of shape [1]."""
    model, weights = write_tiny(tmp_path, tiny_text(channel_wise=False, bias=False), tiny_blobs(bias=None))
    out = tmp_path / "out"
    amct.save_quant_retrain_model(model, weights, "Both", str(out / "m"), str(out / "rec.txt"))
    codes = np.array([[127, 64, -38, 2, -2, 32, 13, -115], [-128, 64, 45, -32, 2, 127, -1, 19]])
    codes[0] = [64, 32, -19, 1, -1, 16, 6, -58]  # channel 0 with s_w = 1/64: 63.5 -> 64, 0.75 -> 1, 6.4 -> 6
    fake = blob_layers(load_caffemodel(out / "m_fake_quant_weights.caffemodel", upgrade=False))
    assert len(fake["conv1"].blobs) == 1
    np.testing.assert_array_equal(np.array(fake["conv1"].blobs[0].data, np.float32),
                                  (codes.ravel() * 2.0**-6).astype(np.float32))
    assert [list(b.shape.dim) for b in fake["conv1_dequant_layer"].blobs] == [[1], [1], [1]]
    assert list(fake["conv1_dequant_layer"].blobs[0].data) == [2.0**-11]
    deploy = blob_layers(load_caffemodel(out / "m_deploy_weights.caffemodel", upgrade=False))
    assert deploy["conv1"].blobs[0].int8_data == codes.astype(np.int8).tobytes()
    assert list(deploy["conv1_dequant_layer"].blobs[0].uint64_data) == [0x3A000000]
    saved = blob_layers(load_text_net(out / "m_fake_quant_model.prototxt"))
    assert saved["conv1_dequant_layer"].dequant_param.channel_wise is False
    assert saved["conv1"].convolution_param.bias_term is False
    assert list(read_record(out / "rec.txt")["conv1"].scale_w) == [0.015625]


# ---------------------------------------------------------------------------------------------------------
# (2) each save_type writes exactly its files
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_type", ["Fakequant", "Deploy", "Both"])
def test_files_per_save_type(tmp_path, save_type):
    model, weights = write_tiny(tmp_path)
    out = tmp_path / "deep" / "folder"  # missing folders are created
    amct.save_quant_retrain_model(model, weights, save_type, str(out / "m"))
    # record None: the record the retrain model's ActivationQAT names
    assert listing(out) == sorted(FILES[save_type])
    assert read_record(tmp_path / "train_record.txt")["conv1"].scale_d == S_D


def test_record_default_is_the_models_path(tmp_path, monkeypatch):
    """record None: the path the retrain model carries, not the last create_quant_retrain_model's."""
    model, weights = write_tiny(tmp_path)
    other = tmp_path / "other_model" / "record.txt"
    monkeypatch.setattr(qat, "_LAST_RETRAIN", qat.RetrainPaths(str(other), str(tmp_path / "c.json")))
    out = tmp_path / "out"
    amct.save_quant_retrain_model(model, weights, "Deploy", str(out / "m"))
    assert listing(out) == sorted(FILES["Deploy"])
    assert read_record(tmp_path / "train_record.txt")["conv1"].offset_d == O_D
    assert not other.exists()


def test_record_default_missing_is_a_named_error(tmp_path):
    text = tiny_text().replace('record_file_path: "RECORD" ', "")
    model, weights = write_tiny(tmp_path, text)
    with pytest.raises(MissingRecordPathError, match="record_file_path") as info:
        amct.save_quant_retrain_model(model, weights, "Both", str(tmp_path / "out" / "m"))
    assert "scale_offset_record_file" in str(info.value) and "retrain.prototxt" in str(info.value)
    assert not (tmp_path / "out").exists()
    float_text = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
    (tmp_path / "float.prototxt").write_text(float_text)
    with pytest.raises(MissingRecordPathError, match="not a retrain model"):
        amct.save_quant_retrain_model(str(tmp_path / "float.prototxt"), weights, "Both",
                                      str(tmp_path / "o" / "m"))


# ---------------------------------------------------------------------------------------------------------
# (3) errors: no output, pre-existing files untouched
# ---------------------------------------------------------------------------------------------------------
CONV2_TAIL = RELU_TAIL + """
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 2 kernel_size: 1 } }
"""
CONV2_BLOBS = {"conv2": [np.ones((2, 2, 1, 1), np.float32), np.zeros(2, np.float32)]}


def _config(path: Path, layers: dict[str, bool]) -> str:
    cfg = {"version": 1}
    for name, enable in layers.items():
        cfg[name] = {"retrain_enable": enable, "retrain_data_config": {"algo": "ulq_quantize"},
                     "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True}}
    path.write_text(json.dumps(cfg))
    return str(path)


def _error_cases(tmp: Path) -> dict[str, tuple[dict, type, list[str]]]:
    """name -> (keyword arguments, error class, words the message must contain)."""
    good_model, good_weights = write_tiny(tmp)
    cases: dict[str, tuple[dict, type, list[str]]] = {}
    base = {"retrained_model_file": good_model, "retrained_weights_file": good_weights}
    cases["save_type"] = ({**base, "save_type": "fakequant"}, ConfigError,
                          ["'Fakequant'", "'Deploy'", "'Both'"])
    cases["missing model"] = ({**base, "retrained_model_file": str(tmp / "nope.prototxt")}, ModelFormatError,
                              ["nope.prototxt"])
    cases["missing weights"] = ({**base, "retrained_weights_file": str(tmp / "nope.caffemodel")},
                                ModelFormatError, ["nope.caffemodel"])
    # a float model is not a retrain model
    float_dir = tmp / "float"
    float_dir.mkdir()
    float_text = 'name: "f"\n' + TINY.split("\n", 2)[2].split("layer { name: \"conv1_act_retrain\"")[0] + \
        'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" ' \
        "convolution_param { num_output: 2 kernel_size: 2 } }"
    (float_dir / "f.prototxt").write_text(float_text)
    save_caffemodel(caffemodel(float_text, {"conv1": [SHADOW, BIAS]}), float_dir / "f.caffemodel")
    cases["not a retrain model"] = ({"retrained_model_file": str(float_dir / "f.prototxt"),
                                     "retrained_weights_file": str(float_dir / "f.caffemodel")},
                                    ModelFormatError, ["f.prototxt", "not a retrain model"])
    # the clips were never initialised (the caffemodel create_quant_retrain_model writes for IFMR layers)
    d = tmp / "noclips"
    d.mkdir()
    model, weights = write_tiny(d, blobs=tiny_blobs(clips=False))
    cases["missing clips"] = ({"retrained_model_file": model, "retrained_weights_file": weights}, RecordError,
                              ["conv1_act_retrain", "forward/train before saving"])
    # bias / (s_d * s_w) = 1e7 * 4096 does not fit INT32
    d = tmp / "overflow"
    d.mkdir()
    model, weights = write_tiny(d, blobs=tiny_blobs(bias=np.float32([1e7, 0.0])))
    cases["int32 overflow"] = ({"retrained_model_file": model, "retrained_weights_file": weights},
                               ConfigError, ["conv1", "INT32", "retrain_enable", "retrain.caffemodel"])
    # configs inconsistent with the model
    d = tmp / "conv2"
    d.mkdir()
    model, weights = write_tiny(d, tiny_text(tail=CONV2_TAIL), {**tiny_blobs(), **CONV2_BLOBS})
    two = {"retrained_model_file": model, "retrained_weights_file": weights}
    cases["config enables a layer without retrain layers"] = (
        {**two, "config_file": _config(d / "c1.json", {"conv1": True, "conv2": True})}, ConfigError,
        ["conv2", "c1.json", "no retrain layers", "retrain_enable"])
    cases["config quantizes nothing"] = (
        {**two, "config_file": _config(d / "c2.json", {"conv1": False, "conv2": False})}, ConfigError,
        ["c2.json", "no layer"])
    cases["config names an unknown layer"] = (
        {**two, "config_file": _config(d / "c3.json", {"conv1": True, "conv9": True})}, ConfigError,
        ["conv9", "c3.json"])
    cases["missing config"] = ({**two, "config_file": str(d / "none.json")}, ConfigError, ["none.json"])
    cases["output is an input"] = ({**base, "save_path": str(tmp / "x"),
                                    "scale_offset_record_file": good_model},
                                   ConfigError, ["retrain.prototxt"])
    cases["no prefix"] = ({**base, "save_path": str(tmp / "out") + os.sep}, ConfigError, ["prefix"])
    return cases


def test_errors_write_nothing(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = _error_cases(inputs)
    out = tmp_path / "out"
    out.mkdir()
    old = {"m_fake_quant_model.prototxt": b"old fake model", "m_deploy_weights.caffemodel": b"\x00old\xff",
           "rec.txt": b'record { key: "conv1" value { scale_d: 9 } }\n'}
    for name, data in old.items():
        (out / name).write_bytes(data)
    for name, (kwargs, error, words) in cases.items():
        args = {"save_type": "Both", "save_path": str(out / "m"),
                "scale_offset_record_file": str(out / "rec.txt"), **kwargs}
        with pytest.raises(error) as info:
            amct.save_quant_retrain_model(**args)
        assert isinstance(info.value, AmctError)
        for word in words:
            assert word in str(info.value), f"{name}: '{word}' not in: {info.value}"
        assert listing(out) == sorted(old), name
        for file, data in old.items():
            assert (out / file).read_bytes() == data, f"{name}: {file} changed"
    assert not (tmp_path / "x_fake_quant_model.prototxt").exists()


def test_bad_argument_types(tmp_path):
    model, weights = write_tiny(tmp_path)
    with pytest.raises(ConfigError, match="save_type"):
        amct.save_quant_retrain_model(model, weights, None, str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="save_path"):
        amct.save_quant_retrain_model(model, weights, "Both", "")
    assert listing(tmp_path) == ["retrain.caffemodel", "retrain.prototxt"]


# ---------------------------------------------------------------------------------------------------------
# (4) a bigger net: record and models consistent with each other and with the retrained weights
# ---------------------------------------------------------------------------------------------------------
MID = """
name: "mid"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a" type: "Convolution" bottom: "conv1" top: "conv2a"
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "conv2b" type: "Convolution" bottom: "conv1" top: "conv2b"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }
layer { name: "deconv" type: "Deconvolution" bottom: "sum" top: "deconv"
        convolution_param { num_output: 3 kernel_size: 2 stride: 2 } }
layer { name: "pool" type: "Pooling" bottom: "deconv" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 3 } }
"""
MID_CONFIG = {
    "version": 1,
    "conv1": {"retrain_enable": True, "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 2.5,
                                                              "clip_min": -1.5, "fixed_min": False}},
    "conv2a": {"retrain_enable": True}, "conv2b": {"retrain_enable": True},
    "deconv": {"retrain_enable": True},
    "pool": {"retrain_enable": True},
    "fc": {"retrain_enable": True, "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": False}},
    "fc2": {"retrain_enable": False},
}
MID_SHAPES = {"conv1": (3, 8, 8), "conv2a": (4, 8, 8), "conv2b": (4, 8, 8), "deconv": (4, 8, 8),
              "pool": (3, 16, 16), "fc": (3, 8, 8)}
WEIGHT_AXIS = {"conv1": 0, "conv2a": 0, "conv2b": 0, "deconv": 1, "fc": 0}


@pytest.fixture
def mid_retrained(tmp_path):
    """The MID net through create_quant_retrain_model, one TRAIN forward (IFMR clips), then 'trained':
    the shadow weights and clips moved away from what the forward left in the blobs."""
    d = tmp_path / "mid"
    d.mkdir()
    (d / "m.prototxt").write_text(MID)
    net = Net(parse_net(MID), TEST)
    randomize_params(net, 3)
    net.save(d / "m.caffemodel")
    (d / "c.json").write_text(json.dumps(MID_CONFIG))
    qat.create_quant_retrain_model(d / "m.prototxt", d / "m.caffemodel", d / "c.json", d / "r.prototxt",
                                   d / "r.caffemodel", d / "train_record.txt")
    train = pycaffe.Net(str(d / "r.prototxt"), str(d / "r.caffemodel"), pycaffe.TRAIN)
    rng = np.random.default_rng(5)
    train.forward(data=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    snapshot = train.to_proto()
    for layer in snapshot.layer:
        if layer.type == "WeightQAT":
            shadow = np.array(layer.blobs[1].data, np.float32)
            del layer.blobs[1].data[:]
            layer.blobs[1].data.extend((shadow * rng.uniform(0.8, 1.2, shadow.shape)).tolist())
        if layer.type == "ActivationQAT":
            layer.blobs[0].data[0] *= 1.1
    save_caffemodel(snapshot, d / "t.caffemodel")
    return d


def _retrained_factors(weights_file: Path, model_file: Path) -> tuple[dict, dict]:
    """Independent factors from the retrained files: {act layer: (s_d, o_d)}, {layer: s_w}."""
    model = blob_layers(load_text_net(model_file))
    layers = blob_layers(load_caffemodel(weights_file, upgrade=False))
    data, wts = {}, {}
    for name, layer in model.items():
        if layer.type == "ActivationQAT":
            p = layer.retrain_data_quant_param
            cmax, cmin = layers[name].blobs[0].data[0], layers[name].blobs[1].data[0]
            for consumer in p.object_layer.split("-"):
                data[consumer] = data_scale_offset(cmax, cmin, p.fixed_min)
        if layer.type == "WeightQAT":
            p = layer.retrain_weight_quant_param
            blob = layers[name].blobs[1]
            shadow = np.array(blob.data, np.float32).reshape(tuple(blob.shape.dim))
            target = name[: -len("_wts_retrain")]
            wts[target] = (shadow, arq_scales(shadow, p.channel_wise, WEIGHT_AXIS[target]))
    return data, wts


def test_mid_net_consistency(mid_retrained):
    d = mid_retrained
    out = d / "out"
    amct.save_quant_retrain_model(str(d / "r.prototxt"), str(d / "t.caffemodel"), "Both", str(out / "m"),
                                  str(out / "record.txt"))
    data, wts = _retrained_factors(d / "t.caffemodel", d / "r.prototxt")
    record = read_record(out / "record.txt")
    assert list(record) == ["conv1", "conv2a", "conv2b", "deconv", "pool", "fc"]
    saved = blob_layers(load_text_net(out / "m_deploy_model.prototxt"))
    assert load_text_net(out / "m_deploy_model.prototxt") == \
        load_text_net(out / "m_fake_quant_model.prototxt")
    fake = blob_layers(load_caffemodel(out / "m_fake_quant_weights.caffemodel", upgrade=False))
    deploy = blob_layers(load_caffemodel(out / "m_deploy_weights.caffemodel", upgrade=False))
    removed = ("ActivationQAT", "WeightQAT", "BatchNorm", "Scale")
    assert not any(layer.type in removed for layer in saved.values())

    # one shared Quant for conv2a/conv2b; every quantized layer reads a Quant and is followed by its DeQuant
    quants = [layer for layer in saved.values() if layer.type == "Quant"]
    assert [q.name for q in quants] == ["conv1_quant_layer", "conv2a_quant_layer", "deconv_quant_layer",
                                        "pool_quant_layer", "fc_quant_layer"]
    assert saved["conv2a_quant_layer"].quant_param.object_layer == "conv2a-conv2b"
    assert list(saved["conv2b"].bottom) == ["conv2a_quant_layer"]
    assert list(saved["conv2a_dequant_layer"].top) == ["conv2a"]
    assert list(saved["sum"].bottom) == ["conv2a", "conv2b"]
    assert "fc2_dequant_layer" not in saved and list(saved["fc2"].bottom) == ["fc"]

    for name, rec in record.items():
        s_d, o_d = data[name]
        # the record's activation factors are those of the learned clips; the Quant layer carries them
        assert rec.scale_d == s_d and rec.offset_d == o_d, name
        quant = next(q for q in quants if name in q.quant_param.object_layer.split("-")).quant_param
        assert quant.scale == np.float32(1.0) / np.float32(rec.scale_d)
        assert np.frombuffer(quant.offset[:1], np.int8)[0] == rec.offset_d and quant.with_offset
        assert (rec.channels, rec.height, rec.width) == MID_SHAPES[name]
        sw = np.array(rec.scale_w, np.float32)
        assert list(rec.offset_w) == [0] * sw.size
        if name == "pool":
            assert list(sw) == [1.0]
        else:
            np.testing.assert_array_equal(sw, wts[name][1])
        # deq_scale: float32(s_d * s_w[c]); uint64 = zero-extended float32 bits
        expected_deq = np.float32(rec.scale_d) * sw
        dq = saved[f"{name}_dequant_layer"].dequant_param
        assert dq.channel_wise == (sw.size > 1) and dq.object_layer == name
        assert dq.layer_type == saved[name].type
        np.testing.assert_array_equal(np.array(fake[f"{name}_dequant_layer"].blobs[0].data, np.float32),
                                      expected_deq)
        packed = np.array(deploy[f"{name}_dequant_layer"].blobs[0].uint64_data, np.uint64)
        assert len(deploy[f"{name}_dequant_layer"].blobs) == 1 and (packed >> np.uint64(32) == 0).all()
        np.testing.assert_array_equal((packed & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32),
                                      expected_deq)
        if name == "pool":
            assert name not in deploy and name not in fake
            continue
        # deploy int8 x scale_w == fake-quant weights, exactly; codes from the (trained) shadow weight
        shadow = wts[name][0]
        axis = WEIGHT_AXIS[name]
        w_blob = deploy[name].blobs[0]
        codes = np.frombuffer(w_blob.int8_data, np.int8).reshape(tuple(w_blob.shape.dim))
        expected_codes = arq_codes(shadow, sw, sw.size > 1, axis)
        np.testing.assert_array_equal(codes, expected_codes)
        fake_w = np.array(fake[name].blobs[0].data, np.float32).reshape(codes.shape)
        np.testing.assert_array_equal(codes.astype(np.float32) * along(sw, codes.ndim, axis), fake_w)
        if len(fake[name].blobs) > 1:
            bias_q = np.array(deploy[name].blobs[1].int32_data, np.int64)
            fake_b = np.array(fake[name].blobs[1].data, np.float32)
            expected_b = (bias_q * expected_deq.astype(np.float64)).astype(np.float32)
            np.testing.assert_array_equal(expected_b, fake_b)
    # layers left float keep their float blobs in both models
    np.testing.assert_array_equal(np.array(deploy["fc2"].blobs[0].data), np.array(fake["fc2"].blobs[0].data))


def test_mid_net_runs_close_to_retrain_net(mid_retrained):
    """The fake-quant model computes what the retrain model computes in TEST (same codes, rounded bias)."""
    d = mid_retrained
    out = d / "out"
    amct.save_quant_retrain_model(str(d / "r.prototxt"), str(d / "t.caffemodel"), "Fakequant", str(out / "m"),
                                  str(out / "record.txt"))
    x = np.random.default_rng(9).standard_normal((2, 3, 8, 8)).astype(np.float32)
    retrain = pycaffe.Net(str(d / "r.prototxt"), str(d / "t.caffemodel"), pycaffe.TEST)
    fq = pycaffe.Net(str(out / "m_fake_quant_model.prototxt"), str(out / "m_fake_quant_weights.caffemodel"),
                     pycaffe.TEST)
    ref = retrain.forward(data=x)["fc2"]
    got = fq.forward(data=x)["fc2"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2 * np.abs(ref).max())


def test_config_disables_a_retrained_layer(mid_retrained):
    d = mid_retrained
    cfg = json.loads(json.dumps(MID_CONFIG))
    cfg["conv2a"]["retrain_enable"] = False
    (d / "c2.json").write_text(json.dumps(cfg))
    out = d / "out"
    amct.save_quant_retrain_model(str(d / "r.prototxt"), str(d / "t.caffemodel"), "Both", str(out / "m"),
                                  str(out / "record.txt"), str(d / "c2.json"))
    saved = blob_layers(load_text_net(out / "m_fake_quant_model.prototxt"))
    assert "conv2a_dequant_layer" not in saved and "conv2a_quant_layer" not in saved
    assert saved["conv2b_quant_layer"].quant_param.object_layer == "conv2b"
    assert list(saved["conv2a"].bottom) == ["conv1"] and list(saved["conv2a"].top) == ["conv2a"]
    assert not saved["conv2a"].param  # no sharing name left
    _, wts = _retrained_factors(d / "t.caffemodel", d / "r.prototxt")
    for model in ("m_fake_quant_weights.caffemodel", "m_deploy_weights.caffemodel"):
        blob = blob_layers(load_caffemodel(out / model, upgrade=False))["conv2a"].blobs[0]
        np.testing.assert_array_equal(np.array(blob.data, np.float32).reshape(wts["conv2a"][0].shape),
                                      wts["conv2a"][0])
    assert "conv2a" not in read_record(out / "record.txt")


# ---------------------------------------------------------------------------------------------------------
# (5) the tiny fake-quant model in our engine vs numpy: Quant -> conv with w_hat -> identity DeQuant
# ---------------------------------------------------------------------------------------------------------
def test_tiny_fake_quant_runs_in_engine(tmp_path):
    model, weights = write_tiny(tmp_path, tiny_text(tail=""))
    out = tmp_path / "out"
    amct.save_quant_retrain_model(model, weights, "Fakequant", str(out / "m"), str(out / "r.txt"))
    net = Net(str(out / "m_fake_quant_model.prototxt"), TEST,
              weights=str(out / "m_fake_quant_weights.caffemodel"))
    x = (np.random.default_rng(0).standard_normal((1, 2, 3, 3)) * 3).astype(np.float32)
    x[0, 0, 0, :] = [2.5 * S_D, -3.5 * S_D, 100.0]  # ties (away from zero) and a clipped value
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    q = np.clip(round_away(x / S_D) + O_D, -128, 127)
    xq = (q - O_D) * S_D
    expected = conv2d(xq, W_HAT, FAKE_BIAS)
    np.testing.assert_allclose(net.tensor("conv1").numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(net.tensor("conv1_quant_layer").numpy(), xq, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# (6) BatchNorm + Scale still after a quantized conv: folded at save time
# ---------------------------------------------------------------------------------------------------------
BN_TAIL = """
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "bn1" batch_norm_param { eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "bn1" top: "bn1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "bn1" top: "bn1" }
"""
MEAN_SUM, VAR_SUM, FACTOR = np.float32([0.4, -0.2]), np.float32([1.5, 0.6]), np.float32([2.0])
GAMMA, BETA = np.float32([1.5, -0.75]), np.float32([0.1, -0.2])


@pytest.mark.parametrize("channel_wise", [True, False])
def test_batch_norm_folded_at_save(tmp_path, channel_wise):
    text = tiny_text(channel_wise=channel_wise, bias=False, tail=BN_TAIL)
    blobs = {**tiny_blobs(bias=None), "bn1": [MEAN_SUM, VAR_SUM, FACTOR], "scale1": [GAMMA, BETA]}
    model, weights = write_tiny(tmp_path, text, blobs)
    out = tmp_path / "out"
    amct.save_quant_retrain_model(model, weights, "Both", str(out / "m"), str(out / "r.txt"))

    # mean = 0.2, -0.1; var = 0.75, 0.3; k = gamma / sqrt(var + eps); W' = W k; b' = (0 - mean) k + beta
    bn = {"conv": [SHADOW], "bn": [MEAN_SUM, VAR_SUM, FACTOR], "scale": [GAMMA, BETA]}
    folded_w, folded_b = fold_batchnorm(bn, conv_bias=False, scale=True, scale_bias=True, axis=0, eps=0.001)
    k = GAMMA.astype(np.float64) / np.sqrt(VAR_SUM.astype(np.float64) / 2.0 + np.float64(np.float32(0.001)))
    s_w = arq_scales(folded_w, channel_wise, 0)
    if channel_wise:
        # channel 0 (k > 0): ARQ is equivariant to a positive factor, s_w' = |k| s_w. Channel 1 (k < 0): the
        # dominant extreme -2.0 becomes +2|k|, which ARQ divides by 127, not 128: s_w' = 2|k|/127 != |k| s_w.
        # The saved scales are ARQ of the folded weight (the codes then reach 127 instead of clipping at 128).
        assert k[0] > 0 > k[1]
        np.testing.assert_allclose(s_w[0], abs(k[0]) * S_W[0], rtol=1e-6)
        np.testing.assert_allclose(s_w[1], 2.0 * abs(k[1]) / 127, rtol=1e-6)
    record = read_record(out / "r.txt")["conv1"]
    np.testing.assert_allclose(np.array(record.scale_w, np.float32), s_w, rtol=1e-6)
    sw = np.array(record.scale_w, np.float32)

    saved = blob_layers(load_text_net(out / "m_fake_quant_model.prototxt"))
    assert not any(layer.type in ("BatchNorm", "Scale") for layer in saved.values())
    assert saved["conv1"].convolution_param.bias_term
    assert list(saved["conv1"].top) == ["conv1_dequant_layer_in"]
    assert list(saved["conv1_dequant_layer"].top) == ["bn1"] and list(saved["relu1"].bottom) == ["bn1"]
    fake = blob_layers(load_caffemodel(out / "m_fake_quant_weights.caffemodel", upgrade=False))
    deploy = blob_layers(load_caffemodel(out / "m_deploy_weights.caffemodel", upgrade=False))
    assert "bn1" not in fake and "scale1" not in fake
    codes = np.frombuffer(deploy["conv1"].blobs[0].int8_data, np.int8).reshape(2, 2, 2, 2)
    np.testing.assert_array_equal(codes, arq_codes(folded_w, sw, sw.size > 1, 0))
    fake_w = np.array(fake["conv1"].blobs[0].data, np.float32).reshape(2, 2, 2, 2)
    np.testing.assert_array_equal(fake_w, codes.astype(np.float32) * along(sw, 4, 0))
    np.testing.assert_allclose(fake_w, folded_w, atol=float(sw.max()) / 2 + 1e-9)
    deq = np.float32(S_D) * sw
    bias_q = round_away(folded_b.astype(np.float64) / deq.astype(np.float64))
    assert list(deploy["conv1"].blobs[1].int32_data) == bias_q.astype(int).tolist()
    np.testing.assert_array_equal(np.array(fake["conv1"].blobs[1].data, np.float32),
                                  (bias_q * deq.astype(np.float64)).astype(np.float32))
    assert [list(b.shape.dim) for b in fake["conv1_dequant_layer"].blobs] == [[2 if channel_wise else 1]] * 3


# ---------------------------------------------------------------------------------------------------------
# (7) the real Caffe parses both caffemodels and loads the fake-quant model's float layers
# ---------------------------------------------------------------------------------------------------------
REF_PARSE = textwrap.dedent("""
    import json, sys
    from caffe.proto import caffe_pb2
    from google.protobuf.unknown_fields import UnknownFieldSet
    out = {}
    for path in sys.argv[1:]:
        net = caffe_pb2.NetParameter()
        net.ParseFromString(open(path, "rb").read())
        out[path] = {
            "layers": [[layer.name, layer.type,
                        [{"shape": list(b.shape.dim), "data": len(b.data),
                          "unknown": sorted({f.field_number for f in UnknownFieldSet(b)})}
                         for b in layer.blobs],
                        sorted({f.field_number for f in UnknownFieldSet(layer)})] for layer in net.layer],
            "reserialized": net.SerializeToString().hex(),
        }
    print(json.dumps(out))
""")


def test_reference_caffe_reads_saved_caffemodels(tmp_path, reference_caffe):
    model, weights = write_tiny(tmp_path, tiny_text(tail=""))
    out = tmp_path / "out"
    amct.save_quant_retrain_model(model, weights, "Both", str(out / "m"), str(out / "r.txt"))
    fake_path = str(out / "m_fake_quant_weights.caffemodel")
    deploy_path = str(out / "m_deploy_weights.caffemodel")
    proc = subprocess.run([reference_caffe, "-c", REF_PARSE, fake_path, deploy_path], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, GLOG_minloglevel="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    fake, deploy = seen[fake_path], seen[deploy_path]
    # float blobs are plain Caffe blobs; the DeQuant's parameter (field 200000) is an unknown field there
    assert fake["layers"][0][:2] == ["conv1", "Convolution"]
    assert [b["data"] for b in fake["layers"][0][2]] == [16, 2] and fake["layers"][0][2][0]["unknown"] == []
    assert fake["layers"][1][:2] == ["conv1_dequant_layer", "DeQuant"] and 200000 in fake["layers"][1][3]
    # integer blobs: shape parsed, values in unknown fields int8_data (10), int32_data (11), uint64_data (12)
    conv = deploy["layers"][0][2]
    assert conv[0] == {"shape": [2, 2, 2, 2], "data": 0, "unknown": [10]}
    assert conv[1] == {"shape": [2], "data": 0, "unknown": [11]}
    assert deploy["layers"][1][2] == [{"shape": [2], "data": 0, "unknown": [12]}]
    # unknown fields survive a round trip through Caffe's proto: our proto reads the same values back
    for path, got in ((fake_path, fake), (deploy_path, deploy)):
        again = caffe_pb2.NetParameter.FromString(bytes.fromhex(got["reserialized"]))
        assert again == load_caffemodel(path, upgrade=False)

    # Caffe loads the float layers of the fake-quant caffemodel (Quant/DeQuant layers are skipped by name)
    float_net = """
        name: "tiny"
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
                convolution_param { num_output: 2 kernel_size: 2 bias_term: true } }
    """
    q = np.arange(18, dtype=np.float64).reshape(1, 2, 3, 3) - 9.0
    xq = (q * S_D).astype(np.float32)  # already on the quantization grid
    result = run_reference(float_net, {"data": xq}, weights=fake_path)
    np.testing.assert_array_equal(result["params"]["conv1/0"], W_HAT)
    np.testing.assert_array_equal(result["params"]["conv1/1"], FAKE_BIAS)
    ours = Net(str(out / "m_fake_quant_model.prototxt"), TEST, weights=fake_path)
    ours.set_tensor("data", torch.from_numpy(xq))
    ours.run()
    np.testing.assert_allclose(ours.tensor("conv1").numpy(), result["blobs"]["conv1"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# (8) end to end: config -> retrain model -> forward in TRAIN (IFMR clips) -> save -> fake-quant runs
# ---------------------------------------------------------------------------------------------------------
def test_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.prototxt").write_text(MID)
    float_net = Net(parse_net(MID), TEST)
    randomize_params(float_net, 11)
    float_net.save(tmp_path / "m.caffemodel")
    amct.create_quant_retrain_config("config.json", "m.prototxt", "m.caffemodel")
    amct.create_quant_retrain_model("m.prototxt", "m.caffemodel", "config.json", "tmp/modified.prototxt",
                                    "tmp/modified.caffemodel", "tmp/record.txt")
    net = pycaffe.Net("tmp/modified.prototxt", "tmp/modified.caffemodel", pycaffe.TRAIN)
    rng = np.random.default_rng(2)
    for _ in range(2):
        net.forward(data=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    net.save("tmp/retrained.caffemodel")
    amct.save_quant_retrain_model("tmp/modified.prototxt", "tmp/retrained.caffemodel", "Both", "results/MID",
                                  None, None)
    assert listing(tmp_path / "results") == sorted(f.replace("m_", "MID_", 1) for f in FILES["Both"])
    record = read_record("tmp/record.txt")  # the path create_quant_retrain_model was given
    assert set(record) == set(MID_SHAPES) | {"fc2"}  # the default config enables every quantizable layer
    assert all(r.HasField("scale_d") and r.HasField("channels") for r in record.values())
    fq = pycaffe.Net("results/MID_fake_quant_model.prototxt", "results/MID_fake_quant_weights.caffemodel",
                     pycaffe.TEST)
    out = fq.forward(data=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert out["fc2"].shape == (2, 3) and np.isfinite(out["fc2"]).all()


def test_invalid_stored_clips_are_clip_checked(tmp_path, amct_log):
    """clip_min 0.5 > 0 fails ClipCheck: it is restored to the prototxt's clip_min (-1), as the retrain layer
    would do on its next forward, so s_d and o_d are those of (6.96875, -1) again."""
    blobs = {**tiny_blobs(), "conv1_act_retrain": [np.float32([CLIP_MAX]), np.float32([0.5])]}
    model, weights = write_tiny(tmp_path, blobs=blobs)
    amct.save_quant_retrain_model(model, weights, "Fakequant", str(tmp_path / "o" / "m"),
                                  str(tmp_path / "r.txt"))
    rec = read_record(tmp_path / "r.txt")["conv1"]
    assert rec.scale_d == S_D and rec.offset_d == O_D
    assert any(r.levelname == "WARNING" and "ClipCheck" in r.getMessage() for r in amct_log.records)


def test_logging(tmp_path, amct_log):
    model, weights = write_tiny(tmp_path)
    amct.save_quant_retrain_model(model, weights, "Deploy", str(tmp_path / "o" / "m"))
    messages = [(r.levelname, r.getMessage()) for r in amct_log.records]
    assert ("INFO", 'Do layer: "conv1" quant success!') in messages
    assert any(level == "DEBUG" and "scale_d 0.03125, offset_d -96" in msg for level, msg in messages)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
