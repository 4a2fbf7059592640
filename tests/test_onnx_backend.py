"""The optional ONNX Runtime backend for whole-net TEST forwards (engine/onnx_backend.py).

Expected values come from a numpy forward of the small net written here (tests/references/layers.py) and
from the engine's own layer-by-layer forward (``net.optimize = False``, backend ``engine``), which the
session must reproduce; every blob read after a session forward must equal the engine's. The cases that
need onnxruntime skip without it; the fallbacks are checked either way.
"""

from __future__ import annotations

import gc
import importlib.util
import logging

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import caffe
from amct_caffe.engine import onnx_backend
from amct_caffe.engine.net import Net as EngineNet
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.errors import ConfigError
from amct_caffe.proto import caffe_pb2
from tests.references.layers import batchnorm_global, conv2d, inner_product, pool2d, scale_bias
from tests.references.quant import quant_layer_codes
from tests.references.real_caffe import SHARED

HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime and onnx (the ort extra) are not installed")

TOL = {"rtol": 1e-4, "atol": 1e-4}

# conv1 + in-place BatchNorm/Scale/ReLU (folded); MobileNet-style conv2 whose BatchNorm writes a new top;
# max pooling, an Eltwise sum, an InnerProduct and a Softmax; "raw" (conv2's top) stays visible.
NET = """
name: "ortnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "raw"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 4 } }
layer { name: "bn2" type: "BatchNorm" bottom: "raw" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "bn2" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

ARGMAX = 'layer { name: "top1" type: "ArgMax" bottom: "prob" top: "top1" }\n'


def make_net(text: str = NET, phase: int = caffe.TEST) -> caffe.Net:
    return caffe.Net(text_format.Merge(text, caffe_pb2.NetParameter()), phase)


def set_params(net: caffe.Net, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Random weights and BatchNorm statistics, written through pycaffe (numpy writes)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, blobs in net.params.items():
        values = []
        for i, blob in enumerate(blobs):
            shape = blob.data.shape
            if name.startswith("bn"):
                factor = 2.0
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


def reference(p: dict[str, list[np.ndarray]], x: np.ndarray) -> dict[str, np.ndarray]:
    """Every blob of NET by the numpy references (float64)."""
    def bn(v: np.ndarray, name: str) -> np.ndarray:
        return batchnorm_global(v, p[name][0], p[name][1], float(p[name][2][0]), 1e-5)

    c1 = np.maximum(scale_bias(bn(conv2d(x, *p["conv1"], pad=1), "bn1"), *p["scale1"]), 0)
    raw = conv2d(c1, *p["conv2"], pad=1, group=4)
    b2 = scale_bias(bn(raw, "bn2"), *p["scale2"])
    s = c1 + b2
    pool = pool2d(s, "MAX", 2, 2)
    ip = inner_product(pool, *p["ip"])
    e = np.exp(ip - ip.max(axis=1, keepdims=True))
    return {"data": x, "conv1": c1, "raw": raw, "bn2": b2, "sum": s, "pool": pool, "ip": ip,
            "prob": e / e.sum(axis=1, keepdims=True)}


def engine_blobs(net: caffe.Net) -> dict[str, np.ndarray]:
    """Every blob after a layer-by-layer engine forward of ``net``'s current inputs and weights."""
    backend, optimize = net.backend, net.optimize
    net.backend, net.optimize = "engine", False
    try:
        net.forward()
        return {name: blob.data.copy() for name, blob in net.blobs.items()}
    finally:
        net.backend, net.optimize = backend, optimize


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# choosing the backend
# ---------------------------------------------------------------------------------------------------
def test_backend_defaults_to_engine_and_changes_nothing(x: np.ndarray) -> None:
    net = make_net()
    p = set_params(net)
    assert net.backend == "engine"
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    stats = net.backend_stats
    assert (stats.exports, stats.session_forwards, stats.engine_forwards, stats.fills) == (0, 0, 0, 0)


def test_backend_from_environment_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMCT_CAFFE_BACKEND", "onnxruntime")
    assert make_net().backend == "onnxruntime"
    monkeypatch.setenv("AMCT_CAFFE_BACKEND", "Auto")
    assert make_net().backend == "auto"
    monkeypatch.setenv("AMCT_CAFFE_BACKEND", "tensorrt")
    with pytest.raises(ConfigError, match="AMCT_CAFFE_BACKEND"):
        make_net()
    monkeypatch.delenv("AMCT_CAFFE_BACKEND")
    net = make_net()
    with pytest.raises(ConfigError, match="engine, onnxruntime, auto"):
        net.backend = "onnx"


