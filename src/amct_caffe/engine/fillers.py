"""Caffe's weight fillers (``FillerParameter``), filling float32 tensors in place.

Random fillers draw from one torch generator, seeded by :func:`set_random_seed` (pycaffe's
``caffe.set_random_seed``), so nets built after a seed are reproducible.
"""

from __future__ import annotations

import math

import torch

from amct_caffe.errors import ModelFormatError
from amct_caffe.proto import caffe_pb2

_GENERATOR = torch.Generator().manual_seed(1701)


def set_random_seed(seed: int) -> None:
    """Seed the generator every random filler draws from."""
    _GENERATOR.manual_seed(int(seed))


def _fan(blob: torch.Tensor, norm: int) -> float:
    # Caffe: fan_in = count / shape[0], fan_out = count / shape[1] (num_axes >= 2 assumed, 1 for vectors)
    count = blob.numel()
    fan_in = count / blob.shape[0] if blob.dim() >= 1 and blob.shape[0] else float(count)
    fan_out = count / blob.shape[1] if blob.dim() >= 2 and blob.shape[1] else float(count)
    if norm == caffe_pb2.FillerParameter.FAN_OUT:
        return fan_out
    if norm == caffe_pb2.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(blob: torch.Tensor, filler: caffe_pb2.FillerParameter) -> torch.Tensor:
    """Fill ``blob`` (CPU, float32) in place as Caffe's filler of type ``filler.type`` does."""
    kind = filler.type or "constant"
    g = _GENERATOR
    if kind == "constant":
        blob.fill_(filler.value)
    elif kind == "uniform":
        blob.uniform_(filler.min, filler.max, generator=g)
    elif kind == "gaussian":
        blob.normal_(filler.mean, filler.std, generator=g)
        if filler.sparse >= 0 and blob.dim() >= 1:
            # Caffe keeps each weight with probability sparse / shape[0] and zeroes the rest.
            non_zero_prob = filler.sparse / blob.shape[0]
            mask = torch.rand(blob.shape, generator=g) < non_zero_prob
            blob.mul_(mask)
    elif kind == "positive_unitball":
        blob.uniform_(0.0, 1.0, generator=g)
        rows = blob.reshape(blob.shape[0], -1)
        rows.div_(rows.sum(dim=1, keepdim=True))
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _fan(blob, filler.variance_norm))
        blob.uniform_(-scale, scale, generator=g)
    elif kind == "msra":
        std = math.sqrt(2.0 / _fan(blob, filler.variance_norm))
        blob.normal_(0.0, std, generator=g)
    elif kind == "bilinear":
        _bilinear(blob)
    else:
        raise ModelFormatError(
            f"Unknown filler type '{kind}'; Caffe knows constant, uniform, gaussian, positive_unitball, "
            "xavier, msra and bilinear."
        )
    return blob


def _bilinear(blob: torch.Tensor) -> None:
    """Caffe's bilinear upsampling kernel (for Deconvolution), identical for every (out, in) pair."""
    if blob.dim() != 4 or blob.shape[2] != blob.shape[3]:
        raise ModelFormatError("The bilinear filler needs a 4-D blob with square kernels.")
    k = blob.shape[3]
    f = math.ceil(k / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    idx = torch.arange(k, dtype=torch.float64)
    line = 1 - (idx / f - c).abs()
    kernel = (line[:, None] * line[None, :]).to(blob.dtype)
    blob.copy_(kernel.expand_as(blob))
