"""convert_model: fake-quant and deploy models from a hand-written record (power-of-two factors, so every
expected number is exact), per-layer skip_fusion, layers of one input with different factors, and the
refusals (shift_bit, AMCT layers in the model, entries that do not fit the model) -> named errors, nothing
written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import amct
from amct_caffe.errors import ConfigError, RecordError
from tests.helpers import caffemodel_blobs, caffemodel_raw_blobs, low_words_as_float32, read_net
from tests.ptq_helpers import PtqFlow, calibration_batches
from tests.references import quant
from tests.references.layers import fold_batchnorm
from tests.references.nets import write_random_net

S_W_CONV1 = [2.0**-7, 2.0**-6, 2.0**-7, 2.0**-8]
S_W_CONV2B = [2.0**-6, 2.0**-7, 2.0**-6]
RECORD = f"""
record {{ key: "conv1" value {{ scale_d: 0.0625 offset_d: -3
    {" ".join(f"scale_w: {v}" for v in S_W_CONV1)} offset_w: 0 offset_w: 0 offset_w: 0 offset_w: 0 }} }}
record {{ key: "pool1" value {{ scale_d: 0.03125 offset_d: -128 }} }}
record {{ key: "conv2a" value {{ scale_d: 0.03125 offset_d: -128 scale_w: 0.015625 offset_w: 0 }} }}
record {{ key: "conv2b" value {{ scale_d: 0.0625 offset_d: -100
    {" ".join(f"scale_w: {v}" for v in S_W_CONV2B)} }} }}
