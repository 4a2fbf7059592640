"""Numpy references of AMCT's quantization formulas, written from the documented behaviour, one per formula.

AMCT computes in float32 (the activation factors, ARQ, ULQ, IFMR's candidates), except the ``Quant`` layer,
which divides in double precision. The references below keep those dtypes and the documented operation
order, loop element by element or row by row where that is the plainest way to state the rule, and round
with an exact C ``round()`` (half away from zero).
"""

from __future__ import annotations

import decimal
import math
from typing import NamedTuple

import numpy as np

INT8_MIN = -128
INT8_MAX = 127
#: C's FLT_EPSILON: AMCT replaces a scale below it by 1.
FLT_EPSILON = np.float32(2.0**-23)


# -- rounding ----------------------------------------------------------------------------------------------
def round_away(v: np.ndarray | float) -> np.ndarray:
    """C ``round()`` elementwise: nearest integer, ties away from zero, in the input's float dtype.

    ``v - trunc(v)`` is exact in floating point, so the tie test is exact for float32 and float64 alike
    (``floor(v + 0.5)`` is not). inf and NaN pass through. A Python number gives a float64 scalar.
    """
    x = np.asarray(v)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    t = np.trunc(x)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, whose comparison is False: inf stays inf
        out = np.where(np.abs(x - t) >= 0.5, t + np.sign(x), t).astype(x.dtype)
    return out[()]


def round_away_decimal(v: float) -> float:
    """C ``round()`` of one float by decimal arithmetic (``ROUND_HALF_UP`` rounds ties away from zero).

    The float's exact binary value is converted to a Decimal, so no rounding happens before the one asked
    for: a second, independent statement of :func:`round_away` for property tests. inf/NaN pass through.
    """
    if not math.isfinite(v):
        return v
    exact = decimal.Decimal(v)
    with decimal.localcontext() as ctx:
        ctx.prec = 400  # more digits than any double has, so quantize never raises or rounds early
        rounded = exact.quantize(decimal.Decimal(1), rounding=decimal.ROUND_HALF_UP)
    return math.copysign(float(rounded), v)


# -- activation factors and the Quant layer --------------------------------------------------------------
def data_scale_offset(cmax: float, cmin: float, fixed_min: bool = False) -> tuple[np.float32, int]:
    """Activation factors ``(s_d, o_d)`` from clip bounds, in float32.

    ``cmin <= 0 <= cmax`` is enforced by clamping (``fixed_min``: ``cmin = 0``); ``s_d = (cmax - cmin) /
    255``; ``o_d = -round_away(cmin / s_d) - 128``; a scale below FLT_EPSILON gives ``s_d = 1, o_d = -128``.
    """
    hi = np.float32(max(float(cmax), 0.0))
    lo = np.float32(0.0 if fixed_min else min(float(cmin), 0.0))
    s = np.float32((hi - lo) / np.float32(255))
    if s < FLT_EPSILON:
        return np.float32(1.0), INT8_MIN
    return s, int(-round_away(np.float32(lo / s)) - 128)


def quant_layer_codes(x: np.ndarray, scale: float, offset: int) -> np.ndarray:
    """The ``Quant`` layer's INT8 codes: ``s_d = 1 / (double)float32(scale)`` (``scale`` is
    ``quant_param.scale`` = 1/s_d), then ``clamp(round_away(x / s_d) + offset, -128, 127)`` in double."""
    s_d = 1.0 / float(np.float32(scale))
    codes = round_away(np.asarray(x, np.float64) / s_d) + offset
    return np.clip(codes, INT8_MIN, INT8_MAX).astype(np.int64)


def ascend_quant_codes(x: np.ndarray, scale: float, offset: int) -> np.ndarray:
    """The NPU's AscendQuant: ``sat8(round(x * scale + offset))`` in float32 (product, then sum, then C
    ``round()``), with ``scale`` = 1/s_d as the deploy model stores it."""
    product = (np.asarray(x, np.float32) * np.float32(scale)).astype(np.float32)
    shifted = (product + np.float32(offset)).astype(np.float32)
    return np.clip(round_away(shifted), INT8_MIN, INT8_MAX).astype(np.int64)


