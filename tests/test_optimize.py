"""The optimised TEST forward (engine/optimize.py): same blobs as Caffe's layer-by-layer forward.

Expected values come from a numpy forward of the test net written here with the references of
tests/references/layers.py, and, where the reference Caffe is installed, from the real Caffe. The optimised
and the plain (``net.optimize = False``) forwards are both checked against them, and against each other.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import caffe
from amct_caffe.engine.optimize import InferenceOptions, build_plan
from amct_caffe.model.io import save_caffemodel
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close
from tests.references.layers import batchnorm_global, batchnorm_train, conv2d, inner_product, scale_bias
from tests.references.real_caffe import run_reference

TOL = {"rtol": 1e-5, "atol": 1e-5}

# conv1: BN + Scale + ReLU in place (folded); conv2: BN + Scale in place, then Eltwise + in-place ReLU;
# conv3: MobileNet style, BN writes a new top (conv3 keeps the raw value), Scale and ReLU in place on it;
# ip: InnerProduct + BN + Scale (no bias) + leaky ReLU; conv4's raw top is read by "peek" before its
# in-place BN, so that BN must not be folded.
NET = """
name: "opt"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" batch_norm_param { eps: 0.001 } }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" }
layer { name: "relu_sum" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "conv3" type: "Convolution" bottom: "sum" top: "conv3"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "bn3" type: "BatchNorm" bottom: "conv3" top: "conv3/bn" }
layer { name: "scale3" type: "Scale" bottom: "conv3/bn" top: "conv3/bn" scale_param { bias_term: true } }
layer { name: "relu3" type: "ReLU" bottom: "conv3/bn" top: "conv3/bn" }
layer { name: "ip" type: "InnerProduct" bottom: "conv3/bn" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "bn_ip" type: "BatchNorm" bottom: "ip" top: "ip" }
layer { name: "scale_ip" type: "Scale" bottom: "ip" top: "ip" }
layer { name: "relu_ip" type: "ReLU" bottom: "ip" top: "ip" relu_param { negative_slope: 0.1 } }
layer { name: "conv4" type: "Convolution" bottom: "data" top: "conv4"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "peek" type: "Pooling" bottom: "conv4" top: "peek"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "bn4" type: "BatchNorm" bottom: "conv4" top: "conv4" }
"""

PEEK = """layer { name: "peek" type: "Pooling" bottom: "conv4" top: "peek"
        pooling_param { pool: AVE global_pooling: true } }
"""
assert PEEK in NET

BN_EPS = {"bn1": 1e-5, "bn2": 1e-3, "bn3": 1e-5, "bn_ip": 1e-5, "bn4": 1e-5}


def make_net(phase=caffe.TEST, text: str = NET) -> caffe.Net:
    return caffe.Net(text_format.Merge(text, caffe_pb2.NetParameter()), phase)


def random_params(net: caffe.Net, seed: int) -> dict[str, list[np.ndarray]]:
    """Random weights and BatchNorm statistics (non-trivial scale factor), written through pycaffe."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, blobs in net.params.items():
        values = []
        for i, blob in enumerate(blobs):
            shape = blob.data.shape
            if name.startswith("bn"):
                factor = np.float32(rng.uniform(0.5, 3.0))
                v = [rng.normal(0, 0.5, shape) * factor, rng.uniform(0.3, 2.0, shape) * factor,
                     np.full(shape, factor)][i]
            elif name.startswith("scale"):
                v = rng.uniform(0.5, 1.5, shape) if i == 0 else rng.normal(0, 0.3, shape)
            else:
                v = rng.normal(0, 0.4, shape)
            values.append(np.asarray(v, np.float32))
            blob.data[...] = values[-1]
        params[name] = values
    return params


# ---------------------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------------------
def bn(x: np.ndarray, p: dict[str, list[np.ndarray]], name: str, batch_stats: bool = False) -> np.ndarray:
    """NET's BatchNorm ``name``: with its stored statistics, or the batch's (``batch_stats``)."""
    if batch_stats:
        return batchnorm_train(x, p[name], 0.999, BN_EPS[name])[0]
    return batchnorm_global(x, p[name][0], p[name][1], float(p[name][2][0]), BN_EPS[name])


