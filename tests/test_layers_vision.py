"""Tests of the vision layers (Convolution, Deconvolution, InnerProduct, Pooling).

Expected values come from the numpy loops of tests/references/layers.py (Caffe's algorithms, accumulated
in float64) and from hand-computed output-size tables; a cross-check runs small nets with all four layers
in the real Caffe (tests/references/real_caffe.py), with our weights saved to a caffemodel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers import layer_class, vision
from amct_caffe.engine.layers.base import TEST, TRAIN, Layer
from amct_caffe.engine.net import Net
from amct_caffe.errors import AmctError, ModelFormatError, UnsupportedLayerError
from amct_caffe.model.io import save_caffemodel
from amct_caffe.proto import caffe_pb2
from tests import helpers
from tests.helpers import assert_close
from tests.references.layers import FLT_MAX, conv2d, deconv2d, pool2d, pool2d_grad
from tests.references.real_caffe import run_reference

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def make_layer(text: str, *bottoms: np.ndarray, phase: int = TEST) -> Layer:
    """A set-up layer with one top per bottom (t0..), as multi-bottom Convolution layers have."""
    return helpers.make_layer(text, *bottoms, phase=phase, n_tops=max(1, len(bottoms)))


def run_layer(layer: Layer, *bottoms: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        outs = layer.forward([torch.from_numpy(b) for b in bottoms])
    return [o.numpy() for o in outs]


def blob(layer: Layer, i: int) -> np.ndarray:
    return layer.blobs[i].detach().numpy().astype(np.float64)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" min: -1 max: 1 }'


# ---------------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------------
CONV_CASES = [
    # (param text, C, H, W, stride, pad, dilation, group)
    ("num_output: 6 kernel_size: 3 pad: 1", 4, 7, 9, (1, 1), (1, 1), (1, 1), 1),
    ("num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2", 4, 9, 8, (2, 2), (1, 1), (1, 1), 2),
    ("num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 0 dilation: 2",
     3, 8, 9, (1, 2), (2, 0), (2, 2), 1),
    ("num_output: 4 kernel_size: 3 pad: 1 group: 4", 4, 6, 5, (1, 1), (1, 1), (1, 1), 4),
    ("num_output: 4 kernel_size: 3 kernel_size: 2 stride: 2 stride: 1 pad: 0 pad: 1 dilation: 1 dilation: 2",
     2, 9, 7, (2, 1), (0, 1), (1, 2), 1),
    ("num_output: 3 kernel_size: 1 bias_term: false", 5, 4, 6, (1, 1), (0, 0), (1, 1), 1),
    ("num_output: 2 kernel_size: 2 stride: 3 pad: 3", 2, 5, 5, (3, 3), (3, 3), (1, 1), 1),
]


@pytest.mark.parametrize("params,c,h,w,stride,pad,dilation,group", CONV_CASES)
def test_convolution_matches_direct_convolution(params, c, h, w, stride, pad, dilation, group):
    x = rand(2, c, h, w, seed=1)
    layer = make_layer(f'type: "Convolution" convolution_param {{ {params} {FILLERS} }}', x)
    weight = blob(layer, 0)
    bias = blob(layer, 1) if len(layer.blobs) > 1 else None
    assert ("bias_term: false" in params) == (bias is None)
    expected = conv2d(x.astype(np.float64), weight, bias, stride, pad, dilation, group)
    (out,) = run_layer(layer, x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_convolution_blob_shapes_and_default_fillers():
    x = rand(1, 6, 5, 5)
    layer = make_layer(
        'type: "Convolution" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 1 group: 2 }', x)
    # weight [num_output, C/group, kh, kw], bias [num_output]; Caffe's default filler is constant 0.
    assert [tuple(b.shape) for b in layer.blobs] == [(4, 3, 3, 1), (4,)]
    assert all(float(b.abs().sum()) == 0.0 for b in layer.blobs)
    (out,) = run_layer(layer, x)
    assert out.shape == (1, 4, 3, 5)


def test_convolution_output_size_table():
    # (in + 2*pad - (dilation*(k-1)+1)) / stride + 1, floored; hand-computed values.
    cases = [  # (H, k, stride, pad, dilation, expected)
        (7, 3, 2, 0, 1, 3), (8, 3, 2, 0, 1, 3), (8, 3, 2, 1, 1, 4), (9, 3, 1, 0, 2, 5), (5, 5, 1, 2, 1, 5),
        (6, 2, 4, 1, 1, 2),
    ]
    for h, k, s, p, d, expected in cases:
        x = rand(1, 1, h, 3)
        layer = make_layer(
            f'type: "Convolution" convolution_param {{ num_output: 1 kernel_h: {k} kernel_w: 1 '
            f"stride_h: {s} stride_w: 1 pad_h: {p} pad_w: 0 dilation: {d} dilation: 1 }}", x)
        assert run_layer(layer, x)[0].shape == (1, 1, expected, 3), (h, k, s, p, d)


def test_convolution_multiple_bottoms_share_weights():
    a, b = rand(2, 3, 5, 5, seed=2), rand(2, 3, 5, 5, seed=3)
    layer = make_layer(
        f'type: "Convolution" convolution_param {{ num_output: 2 kernel_size: 3 {FILLERS} }}', a, b)
    out_a, out_b = run_layer(layer, a, b)
    w, bias = blob(layer, 0), blob(layer, 1)
    np.testing.assert_allclose(out_a, conv2d(a, w, bias, (1, 1), (0, 0), (1, 1), 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_b, conv2d(b, w, bias, (1, 1), (0, 0), (1, 1), 1), rtol=1e-5, atol=1e-5)


def test_convolution_reads_blobs_at_forward():
    x = rand(1, 2, 4, 4)
    layer = make_layer('type: "Convolution" convolution_param { num_output: 1 kernel_size: 1 }', x)
    layer.blobs[0] = torch.full((1, 2, 1, 1), 2.0)
    layer.blobs[1] = torch.tensor([0.5])
    (out,) = run_layer(layer, x)
    np.testing.assert_allclose(out[0, 0], 2 * x[0].sum(axis=0) + 0.5, rtol=1e-6)


@pytest.mark.parametrize("params,shape,fragment,exc", [
    ("num_output: 2 kernel_size: 3 axis: 2", (1, 2, 5, 5), "axis", UnsupportedLayerError),
    ("num_output: 2 kernel_size: 3", (1, 2, 5, 5, 5), "2-D", UnsupportedLayerError),
    ("num_output: 2 kernel_size: 3", (1, 2, 5), "2-D", UnsupportedLayerError),
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5), "not both", ModelFormatError),
    ("num_output: 2", (1, 2, 5, 5), "kernel_size must be specified", ModelFormatError),
    ("num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3", (1, 2, 5, 5), "3 times", ModelFormatError),
    ("num_output: 2 kernel_h: 3", (1, 2, 5, 5), "nonzero", ModelFormatError),
    ("num_output: 2 kernel_size: 3 stride: 0", (1, 2, 5, 5), "stride", ModelFormatError),
    ("num_output: 2 kernel_size: 3 stride_h: 2", (1, 2, 5, 5), "stride", ModelFormatError),
    ("num_output: 2 kernel_size: 3 pad: 1 pad_h: 1", (1, 2, 5, 5), "not both", ModelFormatError),
    ("num_output: 2 kernel_size: 3 group: 2", (1, 3, 5, 5), "group", ModelFormatError),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), "multiple of group", ModelFormatError),
    ("kernel_size: 3", (1, 2, 5, 5), "num_output", ModelFormatError),
    ("num_output: 2 kernel_size: 7", (1, 2, 5, 5), "no output", ModelFormatError),
])
def test_convolution_rejects_bad_parameters(params, shape, fragment, exc):
    x = np.zeros(shape, np.float32)
    with pytest.raises(exc, match=fragment) as info:
        layer = make_layer(f'name: "c1" type: "Convolution" convolution_param {{ {params} }}', x)
        run_layer(layer, x)
    assert "'c1'" in str(info.value)


def test_convolution_rejects_channel_change_and_unequal_bottoms():
    x = rand(1, 2, 5, 5)
    layer = make_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }', x)
    with pytest.raises(ModelFormatError, match="channels"):
        run_layer(layer, rand(1, 3, 5, 5))
    layer2 = make_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }', x, x)
    with pytest.raises(ModelFormatError, match="same shape"):
        run_layer(layer2, x, rand(1, 2, 6, 5))
    with pytest.raises(ModelFormatError, match="one top"):
        make_layer(
            'type: "Convolution" top: "a" top: "b" convolution_param { num_output: 2 kernel_size: 3 }', x)


# ---------------------------------------------------------------------------------------------------
# Deconvolution
# ---------------------------------------------------------------------------------------------------
DECONV_CASES = [
    # (param text, C, H, W, stride, pad, dilation, group)
    ("num_output: 3 kernel_size: 3", 2, 4, 5, (1, 1), (0, 0), (1, 1), 1),
    ("num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2", 6, 4, 3, (2, 2), (1, 1), (1, 1), 2),
    ("num_output: 6 kernel_size: 3 stride: 2 pad: 2 group: 3", 3, 5, 4, (2, 2), (2, 2), (1, 1), 3),
    ("num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 3 stride_w: 1 pad_h: 1 pad_w: 0 dilation: 2",
     3, 3, 4, (3, 1), (1, 0), (2, 2), 1),
    ("num_output: 2 kernel_size: 2 stride: 4 pad: 1 bias_term: false", 2, 3, 3, (4, 4), (1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("params,c,h,w,stride,pad,dilation,group", DECONV_CASES)
def test_deconvolution_matches_scatter_reference(params, c, h, w, stride, pad, dilation, group):
    x = rand(2, c, h, w, seed=4)
    layer = make_layer(f'type: "Deconvolution" convolution_param {{ {params} {FILLERS} }}', x)
    weight = blob(layer, 0)
    num_output = int(params.split()[1])
    kh, kw = weight.shape[2:]
    # Caffe's deconvolution weight layout: [C_in, num_output/group, kh, kw].
    assert weight.shape == (c, num_output // group, kh, kw)
    bias = blob(layer, 1) if len(layer.blobs) > 1 else None
    expected = deconv2d(x.astype(np.float64), weight, bias, stride, pad, dilation, group)
    (out,) = run_layer(layer, x)
    # stride*(in-1) + dilation*(k-1)+1 - 2*pad
    assert out.shape[2] == stride[0] * (h - 1) + dilation[0] * (kh - 1) + 1 - 2 * pad[0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_deconvolution_output_size_by_hand():
    x = rand(1, 2, 4, 5)
    deconv = 'type: "Deconvolution" convolution_param { num_output: %d kernel_size: %d stride: %d pad: %d }'
    layer = make_layer(deconv % (3, 4, 2, 1), x)
    assert run_layer(layer, x)[0].shape == (1, 3, 8, 10)  # 2*3 + 4 - 2 = 8, 2*4 + 4 - 2 = 10
    layer = make_layer(deconv % (1, 3, 1, 3), x)
    with pytest.raises(ModelFormatError, match="no output"):
        run_layer(layer, x)  # 1*3 + 3 - 6 = 0


# ---------------------------------------------------------------------------------------------------
# InnerProduct
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis,transpose,bias_term,expected_top", [
    ((3, 4, 2, 5), 1, False, True, (3, 6)),
    ((3, 4, 2, 5), 2, True, True, (3, 4, 6)),
    ((3, 4, 2, 5), -1, False, False, (3, 4, 2, 6)),
    ((3, 4, 2, 5), 0, True, True, (6,)),
    ((7, 5), 1, True, False, (7, 6)),
])
def test_inner_product_matches_matrix_product(shape, axis, transpose, bias_term, expected_top):
    x = rand(*shape, seed=5)
    text = (f'type: "InnerProduct" inner_product_param {{ num_output: 6 axis: {axis} '
            f'transpose: {str(transpose).lower()} bias_term: {str(bias_term).lower()} {FILLERS} }}')
    layer = make_layer(text, x)
    canonical = axis % len(shape)
    k = int(np.prod(shape[canonical:]))
    weight = blob(layer, 0)
    assert weight.shape == ((k, 6) if transpose else (6, k))
    assert len(layer.blobs) == (2 if bias_term else 1)
    m = int(np.prod(shape[:canonical]))
    flat = x.astype(np.float64).reshape(m, k)
    expected = flat @ (weight if transpose else weight.T)
    if bias_term:
        expected = expected + blob(layer, 1)[None, :]
    (out,) = run_layer(layer, x)
    assert out.shape == expected_top
    np.testing.assert_allclose(out, expected.reshape(expected_top), rtol=1e-5, atol=1e-5)


def test_inner_product_gradient_is_caffes():
    x = rand(4, 3, 2, seed=6)
    layer = make_layer(
        f'type: "InnerProduct" inner_product_param {{ num_output: 5 transpose: true {FILLERS} }}', x,
        phase=TRAIN)
    for b in layer.blobs:
        b.requires_grad_(True)
    xt = torch.from_numpy(x).requires_grad_(True)
    top_diff = rand(4, 5, seed=7)
    (out,) = layer.forward([xt])
    out.backward(torch.from_numpy(top_diff))
    w = blob(layer, 0)  # [K, N] with transpose
    flat = x.reshape(4, 6).astype(np.float64)
    # Caffe (transpose): bottom_diff = top_diff * W^T, weight_diff = bottom^T * top_diff, bias_diff = sum rows
    np.testing.assert_allclose(xt.grad.numpy(), (top_diff @ w.T).reshape(x.shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), flat.T @ top_diff, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].grad.numpy(), top_diff.sum(axis=0), rtol=1e-5, atol=1e-6)


def test_inner_product_rejects_bad_input():
    x = rand(2, 3, 4)
    layer = make_layer('name: "fc" type: "InnerProduct" inner_product_param { num_output: 2 }', x)
    assert [tuple(b.shape) for b in layer.blobs] == [(2, 12), (2,)]
    assert all(float(b.abs().sum()) == 0.0 for b in layer.blobs)  # Caffe's default filler: constant 0
    with pytest.raises(ModelFormatError, match="incompatible"):
        run_layer(layer, rand(2, 3, 5))
    with pytest.raises(ModelFormatError, match="num_output"):
        make_layer('type: "InnerProduct" inner_product_param { }', x)
    with pytest.raises(ModelFormatError, match="out of range"):
        make_layer('type: "InnerProduct" inner_product_param { num_output: 2 axis: 3 }', x)


# ---------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------
def pool_text(method: str, k=None, s=None, p=None, extra: str = "") -> str:
    parts = [f"pool: {method}"]
    for name, value in (("kernel", k), ("stride", s), ("pad", p)):
        if value is None:
            continue
        if isinstance(value, tuple):
            parts.append(f"{name}_h: {value[0]} {name}_w: {value[1]}")
        else:
            parts.append(f"{'kernel_size' if name == 'kernel' else name}: {value}")
    return f'type: "Pooling" pooling_param {{ {" ".join(parts)} {extra} }}'


def test_pooling_output_size_table():
    # Hand-computed: pooled = ceil((in + 2p - k)/s) + 1, minus one when some pad is set and the last window
    # would start at or past in + p.
    cases = [  # (H, k, s, p, round_mode, expected)
        (7, 3, 2, 0, "CEIL", 3),   # (7-3)/2 = 2 -> 3
        (6, 3, 2, 0, "CEIL", 3),   # 1.5 -> 2 -> 3: last window 4..6 overhangs
        (6, 3, 2, 0, "FLOOR", 2),  # 1.5 -> 1 -> 2
        (6, 3, 2, 1, "CEIL", 4),   # 2.5 -> 3 -> 4; last start 6 < 6 + 1 kept
        (6, 3, 2, 1, "FLOOR", 3),
        (5, 2, 2, 1, "CEIL", 3),   # 2.5 -> 3 -> 4; last start 6 >= 5 + 1 -> clipped to 3
        (5, 3, 2, 2, "CEIL", 4),   # 3 -> 4; last start 6 < 7 kept
        (5, 1, 3, 0, "CEIL", 3),   # 1.33 -> 2 -> 3; no pad: window at 6 (outside) kept
        (5, 1, 5, 0, "CEIL", 2),   # 0.8 -> 1 -> 2; window at 5 kept
        (3, 5, 3, 0, "CEIL", 1),   # ceil(-2/3) = 0 -> 1
        (112, 3, 2, 0, "CEIL", 56),
        (14, 2, 2, 0, "CEIL", 7),
    ]
    for h, k, s, p, mode, expected in cases:
        x = rand(1, 1, h, 4)
        layer = make_layer(pool_text("MAX", (k, 1), (s, 1), (p, 0), f"round_mode: {mode}"), x)
        assert run_layer(layer, x)[0].shape == (1, 1, expected, 4), (h, k, s, p, mode)
    # pad in one axis makes Caffe clip the other axis too: W=5, k=2, s=2, pad_w 0 but pad_h 1
    x = rand(1, 1, 4, 5)
    layer = make_layer(pool_text("MAX", (2, 2), (2, 2), (1, 0)), x)
    # H: ceil(4/2)+1 = 3, start 4 < 5 kept; W: ceil(3/2)+1 = 3, start 4 < 5 kept
    assert run_layer(layer, x)[0].shape == (1, 1, 3, 3)
    x = rand(1, 1, 4, 4)
    layer = make_layer(pool_text("MAX", (3, 1), (2, 3), (1, 0)), x)
    # H: ceil(3/2)+1 = 3; W: ceil(3/3)+1 = 2, start 3 < 4 kept
    assert run_layer(layer, x)[0].shape == (1, 1, 3, 2)
    x = rand(1, 1, 4, 4)
    layer = make_layer(pool_text("MAX", (3, 1), (2, 4), (1, 0)), x)
    # W: ceil(3/4)+1 = 2, start 4 >= 4 + 0 -> clipped (pad_h is set) to 1
    assert run_layer(layer, x)[0].shape == (1, 1, 3, 1)


POOL_CASES = [
    # (kernel, stride, pad, round_mode, H, W)
    ((3, 3), (2, 2), (1, 1), "CEIL", 11, 13),
    ((3, 3), (2, 2), (0, 0), "CEIL", 10, 9),
    ((2, 2), (2, 2), (1, 1), "CEIL", 5, 7),
    ((3, 3), (2, 2), (2, 2), "CEIL", 7, 8),     # pad > k/2: torch cannot, explicit padding
    ((3, 2), (2, 3), (1, 0), "CEIL", 9, 11),
    ((1, 1), (3, 3), (0, 0), "CEIL", 5, 7),     # no-pad windows wholly outside
    ((1, 1), (5, 5), (0, 0), "CEIL", 5, 11),    # AVE 0/0
    ((3, 3), (2, 2), (1, 1), "FLOOR", 6, 9),
    ((5, 4), (3, 3), (2, 1), "FLOOR", 10, 7),
    ((5, 5), (3, 3), (0, 0), "CEIL", 3, 4),     # kernel larger than the input, one window
    ((2, 2), (1, 1), (1, 1), "CEIL", 4, 5),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("kernel,stride,pad,mode,h,w", POOL_CASES)
@pytest.mark.parametrize("force_explicit", [False, True])
def test_pooling_matches_caffe_loops(method, kernel, stride, pad, mode, h, w, force_explicit, monkeypatch):
    if force_explicit:
        # Make torch's output size never agree, so the explicit-padding path runs for every case.
        monkeypatch.setattr(vision, "_torch_pool_size", lambda *args: -1)
    x = rand(2, 3, h, w, seed=8)
    layer = make_layer(pool_text(method, kernel, stride, pad, f"round_mode: {mode}"), x)
    (out,) = run_layer(layer, x)
    expected = pool2d(x, method, kernel, stride, pad, ceil=mode == "CEIL")
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_pooling_uses_torch_fast_path_when_exact():
    x = rand(1, 1, 11, 13)
    for text, native in [
        (pool_text("MAX", 3, 2, 1), True),
        (pool_text("AVE", 3, 2, 1), True),
        (pool_text("MAX", 3, 2), True),
        (pool_text("AVE", 2, 2, 1), True),
        (pool_text("AVE", 3, 2, 2), False),          # pad > kernel/2
        (pool_text("MAX", 1, 3), False),             # torch drops the last window Caffe keeps
    ]:
        layer = make_layer(text, x)
        run_layer(layer, x)
        assert layer._plan(11, 13).native is native, text


def test_pooling_ave_divisor_at_borders_by_hand():
    # 3x3 ones, k=2, s=2, pad=1: pooled = ceil((3+2-2)/2)+1 = 3, but the last start 4 >= 3+1 so it is
    # clipped to 2. Windows per axis: [-1,1) size 2 (1 in the image), [1,3) size 2 (2 in the image).
    x = np.ones((1, 1, 3, 3), np.float32)
    (out,) = run_layer(make_layer(pool_text("AVE", 2, 2, 1), x), x)
    np.testing.assert_allclose(out[0, 0], [[0.25, 0.5], [0.5, 1.0]], rtol=1e-6)
    # 6x6 ones, k=4, s=3, pad=1: pooled = ceil(4/3)+1 = 3, last start 5 < 7 kept. Windows [-1,3) size 4
    # (3 in), [2,6) size 4 (4 in), [5,9) clipped to H+pad = 7 -> size 2 (1 in): the divisor counts the
    # left padding and the right padding, but not the ceil-mode overhang past H+pad.
    x = np.ones((1, 1, 6, 6), np.float32)
    (out,) = run_layer(make_layer(pool_text("AVE", 4, 3, 1), x), x)
    np.testing.assert_allclose(out[0, 0], np.outer([3 / 4, 1, 1 / 2], [3 / 4, 1, 1 / 2]), rtol=1e-6)
    # 5x5 ones, k=3, s=2, pad=1: windows [-1,2) size 3 (2 in), [1,4) 3 (3 in), [3,6) -> min(6, 5+1)=6 (2 in)
    x = np.ones((1, 1, 5, 5), np.float32)
    (out,) = run_layer(make_layer(pool_text("AVE", 3, 2, 1), x), x)
    expected = np.outer([2, 3, 2], [2, 3, 2]) / 9.0
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
    # 4x4 ones, k=3, s=2, pad=1: windows [-1,2) 3 (2 in), [1,4) 3 (3 in); pooled ceil(3/2)+1 = 3,
    # last start 3 < 5 kept: [3,6) clipped to min(6, 4+1) = 5 -> size 2, 1 in image.
    x = np.ones((1, 1, 4, 4), np.float32)
    (out,) = run_layer(make_layer(pool_text("AVE", 3, 2, 1), x), x)
    expected = np.outer([2 / 3, 1.0, 1 / 2], [2 / 3, 1.0, 1 / 2])
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)


def test_pooling_max_ceil_windows_ignore_outside_positions():
    # All-negative input: padding must not contribute zeros. 1x1x4x4, k=3, s=2, no pad: pooled 2
    # (ceil(0.5)+1); the second window, rows/cols 2..4, overhangs by one: the max of 2x2 in-image values.
    x = -np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    (out,) = run_layer(make_layer(pool_text("MAX", 3, 2), x), x)
    np.testing.assert_array_equal(out[0, 0], [[-1, -3], [-9, -11]])
    # no pad, k=1, s=3 on W=5: the window at 6 lies outside the image; Caffe leaves -FLT_MAX there
    x = rand(1, 2, 1, 5)
    (out,) = run_layer(make_layer(pool_text("MAX", 1, 3), x), x)
    np.testing.assert_array_equal(out[0, :, 0, :2], x[0, :, 0, [0, 3]].T)
    assert np.all(out[0, :, 0, 2] == -FLT_MAX)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = rand(2, 3, 5, 7, seed=9)
    layer = make_layer(f'type: "Pooling" pooling_param {{ pool: {method} global_pooling: true }}', x)
    (out,) = run_layer(layer, x)
    expected = x.max(axis=(2, 3)) if method == "MAX" else x.astype(np.float64).mean(axis=(2, 3))
    assert out.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(out[:, :, 0, 0], expected, rtol=1e-5, atol=1e-6)
    # The kernel follows the input size when the input is reshaped.
    y = rand(1, 3, 4, 2, seed=10)
    (out,) = run_layer(layer, y)
    expected = y.max(axis=(2, 3)) if method == "MAX" else y.astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(out[:, :, 0, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("kernel,stride,pad,h,w,force_explicit", [
    ((3, 3), (2, 2), (1, 1), 7, 6, False),
    ((3, 3), (2, 2), (1, 1), 7, 6, True),
    ((3, 3), (2, 2), (2, 2), 6, 5, False),
    ((2, 2), (2, 2), (0, 0), 5, 5, False),
    ((1, 1), (3, 3), (0, 0), 5, 7, False),
    ((5, 7), (1, 1), (0, 0), 5, 7, False),   # same as global pooling
])
def test_pooling_gradient_is_caffes(method, kernel, stride, pad, h, w, force_explicit, monkeypatch):
    if force_explicit:
        monkeypatch.setattr(vision, "_torch_pool_size", lambda *args: -1)
    # Quantised values make ties common: MAX's gradient must go to the first maximum, as Caffe's mask.
    x = np.round(rand(2, 2, h, w, seed=11) * 1.5).clip(0, None).astype(np.float32)
    layer = make_layer(pool_text(method, kernel, stride, pad), x, phase=TRAIN)
    xt = torch.from_numpy(x).requires_grad_(True)
    (out,) = layer.forward([xt])
    top_diff = rand(*out.shape, seed=12)
    out.backward(torch.from_numpy(top_diff))
    expected = pool2d_grad(x, top_diff, method, kernel, stride, pad)
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pooling_reshape_recomputes_geometry():
    layer = make_layer(pool_text("AVE", 3, 2, 1), rand(1, 2, 5, 5))
    for h, w in [(5, 5), (8, 3), (4, 9)]:
        x = rand(1, 2, h, w, seed=h * w)
        (out,) = run_layer(layer, x)
        np.testing.assert_allclose(out, pool2d(x, "AVE", (3, 3), (2, 2), (1, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text,tops,fragment,exc", [
    ("pool: STOCHASTIC kernel_size: 2", 1, "STOCHASTIC", UnsupportedLayerError),
    ("pool: MAX kernel_size: 2", 3, "argmax mask", ModelFormatError),  # 2 tops: the mask (SegNet)
    ("pool: AVE kernel_size: 2", 2, "1 top", ModelFormatError),
    ("pool: MAX", 1, "kernel", ModelFormatError),
    ("pool: MAX kernel_h: 2", 1, "kernel_h and kernel_w", ModelFormatError),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, "not both", ModelFormatError),
    ("pool: MAX kernel_size: 0", 1, "zero", ModelFormatError),
    ("pool: MAX kernel_size: 3 pad: 3", 1, "smaller than kernel", ModelFormatError),
    ("pool: MAX kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", 1, "pad", ModelFormatError),
    ("pool: MAX kernel_size: 3 pad_h: 1", 1, "pad", ModelFormatError),
    ("pool: MAX kernel_size: 3 stride_w: 2", 1, "stride", ModelFormatError),
    ("pool: MAX kernel_size: 3 stride: 0", 1, "stride", ModelFormatError),
    ("pool: MAX global_pooling: true kernel_size: 3", 1, "global_pooling", ModelFormatError),
    ("pool: AVE global_pooling: true pad: 1", 1, "global_pooling", ModelFormatError),
    ("pool: AVE global_pooling: true stride: 2", 1, "global_pooling", ModelFormatError),
])
def test_pooling_rejects_bad_parameters(text, tops, fragment, exc):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(f'name: "p1" type: "Pooling" bottom: "x" pooling_param {{ {text} }}', lp)
    lp.top.extend(f"t{i}" for i in range(tops))
    x = torch.zeros(1, 1, 5, 5)
    with pytest.raises(exc, match=fragment) as info:
        layer = layer_class("Pooling")(lp, TEST, CPU)
        layer.setup([x])
        layer.forward([x])
    assert "'p1'" in str(info.value)
    assert isinstance(info.value, AmctError)


def test_pooling_rejects_bad_input():
    layer = make_layer(pool_text("MAX", 3, 1), rand(1, 1, 5, 5))
    with pytest.raises(ModelFormatError, match="4 axes"):
        run_layer(layer, rand(1, 5, 5))
    with pytest.raises(ModelFormatError, match="output"):
        run_layer(layer, rand(1, 1, 1, 5))  # ceil((1-3)/1)+1 = -1


# ---------------------------------------------------------------------------------------------------
# reference Caffe cross-check
# ---------------------------------------------------------------------------------------------------
REF_NET_A = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 11 dim: 13 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 FILLERS } }
layer { name: "conv2" type: "Convolution" bottom: "data" top: "conv2"
  convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 0
                      dilation: 2 bias_term: false FILLERS } }
layer { name: "dw" type: "Convolution" bottom: "conv1" top: "dw"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 6 FILLERS } }
layer { name: "deconv1" type: "Deconvolution" bottom: "conv1" top: "deconv1"
  convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2 FILLERS } }
layer { name: "deconv2" type: "Deconvolution" bottom: "data" top: "deconv2"
  convolution_param { num_output: 3 kernel_h: 3 kernel_w: 2 stride: 3 stride: 2 pad: 2 pad: 0 dilation: 2
                      FILLERS } }
layer { name: "pool_ave_pad" type: "Pooling" bottom: "data" top: "pool_ave_pad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_max_ceil" type: "Pooling" bottom: "data" top: "pool_max_ceil"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "pool_ave_clip" type: "Pooling" bottom: "data" top: "pool_ave_clip"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "pool_max_bigpad" type: "Pooling" bottom: "data" top: "pool_max_bigpad"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "pool_ave_bigpad" type: "Pooling" bottom: "deconv1" top: "pool_ave_bigpad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "pool_ave_rect" type: "Pooling" bottom: "data" top: "pool_ave_rect"
  pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 } }
layer { name: "pool_max_outside" type: "Pooling" bottom: "data" top: "pool_max_outside"
  pooling_param { pool: MAX kernel_size: 1 stride: 3 } }
layer { name: "pool_ave_outside" type: "Pooling" bottom: "data" top: "pool_ave_outside"
  pooling_param { pool: AVE kernel_size: 1 stride: 3 } }
layer { name: "gap" type: "Pooling" bottom: "conv2" top: "gap"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "gmp" type: "Pooling" bottom: "dw" top: "gmp" pooling_param { pool: MAX global_pooling: true } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool_ave_pad" top: "ip1"
  inner_product_param { num_output: 5 FILLERS } }
layer { name: "ip2" type: "InnerProduct" bottom: "conv1" top: "ip2"
  inner_product_param { num_output: 3 axis: 2 transpose: true FILLERS } }
layer { name: "ip3" type: "InnerProduct" bottom: "data" top: "ip3"
  inner_product_param { num_output: 2 axis: -1 bias_term: false FILLERS } }
"""

