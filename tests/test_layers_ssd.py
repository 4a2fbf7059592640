"""Caffe-SSD layers (Permute, Normalize, PriorBox, DetectionOutput) against numpy references written here
from Caffe-SSD's semantics, and against the reference Caffe fork where it agrees with Caffe-SSD."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers import layer_class
from amct_caffe.engine.layers.base import TEST, TRAIN
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.model.blobs import blob_to_array
from amct_caffe.model.io import save_caffemodel
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close
from tests.references.real_caffe import run_reference

FLT_MAX = float(np.finfo(np.float32).max)


# -- helpers ------------------------------------------------------------------------------------------
def _param(text: str) -> caffe_pb2.NetParameter:
    return text_format.Merge(text, caffe_pb2.NetParameter())


def _input(name: str, shape: tuple[int, ...]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def _run(text: str, inputs: dict[str, np.ndarray], phase: int = TEST) -> Net:
    net = Net(_param(text), phase)
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    return net


def _layer(text: str, bottoms: list[torch.Tensor], phase: int = TEST):
    """One layer built from its LayerParameter text and set up on ``bottoms``."""
    lp = text_format.Merge(text, caffe_pb2.LayerParameter())
    layer = layer_class(lp.type)(lp, phase, torch.device("cpu"))
    layer.setup(bottoms)
    return layer


# -- Permute ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("order", "axes"),
    [([0, 2, 3, 1], (0, 2, 3, 1)), ([0, 2], (0, 2, 1, 3)), ([3], (3, 0, 1, 2)), ([], (0, 1, 2, 3))],
)
def test_permute_matches_numpy_transpose(order: list[int], axes: tuple[int, ...]) -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    orders = " ".join(f"order: {o}" for o in order)
    text = _input("x", x.shape) + (
        f'layer {{ name: "p" type: "Permute" bottom: "x" top: "y" permute_param {{ {orders} }} }}'
    )
    y = _run(text, {"x": x}).tensor("y").numpy()
    np.testing.assert_array_equal(y, np.transpose(x, axes))
    assert y.flags["C_CONTIGUOUS"]


def test_permute_gradient_is_the_inverse_permutation() -> None:
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    layer = _layer('name: "p" type: "Permute" bottom: "x" top: "y" permute_param { order: 0 order: 2 '
                   "order: 3 order: 1 }", [x.detach()], TRAIN)
    g = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
    (layer.forward([x])[0] * torch.from_numpy(g)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.transpose(g, (0, 3, 1, 2)))


@pytest.mark.parametrize("orders", ["order: 0 order: 0", "order: 4", "order: 1 order: 2 order: 1"])
def test_permute_rejects_bad_orders(orders: str) -> None:
    text = _input("x", (1, 2, 3, 4)) + (
        f'layer {{ name: "p" type: "Permute" bottom: "x" top: "y" permute_param {{ {orders} }} }}'
    )
    with pytest.raises(ModelFormatError, match="'p'"):
        Net(_param(text))


# -- Normalize ----------------------------------------------------------------------------------------
def _normalize_numpy(x: np.ndarray, scale: np.ndarray, across: bool, eps: float) -> np.ndarray:
    """y = x / sqrt(sum x^2 + eps) * scale, summing per sample or per position over channels (loops)."""
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1).astype(np.float64)
    y = np.empty_like(xs)
    for i in range(n):
        if across:
            y[i] = xs[i] / math.sqrt(float((xs[i] ** 2).sum()) + eps)
        else:
            for s in range(xs.shape[2]):
                y[i, :, s] = xs[i, :, s] / math.sqrt(float((xs[i, :, s] ** 2).sum()) + eps)
    scale = np.broadcast_to(scale.reshape(-1), (c,)) if scale.size == 1 else scale
    return (y * scale.reshape(1, c, 1)).reshape(x.shape)


def _normalize_caffe_backward(x, scale, dy, across, eps):
    """Caffe-SSD NormalizeLayer::Backward_cpu written out with loops (bottom diff, scale diff)."""
    n, c = x.shape[:2]
    xs, g = x.reshape(n, c, -1).astype(np.float64), dy.reshape(n, c, -1).astype(np.float64)
    scale_c = np.broadcast_to(scale.reshape(-1), (c,)) if scale.size == 1 else scale.astype(np.float64)
    dx = np.empty_like(xs)
    dscale = np.zeros(c)
    for i in range(n):
        if across:
            norm = math.sqrt(float((xs[i] ** 2).sum()) + eps)
            a = float((xs[i] * g[i]).sum())
            dx[i] = (g[i] - xs[i] * a / norm / norm) / norm
            top = xs[i] / norm
        else:
            top = np.empty_like(xs[i])
            for s in range(xs.shape[2]):
                norm = math.sqrt(float((xs[i, :, s] ** 2).sum()) + eps)
                a = float((xs[i, :, s] * g[i, :, s]).sum())
                dx[i, :, s] = (g[i, :, s] - xs[i, :, s] * a / norm**2) / norm
                top[:, s] = xs[i, :, s] / norm
        dx[i] *= scale_c[:, None]
        dscale += ((top * scale_c[:, None]) * g[i]).sum(axis=1) / scale_c
    if scale.size == 1:
        dscale = np.array(dscale.sum())
    return dx.reshape(x.shape), dscale


@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_normalize_forward_and_caffe_backward(across: bool, shared: bool) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    text = (f'name: "n" type: "Normalize" bottom: "x" top: "y" norm_param {{ '
            f"across_spatial: {str(across).lower()} channel_shared: {str(shared).lower()} eps: 1e-6 }}")
    layer = _layer(text, [torch.zeros(2, 3, 4, 5)], TRAIN)
    assert layer.blob_shapes() == ([()] if shared else [(3,)])
    np.testing.assert_array_equal(layer.blobs[0].numpy(), np.ones(() if shared else (3,), np.float32))
    scale = np.array(2.5, np.float32) if shared else np.array([0.5, 20.0, -3.0], np.float32)
    layer.blobs[0] = torch.from_numpy(scale).requires_grad_(True)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer.forward([xt])[0]
    expected = _normalize_numpy(x, scale, across, 1e-6)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    dy = rng.normal(size=x.shape).astype(np.float32)
    (y * torch.from_numpy(dy)).sum().backward()
    dx, dscale = _normalize_caffe_backward(x, scale, dy, across, 1e-6)
    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), dscale, rtol=1e-4, atol=1e-5)


def test_normalize_2d_bottom_and_default_eps() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    layer = _layer('name: "n" type: "Normalize" bottom: "x" top: "y" '
                   'norm_param { scale_filler { type: "constant" value: 10 } }', [torch.zeros(2, 2)])
    y = layer.forward([torch.from_numpy(x)])[0].numpy()
    # 3/5*10, 4/5*10; zeros stay 0 (norm = sqrt(1e-10))
    np.testing.assert_allclose(y, [[6.0, 8.0], [0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 4, 5)])
def test_normalize_rejects_bad_axes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelFormatError, match="2 to 4 axes"):
        _layer('name: "n" type: "Normalize" bottom: "x" top: "y"', [torch.zeros(shape)])


# -- PriorBox -----------------------------------------------------------------------------------------
def _priorbox_numpy(fh, fw, img_h, img_w, min_sizes, max_sizes, ratios, flip, clip, variance,
                    step=None, offset=0.5) -> np.ndarray:
    """Caffe-SSD PriorBoxLayer::Forward_cpu with loops (sizes truncated to int as Caffe-SSD does)."""
    ars = [1.0]
    for ar in ratios:
        if any(abs(ar - r) < 1e-6 for r in ars):
            continue
        ars.append(ar)
        if flip:
            ars.append(1.0 / ar)
    step_h, step_w = (step, step) if step else (img_h / fh, img_w / fw)
    boxes = []
    for h in range(fh):
        for w in range(fw):
            cx, cy = (w + offset) * step_w, (h + offset) * step_h
            for s, mn in enumerate(min_sizes):
                mn = int(mn)
                sizes = [(mn, mn)]
                if max_sizes:
                    side = math.sqrt(mn * int(max_sizes[s]))
                    sizes.append((side, side))
                sizes += [(mn * math.sqrt(ar), mn / math.sqrt(ar)) for ar in ars if abs(ar - 1) >= 1e-6]
                for bw, bh in sizes:
                    boxes += [(cx - bw / 2) / img_w, (cy - bh / 2) / img_h, (cx + bw / 2) / img_w,
                              (cy + bh / 2) / img_h]
    boxes = np.array(boxes)
    if clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    var = np.tile(np.array(variance if len(variance) == 4 else variance * 4), len(boxes) // 4)
    return np.stack([boxes, var])[None]


def _priorbox_net(fh: int, fw: int, img: tuple[int, int], params: str) -> str:
    return (_input("data", (1, 3) + img) + _input("feat", (1, 2, fh, fw))
            + f'layer {{ name: "pb" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb" '
              f"prior_box_param {{ {params} }} }}")


def test_priorbox_hand_case_2x2() -> None:
    # 2x2 map on a 100x100 image: step 50, centres 25/75; priors per cell: 30x30, sqrt(30*60) square,
    # ar 2 (30*sqrt2 x 30/sqrt2), ar 1/2 (flipped).
    text = _priorbox_net(2, 2, (100, 100), "min_size: 30 max_size: 60 aspect_ratio: 2 flip: true "
                                           "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2")
    top = _run(text, {}).tensor("pb").numpy()
    assert top.shape == (1, 2, 2 * 2 * 4 * 4)
    r2, side = math.sqrt(2.0), math.sqrt(1800.0)
    first_cell = np.array([
        [0.10, 0.10, 0.40, 0.40],
        [0.25 - side / 200, 0.25 - side / 200, 0.25 + side / 200, 0.25 + side / 200],
        [0.25 - 0.15 * r2, 0.25 - 0.15 / r2, 0.25 + 0.15 * r2, 0.25 + 0.15 / r2],
        [0.25 - 0.15 / r2, 0.25 - 0.15 * r2, 0.25 + 0.15 / r2, 0.25 + 0.15 * r2],
    ])
    np.testing.assert_allclose(top[0, 0, :16].reshape(4, 4), first_cell, atol=1e-6)
    # second cell is (h=0, w=1): shifted by 0.5 in x only
    np.testing.assert_allclose(top[0, 0, 16:32].reshape(4, 4), first_cell + [0.5, 0, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(top[0, 1].reshape(-1, 4), np.tile([0.1, 0.1, 0.2, 0.2], (16, 1)), atol=1e-7)
    expected = _priorbox_numpy(2, 2, 100, 100, [30], [60], [2.0], True, False, [0.1, 0.1, 0.2, 0.2])
    np.testing.assert_allclose(top, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("params", "kwargs"),
    [
        # Caffe-SSD truncates min/max sizes to int: 30.9 -> 30, 60.7 -> 60
        ("min_size: 30.9 max_size: 60.7 aspect_ratio: 3", dict(min_sizes=[30], max_sizes=[60], ratios=[3.0])),
        ("min_size: 40 aspect_ratio: 2 flip: false clip: true variance: 0.2",
         dict(min_sizes=[40], ratios=[2.0], flip=False, clip=True, variance=[0.2])),
        ("min_size: 16 min_size: 32 flip: false step: 8 offset: 0.25",
         dict(min_sizes=[16, 32], flip=False, step=8.0, offset=0.25)),
        # duplicates: 1 is always there, 2 twice, 0.5 already added as flipped 2
        ("min_size: 20 aspect_ratio: 1 aspect_ratio: 2 aspect_ratio: 2 aspect_ratio: 0.5",
         dict(min_sizes=[20], ratios=[2.0])),
        ("min_size: 20 img_size: 64 step: 10", dict(min_sizes=[20], img=(64, 64), step=10.0)),
    ],
)
def test_priorbox_variants_match_numpy(params: str, kwargs: dict) -> None:
    kw = dict(max_sizes=[], ratios=[], flip=True, clip=False, variance=[0.1], step=None, offset=0.5)
    kw.update(kwargs)
    img = kw.pop("img", (90, 120))
    top = _run(_priorbox_net(3, 4, (90, 120), params), {}).tensor("pb").numpy()
    expected = _priorbox_numpy(3, 4, img[0], img[1], **kw)
    assert top.shape == expected.shape
    np.testing.assert_allclose(top, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("aspect_ratio: 2", "min_size"),
        ("min_size: 30 max_size: 20", "greater"),
        ("min_size: 30 max_size: 40 max_size: 50", "max_size"),
        ("min_size: 30 variance: 0.1 variance: 0.2", "variance"),
        ("min_size: 30 img_size: 100 img_h: 100 img_w: 100", "img_size"),
        ("min_size: 30 step: 8 step_h: 8", "step"),
        ("min_size: 30 img_h: 100", "img_h"),
    ],
)
def test_priorbox_rejects_bad_params(params: str, message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        Net(_param(_priorbox_net(2, 2, (100, 100), params)))


# -- DetectionOutput ----------------------------------------------------------------------------------
def _detection_numpy(loc, conf, prior, num_classes, share=True, bg=0, code="CENTER_SIZE", vet=False,
                     nms_thr=0.3, top_k=-1, eta=1.0, keep_top_k=-1, conf_thr=-FLT_MAX) -> np.ndarray:
    """Caffe-SSD DetectionOutputLayer::Forward_cpu with loops, in double precision."""
    n = loc.shape[0]
    num_priors = prior.shape[2] // 4
    loc_classes = 1 if share else num_classes
    pri = prior[0, 0].reshape(num_priors, 4).astype(np.float64)
    var = prior[0, 1].reshape(num_priors, 4).astype(np.float64)
    locs = loc.reshape(n, num_priors, loc_classes, 4).astype(np.float64)
    scores = conf.reshape(n, num_priors, num_classes)

    def decode(p, v, l):
        if vet:
            v = [1.0, 1.0, 1.0, 1.0]
        if code == "CORNER":
            return [p[0] + v[0] * l[0], p[1] + v[1] * l[1], p[2] + v[2] * l[2], p[3] + v[3] * l[3]]
        pw, ph = p[2] - p[0], p[3] - p[1]
        if code == "CORNER_SIZE":
            return [p[0] + v[0] * l[0] * pw, p[1] + v[1] * l[1] * ph, p[2] + v[2] * l[2] * pw,
                    p[3] + v[3] * l[3] * ph]
        cx, cy = v[0] * l[0] * pw + (p[0] + p[2]) / 2, v[1] * l[1] * ph + (p[1] + p[3]) / 2
        w, h = math.exp(v[2] * l[2]) * pw, math.exp(v[3] * l[3]) * ph
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    def size(b):
        return 0.0 if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])

    def jaccard(a, b):
        if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
            return 0.0
        iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
        if iw > 0 and ih > 0:
            return iw * ih / (size(a) + size(b) - iw * ih)
        return 0.0

    rows = []
    for i in range(n):
        boxes = [[decode(pri[p], var[p], locs[i, p, c]) for p in range(num_priors)]
                 for c in range(loc_classes)]
        kept_per_class = {}
        for c in range(num_classes):
            if c == bg:
                continue
            b = boxes[0 if share else c]
            cands = sorted((p for p in range(num_priors) if scores[i, p, c] > conf_thr),
                           key=lambda p, c=c: -scores[i, p, c])
            if top_k > -1:
                cands = cands[:top_k]
            kept, thr = [], nms_thr
            for p in cands:
                if all(jaccard(b[p], b[k]) <= thr for k in kept):
                    kept.append(p)
                    if eta < 1 and thr > 0.5:
                        thr *= eta
            kept_per_class[c] = kept
        total = sum(len(v) for v in kept_per_class.values())
        if -1 < keep_top_k < total:
            best = sorted(((scores[i, p, c], c, p) for c, ps in kept_per_class.items() for p in ps),
                          key=lambda t: -t[0])[:keep_top_k]
            kept_per_class = {}
            for _, c, p in best:
                kept_per_class.setdefault(c, []).append(p)
        for c in sorted(kept_per_class):
            for p in kept_per_class[c]:
                rows.append([i, c, scores[i, p, c]] + boxes[0 if share else c][p])
    if not rows:
        rows = [[i, -1, -1, -1, -1, -1, -1] for i in range(n)]
    return np.array(rows, dtype=np.float64).reshape(1, 1, -1, 7)


def _detection_inputs(n: int, num_priors: int, num_classes: int, loc_classes: int, seed: int):
    """Overlapping priors (so NMS has work), softmax confidences and small location offsets."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.3, 0.7, size=(num_priors, 2))
    half = rng.uniform(0.05, 0.2, size=(num_priors, 2))
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    var = np.tile([0.1, 0.1, 0.2, 0.2], (num_priors, 1))
    prior = np.stack([boxes.reshape(-1), var.reshape(-1)])[None].astype(np.float32)
    logits = rng.normal(size=(n, num_priors, num_classes)) * 2.5
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    loc = rng.normal(size=(n, num_priors * loc_classes * 4)) * 0.5
    return loc.astype(np.float32), conf.reshape(n, -1).astype(np.float32), prior


