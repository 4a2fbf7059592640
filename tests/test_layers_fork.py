"""Tests of the Caffe-fork layers (engine/layers/fork.py), Pooling's ceil_mode and mask top, and nets with
duplicate layer names.

Expected values come from tests/references/fork_layers.py (the canonical C++ loops in numpy), from hand
computations, and -- for what the reference Caffe implements (Pooling's ceil_mode and argmax mask, darknet's
Upsample, align-corners bilinear as Interp computes it, duplicate layer names) -- from the real Caffe in a
subprocess. Backward passes are checked against finite differences of the numpy references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from amct_caffe import caffe as pycaffe
from amct_caffe.engine.layers.base import TEST, TRAIN, Layer
from amct_caffe.engine.net import Net
from amct_caffe.errors import AmctError, DuplicateLayerNameError, ModelFormatError, UnsupportedLayerError
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import save_caffemodel
from tests import helpers
from tests.helpers import assert_close, parse_net
from tests.references import fork_layers as ref
from tests.references.real_caffe import run_reference

FORK_TYPES = ("Axpy", "BN", "ConvolutionDepthwise", "DepthwiseConvolution", "Interp", "Reorg",
              "ShuffleChannel", "Upsample")


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def forward(layer: Layer, *bottoms: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in layer.forward([torch.from_numpy(b) for b in bottoms])]


def autograd(layer: Layer, bottoms: list[np.ndarray], top_diff: np.ndarray, wrt: int = 0) -> np.ndarray:
    """d sum(top * top_diff) / d bottom ``wrt``, by the engine's autograd (float64 bottoms)."""
    tensors = [torch.from_numpy(b.astype(np.float64)) for b in bottoms]
    tensors[wrt].requires_grad_(True)
    layer.blobs = [b.double() for b in layer.blobs]
    (top,) = layer.forward(tensors)[:1]
    (top * torch.from_numpy(top_diff)).sum().backward()
    grad = tensors[wrt].grad
    assert grad is not None
    return grad.numpy()


def test_layer_type_list_has_the_fork_layers():
    types = pycaffe.layer_type_list()
    assert set(FORK_TYPES) <= set(types)


# ---------------------------------------------------------------------------------------------------
# ShuffleChannel, Axpy, Reorg
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_shuffle_channel_forward_and_backward(group):
    x = rand(2, 6, 3, 2, seed=group)
    layer = helpers.make_layer(f'type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}', x)
    (out,) = forward(layer, x)
    np.testing.assert_array_equal(out, ref.shuffle_channel(x, group))
    diff = rand(*x.shape, seed=9).astype(np.float64)
    np.testing.assert_allclose(autograd(layer, [x], diff),
                               ref.numeric_grad(lambda v: ref.shuffle_channel(v, group), x, diff), atol=1e-6)


def test_shuffle_channel_by_hand_and_bad_group():
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1)
    layer = helpers.make_layer('type: "ShuffleChannel" shuffle_channel_param { group: 2 }', x)
    # channels [0 1 2 | 3 4 5] read as 2 x 3, written transposed: 0 3 1 4 2 5
    assert forward(layer, x)[0].reshape(-1).tolist() == [0, 3, 1, 4, 2, 5]
    with pytest.raises(ModelFormatError, match="multiple of group 4"):
        helpers.make_layer('type: "ShuffleChannel" shuffle_channel_param { group: 4 }', x).forward(
            [torch.from_numpy(x)])


def test_axpy_forward_and_backward():
    a, x, y = rand(2, 3, 1, 1, seed=1), rand(2, 3, 4, 5, seed=2), rand(2, 3, 4, 5, seed=3)
    layer = helpers.make_layer('type: "Axpy"', a, x, y)
    assert_close(forward(layer, a, x, y)[0], ref.axpy(a, x, y), "axpy")
    diff = rand(2, 3, 4, 5, seed=4).astype(np.float64)
    for wrt, fn in enumerate((lambda v: ref.axpy(v, x, y), lambda v: ref.axpy(a, v, y),
                              lambda v: ref.axpy(a, x, v))):
        bottoms = [a, x, y]
        np.testing.assert_allclose(autograd(layer, bottoms, diff, wrt),
                                   ref.numeric_grad(fn, bottoms[wrt], diff), atol=1e-5)
    with pytest.raises(ModelFormatError, match=r"\(N, C, 1, 1\)"):
        layer.forward([torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(y)])


