"""Numpy references of the end-to-end refinement's formulas (``refine="end_to_end"``), written from
docs/design.md ("Post-training refinement"): the straight-through INT8 codes and bias grid, and the
fake-quant forward of the small test net of tests/test_ptq_fidelity.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tests.references import layers
from tests.references.quant import INT8_MAX, INT8_MIN, round_away


def ste_codes(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, d codes / d u)`` of latent weights ``u``: ``clip(round_away(u), -128, 127)``; the
    straight-through gradient is 1 where the rounded value lies inside the INT8 range, else 0."""
    rounded = round_away(np.asarray(u, np.float64))
    inside = (rounded >= INT8_MIN) & (rounded <= INT8_MAX)
    return np.clip(rounded, INT8_MIN, INT8_MAX), inside.astype(np.float64)


def bias_on_grid(b: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The bias on its INT32 grid: ``round_away(b / step) * step`` (``step = s_d * s_w`` per channel)."""
    return round_away(np.asarray(b, np.float64) / step) * step


def fake_quant_input(x: np.ndarray, scale_d: float, offset_d: int) -> np.ndarray:
    """A ``Quant`` layer's float output ``(clip(round_away(x / s_d) + o_d, -128, 127) - o_d) * s_d``."""
    s_d = np.float64(np.float32(scale_d))
    codes = np.clip(round_away(np.asarray(x, np.float64) / s_d) + offset_d, INT8_MIN, INT8_MAX)
    return (codes - offset_d) * s_d


def tiny_forward(x: np.ndarray, blobs: Mapping[str, list[np.ndarray]],
                 factors: Mapping[str, tuple[float, int]] | None = None) -> np.ndarray:
    """The small test net (conv1 3x3 pad 1 -> ReLU -> conv2 3x3 without bias -> InnerProduct) in float64
    with the given blobs; with ``factors`` (``{layer: (scale_d, offset_d)}``) each layer's input is
    fake-quantized first, as the fake-quant model does."""
    def inp(name: str, v: np.ndarray) -> np.ndarray:
        return v if factors is None else fake_quant_input(v, *factors[name])

    y = layers.conv2d(inp("conv1", x), blobs["conv1"][0], blobs["conv1"][1], pad=1)
    y = np.maximum(y, 0.0)
    y = layers.conv2d(inp("conv2", y), blobs["conv2"][0], None)
    return layers.inner_product(inp("ip", y), blobs["ip"][0], blobs["ip"][1])