def _detection_layers(params: dict[str, str], num_classes: int, loc: str = "loc") -> str:
    return "".join(
        f'layer {{ name: "{name}" type: "DetectionOutput" bottom: "{loc}" bottom: "conf" bottom: "prior" '
        f'top: "{name}" detection_output_param {{ num_classes: {num_classes} {p} }} }}\n'
        for name, p in params.items()
    )


def _detection_net(n: int, num_priors: int, num_classes: int, loc_classes: int,
                   params: dict[str, str]) -> str:
    text = (_input("loc", (n, num_priors * loc_classes * 4)) + _input("conf", (n, num_priors * num_classes))
            + _input("prior", (1, 2, num_priors * 4)))
    return text + _detection_layers(params, num_classes)


DETECTION_CASES = {
    # name: (prototxt params, numpy-reference kwargs, share_location)
    "center_size": (
        "nms_param { nms_threshold: 0.45 top_k: 20 } code_type: CENTER_SIZE keep_top_k: 25 "
        "confidence_threshold: 0.25",
        dict(nms_thr=0.45, top_k=20, keep_top_k=25, conf_thr=0.25), True),
    "corner": (
        "background_label_id: 1 nms_param { nms_threshold: 0.5 } code_type: CORNER confidence_threshold: 0.3",
        dict(bg=1, code="CORNER", nms_thr=0.5, conf_thr=0.3), True),
    "corner_size": (
        "nms_param { nms_threshold: 0.3 top_k: 30 } code_type: CORNER_SIZE confidence_threshold: 0.2",
        dict(code="CORNER_SIZE", nms_thr=0.3, top_k=30, conf_thr=0.2), True),
    "adaptive_eta": (
        "nms_param { nms_threshold: 0.8 eta: 0.9 } code_type: CENTER_SIZE confidence_threshold: 0.2",
        dict(nms_thr=0.8, eta=0.9, conf_thr=0.2), True),
    "variance_in_target": (
        "nms_param { nms_threshold: 0.45 } code_type: CENTER_SIZE variance_encoded_in_target: true "
        "confidence_threshold: 0.3",
        dict(nms_thr=0.45, vet=True, conf_thr=0.3), True),
    "per_class_loc": (
        "share_location: false nms_param { nms_threshold: 0.45 top_k: 40 } code_type: CENTER_SIZE "
        "keep_top_k: 30 confidence_threshold: 0.2",
        dict(share=False, nms_thr=0.45, top_k=40, keep_top_k=30, conf_thr=0.2), False),
    # no nms_param: Caffe-SSD still runs NMS with the default threshold 0.3
    "default_nms": ("code_type: CENTER_SIZE confidence_threshold: 0.5", dict(conf_thr=0.5), True),
    "no_threshold": (
        "nms_param { nms_threshold: 0.45 top_k: 10 } code_type: CENTER_SIZE",
        dict(nms_thr=0.45, top_k=10), True),
}