@pytest.mark.parametrize("stride,reverse,shape", [(2, False, (2, 8, 4, 6)), (2, True, (1, 8, 3, 2)),
                                                  (3, False, (1, 9, 3, 6))])
def test_reorg_follows_darknets_index_rule(stride, reverse, shape):
    x = rand(*shape, seed=stride)
    text = f'type: "Reorg" reorg_param {{ stride: {stride} reverse: {str(reverse).lower()} }}'
    layer = helpers.make_layer(text, x)
    (out,) = forward(layer, x)
    expected = ref.reorg(x, stride, reverse)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    diff = rand(*expected.shape, seed=5).astype(np.float64)
    np.testing.assert_allclose(autograd(layer, [x], diff),
                               ref.numeric_grad(lambda v: ref.reorg(v, stride, reverse), x, diff), atol=1e-6)


def test_reorg_is_not_plain_space_to_depth_and_checks_sizes():
    x = rand(1, 4, 2, 2, seed=3)
    layer = helpers.make_layer('type: "Reorg" reorg_param { stride: 2 }', x)
    (out,) = forward(layer, x)
    space_to_depth = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x), 2).numpy()
    assert not np.array_equal(out, space_to_depth)
    with pytest.raises(ModelFormatError, match="multiple of 4"):
        layer.forward([torch.zeros(1, 2, 2, 2)])
    with pytest.raises(ModelFormatError, match="in place"):
        helpers.make_layer('type: "Reorg" bottom: "a" top: "a"', x)


# ---------------------------------------------------------------------------------------------------
# Interp
# ---------------------------------------------------------------------------------------------------
INTERP_CASES = [  # (interp_param text, reference size kwargs)
    ("height: 7 width: 9", {"height": 7, "width": 9}),
    ("zoom_factor: 2", {"zoom": 2}),
    ("shrink_factor: 2", {"shrink": 2}),
    ("shrink_factor: 2 zoom_factor: 3", {"shrink": 2, "zoom": 3}),
    ("zoom_factor: 3 pad_beg: -1 pad_end: -1", {"zoom": 3, "pad_beg": -1, "pad_end": -1}),
    ("height: 1 width: 1", {"height": 1, "width": 1}),
    ("height: 5 width: 6", {"height": 5, "width": 6}),  # the input's size: a copy
]


@pytest.mark.parametrize("text,kwargs", INTERP_CASES)
def test_interp_sizes_values_and_gradient(text, kwargs):
    x = rand(2, 3, 5, 6, seed=len(text))
    layer = helpers.make_layer(f'type: "Interp" interp_param {{ {text} }}', x)
    (out,) = forward(layer, x)
    size = ref.interp_size(5, 6, **kwargs)
    pads = {k: kwargs[k] for k in ("pad_beg", "pad_end") if k in kwargs}
    expected = ref.interp(x, *size, **pads)
    assert out.shape == expected.shape
    assert_close(out, expected, text)
    diff = rand(*expected.shape, seed=6).astype(np.float64)
    np.testing.assert_allclose(autograd(layer, [x], diff),
                               ref.numeric_grad(lambda v: ref.interp(v, *size, **pads), x, diff), atol=1e-4)


