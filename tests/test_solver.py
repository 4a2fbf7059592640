"""The solvers (engine/solver/ and the pycaffe facade): learning-rate policies against their formulas,
every update rule against a numpy simulation of Caffe's formulas on a linear least-squares problem,
lr_mult/decay_mult, shared and frozen blobs, iter_size, clipping, snapshots and restore, test nets, logs,
and training against the real Caffe (SGD, Nesterov, Adam on a small conv/BatchNorm/pool/fc net)."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import caffe
from amct_caffe.engine import solver as solver_mod
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError, RuntimeEngineError, UnsupportedLayerError
from amct_caffe.model.blobs import blob_to_array
from amct_caffe.model.io import load_caffemodel
from amct_caffe.proto import amct_pb2, caffe_pb2
from tests.references.real_caffe import reference_python

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

# -- a linear least-squares problem: loss = sum((x w^T + b - y)^2) / (2 N) ---------------------------------
X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 0.75, 1.0], [0.2, 0.4, -1.2]], dtype=np.float32)
Y = np.array([[1.0], [-0.5], [2.0], [0.3]], dtype=np.float32)
W0 = np.array([[0.3, -0.2, 0.1]], dtype=np.float32)
B0 = np.array([0.05], dtype=np.float32)


def linear_net(ip_params: str = "", test_layers: str = "") -> str:
    return f"""
name: "linear"
layer {{ name: "in" type: "Input" top: "x" top: "y" include {{ phase: TRAIN }}
        input_param {{ shape {{ dim: 4 dim: 3 }} shape {{ dim: 4 dim: 1 }} }} }}
{test_layers}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "ip" {ip_params}
        inner_product_param {{ num_output: 1 }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }}
"""


def solver_param(text: str, net_text: str | None = None) -> caffe_pb2.SolverParameter:
    param = text_format.Merge(text, caffe_pb2.SolverParameter())
    if net_text is not None:
        text_format.Merge(net_text, param.net_param)
    return param


def feed(solver: solver_mod.Solver, w: np.ndarray = W0, b: np.ndarray = B0) -> None:
    net = solver.net
    net.blobs["x"].data[...] = X
    net.blobs["y"].data[...] = Y
    net.params["ip"][0].data[...] = w
    net.params["ip"][1].data[...] = b


def linear_solver(text: str, ip_params: str = "", test_layers: str = "") -> solver_mod.Solver:
    s = caffe.get_solver(solver_param(text, linear_net(ip_params, test_layers)))
    feed(s)
    return s


def hand_train(kind: str, steps: int, *, lr: float, momentum: float = 0.0, wd: float = 0.0, l1: bool = False,
               lr_mult: tuple[float, float] = (1.0, 1.0), decay_mult: tuple[float, float] = (1.0, 1.0),
               delta: float = 1e-8, momentum2: float = 0.999, rms_decay: float = 0.99,
               clip: float = -1.0) -> tuple[list[np.ndarray], list[float], list[np.ndarray]]:
    """Caffe's update rules written out in float64 for the linear problem (w, b)."""
    x, y = X.astype(np.float64), Y.astype(np.float64)
    n = x.shape[0]
    params = [W0.astype(np.float64).copy(), B0.astype(np.float64).copy()]
    hist = [np.zeros_like(p) for p in params]
    hist2 = [np.zeros_like(p) for p in params]
    losses = []
    for t in range(steps):
        r = x @ params[0].T + params[1] - y
        losses.append(float((r**2).sum() / n / 2))
        grads = [r.T @ x / n, r.sum(axis=0) / n]
        if clip >= 0:
            norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
            if norm > clip:
                grads = [g * (clip / norm) for g in grads]
        for i, p in enumerate(params):
            g = grads[i] + wd * decay_mult[i] * (np.sign(p) if l1 else p)
            a = lr * lr_mult[i]
            if kind == "SGD":
                hist[i] = momentum * hist[i] + a * g
                update = hist[i]
            elif kind == "Nesterov":
                old = hist[i]
                hist[i] = momentum * hist[i] + a * g
                update = (1 + momentum) * hist[i] - momentum * old
            elif kind == "AdaGrad":
                hist[i] = hist[i] + g**2
                update = a * g / (np.sqrt(hist[i]) + delta)
            elif kind == "RMSProp":
                hist[i] = rms_decay * hist[i] + (1 - rms_decay) * g**2
                update = a * g / (np.sqrt(hist[i]) + delta)
            elif kind == "AdaDelta":
                hist[i] = momentum * hist[i] + (1 - momentum) * g**2
                dx = g * np.sqrt((hist2[i] + delta) / (hist[i] + delta))
                hist2[i] = momentum * hist2[i] + (1 - momentum) * dx**2
                update = a * dx
            elif kind == "Adam":
                hist[i] = momentum * hist[i] + (1 - momentum) * g
                hist2[i] = momentum2 * hist2[i] + (1 - momentum2) * g**2
                correction = math.sqrt(1 - momentum2 ** (t + 1)) / (1 - momentum ** (t + 1))
                update = a * correction * hist[i] / (np.sqrt(hist2[i]) + delta)
            else:
                raise AssertionError(kind)
            params[i] = p - update
    return params, losses, hist + hist2


