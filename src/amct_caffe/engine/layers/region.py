"""Region-based detection layers: ROIPooling (Fast R-CNN), PSROIPooling (R-FCN) and Proposal (the RPN).

Each follows the code its model family was trained with (see docs/fork-layers.md):

- ``ROIPooling``: rbgirshick/caffe-fast-rcnn ``src/caffe/layers/roi_pooling_layer.cpp``.
- ``PSROIPooling``: daijifeng001/caffe-rfcn ``src/caffe/layers/psroi_pooling_layer.cu``.
- ``Proposal``: rbgirshick/py-faster-rcnn ``lib/rpn/proposal_layer.py`` (with ``generate_anchors.py``,
  ``fast_rcnn/bbox_transform.py`` and ``nms/py_cpu_nms.py``), parameterised by the ``proposal_param`` of
  Huawei's ATC caffe.proto. py-faster-rcnn's own Python layer (``python_param { module:
  "rpn.proposal_layer" layer: "ProposalLayer" }``) builds this layer from its ``param_str`` without
  importing anything (:func:`proposal_from_python`).

The parameter messages are ATC's (LayerParameter 161, 207 and 201; docs/decisions.md, region-layer field
numbers). A roi is a row ``(batch index, x1, y1, x2, y2)`` in input-image pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from amct_caffe.engine.layers.base import TRAIN, Layer, Tensor
from amct_caffe.engine.layers.param_str import parse_param_str
from amct_caffe.engine.layers.registry import register
from amct_caffe.errors import ModelFormatError
from amct_caffe.log import get_logger
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.layers.region")


def _round_away(x: Tensor) -> Tensor:
    """C ``round()`` on a float tensor: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _roi_rows(rois: Tensor, layer: Layer) -> Tensor:
    """The rois bottom as an ``(R, 5)`` float32 tensor (Caffe reads it as ``count / 5`` rows of five)."""
    if rois.numel() % 5:
        raise layer.error(f"the rois bottom has shape {tuple(rois.shape)}; it must hold rows of 5 values "
                          "(batch index, x1, y1, x2, y2).")
    return rois.detach().reshape(-1, 5).to("cpu", torch.float32)


def _batch_indices(rows: Tensor, batch: int, layer: Layer) -> Tensor:
    index = rows[:, 0].to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
        raise layer.error(f"a roi has batch index {int(index.max())} or {int(index.min())}, outside the "
                          f"feature map's batch of {batch}.")
    return index