def test_interp_sizes_by_hand_and_errors():
    x = np.zeros((1, 1, 5, 6), np.float32)
    # zoom 2 on 5x6: 5 + 4 = 9, 6 + 5 = 11; shrink 2: (5-1)/2+1 = 3, (6-1)/2+1 = 3
    layer = helpers.make_layer('type: "Interp" interp_param { zoom_factor: 2 }', x)
    assert layer.output_size(5, 6) == (9, 11)  # type: ignore[attr-defined]
    layer = helpers.make_layer('type: "Interp" interp_param { shrink_factor: 2 }', x)
    assert layer.output_size(5, 6) == (3, 3)  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedLayerError, match="pad_beg"):
        helpers.make_layer('type: "Interp" interp_param { zoom_factor: 2 pad_beg: 1 }', x)
    with pytest.raises(ModelFormatError, match="needs shrink_factor"):
        helpers.make_layer('type: "Interp" interp_param { height: 3 }', x)


# ---------------------------------------------------------------------------------------------------
# Upsample and Pooling's mask top
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_upsample_nearest_darknet(scale):
    x = rand(2, 3, 3, 4, seed=scale)
    layer = helpers.make_layer(f'type: "Upsample" upsample_param {{ scale: {scale} }}', x)
    (out,) = forward(layer, x)
    np.testing.assert_array_equal(out, ref.upsample_nearest(x, scale))
    diff = rand(*out.shape, seed=7).astype(np.float64)
    np.testing.assert_allclose(autograd(layer, [x], diff),
                               ref.numeric_grad(lambda v: ref.upsample_nearest(v, scale), x, diff), atol=1e-5)


def test_upsample_reads_atc_parameters_when_a_stride_is_given():
    x = rand(1, 2, 2, 3, seed=1)
    layer = helpers.make_layer('type: "Upsample" upsample_param { scale: 0.5 stride: 2 }', x)
    np.testing.assert_allclose(forward(layer, x)[0], 0.5 * ref.upsample_nearest(x, 2), rtol=1e-6)
    with pytest.raises(ModelFormatError, match="whole number"):
        helpers.make_layer('type: "Upsample" upsample_param { scale: 1.5 }', x)
    with pytest.raises(ModelFormatError, match="second bottom"):
        helpers.make_layer('type: "Upsample" upsample_param { upsample_h: 4 upsample_w: 6 }', x)


@pytest.mark.parametrize("pool,pad", [("kernel_size: 2 stride: 2", 0), ("kernel_size: 3 stride: 2", 0),
                                      ("kernel_size: 3 stride: 2 pad: 1", 1),
                                      ("kernel_size: 2 stride: 3", 0)])
def test_max_pooling_mask_top(pool, pad):
    x = rand(2, 3, 7, 8, seed=11)
    x[0, 0, :2, :2] = 1.0  # a tie: the first maximum in row-major order wins
    layer = helpers.make_layer(f'type: "Pooling" pooling_param {{ pool: MAX {pool} }}', x, n_tops=2)
    top, mask = forward(layer, x)
    kernel, stride = int(pool.split()[1]), int(pool.split()[3])
    ref_top, ref_mask = ref.max_pool_mask(x, kernel, stride, pad)
    assert_close(top, ref_top, "top")
    np.testing.assert_array_equal(mask, ref_mask)


@pytest.mark.parametrize("param,size", [("scale: 2", (8, 10)), ("", (8, 10)),
                                        ("upsample_h: 7 upsample_w: 9", (7, 9)),
                                        ("scale_h: 2 scale_w: 2 pad_out_h: true", (7, 10))])
def test_upsample_max_unpooling_segnet(param, size):
    x = rand(1, 2, 7, 9, seed=3)
    _, mask = ref.max_pool_mask(x, 2, 2)
    values = rand(*mask.shape, seed=4)
    text = f'type: "Upsample" upsample_param {{ {param} }}'
    layer = helpers.make_layer(text, values, mask.astype(np.float32))
    (out,) = forward(layer, values, mask.astype(np.float32))
    expected = ref.max_unpool(values, mask, *size)
    np.testing.assert_array_equal(out, expected)
    diff = rand(*expected.shape, seed=8).astype(np.float64)
    np.testing.assert_allclose(autograd(layer, [values, mask], diff),
                               ref.numeric_grad(lambda v: ref.max_unpool(v, mask, *size), values, diff),
                               atol=1e-5)