def run_steps(s: solver_mod.Solver, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        s.step(1)
        losses.append(float(s.net.blobs["loss"].data))
    return losses


def assert_params(s: solver_mod.Solver, expected: list[np.ndarray], rtol: float = 2e-5) -> None:
    np.testing.assert_allclose(s.net.params["ip"][0].data, expected[0], rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(s.net.params["ip"][1].data, expected[1], rtol=rtol, atol=1e-6)


# -- learning-rate policies ----------------------------------------------------------------------------------
def lr_solver(text: str) -> solver_mod.Solver:
    return solver_mod.SGDSolver(solver_param("base_lr: 0.1 max_iter: 100 " + text, linear_net()))


def f32(value: float) -> float:
    """A solver field as Caffe holds it (float)."""
    return float(np.float32(value))


@pytest.mark.parametrize("text, formula", [
    ('lr_policy: "fixed"', lambda it: 0.1),
    ('lr_policy: "step" gamma: 0.5 stepsize: 3', lambda it: 0.1 * 0.5 ** (it // 3)),
    ('lr_policy: "exp" gamma: 0.9', lambda it: 0.1 * f32(0.9) ** it),
    ('lr_policy: "inv" gamma: 0.01 power: 0.75', lambda it: 0.1 * (1 + f32(0.01) * it) ** -0.75),
    ('lr_policy: "poly" power: 2', lambda it: 0.1 * f32(1 - f32(it / 100)) ** 2),  # float32 as Caffe
    ('lr_policy: "sigmoid" gamma: 0.2 stepsize: 10',
     lambda it: 0.1 / (1 + math.exp(-f32(0.2) * (it - 10)))),
])
def test_lr_policy_formulas(text, formula) -> None:
    s = lr_solver(text)
    for it in (0, 1, 2, 3, 7, 10, 33, 99):
        s.iter = it
        assert s.learning_rate() == pytest.approx(formula(it), rel=1e-6), it


def test_lr_policy_multistep_advances_one_step_per_call() -> None:
    s = lr_solver('lr_policy: "multistep" gamma: 0.1 stepvalue: 2 stepvalue: 5 stepvalue: 6')
    rates = []
    for it in range(9):
        s.iter = it
        rates.append(s.learning_rate())
    expected = [0.1, 0.1, 0.01, 0.01, 0.01, 1e-3, 1e-4, 1e-4, 1e-4]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    assert s.current_step == 3
    # Caffe's quirk: current_step is a state moved by one per call, so jumping ahead moves it by one only
    t = lr_solver('lr_policy: "multistep" gamma: 0.1 stepvalue: 2 stepvalue: 5')
    t.iter = 50
    assert t.learning_rate() == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("text, message", [
    ('lr_policy: "cosine"', "unknown learning rate policy"),
    ("", "unknown learning rate policy"),
    ('lr_policy: "step" gamma: 0.1', "stepsize > 0"),
    ('lr_policy: "exp" gamma: -1', "gamma >= 0"),
    ('lr_policy: "fixed" regularization_type: "L3"', "regularization_type"),
    ('lr_policy: "fixed" average_loss: 0', "average_loss"),
])
def test_bad_solver_fields_raise(text, message) -> None:
    with pytest.raises(ModelFormatError, match=message):
        solver_mod.SGDSolver(solver_param("base_lr: 0.1 " + text, linear_net()))


# -- update rules against the hand simulation ----------------------------------------------------------------
RULES = {
    "SGD": ("momentum: 0.9 weight_decay: 0.01", dict(lr=0.1, momentum=0.9, wd=0.01)),
    "Nesterov": ("momentum: 0.9 weight_decay: 0.01", dict(lr=0.1, momentum=0.9, wd=0.01)),
    "AdaGrad": ("weight_decay: 0.01 delta: 1e-6", dict(lr=0.1, wd=0.01, delta=1e-6)),
    "RMSProp": ("weight_decay: 0.01 rms_decay: 0.9 delta: 1e-6", dict(lr=0.1, wd=0.01, rms_decay=0.9,
                                                                      delta=1e-6)),
    "AdaDelta": ("momentum: 0.95 delta: 1e-6 weight_decay: 0.01", dict(lr=1.0, momentum=0.95, delta=1e-6,
                                                                       wd=0.01)),
    "Adam": ("momentum: 0.9 momentum2: 0.99 delta: 1e-8 weight_decay: 0.01",
             dict(lr=0.1, momentum=0.9, momentum2=0.99, delta=1e-8, wd=0.01)),
}


@pytest.mark.parametrize("kind", list(RULES))
def test_update_rule_matches_hand_computation(kind: str) -> None:
    text, kwargs = RULES[kind]
    s = linear_solver(f'type: "{kind}" lr_policy: "fixed" base_lr: {kwargs["lr"]} {text}')
    assert type(s).__name__ == f"{kind}Solver"
    losses = run_steps(s, 6)
    expected, hand_losses, hist = hand_train(kind, 6, **kwargs)
    np.testing.assert_allclose(losses, hand_losses, rtol=1e-5)
    assert_params(s, expected)
    # the history blobs are Caffe's, in Caffe's order (w, b; then the second set for AdaDelta/Adam)
    assert len(s.history) == (4 if kind in ("AdaDelta", "Adam") else 2)
    for ours, ref in zip(s.history, hist):
        np.testing.assert_allclose(ours.numpy(), ref, rtol=2e-5, atol=1e-7)


def test_lr_mult_decay_mult_and_l1() -> None:
    specs = "param { lr_mult: 0.5 decay_mult: 3 } param { lr_mult: 2 decay_mult: 0 }"
    s = linear_solver('lr_policy: "fixed" base_lr: 0.1 momentum: 0.5 weight_decay: 0.05 '
                      'regularization_type: "L1"', specs)
    run_steps(s, 5)
    expected, _, _ = hand_train("SGD", 5, lr=0.1, momentum=0.5, wd=0.05, l1=True, lr_mult=(0.5, 2.0),
                                decay_mult=(3.0, 0.0))
    assert_params(s, expected)


def test_lr_mult_zero_blob_never_changes_and_needs_no_gradient() -> None:
    s = linear_solver('lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.1',
                      "param { lr_mult: 1 } param { lr_mult: 0 }")
    weight, bias = s.net.engine_layers[1].blobs
    assert weight.requires_grad and not bias.requires_grad
    run_steps(s, 3)
    np.testing.assert_array_equal(s.net.params["ip"][1].data, B0)
    # the weight follows SGD with the bias frozen at B0 (hand loop with lr_mult 0 for b)
    expected, _, _ = hand_train("SGD", 3, lr=0.1, momentum=0.9, wd=0.1, lr_mult=(1.0, 0.0))
    assert_params(s, expected)


def test_clip_gradients_scales_to_the_norm() -> None:
    s = linear_solver('lr_policy: "fixed" base_lr: 0.5 clip_gradients: 0.1')
    run_steps(s, 3)
    expected, _, _ = hand_train("SGD", 3, lr=0.5, clip=0.1)
    assert_params(s, expected)


SHARED_NET = """
name: "shared"
layer { name: "in" type: "Input" top: "x" top: "y"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 1 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } param { lr_mult: 0 }
        inner_product_param { num_output: 1 } }
layer { name: "ip_b" type: "InnerProduct" bottom: "x" top: "b" param { name: "w" %s }
        inner_product_param { num_output: 1 bias_term: false } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }
layer { name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "y" top: "loss" }
"""


def test_shared_blob_is_updated_once_with_the_summed_gradient() -> None:
    s = caffe.get_solver(solver_param('lr_policy: "fixed" base_lr: 0.05 weight_decay: 0.01',
                                      SHARED_NET % ""))
    assert [p.name for p in s.learnable] == ["w", "ip_a/1"]
    s.net.blobs["x"].data[...] = X
    s.net.blobs["y"].data[...] = Y
    s.net.params["ip_a"][0].data[...] = W0
    s.net.params["ip_a"][1].data[...] = B0
    assert s.net.engine_layers[2].blobs[0] is s.net.engine_layers[1].blobs[0]
    run_steps(s, 2)
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    for _ in range(2):
        r = 2 * X @ w.T + b - Y
        grad = 2 * (r.T @ X) / 4 + 0.01 * w  # both layers' gradients, one weight decay
        w = w - 0.05 * grad
    np.testing.assert_allclose(s.net.params["ip_b"][0].data, w, rtol=2e-5)
    np.testing.assert_array_equal(s.net.params["ip_a"][1].data, B0)


def test_shared_blob_with_mismatched_lr_mult_is_refused() -> None:
    net = SHARED_NET.replace('param { name: "w" } param { lr_mult: 0 }',
                             'param { name: "w" lr_mult: 1 } param { lr_mult: 0 }') % "lr_mult: 2"
    with pytest.raises(ModelFormatError, match="mismatched lr_mult"):
        caffe.get_solver(solver_param('lr_policy: "fixed" base_lr: 0.05', net))


MEMORY_NET = """
name: "memory"
layer { name: "data" type: "MemoryData" top: "x" top: "y"
        memory_data_param { batch_size: 2 channels: 3 height: 1 width: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""


def test_iter_size_averages_the_accumulated_gradient() -> None:
    s = caffe.get_solver(solver_param('lr_policy: "fixed" base_lr: 0.2 momentum: 0.5 iter_size: 2 '
                                      "weight_decay: 0.01", MEMORY_NET))
    s.net.set_input_arrays(X.reshape(4, 3, 1, 1).copy(), Y.reshape(4).copy())
    s.net.params["ip"][0].data[...] = W0
    s.net.params["ip"][1].data[...] = B0
    s.step(1)
    s.step(1)
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    hw, hb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(2):
        gw, gb, loss = np.zeros_like(w), np.zeros_like(b), 0.0
        for half in (slice(0, 2), slice(2, 4)):  # batches of 2 rows, in order
            r = X[half] @ w.T + b - Y[half]
            gw += r.T @ X[half] / 2
            gb += r.sum(axis=0) / 2
            loss += float((r**2).sum() / 2 / 2)
        gw, gb = gw / 2 + 0.01 * w, gb / 2 + 0.01 * b  # Normalize by iter_size, then Regularize
        hw, hb = 0.5 * hw + 0.2 * gw, 0.5 * hb + 0.2 * gb
        w, b = w - hw, b - hb
    np.testing.assert_allclose(s.net.params["ip"][0].data, w, rtol=2e-5)
    np.testing.assert_allclose(s.net.params["ip"][1].data, b, rtol=2e-5)
    # the reported (smoothed) loss of the last step is the mean over its iter_size passes
    assert float(s.smoothed_loss) == pytest.approx(loss / 2, rel=1e-5)


def test_average_loss_smooths_over_the_last_iterations() -> None:
    s = linear_solver('lr_policy: "fixed" base_lr: 0.05 average_loss: 3')
    s.step(5)
    _, losses, _ = hand_train("SGD", 5, lr=0.05)
    assert float(s.smoothed_loss) == pytest.approx(np.mean(losses[-3:]), rel=1e-5)


# -- solver types -------------------------------------------------------------------------------------------
def test_solver_type_from_type_and_legacy_enum(tmp_path: Path) -> None:
    net = linear_net()
    s = caffe.get_solver(solver_param('lr_policy: "fixed" base_lr: 0.1 solver_type: ADAM', net))
    assert isinstance(s, caffe.AdamSolver) and s.param.type == "Adam"
    with pytest.raises(ModelFormatError, match="both"):
        caffe.get_solver(solver_param('lr_policy: "fixed" solver_type: ADAM type: "Adam"', net))
    with pytest.raises(ModelFormatError, match="unknown solver type 'Momentum'"):
        caffe.get_solver(solver_param('lr_policy: "fixed" type: "Momentum"', net))
    with pytest.raises(ModelFormatError, match="momentum cannot be used with AdaGrad"):
        caffe.get_solver(solver_param('lr_policy: "fixed" type: "AdaGrad" momentum: 0.9', net))
    with pytest.raises(ModelFormatError, match="momentum cannot be used with RMSProp"):
        caffe.get_solver(solver_param('lr_policy: "fixed" type: "RMSProp" momentum: 0.9', net))
    # pycaffe's class constructors use their own rule whatever the file's type says
    (tmp_path / "net.prototxt").write_text(net)
    path = tmp_path / "adam_solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}" type: "Adam" lr_policy: "fixed" base_lr: 0.1 '
                    "momentum: 0.9")
    sgd = caffe.SGDSolver(str(path))
    assert type(sgd) is caffe.SGDSolver and len(sgd.history) == 2
    feed(sgd)
    run_steps(sgd, 3)
    expected, _, _ = hand_train("SGD", 3, lr=0.1, momentum=0.9)
    assert_params(sgd, expected)
    assert isinstance(caffe.get_solver(str(path)), caffe.AdamSolver)


@pytest.mark.parametrize("text, message", [
    ('base_lr: 0.1 lr_policy: "fixed"', "must specify a train net"),
    ('train_net: "a.prototxt" net: "b.prototxt" lr_policy: "fixed"', "more than one"),
])
def test_train_net_fields_are_checked(text, message) -> None:
    with pytest.raises(ModelFormatError, match=message):
        solver_mod.SGDSolver(solver_param(text))


def test_test_iter_needs_test_interval() -> None:
    with pytest.raises(ModelFormatError, match="test_interval"):
        solver_mod.SGDSolver(solver_param('lr_policy: "fixed" test_iter: 2', linear_net()))


# -- nets, test nets, logging --------------------------------------------------------------------------------
TEST_LAYERS = """
layer { name: "in_test" type: "DummyData" top: "x" top: "y" include { phase: TEST }
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 }
                           data_filler { type: "constant" value: 1 }
                           data_filler { type: "constant" value: 0.5 } } }
"""


def test_test_nets_share_the_train_blobs_and_report_means(amct_log) -> None:
    s = linear_solver('lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 max_iter: 4 test_iter: 3 '
                      "test_interval: 2 test_initialization: false test_compute_loss: true display: 2 "
                      "snapshot_after_train: false", test_layers=TEST_LAYERS)
    assert s.net.phase == TRAIN and len(s.test_nets) == 1 and s.test_nets[0].phase == TEST
    assert [layer.name for layer in s.test_nets[0].engine_layers] == ["in_test", "ip", "loss"]
    assert s.test_nets[0].engine_layers[1].blobs[0] is s.net.engine_layers[1].blobs[0]
    assert isinstance(s.test_nets[0], caffe.Net)
    s.solve()
    expected, losses, _ = hand_train("SGD", 4, lr=0.1, momentum=0.9)
    # TEST: x = 1, y = 0.5 for both rows -> loss = 2 r^2 / (2 * 2), r = sum(w) + b - 0.5
    r = float(expected[0].sum() + expected[1][0] - 0.5)
    assert s.test_results[0] == [("loss", pytest.approx(r * r / 2, rel=1e-5))]
    text = amct_log.text
    assert "Iteration 2, Testing net (#0)" in text and "Iteration 4, Testing net (#0)" in text
    assert "Iteration 0, Testing net (#0)" not in text
    value = float(re.findall(r"Test net output #0: loss = (\S+) \(\* 1 = \S+ loss\)", text)[-1])
    assert value == pytest.approx(r * r / 2, rel=1e-5)
    assert float(re.findall(r"Test loss: (\S+)", text)[-1]) == pytest.approx(r * r / 2, rel=1e-5)
    # display: Caffe's lines at iterations 0 and 2, then the final forward's loss at max_iter
    assert "Iteration 0, lr = 0.1" in text and "Iteration 2, lr = 0.1" in text
    assert float(re.search(r"Iteration 0, loss = (\S+)", text).group(1)) == pytest.approx(losses[0], rel=1e-5)
    assert re.search(r"Train net output #0: loss = \S+ \(\* 1 = \S+ loss\)", text)
    assert "Iteration 4, loss = " in text and "Optimization Done." in text


def test_train_net_and_test_net_files_with_states(tmp_path: Path) -> None:
    net = linear_net(test_layers=TEST_LAYERS).replace('include { phase: TEST }',
                                                     'include { phase: TEST stage: "val" }')
    (tmp_path / "train.prototxt").write_text(net)
    (tmp_path / "test.prototxt").write_text(net)
    param = solver_param(f'train_net: "{tmp_path / "train.prototxt"}" '
                         f'test_net: "{tmp_path / "test.prototxt"}" test_state {{ stage: "val" }} '
                         'test_iter: 1 test_interval: 10 lr_policy: "fixed"')
    s = solver_mod.SGDSolver(param)
    assert [layer.name for layer in s.test_nets[0].engine_layers] == ["in_test", "ip", "loss"]
    with pytest.raises(ModelFormatError, match="test_iter must be specified for each test network"):
        param.test_iter.append(1)
        solver_mod.SGDSolver(param)


def test_net_path_relative_to_the_solver_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.prototxt").write_text(linear_net())
    (tmp_path / "models" / "solver.prototxt").write_text('net: "net.prototxt" lr_policy: "fixed"')
    monkeypatch.chdir(tmp_path)
    s = caffe.get_solver("models/solver.prototxt")
    assert s.param.snapshot_prefix == os.path.join("models", "solver")


# -- snapshots and restore -----------------------------------------------------------------------------------
def snapshot_files(tmp_path: Path, extra: str = "") -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (tmp_path / "net.prototxt").write_text(linear_net())
    path = run / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmomentum: 0.9\n'
                    f"max_iter: 5\nsnapshot: 2\n{extra}")
    return path


def test_snapshots_use_the_solver_path_as_default_prefix_and_load(tmp_path: Path) -> None:
    path = snapshot_files(tmp_path)
    s = caffe.get_solver(str(path))
    feed(s)
    s.solve()
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir() if p.name != "solver.prototxt")
    assert names == [f"solver_iter_{n}.{ext}" for n in (2, 4, 5) for ext in ("caffemodel", "solverstate")]
    expected, _, hist = hand_train("SGD", 5, lr=0.1, momentum=0.9)
    loaded = Net(str(tmp_path / "net.prototxt"), TRAIN, weights=str(run / "solver_iter_5.caffemodel"))
    np.testing.assert_allclose(loaded.engine_layers[1].blobs[0].numpy(), expected[0], rtol=2e-5)
    np.testing.assert_allclose(loaded.engine_layers[1].blobs[1].numpy(), expected[1], rtol=2e-5)
    state = caffe_pb2.SolverState()
    state.ParseFromString((run / "solver_iter_5.solverstate").read_bytes())
    assert state.iter == 5 and state.learned_net == str(run / "solver_iter_5.caffemodel")
    assert [tuple(h.shape.dim) for h in state.history] == [(1, 3), (1,)]
    np.testing.assert_allclose(blob_to_array(state.history[0]), hist[0], rtol=2e-5)
    # an earlier snapshot holds the weights of its iteration
    two, _, _ = hand_train("SGD", 2, lr=0.1, momentum=0.9)
    model = load_caffemodel(run / "solver_iter_2.caffemodel")
    np.testing.assert_allclose(blob_to_array(model.layer[1].blobs[0]), two[0], rtol=2e-5)


def test_snapshot_prefix_folder_and_format(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    path = snapshot_files(tmp_path, f'snapshot_prefix: "{tmp_path / "out"}"\nsnapshot_after_train: false\n')
    s = caffe.get_solver(str(path))
    feed(s)
    s.solve()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"solver_iter_{n}.{ext}" for n in (2, 4) for ext in ("caffemodel", "solverstate")]
    h5 = solver_mod.SGDSolver(solver_param('lr_policy: "fixed" snapshot_format: HDF5 snapshot_prefix: "x"',
                                           linear_net()))
    with pytest.raises(UnsupportedLayerError, match="HDF5"):
        h5.snapshot()
    with pytest.raises(ModelFormatError, match="snapshot_prefix"):
        solver_mod.SGDSolver(solver_param('lr_policy: "fixed" snapshot: 2', linear_net()))


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_restore_continues_identically(tmp_path: Path, kind: str, monkeypatch) -> None:
    path = snapshot_files(tmp_path, f'type: "{kind}"\nsnapshot: 0\nsnapshot_prefix: "snap/s"\n')
    monkeypatch.chdir(tmp_path / "run")
    straight = caffe.get_solver(str(path))
    feed(straight)
    losses = run_steps(straight, 6)
    first = caffe.get_solver(str(path))
    feed(first)
    run_steps(first, 3)
    model = first.snapshot()
    assert model == "snap/s_iter_3.caffemodel"
    # a solverstate names its caffemodel as written; it is also found beside the state from elsewhere
    monkeypatch.chdir(tmp_path)
    resumed = caffe.get_solver(str(path))
    feed(resumed, w=np.zeros_like(W0), b=np.zeros_like(B0))
    resumed.restore(str(tmp_path / "run" / "snap" / "s_iter_3.solverstate"))
    assert resumed.iter == 3
    np.testing.assert_array_equal(resumed.net.params["ip"][0].data, first.net.params["ip"][0].data)
    assert run_steps(resumed, 3) == pytest.approx(losses[3:], rel=1e-6)
    np.testing.assert_allclose(resumed.net.params["ip"][0].data, straight.net.params["ip"][0].data,
                               rtol=1e-6)
    other = "Adam" if kind == "SGD" else "SGD"
    wrong = caffe.get_solver(solver_param(f'type: "{other}" lr_policy: "fixed"', linear_net()))
    with pytest.raises(ModelFormatError, match="history"):
        wrong.restore(str(tmp_path / "run" / "snap" / "s_iter_3.solverstate"))


# -- the retrain layers under the solver ---------------------------------------------------------------------
QAT_NET = """
name: "qat"
layer { name: "in" type: "Input" top: "x" top: "y"
        input_param { shape { dim: 4 dim: 3 dim: 1 dim: 1 } shape { dim: 4 dim: 1 dim: 1 dim: 1 } } }
layer { name: "conv_wts_retrain" type: "WeightQAT" bottom: "x" top: "x"
        param { name: "conv_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
        retrain_weight_quant_param { layer_type: "Convolution" cout: 1 cin: 3 h: 1 w: 1
                                     channel_wise: false } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
        param { name: "conv_wts_retrain_w" lr_mult: 0 decay_mult: 0 }
        convolution_param { num_output: 1 kernel_size: 1 bias_term: false } }
layer { name: "loss" type: "EuclideanLoss" bottom: "c" bottom: "y" top: "loss" }
"""


def test_weight_qat_shadow_is_trained_through_the_straight_through_gradient() -> None:
    s = caffe.get_solver(solver_param('lr_policy: "fixed" base_lr: 0.1', QAT_NET))
    s.net.blobs["x"].data[...] = X.reshape(4, 3, 1, 1)
    s.net.blobs["y"].data[...] = Y.reshape(4, 1, 1, 1)
    shadow0 = W0.reshape(1, 3, 1, 1)
    s.net.params["conv_wts_retrain"][1].data[...] = shadow0
    seen = []
    s.add_callback(on_gradients_ready=lambda: seen.append(s.net.params["conv"][0].data.copy()))
    s.step(1)
    w_hat = seen[0].reshape(1, 3)  # the fake-quantized weight the forward used
    assert not np.array_equal(w_hat, W0)  # quantized (int8 grid), not the shadow itself
    np.testing.assert_array_equal(s.net.params["conv"][0].data.reshape(1, 3), w_hat)  # lr_mult 0: untouched
    r = X.astype(np.float64) @ w_hat.T.astype(np.float64) - Y
    expected = W0 - 0.1 * (r.T @ X) / 4
    np.testing.assert_allclose(s.net.params["conv_wts_retrain"][1].data.reshape(1, 3), expected, rtol=1e-5)


# -- facade Net: backward, set_input_arrays ------------------------------------------------------------------
def test_facade_backward_fills_param_diffs(tmp_path: Path) -> None:
    path = tmp_path / "net.prototxt"
    path.write_text(linear_net())
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["x"].data[...] = X
    net.blobs["y"].data[...] = Y
    net.params["ip"][0].data[...] = W0
    net.params["ip"][1].data[...] = B0
    net.forward()
    out = net.backward()
    assert set(out) == {"x", "y"}
    r = X.astype(np.float64) @ W0.T + B0 - Y
    np.testing.assert_allclose(net.params["ip"][0].diff, r.T @ X / 4, rtol=1e-5)
    np.testing.assert_allclose(net.params["ip"][1].diff, r.sum(axis=0) / 4, rtol=1e-5)
    with pytest.raises(RuntimeEngineError, match="first layer is a MemoryDataLayer"):
        net.set_input_arrays(X.reshape(4, 3, 1, 1), Y.reshape(4))


def test_facade_set_input_arrays_feeds_memory_data() -> None:
    net_param = text_format.Merge(MEMORY_NET, caffe_pb2.NetParameter())
    net = caffe.Net(net_param, caffe.TEST)
    net.set_input_arrays(X.reshape(4, 3, 1, 1).copy(), Y.reshape(4).copy())
    net.forward()
    np.testing.assert_array_equal(net.blobs["x"].data.reshape(2, 3), X[:2])
    net.forward()
    np.testing.assert_array_equal(net.blobs["y"].data.reshape(2), Y[2:, 0])


def test_amct_device_mode_functions() -> None:
    from amct_caffe import amct
    from amct_caffe.engine.device import current_device

    assert "set_cpu_mode" in amct.__all__ and "set_gpu_mode" in amct.__all__
    amct.set_cpu_mode()
    assert current_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeEngineError, match="CUDA"):
            amct.set_gpu_mode()
        assert current_device() == torch.device("cpu")


# -- training against the real Caffe -------------------------------------------------------------------------
ITERS = 20

CROSS_NET = """name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
        hdf5_data_param { source: "%(train)s" batch_size: 4 } }
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
        hdf5_data_param { source: "%(test)s" batch_size: 4 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1.5 decay_mult: 2 }
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
        param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
        param { lr_mult: 0 decay_mult: 0 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" param { lr_mult: 1 decay_mult: 1 }
        param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
"""

CROSS_SOLVERS = {
    "sgd": 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "step" stepsize: 7 gamma: 0.5',
    "nesterov": 'type: "Nesterov" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed"',
    "adam": 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 delta: 1e-8 lr_policy: "fixed"',
}

REFERENCE_SCRIPT = textwrap.dedent("""
    import sys
    import caffe
    caffe.set_mode_cpu()
    start, iters = sys.argv[1], int(sys.argv[2])
    for solver_path in sys.argv[3:]:
        solver = caffe.get_solver(solver_path)
        solver.net.copy_from(start)
        for i in range(iters):
            solver.step(1)
            print("LOSS", solver_path, repr(float(solver.net.blobs["loss"].data)))
        solver.net.save(solver_path + ".final.caffemodel")
        out = solver.test_nets[0].forward()
        print("TEST", solver_path, repr(float(out["loss"])), repr(float(out["acc"])))
""")


@pytest.fixture(scope="module")
def cross_check(tmp_path_factory) -> dict:
    """The data, start weights and solvers of the cross-check, and the reference Caffe's results."""
    py = reference_python()
    if py is None:
        pytest.skip("reference Caffe not installed (set AMCT_REF_CAFFE_PYTHON or run scripts/test.sh)")
    h5py = pytest.importorskip("h5py")
    root = tmp_path_factory.mktemp("cross")
    rng = np.random.default_rng(7)
    lists = {}
    for name, rows in (("train", 16), ("test", 8)):
        with h5py.File(root / f"{name}.h5", "w") as f:
            f["data"] = rng.standard_normal((rows, 2, 6, 6)).astype(np.float32)
            f["label"] = rng.integers(0, 3, rows).astype(np.float32)
        lists[name] = root / f"{name}_list.txt"
        lists[name].write_text(f"{root / f'{name}.h5'}\n")
    net_text = CROSS_NET % {"train": lists["train"], "test": lists["test"]}
    caffe.set_random_seed(3)
    start = root / "start.caffemodel"
    Net(text_format.Merge(net_text, caffe_pb2.NetParameter()), TRAIN).save(start)
    solvers = {}
    for kind, text in CROSS_SOLVERS.items():
        # net_param inline: the reference fork's BatchNorm does not mask its statistics from the solver
        # (BVLC's does); its file upgrade would also drop the explicit lr_mult: 0 params, so the statistics
        # would be weight-decayed there. Inline nets are not upgraded, so both keep lr_mult: 0.
        path = root / f"solver_{kind}.prototxt"
        path.write_text(f"net_param {{\n{net_text}}}\n{text}\nweight_decay: 0.005\ntest_iter: 2\n"
                        "test_interval: 10\ntest_initialization: false\nmax_iter: 20\n")
        solvers[kind] = path
    script = root / "ref_train.py"
    script.write_text(REFERENCE_SCRIPT)
    env = dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([py, str(script), str(start), str(ITERS), *map(str, solvers.values())],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref: dict[str, dict] = {str(p): {"losses": []} for p in solvers.values()}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOSS":
            ref[fields[1]]["losses"].append(float(fields[2]))
        elif fields and fields[0] == "TEST":
            ref[fields[1]]["test"] = (float(fields[2]), float(fields[3]))
    return {"start": start, "solvers": solvers, "ref": ref}


@pytest.mark.parametrize("kind", list(CROSS_SOLVERS))
def test_training_matches_reference_caffe(cross_check: dict, kind: str) -> None:
    path = cross_check["solvers"][kind]
    ref = cross_check["ref"][str(path)]
    s = caffe.get_solver(str(path))
    s.net.copy_from(str(cross_check["start"]))
    losses = np.array(run_steps(s, ITERS))
    expected = np.array(ref["losses"])
    assert len(expected) == ITERS
    np.testing.assert_array_less(np.abs(losses - expected), 1e-4 * np.abs(expected), err_msg="losses")
    final = load_caffemodel(f"{path}.final.caffemodel")
    ours = s.net.params
    compared = 0
    for layer in final.layer:
        for i, blob in enumerate(layer.blobs):
            theirs = blob_to_array(blob)
            mine = ours[layer.name][i].data.reshape(theirs.shape)
            scale = float(np.max(np.abs(theirs)))
            assert np.max(np.abs(mine - theirs)) <= 1e-4 * scale + 1e-7, f"{layer.name}/{i}"
            compared += 1
    assert compared == 8  # conv1, bn1 x3, scale1 x2, fc x2
    # the test net (TEST phase, BatchNorm on the trained statistics) shares the trained weights
    out = s.test_nets[0].forward()
    assert float(out["loss"]) == pytest.approx(ref["test"][0], rel=1e-4)
    assert float(out["acc"]) == pytest.approx(ref["test"][1], abs=1e-6)


def test_logger_name() -> None:
    assert solver_mod.LOGGER.name == "amct_caffe.engine.solver"
    assert logging.getLogger("amct_caffe.engine.solver") is solver_mod.LOGGER


# -- retrain (QAT) nets: record shapes and clip initialisation ----------------------------------------------
def retrain_net(record: Path) -> str:
    return f"""
name: "qat"
layer {{ name: "in" type: "Input" top: "data" top: "label"
        input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 5 }} shape {{ dim: 2 }} }} }}
layer {{ name: "fc_act_retrain" type: "ActivationQAT" bottom: "data" top: "fc_act_retrain"
        retrain_data_quant_param {{ ifmr_init: true object_layer: "fc" record_file_path: "{record}" }}
        param {{ lr_mult: 1 decay_mult: 0 }} param {{ lr_mult: 1 decay_mult: 0 }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "fc_act_retrain" top: "fc"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
"""


def feed_retrain(net: caffe.Net, scale: float, seed: int) -> None:
    net.blobs["data"].data[...] = np.random.RandomState(seed).randn(2, 3, 4, 5).astype(np.float32) * scale
    net.blobs["label"].data[...] = np.array([1.0, 3.0], np.float32)


def clip_values(net: Net) -> tuple[float, float]:
    layer = net.engine_layers[net.layer_index("fc_act_retrain")]
    return float(layer.blobs[0].detach()), float(layer.blobs[1].detach())


def test_solver_writes_the_record_shapes_of_retrain_layers(tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    record.write_text('record { key: "fc" value { scale_d: 0.5 offset_d: -3 } }\n')
    before = record.read_text()
    # a net built and run by itself writes nothing (the workflows' shape inference, caffe.Net)
    alone = caffe.Net(text_format.Merge(retrain_net(record), caffe_pb2.NetParameter()), caffe.TRAIN)
    feed_retrain(alone, 1.0, 0)
    alone.forward()
    assert record.read_text() == before
    s = caffe.get_solver(solver_param('lr_policy: "fixed" base_lr: 0.01 max_iter: 2 test_iter: 1 '
                                      "test_interval: 2 snapshot_after_train: false", retrain_net(record)))
    assert record.read_text() == before  # building the solver writes nothing either
    feed_retrain(s.net, 1.0, 0)
    feed_retrain(s.test_nets[0], 1.0, 1)
    s.solve()
    msg = text_format.Parse(record.read_text(), amct_pb2.ScaleOffsetRecord())
    assert [entry.key for entry in msg.record] == ["fc"]
    fc = msg.record[0].value
    # the input of the quantized layer is the (2, 3, 4, 5) data blob; the other fields are kept
    assert (fc.channels, fc.height, fc.width, fc.scale_d, fc.offset_d) == (3, 4, 5, 0.5, -3)


def test_a_test_net_and_the_train_net_initialise_shared_clips_once(tmp_path: Path) -> None:
    s = caffe.get_solver(solver_param('lr_policy: "fixed" base_lr: 0 max_iter: 1 test_iter: 1 '
                                      "test_interval: 1 test_initialization: true "
                                      "snapshot_after_train: false",
                                      retrain_net(tmp_path / "record.txt")))
    train_layer = s.net.engine_layers[s.net.layer_index("fc_act_retrain")]
    assert not train_layer.clips_ready
    feed_retrain(s.net, 4.0, 0)
    feed_retrain(s.test_nets[0], 0.5, 1)
    s.step(1)  # the test at iteration 0 runs first and initialises the clips by IFMR on its batch
    after = clip_values(s.net)
    assert clip_values(s.test_nets[0]) == after and train_layer.clips_ready
    # the train forward that followed did not initialise them again on its own (8x wider) batch
    fresh = Net(text_format.Merge(retrain_net(tmp_path / "other.txt"), caffe_pb2.NetParameter()), TRAIN)
    fresh.set_tensor("data", torch.from_numpy(np.asarray(s.net.blobs["data"].data).copy()))
    fresh.run()
    assert clip_values(fresh)[0] > 2 * after[0]
    s.step(1)
    assert clip_values(s.net) == after


def test_policy_and_rule_tables_name_caffes_types() -> None:
    # BVLC Caffe's lr_policy strings and registered solver types (solver.cpp / solvers/*.cpp)
    assert set(solver_mod.LR_POLICIES) == {"fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"}
    caffe_types = {"SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"}
    assert set(solver_mod.UPDATE_RULES) == set(solver_mod.SOLVERS) == caffe_types
    # AdaDelta and Adam keep two history blobs per learnable blob in Caffe's solverstate
    assert {name for name, rule in solver_mod.UPDATE_RULES.items() if rule.history_sets == 2} == {"AdaDelta",
                                                                                                 "Adam"}
