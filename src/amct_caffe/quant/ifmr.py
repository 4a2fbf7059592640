"""IFMR: AMCT's activation calibration by clip search (docs/amct-reference.md §8.4), used
to initialise ULQ clips.

Algorithm, on the flattened data ``x`` (n values, sorted ascending as ``x_(1) <= ... <= x_(n)``):

1. Percentiles. ``max`` is the k-th largest value and ``min`` the k'-th smallest, where
   ``k = n - floor(max_percentile * n)`` (counted from the top, 1-based) and
   ``k' = n - floor(min_percentile * n)`` (counted from the bottom); a percentile with
   ``1 - p < FLT_EPSILON`` gives rank 1 (the extreme), and ranks are kept in [1, n]. So with the default
   0.999999 both are the true extremes unless n exceeds a million. Example: n = 10, max_percentile = 0.8 ->
   k = 2, the second-largest value. ``floor(p * n)`` is evaluated in double precision on the given ``p``.
   Then ``max = max(max, 0)``, ``min = min(min, 0)``.
2. Candidates ``c_i = (search_start + i*search_step) * max`` for ``i = 0 .. floor((end - start)/step)``
   (the end is included when it lies on the step grid, with a 1e-9 tolerance for the decimal steps);
   ``s_i = (c_i - min)/255`` (below FLT_EPSILON -> 1.0); loss ``MSE(round_away(clamp(x, min, c_i)/s_i)*s_i,
   x)``. The first candidate of least loss wins (losses are summed in float64; the quantization itself
   runs in the data's dtype, float32 as in AMCT's C++ library).
3. ``(s, o) = data_scale_offset(min, c_best)``: ``s = (c_best - min)/255``, ``o = -round_away(min/s) - 128``.

``with_offset=False`` (PTQ's ``activation_offset: false``; QAT never uses it) is the symmetric variant.
ASSUMPTION (AMCT's symmetric C++ code is not public): ``M = max(|max|, |min|)``, candidates
``c_i = ratio_i * M``, ``s_i = c_i/127``, loss on ``clamp(x, -c_i, c_i)``, ``o = 0``; AMCT-PyTorch divides
by 128 instead of 127 when the negative extreme dominates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from amct_caffe.errors import ConfigError
from amct_caffe.quant.numerics import (
    DATA_SPAN,
    FLT_EPSILON,
    INT8_MAX,
    INT8_MIN,
    ArrayLike,
    QuantDataError,
    Tensor,
    as_float_tensor,
    as_tensor,
    check_finite,
    data_scale_offset,
    div_exact,
    process_scale,
    round_away,
)


def percentile_rank(n: int, percentile: float) -> int:
    """1-based rank, counted from the extreme, of the value IFMR takes for ``percentile`` of ``n`` values."""
    if 1.0 - percentile < FLT_EPSILON:
        return 1
    return min(max(n - math.floor(percentile * n), 1), n)


def search_ratios(search_start: float, search_end: float, search_step: float) -> list[float]:
    """The clip ratios IFMR tries: ``start + i*step`` for ``i = 0 .. floor((end - start)/step)``."""
    count = math.floor((search_end - search_start) / search_step + 1e-9)
    return [search_start + i * search_step for i in range(count + 1)]


def check_params(
    max_percentile: float, min_percentile: float, search_start: float, search_end: float, search_step: float
) -> None:
    """The IFMR parameters the algorithm can run with (``ConfigError`` otherwise); the configs check AMCT's
    narrower documented ranges themselves."""
    for name, p in (("max_percentile", max_percentile), ("min_percentile", min_percentile)):
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"IFMR {name} must be in (0, 1], got {p}.")
    if not search_step > 0.0:
        raise ConfigError(f"IFMR search_step must be > 0, got {search_step}.")
    if not 0.0 < search_start <= search_end:
        raise ConfigError(
            f"IFMR search range must satisfy 0 < search_range_start <= search_range_end, got "
            f"[{search_start}, {search_end}]."
        )


#: Elements of the (candidates x data) block the loss search evaluates at once: bounds the temporary
#: memory of the vectorised search (about 16 MiB per float32 temporary) whatever the data size.
LOSS_BLOCK_ELEMENTS = 1 << 22


def ifmr(
    data: ArrayLike,
    max_percentile: float = 0.999999,
    min_percentile: float = 0.999999,
    search_start: float = 0.7,
    search_end: float = 1.3,
    search_step: float = 0.01,
    with_offset: bool = True,
) -> tuple[Tensor, Tensor]:
    """IFMR activation factors ``(s, o)`` of ``data`` (any shape; see the module docstring).

    Returns 0-d tensors in the data's floating dtype (``o`` integer-valued). Data with inf/NaN, or no data,
    raises :class:`~amct_caffe.quant.numerics.QuantDataError`; bad parameters raise ``ConfigError``.
    """
    return ifmr_gathered([as_float_tensor(data)], max_percentile, min_percentile, search_start, search_end,
                         search_step, with_offset)


def ifmr_gathered(
    chunks: Sequence[Tensor],
    max_percentile: float = 0.999999,
    min_percentile: float = 0.999999,
    search_start: float = 0.7,
    search_end: float = 1.3,
    search_step: float = 0.01,
    with_offset: bool = True,
) -> tuple[Tensor, Tensor]:
    """IFMR over the concatenation of ``chunks`` without concatenating them (the calibration batches).

    The result is that of :func:`ifmr` on ``torch.cat([c.reshape(-1) for c in chunks])``: the percentile
    values are the k-th largest/smallest of all values (from each chunk's top-k), and the loss of every
    candidate is summed over the chunks. The search is vectorised over the candidates: blocks of
    ``LOSS_BLOCK_ELEMENTS`` (candidate, value) pairs run as single tensor operations on the chunks' device.
    A chunk listed twice counts twice. Chunks must share one floating dtype and device.
    """
    check_params(max_percentile, min_percentile, search_start, search_end, search_step)
    flat = [c.reshape(-1) for c in chunks if c.numel()]
    n = sum(c.numel() for c in flat)
    if n == 0:
        raise QuantDataError("IFMR calibration got an empty tensor; there is no data to calibrate on.")
    for c in flat:
        check_finite(c, "calibration data")

    vmax = _kth_extreme(flat, percentile_rank(n, max_percentile), largest=True)
    vmin = _kth_extreme(flat, percentile_rank(n, min_percentile), largest=False)
    vmax = torch.clamp(vmax, min=0.0)
    vmin = torch.clamp(vmin, max=0.0)
    ratios = torch.tensor(search_ratios(search_start, search_end, search_step), dtype=vmax.dtype,
                          device=vmax.device)

    if with_offset:
        cands = ratios * vmax
        scales, _ = data_scale_offset(vmin, cands)
        lows = vmin.expand_as(cands)
    else:
        cands = ratios * torch.maximum(vmax.abs(), vmin.abs())
        scales = process_scale(div_exact(cands, INT8_MAX), "activation")
        lows = -cands

    losses = torch.zeros(len(cands), dtype=torch.float64, device=vmax.device)
    for c in flat:
        losses += _clip_losses(c, lows, cands, scales)
    best = int(torch.argmin(losses))  # the first candidate of least loss

    if with_offset:
        return data_scale_offset(vmin, cands[best])
    return scales[best], torch.zeros_like(scales[best])


def _kth_extreme(flat: Sequence[Tensor], k: int, largest: bool) -> Tensor:
    """The k-th largest (or smallest) value of all chunks together (1-based ``k``), as a 0-d tensor."""
    if len(flat) == 1:
        x = flat[0]
        return torch.kthvalue(x, x.numel() - k + 1 if largest else k).values
    tops = torch.cat([torch.topk(c, min(k, c.numel()), largest=largest).values for c in flat])
    return torch.topk(tops, k, largest=largest).values[-1]


def _clip_losses(x: Tensor, lows: Tensor, highs: Tensor, scales: Tensor) -> Tensor:
    """``sum((round_away(clamp(x, low_i, high_i) / s_i) * s_i - x)^2)`` for every candidate ``i`` (float64).

    Each block is one broadcast over (candidates, values); the quantization runs in ``x``'s dtype, the sums
    in float64.
    """
    count = len(highs)
    lo, hi, s = lows.reshape(-1, 1), highs.reshape(-1, 1), scales.reshape(-1, 1)
    step = max(1, LOSS_BLOCK_ELEMENTS // count)
    total = torch.zeros(count, dtype=torch.float64, device=x.device)
    for start in range(0, x.numel(), step):
        block = x[start:start + step].reshape(1, -1)
        q = round_away(torch.minimum(torch.maximum(block, lo), hi) / s) * s
        total += torch.sum((q - block) ** 2, dim=1, dtype=torch.float64)  # n * MSE: same argmin
    return total


def ifmr_to_clips(s: ArrayLike, o: ArrayLike) -> tuple[Tensor, Tensor]:
    """ULQ clip initialisation from IFMR factors (AMCT reference §3.4 step 3): ``(cmin, cmax)``.

    ``cmin = -(o + 128)*s``, ``cmax = cmin + 255*s`` -- the GPU build's order (AMCT's CPU build computes
    ``cmax`` from the stale ``cmin``, a bug not reproduced). The clips are grid-aligned, so
    ``data_scale_offset(cmin, cmax)`` gives back ``(s, o)`` up to float rounding of ``s``.
    """
    s_t = as_float_tensor(s)
    o_t = as_tensor(o, like=s_t)
    cmin = -(o_t - INT8_MIN) * s_t
    return cmin, cmin + DATA_SPAN * s_t
