"""Plausible random values for every learnable blob of a net, for models shipped without weights.

Prototxt-only models (e.g. a deploy prototxt with no fillers) would otherwise run with all-zero weights and
BatchNorm statistics whose scale factor is 0, which says nothing about an engine or a quantizer. The values
here keep activations at a sane scale through deep nets: He-scaled weights, small biases, BatchNorm
statistics with variances near 1 stored with a non-trivial scale factor, Scale gammas near 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from amct_caffe.engine.net import Net


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32) * math.sqrt(2.0 / max(fan_in, 1))


def random_blob_values(layer_type: str, shapes: list[tuple[int, ...]], rng: np.random.Generator,
                       fan_in: int | None = None) -> list[np.ndarray]:
    """Random values for a layer's blobs, by Caffe type (see the module docstring for the choices)."""
    if layer_type == "BatchNorm" and len(shapes) == 3:
        factor = np.float32(rng.uniform(0.5, 4.0))
        mean = rng.normal(0.0, 0.3, shapes[0]).astype(np.float32)
        var = rng.uniform(0.5, 2.0, shapes[1]).astype(np.float32)
        return [mean * factor, var * factor, np.full(shapes[2], factor, np.float32)]
    if layer_type == "Scale":
        values = [rng.uniform(0.5, 1.5, shapes[0]).astype(np.float32)]
        return values + [rng.normal(0.0, 0.1, s).astype(np.float32) for s in shapes[1:]]
    if layer_type == "PReLU":
        return [rng.uniform(0.0, 0.5, shapes[0]).astype(np.float32)]
    if layer_type == "Normalize":
        return [rng.uniform(5.0, 20.0, shapes[0]).astype(np.float32)]
    values = []
    for i, shape in enumerate(shapes):
        if i == 0 and len(shape) >= 2:
            fan = fan_in if fan_in is not None else int(np.prod(shape[1:]))
            values.append(_he_normal(rng, shape, fan))
        else:
            values.append(rng.normal(0.0, 0.1, shape).astype(np.float32))
    return values


def randomize_params(net: Net, seed: int = 0) -> None:
    """Overwrite every learnable blob of ``net`` with plausible random values (reproducible by ``seed``)."""
    rng = np.random.default_rng(seed)
    for layer in net.engine_layers:
        if not layer.blobs:
            continue
        shapes = [tuple(b.shape) for b in layer.blobs]
        fan_in = None
        if layer.type_name == "Deconvolution" and len(shapes[0]) == 4:
            # Deconvolution weights are [in, out/group, kh, kw]: each output sums over in * kh * kw / stride²
            fan_in = shapes[0][0] * shapes[0][2] * shapes[0][3]
        values = random_blob_values(layer.type_name, shapes, rng, fan_in)
        with torch.no_grad():
            for blob, value in zip(layer.blobs, values):
                blob.copy_(torch.from_numpy(value))
