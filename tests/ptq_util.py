"""Shared pieces of the post-training quantization tests: a small net, its random weights, and numpy
references of the formulas (IFMR, ARQ, BatchNorm folding, rounding) written for the tests from the documented
formulas, independent of the code under test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from amct_caffe.proto import amct_pb2, caffe_pb2

EPS = np.float32(2.0**-23)

# conv1 (+ BatchNorm + Scale in place, ReLU) -> AVE pool1 -> conv2a / conv2b (one input, two readers) ->
# Eltwise -> ip1 (+ BatchNorm + Scale, not in place) -> Softmax. Quantizable: conv1, pool1, conv2a, conv2b,
# ip1; the IFMR groups: data -> conv1, conv1 -> pool1, pool1 -> conv2a + conv2b, sum -> ip1.
NET = """
name: "ptqnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "conv2a" type: "Convolution" bottom: "pool1" top: "conv2a"
        convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "conv2b" type: "Convolution" bottom: "pool1" top: "conv2b"
        convolution_param { num_output: 3 kernel_size: 1 bias_term: false } }
layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }
layer { name: "ip1" type: "InnerProduct" bottom: "sum" top: "ip1" inner_product_param { num_output: 5 } }
layer { name: "bn_ip" type: "BatchNorm" bottom: "ip1" top: "bn_ip" }
layer { name: "scale_ip" type: "Scale" bottom: "bn_ip" top: "scale_ip" scale_param { bias_term: true } }
layer { name: "prob" type: "Softmax" bottom: "scale_ip" top: "prob" }
"""
QUANTIZED = ["conv1", "pool1", "conv2a", "conv2b", "ip1"]


def parse_net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Merge(text, caffe_pb2.NetParameter())


def write_net(folder: Path, text: str = NET, name: str = "model", seed: int = 0) -> tuple[str, str]:
    """The prototxt and a caffemodel with random (plausible) weights for it."""
    from amct_caffe.engine.net import Net
    from amct_caffe.engine.randomize import randomize_params

    proto = folder / f"{name}.prototxt"
    proto.write_text(text)
    net = Net(str(proto))
    randomize_params(net, seed)
    caffemodel = folder / f"{name}.caffemodel"
    net.save(caffemodel)
    return str(proto), str(caffemodel)


def caffemodel_blobs(path: str | Path) -> dict[str, list[np.ndarray]]:
    from amct_caffe.model.blobs import blob_to_array
    from amct_caffe.model.io import load_caffemodel

    return {layer.name: [blob_to_array(b) for b in layer.blobs] for layer in load_caffemodel(path).layer
            if layer.blobs}


def raw_blobs(path: str | Path) -> dict[str, list[caffe_pb2.BlobProto]]:
    from amct_caffe.model.io import load_caffemodel

    return {layer.name: list(layer.blobs) for layer in load_caffemodel(path).layer if layer.blobs}


def read_record(path: str | Path) -> dict[str, amct_pb2.SingleLayerRecord]:
    msg = text_format.Merge(Path(path).read_text(), amct_pb2.ScaleOffsetRecord())
    return {entry.key: entry.value for entry in msg.record}


def load_net(path: str | Path) -> caffe_pb2.NetParameter:
    return text_format.Merge(Path(path).read_text(), caffe_pb2.NetParameter())


# -- numpy references -------------------------------------------------------------------------------------
def round_away(v: np.ndarray) -> np.ndarray:
    """C round(): ties away from zero, exact (x - trunc(x) is exact)."""
    v = np.asarray(v)
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= 0.5, t + np.sign(v), t).astype(v.dtype)


def arq_numpy(w: np.ndarray, channel_wise: bool, axis: int = 0) -> np.ndarray:
    """ARQ weight scales (AMCT reference §8.2): the largest-magnitude element m per row; m/127 or m/-128."""
    w = np.asarray(w, np.float32)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if channel_wise else w.reshape(1, -1)
    out = []
    for row in rows:
        hi, lo = row.max(), row.min()
        m = hi if abs(hi) > abs(lo) else lo
        s = np.float32(m / np.float32(127)) if m > 0 else np.float32(m / np.float32(-128))
        out.append(np.float32(1.0) if s < EPS else s)
    return np.array(out, np.float32)


def fold_bn_numpy(w: np.ndarray, b: np.ndarray | None, bn: list[np.ndarray], scale: list[np.ndarray],
                  axis: int = 0, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Conv/IP + BatchNorm + Scale folding (AMCT reference §2.2) in float64, stored as float32."""
    factor = float(bn[2].reshape(-1)[0])
    mean = bn[0].astype(np.float64) / factor
    var = bn[1].astype(np.float64) / factor
    k = scale[0].astype(np.float64) / np.sqrt(var + np.float64(np.float32(eps)))
    beta = scale[1].astype(np.float64) if len(scale) > 1 else 0.0
    shape = [1] * w.ndim
    shape[axis] = -1
    bias = b.astype(np.float64) if b is not None else np.zeros(len(k))
    return (w * k.reshape(shape)).astype(np.float32), ((bias - mean) * k + beta).astype(np.float32)


def ifmr_numpy(x: np.ndarray, max_percentile: float = 0.999999, min_percentile: float = 0.999999,
               start: float = 0.7, end: float = 1.3, step: float = 0.01,
               with_offset: bool = True) -> tuple[np.float32, int, float]:
    """IFMR (AMCT reference §8.4) over all of ``x``, every candidate in float32; returns ``(s, o, loss gap)``.

    The gap is the relative distance between the best and the second-best loss (a clear winner cannot be
    flipped by a different float64 summation order).
    """
    x = np.asarray(x, np.float32).ravel()
    n = x.size
    srt = np.sort(x)

    def rank(p: float) -> int:
        return 1 if 1.0 - p < 2.0**-23 else min(max(n - math.floor(p * n), 1), n)

    vmax = max(srt[n - rank(max_percentile)], np.float32(0))
    vmin = min(srt[rank(min_percentile) - 1], np.float32(0))
    count = math.floor((end - start) / step + 1e-9)
    ratios = [np.float32(start + i * step) for i in range(count + 1)]
    biggest = vmax if with_offset else max(abs(vmax), abs(vmin))
    losses, scales, cands = [], [], []
    for r in ratios:
        c = np.float32(r * biggest)
        if with_offset:
            s = np.float32((c - vmin) / np.float32(255))
            lo = vmin
        else:
            s = np.float32(c / np.float32(127))
            lo = -c
        if s < EPS:
            s = np.float32(1)
        q = round_away(np.clip(x, lo, c) / s) * s
        d = (q - x).astype(np.float32)
        losses.append(float(np.sum((d * d).astype(np.float64))))
        scales.append(s)
        cands.append(c)
    best = int(np.argmin(losses))
    ordered = sorted(losses)
    gap = (ordered[1] - ordered[0]) / max(ordered[0], 1e-30) if len(ordered) > 1 else math.inf
    s = scales[best]
    if not with_offset:
        return s, 0, gap
    o = int(-round_away(np.array([vmin / s], np.float32))[0] - 128)
    return s, o, gap
