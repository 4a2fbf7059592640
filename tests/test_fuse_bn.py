"""BatchNorm (+ Scale) folding into Convolution/Deconvolution: exact math, wiring, and when it is skipped.

Each folded net is run against the unfolded one in the engine on random inputs (BatchNorm statistics with a
scale factor != 1, random Scale parameters); the folded weights are also checked against the numpy fold of
tests/references/layers.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.model.blobs import blob_to_array
from amct_caffe.model.graph import Graph
from amct_caffe.model.weights import weights_from_net, weights_to_net
from amct_caffe.passes.fuse_bn import fuse_bn
from amct_caffe.proto import caffe_pb2
from tests.helpers import parse_net
from tests.references.layers import fold_batchnorm

INPUT = ('layer { name: "data" type: "Input" top: "data" '
         'input_param { shape { dim: 2 dim: 4 dim: 7 dim: 7 } } }\n')
CONV = ('layer {{ name: "conv" type: "{kind}" bottom: "data" top: "{top}" convolution_param {{ num_output: 4 '
        'kernel_size: 3 pad: 1 bias_term: {bias} {extra} }} }}\n')
BN = ('layer {{ name: "bn" type: "BatchNorm" bottom: "{bottom}" top: "{top}" '
      'batch_norm_param {{ eps: {eps} }} }}\n')
SCALE = ('layer {{ name: "scale" type: "Scale" bottom: "{bottom}" top: "{top}" '
         'scale_param {{ bias_term: {bias} }} }}\n')
TAIL = ('layer {{ name: "relu" type: "ReLU" bottom: "{last}" top: "{last}" }}\n'
        'layer {{ name: "after" type: "Convolution" bottom: "{last}" top: "out" '
        'convolution_param {{ num_output: 2 kernel_size: 1 }} }}\n')


def net_text(kind="Convolution", conv_bias=True, scale=True, scale_bias=True, in_place=True, mixed=False,
             extra="", eps=1e-5) -> str:
    """conv -> bn -> [scale] -> relu -> after; in place (all write "conv") or with new names."""
    text = INPUT
    bn_top = "conv" if in_place or mixed else "bn_out"
    text += CONV.format(kind=kind, top="conv", bias=str(conv_bias).lower(), extra=extra)
    text += BN.format(bottom="conv", top=bn_top, eps=eps)
    last = bn_top
    if scale:
        last = bn_top if in_place else "scale_out"
        text += SCALE.format(bottom=bn_top, top=last, bias=str(scale_bias).lower())
    return text + TAIL.format(last=last)


def random_model(text: str, seed: int = 0) -> tuple[caffe_pb2.NetParameter, caffe_pb2.NetParameter]:
    """The prototxt and a caffemodel of random weights (BatchNorm factor uniform in [0.5, 4])."""
    model = parse_net(text)
    net = Net(model, caffe_pb2.TEST)
    randomize_params(net, seed=seed)
    return model, net.to_proto()


def run(model: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter, x: np.ndarray) -> np.ndarray:
    net = Net(model, caffe_pb2.TEST, weights=weights)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    return net.tensor("out").numpy().copy()


def fold(model: caffe_pb2.NetParameter, caffemodel: caffe_pb2.NetParameter):
    graph = Graph(model, path="test.prototxt")
    weights = weights_from_net(caffemodel)
    folds = fuse_bn(graph, weights)
    folded = graph.to_net_parameter()
    return folds, folded, weights, weights_to_net(weights, folded)


CASES = {
    "conv-bias_bn_scale-bias_in-place": {},
    "conv-nobias_bn_scale-nobias_not-in-place": {"conv_bias": False, "scale_bias": False, "in_place": False},
    "conv-bias_bn_scale-nobias_not-in-place": {"scale_bias": False, "in_place": False},
    "conv-nobias_bn_scale-bias_mixed": {"conv_bias": False, "in_place": False, "mixed": True},
    "conv-bias_bn-only_in-place": {"scale": False},
    "conv-nobias_bn-only_not-in-place": {"conv_bias": False, "scale": False, "in_place": False},
    "grouped-conv_bn_scale": {"extra": "group: 2"},
    "deconv_bn_scale_in-place": {"kind": "Deconvolution"},
    "deconv-nobias_bn_scale_not-in-place": {"kind": "Deconvolution", "conv_bias": False, "in_place": False},
    "large-eps": {"eps": 0.5},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_folded_net_matches_unfolded(case):
    options = CASES[case]
    text = net_text(**options)
    model, caffemodel = random_model(text, seed=len(case))
    factor = float(caffemodel.layer[[lay.name for lay in caffemodel.layer].index("bn")].blobs[2].data[0])
    assert factor != 1.0
    folds, folded, weights, folded_weights = fold(model, caffemodel)

    scale = options.get("scale", True)
    assert [(f.conv, f.batch_norm, f.scale) for f in folds] == [("conv", "bn", "scale" if scale else None)]
    assert [layer.type for layer in folded.layer] == ["Input", options.get("kind", "Convolution"), "ReLU",
                                                      "Convolution"]
    conv = folded.layer[1]
    assert conv.convolution_param.bias_term
    # downstream layers keep their bottoms: the conv now writes the last folded layer's top
    relu = folded.layer[2]
    assert list(conv.top) == list(relu.bottom) == list(relu.top)
    assert "bn" not in weights and "scale" not in weights

    x = np.random.default_rng(7).normal(0.0, 1.0, (2, 4, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(run(folded, folded_weights, x), run(model, caffemodel, x),
                               rtol=1e-5, atol=1e-5)

    blobs = {lay.name: [blob_to_array(b) for b in lay.blobs] for lay in caffemodel.layer}
    axis = 1 if options.get("kind") == "Deconvolution" else 0
    w_exp, b_exp = fold_batchnorm(blobs, options.get("conv_bias", True), scale,
                                  options.get("scale_bias", True), axis, options.get("eps", 1e-5))
    np.testing.assert_allclose(weights["conv"][0], w_exp, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(weights["conv"][1], b_exp, rtol=1e-6, atol=1e-6)


def test_hand_computed_fold_with_zero_factor():
    """A BatchNorm factor of 0 means mean = var = 0 (Caffe's scale factor 0), so k = gamma / sqrt(eps)."""
    graph = Graph(parse_net(
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        'convolution_param { num_output: 4 kernel_size: 1 } }'
        'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { eps: 0.25 } }'
        'layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }'))
    w = np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1)
    weights = {
        "conv": [w, np.array([1, 2, 3, 4], np.float32)],
        "bn": [np.full(4, 9, np.float32), np.full(4, 5, np.float32), np.zeros(1, np.float32)],
        "scale": [np.array([1, -2, 0.5, 3], np.float32), np.array([0, 1, 0, -1], np.float32)],
    }
    fuse_bn(graph, weights)
    assert [layer.name for layer in graph] == ["conv"] and sorted(weights) == ["conv"]
    k = np.array([1, -2, 0.5, 3]) / 0.5  # gamma / sqrt(0 + 0.25)
    np.testing.assert_array_equal(weights["conv"][0], (w * k.reshape(4, 1, 1, 1)).astype(np.float32))
    # b' = (b - mean) * k + beta with mean = 0
    np.testing.assert_array_equal(weights["conv"][1],
                                  np.array([1 * 2, 2 * -4 + 1, 3 * 1, 4 * 6 - 1], np.float32))