# ---------------------------------------------------------------------------------------------------
@register("ROIPooling")
class ROIPooling(Layer):
    """Fast R-CNN's ROI max pooling (caffe-fast-rcnn ``roi_pooling_layer.cpp``).

    Bottoms: the feature map ``(N, C, H, W)`` and the rois ``(R, 5)``; top ``(R, C, pooled_h, pooled_w)``.
    Each roi corner is ``round(coordinate * spatial_scale)`` (C ``round``); the roi spans at least one
    cell; bin ``(ph, pw)`` covers rows ``floor(ph * h / pooled_h)`` to ``ceil((ph + 1) * h / pooled_h)``
    (float32 arithmetic) offset by the roi start and clipped to the map; the top is the bin's maximum, 0
    for an empty bin. The gradient goes to the position of each bin's maximum, as Caffe's backward (on
    exact ties to one of the tied cells, which need not be Caffe's first); the rois get none.

    ``spatial_scale`` must be written: Fast R-CNN's proto defaults it to 1, ATC's to 0.0625.
    ``spatial_scale_h``/``spatial_scale_w`` (ATC) replace it for one axis when set.
    """

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.roi_pooling_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error(f"roi_pooling_param needs pooled_h and pooled_w > 0 (got {p.pooled_h}, "
                             f"{p.pooled_w}).")
        if not p.HasField("spatial_scale") and not (p.HasField("spatial_scale_h")
                                                    and p.HasField("spatial_scale_w")):
            raise self.error(
                "roi_pooling_param has no spatial_scale; Fast R-CNN's Caffe reads a missing one as 1 and "
                "ATC as 0.0625, so write it (1 / the feature stride, e.g. spatial_scale: 0.0625)."
            )
        self.pooled_h = int(p.pooled_h)
        self.pooled_w = int(p.pooled_w)
        scale_h = p.spatial_scale_h if p.HasField("spatial_scale_h") else p.spatial_scale
        scale_w = p.spatial_scale_w if p.HasField("spatial_scale_w") else p.spatial_scale
        self.scale_h = float(np.float32(scale_h))
        self.scale_w = float(np.float32(scale_w))

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if x.dim() != 4:
            raise self.error(f"the feature map must be 4-D (N, C, H, W), got shape {tuple(x.shape)}.")
        rows = _roi_rows(bottoms[1], self)
        batch, channels, height, width = (int(d) for d in x.shape)
        index = _batch_indices(rows, batch, self)
        h0, h1 = self._bins(rows[:, 2], rows[:, 4], self.scale_h, self.pooled_h, height)
        w0, w1 = self._bins(rows[:, 1], rows[:, 3], self.scale_w, self.pooled_w, width)
        outs = [self._pool_roi(x[int(index[r])], h0[r], h1[r], w0[r], w1[r]) for r in range(rows.shape[0])]
        if not outs:
            return [x.new_zeros((0, channels, self.pooled_h, self.pooled_w))]
        return [torch.stack(outs)]

    @staticmethod
    def _bins(start: Tensor, end: Tensor, scale: float, pooled: int, size: int) -> tuple[Tensor, Tensor]:
        """Per roi and bin, the first and one-past-last cell along one axis (clipped to ``[0, size]``)."""
        s32 = torch.tensor(scale, dtype=torch.float32)
        roi_start = _round_away(start * s32).to(torch.int64)
        roi_end = _round_away(end * s32).to(torch.int64)
        length = torch.clamp(roi_end - roi_start + 1, min=1)
        bin_size = length.to(torch.float32) / torch.tensor(float(pooled), dtype=torch.float32)
        p = torch.arange(pooled, dtype=torch.float32)
        first = torch.floor(p[None, :] * bin_size[:, None]).to(torch.int64)
        last = torch.ceil((p[None, :] + 1) * bin_size[:, None]).to(torch.int64)
        first = torch.clamp(first + roi_start[:, None], 0, size)
        last = torch.clamp(last + roi_start[:, None], 0, size)
        return first, last

    def _pool_roi(self, fmap: Tensor, h0: Tensor, h1: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
        """Max of each bin of one roi on ``fmap (C, H, W)``: columns first, then rows (one maximum each)."""
        top, bottom = int(h0.min()), int(h1.max())
        left, right = int(w0.min()), int(w1.max())
        channels = fmap.shape[0]
        if bottom <= top or right <= left:
            return fmap.new_zeros((channels, self.pooled_h, self.pooled_w))
        region = fmap[:, top:bottom, left:right]
        cols = torch.arange(left, right, device=fmap.device)
        rows = torch.arange(top, bottom, device=fmap.device)
        in_w = (cols[None, :] >= w0.to(fmap.device)[:, None]) & (cols[None, :] < w1.to(fmap.device)[:, None])
        in_h = (rows[None, :] >= h0.to(fmap.device)[:, None]) & (rows[None, :] < h1.to(fmap.device)[:, None])
        low = torch.tensor(-math.inf, dtype=fmap.dtype, device=fmap.device)
        # (C, h, pw, w) -> max over w -> (C, h, pw); then (C, ph, h, pw) -> max over h -> (C, ph, pw)
        by_col = torch.where(in_w[None, None, :, :], region[:, :, None, :], low).max(dim=3).values
        pooled = torch.where(in_h[None, :, :, None], by_col[:, None, :, :], low).max(dim=2).values
        empty = ~(in_h.any(dim=1)[:, None] & in_w.any(dim=1)[None, :])
        return torch.where(empty[None], torch.zeros((), dtype=fmap.dtype, device=fmap.device), pooled)


# ---------------------------------------------------------------------------------------------------
@register("PSROIPooling")
class PSROIPooling(Layer):
    """R-FCN's position-sensitive ROI average pooling (caffe-rfcn ``psroi_pooling_layer.cu``).

    Bottoms: the score maps ``(N, output_dim * group_size^2, H, W)`` and the rois ``(R, 5)``; top
    ``(R, output_dim, group_size, group_size)``. The roi spans ``round(x1) * s`` to ``(round(x2) + 1) * s``
    (C ``round``, ``s = spatial_scale``), at least 0.1 wide and high; bin ``(ph, pw)`` covers rows
    ``floor(ph * bin_h + y_start)`` to ``ceil((ph + 1) * bin_h + y_start)`` clipped to the map, and reads
    channel ``(c * group_size + ph) * group_size + pw`` of the maps; the top is the bin's mean, 0 for an
    empty bin. All three parameters are required (as in R-FCN's proto). The gradient spreads each bin's
    top diff evenly over its cells, as Caffe's backward.
    """

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.psroi_pooling_param
        missing = [f for f in ("spatial_scale", "output_dim", "group_size") if not p.HasField(f)]
        if missing:
            raise self.error(f"psroi_pooling_param needs {', '.join(missing)} (all three are required).")
        if p.output_dim <= 0 or p.group_size <= 0:
            raise self.error(f"psroi_pooling_param needs output_dim and group_size > 0 (got {p.output_dim}, "
                             f"{p.group_size}).")
        self.scale = float(np.float32(p.spatial_scale))
        self.output_dim = int(p.output_dim)
        self.group = int(p.group_size)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        g, dim = self.group, self.output_dim
        if x.dim() != 4 or x.shape[1] != dim * g * g:
            raise self.error(f"the score maps have shape {tuple(x.shape)}; they need output_dim * "
                             f"group_size^2 = {dim * g * g} channels.")
        rows = _roi_rows(bottoms[1], self)
        batch, _, height, width = (int(d) for d in x.shape)
        index = _batch_indices(rows, batch, self)
        h0, h1 = self._bins(rows[:, 2], rows[:, 4], height)
        w0, w1 = self._bins(rows[:, 1], rows[:, 3], width)
        # Rectangle sums from an integral image (float64, so long sums lose nothing at float32 precision).
        integral = torch.nn.functional.pad(x.to(torch.float64).cumsum(2).cumsum(3), (1, 0, 1, 0))
        n_rois = rows.shape[0]
        ph = torch.arange(g)[:, None].expand(g, g)
        pw = torch.arange(g)[None, :].expand(g, g)
        channel = (torch.arange(dim)[:, None, None] * g + ph[None]) * g + pw[None]       # (dim, g, g)
        flat = integral.reshape(-1)
        plane = index[:, None, None, None] * (dim * g * g) + channel[None]             # (R, dim, g, g)

        def corner(hh: Tensor, ww: Tensor) -> Tensor:
            cell = hh[:, None, :, None] * (width + 1) + ww[:, None, None, :]            # (R, 1, g, g)
            linear = (plane * ((height + 1) * (width + 1)) + cell).to(x.device)
            return flat.gather(0, linear.reshape(-1)).reshape(n_rois, dim, g, g)

        total = corner(h1, w1) - corner(h0, w1) - corner(h1, w0) + corner(h0, w0)
        area = ((h1 - h0)[:, :, None] * (w1 - w0)[:, None, :]).to(torch.float64).to(x.device)
        empty = area <= 0
        mean = total / torch.where(empty, torch.ones_like(area), area)[:, None]
        mean = torch.where(empty[:, None], torch.zeros_like(mean), mean)
        return [mean.to(x.dtype)]

    def _bins(self, start: Tensor, end: Tensor, size: int) -> tuple[Tensor, Tensor]:
        s32 = torch.tensor(self.scale, dtype=torch.float32)
        roi_start = _round_away(start) * s32
        roi_end = (_round_away(end) + 1.0) * s32
        length = torch.clamp(roi_end - roi_start, min=0.1)
        bin_size = length / torch.tensor(float(self.group), dtype=torch.float32)
        p = torch.arange(self.group, dtype=torch.float32)
        first = torch.floor(p[None, :] * bin_size[:, None] + roi_start[:, None]).to(torch.int64)
        last = torch.ceil((p[None, :] + 1) * bin_size[:, None] + roi_start[:, None]).to(torch.int64)
        return torch.clamp(first, 0, size), torch.clamp(last, 0, size)


# ---------------------------------------------------------------------------------------------------
#: py-faster-rcnn's ``cfg.TEST`` / ``cfg.TRAIN`` RPN settings (``lib/fast_rcnn/config.py``): pre-NMS top N,
#: post-NMS top N, NMS threshold, minimum box size.
PY_FASTER_RCNN_CFG = {
    "TEST": {"pre_nms_topn": 6000, "post_nms_topn": 300, "iou_threshold": 0.7, "min_size": 16.0},
    "TRAIN": {"pre_nms_topn": 12000, "post_nms_topn": 2000, "iou_threshold": 0.7, "min_size": 16.0},
}
#: The module and class of py-faster-rcnn's proposal layer, which runs natively as ``Proposal``.
PY_FASTER_RCNN_PROPOSAL = ("rpn.proposal_layer", "ProposalLayer")

_DEFAULT_RATIOS = (0.5, 1.0, 2.0)
_DEFAULT_SCALES = (8.0, 16.0, 32.0)


def generate_anchors(base_size: float, ratios: Sequence[float], scales: Sequence[float]) -> np.ndarray:
    """py-faster-rcnn's ``generate_anchors``: ``(len(ratios) * len(scales), 4)`` boxes around the base box
    ``(0, 0, base_size - 1, base_size - 1)``, ratio-major; widths and heights rounded half to even (numpy's
    ``round``), as there."""
    size = float(base_size)
    ctr = 0.5 * (size - 1.0)
    out = []
    for ratio in ratios:
        w = float(np.round(np.sqrt(size * size / ratio)))
        h = float(np.round(w * ratio))
        for scale in scales:
            ws, hs = w * scale, h * scale
            half_w, half_h = 0.5 * (ws - 1), 0.5 * (hs - 1)
            out.append([ctr - half_w, ctr - half_h, ctr + half_w, ctr + half_h])
    return np.asarray(out, dtype=np.float64)


@register("Proposal")
class Proposal(Layer):
    """Region proposals from an RPN (py-faster-rcnn ``lib/rpn/proposal_layer.py``), with ATC's
    ``proposal_param``.

    Bottoms: the RPN class probabilities ``(N, 2A, H, W)`` (background for the first A channels, object for
    the rest), the box deltas ``(N, 4A, H, W)`` and ``im_info`` ``(N, 3)`` = (image height, width, scale).
    For each image: anchors (``base_size``, ``ratio``, ``scale``) shifted by ``feat_stride`` over the map,
    moved by the deltas, clipped to the image, boxes narrower or lower than ``min_size * scale`` dropped,
    the ``pre_nms_topn`` best by object score kept, NMS at ``iou_threshold``, the ``post_nms_topn`` best
    kept. Top 0: the rois ``(R, 5)`` with the image's batch index; an optional top 1: their scores
    ``(R, 1)``. py-faster-rcnn handles one image; here every image of the batch gets its rows, in order.
    A top N of 0 or less keeps everything. Runs in float32 as py-faster-rcnn (its anchors in float64).
    """

    exact_bottoms = 3
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        if len(param.top) > 2:
            raise self.error(f"has {len(param.top)} tops; it writes the rois and, optionally, their scores.")
        p = param.proposal_param
        if p.output_actual_rois_num:
            raise self.error("output_actual_rois_num is an ATC output layout the engine does not write; the "
                             "rois top already has one row per proposal. Remove the option.")
        if p.feat_stride <= 0 or p.base_size <= 0:
            raise self.error(f"feat_stride and base_size must be > 0 (got {p.feat_stride}, {p.base_size}).")
        self.feat_stride = float(p.feat_stride)
        self.min_size = float(p.min_size)
        self.pre_nms_topn = int(p.pre_nms_topn)
        self.post_nms_topn = int(p.post_nms_topn)
        self.iou_threshold = float(np.float32(p.iou_threshold))
        ratios = tuple(p.ratio) or _DEFAULT_RATIOS
        scales = tuple(p.scale) or _DEFAULT_SCALES
        self.anchors = generate_anchors(float(p.base_size), ratios, scales)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        scores_blob, deltas_blob, info_blob = (b.detach().to("cpu", torch.float32).numpy() for b in bottoms)
        count = self.anchors.shape[0]
        if scores_blob.ndim != 4 or scores_blob.shape[1] != 2 * count:
            raise self.error(f"the scores bottom has shape {scores_blob.shape}; it needs 2 x {count} "
                             "anchors channels (N, 2A, H, W).")
        if deltas_blob.shape != (scores_blob.shape[0], 4 * count, *scores_blob.shape[2:]):
            raise self.error(f"the deltas bottom has shape {deltas_blob.shape}; it needs (N, 4A, H, W) = "
                             f"({scores_blob.shape[0]}, {4 * count}, {scores_blob.shape[2]}, "
                             f"{scores_blob.shape[3]}).")
        info = info_blob.reshape(info_blob.shape[0], -1)
        if info.shape[0] != scores_blob.shape[0] or info.shape[1] < 3:
            raise self.error(f"im_info has shape {info_blob.shape}; it needs one (height, width, scale) row "
                             "per image.")
        rois, scores = [], []
        for n in range(scores_blob.shape[0]):
            boxes, score = self._propose(scores_blob[n, count:], deltas_blob[n], info[n])
            rois.append(np.hstack([np.full((boxes.shape[0], 1), n, np.float32), boxes]))
            scores.append(score[:, None])
        out_rois = torch.from_numpy(np.concatenate(rois).astype(np.float32)).to(self.device)
        out_scores = torch.from_numpy(np.concatenate(scores).astype(np.float32)).to(self.device)
        return [out_rois, out_scores][: len(self.param.top)]

    def _propose(self, scores: np.ndarray, deltas: np.ndarray, info: np.ndarray) -> tuple[np.ndarray, ...]:
        height, width = scores.shape[1:]
        sx, sy = np.meshgrid(np.arange(width) * self.feat_stride, np.arange(height) * self.feat_stride)
        shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], axis=1)
        anchors = (self.anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4).astype(np.float32)
        deltas = deltas.transpose(1, 2, 0).reshape(-1, 4)
        score = scores.transpose(1, 2, 0).reshape(-1)
        boxes = _clip(_apply_deltas(anchors, deltas), info[0], info[1])
        min_size = np.float32(self.min_size) * info[2]
        keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= min_size) & ((boxes[:, 3] - boxes[:, 1] + 1) >= min_size)
        boxes, score = boxes[keep], score[keep]
        order = np.argsort(-score, kind="stable")
        if self.pre_nms_topn > 0:
            order = order[: self.pre_nms_topn]
        boxes, score = boxes[order], score[order]
        kept = _nms(boxes, self.iou_threshold)
        if self.post_nms_topn > 0:
            kept = kept[: self.post_nms_topn]
        return boxes[kept], score[kept]