@pytest.mark.parametrize("case", sorted(DETECTION_CASES))
def test_detection_output_matches_numpy(case: str) -> None:
    params, kwargs, share = DETECTION_CASES[case]
    n, num_priors, num_classes = 2, 48, 4
    loc_classes = 1 if share else num_classes
    loc, conf, prior = _detection_inputs(n, num_priors, num_classes, loc_classes, seed=3)
    net = _run(_detection_net(n, num_priors, num_classes, loc_classes, {"det": params}),
               {"loc": loc, "conf": conf, "prior": prior})
    ours = net.tensor("det").numpy()
    expected = _detection_numpy(loc, conf, prior, num_classes, **kwargs)
    assert ours.shape == expected.shape
    assert len(np.unique(ours[0, 0, :, 0])) == n  # detections in both images
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", ["confidence_threshold: 1.0", "nms_param { top_k: 0 }", "keep_top_k: 0"])
def test_detection_output_without_detections_writes_minus_one_rows(params: str) -> None:
    n, num_priors, num_classes = 3, 10, 3
    loc, conf, prior = _detection_inputs(n, num_priors, num_classes, 1, seed=0)
    net = _run(_detection_net(n, num_priors, num_classes, 1, {"det": params}),
               {"loc": loc, "conf": conf, "prior": prior})
    expected = np.array([[i, -1, -1, -1, -1, -1, -1] for i in range(n)], dtype=np.float32)
    np.testing.assert_array_equal(net.tensor("det").numpy(), expected.reshape(1, 1, n, 7))