def test_use_backend_block_and_command_line_flag(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                x: np.ndarray) -> None:
    from amct_caffe import cli

    assert cli._BACKENDS == onnx_backend.BACKENDS
    with onnx_backend.use_backend("auto"):
        assert make_net().backend == "auto"
        with onnx_backend.use_backend(None):
            assert make_net().backend == "engine"
    assert make_net().backend == "engine"
    with pytest.raises(ConfigError), onnx_backend.use_backend("onnx"):
        pass
    # the command line's --backend reaches the nets its flows build
    modes: list[str] = []
    real_run = onnx_backend.OrtBackend.run

    def recording_run(self: onnx_backend.OrtBackend, net: object, data: dict, mode: str) -> None:
        modes.append(mode)
        real_run(self, net, data, mode)

    monkeypatch.setattr(onnx_backend.OrtBackend, "run", recording_run)
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    np.save(tmp_path / "x.npy", x)
    outputs = {}
    for flags in ([], ["--backend", "onnxruntime"]):
        out = tmp_path / f"out{len(flags)}.npz"
        assert cli.main(["run", str(model), "--input", f"data={tmp_path / 'x.npy'}", "--output", str(out),
                         *flags]) == 0
        outputs[len(flags)] = np.load(out)["prob"]
    assert modes == ["onnxruntime"]
    np.testing.assert_allclose(outputs[2], outputs[0], **TOL)


