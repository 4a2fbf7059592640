"""Net semantics as Caffe and pycaffe define them: blob order, outputs, in-place, weights by name, sharing."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe import caffe
from amct_caffe.errors import ModelFormatError, RuntimeEngineError, UnsupportedLayerError, WeightShapeError
from amct_caffe.model.blobs import array_to_blob
from amct_caffe.model.io import load_caffemodel, save_caffemodel
from amct_caffe.proto import caffe_pb2

MLP = """
name: "mlp"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 4 weight_filler { type: "constant" value: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "zz"
        inner_product_param { num_output: 2 bias_term: false } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip1" top: "aa"
        inner_product_param { num_output: 2 bias_term: false } }
"""


def net_from(text: str, phase=caffe.TEST, **kwargs) -> caffe.Net:
    return caffe.Net(text_format.Merge(text, caffe_pb2.NetParameter()), phase, **kwargs)


def test_blobs_inputs_outputs_in_caffe_order():
    net = net_from(MLP)
    assert list(net.blobs) == ["data", "ip1", "zz", "aa"]
    assert net.inputs == ["data"]
    assert net.outputs == ["aa", "zz"]  # Caffe keeps outputs in a std::set: sorted by name
    assert list(net.params) == ["ip1", "ip2", "ip3"]
    assert [layer.type for layer in net.layers] == ["Input", "InnerProduct", "ReLU", "InnerProduct",
                                                    "InnerProduct"]
    assert net.params["ip1"][0].data.shape == (4, 3)
    assert net.top_names["relu1"] == ["ip1"] and net.bottom_names["ip2"] == ["ip1"]
    assert list(net.top_names) == ["data", "ip1", "relu1", "ip2", "ip3"]
    assert net.blobs["ip1"].data.shape == (2, 4)


def test_forward_in_place_and_param_writes():
    net = net_from(MLP)
    x = np.array([[1.0, -2.0, 3.0], [-4.0, 0.0, 1.0]], np.float32)
    w2 = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    net.params["ip2"][0].data[...] = w2  # pycaffe: writes go into the weights
    net.params["ip1"][1].data[...] = [1, -10, 0, 0]
    out = net.forward(data=x)
    h = x @ np.full((4, 3), 0.5, np.float32).T + np.array([1, -10, 0, 0], np.float32)
    h = np.maximum(h, 0)
    # the in-place ReLU leaves its output under the blob name "ip1"
    np.testing.assert_allclose(net.blobs["ip1"].data, h, rtol=1e-6)
    np.testing.assert_allclose(out["zz"], h @ w2.T, rtol=1e-6)
    assert set(out) == {"aa", "zz"}


def test_forward_end_and_extra_blobs():
    net = net_from(MLP)
    out = net.forward(end="relu1", data=np.ones((2, 3), np.float32))
    assert set(out) == {"ip1"}
    out = net.forward(blobs=["data"], data=np.ones((2, 3), np.float32))
    assert set(out) == {"aa", "zz", "data"}
    with pytest.raises(RuntimeEngineError, match="do not match"):
        net.forward(wrong=np.ones((2, 3), np.float32))
    with pytest.raises(RuntimeEngineError, match="reshape"):
        net.forward(data=np.ones((5, 3), np.float32))


def test_input_reshape_propagates():
    net = net_from(MLP)
    net.blobs["data"].reshape(7, 3)
    net.reshape()
    assert net.blobs["zz"].data.shape == (7, 2)
    out = net.forward(data=np.ones((7, 3), np.float32))
    assert out["zz"].shape == (7, 2)


def _weights(layers: dict[str, list[np.ndarray]], legacy: bool = False) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter(name="src")
    for name, arrays in layers.items():
        lp = net.layer.add(name=name, type="InnerProduct")
        for a in arrays:
            blob = lp.blobs.add()
            if legacy:
                blob.num, blob.channels = 1, 1
                blob.height, blob.width = (a.shape if a.ndim == 2 else (1, a.shape[0]))
                blob.data.extend(a.reshape(-1).tolist())
            else:
                array_to_blob(a, blob)
    return net


def test_copy_from_matches_by_name_and_ignores_extra_layers(tmp_path, amct_log):
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.arange(4, dtype=np.float32)
    src = _weights({"ip1": [w, b], "loss": [np.zeros((3, 3), np.float32)]})
    path = tmp_path / "w.caffemodel"
    save_caffemodel(src, path)
    net = net_from(MLP, weights=str(path))
    np.testing.assert_array_equal(net.params["ip1"][0].data, w)
    np.testing.assert_array_equal(net.params["ip1"][1].data, b)
    assert any("ip2" in r.getMessage() and "filler" in r.getMessage() for r in amct_log.records)


def test_copy_from_accepts_legacy_4d_blobs(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.arange(4, dtype=np.float32)
    path = tmp_path / "legacy.caffemodel"
    save_caffemodel(_weights({"ip1": [w, b]}, legacy=True), path)
    net = net_from(MLP, weights=str(path))
    np.testing.assert_array_equal(net.params["ip1"][0].data, w)


def test_copy_from_shape_mismatch_names_layer_and_shapes(tmp_path):
    path = tmp_path / "bad.caffemodel"
    save_caffemodel(_weights({"ip1": [np.zeros((3, 4), np.float32), np.zeros(4, np.float32)]}), path)
    with pytest.raises(WeightShapeError) as info:
        net_from(MLP, weights=str(path))
    message = str(info.value)
    assert "ip1" in message and "(3, 4)" in message and "(4, 3)" in message


def test_copy_from_blob_count_mismatch(tmp_path):
    path = tmp_path / "bad.caffemodel"
    save_caffemodel(_weights({"ip2": [np.zeros((2, 4), np.float32), np.zeros(2, np.float32)]}), path)
    with pytest.raises(WeightShapeError, match="ip2.*2 blob"):
        net_from(MLP, weights=str(path))


def test_save_writes_a_caffemodel_with_phase_stamped_layers(tmp_path):
    net = net_from(MLP)
    net.params["ip3"][0].data[...] = 7.0
    path = tmp_path / "saved.caffemodel"
    net.save(str(path))
    back = load_caffemodel(path)
    assert [layer.name for layer in back.layer] == ["data", "ip1", "relu1", "ip2", "ip3"]
    assert all(layer.phase == caffe_pb2.TEST for layer in back.layer)
    assert list(back.layer[4].blobs[0].data) == [7.0] * 8
    assert list(back.layer[4].blobs[0].shape.dim) == [2, 4]
    net2 = net_from(MLP, weights=str(path))
    np.testing.assert_array_equal(net2.params["ip3"][0].data, np.full((2, 4), 7.0, np.float32))


SHARED_PARAMS = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a"
        param { name: "shared_w" } inner_product_param { num_output: 3 bias_term: false } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b"
        param { name: "shared_w" } inner_product_param { num_output: NUM bias_term: false } }
"""