def test_detection_output_suppresses_overlapping_boxes_by_hand() -> None:
    # Three CORNER priors, zero offsets: boxes A=[0,0,.5,.5], B=[0,0,.5,.6] (IoU(A,B)=.25/.3=0.833),
    # C=[.6,.6,1,1]. Class 1 scores .9 (B), .8 (A), .7 (C): NMS 0.5 drops A; keep_top_k 1 keeps B only.
    prior = np.array([[[0, 0, .5, .5, 0, 0, .5, .6, .6, .6, 1, 1], [.1] * 12]], dtype=np.float32)
    conf = np.array([[.2, .8, .1, .9, .3, .7]], dtype=np.float32)
    loc = np.zeros((1, 12), dtype=np.float32)
    params = {"det": "nms_param { nms_threshold: 0.5 } code_type: CORNER",
              "top1": "nms_param { nms_threshold: 0.5 } code_type: CORNER keep_top_k: 1",
              "loose": "nms_param { nms_threshold: 0.9 } code_type: CORNER confidence_threshold: 0.75"}
    net = _run(_detection_net(1, 3, 2, 1, params), {"loc": loc, "conf": conf, "prior": prior})
    np.testing.assert_allclose(net.tensor("det").numpy().reshape(-1, 7),
                               [[0, 1, .9, 0, 0, .5, .6], [0, 1, .7, .6, .6, 1, 1]], atol=1e-7)
    np.testing.assert_allclose(net.tensor("top1").numpy().reshape(-1, 7), [[0, 1, .9, 0, 0, .5, .6]],
                               atol=1e-7)
    np.testing.assert_allclose(net.tensor("loose").numpy().reshape(-1, 7),
                               [[0, 1, .9, 0, 0, .5, .6], [0, 1, .8, 0, 0, .5, .5]], atol=1e-7)