def test_upsample_unpooling_refuses_a_mask_outside_the_top():
    values = np.ones((1, 1, 2, 2), np.float32)
    mask = np.array([[[[0, 1], [2, 99]]]], np.float32)
    layer = helpers.make_layer('type: "Upsample" upsample_param { scale: 2 }', values, values)
    with pytest.raises(ModelFormatError, match="outside the 4x4 top"):
        forward(layer, values, mask)


# ---------------------------------------------------------------------------------------------------
# BN
# ---------------------------------------------------------------------------------------------------
def test_bn_segnet_inference_and_learn():
    x = rand(2, 3, 4, 5, seed=1)
    scale, shift = rand(1, 3, 1, 1, seed=2), rand(1, 3, 1, 1, seed=3)
    for mode, inference in (("INFERENCE", True), ("LEARN", False)):
        layer = helpers.make_layer(f'type: "BN" bn_param {{ bn_mode: {mode} }}', x)
        assert [tuple(b.shape) for b in layer.blobs] == [(1, 3, 1, 1)] * 2
        layer.blobs = [torch.from_numpy(scale), torch.from_numpy(shift)]
        assert_close(forward(layer, x)[0], ref.bn_segnet(x, scale, shift, inference), mode)
        diff = rand(*x.shape, seed=4).astype(np.float64)
        np.testing.assert_allclose(
            autograd(layer, [x], diff),
            ref.numeric_grad(lambda v, i=inference: ref.bn_segnet(v, scale, shift, i), x, diff), atol=1e-4)


def test_bn_pspnet_test_train_and_frozen():
    x = rand(3, 2, 4, 4, seed=5)
    blobs = [rand(1, 2, 1, 1, seed=6), rand(1, 2, 1, 1, seed=7), rand(1, 2, 1, 1, seed=8),
             np.abs(rand(1, 2, 1, 1, seed=9)) + 0.5]
    text = 'type: "BN" bn_param { slope_filler { type: "constant" value: 1 } eps: 1e-5 momentum: 0.8 %s }'
    # TEST: the stored statistics
    layer = helpers.make_layer(text % "", x)
    assert [tuple(b.shape) for b in layer.blobs] == [(1, 2, 1, 1)] * 4
    layer.blobs = [torch.from_numpy(b.copy()) for b in blobs]
    expected, _, _ = ref.bn_pspnet(x, blobs, 1e-5, use_stored=True)
    assert_close(forward(layer, x)[0], expected, "test")
    # TRAIN: the batch's statistics, the stored ones move towards them
    layer = helpers.make_layer(text % "", x, phase=TRAIN)
    layer.blobs = [torch.from_numpy(b.copy()) for b in blobs]
    expected, new_mean, new_var = ref.bn_pspnet(x, blobs, 1e-5, use_stored=False, momentum=0.8)
    assert_close(forward(layer, x)[0], expected, "train")
    assert_close(layer.blobs[2].numpy().reshape(-1), new_mean, "mean")
    assert_close(layer.blobs[3].numpy().reshape(-1), new_var, "var")
    assert [p.lr_mult for p in layer.param.param] == [1, 1, 0, 0]
    # frozen: stored statistics in TRAIN, and nothing trains
    layer = helpers.make_layer(text % "frozen: true", x, phase=TRAIN)
    layer.blobs = [torch.from_numpy(b.copy()) for b in blobs]
    expected, _, _ = ref.bn_pspnet(x, blobs, 1e-5, use_stored=True)
    assert_close(forward(layer, x)[0], expected, "frozen")
    np.testing.assert_array_equal(layer.blobs[2].numpy(), blobs[2])
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0, 0]
    diff = rand(*x.shape, seed=10).astype(np.float64)
    np.testing.assert_allclose(
        autograd(layer, [x], diff),
        ref.numeric_grad(lambda v: ref.bn_pspnet(v, blobs, 1e-5, use_stored=True)[0], x, diff), atol=1e-4)


