"""Tests of the element-wise activation layers (engine/layers/activation.py).

Expected values come from numpy formulas written here in float64 from Caffe's definitions (and a few hand
computations); gradients of ReLU/PReLU are checked against finite differences in float64 and against
Caffe's analytic backward formulas. A cross-check runs one net chaining every layer the reference Caffe
has (it lacks Clip and Swish) in TEST mode, with our PReLU slopes saved to a caffemodel, and loads a
caffemodel written by the reference (channel-shared PReLU's 0-axis blob) into our net.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine import fillers
from amct_caffe.engine.layers import layer_class
from amct_caffe.engine.layers.base import TEST, TRAIN
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.model.blobs import shape_matches
from amct_caffe.model.io import save_caffemodel
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close, make_layer
from tests.references.real_caffe import run_reference

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def run(text: str, x: np.ndarray, phase: int = TEST) -> np.ndarray:
    layer = make_layer(text, x, phase=phase)
    with torch.no_grad():
        (out,) = layer.forward([torch.from_numpy(x)])
    assert out.dtype == torch.float32
    assert tuple(out.shape) == x.shape
    return out.numpy()


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.RandomState(seed).randn(*shape) * scale).astype(np.float32)


def close(ours: np.ndarray, expected: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=atol)


X = rand(2, 3, 4, 5, seed=1, scale=2.0)
X.reshape(-1)[:6] = [0.0, -0.0, 30.0, -30.0, 1e-6, -1e-6]
X64 = X.astype(np.float64)


# ---------------------------------------------------------------------------------------------------
# ReLU family
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5, 2.0])
def test_relu(slope: float) -> None:
    text = f'type: "ReLU" relu_param {{ negative_slope: {slope} }}'
    expected = np.maximum(X64, 0) + np.float32(slope) * np.minimum(X64, 0)
    close(run(text, X), expected)


def test_relu_default_is_plain_relu() -> None:
    close(run('type: "ReLU"', X), np.where(X64 > 0, X64, 0.0))


def test_relu6() -> None:
    x = np.array([-3.0, -0.0, 0.0, 0.5, 5.999, 6.0, 6.001, 100.0], np.float32)
    close(run('type: "ReLU6"', x), [0, 0, 0, 0.5, 5.999, 6, 6, 6])


def test_in_place_relu_leaves_the_bottom_tensor_untouched() -> None:
    text = """
    layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
    layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }
    """
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), TEST)
    x = torch.from_numpy(X.copy())
    net.set_tensor("data", x)
    net.run()
    np.testing.assert_array_equal(x.numpy(), X)
    close(net.tensor("data").numpy(), np.maximum(X64, 0))


def test_layer_counts_are_checked() -> None:
    text = 'name: "r" type: "ReLU" bottom: "a" bottom: "b" top: "c"'
    lp = text_format.Merge(text, caffe_pb2.LayerParameter())
    with pytest.raises(ModelFormatError, match="'r'"):
        layer_class("ReLU")(lp, TEST, CPU)


# ---------------------------------------------------------------------------------------------------
# PReLU
# ---------------------------------------------------------------------------------------------------
def prelu_ref(x: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape)
    for idx in np.ndindex(*x.shape):
        a = slopes.reshape(-1)[0] if slopes.size == 1 else slopes[idx[1]]
        out[idx] = max(x[idx], 0.0) + a * min(x[idx], 0.0)
    return out


def test_prelu_default_filler_and_blob_shapes() -> None:
    per_channel = make_layer('type: "PReLU"', X)
    shared = make_layer('type: "PReLU" prelu_param { channel_shared: true }', X)
    # Caffe: [C] per channel, a 0-axis blob (one value) when shared; default filler constant 0.25
    assert per_channel.blob_shapes() == [(3,)]
    assert shared.blob_shapes() == [()]
    np.testing.assert_array_equal(per_channel.blobs[0].numpy(), [0.25] * 3)
    assert shared.blobs[0].item() == 0.25
    close(run('type: "PReLU"', X), prelu_ref(X64, np.full(3, 0.25)))


def test_prelu_filler_is_used() -> None:
    layer = make_layer('type: "PReLU" prelu_param { filler { type: "constant" value: -0.7 } }', X)
    np.testing.assert_array_equal(layer.blobs[0].numpy(), np.full(3, -0.7, np.float32))


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_values(shared: bool) -> None:
    layer = make_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}', X)
    slopes = np.array(-0.3, np.float32) if shared else np.array([0.1, -0.4, 1.5], np.float32)
    layer.blobs[0] = torch.from_numpy(slopes.copy())
    with torch.no_grad():
        out = layer.forward([torch.from_numpy(X)])[0].numpy()
    close(out, prelu_ref(X64, slopes.astype(np.float64)))


def test_prelu_two_axis_bottom_and_errors() -> None:
    x = rand(4, 3, seed=2)
    layer = make_layer('type: "PReLU"', x)
    layer.blobs[0] = torch.tensor([0.5, 0.0, -1.0])
    with torch.no_grad():
        out = layer.forward([torch.from_numpy(x)])[0].numpy()
    close(out, prelu_ref(x.astype(np.float64), np.array([0.5, 0.0, -1.0])))
    with pytest.raises(ModelFormatError, match="at least 2 axes"):
        make_layer('type: "PReLU"', rand(5))
    with pytest.raises(ModelFormatError, match="channels"):
        layer.forward([torch.zeros(2, 4)])


# ---------------------------------------------------------------------------------------------------
# smooth element-wise functions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.5])
def test_elu(alpha: float) -> None:
    expected = np.where(X64 > 0, X64, np.float32(alpha) * (np.exp(np.minimum(X64, 0)) - 1))
    close(run(f'type: "ELU" elu_param {{ alpha: {alpha} }}', X), expected)


def test_sigmoid_tanh_absval() -> None:
    close(run('type: "Sigmoid"', X), 1.0 / (1.0 + np.exp(-X64)))
    close(run('type: "TanH"', X), np.tanh(X64))
    close(run('type: "AbsVal"', X), np.abs(X64))


def test_bnll_is_stable_at_large_magnitudes() -> None:
    x = np.array([-200.0, -30.0, -1.0, -1e-7, 0.0, 1e-7, 1.0, 19.0, 21.0, 30.0, 200.0], np.float32)
    expected = [v + np.log1p(np.exp(-v)) if v > 0 else np.log1p(np.exp(v)) for v in x.astype(np.float64)]
    out = run('type: "BNLL"', x)
    assert np.isfinite(out).all()
    close(out, expected)
    close(run('type: "BNLL"', X), np.log1p(np.exp(-np.abs(X64))) + np.maximum(X64, 0))


def test_swish() -> None:
    for beta in (1.0, 2.0, -0.5):
        expected = X64 / (1.0 + np.exp(-beta * X64))
        close(run(f'type: "Swish" swish_param {{ beta: {beta} }}', X), expected)


# ---------------------------------------------------------------------------------------------------
# Power / Exp / Log
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "power,scale,shift",
    [(1.0, 1.0, 0.0), (2.0, 1.0, 0.0), (2.0, 0.5, -1.0), (3.0, -2.0, 0.5), (-1.0, 1.0, 40.0),
     (0.5, 1.0, 40.0), (1.0, 3.0, 2.0)],
)
def test_power(power: float, scale: float, shift: float) -> None:
    text = f'type: "Power" power_param {{ power: {power} scale: {scale} shift: {shift} }}'
    close(run(text, X), (shift + scale * X64) ** power, rtol=2e-5)


def test_power_constant_cases() -> None:
    # Caffe ignores the input when power * scale == 0: power 0 gives 1 (also for 0 ^ 0), else shift^power
    close(run('type: "Power" power_param { power: 0 }', X), np.ones(X.shape))
    close(run('type: "Power" power_param { power: 0 shift: 0 scale: 0 }', X), np.ones(X.shape))
    close(run('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', X), np.full(X.shape, 8.0))
    out = run('type: "Power" power_param { power: 0.5 scale: 0 shift: -4 }', X)
    assert np.isnan(out).all()  # (-4)^0.5, as C's pow


def test_power_gradient_is_zero_for_constant_output() -> None:
    layer = make_layer('type: "Power" power_param { power: 0 scale: 3 }', X)
    x = torch.from_numpy(X.copy()).requires_grad_(True)
    out = layer.forward([x])[0]
    assert not out.requires_grad or torch.autograd.grad(out.sum(), x, allow_unused=True)[0] is None


@pytest.mark.parametrize(
    "base,scale,shift,fn",
    [
        (-1.0, 1.0, 0.0, lambda x: np.exp(x)),
        (-1.0, 0.5, 1.0, lambda x: np.exp(1.0 + 0.5 * x)),
        (2.0, 1.0, 0.0, lambda x: 2.0 ** x),
        (2.0, 0.5, 1.0, lambda x: 2.0 ** (1.0 + 0.5 * x)),
        (10.0, -0.25, -2.0, lambda x: 10.0 ** (-2.0 - 0.25 * x)),
        (0.5, 1.0, 0.0, lambda x: 0.5 ** x),
    ],
)
def test_exp(base: float, scale: float, shift: float, fn) -> None:
    x = np.clip(X, -8, 8)
    text = f'type: "Exp" exp_param {{ base: {base} scale: {scale} shift: {shift} }}'
    close(run(text, x), fn(x.astype(np.float64)), rtol=2e-5)


@pytest.mark.parametrize(
    "base,scale,shift,fn",
    [
        (-1.0, 1.0, 0.0, np.log),
        (-1.0, 2.0, 3.0, lambda x: np.log(3.0 + 2.0 * x)),
        (2.0, 1.0, 0.0, np.log2),
        (10.0, 2.0, 3.0, lambda x: np.log10(3.0 + 2.0 * x)),
        (0.5, 1.0, 0.5, lambda x: np.log(0.5 + x) / np.log(0.5)),
    ],
)
def test_log(base: float, scale: float, shift: float, fn) -> None:
    x = np.abs(X) + np.float32(0.01)
    text = f'type: "Log" log_param {{ base: {base} scale: {scale} shift: {shift} }}'
    close(run(text, x), fn(x.astype(np.float64)), rtol=2e-5)


def test_log_of_non_positive_is_nan_or_inf() -> None:
    out = run('type: "Log"', np.array([0.0, -1.0, 1.0], np.float32))
    assert out[0] == -np.inf and np.isnan(out[1]) and out[2] == 0.0


@pytest.mark.parametrize("layer_type", ["Exp", "Log"])
@pytest.mark.parametrize("base", [0.0, -2.0])
def test_exp_log_reject_non_positive_base(layer_type: str, base: float) -> None:
    with pytest.raises(ModelFormatError, match="base"):
        make_layer(f'type: "{layer_type}" {layer_type.lower()}_param {{ base: {base} }}', X)


def test_log_rejects_base_one() -> None:
    with pytest.raises(ModelFormatError, match="base"):
        make_layer('type: "Log" log_param { base: 1 }', X)


# ---------------------------------------------------------------------------------------------------
# Threshold / Clip
# ---------------------------------------------------------------------------------------------------
def test_threshold() -> None:
    x = np.array([-1.0, 0.0, 0.4999, 0.5, 0.5001, 7.0], np.float32)
    out = run('type: "Threshold" threshold_param { threshold: 0.5 }', x)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(run('type: "Threshold"', x), [0, 0, 1, 1, 1, 1])


def test_clip_values_and_gradient_mask() -> None:
    x = np.array([-3.0, -1.0, -0.5, 0.0, 2.0, 2.5], np.float32)
    layer = make_layer('type: "Clip" clip_param { min: -1 max: 2 }', x)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = layer.forward([xt])[0]
    np.testing.assert_array_equal(out.detach().numpy(), [-1, -1, -0.5, 0, 2, 2])
    (grad,) = torch.autograd.grad(out.sum(), xt)
    # Caffe: dy * (min <= x <= max), bounds included
    np.testing.assert_array_equal(grad.numpy(), [0, 1, 1, 1, 1, 0])


def test_clip_with_min_above_max_gives_min() -> None:
    x = np.array([-5.0, 0.0, 5.0], np.float32)
    np.testing.assert_array_equal(run('type: "Clip" clip_param { min: 1 max: -1 }', x), [1, 1, 1])


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------
def test_dropout_test_phase_is_identity() -> None:
    np.testing.assert_array_equal(run('type: "Dropout" dropout_param { dropout_ratio: 0.7 }', X), X)


def test_dropout_train_scales_kept_values_and_zeroes_the_rest() -> None:
    x = np.abs(rand(64, 1000, seed=3)) + np.float32(0.5)
    fillers.set_random_seed(11)
    out = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, phase=TRAIN)
    kept = out != 0
    scale = np.float32(1.0 / (1.0 - np.float32(0.3)))
    np.testing.assert_allclose(out[kept], x[kept] * scale, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 0.01
    # the same seed gives the same mask; the next forward draws a new one
    fillers.set_random_seed(11)
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, phase=TRAIN)
    with torch.no_grad():
        again = layer.forward([torch.from_numpy(x)])[0].numpy()
        other = layer.forward([torch.from_numpy(x)])[0].numpy()
    np.testing.assert_array_equal(again, out)
    assert (other != out).any()


def test_dropout_train_gradient_uses_the_mask() -> None:
    x = torch.ones(1000, requires_grad=True)
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.5 }', np.ones(1000, np.float32),
                       phase=TRAIN)
    out = layer.forward([x])[0]
    (grad,) = torch.autograd.grad(out.sum(), x)
    np.testing.assert_array_equal(grad.numpy(), out.detach().numpy())  # dy * mask * 2 with x = 1
    assert set(np.unique(grad.numpy())) <= {0.0, 2.0}


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_dropout_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(ModelFormatError, match="dropout_ratio"):
        make_layer(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', X, phase=TRAIN)


# ---------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------
def smooth_input(*shape: int, seed: int) -> torch.Tensor:
    """float64 values at least 0.1 away from 0, where ReLU/PReLU are differentiable."""
    x = np.random.RandomState(seed).randn(*shape)
    x = np.where(np.abs(x) < 0.1, np.sign(x + 1e-12) * 0.1 + x, x)
    return torch.from_numpy(x).requires_grad_(True)


@pytest.mark.parametrize("slope", [0.0, 0.2, -0.5])
def test_relu_gradient(slope: float) -> None:
    layer = make_layer(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}', X)
    x = smooth_input(2, 3, 4, seed=5)
    assert torch.autograd.gradcheck(lambda t: layer.forward([t])[0], (x,))
    # Caffe's backward: dy * ((x > 0) + slope * (x <= 0)); at x == 0 that is the slope
    x0 = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    dy = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(layer.forward([x0])[0], x0, dy)
    np.testing.assert_allclose(grad.numpy(), [slope, 3.0 * np.float32(slope), 5.0])


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_gradient(shared: bool) -> None:
    layer = make_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}', X)
    x = smooth_input(2, 3, 4, 2, seed=6)
    slope = torch.tensor(0.3 if shared else [0.3, -0.2, 1.1], dtype=torch.float64, requires_grad=True)

    def f(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        layer.blobs[0] = a
        return layer.forward([t])[0]

    assert torch.autograd.gradcheck(f, (x, slope))
    # Caffe's slope gradient: sum over the channel of dy * x where x <= 0
    dy = torch.from_numpy(np.random.RandomState(7).randn(2, 3, 4, 2))
    gx, ga = torch.autograd.grad(f(x, slope), (x, slope), dy)
    xn, dyn, an = x.detach().numpy(), dy.numpy(), slope.detach().numpy()
    neg = xn <= 0
    expected_ga = (dyn * xn * neg).sum() if shared else (dyn * xn * neg).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(ga.numpy(), expected_ga, rtol=1e-10)
    a_b = an if shared else an[None, :, None, None]
    np.testing.assert_allclose(gx.numpy(), np.where(neg, a_b * dyn, dyn), rtol=1e-10)


# ---------------------------------------------------------------------------------------------------
# reference Caffe
# ---------------------------------------------------------------------------------------------------
REF_NET = """
name: "activations"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
layer { name: "leaky" type: "ReLU" bottom: "data" top: "leaky" relu_param { negative_slope: -0.3 } }
layer { name: "relu6" type: "ReLU6" bottom: "data" top: "relu6" }
layer { name: "prelu" type: "PReLU" bottom: "data" top: "prelu" }
layer { name: "prelu_s" type: "PReLU" bottom: "data" top: "prelu_s" prelu_param { channel_shared: true } }
layer { name: "elu" type: "ELU" bottom: "data" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "data" top: "sigmoid" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "abs" type: "AbsVal" bottom: "data" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }
layer { name: "pow0" type: "Power" bottom: "data" top: "pow0" power_param { power: 0 scale: 2 } }
layer { name: "pow2" type: "Power" bottom: "data" top: "pow2" power_param { power: 2 scale: 0.5 shift: -1 } }
layer { name: "powc" type: "Power" bottom: "data" top: "powc" power_param { power: 3 scale: 0 shift: 1.5 } }
layer { name: "pos" type: "Power" bottom: "abs" top: "pos" power_param { shift: 0.25 } }
layer { name: "sqrt" type: "Power" bottom: "pos" top: "sqrt" power_param { power: 0.5 scale: 3 } }
layer { name: "exp" type: "Exp" bottom: "tanh" top: "exp" }
layer { name: "exp2" type: "Exp" bottom: "tanh" top: "exp2" exp_param { base: 2 scale: 1.5 shift: -0.5 } }
layer { name: "log" type: "Log" bottom: "pos" top: "log" }
layer { name: "log10" type: "Log" bottom: "pos" top: "log10" log_param { base: 10 scale: 2 shift: 1 } }
layer { name: "thr" type: "Threshold" bottom: "data" top: "thr" threshold_param { threshold: 0.25 } }
layer { name: "drop" type: "Dropout" bottom: "data" top: "drop" dropout_param { dropout_ratio: 0.4 } }
layer { name: "chain" type: "PReLU" bottom: "drop" top: "chain" }
layer { name: "chain_relu" type: "ReLU" bottom: "chain" top: "chain" relu_param { negative_slope: 0.5 } }
layer { name: "chain_tanh" type: "TanH" bottom: "chain" top: "chain" }
"""


def ref_input() -> np.ndarray:
    x = rand(2, 3, 4, 5, seed=21, scale=3.0)
    x.reshape(-1)[:8] = [0.0, 6.0, 7.5, -40.0, 40.0, 0.25, -0.0, 5.9]
    return x


def test_reference_caffe_activations(reference_caffe: str, tmp_path: Path) -> None:
    net = Net(text_format.Merge(REF_NET, caffe_pb2.NetParameter()), TEST)
    layers = dict(zip(net.layer_names, getattr(net, "engine_layers", None) or net.layers))
    layers["prelu"].blobs[0].copy_(torch.tensor([0.1, -0.6, 1.3]))
    layers["prelu_s"].blobs[0].fill_(-0.45)
    layers["chain"].blobs[0].copy_(torch.tensor([2.0, 0.05, -1.0]))
    weights = tmp_path / "act.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    x = ref_input()
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    ref = run_reference(REF_NET, inputs={"data": x}, weights=weights)
    for name in net.blob_names:
        assert_close(net.tensor(name).numpy(), ref["blobs"][name], name)


def test_reference_caffemodel_with_shared_prelu_loads(reference_caffe: str, tmp_path: Path) -> None:
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 } } }
    layer { name: "p" type: "PReLU" bottom: "data" top: "p"
            prelu_param { channel_shared: true filler { type: "constant" value: -0.125 } } }
    """
    saved = tmp_path / "ref.caffemodel"
    x = rand(1, 2, 3, seed=4)
    ref = run_reference(text, inputs={"data": x}, save_weights=saved)
    assert ref["params"]["p/0"].shape == ()
    # Caffe writes a 0-axis blob with no shape field at all (and reads such a blob as 0-axis)
    assert shape_matches(caffe_pb2.BlobProto(data=[1.0]), ())
    net = Net(text_format.Merge(text.replace("-0.125", "0.9"), caffe_pb2.NetParameter()), TEST, weights=saved)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    assert_close(net.tensor("p").numpy(), ref["blobs"]["p"], "p")