@pytest.mark.parametrize(
    ("params", "loc_channels", "message"),
    [
        ("", 8, "num_classes"),
        ("num_classes: 2", 12, "loc bottom"),
        ("num_classes: 3", 8, "conf bottom"),
        ("num_classes: 2 nms_param { eta: 1.5 }", 8, "eta"),
        ("num_classes: 2 nms_param { nms_threshold: -0.1 }", 8, "nms_threshold"),
        ("num_classes: 2 background_label_id: -1", 8, "background_label_id"),
    ],
)
def test_detection_output_rejects_bad_params(params: str, loc_channels: int, message: str) -> None:
    text = (_input("loc", (1, loc_channels)) + _input("conf", (1, 4)) + _input("prior", (1, 2, 8))
            + 'layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
              f"top: \"det\" detection_output_param {{ {params} }} }}")
    with pytest.raises(ModelFormatError, match=message):
        Net(_param(text))


# -- the real SSD models' head parameters -------------------------------------------------------------
def _model_priorbox_net(prototxt: Path, img: int, feature_sizes: list[int]) -> tuple[str, list[str]]:
    """A net of the model's PriorBox layers (parameters verbatim) on Input feature maps of given sizes."""
    model = text_format.Merge(prototxt.read_text(), caffe_pb2.NetParameter())
    layers = [lp for lp in model.layer if lp.type == "PriorBox"]
    assert len(layers) == len(feature_sizes)
    text = _input("data", (1, 3, img, img))
    for k, (lp, size) in enumerate(zip(layers, feature_sizes, strict=True)):
        text += _input(f"feat{k}", (1, 1, size, size))
        params = text_format.MessageToString(lp.prior_box_param, as_one_line=True)
        text += (f'layer {{ name: "pb{k}" type: "PriorBox" bottom: "feat{k}" bottom: "data" top: "pb{k}" '
                 f"prior_box_param {{ {params} }} }}\n")
    return text, [f"pb{k}" for k in range(len(layers))]


