"""Numpy references of Caffe's layer arithmetic, written from Caffe's algorithms as loops.

Float results are accumulated in float64 (exact products of float32 values, so they differ from the engine's
float32 arithmetic only by its rounding); the convolutions also run in int64 for the deploy model's integer
arithmetic (``dtype=np.int64``), where every sum is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)
Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# -- Convolution / Deconvolution -----------------------------------------------------------------------------
def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: Pair = 1, pad: Pair = 0,
           dilation: Pair = 1, group: int = 1, dtype: type = np.float64) -> np.ndarray:
    """Caffe's Convolution (a cross-correlation) of NCHW ``x`` with OIHW ``w``, computed in ``dtype``.

    The input is zero-padded; for every kernel tap the strided, dilated input window is multiplied by that
    tap of the filter and summed over the group's input channels. ``stride``/``pad``/``dilation`` are one
    value or ``(h, w)``; the bias (one value per output channel) is added last.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype)
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    wt = np.asarray(w).astype(dtype)
    out = np.zeros((n, o, oh, ow), dtype)
    og = o // group
    for g in range(group):
        xg = xp[:, g * cg:(g + 1) * cg]
        wg = wt[g * og:(g + 1) * og]
        for ky in range(kh):
            for kx in range(kw):
                rows = slice(ky * dh, ky * dh + sh * (oh - 1) + 1, sh)
                cols = slice(kx * dw, kx * dw + sw * (ow - 1) + 1, sw)
                tap = np.einsum("nchw,oc->nohw", xg[:, :, rows, cols], wg[:, :, ky, kx])
                out[:, g * og:(g + 1) * og] += tap
    if b is not None:
        out += np.asarray(b).astype(dtype)[None, :, None, None]
    return out


def deconv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: Pair = 1, pad: Pair = 0,
             dilation: Pair = 1, group: int = 1, dtype: type = np.float64) -> np.ndarray:
    """Caffe's Deconvolution of NCHW ``x`` with the ``(C_in, C_out/group, kh, kw)`` weight, in ``dtype``.

    A scatter: every input value adds value * filter tap to its strided, dilated output position; the
    full output is then cropped by ``pad`` on each side and the bias added.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    cg = c // group
    fh = (h - 1) * sh + dh * (kh - 1) + 1
    fw = (wd - 1) * sw + dw * (kw - 1) + 1
    full = np.zeros((n, og * group, fh, fw), dtype)
    xt, wt = np.asarray(x).astype(dtype), np.asarray(w).astype(dtype)
    for g in range(group):
        xg = xt[:, g * cg:(g + 1) * cg]
        wg = wt[g * cg:(g + 1) * cg]
        for ky in range(kh):
            for kx in range(kw):
                rows = slice(ky * dh, ky * dh + sh * (h - 1) + 1, sh)
                cols = slice(kx * dw, kx * dw + sw * (wd - 1) + 1, sw)
                full[:, g * og:(g + 1) * og, rows, cols] += np.einsum("nchw,co->nohw", xg, wg[:, :, ky, kx])
    out = full[:, :, ph:fh - ph, pw:fw - pw]
    if b is not None:
        out = out + np.asarray(b).astype(dtype)[None, :, None, None]
    return out


def inner_product(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, axis: int = 1) -> np.ndarray:
    """Caffe's InnerProduct in float64: the axes from ``axis`` on are flattened, ``y = x W^T + b``."""
    rows = int(np.prod(x.shape[:axis]))
    y = np.asarray(x, np.float64).reshape(rows, -1) @ np.asarray(w, np.float64).T
    return y if b is None else y + np.asarray(b, np.float64)


