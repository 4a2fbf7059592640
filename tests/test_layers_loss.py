"""Loss and accuracy layers against numpy references and hand values (forward and Caffe's gradients), the
net's weighted loss, and a cross-check of a net with a label input against the reference Caffe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers import layer_class
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close
from tests.references.real_caffe import run_reference

RNG = np.random.default_rng(4321)
FLT_MIN = 1.17549435e-38


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def labels(shape: tuple[int, ...], classes: int, ignore: int | None = None,
           p_ignore: float = 0.0) -> np.ndarray:
    lab = RNG.integers(0, classes, size=shape).astype(np.float32)
    if ignore is not None:
        lab[RNG.random(shape) < p_ignore] = ignore
    return lab


def make_layer(text: str):
    lp = text_format.Merge(text, caffe_pb2.LayerParameter())
    return layer_class(lp.type)(lp, caffe_pb2.TRAIN, torch.device("cpu"))


def run_layer(text: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    layer = make_layer(text)
    layer.setup(list(tensors))
    return layer.forward(list(tensors))


def apply(text: str, *arrays: np.ndarray) -> list[np.ndarray]:
    return [t.detach().numpy() for t in run_layer(text, *[torch.from_numpy(a) for a in arrays])]


def split3(x: np.ndarray, axis: int) -> tuple[np.ndarray, int, int, int]:
    ax = axis % x.ndim
    outer, classes, inner = int(np.prod(x.shape[:ax])), x.shape[ax], int(np.prod(x.shape[ax + 1:]))
    return x.reshape(outer, classes, inner), outer, classes, inner


# -- Accuracy ----------------------------------------------------------------------------------------------
def np_accuracy(x: np.ndarray, label: np.ndarray, top_k: int = 1, axis: int = 1,
                ignore: int | None = None) -> tuple[float, np.ndarray]:
    """caffe-master AccuracyLayer::Forward_cpu, loop for loop."""
    s, outer, classes, inner = split3(x, axis)
    lab = label.reshape(outer, inner)
    hits, count = 0, 0
    nums, per = np.zeros(classes), np.zeros(classes)
    for i in range(outer):
        for j in range(inner):
            lv = int(lab[i, j])
            if ignore is not None and lv == ignore:
                continue
            nums[lv] += 1
            better = -1
            for k in range(classes):
                better += s[i, k, j] >= s[i, lv, j]
            if better < top_k:
                hits += 1
                per[lv] += 1
            count += 1
    acc = hits / count if count else 0.0
    return acc, np.array([per[c] / nums[c] if nums[c] else 0.0 for c in range(classes)])


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("axis, shape", [(1, (6, 5)), (1, (3, 5, 2, 2)), (-1, (3, 2, 5)), (2, (2, 3, 5, 2))])
def test_accuracy_matches_numpy(top_k: int, axis: int, shape: tuple[int, ...]) -> None:
    x = np.round(rand(*shape) * 2).astype(np.float32)  # coarse values: many ties
    _, outer, classes, inner = split3(x, axis)
    lab = labels((outer, inner), classes)
    text = (f'name: "acc" type: "Accuracy" bottom: "x" bottom: "l" top: "a" top: "pc" '
            f"accuracy_param {{ top_k: {top_k} axis: {axis} }}")
    acc, per = apply(text, x, lab)
    exp_acc, exp_per = np_accuracy(x, lab, top_k, axis)
    assert acc.shape == ()
    assert per.shape == (classes,)
    np.testing.assert_allclose(acc, exp_acc, rtol=1e-6)
    np.testing.assert_allclose(per, exp_per, rtol=1e-6)


def test_accuracy_ignore_label_and_ties_by_hand() -> None:
    # sample 0: label 0 is the unique max -> right; sample 1: label 2 ties with class 0 -> wrong for top 1
    # (caffe-master counts ties against the sample); sample 2: ignored; sample 3: label 1 is second -> wrong
    x = np.array([[3, 1, 0], [2, 0, 2], [0, 0, 9], [5, 4, 0]], np.float32)
    lab = np.array([0, 2, 255, 1], np.float32)
    text = ('name: "acc" type: "Accuracy" bottom: "x" bottom: "l" top: "a" top: "pc" '
            "accuracy_param { ignore_label: 255 }")
    acc, per = apply(text, x, lab)
    assert float(acc) == pytest.approx(1 / 3)
    np.testing.assert_allclose(per, [1.0, 0.0, 0.0])
    acc2, per2 = apply(text.replace("ignore_label: 255", "ignore_label: 255 top_k: 2"), x, lab)
    # top 2: sample 1 has one tie (class 0) -> 1 better < 2 -> right; sample 3 -> right
    assert float(acc2) == pytest.approx(1.0)
    np.testing.assert_allclose(per2, [1.0, 1.0, 1.0])


def test_accuracy_all_ignored_is_zero_and_errors() -> None:
    x = rand(2, 3)
    (acc,) = apply('name: "a" type: "Accuracy" bottom: "x" bottom: "l" top: "a" '
                   "accuracy_param { ignore_label: 1 }", x, np.ones(2, np.float32))
    assert float(acc) == 0.0
    with pytest.raises(ModelFormatError, match="top_k"):
        apply('name: "a" type: "Accuracy" bottom: "x" bottom: "l" top: "a" accuracy_param { top_k: 4 }',
              x, np.zeros(2, np.float32))
    with pytest.raises(ModelFormatError, match="labels for"):
        apply('name: "a" type: "Accuracy" bottom: "x" bottom: "l" top: "a"', rand(2, 3, 2),
              np.zeros(2, np.float32))
    with pytest.raises(ModelFormatError, match="outside"):
        apply('name: "a" type: "Accuracy" bottom: "x" bottom: "l" top: "a"', x, np.array([0, 3], np.float32))
    with pytest.raises(ModelFormatError, match="1 to 2 top"):
        run_layer('name: "a" type: "Accuracy" bottom: "x" bottom: "l" top: "a" top: "b" top: "c"',
                  torch.zeros(2, 3), torch.zeros(2))


# -- SoftmaxWithLoss ---------------------------------------------------------------------------------------
NORMS = {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3}


def np_softmax_loss(x: np.ndarray, label: np.ndarray, axis: int = 1, ignore: int | None = None,
                    norm: str = "VALID") -> tuple[float, np.ndarray, np.ndarray]:
    """Loss, probabilities and Caffe's gradient (p - onehot)/normalizer, in float64."""
    s, outer, classes, inner = split3(x.astype(np.float64), axis)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    lab = label.reshape(outer, inner)
    loss, count = 0.0, 0
    grad = p.copy()
    for i in range(outer):
        for j in range(inner):
            lv = int(lab[i, j])
            if ignore is not None and lv == ignore:
                grad[i, :, j] = 0
                continue
            loss -= math.log(max(p[i, lv, j], FLT_MIN))
            grad[i, lv, j] -= 1
            count += 1
    normalizer = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[norm]
    normalizer = max(1, normalizer)
    return loss / normalizer, p.reshape(x.shape), (grad / normalizer).reshape(x.shape)