def dequant(acc: np.ndarray, deq: np.ndarray) -> np.ndarray:
    """The deploy ``DeQuant``: the integer accumulator times ``deq_scale`` (one value, or one per channel on
    axis 1), in float64 and rounded once to float32."""
    d = np.asarray(deq, np.float64)
    view = d.reshape(()) if d.size == 1 else d.reshape([1, -1] + [1] * (acc.ndim - 2))
    return (np.asarray(acc, np.float64) * view).astype(np.float32)


# -- ARQ (weights) -----------------------------------------------------------------------------------------
def _channel_rows(w: np.ndarray, channel_wise: bool, axis: int) -> np.ndarray:
    """The weight as rows, one per channel along ``axis`` (or a single row for the whole tensor)."""
    if not channel_wise:
        return w.reshape(1, -1)
    moved = np.moveaxis(w, axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _along(scales: np.ndarray, ndim: int, channel_wise: bool, axis: int) -> np.ndarray:
    """The scales shaped to broadcast against a weight of ``ndim`` axes."""
    shape = [1] * ndim
    if channel_wise:
        shape[axis] = -1
    return scales.reshape(shape)


def arq_scales(w: np.ndarray, channel_wise: bool = True, axis: int = 0) -> np.ndarray:
    """ARQ weight scales (float32), one per channel along ``axis`` or one for the tensor.

    Per row: ``m`` is the element of largest magnitude (``max`` if ``|max| > |min|``, else ``min``);
    ``s = m / 127`` if ``m > 0`` else ``m / -128``; a scale below FLT_EPSILON becomes 1.
    """
    scales = []
    for row in _channel_rows(np.asarray(w, np.float32), channel_wise, axis):
        hi, lo = row.max(), row.min()
        m = hi if abs(hi) > abs(lo) else lo
        s = m / np.float32(127) if m > 0 else m / np.float32(-128)
        scales.append(np.float32(1.0) if s < FLT_EPSILON else s)
    return np.array(scales, dtype=np.float32)


def arq_codes(w: np.ndarray, scales: np.ndarray, channel_wise: bool = True, axis: int = 0) -> np.ndarray:
    """ARQ codes ``clamp(round_away(w / s), -128, 127)`` (int64), the float32 quotient rounded exactly."""
    w = np.asarray(w, np.float32)
    s = _along(np.asarray(scales, np.float32), w.ndim, channel_wise, axis)
    return np.clip(round_away(w / s), INT8_MIN, INT8_MAX).astype(np.int64)


def arq_fake_quant(w: np.ndarray, channel_wise: bool = True,
                   axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ARQ fake quantization ``(w_hat, scales)``: ``w_hat = codes * s`` in float32."""
    w = np.asarray(w, np.float32)
    scales = arq_scales(w, channel_wise, axis)
    codes = arq_codes(w, scales, channel_wise, axis)
    w_hat = codes.astype(np.float32) * _along(scales, w.ndim, channel_wise, axis)
    return w_hat.astype(np.float32), scales


# -- ULQ (activations in training) ---------------------------------------------------------------------------
def clip_check(
    cmax: float, cmin: float, pre: tuple[float, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """AMCT's ClipCheck of learned clips against the previous good ones: ``(accepted, new previous)``.

    ``cmax <= cmin``: restore both; else ``cmax < 0``: restore cmax, accept cmin; else ``cmin > 0``: restore
    cmin, accept cmax; else accept both. The accepted values become the new previous values.
    """
    if cmax <= cmin:
        return pre, pre
    if cmax < 0:
        new = (pre[0], cmin)
    elif cmin > 0:
        new = (cmax, pre[1])
    else:
        new = (cmax, cmin)
    return new, new


class UlqGrid(NamedTuple):
    """ULQ's grid in float32: the scale, the integer grid offset and the grid-aligned clamp bounds."""

    s: np.float32
    o_ulq: np.float32
    lower: np.float32
    upper: np.float32


def ulq_grid(cmax: float, cmin: float, fixed_min: bool = False) -> UlqGrid:
    """``s = (cmax - cmin) / 255``, ``o_ulq = round_away(cmin / s)``, bounds ``s*o_ulq`` and
    ``s*(o_ulq + 255)``, in float32 (clips clamped to ``cmin <= 0 <= cmax`` as the factors are)."""
    s, o_d = data_scale_offset(cmax, cmin, fixed_min)
    o = np.float32(-o_d - 128)
    return UlqGrid(s, o, s * o, s * (o + np.float32(255)))


def ulq_forward(x: np.ndarray, cmax: float, cmin: float, fixed_min: bool = False) -> np.ndarray:
    """ULQ's training forward in float32, one element at a time: clamp to the grid-aligned bounds, then
    ``rint(v / s) * s`` (``rint``: half to even, as AMCT's ULQ kernel rounds)."""
    g = ulq_grid(cmax, cmin, fixed_min)
    x = np.asarray(x, np.float32)
    y = np.empty_like(x)
    for i, v in np.ndenumerate(x):
        y[i] = np.float32(np.rint(np.clip(v, g.lower, g.upper) / g.s)) * g.s
    return y


def ulq_backward(
    x: np.ndarray, dy: np.ndarray, cmax: float, cmin: float
) -> tuple[np.ndarray, float, float]:
    """ULQ's straight-through gradients ``(dx, dcmax, dcmin)``, summed in float64, one element at a time.

    ``dx = dy`` inside the grid-aligned bounds, else 0. With ``D(v) = (round_away(q) - q) / 255``, ``q``
    evaluated as AMCT's code does, ``v * 255 / (cmax - cmin)``:
    above the upper bound ``dcmax += dy*(D(cmin) + 1)``, ``dcmin += -dy*D(cmin)``; below the lower bound
    ``dcmax += dy*D(cmin)``, ``dcmin += dy*(1 - D(cmin))``; inside ``dcmax += dy*D(x)``,
    ``dcmin += -dy*D(x)``.
    ``cmax``/``cmin`` are the values the forward used (clamped to ``cmin <= 0 <= cmax`` like it).
    """
    g = ulq_grid(cmax, cmin)
    hi, lo = np.float32(max(float(cmax), 0.0)), np.float32(min(float(cmin), 0.0))
    span = float(hi - lo)

    def d(v: float) -> float:
        q = v * 255.0 / span
        return float(round_away(q) - q) / 255.0

    x = np.asarray(x, np.float32)
    dy = np.asarray(dy, np.float32)
    dx = np.zeros_like(dy)
    gmax = gmin = 0.0
    d_cmin = d(float(lo))
    for i, v in np.ndenumerate(x):
        grad = float(dy[i])
        if v > g.upper:
            gmax += grad * (d_cmin + 1)
            gmin += -grad * d_cmin
        elif v < g.lower:
            gmax += grad * d_cmin
            gmin += grad * (1 - d_cmin)
        else:
            gmax += grad * d(float(v))
            gmin += -grad * d(float(v))
            dx[i] = dy[i]
    return dx, gmax, gmin


def ulq_residual(v: np.ndarray, s: float) -> np.ndarray:
    """The rounding residual ``r = round_away(v / s) - v / s`` (float64) that ULQ's gradients freeze."""
    q = np.asarray(v, np.float64) / s
    return round_away(q) - q


def ulq_surrogate(x: np.ndarray, cmax: float, cmin: float, r: np.ndarray) -> np.ndarray:
    """The function ULQ's straight-through gradients are the exact derivatives of, elementwise (float64):
    ``y = v + s*r`` with ``v = clamp(x, cmin, cmax)``, ``s = (cmax - cmin) / 255`` and the rounding residual
    ``r`` held fixed (:func:`ulq_residual` of ``v`` at the base point). At the base point it equals the
    forward, except at exact ties (the forward rounds half to even)."""
    v = np.clip(np.asarray(x, np.float64), cmin, cmax)
    return v + (cmax - cmin) / 255.0 * r


# -- IFMR (calibration of the clips) -------------------------------------------------------------------------
class IfmrResult(NamedTuple):
    """IFMR's outcome: the factors, the index of the winning candidate and every candidate's loss."""

    s: np.float32
    o: int
    best: int
    losses: np.ndarray

    @property
    def gap(self) -> float:
        """The relative distance between the best and the second-best loss (inf for one candidate): a clear
        winner, which a different float64 summation order cannot flip, has a gap well above 1e-9."""
        if len(self.losses) < 2:
            return math.inf
        ordered = np.sort(self.losses)
        return float((ordered[1] - ordered[0]) / max(ordered[0], 1e-30))


def percentile_rank(n: int, p: float) -> int:
    """The 1-based rank, counted from the top (or the bottom), of the ``p`` percentile of ``n`` sorted
    values: ``n - floor(p n)`` within ``[1, n]``; a ``p`` within FLT_EPSILON of 1 is the extreme itself."""
    if 1.0 - p < 2.0**-23:
        return 1
    return min(max(n - math.floor(p * n), 1), n)


def ifmr(x: np.ndarray, with_offset: bool = True, *, max_percentile: float = 0.999999,
         min_percentile: float = 0.999999, start: float = 0.7, end: float = 1.3,
         step: float = 0.01) -> IfmrResult:
    """IFMR over all of ``x``, every candidate tried in float32 (AMCT's defaults unless given).

    ``max`` is the value of :func:`percentile_rank` ``(n, max_percentile)`` from the top of the sorted data,
    ``min`` the one of ``min_percentile`` from the bottom, clamped to ``max >= 0`` and ``min <= 0``
    (fewer than 10**6 values with the default 0.999999: the extremes). For ``i = 0..floor((end - start) /
    step)`` the candidate clip is ``c = float32(start + i step) * m`` (``m = max`` with offset, else
    ``max(|max|, |min|)``), the scale ``(c - min) / 255`` (without offset ``c / 127``, clamping to
    ``[-c, c]``), below FLT_EPSILON 1; the loss is the sum of the squared float32 errors of
    ``round_away(clamp(x) / s) * s``, summed in float64. The minimum wins (the first on equal losses);
    ``o = -round_away(min / s) - 128`` (0 without offset).
    """
    x = np.asarray(x, np.float32).reshape(-1)
    n = x.size
    ordered = np.sort(x)
    vmax = max(ordered[n - percentile_rank(n, max_percentile)], np.float32(0))
    vmin = min(ordered[percentile_rank(n, min_percentile) - 1], np.float32(0))
    m = vmax if with_offset else max(abs(vmax), abs(vmin))
    count = math.floor((end - start) / step + 1e-9) + 1
    losses, scales = [], []
    for i in range(count):
        c = np.float32(start + i * step) * m
        low = vmin if with_offset else -c
        s = (c - vmin) / np.float32(255) if with_offset else c / np.float32(127)
        if s < FLT_EPSILON:
            s = np.float32(1)
        q = round_away(np.clip(x, low, c) / s) * s
        err = (q - x).astype(np.float32)
        losses.append(float(np.sum((err * err).astype(np.float64))))
        scales.append(s)
    best = int(np.argmin(losses))
    s = scales[best]
    o = int(-round_away(vmin / s) - 128) if with_offset else 0
    return IfmrResult(s, o, best, np.array(losses))


def ifmr_clips(x: np.ndarray) -> tuple[float, float]:
    """ULQ's clip initialisation from IFMR (with offset): ``cmin = -(o + 128) s``, ``cmax = cmin + 255 s``
    in float32; returns ``(cmax, cmin)``."""
    r = ifmr(x, with_offset=True)
    cmin = -(np.float32(r.o) + np.float32(128)) * r.s
    return float(cmin + np.float32(255) * r.s), float(cmin)