MODELS = {
    "mobilenet_ssd": ("mobilenet_ssd/MobileNetSSD_deploy.prototxt", 300, [19, 10, 5, 3, 2, 1]),
    "sfd_mbv2ssd_bn": ("sfd_mbv2ssd_bn/deploy.prototxt", 320, [40, 20, 10, 5, 3]),
}


def _model_detection_params(prototxt: Path) -> tuple[str, int, dict]:
    """The model's detection_output_param as prototxt text (without num_classes) and as numpy kwargs."""
    model = text_format.Merge(prototxt.read_text(), caffe_pb2.NetParameter())
    (lp,) = [lp for lp in model.layer if lp.type == "DetectionOutput"]
    p = lp.detection_output_param
    text = text_format.MessageToString(p, as_one_line=True).replace(f"num_classes: {p.num_classes}", "")
    kwargs = dict(bg=p.background_label_id, nms_thr=p.nms_param.nms_threshold, top_k=p.nms_param.top_k,
                  keep_top_k=p.keep_top_k, conf_thr=p.confidence_threshold)
    assert p.share_location and p.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE
    return text, p.num_classes, kwargs


def _model_head_inputs(n: int, num_priors: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, num_priors, num_classes)) * 3
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(n, -1).astype(np.float32)
    loc = (rng.normal(size=(n, num_priors * 4)) * 0.3).astype(np.float32)
    return loc, conf


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_heads_match_numpy(model: str, shared_models: Path) -> None:
    path, img, sizes = MODELS[model]
    text, tops = _model_priorbox_net(shared_models / path, img, sizes)
    net = _run(text, {})
    if model == "mobilenet_ssd":  # first head: min 60, ar 2 flip -> 3 priors per cell, step 300/19
        expected = _priorbox_numpy(19, 19, 300, 300, [60], [], [2.0], True, False, [0.1, 0.1, 0.2, 0.2])
    else:  # first head: min 16 and 32, step 8 -> 2 priors per cell
        expected = _priorbox_numpy(40, 40, 320, 320, [16, 32], [], [], False, False, [0.1, 0.1, 0.2, 0.2],
                                   step=8.0)
    np.testing.assert_allclose(net.tensor("pb0").numpy(), expected, atol=1e-6)
    priors = np.concatenate([net.tensor(t).numpy() for t in tops], axis=2)
    if model == "mobilenet_ssd":
        assert priors.shape == (1, 2, 1917 * 4)
    params, num_classes, kwargs = _model_detection_params(shared_models / path)
    num_priors = priors.shape[2] // 4
    loc, conf = _model_head_inputs(1, num_priors, num_classes, seed=5)
    det = _run(_detection_net(1, num_priors, num_classes, 1, {"det": params}),
               {"loc": loc, "conf": conf, "prior": priors}).tensor("det").numpy()
    expected = _detection_numpy(loc, conf, priors, num_classes, **kwargs)
    assert det.shape == expected.shape and det.shape[2] > 10
    np.testing.assert_allclose(det, expected, rtol=1e-5, atol=1e-5)


