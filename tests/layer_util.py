"""Building one engine layer from its LayerParameter text, for the per-layer tests."""

from __future__ import annotations

import numpy as np
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers import layer_class
from amct_caffe.engine.layers.base import TEST, Layer
from amct_caffe.proto import caffe_pb2

CPU = torch.device("cpu")


def make_layer(text: str, *bottoms: np.ndarray, phase: int = TEST, n_tops: int = 1) -> Layer:
    """A set-up layer from a LayerParameter's text; unnamed bottoms become b0.., tops t0.. (``n_tops``)."""
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    lp.name = lp.name or "L"
    if not lp.bottom:
        lp.bottom.extend(f"b{i}" for i in range(len(bottoms)))
    if not lp.top:
        lp.top.extend(f"t{i}" for i in range(n_tops))
    layer = layer_class(lp.type)(lp, phase, CPU)
    layer.setup([torch.from_numpy(b) for b in bottoms])
    return layer