REF_NET_B = """
layer { name: "data" type: "Input" top: "a" top: "b" input_param { shape { dim: 1 dim: 3 dim: 5 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "a" bottom: "b" top: "ca" top: "cb"
  convolution_param { num_output: 4 kernel_size: 3 kernel_size: 2 pad: 1 FILLERS } }
layer { name: "pool_nan" type: "Pooling" bottom: "a" top: "pool_nan"
  pooling_param { pool: AVE kernel_size: 1 stride: 5 } }
layer { name: "pool_floor_max" type: "Pooling" bottom: "a" top: "pool_floor_max"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 ROUND_FLOOR } }
layer { name: "pool_floor_ave" type: "Pooling" bottom: "b" top: "pool_floor_ave"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 ROUND_FLOOR } }
layer { name: "pool_big_kernel" type: "Pooling" bottom: "b" top: "pool_big_kernel"
  pooling_param { pool: AVE kernel_h: 7 kernel_w: 3 stride_h: 8 stride_w: 3 } }
layer { name: "deconv" type: "Deconvolution" bottom: "pool_floor_ave" top: "deconv"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 2 group: 3 FILLERS } }
layer { name: "ip" type: "InnerProduct" bottom: "deconv" top: "ip"
  inner_product_param { num_output: 7 axis: 1 FILLERS } }
"""