def reference_forward(p, x, batch_stats=False) -> dict[str, np.ndarray]:
    """Every blob of NET by the numpy references (float64)."""
    out = {"data": x}
    c1 = np.maximum(scale_bias(bn(conv2d(x, *p["conv1"], pad=1), p, "bn1", batch_stats), *p["scale1"]), 0)
    c2 = scale_bias(bn(conv2d(c1, *p["conv2"]), p, "bn2", batch_stats), *p["scale2"])
    s = np.maximum(c1 + c2, 0)
    c3 = conv2d(s, *p["conv3"], stride=2, pad=1, group=2)
    c3bn = np.maximum(scale_bias(bn(c3, p, "bn3", batch_stats), *p["scale3"]), 0)
    ip = scale_bias(bn(inner_product(c3bn, *p["ip"]), p, "bn_ip", batch_stats), *p["scale_ip"])
    ip = np.where(ip > 0, ip, 0.1 * ip)
    c4 = conv2d(x, *p["conv4"])
    out.update(conv1=c1, conv2=c2, sum=s, conv3=c3, ip=ip, peek=c4.mean(axis=(2, 3), keepdims=True),
               conv4=bn(c4, p, "bn4", batch_stats))
    out["conv3/bn"] = c3bn
    return out


def assert_blobs(net: caffe.Net, expected: dict[str, np.ndarray], what: str) -> None:
    assert set(net.blobs) == set(expected)
    for name, blob in net.blobs.items():
        np.testing.assert_allclose(blob.data, expected[name], err_msg=f"{what}: {name}", **TOL)


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
def test_plan_folds_in_place_chains_only():
    groups = make_net().inference_plan().fused_groups()
    assert ["conv1", "bn1", "scale1", "relu1"] in groups
    assert ["conv2", "bn2", "scale2"] in groups
    assert ["sum", "relu_sum"] in groups
    assert ["bn3", "scale3", "relu3"] in groups  # collapsed, but conv3 keeps its raw top
    assert ["ip", "bn_ip", "scale_ip", "relu_ip"] in groups
    assert not any("conv3" in g for g in groups)
    assert not any("bn4" in g for g in groups)  # conv4 is read by "peek" before its BatchNorm


@pytest.mark.parametrize(
    "options",
    [InferenceOptions(), InferenceOptions(prepack=False), InferenceOptions(channels_last=False),
     InferenceOptions(fold=False)],
    ids=["all", "no-prepack", "no-channels-last", "no-fold"],
)
def test_every_blob_matches_numpy_and_the_plain_forward(x, options):
    net = make_net()
    params = random_params(net, seed=2)
    net.inference_plan(options)
    out = net.forward(data=x)
    expected = reference_forward(params, x.astype(np.float64))
    assert_blobs(net, expected, "optimised")
    optimised = {name: blob.data.copy() for name, blob in net.blobs.items()}
    assert set(out) == {"ip", "peek", "conv4"}
    for name, value in out.items():
        np.testing.assert_allclose(value, expected[name], err_msg=name, **TOL)
    # blobs handed out are plain C-contiguous arrays, as Caffe's
    assert all(blob.data.flags["C_CONTIGUOUS"] for blob in net.blobs.values())

    net.optimize = False
    net.forward(data=x)
    assert_blobs(net, expected, "plain")
    for name, blob in net.blobs.items():
        np.testing.assert_allclose(optimised[name], blob.data, err_msg=name, **TOL)


def test_param_writes_through_pycaffe_arrays_refold(x):
    net = make_net()
    params = random_params(net, seed=3)
    held_mean = net.params["bn1"][0].data  # obtained before the first forward, kept alive
    net.forward(data=x)
    assert_blobs(net, reference_forward(params, x), "first")

    # a one-line write through a temporary array (it is garbage as soon as the statement ends)
    params["bn1"][1] = params["bn1"][1] * 2
    net.params["bn1"][1].data[...] = params["bn1"][1]
    params["scale_ip"][0] = params["scale_ip"][0] - 0.25
    net.params["scale_ip"][0].data[...] = params["scale_ip"][0]
    net.forward(data=x)
    assert_blobs(net, reference_forward(params, x), "after temporary-array writes")

    # writes through the array held since before the first forward, several forwards in a row
    for k in range(2):
        held_mean[...] = params["bn1"][0] = params["bn1"][0] + 0.5 * (k + 1)
        net.forward(data=x)
        assert_blobs(net, reference_forward(params, x), f"held array write {k}")

    # a view of a handed-out array keeps it alive; the write after the last forward is still seen
    view = net.params["conv2"][0].data[1:]
    net.forward(data=x)
    view *= 0.5
    params["conv2"][0] = params["conv2"][0].copy()
    params["conv2"][0][1:] *= 0.5
    del view, held_mean
    gc.collect()
    net.forward(data=x)
    assert_blobs(net, reference_forward(params, x), "view write, then the array died")


