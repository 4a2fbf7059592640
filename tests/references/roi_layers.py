"""Numpy references of the region-based detection layers, written as loops from their original code:

- ROIPooling: caffe-fast-rcnn ``src/caffe/layers/roi_pooling_layer.cpp`` (Forward_cpu / Backward via argmax);
- PSROIPooling: caffe-rfcn ``src/caffe/layers/psroi_pooling_layer.cu`` (PSROIPoolingForward/Backward);
- Proposal: py-faster-rcnn ``lib/rpn/proposal_layer.py``, ``generate_anchors.py``,
  ``fast_rcnn/bbox_transform.py`` and ``nms/py_cpu_nms.py``.

Scalar arithmetic is float32 where the C++ uses ``Dtype`` (``np.float32`` scalars), and C ``round`` is
half away from zero.
"""

from __future__ import annotations

import math

import numpy as np

F = np.float32


def c_round(v: float) -> float:
    """C ``round``: halves away from zero."""
    return math.floor(abs(v) + 0.5) * (1.0 if v >= 0 else -1.0)


def roi_pooling(x: np.ndarray, rois: np.ndarray, pooled_h: int, pooled_w: int, scale: float,
                top_diff: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fast R-CNN ROI max pooling: (top, bottom diff for ``top_diff`` or zeros)."""
    n_rois = rois.shape[0]
    _, channels, height, width = x.shape
    top = np.zeros((n_rois, channels, pooled_h, pooled_w), np.float32)
    argmax = -np.ones(top.shape, np.int64)
    s = F(scale)
    for r in range(n_rois):
        b = int(rois[r, 0])
        start_w = int(c_round(float(F(rois[r, 1]) * s)))
        start_h = int(c_round(float(F(rois[r, 2]) * s)))
        end_w = int(c_round(float(F(rois[r, 3]) * s)))
        end_h = int(c_round(float(F(rois[r, 4]) * s)))
        roi_h = max(end_h - start_h + 1, 1)
        roi_w = max(end_w - start_w + 1, 1)
        bin_h = F(roi_h) / F(pooled_h)
        bin_w = F(roi_w) / F(pooled_w)
        for c in range(channels):
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    hstart = int(math.floor(F(ph) * bin_h))
                    wstart = int(math.floor(F(pw) * bin_w))
                    hend = int(math.ceil(F(ph + 1) * bin_h))
                    wend = int(math.ceil(F(pw + 1) * bin_w))
                    hstart = min(max(hstart + start_h, 0), height)
                    hend = min(max(hend + start_h, 0), height)
                    wstart = min(max(wstart + start_w, 0), width)
                    wend = min(max(wend + start_w, 0), width)
                    if hend <= hstart or wend <= wstart:
                        continue
                    best, where = -np.inf, -1
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            if x[b, c, h, w] > best:
                                best, where = x[b, c, h, w], h * width + w
                    top[r, c, ph, pw] = best
                    argmax[r, c, ph, pw] = where
    grad = np.zeros_like(x, dtype=np.float64)
    if top_diff is not None:
        for r, c, ph, pw in np.ndindex(top.shape):
            if argmax[r, c, ph, pw] >= 0:
                h, w = divmod(int(argmax[r, c, ph, pw]), width)
                grad[int(rois[r, 0]), c, h, w] += top_diff[r, c, ph, pw]
    return top, grad


def psroi_pooling(x: np.ndarray, rois: np.ndarray, output_dim: int, group: int, scale: float,
                  top_diff: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """R-FCN position-sensitive average pooling (pooled size = group size): (top, bottom diff)."""
    n_rois = rois.shape[0]
    _, _, height, width = x.shape
    top = np.zeros((n_rois, output_dim, group, group), np.float32)
    grad = np.zeros_like(x, dtype=np.float64)
    s = F(scale)
    for r in range(n_rois):
        b = int(rois[r, 0])
        start_w = F(c_round(float(rois[r, 1]))) * s
        start_h = F(c_round(float(rois[r, 2]))) * s
        end_w = F(c_round(float(rois[r, 3])) + 1.0) * s
        end_h = F(c_round(float(rois[r, 4])) + 1.0) * s
        roi_w = F(max(end_w - start_w, 0.1))
        roi_h = F(max(end_h - start_h, 0.1))
        bin_h = roi_h / F(group)
        bin_w = roi_w / F(group)
        for ct in range(output_dim):
            for ph in range(group):
                for pw in range(group):
                    hstart = min(max(int(math.floor(F(ph) * bin_h + start_h)), 0), height)
                    wstart = min(max(int(math.floor(F(pw) * bin_w + start_w)), 0), width)
                    hend = min(max(int(math.ceil(F(ph + 1) * bin_h + start_h)), 0), height)
                    wend = min(max(int(math.ceil(F(pw + 1) * bin_w + start_w)), 0), width)
                    if hend <= hstart or wend <= wstart:
                        continue
                    c = (ct * group + ph) * group + pw
                    area = (hend - hstart) * (wend - wstart)
                    top[r, ct, ph, pw] = x[b, c, hstart:hend, wstart:wend].astype(np.float64).sum() / area
                    if top_diff is not None:
                        grad[b, c, hstart:hend, wstart:wend] += top_diff[r, ct, ph, pw] / area
    return top, grad


# -- py-faster-rcnn's proposal layer --------------------------------------------------------------------
def _whctrs(anchor: np.ndarray) -> tuple[float, float, float, float]:
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws: np.ndarray, hs: np.ndarray, x_ctr: float, y_ctr: float) -> np.ndarray:
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1),
                      y_ctr + 0.5 * (hs - 1)))


def generate_anchors(base_size: float = 16, ratios: tuple[float, ...] = (0.5, 1, 2),
                     scales: tuple[float, ...] = (8, 16, 32)) -> np.ndarray:
    """py-faster-rcnn's ``generate_anchors`` (ratio enumeration, then scale enumeration of each)."""
    base = np.array([1, 1, base_size, base_size], dtype=np.float64) - 1
    w, h, xc, yc = _whctrs(base)
    size_ratios = w * h / np.asarray(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * np.asarray(ratios, dtype=np.float64))
    ratio_anchors = _mkanchors(ws, hs, xc, yc)
    out = []
    for anchor in ratio_anchors:
        w, h, xc, yc = _whctrs(anchor)
        out.append(_mkanchors(w * np.asarray(scales, np.float64), h * np.asarray(scales, np.float64), xc, yc))
    return np.vstack(out)


def _bbox_transform_inv(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    boxes = boxes.astype(deltas.dtype, copy=False)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    pred_ctr_x = deltas[:, 0] * widths + ctr_x
    pred_ctr_y = deltas[:, 1] * heights + ctr_y
    pred_w = np.exp(deltas[:, 2]) * widths
    pred_h = np.exp(deltas[:, 3]) * heights
    out = np.zeros(deltas.shape, dtype=deltas.dtype)
    out[:, 0] = pred_ctr_x - 0.5 * pred_w
    out[:, 1] = pred_ctr_y - 0.5 * pred_h
    out[:, 2] = pred_ctr_x + 0.5 * pred_w
    out[:, 3] = pred_ctr_y + 0.5 * pred_h
    return out


def _clip_boxes(boxes: np.ndarray, im_shape: np.ndarray) -> np.ndarray:
    boxes[:, 0] = np.maximum(np.minimum(boxes[:, 0], im_shape[1] - 1), 0)
    boxes[:, 1] = np.maximum(np.minimum(boxes[:, 1], im_shape[0] - 1), 0)
    boxes[:, 2] = np.maximum(np.minimum(boxes[:, 2], im_shape[1] - 1), 0)
    boxes[:, 3] = np.maximum(np.minimum(boxes[:, 3], im_shape[0] - 1), 0)
    return boxes


def py_cpu_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """py-faster-rcnn's ``py_cpu_nms``: keep the best, drop overlaps > ``thresh``, repeat."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def proposal(scores_blob: np.ndarray, deltas_blob: np.ndarray, im_info: np.ndarray, feat_stride: float,
             pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float, min_size: float,
             anchors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """py-faster-rcnn ``ProposalLayer.forward`` for one image: (rois (R, 5), scores (R, 1))."""
    anchors0 = generate_anchors() if anchors is None else anchors
    num_anchors = anchors0.shape[0]
    scores = scores_blob[:, num_anchors:, :, :]
    info = im_info[0, :]
    height, width = scores.shape[-2:]
    shift_x, shift_y = np.meshgrid(np.arange(0, width) * feat_stride, np.arange(0, height) * feat_stride)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).transpose()
    k = shifts.shape[0]
    all_anchors = (anchors0.reshape((1, num_anchors, 4)) + shifts.reshape((1, k, 4)).transpose((1, 0, 2)))
    all_anchors = all_anchors.reshape((k * num_anchors, 4))
    deltas = deltas_blob.transpose((0, 2, 3, 1)).reshape((-1, 4))
    scores = scores.transpose((0, 2, 3, 1)).reshape((-1, 1))
    proposals = _clip_boxes(_bbox_transform_inv(all_anchors, deltas), info[:2])
    ms = min_size * info[2]
    ws = proposals[:, 2] - proposals[:, 0] + 1
    hs = proposals[:, 3] - proposals[:, 1] + 1
    keep = np.where((ws >= ms) & (hs >= ms))[0]
    proposals, scores = proposals[keep, :], scores[keep]
    order = scores.ravel().argsort()[::-1]
    if pre_nms_top_n > 0:
        order = order[:pre_nms_top_n]
    proposals, scores = proposals[order, :], scores[order]
    keep2 = py_cpu_nms(np.hstack((proposals, scores)), nms_thresh)
    if post_nms_top_n > 0:
        keep2 = keep2[:post_nms_top_n]
    proposals, scores = proposals[keep2, :], scores[keep2]
    batch_inds = np.zeros((proposals.shape[0], 1), dtype=np.float32)
    return np.hstack((batch_inds, proposals.astype(np.float32, copy=False))), scores
