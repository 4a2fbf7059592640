"""ROIPooling, PSROIPooling and Proposal against numpy references written from Fast R-CNN's, R-FCN's and
py-faster-rcnn's code (tests/references/roi_layers.py), forward and backward; ATC's parameter messages on
the wire; py-faster-rcnn's Python proposal layer run natively without importing anything."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers.base import TEST, TRAIN
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close, make_layer, parse_net
from tests.references import roi_layers as ref


def _rois(rng: np.random.Generator, n: int, batch: int, size: float) -> np.ndarray:
    """Random rois (batch index, x1, y1, x2, y2) in image pixels, some reaching past the image."""
    xy1 = rng.uniform(-0.1 * size, 0.9 * size, (n, 2))
    wh = rng.uniform(0.0, 0.7 * size, (n, 2))
    idx = rng.integers(0, batch, (n, 1))
    return np.hstack([idx, xy1, xy1 + wh]).astype(np.float32)


def _grads(layer_text: str, x: np.ndarray, rois: np.ndarray, top_diff_seed: int) -> tuple[np.ndarray, ...]:
    layer = make_layer(layer_text, x, rois)
    xt = torch.from_numpy(x).requires_grad_(True)
    (top,) = layer.forward([xt, torch.from_numpy(rois)])
    diff = np.random.default_rng(top_diff_seed).standard_normal(top.shape).astype(np.float32)
    top.backward(torch.from_numpy(diff))
    return top.detach().numpy(), xt.grad.numpy(), diff


# -- ROIPooling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,pooled", [(0.0625, (3, 3)), (0.5, (2, 4)), (1.0, (7, 7))])
def test_roi_pooling_forward_backward(scale: float, pooled: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    rois = _rois(rng, 7, 2, 11 / scale)
    rois[0] = [1, 3.5 / scale, 2.5 / scale, 3.5 / scale, 2.5 / scale]  # a one-cell roi with .5 corners
    text = (f'type: "ROIPooling" roi_pooling_param {{ pooled_h: {pooled[0]} pooled_w: {pooled[1]} '
            f'spatial_scale: {scale} }}')
    top, grad, diff = _grads(text, x, rois, 2)
    want, want_grad = ref.roi_pooling(x, rois, pooled[0], pooled[1], scale, diff)
    assert_close(top, want, "ROIPooling top", rtol=0, atol=0)
    assert_close(grad, want_grad, "ROIPooling bottom diff", rtol=1e-5, atol=1e-5)


def test_roi_pooling_empty_bins_are_zero() -> None:
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4) + 1
    rois = np.array([[0, 20, 20, 30, 30], [0, 0, 0, 0, 0]], np.float32)  # outside; one cell
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 }',
                       x, rois)
    (top,) = layer.forward([torch.from_numpy(x), torch.from_numpy(rois)])
    assert np.all(top[0].numpy() == 0)
    # a one-cell roi at (0, 0): bins floor(0.5 p) .. ceil(0.5 (p + 1)) all cover cell 0
    assert np.all(top[1, 0].numpy() == x[0, 0, 0, 0]) and np.all(top[1, 1].numpy() == x[0, 1, 0, 0])


def test_roi_pooling_requires_spatial_scale_and_sizes() -> None:
    x, rois = np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 5), np.float32)
    with pytest.raises(ModelFormatError, match="spatial_scale"):
        make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 }', x, rois)
    with pytest.raises(ModelFormatError, match="pooled_h"):
        make_layer('type: "ROIPooling" roi_pooling_param { spatial_scale: 1 }', x, rois)


def test_roi_pooling_per_axis_scales() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    rois = _rois(rng, 4, 1, 8)
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale_h: 1 '
                       'spatial_scale_w: 0.5 }', x, rois)
    (top,) = layer.forward([torch.from_numpy(x), torch.from_numpy(rois)])
    # a w-scale of 0.5 equals halving the x coordinates at scale 1
    halved = rois.copy()
    halved[:, [1, 3]] *= 0.5
    want, _ = ref.roi_pooling(x, halved, 2, 2, 1.0)
    assert_close(top.numpy(), want, "ROIPooling per-axis", rtol=0, atol=0)


# -- PSROIPooling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,group,dim", [(0.0625, 3, 2), (1.0, 2, 3), (0.25, 1, 4)])
def test_psroi_pooling_forward_backward(scale: float, group: int, dim: int) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, dim * group * group, 10, 12)).astype(np.float32)
    rois = _rois(rng, 6, 2, 12 / scale)
    rois[0] = [0, 5, 5, 5, 5]  # a degenerate roi: width (round(5) + 1 - round(5)) * scale
    text = (f'type: "PSROIPooling" psroi_pooling_param {{ spatial_scale: {scale} output_dim: {dim} '
            f'group_size: {group} }}')
    top, grad, diff = _grads(text, x, rois, 5)
    want, want_grad = ref.psroi_pooling(x, rois, dim, group, scale, diff)
    assert_close(top, want, "PSROIPooling top", rtol=1e-5, atol=1e-6)
    assert_close(grad, want_grad, "PSROIPooling bottom diff", rtol=1e-5, atol=1e-6)


def test_psroi_pooling_checks() -> None:
    x, rois = np.zeros((1, 8, 4, 4), np.float32), np.zeros((1, 5), np.float32)
    with pytest.raises(ModelFormatError, match="group_size"):
        make_layer('type: "PSROIPooling" psroi_pooling_param { spatial_scale: 1 output_dim: 2 }', x, rois)
    layer = make_layer('type: "PSROIPooling" psroi_pooling_param { spatial_scale: 1 output_dim: 2 '
                       'group_size: 3 }', x, rois)
    with pytest.raises(ModelFormatError, match="18 channels"):
        layer.forward([torch.from_numpy(x), torch.from_numpy(rois)])


# -- Proposal -----------------------------------------------------------------------------------------
def _rpn_blobs(seed: int, height: int = 6, width: int = 8, anchors: int = 9) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((1, 2 * anchors, height, width)).astype(np.float32)
    prob = 1 / (1 + np.exp(-logits))
    deltas = (0.3 * rng.standard_normal((1, 4 * anchors, height, width))).astype(np.float32)
    return prob.astype(np.float32), deltas


def _proposal_net(layer: str, height: int = 6, width: int = 8,
                  tops: str = 'top: "rois" top: "scores"') -> str:
    return (f'layer {{ name: "s" type: "Input" top: "s" input_param {{ shape {{ dim: 1 dim: 18 dim: {height} '
            f'dim: {width} }} }} }}\n'
            f'layer {{ name: "d" type: "Input" top: "d" input_param {{ shape {{ dim: 1 dim: 36 dim: {height} '
            f'dim: {width} }} }} }}\n'
            'layer { name: "i" type: "Input" top: "i" input_param { shape { dim: 1 dim: 3 } } }\n'
            f'layer {{ name: "proposal" {layer} bottom: "s" bottom: "d" bottom: "i" {tops} }}\n')


def _run(text: str, prob: np.ndarray, deltas: np.ndarray, info: np.ndarray, phase: int = TEST) -> Net:
    net = Net(parse_net(text), phase)
    for name, value in (("s", prob), ("d", deltas), ("i", info)):
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    return net


def test_anchors_match_py_faster_rcnn() -> None:
    from amct_caffe.engine.layers.region import generate_anchors

    assert_close(generate_anchors(16, (0.5, 1, 2), (8, 16, 32)), ref.generate_anchors(), "anchors", 0, 0)
    # the values py-faster-rcnn's generate_anchors.py prints for its defaults (first and last rows)
    assert ref.generate_anchors()[0].tolist() == [-84.0, -40.0, 99.0, 55.0]
    assert ref.generate_anchors()[-1].tolist() == [-168.0, -344.0, 183.0, 359.0]


@pytest.mark.parametrize("seed,info", [(0, [96.0, 128.0, 1.0]), (1, [90.0, 120.0, 2.5]),
                                       (2, [60.0, 70.0, 0.8])])
def test_native_proposal_matches_reference(seed: int, info: list[float]) -> None:
    prob, deltas = _rpn_blobs(seed)
    im_info = np.asarray([info], np.float32)
    layer = ('type: "Proposal" proposal_param { feat_stride: 16 pre_nms_topn: 200 post_nms_topn: 40 '
             'iou_threshold: 0.6 min_size: 20 }')
    net = _run(_proposal_net(layer), prob, deltas, im_info)
    want_rois, want_scores = ref.proposal(prob, deltas, im_info, 16, 200, 40, np.float32(0.6), 20)
    assert_close(net.tensor("rois").numpy(), want_rois, "rois", rtol=1e-6, atol=1e-4)
    assert_close(net.tensor("scores").numpy(), want_scores, "scores", rtol=0, atol=0)


def test_native_proposal_custom_anchors() -> None:
    prob, deltas = _rpn_blobs(7, anchors=4)
    im_info = np.asarray([[100.0, 120.0, 1.0]], np.float32)
    layer = ('type: "Proposal" proposal_param { feat_stride: 8 base_size: 8 ratio: 1 ratio: 2 scale: 4 '
             'scale: 8 pre_nms_topn: 0 post_nms_topn: 0 iou_threshold: 0.5 min_size: 4 }')
    text = _proposal_net(layer).replace("dim: 18", "dim: 8").replace("dim: 36", "dim: 16")
    net = _run(text, prob, deltas, im_info)
    anchors = ref.generate_anchors(8, (1, 2), (4, 8))
    want_rois, want_scores = ref.proposal(prob, deltas, im_info, 8, 0, 0, np.float32(0.5), 4, anchors)
    assert_close(net.tensor("rois").numpy(), want_rois, "rois", rtol=1e-6, atol=1e-4)
    assert_close(net.tensor("scores").numpy(), want_scores, "scores", rtol=0, atol=0)


PY_LAYER = ('type: "Python" python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" '
            "param_str: \"'feat_stride': 16\" }")


@pytest.mark.parametrize("phase,cfg", [(TEST, (6000, 300)), (TRAIN, (12000, 2000))])
def test_py_faster_rcnn_proposal_layer_runs_natively(phase: int, cfg: tuple[int, int]) -> None:
    prob, deltas = _rpn_blobs(11, height=14, width=18)
    im_info = np.asarray([[224.0, 288.0, 1.2]], np.float32)
    text = _proposal_net(PY_LAYER, 14, 18)
    assert "rpn" not in sys.modules and "rpn.proposal_layer" not in sys.modules
    net = _run(text, prob, deltas, im_info, phase)
    assert "rpn" not in sys.modules, "the proposal layer's module must not be imported"
    want_rois, want_scores = ref.proposal(prob, deltas, im_info, 16, cfg[0], cfg[1], np.float32(0.7), 16)
    assert_close(net.tensor("rois").numpy(), want_rois, "rois", rtol=1e-6, atol=1e-4)
    assert_close(net.tensor("scores").numpy(), want_scores, "scores", rtol=0, atol=0)
    assert net.engine_layers[-1].type_name == "Proposal"


@pytest.mark.parametrize("param_str", ["{'feat_stride': 16, 'scales': [4, 8]}",
                                       "feat_stride: 16\nscales: [4, 8]",
                                       "'feat_stride': 16, 'scales': (4, 8)"])
def test_py_faster_rcnn_param_str_forms(param_str: str) -> None:
    from amct_caffe.engine.layers.region import parse_param_str

    values = parse_param_str(param_str, "L")
    assert values["feat_stride"] == 16 and list(values["scales"]) == [4, 8]  # type: ignore[call-overload]


def test_py_faster_rcnn_param_str_is_never_executed(tmp_path) -> None:
    marker = tmp_path / "ran"
    evil = f"'feat_stride': __import__('pathlib').Path({str(marker)!r}).touch()"
    text = _proposal_net(PY_LAYER.replace("'feat_stride': 16", evil.replace('"', '\\"')))
    with pytest.raises(ModelFormatError, match="param_str"):
        Net(parse_net(text), TEST)
    assert not marker.exists()


# -- the parameter messages: ATC's names and numbers ----------------------------------------------------
def test_atc_messages_parse_by_name_and_keep_atc_numbers() -> None:
    lp = text_format.Merge(
        'name: "p" type: "Proposal" proposal_param { feat_stride: 16 base_size: 16 min_size: 16 ratio: 0.5 '
        'ratio: 1 scale: 8 pre_nms_topn: 3000 post_nms_topn: 304 iou_threshold: 0.7 } '
        'roi_pooling_param { pooled_h: 7 pooled_w: 7 spatial_scale: 0.0625 } '
        'psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 }',
        caffe_pb2.LayerParameter())
    numbers = {f.name: f.number for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields}
    assert (numbers["roi_pooling_param"], numbers["proposal_param"], numbers["psroi_pooling_param"]) == (
        161, 201, 207)
    assert numbers["detection_output_param"] == 204  # the SSD fork's meaning of 204 stays
    defaults = caffe_pb2.ProposalParameter()
    assert (defaults.pre_nms_topn, defaults.post_nms_topn, defaults.feat_stride) == (3000, 304, 16)
    assert caffe_pb2.ROIPoolingParameter().spatial_scale == pytest.approx(0.0625)
    again = caffe_pb2.LayerParameter.FromString(lp.SerializeToString())
    assert list(again.proposal_param.ratio) == [0.5, 1.0] and again.psroi_pooling_param.group_size == 7


def _tagged(number: int, payload: bytes) -> bytes:
    """One length-delimited field of a LayerParameter on the wire."""
    def varint(v: int) -> bytes:
        out = b""
        while True:
            byte, v = v & 0x7F, v >> 7
            out += bytes([byte | (0x80 if v else 0)])
            if not v:
                return out
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def test_binary_field_numbers_read_as_decided() -> None:
    """A binary file's 201 is proposal_param, 207 psroi_pooling_param, 204 the SSD detection_output_param
    (docs/decisions.md, region-layer field numbers)."""
    # inner messages written by hand: field 1 (float 32.0, wire type 5), field 3 (varint 5)
    inner = bytes([0x0D]) + np.float32(32.0).tobytes() + bytes([0x18, 0x05])
    wire = _tagged(201, inner) + _tagged(207, inner) + _tagged(204, bytes([0x08, 0x03]))
    lp = caffe_pb2.LayerParameter.FromString(wire)
    assert lp.proposal_param.feat_stride == 32.0 and lp.proposal_param.min_size == 16.0
    assert lp.psroi_pooling_param.spatial_scale == 32.0 and lp.psroi_pooling_param.group_size == 5
    assert lp.detection_output_param.num_classes == 3