# -- reference Caffe cross-checks ---------------------------------------------------------------------
@pytest.mark.reference
def test_reference_permute_normalize_priorbox(reference_caffe: str, tmp_path: Path) -> None:
    text = (
        _input("data", (1, 3, 300, 300)) + _input("feat", (2, 6, 5, 7))
        + 'layer { name: "perm" type: "Permute" bottom: "feat" top: "perm" permute_param { order: 0 order: 2 '
          "order: 3 order: 1 } }\n"
        + 'layer { name: "perm2" type: "Permute" bottom: "feat" top: "perm2" permute_param { order: 1 } }\n'
        + 'layer { name: "n1" type: "Normalize" bottom: "feat" top: "n1" norm_param { across_spatial: false '
          'channel_shared: false scale_filler { type: "gaussian" std: 5 } } }\n'
        + 'layer { name: "n2" type: "Normalize" bottom: "feat" top: "n2" norm_param { across_spatial: true '
          'channel_shared: true scale_filler { type: "constant" value: 3 } eps: 0.01 } }\n'
        + 'layer { name: "n3" type: "Normalize" bottom: "feat" top: "n3" norm_param { across_spatial: true '
          'channel_shared: false scale_filler { type: "uniform" min: -2 max: 2 } } }\n'
        + 'layer { name: "pb1" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb1" prior_box_param { '
          "min_size: 60.7 max_size: 150 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: false "
          "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }\n"
        + 'layer { name: "pb2" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb2" prior_box_param { '
          "min_size: 100 min_size: 200 max_size: 150 max_size: 260 aspect_ratio: 2 flip: false clip: true "
          "variance: 0.2 img_h: 280 img_w: 320 step_h: 50 step_w: 40 offset: 0.3 } }\n"
        + 'layer { name: "pb3" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb3" prior_box_param { '
          "min_size: 30 aspect_ratio: 0.5 aspect_ratio: 2 } }\n"
    )
    rng = np.random.default_rng(7)
    feat = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)
    net = _run(text, {"feat": feat})
    weights = tmp_path / "w.caffemodel"
    proto = net.to_proto()
    save_caffemodel(proto, weights)
    ref = run_reference(text, inputs={"feat": feat}, weights=weights)
    for name in ("perm", "perm2", "n1", "n2", "n3", "pb1", "pb2", "pb3"):
        assert_close(net.tensor(name).numpy(), ref["blobs"][name], name)
    # the reference loads our scale blobs (shape [] when channel_shared, [C] otherwise) unchanged
    saved = {lp.name: lp.blobs for lp in proto.layer}
    for name, shape in (("n1", (6,)), ("n2", ()), ("n3", (6,))):
        ours = blob_to_array(saved[name][0])
        assert ours.shape == shape
        assert_close(ours, ref["params"][f"{name}/0"], name)


