"""Tests of the normalisation layers (engine/layers/normalization.py): BatchNorm, Scale, Bias, LRN, MVN.

Expected values come from numpy loops in float64 of Caffe's algorithms -- BatchNorm (per-channel statistics,
Caffe's running-sum update) and Scale/Bias in tests/references/layers.py, explicit LRN windows with Caffe's
pooling divisor and MVN with the centred variance here -- and from hand computations. Gradients of BatchNorm
(TRAIN) are checked against finite differences in float64; MVN's against Caffe's backward formula. Cross-
checks run a TEST net with every layer here and a TRAIN BatchNorm net (outputs and updated blobs) in the
reference Caffe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers.base import TEST, TRAIN, Layer
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.model.io import save_caffemodel
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close, make_layer
from tests.references.layers import batchnorm_global, batchnorm_train, broadcast
from tests.references.real_caffe import run_reference

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def forward(layer: Layer, *bottoms: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        (out,) = layer.forward([torch.from_numpy(b) for b in bottoms])
    assert out.dtype == torch.float32
    return out.numpy()


def set_blobs(layer: Layer, *values: np.ndarray) -> None:
    for i, v in enumerate(values):
        layer.blobs[i].copy_(torch.from_numpy(np.asarray(v, np.float32)))


def rand(*shape: int, seed: int = 0, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    return (np.random.RandomState(seed).randn(*shape) * scale + offset).astype(np.float32)


def close(ours: np.ndarray, expected: np.ndarray, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    assert ours.shape == np.shape(expected), f"shape {ours.shape} vs {np.shape(expected)}"
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=atol)


def layers_of(net: Net) -> dict[str, Layer]:
    return dict(zip(net.layer_names, getattr(net, "engine_layers", None) or net.layers))


# ---------------------------------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------------------------------
def test_batchnorm_blobs_and_param_specs() -> None:
    layer = make_layer('type: "BatchNorm"', rand(2, 3, 4))
    assert layer.blob_shapes() == [(3,), (3,), (1,)]
    assert all(float(b.abs().sum()) == 0 for b in layer.blobs)
    # Caffe appends param { lr_mult: 0 } for each statistic blob
    assert [p.lr_mult for p in layer.param.param] == [0.0, 0.0, 0.0]
    layer = make_layer('type: "BatchNorm" param { lr_mult: 0 decay_mult: 0 }', rand(2, 3))
    assert [p.lr_mult for p in layer.param.param] == [0.0, 0.0, 0.0]
    assert layer.param.param[0].decay_mult == 0.0
    with pytest.raises(ModelFormatError, match="lr_mult"):
        make_layer('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }', rand(2, 3))
    with pytest.raises(ModelFormatError, match="2 axes"):
        make_layer('type: "BatchNorm"', rand(5))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("factor", [2.5, 1.0, 0.0])
def test_batchnorm_global_stats(shape: tuple[int, ...], factor: float) -> None:
    x = rand(*shape, seed=1, scale=2.0)
    layer = make_layer('type: "BatchNorm" batch_norm_param { eps: 0.001 }', x)
    b0, b1 = rand(3, seed=2), np.abs(rand(3, seed=3)) + 0.5
    set_blobs(layer, b0, b1, [factor])
    expected = batchnorm_global(x.astype(np.float64), b0, b1, factor, np.float32(0.001))
    close(forward(layer, x), expected, rtol=1e-4)
    if factor == 0:
        # Caffe: scale factor 0 -> mean 0, var 0 -> y = x / sqrt(eps)
        close(forward(layer, x), x / np.sqrt(np.float32(0.001)), rtol=1e-5)


def test_batchnorm_default_eps_and_phase_default() -> None:
    x = rand(2, 3, 4, seed=4)
    test_layer = make_layer('type: "BatchNorm"', x, phase=TEST)
    set_blobs(test_layer, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [2.0])
    close(forward(test_layer, x),
          batchnorm_global(x, np.array([1, 2, 3.0]), np.array([4, 5, 6.0]), 2.0, 1e-5))
    train_layer = make_layer('type: "BatchNorm"', x, phase=TRAIN)
    close(forward(train_layer, x),
          batchnorm_train(x, [np.zeros(3), np.zeros(3), np.zeros(1)], 0.999, 1e-5)[0], rtol=1e-4)
    # explicit use_global_stats overrides the phase
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true }', x, phase=TRAIN)
    set_blobs(layer, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [2.0])
    close(forward(layer, x), batchnorm_global(x, np.array([1, 2, 3.0]), np.array([4, 5, 6.0]), 2.0, 1e-5))
    np.testing.assert_array_equal(layer.blobs[2].numpy(), [2.0])


@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (6, 3), (3, 3, 7), (1, 3), (2, 3, 2, 2, 3)])
def test_batchnorm_train_statistics_and_update(shape: tuple[int, ...]) -> None:
    x = rand(*shape, seed=5, scale=3.0, offset=1.0)
    layer = make_layer('type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 eps: 0.01 }', x,
                       phase=TRAIN)
    blobs = [rand(3, seed=6), np.abs(rand(3, seed=7)), np.array([1.7], np.float32)]
    set_blobs(layer, *blobs)
    expected, updated = batchnorm_train(x, blobs, np.float32(0.9), np.float32(0.01))
    out = forward(layer, x)
    if shape == (1, 3):  # m = 1: zero variance, y = 0; var_sum gets the biased var (0) unscaled
        assert np.abs(out).max() == 0
    close(out, expected, rtol=1e-4, atol=1e-4)
    for i in range(3):
        close(layer.blobs[i].numpy(), updated[i], rtol=1e-5)
    # a second forward accumulates again
    _, twice = batchnorm_train(x, updated, np.float32(0.9), np.float32(0.01))
    forward(layer, x)
    for i in range(3):
        close(layer.blobs[i].numpy(), twice[i], rtol=1e-5)


def test_batchnorm_use_global_stats_false_updates_in_test_phase() -> None:
    x = rand(3, 3, 2, seed=8)
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: false }', x, phase=TEST)
    forward(layer, x)
    np.testing.assert_allclose(layer.blobs[2].numpy(), [1.0])
    close(layer.blobs[0].numpy(), x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5)


def test_batchnorm_rejects_a_channel_change() -> None:
    layer = make_layer('type: "BatchNorm"', rand(2, 3, 4))
    with pytest.raises(ModelFormatError, match="3 channels"):
        forward(layer, rand(2, 4, 4))


def test_batchnorm_train_gradient_matches_finite_differences() -> None:
    layer = make_layer('type: "BatchNorm" batch_norm_param { eps: 0.1 }', rand(3, 2, 2, 2), phase=TRAIN)
    x = torch.from_numpy(np.random.RandomState(9).randn(3, 2, 2, 2)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer.forward([t])[0], (x,))
    # Caffe's backward: (dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps), per channel
    dy = np.random.RandomState(10).randn(3, 2, 2, 2)
    out = layer.forward([x])[0]
    (gx,) = torch.autograd.grad(out, x, torch.from_numpy(dy))
    xn, yn = x.detach().numpy(), out.detach().numpy()
    for c in range(2):
        d, y = dy[:, c], yn[:, c]
        std = np.sqrt(xn[:, c].var() + np.float32(0.1))
        np.testing.assert_allclose(gx.numpy()[:, c], (d - d.mean() - (d * y).mean() * y) / std, rtol=1e-8)


def test_batchnorm_global_stats_gradient_is_dy_over_std() -> None:
    layer = make_layer('type: "BatchNorm"', rand(2, 2, 3))
    set_blobs(layer, [1.0, -1.0], [3.0, 0.5], [0.5])
    x = torch.from_numpy(rand(2, 2, 3, seed=11)).requires_grad_(True)
    (gx,) = torch.autograd.grad(layer.forward([x])[0].sum(), x)
    std = np.sqrt(np.array([6.0, 1.0]) + 1e-5)
    close(gx.numpy(), np.broadcast_to((1.0 / std)[None, :, None], (2, 2, 3)))
    assert layer.blobs[0].grad is None


def test_net_construction_does_not_update_batchnorm_statistics() -> None:
    text = """
    layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" }
    """
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), TRAIN)
    factor = float(layers_of(net)["bn"].blobs[2])
    assert factor == 0.0  # the shape pass at construction updated no statistics
    net.set_tensor("data", torch.from_numpy(rand(2, 3, 4)))
    net.run()
    assert float(layers_of(net)["bn"].blobs[2]) == 1.0


# ---------------------------------------------------------------------------------------------------
# Scale / Bias
# ---------------------------------------------------------------------------------------------------
def mul(a: float, b: float) -> float:
    return a * b


def add(a: float, b: float) -> float:
    return a + b


SCALE_CASES = [
    # (param text, expected blob shape, axis used by the reference)
    ("", (3,), 1),
    ("axis: 1 num_axes: 2", (3, 4), 1),
    ("axis: 0 num_axes: -1", (2, 3, 4, 5), 0),
    ("axis: 2 num_axes: -1", (4, 5), 2),
    ("axis: -1", (5,), 3),
    ("axis: -3 num_axes: 3", (3, 4, 5), 1),
    ("num_axes: 0", (), 0),
    ("axis: 0 num_axes: 1", (2,), 0),
]


@pytest.mark.parametrize("params,shape,axis", SCALE_CASES)
def test_scale_one_bottom(params: str, shape: tuple[int, ...], axis: int) -> None:
    x = rand(2, 3, 4, 5, seed=12)
    layer = make_layer(f'type: "Scale" scale_param {{ {params} }}', x)
    assert layer.blob_shapes() == [shape]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), np.ones(shape, np.float32))  # default filler 1
    s = rand(*shape, seed=13) if shape else np.array(-1.5, np.float32)
    set_blobs(layer, s)
    close(forward(layer, x), broadcast(x, s, axis, mul))


@pytest.mark.parametrize("params,shape,axis", SCALE_CASES[:4])
def test_scale_with_bias_term(params: str, shape: tuple[int, ...], axis: int) -> None:
    x = rand(2, 3, 4, 5, seed=14)
    text = f'type: "Scale" scale_param {{ {params} bias_term: true filler {{ type: "constant" value: 2 }} }}'
    layer = make_layer(text, x)
    assert layer.blob_shapes() == [shape, shape]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), np.full(shape, 2.0, np.float32))
    np.testing.assert_array_equal(layer.blobs[1].numpy(), np.zeros(shape, np.float32))  # bias default 0
    s, b = rand(*shape, seed=15), rand(*shape, seed=16)
    set_blobs(layer, s, b)
    expected = broadcast(broadcast(x, s, axis, mul), b, axis, add)
    close(forward(layer, x), expected)


def test_scale_bias_filler() -> None:
    text = 'type: "Scale" scale_param { bias_term: true bias_filler { type: "constant" value: 0.5 } }'
    layer = make_layer(text, rand(2, 3))
    np.testing.assert_array_equal(layer.blobs[1].numpy(), [0.5, 0.5, 0.5])


@pytest.mark.parametrize(
    "axis,s_shape,ref_axis",
    [(1, (3,), 1), (0, (2, 3), 0), (1, (3, 4), 1), (-2, (4, 5), 2), (1, (), 0), (0, (2, 3, 4, 5), 0)],
)
def test_scale_two_bottoms(axis: int, s_shape: tuple[int, ...], ref_axis: int) -> None:
    x = rand(2, 3, 4, 5, seed=17)
    s = rand(*s_shape, seed=18) if s_shape else np.array(0.75, np.float32)
    layer = make_layer(f'type: "Scale" scale_param {{ axis: {axis} }}', x, s)
    assert layer.blobs == []
    close(forward(layer, x, s), broadcast(x, s, ref_axis, mul))
    # bias_term: only a bias blob, shaped like bottom 1
    layer = make_layer(f'type: "Scale" scale_param {{ axis: {axis} bias_term: true }}', x, s)
    assert layer.blob_shapes() == [s_shape]
    b = rand(*s_shape, seed=19) if s_shape else np.array(-2.0, np.float32)
    set_blobs(layer, b)
    close(forward(layer, x, s), broadcast(broadcast(x, s, ref_axis, mul), b, ref_axis, add))


def test_scale_two_bottoms_gradient_reaches_the_scale_bottom() -> None:
    x_np, s_np = rand(2, 3, 4, seed=20), rand(3, seed=21)
    layer = make_layer('type: "Scale"', x_np, s_np)
    x = torch.from_numpy(x_np).requires_grad_(True)
    s = torch.from_numpy(s_np).requires_grad_(True)
    dy = rand(2, 3, 4, seed=22)
    gx, gs = torch.autograd.grad(layer.forward([x, s])[0], (x, s), torch.from_numpy(dy))
    close(gs.numpy(), (x_np.astype(np.float64) * dy).sum(axis=(0, 2)))
    close(gx.numpy(), dy * s_np[None, :, None])


def test_scale_shape_errors() -> None:
    x = rand(2, 3, 4)
    with pytest.raises(ModelFormatError, match="past the bottom"):
        make_layer('type: "Scale" scale_param { axis: 2 num_axes: 2 }', x)
    with pytest.raises(ModelFormatError, match="out of range"):
        make_layer('type: "Scale" scale_param { axis: 3 }', x)
    with pytest.raises(ModelFormatError, match="num_axes"):
        make_layer('type: "Scale" scale_param { num_axes: -2 }', x)
    with pytest.raises(ModelFormatError, match="does not match"):
        forward(make_layer('type: "Scale"', x, rand(4)), x, rand(4))
    layer = make_layer('type: "Scale"', x)
    with pytest.raises(ModelFormatError, match="does not match"):
        forward(layer, rand(2, 5, 4))


@pytest.mark.parametrize("params,shape,axis", SCALE_CASES)
def test_bias_one_bottom(params: str, shape: tuple[int, ...], axis: int) -> None:
    x = rand(2, 3, 4, 5, seed=23)
    layer = make_layer(f'type: "Bias" bias_param {{ {params} }}', x)
    assert layer.blob_shapes() == [shape]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), np.zeros(shape, np.float32))  # default filler 0
    b = rand(*shape, seed=24) if shape else np.array(3.0, np.float32)
    set_blobs(layer, b)
    close(forward(layer, x), broadcast(x, b, axis, add))


def test_bias_filler_and_two_bottoms() -> None:
    x = rand(2, 3, 4, seed=25)
    layer = make_layer('type: "Bias" bias_param { filler { type: "constant" value: 1.5 } }', x)
    np.testing.assert_array_equal(layer.blobs[0].numpy(), [1.5] * 3)
    b = rand(3, 4, seed=26)
    layer = make_layer('type: "Bias"', x, b)
    assert layer.blobs == []
    close(forward(layer, x, b), broadcast(x, b, 1, add))
    layer = make_layer('type: "Bias" bias_param { axis: 0 }', x, rand(2, seed=27))
    close(forward(layer, x, rand(2, seed=27)), broadcast(x, rand(2, seed=27), 0, add))


# ---------------------------------------------------------------------------------------------------
# LRN
# ---------------------------------------------------------------------------------------------------
def lrn_across_ref(x: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    n, c, h, w = x.shape
    pad = (size - 1) // 2
    out = np.empty(x.shape)
    for idx in np.ndindex(n, c, h, w):
        i, ch, y, z = idx
        window = [x[i, cc, y, z] ** 2 for cc in range(ch - pad, ch + pad + 1) if 0 <= cc < c]
        out[idx] = x[idx] * (k + alpha / size * sum(window)) ** -beta
    return out


def lrn_within_ref(x: np.ndarray, size: int, alpha: float, beta: float) -> np.ndarray:
    """Caffe: AVE pooling of x^2 (divisor size^2 everywhere), then (1 + alpha * pooled) ^ -beta."""
    n, c, h, w = x.shape
    pad = (size - 1) // 2
    out = np.empty(x.shape)
    for idx in np.ndindex(n, c, h, w):
        i, ch, y, z = idx
        total = sum(
            x[i, ch, yy, zz] ** 2
            for yy in range(y - pad, y + pad + 1)
            for zz in range(z - pad, z + pad + 1)
            if 0 <= yy < h and 0 <= zz < w
        )
        out[idx] = x[idx] * (1.0 + alpha * total / size**2) ** -beta
    return out


@pytest.mark.parametrize(
    "size,alpha,beta,k", [(5, 1.0, 0.75, 1.0), (3, 2.0, 0.6, 1.5), (1, 0.5, 1.0, 2.0), (7, 1e-2, 0.75, 0.5)]
)
def test_lrn_across_channels(size: int, alpha: float, beta: float, k: float) -> None:
    x = rand(2, 6, 3, 4, seed=28, scale=2.0)
    text = f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}'
    expected = lrn_across_ref(x.astype(np.float64), size, alpha, beta, k)
    close(forward(make_layer(text, x), x), expected, rtol=2e-5)


@pytest.mark.parametrize("size,alpha,beta", [(3, 2.0, 0.6), (5, 1.0, 0.75), (1, 0.3, 2.0), (7, 4.0, 0.5)])
def test_lrn_within_channel(size: int, alpha: float, beta: float) -> None:
    x = rand(2, 2, 5, 6, seed=29, scale=2.0)
    text = (f'type: "LRN" lrn_param {{ norm_region: WITHIN_CHANNEL local_size: {size} alpha: {alpha} '
            f"beta: {beta} k: 9 }}")  # k is ignored by Caffe's WITHIN_CHANNEL
    close(forward(make_layer(text, x), x), lrn_within_ref(x.astype(np.float64), size, alpha, beta), rtol=2e-5)


def test_lrn_border_values_by_hand() -> None:
    ones = np.ones((1, 1, 3, 3), np.float32)
    text = 'type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 2 k: 5 }'
    within = make_layer(text, ones)
    out = forward(within, ones)[0, 0]
    # corner: 4 of the 9 window cells are inside, divisor 9: (1 + 2 * 4/9) ^ -0.75
    assert out[0, 0] == pytest.approx((1 + 2 * 4 / 9) ** -0.75, rel=1e-6)
    assert out[0, 1] == pytest.approx((1 + 2 * 6 / 9) ** -0.75, rel=1e-6)
    assert out[1, 1] == pytest.approx((1 + 2 * 9 / 9) ** -0.75, rel=1e-6)
    ones = np.ones((1, 4, 1, 1), np.float32)
    across = make_layer('type: "LRN" lrn_param { local_size: 5 alpha: 1 beta: 1 k: 2 }', ones)
    out = forward(across, ones).reshape(-1)
    # channel 0 sees channels 0..2 (3 values), channel 1 sees 0..3 (4), divisor always 5
    np.testing.assert_allclose(out, [1 / (2 + 3 / 5), 1 / (2 + 4 / 5), 1 / (2 + 4 / 5), 1 / (2 + 3 / 5)],
                               rtol=1e-6)


def test_lrn_errors() -> None:
    with pytest.raises(ModelFormatError, match="odd"):
        make_layer('type: "LRN" lrn_param { local_size: 4 }', rand(1, 2, 3, 3))
    layer = make_layer('type: "LRN"', rand(1, 2, 3, 3))
    with pytest.raises(ModelFormatError, match="4-D"):
        forward(layer, rand(2, 3, 4))


def test_lrn_gradient_matches_finite_differences() -> None:
    for region in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
        layer = make_layer(f'type: "LRN" lrn_param {{ local_size: 3 alpha: 2 norm_region: {region} }}',
                           rand(1, 4, 2, 3))
        x = torch.from_numpy(np.random.RandomState(30).randn(1, 4, 2, 3)).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t, lay=layer: lay.forward([t])[0], (x,))


# ---------------------------------------------------------------------------------------------------
# MVN
# ---------------------------------------------------------------------------------------------------
def mvn_ref(x: np.ndarray, normalize_variance: bool, across: bool, eps: float) -> np.ndarray:
    legacy = x.shape + (1,) * (4 - x.ndim)
    x4 = x.astype(np.float64).reshape(legacy)
    out = np.empty(legacy)
    groups = [(n,) for n in range(legacy[0])] if across else list(np.ndindex(*legacy[:2]))
    for g in groups:
        vals = x4[g]
        centred = vals - vals.mean()
        if normalize_variance:
            centred = centred / (np.sqrt((centred**2).mean()) + eps)
        out[g] = centred
    return out


@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("eps", [1e-9, 0.5])
def test_mvn(normalize_variance: bool, across: bool, eps: float) -> None:
    x = rand(2, 3, 4, 5, seed=31, scale=2.0, offset=0.5)
    text = (f'type: "MVN" mvn_param {{ normalize_variance: {str(normalize_variance).lower()} '
            f"across_channels: {str(across).lower()} eps: {eps} }}")
    close(forward(make_layer(text, x), x), mvn_ref(x, normalize_variance, across, np.float32(eps)), rtol=1e-4)


def test_mvn_defaults_and_legacy_4d_top() -> None:
    x = rand(3, 4, 5, seed=32)
    out = forward(make_layer('type: "MVN"', x), x)
    assert out.shape == (3, 4, 5, 1)
    close(out, mvn_ref(x, True, False, 1e-9), rtol=1e-4)
    x2 = rand(3, 4, seed=33)
    out = forward(make_layer('type: "MVN" mvn_param { across_channels: true }', x2), x2)
    assert out.shape == (3, 4, 1, 1)
    close(out, mvn_ref(x2, True, True, 1e-9), rtol=1e-4)
    # per (n, c) with one value each: all zeros
    np.testing.assert_array_equal(forward(make_layer('type: "MVN"', x2), x2), np.zeros((3, 4, 1, 1)))
    with pytest.raises(ModelFormatError, match="4-D"):
        forward(make_layer('type: "MVN"', x), rand(1, 2, 1, 2, 3))


def test_mvn_uses_the_centred_variance() -> None:
    # E[x^2] - E[x]^2 in float32 is dominated by rounding at an offset of 1000 (even negative);
    # Caffe computes E[(x - E[x])^2]
    x = (1000.0 + np.arange(2 * 18).reshape(2, 2, 3, 3) * 0.01).astype(np.float32)
    out = forward(make_layer('type: "MVN"', x), x)
    close(out, mvn_ref(x, True, False, 1e-9), rtol=0, atol=5e-3)


def test_mvn_backward_is_caffes() -> None:
    layer = make_layer('type: "MVN" mvn_param { eps: 0.5 }', rand(2, 2, 3))
    xn = np.random.RandomState(34).randn(2, 2, 3)
    xn[1, 0] = 4.0  # a constant slice: finite gradient in Caffe
    x = torch.from_numpy(xn).requires_grad_(True)
    dy = np.random.RandomState(35).randn(2, 2, 3, 1)
    out = layer.forward([x])[0]
    (gx,) = torch.autograd.grad(out, x, torch.from_numpy(dy))
    yn = out.detach().numpy()
    for n in range(2):
        for c in range(2):
            vals, d, y = xn[n, c], dy[n, c, :, 0], yn[n, c, :, 0]
            std = np.sqrt(((vals - vals.mean()) ** 2).mean()) + np.float32(0.5)
            np.testing.assert_allclose(gx.numpy()[n, c], (d - d.mean() - (d * y).mean() * y) / std, rtol=1e-8,
                                       atol=1e-12)
    # with the default tiny eps Caffe's gradient is the exact one
    layer = make_layer('type: "MVN"', rand(2, 2, 3))
    x = torch.from_numpy(np.random.RandomState(36).randn(2, 2, 3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer.forward([t])[0], (x,))


# ---------------------------------------------------------------------------------------------------
# reference Caffe
# ---------------------------------------------------------------------------------------------------
REF_TEST_NET = """
name: "norms"
layer { name: "data" type: "Input" top: "data" top: "sv" top: "bv" top: "vec"
  input_param { shape { dim: 2 dim: 4 dim: 5 dim: 6 } shape { dim: 2 dim: 4 } shape { dim: 4 }
                shape { dim: 3 dim: 5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "bn0" }
layer { name: "bnvec" type: "BatchNorm" bottom: "vec" top: "bnvec" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "sc2" type: "Scale" bottom: "data" top: "sc2" scale_param { num_axes: 2 } }
layer { name: "sc0" type: "Scale" bottom: "data" top: "sc0" scale_param { num_axes: 0 bias_term: true } }
layer { name: "sclast" type: "Scale" bottom: "data" top: "sclast" scale_param { axis: -1 } }
layer { name: "scb" type: "Scale" bottom: "data" bottom: "sv" top: "scb"
  scale_param { axis: 0 bias_term: true } }
layer { name: "bias1" type: "Bias" bottom: "data" top: "bias1" bias_param { num_axes: -1 } }
layer { name: "bias2" type: "Bias" bottom: "data" bottom: "bv" top: "bias2" }
layer { name: "lrn" type: "LRN" bottom: "data" top: "lrn" }
layer { name: "lrn3" type: "LRN" bottom: "data" top: "lrn3"
  lrn_param { local_size: 3 alpha: 2 beta: 0.6 k: 1.5 } }
layer { name: "lrnw" type: "LRN" bottom: "data" top: "lrnw"
  lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 3 beta: 0.9 k: 7 } }
layer { name: "lrnw5" type: "LRN" bottom: "data" top: "lrnw5" lrn_param { norm_region: WITHIN_CHANNEL } }
layer { name: "mvn" type: "MVN" bottom: "data" top: "mvn" }
layer { name: "mvn_nv" type: "MVN" bottom: "data" top: "mvn_nv" mvn_param { normalize_variance: false } }
layer { name: "mvn_ac" type: "MVN" bottom: "data" top: "mvn_ac" mvn_param { across_channels: true eps: 0.1 } }
layer { name: "mvnvec" type: "MVN" bottom: "vec" top: "mvnvec" mvn_param { across_channels: true } }
layer { name: "far" type: "Power" bottom: "data" top: "far" power_param { scale: 0.01 shift: 1000 } }
layer { name: "mvnfar" type: "MVN" bottom: "far" top: "mvnfar" }
"""


def random_blobs(net: Net, seed: int) -> None:
    rng = np.random.RandomState(seed)
    for name, layer in layers_of(net).items():
        for i, b in enumerate(layer.blobs):
            values = np.asarray(rng.randn(*b.shape))
            if layer.type_name == "BatchNorm":
                values = np.abs(values) + 0.2 if i else values
                if i == 2:
                    values = np.array([0.0 if name == "bn0" else 2.5])
            b.copy_(torch.from_numpy(values.astype(np.float32)))


def test_reference_caffe_normalization_test_phase(reference_caffe: str, tmp_path: Path) -> None:
    net = Net(text_format.Merge(REF_TEST_NET, caffe_pb2.NetParameter()), TEST)
    random_blobs(net, 40)
    weights = tmp_path / "norm.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    inputs = {"data": rand(2, 4, 5, 6, seed=41, scale=2.0, offset=0.3), "sv": rand(2, 4, seed=42),
              "bv": rand(4, seed=43), "vec": rand(3, 5, seed=44)}
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    ref = run_reference(REF_TEST_NET, inputs=inputs, weights=weights)
    for name in net.blob_names:
        if name != "mvnfar":
            assert_close(net.tensor(name).numpy(), ref["blobs"][name], name)
    assert ref["blobs"]["mvnvec"].shape == (3, 5, 1, 1)
    # values 1000 + 0.01 * x: float32 means differ by summation order (a few 1e-3 after normalising),
    # while E[x^2] - E[x]^2 would give NaN or garbage here; both engines centre first
    assert_close(net.tensor("mvnfar").numpy(), ref["blobs"]["mvnfar"], "mvnfar", rtol=0, atol=2e-2)


REF_TRAIN_NET = """
name: "bn_train"
layer { name: "data" type: "Input" top: "data" top: "vec" top: "seq"
  input_param { shape { dim: 3 dim: 4 dim: 5 dim: 2 } shape { dim: 6 dim: 3 }
                shape { dim: 2 dim: 3 dim: 7 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn"
  batch_norm_param { moving_average_fraction: 0.9 eps: 0.001 } }
layer { name: "sc" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "bnvec" type: "BatchNorm" bottom: "vec" top: "vec" }
layer { name: "bnseq" type: "BatchNorm" bottom: "seq" top: "bnseq" batch_norm_param { eps: 0.1 } }
"""
# (Caffe inserts Split layers for a blob with several consumers, so an in-place layer must be the blob's
# only consumer; each in-place layer above is.)


def test_reference_caffe_batchnorm_train(reference_caffe: str, tmp_path: Path) -> None:
    net = Net(text_format.Merge(REF_TRAIN_NET, caffe_pb2.NetParameter()), TRAIN)
    random_blobs(net, 50)
    weights = tmp_path / "bn.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    inputs = {"data": rand(3, 4, 5, 2, seed=51, scale=2.0, offset=-1.0), "vec": rand(6, 3, seed=52),
              "seq": rand(2, 3, 7, seed=53, offset=5.0)}
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    ref = run_reference(REF_TRAIN_NET, inputs=inputs, weights=weights, phase="TRAIN")
    for name in ("bn", "vec", "bnseq"):
        assert_close(net.tensor(name).numpy(), ref["blobs"][name], name)
    for name, layer in layers_of(net).items():
        for i, b in enumerate(layer.blobs):
            assert_close(b.numpy(), ref["params"][f"{name}/{i}"], f"{name}/{i}")