@pytest.mark.parametrize("norm", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("axis, shape", [(1, (4, 5)), (1, (3, 4, 2, 3)), (-1, (2, 3, 6))])
def test_softmax_loss_normalizations_with_ignore(norm: str, axis: int, shape: tuple[int, ...]) -> None:
    x = rand(*shape) * 3
    classes = shape[axis]
    label_shape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    lab = labels(label_shape, classes, ignore=-1, p_ignore=0.3)
    lab.reshape(-1)[0] = -1  # at least one ignored
    text = (f'name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss" top: "prob" '
            f"softmax_param {{ axis: {axis} }} loss_param {{ ignore_label: -1 normalization: {norm} }}")
    xt = torch.from_numpy(x).requires_grad_()
    loss, prob = run_layer(text, xt, torch.from_numpy(lab))
    exp_loss, exp_p, exp_grad = np_softmax_loss(x, lab, axis, -1, norm)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.detach().numpy(), exp_loss, rtol=1e-5)
    np.testing.assert_allclose(prob.detach().numpy(), exp_p, rtol=1e-5, atol=1e-7)
    loss.backward()
    np.testing.assert_allclose(xt.grad.numpy(), exp_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("params, norm", [("", "VALID"), ("loss_param { normalize: false }", "BATCH_SIZE"),
                                          ("loss_param { normalize: true }", "VALID"),
                                          ("loss_param { normalize: false normalization: FULL }", "FULL")])
def test_softmax_loss_default_and_legacy_normalize(params: str, norm: str) -> None:
    x = rand(2, 3, 2, 2)
    lab = labels((2, 2, 2), 3)
    (loss,) = apply(f'name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss" {params}',
                    x, lab)
    np.testing.assert_allclose(loss, np_softmax_loss(x, lab, norm=norm)[0], rtol=1e-5)


def test_softmax_loss_flt_min_clamp_and_caffe_gradient() -> None:
    # p_true underflows to 0 in float32; Caffe clamps it to FLT_MIN and still back-propagates p - onehot.
    x = torch.tensor([[0.0, 200.0], [0.0, 0.0]], requires_grad=True)
    lab = torch.tensor([0.0, 1.0])
    (loss,) = run_layer('name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss"', x, lab)
    assert float(loss.detach()) == pytest.approx((-math.log(FLT_MIN) + math.log(2)) / 2, rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), [[-0.5, 0.5], [0.25, -0.25]], rtol=1e-6)