def _apply_deltas(anchors: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """py-faster-rcnn's ``bbox_transform_inv`` (float32): centre/size deltas; ``x2 = cx + w / 2`` there,
    not ``cx + w / 2 - 1``, so a zero delta grows the box by one pixel."""
    widths = anchors[:, 2] - anchors[:, 0] + np.float32(1.0)
    heights = anchors[:, 3] - anchors[:, 1] + np.float32(1.0)
    ctr_x = anchors[:, 0] + np.float32(0.5) * widths
    ctr_y = anchors[:, 1] + np.float32(0.5) * heights
    px = deltas[:, 0] * widths + ctr_x
    py = deltas[:, 1] * heights + ctr_y
    pw = np.exp(deltas[:, 2]) * widths
    ph = np.exp(deltas[:, 3]) * heights
    half = np.float32(0.5)
    return np.stack([px - half * pw, py - half * ph, px + half * pw, py + half * ph], axis=1)


def _clip(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """py-faster-rcnn's ``clip_boxes``: x into ``[0, width - 1]``, y into ``[0, height - 1]``."""
    out = boxes.copy()
    out[:, 0::2] = np.maximum(np.minimum(out[:, 0::2], np.float32(width) - 1), 0)
    out[:, 1::2] = np.maximum(np.minimum(out[:, 1::2], np.float32(height) - 1), 0)
    return out


def _nms(boxes: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS over boxes already sorted by score: a box is dropped when its overlap (pixel areas, the
    ``+ 1`` convention) with a kept one exceeds ``threshold``. Returns the kept indices, in order."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    alive = np.ones(boxes.shape[0], dtype=bool)
    kept = []
    for i in range(boxes.shape[0]):
        if not alive[i]:
            continue
        kept.append(i)
        rest = np.arange(i + 1, boxes.shape[0])[alive[i + 1:]]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        alive[rest[overlap > threshold]] = False
    return np.asarray(kept, dtype=np.int64)


# -- py-faster-rcnn's Python proposal layer ----------------------------------------------------------
def _number_list(value: object, key: str, where: str) -> list[float]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(items) or not numbers:
        raise ModelFormatError(f"{where}: param_str '{key}' must be a number or a list of numbers, got "
                               f"{value!r}.")
    return [float(v) for v in numbers]


def proposal_from_python(
    param: caffe_pb2.LayerParameter, phase: int, device: torch.device, options: Mapping[str, object]
) -> Proposal:
    """py-faster-rcnn's ``rpn.proposal_layer.ProposalLayer`` as a native :class:`Proposal`.

    ``param_str`` gives ``feat_stride`` (and optionally ``scales``; ``ratios`` too, which some forks
    add); the rest is py-faster-rcnn's fixed anchors (base 16, ratios 0.5/1/2, scales 8/16/32) and its
    ``cfg.TEST`` RPN settings (6000 before NMS, 300 after, NMS 0.7, min size 16), ``cfg.TRAIN``'s (12000,
    2000) in a TRAIN-phase net, as the layer reads them. Nothing is imported.

    Raises:
        ModelFormatError: ``param_str`` is not a mapping, lacks ``feat_stride`` or has a bad value.
    """
    where = f"Layer '{param.name}' (type Python, {'.'.join(PY_FASTER_RCNN_PROPOSAL)})"
    values = parse_param_str(param.python_param.param_str, where)
    if "feat_stride" not in values:
        raise ModelFormatError(f"{where}: param_str needs 'feat_stride' (e.g. \"'feat_stride': 16\").")
    unknown = sorted(set(values) - {"feat_stride", "scales", "ratios"})
    if unknown:
        LOGGER.warning("%s: param_str keys %s are not read by py-faster-rcnn's proposal layer; ignored.",
                       where, unknown)
    native = caffe_pb2.LayerParameter()
    native.CopyFrom(param)
    native.type = "Proposal"
    native.ClearField("python_param")
    p = native.proposal_param
    p.feat_stride = _number_list(values["feat_stride"], "feat_stride", where)[0]
    p.base_size = 16
    p.ratio.extend(_number_list(values.get("ratios", list(_DEFAULT_RATIOS)), "ratios", where))
    p.scale.extend(_number_list(values.get("scales", list(_DEFAULT_SCALES)), "scales", where))
    cfg = PY_FASTER_RCNN_CFG["TRAIN" if phase == TRAIN else "TEST"]
    p.pre_nms_topn = int(cfg["pre_nms_topn"])
    p.post_nms_topn = int(cfg["post_nms_topn"])
    p.iou_threshold = float(cfg["iou_threshold"])
    p.min_size = float(cfg["min_size"])
    layer = Proposal.create(native, phase, device, options)
    assert isinstance(layer, Proposal)
    return layer