# -- Pooling -------------------------------------------------------------------------------------------------
def pooled_size(size: int, k: int, s: int, p: int, ceil: bool = True, any_pad: int | None = None) -> int:
    """Caffe's pooled output size (PoolingLayer::Reshape), in floats as Caffe computes it: ceil (or floor)
    of ``(size + 2p - k) / s``, plus 1, minus 1 when the last window would start inside the padding."""
    q = (size + 2 * p - k) / s
    pooled = int(math.ceil(q) if ceil else math.floor(q)) + 1
    if (p if any_pad is None else any_pad) and (pooled - 1) * s >= size + p:
        pooled -= 1
    return pooled


def pool2d(x: np.ndarray, method: str, kernel: Pair, stride: Pair, pad: Pair = 0, ceil: bool = True,
           ave_dtype: type = np.float32) -> np.ndarray:
    """Caffe's PoolingLayer::Forward_cpu loops, as a float64 array.

    MAX: the maximum of the window clipped to the input, ``-FLT_MAX`` for a window with no input element.
    AVE: the window sum (float64) divided by ``pool_size``, the window's size clipped to the padded input
    (so padding counts as zeros); the division is done in ``ave_dtype`` -- float32 as Caffe does, float64
    for a float64 forward.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(pad)
    any_pad = ph or pw
    oh = pooled_size(h, kh, sh, ph, ceil, any_pad)
    ow = pooled_size(w, kw, sw, pw, ceil, any_pad)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if method == "MAX":
                he, we = min(hs + kh, h), min(ws + kw, w)
                hs, ws = max(hs, 0), max(ws, 0)
                region = x[:, :, hs:he, ws:we] if he > hs and we > ws else np.zeros((n, c, 0, 0))
                out[:, :, i, j] = region.max(axis=(2, 3)) if region.size else -FLT_MAX
            else:
                he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                pool_size = (he - hs) * (we - ws)
                hs, ws = max(hs, 0), max(ws, 0)
                he, we = min(he, h), min(we, w)
                total = x[:, :, hs:max(he, hs), ws:max(we, ws)].astype(np.float64).sum(axis=(2, 3))
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[:, :, i, j] = total.astype(ave_dtype) / ave_dtype(pool_size)
    return out


def pool2d_grad(x: np.ndarray, top_diff: np.ndarray, method: str, kernel: Pair, stride: Pair,
                pad: Pair = 0) -> np.ndarray:
    """Caffe's PoolingLayer::Backward_cpu: MAX sends each top diff to the first maximum of its window, AVE
    spreads ``diff / pool_size`` over the window (float64)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(pad)
    _, _, oh, ow = top_diff.shape
    grad = np.zeros(x.shape)
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    hs, ws = i * sh - ph, j * sw - pw
                    if method == "MAX":
                        best, idx = -FLT_MAX, None
                        for r in range(max(hs, 0), min(hs + kh, h)):
                            for q in range(max(ws, 0), min(ws + kw, w)):
                                if x[b, ch, r, q] > best:
                                    best, idx = x[b, ch, r, q], (r, q)
                        if idx is not None:
                            grad[b, ch, idx[0], idx[1]] += top_diff[b, ch, i, j]
                    else:
                        he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                        pool_size = (he - hs) * (we - ws)
                        grad[b, ch, max(hs, 0):min(he, h), max(ws, 0):min(we, w)] += (
                            top_diff[b, ch, i, j] / pool_size
                        )
    return grad


# -- BatchNorm, Scale/Bias, and their folding into a convolution -----------------------------------------
def _channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def batchnorm_global(x: np.ndarray, mean_sum: np.ndarray, var_sum: np.ndarray, factor: float,
                     eps: float) -> np.ndarray:
    """Caffe's BatchNorm with the stored statistics (float64), per channel (axis 1).

    The blobs hold sums scaled by a moving-average factor: ``mean = mean_sum / factor``, ``var = var_sum /
    factor`` (a zero factor reads as zero statistics); ``y = (x - mean) / sqrt(var + eps)``. ``eps`` is used
    as given (Caffe's is a float32 field).
    """
    s = 0.0 if factor == 0 else 1.0 / float(factor)
    x = np.asarray(x, np.float64)
    mean = _channel_view(mean_sum, x.ndim) * s
    var = _channel_view(var_sum, x.ndim) * s
    return (x - mean) / np.sqrt(var + eps)