def test_without_onnxruntime_the_engine_runs(monkeypatch: pytest.MonkeyPatch, x: np.ndarray,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(onnx_backend, "onnxruntime_available", lambda: False)
    net = make_net()
    p = set_params(net)
    net.backend = "onnxruntime"
    with caplog.at_level(logging.WARNING, logger="amct_caffe"):
        out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    assert net.backend_stats.session_forwards == 0 and net.backend_stats.engine_forwards == 1
    assert "not installed" in net.backend_stats.reason
    assert "runs its TEST forwards on the engine" in caplog.text


def test_unsupported_first_layer_keeps_the_engine(x: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    text = NET.replace('layer { name: "conv1"', ARGMAX.replace('"prob"', '"data"') + 'layer { name: "conv1"')
    net = make_net(text)
    p = set_params(net)
    net.backend = "onnxruntime"
    with caplog.at_level(logging.WARNING, logger="amct_caffe"):
        out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    np.testing.assert_array_equal(out["top1"].reshape(2), x.reshape(2, -1).argmax(axis=1))
    assert net.backend_stats.session_forwards == 0 and net.backend_stats.exports == 0
    assert "'top1' (type ArgMax)" in net.backend_stats.reason
    assert "ArgMax" in caplog.text


@needs_ort
def test_layers_after_an_unsupported_one_run_on_the_engine(x: np.ndarray) -> None:
    """The session runs up to the ArgMax; ArgMax (and what follows) runs on the engine from its values."""
    tail = ARGMAX + 'layer { name: "scaled" type: "Power" bottom: "ip" top: "ip" power_param { scale: 2 } }\n'
    net = make_net(NET + tail)
    p = set_params(net)
    net.backend = "onnxruntime"
    out = net.forward(data=x)
    ref = reference(p, x)
    assert net.backend_stats.session_forwards == 1, net.backend_stats.reason
    np.testing.assert_array_equal(out["top1"].reshape(2), ref["prob"].argmax(axis=1))
    np.testing.assert_allclose(net.blobs["prob"].data, ref["prob"], **TOL)  # the session computed it
    assert net.backend_stats.fills == 0
    # the tail's in-place Power keeps its value when the other blobs are filled
    np.testing.assert_allclose(net.blobs["pool"].data, ref["pool"], **TOL)
    assert net.backend_stats.fills == 1
    np.testing.assert_allclose(net.blobs["ip"].data, 2 * ref["ip"], **TOL)


def test_partial_forward_backward_and_train_use_the_engine(x: np.ndarray) -> None:
    net = make_net()
    set_params(net)
    net.backend = "onnxruntime"
    net.forward(end="ip", data=x)
    net.forward(start="conv2")
    train = make_net(phase=caffe.TRAIN)
    train.backend = "onnxruntime"
    train.forward(data=x)
    for n in (net, train):
        assert n.backend_stats.session_forwards == 0 and n.backend_stats.exports == 0


# ---------------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------------
@needs_ort
@pytest.mark.parametrize("optimize", [True, False])
def test_session_outputs_match_engine_and_reference(x: np.ndarray, optimize: bool) -> None:
    net = make_net()
    p = set_params(net)
    net.forward(data=x)
    expected = engine_blobs(net)
    net.optimize = optimize
    net.backend = "onnxruntime"
    out = net.forward(data=x)
    stats = net.backend_stats
    assert (stats.exports, stats.session_forwards, stats.fills) == (1, 1, 0), stats.reason
    assert stats.export_seconds > 0
    np.testing.assert_allclose(out["prob"], expected["prob"], **TOL)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    # a second forward reuses the session
    out = net.forward(data=x[::-1].copy())
    np.testing.assert_allclose(out["prob"], reference(p, x[::-1])["prob"], **TOL)
    assert net.backend_stats.exports == 1 and net.backend_stats.session_forwards == 2


@needs_ort
def test_blobs_read_after_a_session_forward_are_the_engines(x: np.ndarray) -> None:
    net = make_net()
    p = set_params(net)
    net.backend = "onnxruntime"
    net.forward(data=x)
    assert net.backend_stats.session_forwards == 1 and net.backend_stats.fills == 0
    # the caller changes the input after the forward: blobs keep the values of the forward's input
    net.blobs["data"].data[...] = 0.0
    ref = reference(p, x)
    for name in ("conv1", "raw", "bn2", "sum", "pool", "ip", "prob"):
        np.testing.assert_allclose(net.blobs[name].data, ref[name], err_msg=name, **TOL)
    assert net.backend_stats.fills == 1  # one engine forward filled them all
    # the engine API gives the same values
    np.testing.assert_allclose(net.tensor("sum").numpy(), ref["sum"], **TOL)
    assert net.backend_stats.fills == 1


@needs_ort
def test_forward_asking_for_intermediate_blobs_runs_the_engine(x: np.ndarray) -> None:
    net = make_net()
    p = set_params(net)
    net.backend = "onnxruntime"
    out = net.forward(blobs=["raw"], data=x)
    ref = reference(p, x)
    np.testing.assert_allclose(out["raw"], ref["raw"], **TOL)
    np.testing.assert_allclose(out["prob"], ref["prob"], **TOL)
    assert net.backend_stats.session_forwards == 0 and net.backend_stats.fills == 0


@needs_ort
def test_weight_changes_reexport(x: np.ndarray) -> None:
    net = make_net()
    p = set_params(net)
    net.backend = "onnxruntime"
    net.forward(data=x)
    assert net.backend_stats.exports == 1
    # a numpy write through pycaffe
    net.params["conv1"][0].data[...] *= 2.0
    p["conv1"][0] = p["conv1"][0] * 2.0
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    assert net.backend_stats.exports == 2
    # an in-place torch op on a blob (version counter)
    with torch.no_grad():
        net.engine_layers[net.layer_index("ip")].blobs[1].add_(0.5)
    p["ip"][1] = p["ip"][1] + 0.5
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    assert net.backend_stats.exports == 3
    # nothing changed: no export
    net.forward(data=x)
    assert net.backend_stats.exports == 3


@needs_ort
def test_invalidate_caches_after_a_write_through_a_torch_data_alias(x: np.ndarray) -> None:
    net = make_net()
    p = set_params(net)
    net.backend = "onnxruntime"
    before = net.forward(data=x)["prob"].copy()
    gc.collect()  # no pycaffe parameter array is alive: the session check compares version counters only
    blob = net.engine_layers[net.layer_index("ip")].blobs[1]
    blob.data.add_(0.5)  # a .data alias keeps its own version counter: the check cannot see this write
    p["ip"][1] = p["ip"][1] + 0.5
    np.testing.assert_array_equal(net.forward(data=x)["prob"], before)  # the documented blind spot
    net.invalidate_caches()
    np.testing.assert_allclose(net.forward(data=x)["prob"], reference(p, x)["prob"], **TOL)
    assert net.backend_stats.exports == 2


@needs_ort
def test_live_parameter_array_is_compared_by_value(x: np.ndarray) -> None:
    net = make_net()
    p = set_params(net)
    weight = net.params["scale2"][0].data  # alive across the forwards below
    net.backend = "onnxruntime"
    net.forward(data=x)
    net.forward(data=x)
    assert net.backend_stats.exports == 1  # an alive array alone does not force exports
    weight[...] = 3.0
    p["scale2"][0] = np.full_like(p["scale2"][0], 3.0)
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    assert net.backend_stats.exports == 2


@needs_ort
def test_arrays_handed_out_of_other_blobs_do_not_reexport(x: np.ndarray) -> None:
    net = make_net()
    set_params(net)
    other = make_net()
    net.backend = "onnxruntime"
    net.forward(data=x)
    float(other.params["conv1"][0].data.sum())
    net.forward(data=x)
    net.forward(data=x)
    assert net.backend_stats.exports == 1


@needs_ort
def test_copy_from_reexports(tmp_path, x: np.ndarray) -> None:
    net = make_net()
    set_params(net, seed=0)
    other = make_net()
    p = set_params(other, seed=5)
    other.save(str(tmp_path / "other.caffemodel"))
    net.backend = "onnxruntime"
    net.forward(data=x)
    net.copy_from(str(tmp_path / "other.caffemodel"))
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], reference(p, x)["prob"], **TOL)
    assert net.backend_stats.exports == 2


