"""Tests of the TRAIN forward and backward of the layer chains of ResNet and MobileNet (Convolution, frozen
BatchNorm, Scale, ReLU in place or not, depthwise convolution, Eltwise, Pooling, Flatten, InnerProduct,
SoftmaxWithLoss): every blob's data and diff and every parameter's diff after ``forward``/``backward``
agree with the reference Caffe, the solver's step leaves the same weights, and what pycaffe hands out is
Caffe's NCHW layout whatever layout the engine computes in (channels-last convolutions on the CPU).

Expected values: the reference Caffe (subprocess), and numpy expressions of Caffe's formulas for the
per-channel Scale and frozen BatchNorm gradients.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from amct_caffe import caffe
from amct_caffe.engine.layers.base import TRAIN
from amct_caffe.engine.net import Net
from amct_caffe.engine.optimize import is_channels_last
from amct_caffe.model.io import save_caffemodel
from tests.helpers import assert_close, make_layer, parse_net
from tests.references.real_caffe import reference_python, run_reference

CL = torch.channels_last

CHAINS = """
name: "chains"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param { use_global_stats: true } }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "dw" type: "Convolution" bottom: "conv1" top: "dw"
  convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "dw/bn" type: "BatchNorm" bottom: "dw" top: "dw/bn"
  batch_norm_param { use_global_stats: true eps: 0.001 } }
layer { name: "dw/scale" type: "Scale" bottom: "dw/bn" top: "dw/bn" scale_param { bias_term: true } }
layer { name: "dw/relu" type: "ReLU" bottom: "dw/bn" top: "dw/bn" }
layer { name: "pw" type: "Convolution" bottom: "dw/bn" top: "pw"
  convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "pw/bn" type: "BatchNorm" bottom: "pw" top: "pw/bn"
  batch_norm_param { use_global_stats: true } }