def test_conv_output_read_elsewhere_is_not_folded(amct_log):
    text = INPUT + CONV.format(kind="Convolution", top="conv", bias="true", extra="")
    text += BN.format(bottom="conv", top="bn_out", eps=1e-5)
    text += SCALE.format(bottom="bn_out", top="bn_out", bias="true")
    text += 'layer { name: "side" type: "ReLU" bottom: "conv" top: "side" }\n'
    text += 'layer { name: "out" type: "Eltwise" bottom: "bn_out" bottom: "side" top: "out" }\n'
    model, caffemodel = random_model(text)
    folds, folded, weights, folded_weights = fold(model, caffemodel)
    assert folds == []
    assert folded == model
    original = weights_from_net(caffemodel)
    assert sorted(weights) == sorted(original)
    for name, arrays in original.items():
        assert all(np.array_equal(a, b) for a, b in zip(weights[name], arrays))
    messages = [r.getMessage() for r in amct_log.records if r.levelno == logging.DEBUG]
    assert any("'conv'" in m and "not folded" in m and "'side'" in m for m in messages), messages


def test_in_place_reader_between_bn_and_scale_keeps_scale():
    """A layer reading the BatchNorm output besides the Scale: BatchNorm is folded alone, Scale stays."""
    text = INPUT + CONV.format(kind="Convolution", top="conv", bias="true", extra="")
    text += BN.format(bottom="conv", top="conv", eps=1e-5)
    text += 'layer { name: "side" type: "ReLU" bottom: "conv" top: "side" }\n'
    text += SCALE.format(bottom="conv", top="conv", bias="true")
    text += 'layer { name: "out" type: "Eltwise" bottom: "conv" bottom: "side" top: "out" }\n'
    model, caffemodel = random_model(text, seed=3)
    folds, folded, _, folded_weights = fold(model, caffemodel)
    assert [(f.batch_norm, f.scale) for f in folds] == [("bn", None)]
    assert [layer.name for layer in folded.layer] == ["data", "conv", "side", "scale", "out"]
    x = np.random.default_rng(1).normal(0.0, 1.0, (2, 4, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(run(folded, folded_weights, x), run(model, caffemodel, x),
                               rtol=1e-5, atol=1e-5)


def test_grouped_deconvolution_is_not_folded(amct_log):
    model, caffemodel = random_model(net_text(kind="Deconvolution", extra="group: 2"))
    folds, folded, _, _ = fold(model, caffemodel)
    assert folds == [] and folded == model
    messages = [r.getMessage() for r in amct_log.records]
    assert any("'conv'" in m and "group 2" in m for m in messages), messages


def test_batch_norm_blob_of_another_shape_is_not_folded(amct_log):
    model = parse_net(net_text())
    graph = Graph(model)
    weights = {
        "conv": [np.ones((4, 4, 3, 3), np.float32), np.zeros(4, np.float32)],
        "bn": [np.zeros(5, np.float32), np.ones(5, np.float32), np.ones(1, np.float32)],
        "scale": [np.ones(4, np.float32), np.zeros(4, np.float32)],
    }
    assert fuse_bn(graph, weights) == []
    assert graph.to_net_parameter() == model
    assert any("'bn'" in r.getMessage() and "shapes" in r.getMessage() for r in amct_log.records)


def test_missing_weights_are_not_folded(amct_log):
    model = parse_net(net_text())
    graph = Graph(model)
    assert fuse_bn(graph, {}) == []
    assert any("no weights" in r.getMessage() for r in amct_log.records)


@pytest.mark.parametrize("rule_on", ["scale", "dropout"])
def test_phase_dependent_pattern_is_not_folded(rule_on, amct_log):
    """A Scale that exists in one phase only, or a TRAIN-only layer between conv and BatchNorm: no fold."""
    if rule_on == "scale":
        text = net_text().replace('scale_param {', 'include { phase: TEST } scale_param {')
    else:
        text = INPUT + CONV.format(kind="Convolution", top="conv", bias="true", extra="")
        text += 'layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv" include { phase: TRAIN } }\n'
        text += BN.format(bottom="conv", top="conv", eps=1e-5)
        text += SCALE.format(bottom="conv", top="conv", bias="true")
        text += TAIL.format(last="conv")
    model = parse_net(text)
    graph = Graph(model)
    weights = {
        "conv": [np.ones((4, 4, 3, 3), np.float32), np.zeros(4, np.float32)],
        "bn": [np.zeros(4, np.float32), np.ones(4, np.float32), np.ones(1, np.float32)],
        "scale": [np.ones(4, np.float32), np.zeros(4, np.float32)],
    }
    assert fuse_bn(graph, weights) == []
    assert graph.to_net_parameter() == model


def test_phase_independent_fold_with_phase_data_layers():
    """Per-phase data layers writing the same blob do not stop the fold of the shared layers."""
    text = net_text().replace(INPUT, (
        'layer { name: "d_train" type: "DummyData" top: "data" include { phase: TRAIN } '
        'dummy_data_param { shape { dim: 2 dim: 4 dim: 7 dim: 7 } } }\n'
        'layer { name: "d_test" type: "DummyData" top: "data" include { phase: TEST } '
        'dummy_data_param { shape { dim: 1 dim: 4 dim: 7 dim: 7 } } }\n'))
    graph = Graph(parse_net(text))
    weights = {
        "conv": [np.ones((4, 4, 3, 3), np.float32), np.zeros(4, np.float32)],
        "bn": [np.zeros(4, np.float32), np.ones(4, np.float32), np.ones(1, np.float32)],
        "scale": [np.ones(4, np.float32), np.zeros(4, np.float32)],
    }
    assert [f.conv for f in fuse_bn(graph, weights)] == ["conv"]
    assert [layer.name for layer in graph] == ["d_train", "d_test", "conv", "relu", "after"]


def test_bias_param_spec_taken_from_scale():
    """A conv without bias gets the learning-rate settings of the Scale's beta for its new bias."""
    text = net_text(conv_bias=False).replace(
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" ',
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        'param { lr_mult: 1 decay_mult: 1 } ')
    text = text.replace('type: "Scale" bottom: "conv" top: "conv" ',
                        'type: "Scale" bottom: "conv" top: "conv" param { lr_mult: 1 } '
                        'param { name: "shared_beta" lr_mult: 2 decay_mult: 0 } ')
    model, caffemodel = random_model(text)
    _, folded, _, _ = fold(model, caffemodel)
    conv = folded.layer[1]
    assert [(p.name, p.lr_mult, p.decay_mult) for p in conv.param] == [("", 1.0, 1.0), ("", 2.0, 0.0)]


def test_weights_mapping_round_trip_keeps_legacy_blobs():
    source = parse_net(
        'name: "w" layer { name: "ip" type: "InnerProduct" '
        'blobs { num: 1 channels: 1 height: 2 width: 3 data: [1, 2, 3, 4, 5, 6] } '
        'blobs { num: 1 channels: 1 height: 1 width: 2 data: [7, 8] } } '
        'layer { name: "odd" type: "PythonThing" '
        'blobs { num: 1 channels: 1 height: 1 width: 2 data: [1, 2] } } '
        'layer { name: "d" type: "BatchNorm" blobs { shape { dim: 2 } double_data: [0.5, 1.5] } }')
    weights = weights_from_net(source)
    assert weights["ip"][0].shape == (2, 3) and weights["ip"][1].shape == (2,)
    assert weights["odd"][0].shape == (1, 1, 1, 2)
    assert weights["d"][0].dtype == np.float32 and weights["d"][0].tolist() == [0.5, 1.5]
    model = parse_net('name: "m" layer { name: "ip" type: "InnerProduct" } '
                      'layer { name: "relu" type: "ReLU" } '
                      'layer { name: "odd" type: "PythonThing" } layer { name: "d" type: "BatchNorm" }')
    out = weights_to_net(weights, model, like=source)
    assert [layer.name for layer in out.layer] == ["ip", "odd", "d"]
    assert list(out.layer[0].blobs[0].shape.dim) == [2, 3]
    assert out.layer[0].blobs[0].data[:] == [1, 2, 3, 4, 5, 6]
    odd = out.layer[1].blobs[0]
    assert (odd.num, odd.channels, odd.height, odd.width) == (1, 1, 1, 2) and not odd.HasField("shape")
    assert list(out.layer[2].blobs[0].data) == [0.5, 1.5]


def test_batch_norm_without_global_stats_is_folded_with_its_stored_statistics():
    """use_global_stats: false does not stop the fold: QAT trains the folded conv (fuse_bn docstring)."""
    text = net_text().replace("batch_norm_param { eps: 1e-05 }",
                              "batch_norm_param { use_global_stats: false }")
    assert "use_global_stats: false" in text
    model = parse_net(text)
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(4, 4, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    stats = [rng.normal(size=4).astype(np.float32) * 2, rng.uniform(1, 2, 4).astype(np.float32) * 2,
             np.array([2.0], np.float32)]
    scale = [rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    weights = {"conv": [w, b], "bn": stats, "scale": scale, "after": [np.ones((2, 4, 1, 1), np.float32)]}
    expected = fold_batchnorm({"conv": [w, b], "bn": stats, "scale": scale}, True, True, True, 0, 1e-5)
    assert [f.conv for f in fuse_bn(Graph(model), weights)] == ["conv"]
    np.testing.assert_allclose(weights["conv"][0], expected[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(weights["conv"][1], expected[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["conv-nobias_bn_scale-nobias_not-in-place", "deconv_bn_scale_in-place"])
def test_folded_model_files_match_the_unfolded_net_in_real_caffe(case, reference_caffe, tmp_path):
    """The real Caffe runs the unfolded net with the original caffemodel and the folded net with the
    caffemodel we write: same output (and the written caffemodel loads there)."""
    from tests.helpers import assert_close
    from tests.references.real_caffe import run_reference

    text = net_text(**CASES[case])
    model, caffemodel = random_model(text, seed=11)
    _, folded, _, folded_weights = fold(model, caffemodel)
    original_path, folded_path = tmp_path / "original.caffemodel", tmp_path / "folded.caffemodel"
    original_path.write_bytes(caffemodel.SerializeToString())
    folded_path.write_bytes(folded_weights.SerializeToString())
    x = np.random.default_rng(5).normal(0.0, 1.0, (2, 4, 7, 7)).astype(np.float32)
    want = run_reference(text, inputs={"data": x}, weights=original_path)["blobs"]["out"]
    got = run_reference(text_format.MessageToString(folded), inputs={"data": x}, weights=folded_path)
    assert_close(got["blobs"]["out"], want, "out (real Caffe, folded files)")
    assert_close(run(folded, folded_weights, x), want, "out (our engine, folded)")