def _cross_check(text: str, inputs: dict[str, np.ndarray], tmp_path: Path) -> Net:
    ours_text = text.replace("FILLERS", FILLERS).replace("ROUND_FLOOR", "round_mode: FLOOR")
    # The reference fork's field 13 is `bool ceil_mode` (stock: round_mode); FLOOR is ceil_mode: false there.
    ref_text = text.replace("FILLERS", "").replace("ROUND_FLOOR", "ceil_mode: false")
    net = Net(text_format.Merge(ours_text, caffe_pb2.NetParameter()), TEST)
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    weights = tmp_path / "ours.caffemodel"
    proto = net.to_proto()
    save_caffemodel(proto, weights)
    ref = run_reference(ref_text, inputs=inputs, weights=weights)
    compared = 0
    for name, expected in ref["blobs"].items():
        if "_split_" in name:  # Caffe's inserted Split layers
            continue
        assert_close(net.tensor(name).detach().numpy(), expected, name)
        compared += 1
    assert compared == len({t for lp in proto.layer for t in lp.top})
    ours_params = {f"{lp.name}/{i}": b for lp in proto.layer for i, b in enumerate(lp.blobs)}
    assert set(ours_params) == set(ref["params"])
    for key, value in ref["params"].items():
        ours = np.asarray(ours_params[key].data, np.float32).reshape(value.shape)
        np.testing.assert_array_equal(ours, value, err_msg=key)
    return net