def test_bn_form_is_chosen_by_the_fields_given():
    x = rand(1, 2, 2, 2)
    four_params = 'type: "BN"' + " param { lr_mult: 1 }" * 2 + " param { lr_mult: 0 }" * 2
    assert len(helpers.make_layer(four_params, x).blobs) == 4
    assert len(helpers.make_layer('type: "BN"', x).blobs) == 2
    with pytest.raises(ModelFormatError, match="mixes PSPNet"):
        helpers.make_layer('type: "BN" bn_param { frozen: true bn_mode: INFERENCE }', x)


# ---------------------------------------------------------------------------------------------------
# Depthwise convolutions
# ---------------------------------------------------------------------------------------------------
def test_convolution_depthwise_ignores_num_output_and_group():
    x = rand(2, 4, 7, 6, seed=1)
    text = ('type: "ConvolutionDepthwise" convolution_param { num_output: 99 group: 3 kernel_size: 3 '
            'stride: 2 pad: 1 dilation: 1 weight_filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }')
    layer = helpers.make_layer(text, x)
    assert [tuple(b.shape) for b in layer.blobs] == [(4, 1, 3, 3), (4,)]
    w, b = layer.blobs[0].numpy(), layer.blobs[1].numpy()
    (out,) = forward(layer, x)
    assert_close(out, ref.depthwise_conv(x, w, b, 3, 2, 1), "conv_dw")
    diff = rand(*out.shape, seed=2).astype(np.float64)
    np.testing.assert_allclose(autograd(layer, [x], diff),
                               ref.numeric_grad(lambda v: ref.depthwise_conv(v, w, b, 3, 2, 1), x, diff),
                               atol=1e-4)


def test_depthwise_convolution_is_a_grouped_convolution():
    x = rand(1, 4, 5, 5, seed=3)
    text = ('type: "DepthwiseConvolution" convolution_param { num_output: 4 group: 4 kernel_size: 3 '
            'dilation: 2 bias_term: false weight_filler { type: "gaussian" } }')
    layer = helpers.make_layer(text, x)
    (out,) = forward(layer, x)
    assert_close(out, ref.depthwise_conv(x, layer.blobs[0].numpy(), None, 3, 1, 0, dilation=2), "dw")


# ---------------------------------------------------------------------------------------------------
# Pooling ceil_mode
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,expected_w", [
    ("", 6), ("ceil_mode: true", 6), ("ceil_mode: false", 5), ("round_mode: FLOOR", 5),
    ("ceil_mode: false round_mode: FLOOR", 5), ("ceil_mode: true round_mode: CEIL", 6),
])
def test_pooling_ceil_mode(fields, expected_w):
    # W = 12, k = 3, s = 2: ceil(4.5) + 1 = 6, floor: 5
    x = rand(1, 1, 4, 12)
    text = f'type: "Pooling" pooling_param {{ pool: MAX kernel_size: 3 stride: 2 {fields} }}'
    layer = helpers.make_layer(text, x)
    assert forward(layer, x)[0].shape[-1] == expected_w


def test_pooling_ceil_mode_and_round_mode_that_disagree_are_an_error():
    x = rand(1, 1, 4, 12)
    with pytest.raises(ModelFormatError, match="ceil_mode: false and round_mode: CEIL disagree") as info:
        helpers.make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 ceil_mode: false '
                           'round_mode: CEIL }', x)
    assert isinstance(info.value, AmctError)