def test_param_sharing_by_name():
    net = net_from(SHARED_PARAMS.replace("NUM", "3"))
    net.params["a"][0].data[...] = np.eye(3, dtype=np.float32) * 2
    out = net.forward(data=np.array([[1.0, 2.0, 3.0]], np.float32))
    np.testing.assert_allclose(out["b"], [[4.0, 8.0, 12.0]])
    with pytest.raises(ModelFormatError, match="shared_w"):
        net_from(SHARED_PARAMS.replace("NUM", "4"))


STACKED_SHARED = """
name: "stacked"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 4 } shape { dim: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { name: "w" } param { name: "b" } inner_product_param { num_output: 4 } }
layer { name: "tanh" type: "TanH" bottom: "ip1" top: "t" }
layer { name: "ip2" type: "InnerProduct" bottom: "t" top: "ip2"
        param { name: "w" } param { name: "b" } inner_product_param { num_output: 4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_backward_of_a_parameter_shared_by_stacked_layers():
    # one weight and bias used twice in a row: Caffe's shared diff is the sum of the two layers' own
    # gradients, each layer counting only its direct use (a numpy reference of the chain rule)
    net = net_from(STACKED_SHARED, caffe.TRAIN)
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((4, 4)), rng.standard_normal(4)
    x, label = rng.standard_normal((2, 4)), np.array([1, 3])
    net.params["ip1"][0].data[...] = w
    net.params["ip1"][1].data[...] = b
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = label
    net.forward()
    net.backward()
    w, b, x = (v.astype(np.float32).astype(np.float64) for v in (w, b, x))
    t = np.tanh(x @ w.T + b)
    y2 = t @ w.T + b
    p = np.exp(y2 - y2.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g2 = (p - np.eye(4)[label]) / 2  # SoftmaxWithLoss averages over the batch
    g1 = (g2 @ w) * (1 - t ** 2)
    expected_w, expected_b = g2.T @ t + g1.T @ x, g2.sum(axis=0) + g1.sum(axis=0)
    for layer in ("ip1", "ip2"):
        np.testing.assert_allclose(net.params[layer][0].diff, expected_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(net.params[layer][1].diff, expected_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["t"].diff, g2 @ w, rtol=1e-5, atol=1e-6)


def test_structural_errors_name_the_layer():
    with pytest.raises(ModelFormatError, match="'ip1'.*'nothing'"):
        net_from('layer { name: "ip1" type: "InnerProduct" bottom: "nothing" top: "x" }')
    with pytest.raises(UnsupportedLayerError, match="'weird'.*'NoSuchLayer'"):
        net_from('layer { name: "weird" type: "NoSuchLayer" top: "x" }')
    # Caffe runs a net with two layers of one name (docs/fork-layers.md); so does the engine
    twice = net_from(MLP + 'layer { name: "data" type: "Input" top: "d2" input_param { shape { dim: 1 } } }')
    assert twice.layer_names.count("data") == 2


def test_phase_view_is_used():
    text = MLP + """
    layer { name: "train_only" type: "ReLU" bottom: "zz" top: "t" include { phase: TRAIN } }
    """
    assert "t" not in net_from(text, caffe.TEST).blobs
    assert "t" in net_from(text, caffe.TRAIN).blobs


def test_loss_weight_count_is_checked_for_every_layer():
    # Caffe's SetLossWeights: unspecified, or once per top — for any layer type, not only loss layers
    with pytest.raises(ModelFormatError, match="'relu1'.*loss_weight"):
        net_from(MLP.replace('layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }',
                             'layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" '
                             'loss_weight: 1 loss_weight: 2 }'))
    weighted = net_from(MLP.replace('top: "zz"', 'top: "zz" loss_weight: 0.5'))
    assert weighted.blob_loss_weights["zz"] == 0.5
