"""The PTQ flow: init -> quantize_model (folds, ARQ scales into the record, IFMR layers) -> calibration
batches -> save_model, on a small net with BatchNorm after a convolution and after an InnerProduct, an AVE
pooling and one input read by two convolutions.

Expected values: the calibration prototxt is written out by hand; the record's weight scales are a numpy ARQ
of the folded weights, which are a numpy BatchNorm fold of the float weights; the activation factors are a
numpy IFMR over the data of ALL calibration batches (not just the last); the saved files are checked byte
by byte against those factors (int8 x scale_w = fake-quant weight, deq_scale bits, Quant scale/offset,
INT32 bias).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from amct_caffe import amct, caffe
from amct_caffe.engine.layers.calibration import IFMR, CalibrationResult
from amct_caffe.engine.net import Net
from amct_caffe.errors import (
    AmctError,
    ConfigError,
    GraphStateError,
    ModelFormatError,
    NotImplementedFeatureError,
    RecordError,
)
from amct_caffe.proto import caffe_pb2
from amct_caffe.workflows import ptq
from tests.helpers import (
    caffemodel_blobs,
    caffemodel_raw_blobs,
    low_words_as_float32,
    parse_net,
    parse_record,
    read_net,
    read_record,
)
from tests.ptq_helpers import BATCH_NUM, PtqFlow, calibration_batches
from tests.references import quant
from tests.references.layers import fold_batchnorm
from tests.references.nets import PTQ_NET, PTQ_QUANTIZED, one_ifmr_net, write_random_net

IFMR_PARAM = """ifmr_param {{ batch_num: {n} with_offset: true search_range_start: 0.7 search_range_end: 1.3
    search_step: 0.01 max_percentile: 0.999999 min_percentile: 0.999999 {objects}
    record_file_path: "{record}" }}"""


def expected_calibration_prototxt(record: str) -> str:
    """The calibration model written out by hand: BatchNorm/Scale folded (conv1 in place; ip1 takes the
    Scale's top), an IFMR layer before the first reader of every quantized input, the shared input of
    conv2a/conv2b listed once per reader."""
    def ifmr(name: str, bottoms: list[str], objects: list[str]) -> str:
        params = IFMR_PARAM.format(n=BATCH_NUM, record=record,
                                   objects=" ".join(f'object_layer: "{o}"' for o in objects))
        return (f'layer {{ name: "{name}" type: "IFMR" ' + " ".join(f'bottom: "{b}"' for b in bottoms)
                + f" {params} }}\n")
    return (
        'name: "ptqnet"\n'
        'layer { name: "data" type: "Input" top: "data" '
        'input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }\n'
        + ifmr("conv1_ifmr_layer", ["data"], ["conv1"])
        + 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
          'convolution_param { num_output: 4 bias_term: true pad: 1 kernel_size: 3 } }\n'
        'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
        + ifmr("pool1_ifmr_layer", ["conv1"], ["pool1"])
        + 'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
          'pooling_param { pool: AVE kernel_size: 2 stride: 2 } }\n'
        + ifmr("conv2a_ifmr_layer", ["pool1", "pool1"], ["conv2a", "conv2b"])
        + 'layer { name: "conv2a" type: "Convolution" bottom: "pool1" top: "conv2a" '
          'convolution_param { num_output: 3 kernel_size: 1 } }\n'
        'layer { name: "conv2b" type: "Convolution" bottom: "pool1" top: "conv2b" '
        'convolution_param { num_output: 3 bias_term: false kernel_size: 1 } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }\n'
        + ifmr("ip1_ifmr_layer", ["sum"], ["ip1"])
        + 'layer { name: "ip1" type: "InnerProduct" bottom: "sum" top: "scale_ip" '
          'inner_product_param { num_output: 5 bias_term: true } }\n'
        'layer { name: "prob" type: "Softmax" bottom: "scale_ip" top: "prob" }\n'
    )


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The small net through quantize_model and three calibration batches, then save_model('Both')."""
    folder = tmp_path_factory.mktemp("ptq_flow")
    flow = PtqFlow(folder)
    graph = flow.quantize()
    record_after_quantize = Path(flow.record).read_text()
    seen = flow.calibrate(calibration_batches())
    amct.save_model(graph, "Both", str(folder / "out" / "m"))
    return flow, graph, record_after_quantize, seen


# -- quantize_model ----------------------------------------------------------------------------------------
def test_calibration_prototxt_by_hand(calibrated):
    flow, _, _, _ = calibrated
    expected = parse_net(expected_calibration_prototxt(os.path.abspath(flow.record)))
    assert read_net(flow.cal_model) == expected


def test_ifmr_param_field_numbers():
    """AMCT's numbers (AMCT reference §3.2): LayerParameter.ifmr_param = 200001, IFMRParameter 1..9."""
    assert caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["ifmr_param"].number == 200001
    fields = caffe_pb2.IFMRParameter.DESCRIPTOR.fields_by_name
    numbers = {name: fields[name].number for name in fields}
    assert numbers == {"batch_num": 1, "with_offset": 2, "search_range_start": 3, "search_range_end": 4,
                       "search_step": 5, "max_percentile": 6, "min_percentile": 7, "object_layer": 8,
                       "record_file_path": 9}
    assert len(caffe_pb2.IFMRParameter(object_layer=["a", "b"]).object_layer) == 2  # repeated


def test_folded_weights_and_weight_scales_in_the_record(calibrated):
    flow, _, record_after_quantize, _ = calibrated
    float_blobs = caffemodel_blobs(flow.weights)
    folded = caffemodel_blobs(flow.cal_weights)
    assert not {"bn1", "scale1", "bn_ip", "scale_ip"} & set(folded)
    for conv, bn, scale in (("conv1", "bn1", "scale1"), ("ip1", "bn_ip", "scale_ip")):
        w, b = fold_batchnorm({"conv": float_blobs[conv], "bn": float_blobs[bn], "scale": float_blobs[scale]},
                              conv_bias=True, scale=True, scale_bias=True, axis=0, eps=1e-5)
        np.testing.assert_allclose(folded[conv][0], w, rtol=1e-6, atol=1e-7, err_msg=conv)
        np.testing.assert_allclose(folded[conv][1], b, rtol=1e-6, atol=1e-7, err_msg=conv)
    for name in ("conv2a", "conv2b"):
        for got, want in zip(folded[name], float_blobs[name]):
            np.testing.assert_array_equal(got, want)

    record = parse_record(record_after_quantize)
    assert list(record) == PTQ_QUANTIZED
    for name, channel_wise in (("conv1", True), ("conv2a", True), ("conv2b", True), ("ip1", False)):
        expected = quant.arq_scales(folded[name][0], channel_wise)
        np.testing.assert_array_equal(np.array(record[name].scale_w, np.float32), expected)
        assert list(record[name].offset_w) == [0] * len(expected)
        assert not record[name].HasField("scale_d") and not record[name].skip_fusion
    assert list(record["pool1"].scale_w) == [1.0] and list(record["pool1"].offset_w) == [0]


# -- calibration -------------------------------------------------------------------------------------------
def test_record_after_calibration_is_ifmr_over_all_batches(calibrated):
    flow, _, _, seen = calibrated
    record = read_record(flow.record)
    inputs = {"conv1": "data", "pool1": "conv1", "conv2a": "pool1", "conv2b": "pool1", "ip1": "sum"}
    for layer, blob in inputs.items():
        data = np.concatenate([x.ravel() for x in seen[blob]])
        ref = quant.ifmr(data)
        assert ref.gap > 1e-9, "no clear winner: summation order could flip the choice"
        assert np.float32(record[layer].scale_d) == ref.s, layer
        assert record[layer].offset_d == ref.o, layer
        c, h, w = seen[blob][0].shape[1:] + (1,) * (4 - seen[blob][0].ndim)
        assert (record[layer].channels, record[layer].height, record[layer].width) == (c, h, w)
    # the shared input gives both readers the same factors; the data input's last batch alone would not
    assert record["conv2a"].scale_d == record["conv2b"].scale_d
    assert quant.ifmr(seen["data"][-1]).s != np.float32(record["conv1"].scale_d)
    assert record["conv1"].offset_d != -128 and record["pool1"].offset_d == -128  # ReLU'd input: min 0


class ListRecorder:
    def __init__(self) -> None:
        self.results: list[CalibrationResult] = []

    def record(self, result: CalibrationResult) -> None:
        self.results.append(result)


@pytest.mark.parametrize("with_offset, percentiles", [
    (True, (0.999999, 0.999999)), (False, (0.999999, 0.999999)), (True, (0.95, 0.9))])
def test_ifmr_layer_state_and_result(with_offset, percentiles):
    net = one_ifmr_net(4, with_offset, bottoms=2, percentiles=percentiles)
    layer = net.engine_layers[net.layer_index("cal")]
    assert isinstance(layer, IFMR) and layer.recorder is None  # no record_file_path
    assert layer.gathered.numel() == 0 and layer.batches_gathered == 0  # the shape pass gathered nothing
    recorder = ListRecorder()
    layer.recorder = recorder
    rng = np.random.default_rng(5)
    data = [(rng.standard_normal((4, 2, 3)) * (i + 1) + 0.3).astype(np.float32) for i in range(5)]
    for i, x in enumerate(data[:4]):
        net.set_tensor("data", torch.from_numpy(x))
        net.run()
        if i < 3:
            # one copy per distinct bottom blob: "data" listed twice is gathered once
            assert layer.batches_gathered == i + 1 and layer.gathered.numel() == (i + 1) * x.size
            assert not layer.done
            np.testing.assert_array_equal(layer.gathered[-x.size:].numpy(), x.ravel())
    assert layer.done and layer.gathered.numel() == 0 and len(recorder.results) == 1
    result = recorder.results[0]
    ref = quant.ifmr(np.concatenate([x.ravel() for x in data[:4]]), with_offset,
                     max_percentile=percentiles[0], min_percentile=percentiles[1])
    assert ref.gap > 1e-9
    assert (np.float32(result.scale_d), result.offset_d) == (ref.s, ref.o)
    assert result.shapes == {"c0": (2, 3, 1), "c1": (2, 3, 1)} and result.batches == 4
    # a fifth batch changes nothing
    net.set_tensor("data", torch.from_numpy(data[4]))
    net.run()
    assert len(recorder.results) == 1 and layer.result == result


def test_ifmr_layer_writes_the_record_file(tmp_path):
    record = tmp_path / "r.txt"
    record.write_text('record { key: "c0" value { scale_w: 0.5 offset_w: 0 } }\n')
    net = one_ifmr_net(2, record=str(record))
    for value in (1.0, -2.0):
        net.set_tensor("data", torch.full((4, 2, 3), value))
        net.run()
    rec = read_record(record)["c0"]
    # the two batches together: 24 ones and 24 minus twos
    ref = quant.ifmr(np.array([1.0] * 24 + [-2.0] * 24, np.float32))
    assert (np.float32(rec.scale_d), rec.offset_d) == (ref.s, ref.o)
    assert list(rec.scale_w) == [0.5] and (rec.channels, rec.height, rec.width) == (2, 3, 1)


def test_ifmr_layer_bad_parameters_and_data():
    with pytest.raises(ModelFormatError, match="batch_num"):
        one_ifmr_net(0)
    with pytest.raises(ModelFormatError, match="object_layer"):
        Net(parse_net('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 } } }\n'
                      'layer { name: "cal" type: "IFMR" bottom: "data" ifmr_param { batch_num: 1 '
                      "search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 max_percentile: 1 "
                      "min_percentile: 1 } }"))
    net = one_ifmr_net(1)
    net.engine_layers[1].recorder = ListRecorder()
    net.set_tensor("data", torch.full((4, 2, 3), float("nan")))
    with pytest.raises(AmctError, match="'cal'.*inf or NaN"):
        net.run()


# -- save_model ----------------------------------------------------------------------------------------------
def test_saved_files(calibrated):
    flow, _, _, _ = calibrated
    out = flow.folder / "out"
    assert sorted(os.listdir(out)) == sorted([
        "m_fake_quant_model.prototxt", "m_fake_quant_weights.caffemodel", "m_deploy_model.prototxt",
        "m_deploy_weights.caffemodel", "m_quant.json"])
    fake_net = read_net(out / "m_fake_quant_model.prototxt")
    assert fake_net == read_net(out / "m_deploy_model.prototxt")
    names = [layer.name for layer in fake_net.layer]
    assert names == ["data", "conv1_quant_layer", "conv1", "conv1_dequant_layer", "relu1",
                     "pool1_quant_layer", "pool1", "pool1_dequant_layer", "conv2a_quant_layer", "conv2a",
                     "conv2a_dequant_layer", "conv2b", "conv2b_dequant_layer", "sum", "ip1_quant_layer",
                     "ip1", "ip1_dequant_layer", "prob"]
    assert not any(layer.type == "IFMR" for layer in fake_net.layer)
    record = read_record(flow.record)
    layers = {layer.name: layer for layer in fake_net.layer}
    for name, bottom in (("conv1", "data"), ("pool1", "conv1"), ("conv2a", "pool1"), ("ip1", "sum")):
        q = layers[f"{name}_quant_layer"]
        assert list(q.bottom) == [bottom]
        assert q.quant_param.scale == np.float32(1.0) / np.float32(record[name].scale_d)
        assert q.quant_param.offset == bytes([record[name].offset_d & 0xFF]) and q.quant_param.with_offset
    assert layers["conv2a_quant_layer"].quant_param.object_layer == "conv2a-conv2b"
    assert list(layers["conv2b"].bottom) == ["conv2a_quant_layer"]
    assert list(layers["ip1_dequant_layer"].top) == ["scale_ip"]

    folded = caffemodel_blobs(flow.cal_weights)
    fake = caffemodel_blobs(out / "m_fake_quant_weights.caffemodel")
    deploy = caffemodel_raw_blobs(out / "m_deploy_weights.caffemodel")
    for name in ("conv1", "conv2a", "conv2b", "ip1"):
        rec = record[name]
        s_w = np.array(rec.scale_w, np.float32)
        w = folded[name][0]
        shape = [-1] + [1] * (w.ndim - 1) if s_w.size > 1 else [1] * w.ndim
        codes = quant.arq_codes(w, s_w, channel_wise=s_w.size > 1)
        int8 = np.frombuffer(deploy[name][0].int8_data, np.int8).reshape(w.shape)
        np.testing.assert_array_equal(int8, codes.astype(np.int8))
        np.testing.assert_array_equal(fake[name][0], (int8.astype(np.float32) * s_w.reshape(shape)))
        deq = (np.float64(np.float32(rec.scale_d)) * s_w.astype(np.float64)).astype(np.float32)
        dq = deploy[f"{name}_dequant_layer"]
        assert len(dq) == 1
        np.testing.assert_array_equal(low_words_as_float32(list(dq[0].uint64_data)), deq)
        assert all(word >> 32 == 0 for word in dq[0].uint64_data)
        np.testing.assert_array_equal(fake[f"{name}_dequant_layer"][0], deq)
        if len(folded[name]) > 1:
            b_q = quant.round_away(folded[name][1].astype(np.float64)
                                   / (np.float64(np.float32(rec.scale_d)) * s_w.astype(np.float64)))
            np.testing.assert_array_equal(np.array(deploy[name][1].int32_data), b_q.astype(np.int64))
            np.testing.assert_array_equal(fake[name][1], (b_q * deq.astype(np.float64)).astype(np.float32))
    assert "conv1_quant_layer" not in fake and "pool1" not in fake
    np.testing.assert_array_equal(low_words_as_float32(list(deploy["pool1_dequant_layer"][0].uint64_data)),
                                  [np.float32(record["pool1"].scale_d)])


def test_quant_info_json(calibrated):
    flow, _, _, _ = calibrated
    info = json.loads((flow.folder / "out" / "m_quant.json").read_text())
    record = read_record(flow.record)
    assert info["version"] == 1
    assert info["fusions"] == [{"layer": "conv1", "fused_layers": ["bn1", "scale1"]},
                               {"layer": "ip1", "fused_layers": ["bn_ip", "scale_ip"]}]
    by_layer = {entry["layer"]: entry for entry in info["quantized_layers"]}
    assert list(by_layer) == PTQ_QUANTIZED
    assert by_layer["conv2b"] == {
        "layer": "conv2b", "type": "Convolution", "quant_layer": "conv2a_quant_layer",
        "quant_bottom": "pool1",
        "dequant_layer": "conv2b_dequant_layer", "dequant_top": "conv2b",
        "scale_d": float(np.float32(record["conv2b"].scale_d)), "offset_d": record["conv2b"].offset_d,
        "channel_wise": True}
    assert by_layer["ip1"]["dequant_top"] == "scale_ip" and by_layer["ip1"]["channel_wise"] is False


def test_fake_quant_and_deploy_run_close_to_float(calibrated):
    flow, _, _, _ = calibrated
    out = flow.folder / "out"
    x = calibration_batches(seed=9)[0]
    scores = {}
    models = (("float", flow.model, flow.weights),
              ("fake", out / "m_fake_quant_model.prototxt", out / "m_fake_quant_weights.caffemodel"),
              ("deploy", out / "m_deploy_model.prototxt", out / "m_deploy_weights.caffemodel"))
    for kind, model, weights in models:
        net = caffe.Net(str(model), caffe.TEST, weights=str(weights))
        scores[kind] = net.forward(data=x)["prob"].copy()
    assert np.abs(scores["fake"] - scores["float"]).max() < 0.05
    assert np.abs(scores["deploy"] - scores["fake"]).max() < 1e-3


def test_symmetric_activations(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=1, activation_offset=False)
    graph = flow.quantize()
    assert all(layer.ifmr_param.with_offset is False for layer in read_net(flow.cal_model).layer
               if layer.type == "IFMR")
    seen = flow.calibrate(calibration_batches()[:1])
    record = read_record(flow.record)
    ref = quant.ifmr(seen["data"][0], with_offset=False)
    assert (np.float32(record["conv1"].scale_d), record["conv1"].offset_d) == (ref.s, 0)
    amct.save_model(graph, "Fakequant", str(tmp_path / "sym"))
    fake = {layer.name: layer for layer in read_net(tmp_path / "sym_fake_quant_model.prototxt").layer}
    assert fake["conv1_quant_layer"].quant_param.with_offset is False
    assert fake["conv1_quant_layer"].quant_param.offset == b"\x00"
    assert (tmp_path / "sym_quant.json").exists() and not (tmp_path / "sym_deploy_model.prototxt").exists()


def test_fusion_switches_and_skip_fusion_in_the_record(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=1)
    config = json.loads(Path(flow.config).read_text())
    config["skip_fusion_layers"] = ["ip1"]
    Path(flow.config).write_text(json.dumps(config))
    flow.quantize()
    names = [layer.name for layer in read_net(flow.cal_model).layer]
    assert "bn1" not in names and {"bn_ip", "scale_ip"} <= set(names)
    record = read_record(flow.record)
    assert record["ip1"].skip_fusion and not record["conv1"].skip_fusion
    config["do_fusion"] = False
    config["skip_fusion_layers"] = []
    Path(flow.config).write_text(json.dumps(config))
    flow.quantize()
    names = [layer.name for layer in read_net(flow.cal_model).layer]
    assert {"bn1", "scale1", "bn_ip", "scale_ip"} <= set(names)
    record = read_record(flow.record)
    assert record["ip1"].skip_fusion and record["conv1"].skip_fusion and not record["conv2a"].skip_fusion


def test_partial_config_keeps_other_layers_float(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=1)
    config = json.loads(Path(flow.config).read_text())
    for name in ("pool1", "conv2b", "ip1"):
        config[name]["quant_enable"] = False
    Path(flow.config).write_text(json.dumps(config))
    graph = flow.quantize()
    flow.calibrate(calibration_batches()[:1])
    amct.save_model(graph, "Deploy", str(tmp_path / "p"))
    names = [layer.name for layer in read_net(tmp_path / "p_deploy_model.prototxt").layer]
    assert [n for n in names if n.endswith("_quant_layer")] == ["conv1_quant_layer", "conv2a_quant_layer"]
    deploy = caffemodel_raw_blobs(tmp_path / "p_deploy_weights.caffemodel")
    assert deploy["conv2b"][0].int8_data == b"" and len(deploy["conv2b"][0].data) > 0
    assert set(read_record(flow.record)) == {"conv1", "conv2a"}


# -- errors ------------------------------------------------------------------------------------------------
def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_before_calibration_is_a_record_error(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=2)
    graph = flow.init()
    before = _listing(tmp_path)
    with pytest.raises(RecordError, match="quantize_model"):
        amct.save_model(graph, "Both", str(tmp_path / "out" / "m"))
    amct.quantize_model(graph, flow.cal_model, flow.cal_weights)
    before = _listing(tmp_path)
    with pytest.raises(RecordError) as info:
        amct.save_model(graph, "Both", str(tmp_path / "out" / "m"))
    message = str(info.value)
    for words in ("calibration has not run", "calibration.prototxt", "2 time(s)"):
        assert words in message
    flow.calibrate(calibration_batches()[:1])  # one batch of two: still no factors
    with pytest.raises(RecordError, match="calibration has not run"):
        amct.save_model(graph, "Both", str(tmp_path / "out" / "m"))
    assert _listing(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_graph_reused_after_its_files_changed(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=1)
    graph = flow.quantize()
    flow.calibrate(calibration_batches()[:1])
    for path in (flow.config, flow.model, flow.weights):
        original = Path(path).read_bytes()
        Path(path).write_bytes(original + b"\n")
        for call in (lambda: amct.save_model(graph, "Both", str(tmp_path / "o" / "m")),
                     lambda: amct.quantize_model(graph, str(tmp_path / "x.prototxt"),
                                                 str(tmp_path / "x.cm"))):
            with pytest.raises(GraphStateError) as info:
                call()
            assert os.path.basename(path) in str(info.value) and "init()" in str(info.value)
        Path(path).write_bytes(original)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.prototxt").exists()
    amct.save_model(graph, "Fakequant", str(tmp_path / "o" / "m"))  # unchanged again: accepted
    os.remove(flow.weights)
    with pytest.raises(GraphStateError, match="removed"):
        amct.save_model(graph, "Fakequant", str(tmp_path / "o" / "m"))


def test_graph_rehashes_only_files_that_may_have_changed(tmp_path, monkeypatch):
    # Files older than the racy window are trusted by their stat (no second read of a big caffemodel);
    # a same-size rewrite still moves the stat (ctime), so it is caught.
    flow = PtqFlow(tmp_path, batch_num=1)
    old = time.time() - 3600
    for path in (flow.config, flow.model, flow.weights):
        os.utime(path, (old, old))
    time.sleep(2.1)  # ctime (moved by utime) must also be older than the racy window
    graph = amct.init(flow.config, flow.model, flow.weights, str(tmp_path / "record.txt"))
    hashed: list[str] = []
    real_digest = ptq.file_digest
    monkeypatch.setattr(ptq, "file_digest", lambda path: hashed.append(path) or real_digest(path))
    amct.quantize_model(graph, flow.cal_model, flow.cal_weights)
    assert hashed == []
    data = bytearray(Path(flow.weights).read_bytes())
    data[-1] ^= 0x01  # same size, other bytes
    Path(flow.weights).write_bytes(bytes(data))
    with pytest.raises(GraphStateError, match="weights_file"):
        amct.quantize_model(graph, flow.cal_model, flow.cal_weights)
    assert hashed == [os.path.abspath(flow.weights)]


def test_init_errors_write_no_record(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=1)
    other = tmp_path / "other"
    other.mkdir()
    other_model, other_weights = write_random_net(other, PTQ_NET.replace('"conv2b"', '"conv2c"'), "other")
    record = tmp_path / "new_record.txt"
    with pytest.raises(ConfigError, match="conv2b"):  # the config of another model
        amct.init(flow.config, other_model, other_weights, str(record))
    bad_weights = tmp_path / "bad.caffemodel"
    net = Net(parse_net(PTQ_NET.replace("num_output: 5", "num_output: 6")))
    net.save(bad_weights)
    with pytest.raises(ModelFormatError, match="do not fit"):
        amct.init(flow.config, flow.model, str(bad_weights), str(record))
    with pytest.raises(ConfigError, match="record"):
        amct.init(flow.config, flow.model, flow.weights, flow.config)
    with pytest.raises(ConfigError, match="must be a non-empty file path"):
        amct.init(flow.config, flow.model, flow.weights, None)  # type: ignore[arg-type]
    assert not record.exists()


def test_quantize_and_save_argument_errors(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=1)
    graph = flow.quantize()
    flow.calibrate(calibration_batches()[:1])
    before = _listing(tmp_path)
    cases = [
        (lambda: amct.quantize_model(graph, flow.model, flow.cal_weights), ConfigError, "model_file"),
        (lambda: amct.quantize_model(graph, flow.cal_model, flow.cal_model), ConfigError, "same file"),
        (lambda: amct.quantize_model("graph", flow.cal_model, flow.cal_weights), ConfigError, "init()"),
        (lambda: amct.save_model(graph, "both", str(tmp_path / "s")), ConfigError, "save_type"),
        (lambda: amct.save_model(graph, 1, str(tmp_path / "s")), ConfigError, "save_type"),
        (lambda: amct.save_model(graph, "Both", str(tmp_path) + os.sep), ConfigError, "prefix"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
    assert _listing(tmp_path) == before


def test_not_implemented_apis_and_package_names():
    import amct_caffe

    for api in (amct.auto_nuq, amct.auto_decomposition, amct_caffe.auto_nuq):
        with pytest.raises(NotImplementedFeatureError, match="not implemented"):
            api("m.prototxt", "w.caffemodel")
    for name in ("create_quant_config", "init", "quantize_model", "save_model", "convert_model"):
        assert getattr(amct_caffe, name) is getattr(amct, name)


def test_record_changed_after_quantize_is_refused(tmp_path):
    flow = PtqFlow(tmp_path, batch_num=1)
    graph = flow.quantize()
    flow.calibrate(calibration_batches()[:1])
    lines = Path(flow.record).read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("scale_w:"))  # conv1's
    Path(flow.record).write_text("".join(lines[:first] + lines[first + 1:]))
    with pytest.raises(RecordError, match="conv1.*scale_w has 3 value"):
        amct.save_model(graph, "Both", str(tmp_path / "o" / "m"))
    os.remove(flow.record)
    with pytest.raises(RecordError, match="does not exist"):
        amct.save_model(graph, "Both", str(tmp_path / "o" / "m"))
