"""Tests of the AMCT quantization layers: ActivationQAT, WeightQAT, Quant, DeQuant, AntiQuant.

Expected values are hand computations (grid-exact values chosen so that float32 and float64 agree) and
the numpy references of tests/references: ULQ forward/backward, ClipCheck, IFMR, ARQ, the Quant layer, and
DeQuant's shift-N emulation (written here). The reference Caffe has none of these AMCT layers, so there is
no cross-check against it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers.base import TEST, TRAIN, Layer
from amct_caffe.engine.net import Net
from amct_caffe.engine.record_shapes import RecordShapesHook
from amct_caffe.engine.solver import share_trained_layers
from amct_caffe.errors import ModelFormatError, UnsupportedLayerError
from amct_caffe.proto import amct_pb2, caffe_pb2
from tests import helpers
from tests.references import quant
from tests.references.layers import conv2d

CPU = torch.device("cpu")
S = 1.0 / 64.0  # a power-of-two activation scale: every grid value below is exact in float32


# ---------------------------------------------------------------------------------------------------
# helpers and numpy references
# ---------------------------------------------------------------------------------------------------
def make_layer(text: str, *bottoms: np.ndarray, phase: int = TEST) -> Layer:
    """A set-up layer with one top per bottom (t0..), as multi-bottom Convolution layers have."""
    return helpers.make_layer(text, *bottoms, phase=phase, n_tops=max(1, len(bottoms)))


def run(layer: Layer, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return layer.forward([torch.from_numpy(x)])[0].numpy()


def build_net(text: str, phase: int = TRAIN) -> tuple[Net, dict[str, Layer]]:
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), phase)
    return net, dict(zip(net.layer_names, net.engine_layers))


def act_layer(cmax: float, cmin: float, extra: str = "", phase: int = TEST, shape=(2, 3)) -> Layer:
    text = (
        f'type: "ActivationQAT" retrain_data_quant_param {{ clip_max: {cmax!r} clip_min: {cmin!r} {extra} }}'
    )
    return make_layer(text, np.zeros(shape, np.float32), phase=phase)


def set_clips(layer: Layer, cmax: float, cmin: float) -> None:
    with torch.no_grad():
        layer.blobs[0].fill_(cmax)
        layer.blobs[1].fill_(cmin)


def clips(layer: Layer) -> tuple[float, float]:
    return float(layer.blobs[0]), float(layer.blobs[1])


# ---------------------------------------------------------------------------------------------------
# ActivationQAT: forward
# ---------------------------------------------------------------------------------------------------
# Grid s = 1/64 with cmin = -1 (o_ulq = -64): bounds [-1, 191/64]. Ties at k + 1/2 round to even.
X_HAND = np.array([
    [0.5 * S, 1.5 * S, 2.5 * S, -0.5 * S, -1.5 * S, 0.3 * S],
    [3.5, -2.0, 191 * S, -1.0, 190.5 * S, 0.0],
], dtype=np.float32)


def test_activation_qat_blobs_and_hand_forward() -> None:
    layer = act_layer(191 * S, -1.0, shape=X_HAND.shape)
    assert [tuple(b.shape) for b in layer.blobs] == [(1,), (1,)]
    assert clips(layer) == (191 * S, -1.0)
    y = run(layer, X_HAND)
    expected = np.array([
        [0.0, 2 * S, 2 * S, 0.0, -2 * S, 0.0],
        [191 * S, -1.0, 191 * S, -1.0, 190 * S, 0.0],
    ])
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(y, quant.ulq_forward(X_HAND, 191 * S, -1.0))


def test_activation_qat_random_forward_matches_reference() -> None:
    x = (np.random.RandomState(3).randn(4, 3, 5) * 1.5).astype(np.float32)
    layer = act_layer(2.0, -1.25, shape=x.shape)  # s = 3.25/255: not a power of two
    y = run(layer, x)
    np.testing.assert_allclose(y, quant.ulq_forward(x, 2.0, -1.25), rtol=1e-6, atol=1e-6)


def test_activation_qat_fixed_min_zeroes_clip_min_blob() -> None:
    layer = act_layer(255 * S, -1.0, "fixed_min: true", shape=(6,))
    x = np.array([-0.3, 0.5 * S, 1.5 * S, 100 * S + 0.25 * S, 4.5, 254.5 * S], np.float32)
    y = run(layer, x)
    assert clips(layer) == (255 * S, 0.0)
    np.testing.assert_array_equal(y, [0.0, 0.0, 2 * S, 100 * S, 255 * S, 254 * S])
    np.testing.assert_array_equal(y, quant.ulq_forward(x, 255 * S, 0.0))
    set_clips(layer, 255 * S, -3.0)  # a solver step moved it: the forward puts it back to 0
    run(layer, x)
    assert clips(layer)[1] == 0.0


def test_activation_qat_clip_check_restores_previous_good_values() -> None:
    x = X_HAND
    layer = act_layer(191 * S, -1.0, shape=x.shape)
    pre = (191 * S, -1.0)
    # (cmax, cmin) as a solver might leave them -> ClipCheck outcome, applied in sequence
    steps = [
        (0.5, 1.0),  # flipped: restore both (191/64, -1)
        (-0.5, -0.75),  # cmax < 0: restore cmax, accept cmin -0.75
        (1.0, 0.5),  # cmin > 0: restore cmin from the new previous value -0.75, accept cmax 1.0
        (0.25, 0.75),  # flipped again: back to (1.0, -0.75)
        (3.0, -0.5),  # accept both
    ]
    expected_clips = [(191 * S, -1.0), (191 * S, -0.75), (1.0, -0.75), (1.0, -0.75), (3.0, -0.5)]
    for (cmax, cmin), want in zip(steps, expected_clips):
        (accepted, pre) = quant.clip_check(cmax, cmin, pre)
        assert accepted == want  # the reference itself agrees with the hand table
        set_clips(layer, cmax, cmin)
        y = run(layer, x)
        assert clips(layer) == want
        np.testing.assert_allclose(y, quant.ulq_forward(x, *want), rtol=1e-6, atol=1e-7)


def test_activation_qat_rejects_bad_parameters() -> None:
    with pytest.raises(ModelFormatError, match="clip_max"):
        act_layer(-1.0, 0.5)
    with pytest.raises(ModelFormatError, match="fixed_min"):
        act_layer(0.0, -1.0, "fixed_min: true")
    with pytest.raises(UnsupportedLayerError, match="with_offset"):
        act_layer(1.0, -1.0, "with_offset: false")
    # ifmr_init ignores the parameter clips
    act_layer(-1.0, 0.5, "ifmr_init: true")


# ---------------------------------------------------------------------------------------------------
# ActivationQAT: gradients in a TRAIN net
# ---------------------------------------------------------------------------------------------------
GRAD_NET = """
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 8 } } }
layer { name: "fc_act_retrain" type: "ActivationQAT" bottom: "data" top: "fc_act_retrain"
  retrain_data_quant_param { clip_max: 2.0 clip_min: -1.25 %s }
  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 } }