@pytest.mark.reference
def test_reference_caffe_all_vision_layers(reference_caffe, tmp_path):
    _cross_check(REF_NET_A, {"data": rand(2, 4, 11, 13, seed=13)}, tmp_path)


@pytest.mark.reference
def test_reference_caffe_floor_nan_and_multi_bottom(reference_caffe, tmp_path):
    inputs = {"a": rand(1, 3, 5, 12, seed=14), "b": rand(1, 3, 5, 12, seed=15)}
    net = _cross_check(REF_NET_B, inputs, tmp_path)
    # The FLOOR cases differ from CEIL: W = 12, k = 3, s = 2: floor(4.5)+1 = 5 (CEIL: 6); with pad 1
    # floor(5.5)+1 = 6 (CEIL: 7). The k=1 s=5 AVE pool has a window starting at H = 5: Caffe's 0/0.
    assert tuple(net.tensor("pool_floor_max").shape) == (1, 3, 2, 5)
    assert tuple(net.tensor("pool_floor_ave").shape) == (1, 3, 3, 6)
    nan_pool = net.tensor("pool_nan").numpy()
    assert nan_pool.shape == (1, 3, 2, 4) and np.isnan(nan_pool[:, :, 1]).all()
    assert not np.isnan(nan_pool[:, :, 0]).any()