def batchnorm_train(x: np.ndarray, blobs: list[np.ndarray], maf: float,
                    eps: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Caffe's BatchNorm on batch statistics: the output and the updated blobs (float64).

    Per channel over (N, spatial): ``y = (x - mean) / sqrt(var + eps)`` with the biased variance; the blobs
    become ``maf * blob + statistic`` (the variance unbiased by ``m / (m - 1)``) and the factor
    ``maf * factor + 1``.
    """
    x = np.asarray(x, np.float64)
    out = np.empty(x.shape)
    b0, b1, b2 = (np.array(b, np.float64) for b in blobs)
    new0, new1 = b0.copy(), b1.copy()
    for c in range(x.shape[1]):
        vals = x[:, c].reshape(-1)
        m = vals.size
        mean = vals.sum() / m
        var = ((vals - mean) ** 2).sum() / m
        out[:, c] = (x[:, c] - mean) / np.sqrt(var + eps)
        new0[c] = maf * b0[c] + mean
        new1[c] = maf * b1[c] + (m / (m - 1) if m > 1 else 1.0) * var
    return out, [new0, new1, b2 * maf + 1]


def broadcast(x: np.ndarray, p: np.ndarray, axis: int, op: Callable[[float, float], float]) -> np.ndarray:
    """Caffe's Scale/Bias broadcasting, element by element: ``out[idx] = op(x[idx], p[idx[axis : axis +
    p.ndim]])`` (a ``p`` of 0 axes is a scalar)."""
    out = np.empty(x.shape)
    for idx in np.ndindex(*x.shape):
        out[idx] = op(float(x[idx]), float(p[idx[axis:axis + p.ndim]] if p.ndim else p))
    return out


def scale_bias(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None = None,
               axis: int = 1) -> np.ndarray:
    """Caffe's Scale layer: ``x * gamma`` (+ ``beta``), the parameters broadcast from ``axis``."""
    y = broadcast(x, np.asarray(gamma), axis, lambda a, b: a * b)
    return y if beta is None else broadcast(y, np.asarray(beta), axis, lambda a, b: a + b)


def fold_batchnorm(blobs: dict[str, list[np.ndarray]], conv_bias: bool, scale: bool, scale_bias: bool,
                   axis: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm (and Scale) folded into the preceding convolution, in float64, returned as float32.

    ``blobs`` has the layers' blobs under ``"conv"``, ``"bn"`` and ``"scale"``; ``axis`` is the weight's
    output-channel axis (0; 1 for Deconvolution). ``k = gamma / sqrt(var + eps)`` with Caffe's float32
    ``eps``, ``W' = W * k`` along ``axis``, ``b' = (b - mean) * k + beta``, with ``mean = mean_sum /
    factor`` and ``var = var_sum / factor``.
    """
    w = blobs["conv"][0].astype(np.float64)
    c = w.shape[axis]
    b = blobs["conv"][1].astype(np.float64) if conv_bias else np.zeros(c)
    mean_sum, var_sum, factor = (a.astype(np.float64) for a in blobs["bn"])
    s = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    mean, var = mean_sum * s, var_sum * s
    gamma = blobs["scale"][0].astype(np.float64) if scale else np.ones(c)
    beta = blobs["scale"][1].astype(np.float64) if scale and scale_bias else np.zeros(c)
    k = np.empty(c)
    for i in range(c):
        k[i] = gamma[i] / np.sqrt(var[i] + np.float64(np.float32(eps)))
    w_new = w.copy()
    for i in range(c):
        index: list[slice | int] = [slice(None)] * w.ndim
        index[axis] = i
        w_new[tuple(index)] *= k[i]
    return w_new.astype(np.float32), ((b - mean) * k + beta).astype(np.float32)