layer { name: "fc" type: "InnerProduct" bottom: "fc_act_retrain" top: "fc" loss_weight: 1
  inner_product_param { num_output: 1 bias_term: false } }
"""


@pytest.mark.parametrize("fixed_min", [False, True])
def test_activation_qat_clip_gradients_through_backward(fixed_min: bool) -> None:
    net, layers = build_net(GRAD_NET % ("fixed_min: true" if fixed_min else ""))
    act, fc = layers["fc_act_retrain"], layers["fc"]
    dy = np.array([[0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 1.0, -2.0]], np.float32)
    x = np.array([[0.3, -0.7, 1.13, 2.5, -1.6, 0.011, -0.05, 1.999]], np.float32)
    with torch.no_grad():
        fc.blobs[0].copy_(torch.from_numpy(dy))
    for b in act.blobs:
        b.requires_grad_(True)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    net.loss().backward()
    cmin = 0.0 if fixed_min else -1.25
    np.testing.assert_allclose(net.tensor("fc_act_retrain").detach().numpy(), quant.ulq_forward(x, 2.0, cmin),
                               rtol=1e-6, atol=1e-6)
    _, gmax, gmin = quant.ulq_backward(x, dy, 2.0, cmin)
    assert act.blobs[0].grad.shape == (1,)
    np.testing.assert_allclose(float(act.blobs[0].grad), gmax, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(act.blobs[1].grad), gmin, rtol=1e-5, atol=1e-6)
    assert abs(gmax) > 1e-3  # the case is not trivial


def test_activation_qat_input_gradient_is_clipped_ste() -> None:
    layer = act_layer(2.0, -1.25, shape=(8,), phase=TRAIN)
    x = torch.tensor([0.3, -0.7, 1.13, 2.5, -1.6, 0.011, -0.05, 1.999], requires_grad=True)
    dy = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 1.0, -2.0])
    (gx,) = torch.autograd.grad(layer.forward([x])[0], x, dy)
    dx, _, _ = quant.ulq_backward(x.detach().numpy(), dy.numpy(), 2.0, -1.25)
    np.testing.assert_array_equal(gx.numpy(), dx)
    assert gx[3] == 0 and gx[4] == 0  # above / below the clips


# ---------------------------------------------------------------------------------------------------
# ActivationQAT: IFMR initialisation and the record file
# ---------------------------------------------------------------------------------------------------
def ifmr_layer(extra: str = "", shape=(2, 3, 4, 5)) -> Layer:
    return make_layer(
        f'name: "c1_act_retrain" type: "ActivationQAT" '
        f"retrain_data_quant_param {{ ifmr_init: true {extra} }}",
        np.zeros(shape, np.float32),
    )


def test_ifmr_init_runs_once_on_the_first_real_forward() -> None:
    x1 = (np.random.RandomState(0).randn(2, 3, 4, 5) * 0.8 + 0.3).astype(np.float32)
    x2 = (np.random.RandomState(1).randn(2, 3, 4, 5) * 3.0).astype(np.float32)
    layer = ifmr_layer()
    assert clips(layer) == (3.0, 0.0)  # proto defaults until initialised
    layer.reshaping = True  # a shape pass: no initialisation
    run(layer, np.zeros_like(x1))
    run(layer, x2)
    assert clips(layer) == (3.0, 0.0)
    layer.reshaping = False
    y = run(layer, x1)
    cmax, cmin = quant.ifmr_clips(x1)
    np.testing.assert_allclose(clips(layer), (cmax, cmin), rtol=2e-6)
    assert cmin < 0 < cmax
    np.testing.assert_allclose(y, quant.ulq_forward(x1, *clips(layer)), rtol=1e-6, atol=1e-6)
    got = clips(layer)
    run(layer, x2)  # a different batch does not re-initialise
    assert clips(layer) == got


def test_ifmr_init_skipped_after_blobs_loaded() -> None:
    layer = ifmr_layer()
    set_clips(layer, 1.5, -0.5)
    layer.blobs_loaded()
    run(layer, (np.random.RandomState(0).randn(2, 3, 4, 5) * 4).astype(np.float32))
    assert clips(layer) == (1.5, -0.5)


def test_ifmr_init_not_repeated_by_a_layer_sharing_the_blobs() -> None:
    train = ifmr_layer()
    run(train, (np.random.RandomState(0).randn(2, 3, 4, 5)).astype(np.float32))
    got = clips(train)
    test = ifmr_layer()
    test.blobs = train.blobs  # as a solver's test net shares the trained blobs (share_trained_layers)
    test.blobs_shared(train)
    run(test, (np.random.RandomState(5).randn(2, 3, 4, 5) * 10).astype(np.float32))
    assert clips(test) == got


def test_ifmr_init_in_a_net_and_not_during_construction() -> None:
    text = """
    layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
    layer { name: "c_act_retrain" type: "ActivationQAT" bottom: "data" top: "c_act_retrain"
      retrain_data_quant_param { ifmr_init: true } }
    """
    net, layers = build_net(text, TEST)
    act = layers["c_act_retrain"]
    assert not act.clips_ready  # construction's shape pass ran no IFMR
    x = (np.random.RandomState(2).randn(2, 3, 4, 4)).astype(np.float32)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    np.testing.assert_allclose(clips(act), quant.ifmr_clips(x), rtol=2e-6)


def test_record_file_gets_shapes_once(tmp_path: Path) -> None:
    path = tmp_path / "record.txt"
    path.write_text('record { key: "c1" value { scale_d: 0.5 offset_d: -3 scale_w: 0.25 offset_w: 0 } }\n'
                    'record { key: "other" value { channels: 9 height: 9 width: 9 } }\n')
    layer = ifmr_layer(f'object_layer: "c1-c2" record_file_path: "{path}"')
    hook = RecordShapesHook([layer])  # as the solver installs on its nets
    layer.reshaping = True
    run(layer, np.zeros((2, 3, 4, 5), np.float32))
    hook.after_forward()
    assert "channels: 3" not in path.read_text()  # nothing written after a shape pass
    layer.reshaping = False
    run(layer, np.ones((2, 3, 4, 5), np.float32))
    assert "channels: 3" not in path.read_text()  # the layer's forward writes no file itself
    hook.after_forward()
    msg = text_format.Parse(path.read_text(), amct_pb2.ScaleOffsetRecord())
    entries = {e.key: e.value for e in msg.record}
    assert [e.key for e in msg.record] == ["c1", "other", "c2"]
    c1 = entries["c1"]
    assert (c1.scale_d, c1.offset_d, list(c1.scale_w), list(c1.offset_w)) == (0.5, -3, [0.25], [0])
    assert (c1.channels, c1.height, c1.width) == (3, 4, 5)
    assert (entries["c2"].channels, entries["c2"].height, entries["c2"].width) == (3, 4, 5)
    assert not entries["c2"].HasField("scale_d")
    assert (entries["other"].channels, entries["other"].height) == (9, 9)
    before = path.read_text()
    run(layer, np.ones((2, 3, 4, 5), np.float32))
    hook.after_forward()
    assert path.read_text() == before


def test_record_shapes_of_a_2d_bottom(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rec.txt"
    layer = make_layer(
        f'type: "ActivationQAT" retrain_data_quant_param {{ object_layer: "fc" record_file_path: "{path}" }}',
        np.zeros((4, 7), np.float32),
    )
    run(layer, np.ones((4, 7), np.float32))
    RecordShapesHook([layer]).after_forward()
    msg = text_format.Parse(path.read_text(), amct_pb2.ScaleOffsetRecord())
    assert [(e.key, e.value.channels, e.value.height, e.value.width) for e in msg.record] == [("fc", 7, 1, 1)]


# ---------------------------------------------------------------------------------------------------
# WeightQAT
# ---------------------------------------------------------------------------------------------------
def wqat(params: str, phase: int = TEST) -> Layer:
    return make_layer(
        f'name: "L_wts_retrain" type: "WeightQAT" retrain_weight_quant_param {{ {params} }}',
        np.zeros((1, 2), np.float32),
        phase=phase,
    )


def set_shadow(layer: Layer, w: np.ndarray) -> None:
    with torch.no_grad():
        layer.blobs[1].copy_(torch.from_numpy(w))


def test_weight_qat_hand_values_per_channel() -> None:
    layer = wqat('cout: 3 cin: 1 h: 1 w: 3 layer_type: "Convolution"')
    w = np.array([
        [0.5, -1.0, 0.25],  # negative extreme: s = 1/128, codes 64, -128, 32
        [0.0, 0.0, 0.0],  # all zero: s -> 1.0, stays 0
        [1.27, -0.5, 0.0],  # s = 1.27/127; -0.5/s = -50.0000x -> -50
    ], np.float32).reshape(3, 1, 1, 3)
    set_shadow(layer, w)
    x = np.arange(2, dtype=np.float32).reshape(1, 2)
    np.testing.assert_array_equal(run(layer, x), x)  # activation passes through
    got = layer.blobs[0].numpy()
    np.testing.assert_array_equal(got[0].ravel(), [0.5, -1.0, 0.25])
    np.testing.assert_array_equal(got[1].ravel(), [0.0, 0.0, 0.0])
    s2 = np.float32(1.27) / np.float32(127)
    np.testing.assert_array_equal(got[2].ravel(), np.array([127, -50, 0], np.float32) * s2)
    np.testing.assert_array_equal(layer.blobs[1].numpy(), w)  # the shadow is not touched


@pytest.mark.parametrize(
    ("params", "shape", "channel_wise", "axis"),
    [
        ('cout: 4 cin: 3 h: 3 w: 2 layer_type: "Convolution"', (4, 3, 3, 2), True, 0),
        ('cout: 4 cin: 3 h: 3 w: 2 layer_type: "Convolution" channel_wise: false', (4, 3, 3, 2), False, 0),
        ('cout: 3 cin: 2 h: 2 w: 2 layer_type: "Deconvolution"', (2, 3, 2, 2), True, 1),
        ('cout: 3 cin: 2 h: 2 w: 2 layer_type: "Deconvolution" channel_wise: false', (2, 3, 2, 2), False, 1),
        ('cout: 5 cin: 6 layer_type: "InnerProduct" channel_wise: false', (5, 6), False, 0),
    ],
)
def test_weight_qat_matches_arq_reference(params: str, shape, channel_wise: bool, axis: int) -> None:
    layer = wqat(params)
    assert [tuple(b.shape) for b in layer.blobs] == [shape, shape]
    w = np.random.RandomState(7).randn(*shape).astype(np.float32)
    set_shadow(layer, w)
    run(layer, np.zeros((1, 2), np.float32))
    expected = quant.arq_fake_quant(w, channel_wise, axis)[0]
    np.testing.assert_array_equal(layer.blobs[0].numpy(), expected)
    if channel_wise and axis == 1:
        # per channel along axis 1 really differs from per channel along axis 0
        assert not np.array_equal(expected, quant.arq_fake_quant(w, True, 0)[0])


def test_weight_qat_rejects_bad_parameters() -> None:
    with pytest.raises(UnsupportedLayerError, match="channel_wise: false"):
        wqat('cout: 5 cin: 6 layer_type: "InnerProduct"')
    with pytest.raises(ModelFormatError, match="layer_type"):
        wqat('cout: 5 cin: 6 layer_type: "Pooling"')
    with pytest.raises(UnsupportedLayerError, match="with_offset"):
        wqat('layer_type: "Convolution" with_offset: true')
    with pytest.raises(ModelFormatError, match="> 0"):
        wqat('cout: 0 cin: 6 h: 1 w: 1 layer_type: "Convolution"')


QAT_NET = """
name: "qat"
layer { name: "in" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 2 dim: 4 dim: 4 } shape { dim: 2 } } }
layer { name: "conv1_act_retrain" type: "ActivationQAT" bottom: "data" top: "conv1_act_retrain"
  retrain_data_quant_param { clip_max: 2.0 clip_min: -1.5 object_layer: "conv1" }
  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 } }