def test_softmax_loss_all_ignored_and_label_no_grad() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    lab = torch.tensor([7.0, 7.0], requires_grad=True)
    (loss,) = run_layer('name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss" '
                        "loss_param { ignore_label: 7 }", x, lab)
    assert float(loss.detach()) == 0.0  # normalizer max(1, 0)
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((2, 3)))
    assert lab.grad is None


def test_softmax_loss_errors() -> None:
    with pytest.raises(ModelFormatError, match="outside"):
        apply('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss"', rand(2, 3),
              np.array([0, 3], np.float32))
    with pytest.raises(ModelFormatError, match="labels for"):
        apply('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss"', rand(2, 3, 2),
              np.zeros((2, 1), np.float32))
    with pytest.raises(ModelFormatError, match="first dimension"):
        apply('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss"', rand(2, 3),
              np.zeros((1, 2), np.float32))


def test_loss_weight_count_and_prob_top_default_weight() -> None:
    with pytest.raises(ModelFormatError, match="loss_weight"):
        run_layer('name: "l" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss" '
                  "loss_weight: 1 loss_weight: 2", torch.zeros(2, 3), torch.zeros(2, 3))
    # The prob top of SoftmaxWithLoss carries loss weight 0 unless given (real Caffe cannot set this layer up
    # with two tops, BVLC issue #2968; we accept it).
    text = """
layer { name: "in" type: "Input" top: "x" top: "l" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "sl" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "sl" top: "prob" }
"""
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    x, lab = rand(2, 3), np.array([2, 0], np.float32)
    net.set_tensor("x", torch.from_numpy(x))
    net.set_tensor("l", torch.from_numpy(lab))
    net.run()
    np.testing.assert_allclose(float(net.loss().detach()), np_softmax_loss(x, lab)[0], rtol=1e-5)


# -- EuclideanLoss -----------------------------------------------------------------------------------------
def test_euclidean_loss_and_gradients() -> None:
    a, b = rand(3, 4, 2), rand(3, 8)
    at, bt = torch.from_numpy(a).requires_grad_(), torch.from_numpy(b).requires_grad_()
    (loss,) = run_layer('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"', at, bt)
    diff = a.astype(np.float64) - b.reshape(a.shape)
    assert loss.shape == ()
    np.testing.assert_allclose(float(loss.detach()), (diff ** 2).sum() / 3 / 2, rtol=1e-5)
    loss.backward()
    np.testing.assert_allclose(at.grad.numpy(), diff / 3, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bt.grad.numpy(), (-diff / 3).reshape(b.shape), rtol=1e-5, atol=1e-7)
    with pytest.raises(ModelFormatError, match="same dimension"):
        apply('name: "e" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"', rand(3, 4), rand(3, 5))


# -- SigmoidCrossEntropyLoss -------------------------------------------------------------------------------
def np_sigmoid_ce(x: np.ndarray, t: np.ndarray, ignore: int | None, norm: str) -> tuple[float, np.ndarray]:
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    per = np.maximum(x64, 0) - x64 * t64 + np.log1p(np.exp(-np.abs(x64)))
    grad = 1 / (1 + np.exp(-x64)) - t64
    valid = np.ones(x.shape, bool) if ignore is None else t.astype(np.int64) != ignore
    n, inner = x.shape[0], x.size // x.shape[0]
    normalizer = {"FULL": n * inner, "VALID": int(valid.sum()), "BATCH_SIZE": n, "NONE": 1}[norm]
    normalizer = max(1, normalizer)
    return float(per[valid].sum() / normalizer), np.where(valid, grad, 0) / normalizer