def test_torch_in_place_updates_and_replaced_blobs_refold(x):
    net = make_net()
    params = random_params(net, seed=4)
    net.forward(data=x)
    layer = net.engine_layers[net.layer_index("scale3")]
    with torch.no_grad():
        layer.blobs[1].add_(1.0)  # bumps the tensor's version counter
    params["scale3"][1] = params["scale3"][1] + 1.0
    net.forward(data=x)
    assert_blobs(net, reference_forward(params, x), "in-place torch update")

    # weight sharing puts other tensor objects into layer.blobs
    other = make_net()
    other_params = random_params(other, seed=5)
    net.share_with(other)
    net.forward(data=x)
    assert_blobs(net, reference_forward(other_params, x), "after share_with")

    # a write through a torch .data alias bumps no version counter: invalidate() rebuilds the folds
    net.engine_layers[net.layer_index("conv1")].blobs[0].data.mul_(0.5)
    other_params["conv1"][0] = other_params["conv1"][0] * np.float32(0.5)
    net.inference_plan().invalidate()
    net.forward(data=x)
    assert_blobs(net, reference_forward(other_params, x), "after invalidate()")


def test_copy_from_after_a_forward_takes_effect(x, tmp_path):
    net = make_net()
    random_params(net, seed=6)
    net.forward(data=x)
    source = make_net()
    new_params = random_params(source, seed=7)
    path = tmp_path / "new.caffemodel"
    save_caffemodel(source.to_proto(), path)
    net.copy_from(str(path))
    net.forward(data=x)
    assert_blobs(net, reference_forward(new_params, x), "after copy_from")


def test_partial_forward_runs_cut_chains_layer_by_layer(x):
    net = make_net()
    p = random_params(net, seed=8)
    net.forward(data=x)
    conv = conv2d(x, *p["conv1"], pad=1)
    net.forward(end="conv1")  # stops inside the folded chain: the raw convolution
    np.testing.assert_allclose(net.blobs["conv1"].data, conv, **TOL)
    net.forward(start="bn1", end="bn1")
    np.testing.assert_allclose(net.blobs["conv1"].data, bn(conv, p, "bn1"), **TOL)
    net.forward(start="scale1")  # the rest, with the fused steps after relu1
    assert_blobs(net, reference_forward(p, x), "resumed")


def test_train_phase_is_not_folded(x):
    net = make_net(caffe.TRAIN)
    params = random_params(net, seed=9)
    with pytest.raises(ValueError):
        build_plan(net.engine_layers, net.phase, net.device)
    net.forward(data=x)
    # BatchNorm normalises with the batch statistics in TRAIN phase
    assert_blobs(net, reference_forward(params, x, batch_stats=True), "TRAIN")


def test_test_phase_batch_norm_without_global_stats_is_not_folded(x):
    text = NET.replace('layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }',
                        'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" '
                        'batch_norm_param { use_global_stats: false } }')
    net = make_net(text=text)
    p = random_params(net, seed=10)
    assert not any("bn1" in g for g in net.inference_plan().fused_groups())
    net.forward(data=x)
    conv = conv2d(x, *p["conv1"], pad=1)
    expected = np.maximum(scale_bias(bn(conv, p, "bn1", batch_stats=True), *p["scale1"]), 0)
    np.testing.assert_allclose(net.blobs["conv1"].data, expected, **TOL)


@pytest.mark.reference
def test_optimised_blobs_match_reference_caffe(x, reference_caffe, tmp_path):
    # Caffe rejects "peek" (reading conv4 before its in-place BatchNorm makes its Split layer produce
    # conv4 twice), so the reference sees the net without it.
    text = NET.replace(PEEK, "")
    net = make_net(text=text)
    random_params(net, seed=11)
    assert ["conv4", "bn4"] in net.inference_plan().fused_groups()
    net.forward(data=x)
    path = tmp_path / "ours.caffemodel"
    net.save(path)
    ref = run_reference(text, {"data": x}, weights=path)
    for name, blob in net.blobs.items():
        assert_close(blob.data, ref["blobs"][name], name)


@pytest.mark.parametrize("failure", ["raises", "wrong values"])
def test_packed_convolution_falls_back_to_conv2d(x, monkeypatch, failure):
    real = torch.ops.mkldnn._convolution_pointwise

    def broken(*args):
        if failure == "raises":
            raise RuntimeError("no oneDNN here")
        return real(*args) + 1.0

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", broken)
    net = make_net()
    params = random_params(net, seed=12)
    for _ in range(2):
        net.forward(data=x)
        assert_blobs(net, reference_forward(params, x), f"packed op {failure}")