layer { name: "conv1_wts_retrain" type: "WeightQAT" bottom: "conv1_act_retrain" top: "conv1_wts_retrain"
  retrain_weight_quant_param { cout: 3 cin: 2 h: 2 w: 2 layer_type: "Convolution" channel_wise: true }
  param { name: "conv1_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 decay_mult: 1 } }
layer { name: "conv1" type: "Convolution" bottom: "conv1_wts_retrain" top: "conv1"
  param { name: "conv1_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 2 bias_filler { type: "constant" value: 0.1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def qat_net(phase: int = TRAIN, seed: int = 0) -> tuple[Net, dict[str, Layer], np.ndarray]:
    torch.manual_seed(seed)
    net, layers = build_net(QAT_NET, phase)
    rs = np.random.RandomState(seed)
    shadow = (rs.randn(3, 2, 2, 2) * 0.4).astype(np.float32)
    set_shadow(layers["conv1_wts_retrain"], shadow)
    x = (rs.randn(2, 2, 4, 4)).astype(np.float32)
    net.set_tensor("data", torch.from_numpy(x))
    net.set_tensor("label", torch.tensor([1.0, 3.0]))
    return net, layers, x


def make_learnable(layers: dict[str, Layer], with_quantized: bool = False) -> None:
    """What the solver will do: learnable blobs require grad (blobs with lr_mult 0 are left alone)."""
    for name, layer in layers.items():
        for i, blob in enumerate(layer.blobs):
            shared_quantized = name in ("conv1_wts_retrain", "conv1") and i == 0
            if not shared_quantized or with_quantized:
                blob.requires_grad_(True)


def test_conv_reads_the_fake_quantized_shared_weight() -> None:
    net, layers, x = qat_net(TEST)
    wq, conv = layers["conv1_wts_retrain"], layers["conv1"]
    assert conv.blobs[0] is wq.blobs[0]
    net.run()
    w_hat = quant.arq_fake_quant(wq.blobs[1].numpy(), True, 0)[0]
    np.testing.assert_array_equal(wq.blobs[0].numpy(), w_hat)
    act_out = quant.ulq_forward(x, 2.0, -1.5)
    expected = conv2d(act_out, w_hat, np.full(3, 0.1))
    np.testing.assert_allclose(net.tensor("conv1").numpy(), expected, rtol=1e-5, atol=1e-6)
    # with the float shadow the result would differ: the conv really uses the quantized weights
    assert not np.allclose(expected, conv2d(act_out, wq.blobs[1].numpy(), np.full(3, 0.1)), atol=1e-4)
    # a new shadow (a solver step, a loaded caffemodel) reaches the conv on the next forward
    shadow2 = (np.random.RandomState(9).randn(3, 2, 2, 2) * 0.2).astype(np.float32)
    set_shadow(wq, shadow2)
    net.run()
    expected2 = conv2d(act_out, quant.arq_fake_quant(shadow2, True, 0)[0], np.full(3, 0.1))
    np.testing.assert_allclose(net.tensor("conv1").numpy(), expected2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_quantized", [False, True])
def test_weight_qat_straight_through_gradient(with_quantized: bool) -> None:
    net, layers, _ = qat_net(TRAIN)
    make_learnable(layers, with_quantized)
    wq, conv = layers["conv1_wts_retrain"], layers["conv1"]
    net.run()
    net.loss().backward()
    shadow_grad = wq.blobs[1].grad
    assert shadow_grad is not None and conv.blobs[0].grad is not None
    assert float(shadow_grad.abs().sum()) > 0
    np.testing.assert_array_equal(shadow_grad.numpy(), conv.blobs[0].grad.numpy())
    # a second backward without zeroing accumulates in both alike (Caffe's iter_size)
    first = shadow_grad.clone()
    net.run()
    net.loss().backward()
    np.testing.assert_array_equal(wq.blobs[1].grad.numpy(), conv.blobs[0].grad.numpy())
    np.testing.assert_allclose(wq.blobs[1].grad.numpy(), 2 * first.numpy(), rtol=1e-6)
    # all learnable blobs of the net got gradients
    for name in ("conv1_act_retrain", "fc"):
        assert all(b.grad is not None for b in layers[name].blobs)


def test_weight_qat_gradient_equals_the_conv_weight_gradient_formula() -> None:
    """The shadow's gradient is dL/d(w_hat), independently computed from the conv's input and output grad."""
    net, layers, x = qat_net(TRAIN)
    make_learnable(layers)
    wq = layers["conv1_wts_retrain"]
    net.run()
    top = net.tensor("conv1")
    top.retain_grad()
    net.loss().backward()
    g = top.grad.numpy().astype(np.float64)
    a = quant.ulq_forward(x, 2.0, -1.5)
    expected = np.zeros((3, 2, 2, 2))
    for o in range(3):
        for c in range(2):
            for i in range(2):
                for j in range(2):
                    expected[o, c, i, j] = np.sum(g[:, o] * a[:, c, i:i + 3, j:j + 3])
    np.testing.assert_allclose(wq.blobs[1].grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_weight_qat_hook_follows_a_replaced_tensor() -> None:
    net, layers, _ = qat_net(TRAIN)
    make_learnable(layers)
    wq, conv = layers["conv1_wts_retrain"], layers["conv1"]
    net.run()
    net.loss().backward()
    # copy_from / re-sharing may put a new tensor into the blob list
    fresh = torch.zeros(3, 2, 2, 2)
    wq.blobs[0] = fresh
    conv.blobs[0] = fresh
    wq.blobs[1].grad = None
    net.run()
    net.loss().backward()
    assert fresh.requires_grad and fresh.grad is not None
    np.testing.assert_array_equal(wq.blobs[1].grad.numpy(), fresh.grad.numpy())


def test_weight_qat_test_net_sharing_blobs_does_not_double_the_gradient() -> None:
    net, layers, _ = qat_net(TRAIN)
    make_learnable(layers)
    test_net, test_layers, _ = qat_net(TEST)
    # as a solver shares the trained blobs with its test net
    for name, layer in test_layers.items():
        layer.blobs = layers[name].blobs
    net.run()
    test_net.run()
    net.loss().backward()
    wq = layers["conv1_wts_retrain"]
    np.testing.assert_array_equal(wq.blobs[1].grad.numpy(), layers["conv1"].blobs[0].grad.numpy())


def test_weight_qat_two_train_nets_sharing_the_blobs_route_the_gradient_once() -> None:
    net, layers, _ = qat_net(TRAIN)
    make_learnable(layers)
    other, other_layers, _ = qat_net(TRAIN, seed=1)
    share_trained_layers(other, net)  # the tensors and the straight-through link go together
    assert other_layers["conv1_wts_retrain"].ste_link is layers["conv1_wts_retrain"].ste_link
    net.run()
    other.run()  # the layer that ran last owns the one hook on the shared tensor
    net.loss().backward()
    wq = layers["conv1_wts_retrain"]
    np.testing.assert_array_equal(wq.blobs[1].grad.numpy(), layers["conv1"].blobs[0].grad.numpy())


def test_small_qat_train_net_forward_backward() -> None:
    net, layers, _ = qat_net(TRAIN, seed=3)
    make_learnable(layers)
    net.run()
    loss = net.loss()
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    for name in ("conv1_act_retrain", "conv1_wts_retrain", "conv1", "fc"):
        for i, blob in enumerate(layers[name].blobs):
            assert blob.grad is not None, (name, i)
            assert torch.isfinite(blob.grad).all()


# ---------------------------------------------------------------------------------------------------
# Quant / DeQuant / AntiQuant
# ---------------------------------------------------------------------------------------------------
def quant_layer(scale: float, offset: bytes, shape=(7,)) -> Layer:
    esc = "".join(f"\\{b:03o}" for b in offset)
    return make_layer(
        f'type: "Quant" quant_param {{ scale: {scale!r} offset: "{esc}" with_offset: true }}',
        np.zeros(shape, np.float32),
    )


def test_quant_hand_values_with_ties_and_saturation() -> None:
    # s_d = 1/2.0 = 0.5, o_d = -3 (byte 0xFD)
    layer = quant_layer(2.0, b"\xfd")
    x = np.array([0.25, -0.25, 0.75, -0.75, 100.0, -100.0, 0.0], np.float32)
    # x/s: 0.5 -> 1, -0.5 -> -1, 1.5 -> 2, -1.5 -> -2 (ties away); 200 - 3 -> 127; -200 - 3 -> -128
    expected = np.array([0.5, -0.5, 1.0, -1.0, (127 + 3) * 0.5, (-128 + 3) * 0.5, 0.0], np.float32)
    np.testing.assert_array_equal(run(layer, x), expected)


def test_quant_reconstructs_scale_d_as_double_reciprocal() -> None:
    # scale 7: s_d = 1/7 in double. x = 0.5: 0.5 / (1/7.0) = 3.5 exactly in double -> 4 (away), whereas a
    # float32 s_d (0.14285715) gives 3.4999998 -> 3.
    layer = quant_layer(7.0, b"\x00", shape=(1,))
    assert run(layer, np.array([0.5], np.float32))[0] == np.float32(4 * (1 / 7.0))
    # scale 10: x = float32(0.35) = 0.3499999940395355; x / 0.1 in double = 3.49999994 -> 3, whereas
    # x * 10 in float32 is 3.5 -> 4.
    layer = quant_layer(10.0, b"\x00", shape=(1,))
    assert run(layer, np.array([0.35], np.float32))[0] == np.float32(3 * (1 / 10.0))


def test_quant_offset_byte_and_backward_identity() -> None:
    from amct_caffe.quant.numerics import offset_byte

    assert offset_byte(b"\xf2") == -14
    assert offset_byte(b"\x80") == -128
    assert offset_byte(b"\x7f\x01") == 127  # only the first byte counts
    assert offset_byte(b"") == 0
    layer = quant_layer(46.9484, b"\xf2", shape=(5,))
    x = torch.tensor([0.1, -3.0, 2.0, 0.0, 9.0], requires_grad=True)
    dy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (gx,) = torch.autograd.grad(layer.forward([x])[0], x, dy)
    np.testing.assert_array_equal(gx.numpy(), dy.numpy())


def test_quant_random_values_match_reference() -> None:
    scale = float(np.float32(1 / 0.0213))
    layer = quant_layer(scale, b"\xf2", shape=(200,))
    x = (np.random.RandomState(4).randn(200) * 2).astype(np.float32)
    s_d = 1.0 / scale
    expected = ((quant.quant_layer_codes(x, scale, -14) + 14) * s_d).astype(np.float32)
    np.testing.assert_array_equal(run(layer, x), expected)


def test_quant_rejects_missing_scale() -> None:
    with pytest.raises(ModelFormatError, match="scale"):
        make_layer('type: "Quant" quant_param { offset: "\\000" }', np.zeros(3, np.float32))


def dequant(channel_wise: bool, shape) -> Layer:
    return make_layer(
        f'type: "DeQuant" dequant_param {{ channel_wise: {str(channel_wise).lower()} }}',
        np.zeros(shape, np.float32),
    )


@pytest.mark.parametrize(
    ("channel_wise", "shape", "blob"),
    [(True, (2, 5, 3, 3), 5), (False, (2, 5, 3, 3), 1), (True, (2, 5), 1), (True, (2, 5, 3), 1)],
)
def test_dequant_blob_shapes(channel_wise: bool, shape, blob: int) -> None:
    layer = dequant(channel_wise, shape)
    assert [tuple(b.shape) for b in layer.blobs] == [(blob,)] * 3


def test_dequant_identity_without_shift() -> None:
    layer = dequant(True, (1, 2, 1, 3))
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([0.5, 0.25]))
    x = np.array([3.3, -1.25, 7.0, 0.625, 1e5, -0.1], np.float32).reshape(1, 2, 1, 3)
    np.testing.assert_array_equal(run(layer, x), x)


def test_dequant_shift_n_emulation_hand_values() -> None:
    layer = dequant(True, (1, 2, 1, 3))
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([0.5, 0.25]))
        layer.blobs[1].copy_(torch.tensor([1.0, 2.0]))
    x = np.array([3.3, -1.25, 7.0, 0.625, 1e5, -0.1], np.float32).reshape(1, 2, 1, 3)
    # ch0, deq 0.5, N 1: 3.3 -> 6.6 -> 7 -> 3.5 -> 4 -> 4*0.5*2 = 4;  -1.25 -> -2.5 -> -3 -> -1.5 -> -2 -> -2;
    #                    7.0 -> 14 -> 7 -> 7
    # ch1, deq 0.25, N 2: 0.625 -> 2.5 -> 3 -> 0.75 -> 1 -> 1;  1e5 -> 4e5 -> 1e5 -> clamp 32767 -> 32767;
    #                    -0.1 -> -0.4 -> 0 -> 0
    expected = np.array([4.0, -2.0, 7.0, 1.0, 32767.0, 0.0], np.float32).reshape(1, 2, 1, 3)
    np.testing.assert_array_equal(run(layer, x), expected)
    xt = torch.from_numpy(x).requires_grad_(True)
    (gx,) = torch.autograd.grad(layer.forward([xt])[0].sum(), xt)
    np.testing.assert_array_equal(gx.numpy(), np.ones_like(x))


def test_dequant_rejects_mixed_shift_bits() -> None:
    layer = dequant(True, (1, 2, 1, 1))
    x = np.ones((1, 2, 1, 1), np.float32)
    with torch.no_grad():
        layer.blobs[0].fill_(0.5)
        layer.blobs[1].copy_(torch.tensor([0.0, 3.0]))
    with pytest.raises(ModelFormatError, match="shift_bit"):
        run(layer, x)
    with torch.no_grad():
        layer.blobs[1].copy_(torch.tensor([17.0, 3.0]))
    with pytest.raises(ModelFormatError, match="shift_bit"):
        run(layer, x)


def test_antiquant_is_identity() -> None:
    layer = make_layer('type: "AntiQuant"', np.zeros((2, 3), np.float32))
    x = np.array([[1.5, -2.0, 0.0], [3.0, 4.0, -5.0]], np.float32)
    np.testing.assert_array_equal(run(layer, x), x)
    assert layer.blobs == []