record {{ key: "ip1" value {{ scale_d: 0.25 offset_d: 10 scale_w: 0.0078125 skip_fusion: true }} }}
"""
FACTORS = {  # layer: (scale_d, offset_d, scale_w, channel_wise)
    "conv1": (0.0625, -3, S_W_CONV1, True),
    "pool1": (0.03125, -128, [1.0], False),
    "conv2a": (0.03125, -128, [0.015625], False),
    "conv2b": (0.0625, -100, S_W_CONV2B, True),
    "ip1": (0.25, 10, [0.0078125], False),
}
FILES = ["m_fake_quant_model.prototxt", "m_fake_quant_weights.caffemodel", "m_deploy_model.prototxt",
         "m_deploy_weights.caffemodel"]


def _setup(tmp_path: Path, record: str = RECORD) -> tuple[str, str, str]:
    model, weights = write_random_net(tmp_path)
    path = tmp_path / "record.txt"
    path.write_text(record)
    return model, weights, str(path)


def test_convert_model_by_hand(tmp_path):
    model, weights, record = _setup(tmp_path)
    record_before = Path(record).read_text()
    amct.convert_model(model, weights, record, str(tmp_path / "out" / "m"))
    assert sorted(os.listdir(tmp_path / "out")) == sorted(FILES)  # no _quant.json, the record only read
    assert Path(record).read_text() == record_before
    net = read_net(tmp_path / "out" / "m_fake_quant_model.prototxt")
    assert net == read_net(tmp_path / "out" / "m_deploy_model.prototxt")
    layers = {layer.name: layer for layer in net.layer}
    assert [layer.name for layer in net.layer] == [
        "data", "conv1_quant_layer", "conv1", "conv1_dequant_layer", "relu1", "pool1_quant_layer", "pool1",
        "pool1_dequant_layer", "conv2a_quant_layer", "conv2a", "conv2a_dequant_layer", "conv2b_quant_layer",
        "conv2b", "conv2b_dequant_layer", "sum", "ip1_quant_layer", "ip1", "ip1_dequant_layer", "bn_ip",
        "scale_ip", "prob"]
    # conv2a and conv2b read one input with different factors: two Quant layers
    assert layers["conv2b_quant_layer"].quant_param.scale == 16.0
    assert layers["conv2b_quant_layer"].quant_param.offset == bytes([256 - 100])
    assert list(layers["conv2b_quant_layer"].bottom) == ["pool1"]
    ip1_quant = layers["ip1_quant_layer"].quant_param
    assert ip1_quant.scale == 4.0 and ip1_quant.offset == b"\n"
    assert layers["conv1_quant_layer"].quant_param.offset == bytes([253])
    channel_wise = [layers[f"{n}_dequant_layer"].dequant_param.channel_wise
                    for n in ("conv1", "conv2a", "conv2b")]
    assert channel_wise == [True, False, True]
    assert list(layers["ip1_dequant_layer"].top) == ["ip1"]  # skip_fusion: the BatchNorm reads ip1 still

    float_blobs = caffemodel_blobs(weights)
    conv1 = {"conv": float_blobs["conv1"], "bn": float_blobs["bn1"], "scale": float_blobs["scale1"]}
    w1, b1 = fold_batchnorm(conv1, conv_bias=True, scale=True, scale_bias=True, axis=0, eps=1e-5)
    source = {"conv1": [w1, b1], "conv2a": float_blobs["conv2a"], "conv2b": float_blobs["conv2b"],
              "ip1": float_blobs["ip1"]}
    fake = caffemodel_blobs(tmp_path / "out" / "m_fake_quant_weights.caffemodel")
    deploy = caffemodel_raw_blobs(tmp_path / "out" / "m_deploy_weights.caffemodel")
    for name, blobs in source.items():
        s_d, _, scale_w, channel_wise = FACTORS[name]
        s_w = np.array(scale_w, np.float32)
        w = blobs[0]
        shape = [-1] + [1] * (w.ndim - 1) if channel_wise else [1] * w.ndim
        codes = quant.arq_codes(w, s_w, channel_wise).astype(np.int8)
        int8 = np.frombuffer(deploy[name][0].int8_data, np.int8).reshape(w.shape)
        np.testing.assert_array_equal(int8, codes)
        np.testing.assert_array_equal(fake[name][0], codes.astype(np.float32) * s_w.reshape(shape))
        deq = np.float32(s_d) * s_w  # powers of two: exact
        np.testing.assert_array_equal(low_words_as_float32(deploy[f"{name}_dequant_layer"][0].uint64_data),
                                      deq)
        if len(blobs) > 1:
            b_q = quant.round_away(blobs[1].astype(np.float64) / deq.astype(np.float64))
            np.testing.assert_array_equal(np.array(deploy[name][1].int32_data), b_q.astype(np.int64))
    # the kept BatchNorm/Scale stay float in both models
    for name in ("bn_ip", "scale_ip"):
        for got, want in zip(fake[name], float_blobs[name]):
            np.testing.assert_array_equal(got, want)
        assert all(len(b.data) and not b.int8_data for b in deploy[name])
    np.testing.assert_array_equal(low_words_as_float32(deploy["pool1_dequant_layer"][0].uint64_data),
                                  [0.03125])


def test_convert_matches_save_model_on_a_ptq_record(tmp_path):
    """The record of a PTQ run, converted, gives the same four files as save_model (same code path for the
    models, so this pins that convert_model reads the record as save_model does)."""
    flow = PtqFlow(tmp_path, batch_num=1)
    graph = flow.quantize()
    flow.calibrate(calibration_batches()[:1])
    amct.save_model(graph, "Both", str(tmp_path / "ptq" / "m"))
    amct.convert_model(flow.model, flow.weights, flow.record, str(tmp_path / "conv" / "m"))
    for name in FILES:
        assert (tmp_path / "ptq" / name).read_bytes() == (tmp_path / "conv" / name).read_bytes(), name


BAD_RECORDS = [
    ("shift_bit", RECORD.replace("offset_d: -128 scale_w: 0.015625",
                                 "offset_d: -128 scale_w: 0.015625 shift_bit: 3"),
     RecordError, ["conv2a", "shift_bit is not supported"]),
    ("unknown layer", RECORD + 'record { key: "conv9" value { scale_d: 1 offset_d: 0 scale_w: 1 } }',
     RecordError, ["conv9", "no such layer"]),
    ("unquantizable", RECORD + 'record { key: "relu1" value { scale_d: 1 offset_d: 0 } }',
     RecordError, ["relu1", "cannot be quantized"]),
    ("no scale_d", RECORD.replace("scale_d: 0.25 offset_d: 10", "offset_d: 10"), RecordError,
     ["ip1", "scale_d missing"]),
    ("no scale_w", RECORD.replace("offset_d: 10 scale_w: 0.0078125", "offset_d: 10"), RecordError,
     ["ip1", "scale_w missing"]),
    ("ip channel-wise", RECORD.replace("offset_d: 10 scale_w: 0.0078125",
                                       "offset_d: 10 " + "scale_w: 1 " * 5),
     RecordError, ["ip1", "scale_w has 5 values", "InnerProduct is per tensor"]),
    ("conv count", RECORD.replace("-128 scale_w: 0.015625 offset_w: 0", "-128 scale_w: 0.015625 scale_w: "
                                                                        "0.015625"),
     RecordError,
     ["conv2a", "scale_w has 2 values", "1 or 3"]),
    ("offset_w", RECORD.replace("scale_w: 0.015625 offset_w: 0", "scale_w: 0.015625 offset_w: 2"),
     RecordError,
     ["conv2a", "offset_w"]),
    ("offset_d range", RECORD.replace("offset_d: 10", "offset_d: 200"), RecordError, ["ip1", "offset_d"]),
    ("not a record", "record { key: ", RecordError, ["Cannot parse"]),
    ("empty", "", RecordError, ["lists no layer"]),
]


@pytest.mark.parametrize("name, text, error, words", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_records_write_nothing(tmp_path, name, text, error, words):
    model, weights, record = _setup(tmp_path, text)
    with pytest.raises(error) as info:
        amct.convert_model(model, weights, record, str(tmp_path / "out" / "m"))
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert not (tmp_path / "out").exists()


def test_models_with_amct_layers_are_refused(tmp_path):
    model, weights, record = _setup(tmp_path)
    amct.convert_model(model, weights, record, str(tmp_path / "out" / "m"))
    for prefix in ("m_fake_quant", "m_deploy"):
        with pytest.raises(ConfigError, match="already quantized.*Quant"):
            amct.convert_model(str(tmp_path / "out" / f"{prefix}_model.prototxt"),
                               str(tmp_path / "out" / f"{prefix}_weights.caffemodel"), record,
                               str(tmp_path / "again" / "m"))
    anti = Path(model).read_text().replace('type: "ReLU"', 'type: "AntiQuant"')
    (tmp_path / "anti.prototxt").write_text(anti)
    with pytest.raises(ConfigError, match="AntiQuant"):
        amct.convert_model(str(tmp_path / "anti.prototxt"), weights, record, str(tmp_path / "again" / "m"))
    assert not (tmp_path / "again").exists()


def test_output_over_an_input_is_refused(tmp_path):
    model, weights, record = _setup(tmp_path)
    os.rename(weights, str(tmp_path / "m_deploy_weights.caffemodel"))
    with pytest.raises(ConfigError, match="input file"):
        amct.convert_model(model, str(tmp_path / "m_deploy_weights.caffemodel"), record, str(tmp_path / "m"))
    assert not (tmp_path / "m_fake_quant_model.prototxt").exists()


def test_arq_reference_agrees_on_power_of_two_weights():
    """The numpy ARQ used as reference: a channel whose extreme is -2 gets 2/128, one whose extreme is 0.5
    gets 0.5/127 (hand values)."""
    w = np.array([[[[-2.0]], [[1.0]]], [[[0.5]], [[0.25]]]], np.float32)
    np.testing.assert_array_equal(quant.arq_scales(w, True),
                                  np.array([2 / 128, np.float32(0.5) / np.float32(127)], np.float32))