@pytest.mark.reference
def test_reference_detection_output(reference_caffe: str) -> None:
    # The reference fork skips NMS and the confidence threshold when nms_param is absent (Caffe-SSD does
    # not), so only cases with nms_param are compared.
    n, num_priors, num_classes = 2, 60, 4
    cases = {k: v for k, v in DETECTION_CASES.items() if "nms_param" in v[0]}
    shared = {k: v[0] for k, v in cases.items() if v[2]}
    per_class = {k: v[0] for k, v in cases.items() if not v[2]}
    loc, conf, prior = _detection_inputs(n, num_priors, num_classes, 1, seed=11)
    loc_pc, _, _ = _detection_inputs(n, num_priors, num_classes, num_classes, seed=12)
    text = _detection_net(n, num_priors, num_classes, 1, shared)
    text += _input("loc_pc", loc_pc.shape) + _detection_layers(per_class, num_classes, loc="loc_pc")
    text += ('layer { name: "none" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
             'top: "none" detection_output_param { num_classes: 4 nms_param { nms_threshold: 0.3 } '
             "confidence_threshold: 1.0 } }\n")
    inputs = {"loc": loc, "conf": conf, "prior": prior, "loc_pc": loc_pc}
    net = _run(text, inputs)
    ref = run_reference(text, inputs=inputs)
    for name in [*cases, "none"]:
        assert_close(net.tensor(name).numpy(), ref["blobs"][name], name)


@pytest.mark.reference
@pytest.mark.parametrize("model", sorted(MODELS))
def test_reference_model_heads(model: str, reference_caffe: str, shared_models: Path) -> None:
    path, img, sizes = MODELS[model]
    text, tops = _model_priorbox_net(shared_models / path, img, sizes)
    params, num_classes, _ = _model_detection_params(shared_models / path)
    net = _run(text, {})
    priors = np.concatenate([net.tensor(t).numpy() for t in tops], axis=2)
    num_priors = priors.shape[2] // 4
    loc, conf = _model_head_inputs(2, num_priors, num_classes, seed=9)
    text += _detection_net(2, num_priors, num_classes, 1, {"det": params})
    inputs = {"loc": loc, "conf": conf, "prior": priors}
    net = _run(text, inputs)
    ref = run_reference(text, inputs=inputs)
    for t in tops:
        assert_close(net.tensor(t).numpy(), ref["blobs"][t], t)
    ours = net.tensor("det").numpy()
    assert ours.shape[2] > 10
    assert_close(ours, ref["blobs"]["det"], "det")


@pytest.mark.reference
def test_reference_written_normalize_scale_loads(reference_caffe: str, tmp_path: Path) -> None:
    text = _input("x", (1, 3, 2, 2)) + (
        'layer { name: "n" type: "Normalize" bottom: "x" top: "y" '
        'norm_param { scale_filler { type: "constant" value: 20 } } }')
    weights = tmp_path / "ref.caffemodel"
    run_reference(text, save_weights=weights)
    net = Net(_param(text), weights=weights)
    # channel values 3, 0, 4 at each of the 4 positions: sample norm sqrt(4 * 25) = 10, scale 20 -> y = 2 x
    x = np.broadcast_to(np.array([3.0, 0.0, 4.0], np.float32)[None, :, None, None], (1, 3, 2, 2)).copy()
    net.set_tensor("x", torch.from_numpy(x))
    net.run()
    np.testing.assert_allclose(net.tensor("y").numpy(), 2 * x, rtol=1e-6)