@needs_ort
def test_reshape_reexports(x: np.ndarray) -> None:
    net = make_net()
    p = set_params(net)
    net.backend = "onnxruntime"
    net.forward(data=x)
    net.blobs["data"].reshape(3, 3, 8, 8)
    net.reshape()
    x3 = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    out = net.forward(data=x3)
    assert out["prob"].shape == (3, 5)
    np.testing.assert_allclose(out["prob"], reference(p, x3)["prob"], **TOL)
    np.testing.assert_allclose(net.blobs["pool"].data, reference(p, x3)["pool"], **TOL)
    assert net.backend_stats.exports == 2


@needs_ort
def test_engine_net_api(x: np.ndarray) -> None:
    """The engine's Net (not the facade): run() in the session, tensor() of a pending blob fills it."""
    net = EngineNet(text_format.Merge(NET, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    randomize_params(net, seed=3)
    net.input_layer("data").set_input("data", torch.from_numpy(x))
    net.run()
    expected = {name: net.tensor(name).clone() for name in net.blob_names}
    net.backend = "onnxruntime"
    net.run()
    torch.testing.assert_close(net.tensor("prob"), expected["prob"], rtol=1e-4, atol=1e-4)
    arrays = net.blob_arrays()
    for name in net.blob_names:
        np.testing.assert_allclose(arrays[name], expected[name].numpy(), err_msg=name, **TOL)
    assert net.backend_stats.session_forwards == 1 and net.backend_stats.fills == 1


@needs_ort
def test_auto_switches_when_it_pays_and_back_on_reads(monkeypatch: pytest.MonkeyPatch,
                                                      x: np.ndarray) -> None:
    monkeypatch.setattr(onnx_backend, "AUTO_EXPORT_SECONDS_PER_LAYER", 0.0)
    # the timing decision itself is measured; here the session is taken as faster
    monkeypatch.setattr(onnx_backend.OrtBackend, "_faster", lambda self, session, layout, data: True)
    net = make_net()
    p = set_params(net)
    net.backend = "auto"
    ref = reference(p, x)
    for _ in range(2):
        np.testing.assert_allclose(net.forward(data=x)["prob"], ref["prob"], **TOL)
    stats = net.backend_stats
    assert (stats.engine_forwards, stats.session_forwards, stats.exports) == (1, 1, 1)
    np.testing.assert_allclose(net.blobs["sum"].data, ref["sum"], **TOL)  # a read: back to the engine
    net.forward(data=x)
    assert (stats.engine_forwards, stats.session_forwards) == (2, 1)
    net.forward(data=x)
    assert (stats.session_forwards, stats.exports) == (2, 2)


@needs_ort
def test_auto_stays_on_the_engine_for_layer_by_layer_readers(monkeypatch: pytest.MonkeyPatch,
                                                              x: np.ndarray) -> None:
    monkeypatch.setattr(onnx_backend, "AUTO_EXPORT_SECONDS_PER_LAYER", 0.0)
    net = make_net()
    set_params(net)
    net.backend = "auto"
    for _ in range(4):
        net.forward(data=x)
        net.blobs["conv1"].data.sum()
    assert net.backend_stats.exports == 0 and net.backend_stats.engine_forwards == 4


# a fake-quant model's layers: Quant (offset 3), a convolution, DeQuant with a shift of 2 bits; "qcopy" makes
# the Quant layer's value an output of the session
FAKE_QUANT = r"""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "q" type: "Quant" bottom: "data" top: "q" quant_param { scale: 20.0 offset: "\003" } }
layer { name: "qcopy" type: "Power" bottom: "q" top: "qcopy" }
layer { name: "conv" type: "Convolution" bottom: "q" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "dq" type: "DeQuant" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }
"""


@needs_ort
def test_fake_quant_layers_run_in_the_session(x: np.ndarray) -> None:
    net = make_net(FAKE_QUANT)
    rng = np.random.default_rng(4)
    for name in ("conv", "ip"):
        for blob in net.params[name]:
            blob.data[...] = rng.normal(0, 0.5, blob.data.shape)
    net.params["dq"][0].data[...] = 0.05
    net.params["dq"][1].data[...] = 2.0
    net.blobs["data"].data[...] = x
    expected = engine_blobs(net)
    net.backend = "onnxruntime"
    out = net.forward(data=x)
    assert net.backend_stats.session_forwards == 1, net.backend_stats.reason
    s_d = 1.0 / float(np.float32(20.0))
    quantized = ((quant_layer_codes(x, 20.0, 3) - 3) * s_d).astype(np.float32)
    np.testing.assert_allclose(out["qcopy"], quantized, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["ip"], expected["ip"], **TOL)
    # DeQuant's blobs decide between identity and shift-N: a change re-exports
    net.params["dq"][1].data[...] = 0.0
    expected = engine_blobs(net)
    out = net.forward(data=x)
    np.testing.assert_allclose(out["ip"], expected["ip"], **TOL)
    assert net.backend_stats.exports == 2


def test_constants_second_swaps_only_constant_first_operands() -> None:
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", 1, [1], [2.0])),
        helper.make_node("Add", ["c", "x"], ["a"]),
        helper.make_node("Mul", ["a", "c"], ["m"]),
        helper.make_node("Sub", ["c", "m"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    model = helper.make_model(graph)
    assert onnx_backend.constants_second(model) == 1
    assert [list(n.input) for n in model.graph.node[1:]] == [["x", "c"], ["a", "c"], ["c", "m"]]


# ---------------------------------------------------------------------------------------------------
# the public models
# ---------------------------------------------------------------------------------------------------
MODELS = {
    "resnet50": "resnet50/ResNet-50-deploy.prototxt",
    "mobilenet_v2": "mobilenet_v2/mobilenet_v2_deploy.prototxt",
    "bvlc_googlenet": "bvlc_googlenet/deploy.prototxt",
}


@needs_ort
@pytest.mark.parametrize("model", sorted(MODELS))
def test_shared_models_logits_match_the_engine(model: str) -> None:
    path = SHARED / "models" / MODELS[model]
    if not path.is_file():
        pytest.skip(f"{path.name} is not present")
    from amct_caffe.model.io import load_prototxt

    param = load_prototxt(str(path))
    # without the final Softmax, the outputs are the logits (random weights saturate the probabilities)
    if param.layer[-1].type == "Softmax":
        del param.layer[-1]
    net = EngineNet(param, caffe_pb2.TEST)
    randomize_params(net, seed=0)
    name = net.inputs[0]
    shape = tuple(net.tensor(name).shape)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, *shape[1:])).astype(np.float32))
    net.input_layer(name).set_input(name, x)
    net.reshape()
    net.run()
    expected = {o: net.tensor(o).clone() for o in net.outputs}
    net.backend = "onnxruntime"
    net.run()
    assert net.backend_stats.session_forwards == 1, net.backend_stats.reason
    for o in net.outputs:
        scale = float(expected[o].abs().max())
        worst = float((net.tensor(o) - expected[o]).abs().max())
        assert worst <= 1e-4 * max(scale, 1.0), (o, worst, scale)