# ---------------------------------------------------------------------------------------------------
# Small nets with every fork layer, and the reference Caffe
# ---------------------------------------------------------------------------------------------------
FORK_NET = """
name: "forks"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } } }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "data" top: "dw"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "dw2" type: "DepthwiseConvolution" bottom: "dw" top: "dw2"
  convolution_param { num_output: 4 group: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
layer { name: "bn" type: "BN" bottom: "dw2" top: "dw2" bn_param { bn_mode: INFERENCE
  scale_filler { type: "constant" value: 2 } shift_filler { type: "constant" value: 0.5 } } }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "dw2" top: "shuffle"
  shuffle_channel_param { group: 2 } }
layer { name: "pool" type: "Pooling" bottom: "shuffle" top: "pool" top: "mask"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 ceil_mode: false } }
layer { name: "gap" type: "Pooling" bottom: "pool" top: "gap"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "unpool" type: "Upsample" bottom: "pool" bottom: "mask" top: "unpool"
  upsample_param { scale: 2 } }
layer { name: "axpy" type: "Axpy" bottom: "gap" bottom: "unpool" bottom: "shuffle" top: "axpy" }
layer { name: "reorg" type: "Reorg" bottom: "axpy" top: "reorg" reorg_param { stride: 2 } }
layer { name: "interp" type: "Interp" bottom: "reorg" top: "interp" interp_param { zoom_factor: 2 } }
layer { name: "up" type: "Upsample" bottom: "interp" top: "up" upsample_param { scale: 2 } }
"""


def test_a_net_of_fork_layers_runs_and_matches_the_references():
    net = Net(parse_net(FORK_NET), TEST)
    x = rand(2, 4, 8, 8, seed=21)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    blobs = {name: net.tensor(name).detach().numpy() for name in net.blob_names}
    params = {layer.name: [b.detach().numpy() for b in layer.blobs] for layer in net.engine_layers}
    dw = ref.depthwise_conv(x, params["dw"][0], params["dw"][1], 3, 1, 1)
    dw2 = ref.depthwise_conv(dw.astype(np.float32), params["dw2"][0], params["dw2"][1], 3, 1, 1)
    dw2 = ref.bn_segnet(dw2, np.full(4, 2.0), np.full(4, 0.5), inference=True)
    shuffle = ref.shuffle_channel(dw2, 2)
    pool, mask = ref.max_pool_mask(shuffle, 2, 2)
    gap = pool.mean(axis=(2, 3), keepdims=True)
    unpool = ref.max_unpool(pool, mask, 8, 8)
    axpy = ref.axpy(gap, unpool, shuffle)
    reorg = ref.reorg(axpy, 2)
    interp = ref.interp(reorg, 7, 7)
    up = ref.upsample_nearest(interp, 2)
    expected = {"dw": dw, "shuffle": shuffle, "pool": pool, "mask": mask, "axpy": axpy, "reorg": reorg,
                "interp": interp, "up": up}
    for name, value in expected.items():
        assert_close(blobs[name], value, name)
    assert blobs["up"].shape == (2, 16, 14, 14)


REF_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 7 dim: 12 } } }
layer { name: "floor" type: "Pooling" bottom: "data" top: "floor"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }
layer { name: "floor_ave" type: "Pooling" bottom: "data" top: "floor_ave"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 ceil_mode: false } }
layer { name: "ceil" type: "Pooling" bottom: "data" top: "ceil" top: "ceil_mask"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: true } }
layer { name: "padded" type: "Pooling" bottom: "data" top: "padded" top: "padded_mask"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "overhang" type: "Pooling" bottom: "data" top: "overhang" top: "overhang_mask"
  pooling_param { pool: MAX kernel_size: 2 stride: 4 } }
layer { name: "up" type: "Upsample" bottom: "floor" top: "up" upsample_param { scale: 3 } }
"""


@pytest.mark.reference
def test_ceil_mode_mask_and_upsample_match_the_reference_caffe(reference_caffe, tmp_path):
    net = Net(parse_net(REF_NET), TEST)
    x = rand(2, 3, 7, 12, seed=31)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    out = run_reference(REF_NET, inputs={"data": x})
    compared = {name for name in out["blobs"] if "_split_" not in name}  # Caffe's inserted Split layers
    for name in compared:
        assert_close(net.tensor(name).detach().numpy(), out["blobs"][name], name)
    assert compared == set(net.blob_names)
    assert tuple(net.tensor("floor").shape) == (2, 3, 3, 5)


DUPLICATE_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "a"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "constant" value: 0.5 } } }
layer { name: "conv" type: "Convolution" bottom: "a" top: "b"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "constant" value: 0.25 } } }
layer { name: "crop" type: "Crop" bottom: "b" bottom: "data" top: "c" }
layer { name: "crop" type: "Crop" bottom: "c" bottom: "data" top: "d" }
"""