layer { name: "pw/scale" type: "Scale" bottom: "pw/bn" top: "pw/bn" }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "pw/bn" top: "sum" }
layer { name: "relu2" type: "ReLU" bottom: "sum" top: "relu2" }
layer { name: "pool" type: "Pooling" bottom: "relu2" top: "pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""

SOLVER = 'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" max_iter: 10\n'

REFERENCE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import caffe
    caffe.set_mode_cpu()
    net_file, weights, inputs_file, out_file, solver_file = sys.argv[1:6]
    net = caffe.Net(net_file, weights, caffe.TRAIN)
    inputs = np.load(inputs_file)
    for name in inputs.files:
        net.blobs[name].data[...] = inputs[name]
    net.forward()
    out = {}
    for name, blob in net.blobs.items():
        if "_split_" not in name:
            out["data:" + name] = np.array(blob.data)
    net.backward()
    for name, blob in net.blobs.items():
        if "_split_" not in name:
            out["diff:" + name] = np.array(blob.diff)
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            out["pdiff:%s/%d" % (name, i)] = np.array(b.diff)
    solver = caffe.get_solver(solver_file)
    solver.net.copy_from(weights)
    for name in inputs.files:
        solver.net.blobs[name].data[...] = inputs[name]
    solver.step(3)
    for name, blobs in solver.net.params.items():
        for i, b in enumerate(blobs):
            out["stepped:%s/%d" % (name, i)] = np.array(b.data)
    np.savez(out_file, **out)
""")


def random_weights(net: Net, seed: int) -> None:
    rng = np.random.RandomState(seed)
    for layer in net.engine_layers:
        for i, blob in enumerate(layer.blobs):
            values = rng.randn(*blob.shape) * 0.5
            if layer.type_name == "BatchNorm":
                values = [values, np.abs(values) + 0.2, np.array([2.5])][i]
            with torch.no_grad():
                blob.copy_(torch.from_numpy(np.asarray(values, np.float32)))


def inputs_of(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    # the Input layer only declares shapes; the values are set on the blobs, and the solver's net (which has
    # no inputs of its own) gets the same ones
    return {"data": rng.randn(2, 3, 9, 9).astype(np.float32), "label": np.array([1.0, 3.0], np.float32)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The start weights and inputs, and the reference Caffe's blobs, diffs and stepped weights."""
    py = reference_python()
    if py is None:
        pytest.skip("reference Caffe not installed (set AMCT_REF_CAFFE_PYTHON or run scripts/test.sh)")
    root = tmp_path_factory.mktemp("train_step")
    net_file = root / "chains.prototxt"
    net_file.write_text(CHAINS)
    net = Net(parse_net(CHAINS), TRAIN)
    random_weights(net, 60)
    weights = root / "chains.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    inputs = inputs_of(61)
    np.savez(root / "inputs.npz", **inputs)
    # net_param inline (not upgraded) with explicit lr_mult 0 on BatchNorm's statistics, as the solver
    # cross-check does: the reference fork's BatchNorm does not mask them from the solver (BVLC's does)
    frozen = 'type: "BatchNorm" ' + "param { lr_mult: 0 decay_mult: 0 } " * 3
    solver_file = root / "solver.prototxt"
    solver_file.write_text("net_param {\n" + CHAINS.replace('type: "BatchNorm" ', frozen) + "}\n" + SOLVER)
    script = root / "ref.py"
    script.write_text(REFERENCE_SCRIPT)
    env = dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([py, str(script), str(net_file), str(weights), str(root / "inputs.npz"),
                           str(root / "out.npz"), str(solver_file)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"net": net_file, "weights": weights, "inputs": inputs, "solver": solver_file,
            "ref": dict(np.load(root / "out.npz"))}


def test_train_blobs_and_diffs_equal_reference(reference: dict[str, object]) -> None:
    ref: dict[str, np.ndarray] = reference["ref"]  # type: ignore[assignment]
    net = caffe.Net(str(reference["net"]), str(reference["weights"]), caffe.TRAIN)
    for name, value in reference["inputs"].items():  # type: ignore[union-attr]
        net.blobs[name].data[...] = value
    net.forward()
    for name, blob in net.blobs.items():
        assert_close(blob.data, ref["data:" + name], name)
    net.backward()
    for name, blob in net.blobs.items():
        # in-place blobs (conv1, dw/bn, pw/bn) hold the diff of their first value, as in Caffe; conv1, read
        # by dw and by the residual sum, the sum of both readers' diffs (Caffe's split)
        assert_close(blob.diff, ref["diff:" + name], name)
    compared = 0
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            assert_close(blob.diff, ref[f"pdiff:{name}/{i}"], f"{name}/{i}")
            compared += 1
    assert compared == 20  # conv1 1, bn1 3, sc1 2, dw 1, dw/bn 3, dw/scale 2, pw 2, pw/bn 3, pw/scale 1, fc 2


def test_solver_steps_equal_reference(reference: dict[str, object]) -> None:
    ref: dict[str, np.ndarray] = reference["ref"]  # type: ignore[assignment]
    solver = caffe.get_solver(str(reference["solver"]))
    solver.net.copy_from(str(reference["weights"]))
    for name, value in reference["inputs"].items():  # type: ignore[union-attr]
        solver.net.blobs[name].data[...] = value
    solver.step(3)
    for name, blobs in solver.net.params.items():
        for i, blob in enumerate(blobs):
            expected = ref[f"stepped:{name}/{i}"]
            scale = max(1.0, float(np.max(np.abs(expected))))
            assert np.max(np.abs(blob.data - expected)) <= 1e-4 * scale, f"{name}/{i}"


def test_pycaffe_arrays_are_nchw_after_a_train_forward(tmp_path: Path) -> None:
    path = tmp_path / "chains.prototxt"
    path.write_text(CHAINS)
    net = caffe.Net(str(path), caffe.TRAIN)
    for name, value in inputs_of(62).items():
        net.blobs[name].data[...] = value
    net.forward()
    net.backward()
    for name, blob in net.blobs.items():
        assert blob.data.flags["C_CONTIGUOUS"], name
        assert blob.diff.flags["C_CONTIGUOUS"], name
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            assert blob.diff.flags["C_CONTIGUOUS"], f"{name}/{i}"
    # a write through the array lands in the blob that later reads see
    net.blobs["conv1"].data[0, 0, 0, 0] = 123.0
    assert float(net.blobs["conv1"].data[0, 0, 0, 0]) == 123.0


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("bias_term", [True, False])
def test_scale_per_channel_gradients(layout: torch.memory_format, bias_term: bool) -> None:
    x = np.random.RandomState(3).randn(2, 4, 3, 5).astype(np.float32)
    layer = make_layer(f'type: "Scale" scale_param {{ bias_term: {str(bias_term).lower()} }}', x)
    gamma = np.array([0.5, -2.0, 1.5, 3.0], np.float32)
    beta = np.array([0.1, 0.2, -0.3, 0.4], np.float32)
    layer.blobs[0].copy_(torch.from_numpy(gamma))
    if bias_term:
        layer.blobs[1].copy_(torch.from_numpy(beta))
    for blob in layer.blobs:
        blob.requires_grad_(True)
    xt = torch.from_numpy(x).contiguous(memory_format=layout).requires_grad_(True)
    (y,) = layer.forward([xt])
    g, b = gamma[None, :, None, None], beta[None, :, None, None] if bias_term else 0.0
    np.testing.assert_allclose(y.detach().numpy(), x * g + b, rtol=1e-6, atol=1e-6)
    dy = np.random.RandomState(4).randn(*x.shape).astype(np.float32)
    grads = torch.autograd.grad(y, [xt, *layer.blobs], torch.from_numpy(dy))
    np.testing.assert_allclose(grads[0].numpy(), dy * g, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads[1].numpy(), (dy * x).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    if bias_term:
        np.testing.assert_allclose(grads[2].numpy(), dy.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_frozen_batchnorm_channels_last(layout: torch.memory_format) -> None:
    x = np.random.RandomState(5).randn(2, 3, 4, 5).astype(np.float32) * 2
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.01 }', x,
                       phase=TRAIN)
    mean_sum, var_sum = np.array([1.0, -2.0, 0.5], np.float32), np.array([3.0, 0.5, 8.0], np.float32)
    for blob, value in zip(layer.blobs, (mean_sum, var_sum, np.array([2.0], np.float32))):
        blob.copy_(torch.from_numpy(value))
    xt = torch.from_numpy(x).contiguous(memory_format=layout).requires_grad_(True)
    (y,) = layer.forward([xt])
    mean = (mean_sum / 2)[None, :, None, None]
    std = np.sqrt(var_sum / 2 + np.float32(0.01))[None, :, None, None]
    np.testing.assert_allclose(y.detach().numpy(), (x - mean) / std, rtol=1e-5, atol=1e-5)
    dy = np.random.RandomState(6).randn(*x.shape).astype(np.float32)
    (gx,) = torch.autograd.grad(y, [xt], torch.from_numpy(dy))
    np.testing.assert_allclose(gx.numpy(), dy / std, rtol=1e-5, atol=1e-6)


MIXED = """
name: "mixed"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "tanh" type: "TanH" bottom: "conv2" top: "tanh" }
layer { name: "fc" type: "InnerProduct" bottom: "tanh" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_layout_choice_and_nchw_bottoms_for_other_layers(reference_caffe: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(parse_net(MIXED), TRAIN)
    random_weights(net, 70)
    weights = tmp_path / "mixed.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    inputs = {"data": np.random.RandomState(71).randn(2, 3, 8, 8).astype(np.float32),
              "label": np.array([0.0, 2.0], np.float32)}
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    tanh = net.engine_layers[net.layer_index("tanh")]
    seen: list[bool] = []
    forward = tanh.forward

    def checking(bottoms: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append(bottoms[0].is_contiguous())
        return forward(bottoms)

    monkeypatch.setattr(tanh, "forward", checking)
    with torch.enable_grad():
        net.run()
    if torch.backends.mkldnn.is_available():
        # conv1's top flows only into conv2: channels-last; conv2's into TanH (8x8 -> 4x4 spatial): it keeps
        # the layout it is given (conv1's), and TanH gets an NCHW copy
        assert [net.train_layout().convert[net.layer_index(n)] for n in ("conv1", "conv2")] == [True, False]
        assert is_channels_last(net._data["conv2"])
    assert seen == [True]
    ref = run_reference(MIXED, inputs=inputs, weights=weights, phase="TRAIN")
    for name in net.blob_names:
        assert_close(net.tensor(name).detach().numpy(), ref["blobs"][name], name)
