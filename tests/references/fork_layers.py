"""Numpy references of the Caffe-fork layers, written as the loops of their canonical C++ sources.

Each function names the source whose loops it follows; none imports the package. Values are computed in
float64 (the engine's float32 results differ only by rounding). ``numeric_grad`` gives finite-difference
gradients of any of them, the independent check of the engine's backward.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def shuffle_channel(x: np.ndarray, group: int) -> np.ndarray:
    """farmingyard/ShuffleNet shuffle_channel_layer.cpp (Resize_cpu): with ``group_row = group`` and
    ``group_column = C / group``, top channel ``j * group_row + i`` is bottom channel
    ``i * group_column + j``."""
    n, c = x.shape[:2]
    rows, cols = group, c // group
    out = np.empty(x.shape, np.float64)
    for i in range(rows):
        for j in range(cols):
            out[:, j * rows + i] = x[:, i * cols + j]
    return out


def axpy(a: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """hujie-frank/SENet axpy_layer.cpp: per (n, c) plane, ``top = scale_data[n, c] * x + y``."""
    out = np.empty(x.shape, np.float64)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[n, c] = float(a[n, c, 0, 0]) * x[n, c].astype(np.float64) + y[n, c]
    return out


def reorg(x: np.ndarray, stride: int, reverse: bool = False) -> np.ndarray:
    """darknet's reorg_cpu(x, w, h, c, batch, stride, forward, out) as the YOLOv2 Caffe port calls it:
    with the bottom's (w, h, c) and ``forward = reverse``."""
    batch, c, h, w = x.shape
    flat = x.reshape(-1).astype(np.float64)
    out = np.zeros(flat.size)
    out_c = c // (stride * stride)
    for b in range(batch):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2 = k % out_c
                    offset = k // out_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    if reverse:
                        out[out_index] = flat[in_index]
                    else:
                        out[in_index] = flat[out_index]
    if reverse:
        return out.reshape(batch, out_c, h * stride, w * stride)
    return out.reshape(batch, c * stride * stride, h // stride, w // stride)


def interp_size(h: int, w: int, height: int = 0, width: int = 0, zoom: int | None = None,
                shrink: int | None = None, pad_beg: int = 0, pad_end: int = 0) -> tuple[int, int]:
    """hszhao/PSPNet interp_layer.cpp Reshape: the output size from the rule that applies."""
    eff = [h + pad_beg + pad_end, w + pad_beg + pad_end]
    if shrink is not None and zoom is None:
        return ((eff[0] - 1) // shrink + 1, (eff[1] - 1) // shrink + 1)
    if zoom is not None and shrink is None:
        return (eff[0] + (eff[0] - 1) * (zoom - 1), eff[1] + (eff[1] - 1) * (zoom - 1))
    if shrink is None and zoom is None:
        return (height, width)
    assert shrink is not None and zoom is not None
    out = [(e - 1) // shrink + 1 for e in eff]
    return (out[0] + (out[0] - 1) * (zoom - 1), out[1] + (out[1] - 1) * (zoom - 1))


def interp(x: np.ndarray, out_h: int, out_w: int, pad_beg: int = 0, pad_end: int = 0) -> np.ndarray:
    """hszhao/PSPNet util/interp.cpp caffe_cpu_interp2 (unpacked) on the crop at ``-pad_beg``: a copy when
    the sizes agree, else bilinear with ``r = (in - 1) / (out - 1)`` (float32, as the C++) and the
    neighbour step ``h1p``/``w1p`` 0 at the last row/column."""
    n, c, h, w = x.shape
    y1 = x1 = -pad_beg
    h1n, w1n = h + pad_beg + pad_end, w + pad_beg + pad_end
    src = x.astype(np.float64)
    out = np.zeros((n, c, out_h, out_w))
    if (h1n, w1n) == (out_h, out_w):
        return src[:, :, y1:y1 + h1n, x1:x1 + w1n].copy()
    rh = np.float32(np.float32(h1n - 1) / np.float32(out_h - 1)) if out_h > 1 else np.float32(0)
    rw = np.float32(np.float32(w1n - 1) / np.float32(out_w - 1)) if out_w > 1 else np.float32(0)
    for h2 in range(out_h):
        h1r = np.float32(rh * np.float32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < h1n - 1 else 0
        h1l = float(h1r) - h1
        h0l = 1.0 - h1l
        for w2 in range(out_w):
            w1r = np.float32(rw * np.float32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < w1n - 1 else 0
            w1l = float(w1r) - w1
            w0l = 1.0 - w1l
            r, q = y1 + h1, x1 + w1
            out[:, :, h2, w2] = (h0l * (w0l * src[:, :, r, q] + w1l * src[:, :, r, q + w1p])
                                 + h1l * (w0l * src[:, :, r + h1p, q] + w1l * src[:, :, r + h1p, q + w1p]))
    return out


def upsample_nearest(x: np.ndarray, scale: int) -> np.ndarray:
    """ChenYingpeng/darknet2caffe upsample_layer: every top (h, w) takes bottom (h / scale, w / scale)."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, h * scale, w * scale))
    for i in range(h * scale):
        for j in range(w * scale):
            out[:, :, i, j] = x[:, :, i // scale, j // scale]
    return out


def max_unpool(x: np.ndarray, mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """alexgkendall/caffe-segnet upsample_layer.cpp Forward_cpu: a zero top, then ``top[mask[i]] = x[i]``
    for every i of each (n, c) plane in order."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, out_h * out_w))
    for b in range(n):
        for k in range(c):
            plane_x, plane_m = x[b, k].reshape(-1), mask[b, k].reshape(-1)
            for i in range(h * w):
                idx = int(plane_m[i])
                assert 0 <= idx < out_h * out_w
                out[b, k, idx] = plane_x[i]
    return out.reshape(n, c, out_h, out_w)


def max_pool_mask(x: np.ndarray, kernel: int, stride: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """BVLC PoolingLayer::Forward_cpu MAX with a mask top (CEIL rounding): each output is the first strictly
    larger value of its window in row-major order, the mask its ``h * W + w`` (-1 for an empty window)."""
    n, c, h, w = x.shape
    oh = int(np.ceil((h + 2 * pad - kernel) / stride)) + 1
    ow = int(np.ceil((w + 2 * pad - kernel) / stride)) + 1
    if pad:
        oh -= (oh - 1) * stride >= h + pad
        ow -= (ow - 1) * stride >= w + pad
    top = np.full((n, c, oh, ow), -np.finfo(np.float32).max, np.float64)
    mask = np.full((n, c, oh, ow), -1.0)
    for b in range(n):
        for k in range(c):
            for ph in range(oh):
                for pw in range(ow):
                    hs, ws = ph * stride - pad, pw * stride - pad
                    he, we = min(hs + kernel, h), min(ws + kernel, w)
                    for hh in range(max(hs, 0), he):
                        for ww in range(max(ws, 0), we):
                            if x[b, k, hh, ww] > top[b, k, ph, pw]:
                                top[b, k, ph, pw] = x[b, k, hh, ww]
                                mask[b, k, ph, pw] = hh * w + ww
    return top, mask


def bn_segnet(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, inference: bool) -> np.ndarray:
    """alexgkendall/caffe-segnet bn_layer.cpp: INFERENCE ``scale * x + shift``; LEARN normalises with the
    batch's ``E[x]`` and ``E[x^2] - E[x]^2`` (over N, H, W) and ``var_eps = 1e-9`` first."""
    x64 = x.astype(np.float64)
    s, b = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
    if inference:
        return s * x64 + b
    mean = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = (x64 ** 2).mean(axis=(0, 2, 3), keepdims=True) - mean ** 2
    return s * (x64 - mean) / np.sqrt(var + 1e-9) + b


def bn_pspnet(x: np.ndarray, blobs: list[np.ndarray], eps: float, use_stored: bool,
              momentum: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hszhao/PSPNet bn_layer.cpp Forward_cpu: the stored mean/variance (TEST or frozen) or the batch's
    (biased variance) normalise, then slope and bias; in the batch case the stored statistics become
    ``(1 - momentum) * batch + momentum * stored``. Returns (top, new stored mean, new stored variance)."""
    x64 = x.astype(np.float64)
    slope, bias, mean_s, var_s = (b.reshape(1, -1, 1, 1).astype(np.float64) for b in blobs)
    if use_stored:
        mean, var = mean_s, var_s
        new_mean, new_var = mean_s, var_s
    else:
        mean = x64.mean(axis=(0, 2, 3), keepdims=True)
        var = ((x64 - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        new_mean = (1 - momentum) * mean + momentum * mean_s
        new_var = (1 - momentum) * var + momentum * var_s
    top = slope * (x64 - mean) / np.sqrt(var + eps) + bias
    return top, new_mean.reshape(-1), new_var.reshape(-1)


def depthwise_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, kernel: int, stride: int,
                   pad: int, dilation: int = 1) -> np.ndarray:
    """farmingyard/caffe-mobilenet conv_dw_layer.cpp Forward_cpu: per channel, the zero-padded dilated window
    times that channel's ``kernel x kernel`` filter, plus its bias."""
    n, c, h, w = x.shape
    ext = dilation * (kernel - 1) + 1
    oh, ow = (h + 2 * pad - ext) // stride + 1, (w + 2 * pad - ext) // stride + 1
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad))
    padded[:, :, pad:pad + h, pad:pad + w] = x
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            for kh in range(kernel):
                for kw in range(kernel):
                    tap = padded[:, :, i * stride + kh * dilation, j * stride + kw * dilation]
                    out[:, :, i, j] += tap * weight[:, 0, kh, kw].astype(np.float64)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def numeric_grad(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, top_diff: np.ndarray,
                 eps: float = 1e-3) -> np.ndarray:
    """Central finite differences of ``sum(f(x) * top_diff)`` with respect to ``x`` (float64)."""
    x = x.astype(np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = float((f(x) * top_diff).sum())
        flat[i] = keep - eps
        down = float((f(x) * top_diff).sum())
        flat[i] = keep
        gflat[i] = (up - down) / (2 * eps)
    return grad