WEIGHTS_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "a"
  convolution_param { num_output: 2 kernel_size: 1 } }
"""


def _weights_file(tmp_path: Path) -> Path:
    source = Net(parse_net(WEIGHTS_NET), TEST)
    source.engine_layers[1].blobs[0].copy_(torch.from_numpy(rand(2, 2, 1, 1, seed=41)))
    source.engine_layers[1].blobs[1].copy_(torch.from_numpy(rand(2, seed=42)))
    path = tmp_path / "one_conv.caffemodel"
    save_caffemodel(source.to_proto(), path)
    return path


def test_duplicate_layer_names_run_and_weights_go_to_the_first(tmp_path):
    weights = _weights_file(tmp_path)
    net = Net(parse_net(DUPLICATE_NET), TEST, weights=weights)
    first, second = net.engine_layers[1], net.engine_layers[2]
    np.testing.assert_array_equal(first.blobs[0].numpy().reshape(-1), rand(2, 2, 1, 1, seed=41).reshape(-1))
    np.testing.assert_array_equal(second.blobs[0].numpy(), np.full((2, 2, 1, 1), 0.25, np.float32))
    x = rand(1, 2, 4, 4, seed=43)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    assert net.tensor("d").shape == (1, 2, 4, 4)
    # pycaffe: layer_dict keeps the first name's position and shows the later layer, as real pycaffe's dict
    py = pycaffe.Net(str(_write(tmp_path, DUPLICATE_NET)), pycaffe.TEST, weights=str(weights))
    assert list(py.layer_dict) == ["data", "conv", "crop"]
    assert py.layer_dict["conv"].blobs[0].data[0, 0, 0, 0] == 0.25
    assert py._layer_names.count("conv") == 2


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return path


@pytest.mark.reference
def test_duplicate_layer_names_match_the_reference_caffe(reference_caffe, tmp_path):
    weights = _weights_file(tmp_path)
    net = Net(parse_net(DUPLICATE_NET), TEST, weights=weights)
    x = rand(1, 2, 4, 4, seed=44)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    out = run_reference(DUPLICATE_NET, inputs={"data": x}, weights=weights)
    for name in ("a", "b", "c", "d"):
        assert_close(net.tensor(name).detach().numpy(), out["blobs"][name], name)


def test_quantization_graphs_refuse_duplicate_names_naming_both_layers():
    expected = (r"two layers named 'conv': layer 1 \(type Convolution\) and layer 2 \(type Convolution\)"
                r".*rename one")
    with pytest.raises(DuplicateLayerNameError, match=expected):
        Graph(parse_net(DUPLICATE_NET), "dup.prototxt")


BILINEAR_REF_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 6 } } }
layer { name: "bi" type: "BilinearInterpolate" bottom: "data" top: "bi"
  bilinear_interpolate_param { dst_h: 9 dst_w: 11 align_corners: true } }
"""


@pytest.mark.reference
def test_interp_matches_the_reference_caffes_align_corners_bilinear(reference_caffe):
    # The reference fork has no Interp; its BilinearInterpolate with align_corners is the same resize.
    x = rand(2, 3, 5, 6, seed=51)
    layer = helpers.make_layer('type: "Interp" interp_param { zoom_factor: 2 }', x)
    (out,) = forward(layer, x)
    expected = run_reference(BILINEAR_REF_NET, inputs={"data": x})["blobs"]["bi"]
    assert out.shape == expected.shape == (2, 3, 9, 11)
    assert_close(out, expected, "interp")