@pytest.mark.parametrize("params, ignore, norm", [
    ("", None, "BATCH_SIZE"),
    ("loss_param { ignore_label: -1 }", -1, "BATCH_SIZE"),
    ("loss_param { ignore_label: -1 normalization: VALID }", -1, "VALID"),
    ("loss_param { normalization: FULL }", None, "FULL"),
    ("loss_param { normalization: NONE }", None, "NONE"),
    ("loss_param { normalize: true ignore_label: -1 }", -1, "VALID"),
])
def test_sigmoid_cross_entropy(params: str, ignore: int | None, norm: str) -> None:
    x = rand(3, 4, 5) * 6  # includes large |x| where the stable formula matters
    t = RNG.random((3, 4, 5)).astype(np.float32)
    t[RNG.random(t.shape) < 0.3] = -1 if ignore is not None else 0
    xt = torch.from_numpy(x).requires_grad_()
    (loss,) = run_layer(f'name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss" '
                        f"{params}", xt, torch.from_numpy(t))
    exp_loss, exp_grad = np_sigmoid_ce(x, t, ignore, norm)
    assert loss.shape == ()
    np.testing.assert_allclose(float(loss.detach()), exp_loss, rtol=1e-5)
    loss.backward()
    np.testing.assert_allclose(xt.grad.numpy(), exp_grad, rtol=1e-5, atol=1e-7)


def test_sigmoid_cross_entropy_extreme_logits() -> None:
    # x = 100, t = 0 -> loss 100; x = -100, t = 0 -> ~0 (Caffe's stable formula never overflows)
    (loss,) = apply('name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss"',
                    np.array([[100.0, -100.0]], np.float32), np.zeros((1, 2), np.float32))
    assert float(loss) == pytest.approx(100.0, rel=1e-6)


# -- the net's loss ----------------------------------------------------------------------------------------
def test_net_loss_weights_and_accuracy_is_not_a_loss() -> None:
    text = """
layer { name: "in" type: "Input" top: "x" top: "l" top: "y"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } shape { dim: 4 dim: 3 } } }
layer { name: "sl" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "sl" }
layer { name: "eu" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "eu" loss_weight: 0.5 }
layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "l" top: "acc" }
"""
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    x, lab, y = rand(4, 3), labels((4,), 3), rand(4, 3)
    for name, value in {"x": x, "l": lab, "y": y}.items():
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    expected = np_softmax_loss(x, lab)[0] + 0.5 * ((x.astype(np.float64) - y) ** 2).sum() / 4 / 2
    np.testing.assert_allclose(float(net.loss().detach()), expected, rtol=1e-5)
    assert net.tensor("acc").shape == ()


# -- reference cross-check ---------------------------------------------------------------------------------
LOSS_NET = """
layer { name: "in" type: "Input" top: "x" top: "label" top: "y" top: "t"
        input_param { shape { dim: 4 dim: 5 dim: 2 dim: 3 } shape { dim: 4 dim: 1 dim: 2 dim: 3 }
                      shape { dim: 4 dim: 30 } shape { dim: 4 dim: 5 dim: 2 dim: 3 } } }
layer { name: "loss_valid" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss_valid"
        loss_param { ignore_label: 255 } }
layer { name: "prob" type: "Softmax" bottom: "x" top: "prob" }
layer { name: "loss_full" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss_full"
        loss_param { ignore_label: 255 normalization: FULL } }
layer { name: "loss_batch" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss_batch"
        loss_param { ignore_label: 255 normalize: false } }
layer { name: "loss_none" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss_none"
        loss_param { ignore_label: 255 normalization: NONE } loss_weight: 0.25 }
layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" top: "acc_class"
        accuracy_param { ignore_label: 255 } }
layer { name: "acc3" type: "Accuracy" bottom: "x" bottom: "label" top: "acc3"
        accuracy_param { top_k: 3 ignore_label: 255 } }
layer { name: "euc" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "euc" }
layer { name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "sce" }
"""


@pytest.mark.reference
def test_loss_net_matches_reference(reference_caffe: str) -> None:
    lab = labels((4, 1, 2, 3), 5, ignore=255, p_ignore=0.25)
    lab[0, 0, 0, 0] = 255
    inputs = {"x": rand(4, 5, 2, 3) * 2, "label": lab, "y": rand(4, 30),
              "t": RNG.random((4, 5, 2, 3)).astype(np.float32)}
    net = Net(text_format.Merge(LOSS_NET, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    ours = net.blob_arrays()
    ref = run_reference(LOSS_NET, inputs)["blobs"]
    for name, value in ours.items():
        assert name in ref, name
        assert_close(value, ref[name], name)
    # and our numpy references agree with it
    assert ours["loss_valid"] == pytest.approx(np_softmax_loss(inputs["x"], lab, ignore=255)[0], rel=1e-5)
    assert ours["acc"] == pytest.approx(np_accuracy(inputs["x"], lab, ignore=255)[0], rel=1e-6)
