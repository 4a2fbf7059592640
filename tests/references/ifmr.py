"""The brute-force IFMR search (AMCT reference §8.4) in torch: every clip candidate quantizes every value.

This is the exact definition the fast search of ``amct_caffe.quant.ifmr`` must reproduce bit for bit: the
candidates, scales and quantization run in the data's dtype (float32 as in AMCT's C++ library), each
squared error is formed in that dtype and the losses are summed in float64 over blocks of
``LOSS_BLOCK_ELEMENTS`` (candidate, value) pairs, chunk by chunk; the first candidate of least loss wins.
It costs one clamp/divide/round/multiply/square pass over the data per candidate, so the tests run it on
small data only. (``tests/references/quant.py`` has a plainer numpy statement of the same search.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from amct_caffe.quant.numerics import (
    INT8_MAX,
    QuantDataError,
    check_finite,
    data_scale_offset,
    div_exact,
    process_scale,
    round_away,
)

Tensor = torch.Tensor

#: (candidate, value) pairs of one loss block (the summation order of the float64 losses depends on it).
LOSS_BLOCK_ELEMENTS = 1 << 22


def percentile_rank(n: int, percentile: float) -> int:
    """1-based rank, from the extreme, of the value IFMR takes for ``percentile`` of ``n`` values."""
    if 1.0 - percentile < 2.0**-23:
        return 1
    return min(max(n - math.floor(percentile * n), 1), n)


def search_ratios(start: float, end: float, step: float) -> list[float]:
    """``start + i*step`` for ``i = 0 .. floor((end - start)/step)`` (1e-9 tolerance on the count)."""
    count = math.floor((end - start) / step + 1e-9)
    return [start + i * step for i in range(count + 1)]


def ifmr_exact(
    chunks: Sequence[Tensor],
    max_percentile: float = 0.999999,
    min_percentile: float = 0.999999,
    search_start: float = 0.7,
    search_end: float = 1.3,
    search_step: float = 0.01,
    with_offset: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """IFMR over the concatenation of ``chunks`` by brute force: ``(s, o, losses)`` (0-d tensors in the data's
    dtype; ``losses`` the float64 loss of every candidate)."""
    flat = [c.reshape(-1) for c in chunks if c.numel()]
    n = sum(c.numel() for c in flat)
    if n == 0:
        raise QuantDataError("IFMR calibration got an empty tensor.")
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
        losses += clip_losses(c, lows, cands, scales)
    best = int(torch.argmin(losses))
    if with_offset:
        s, o = data_scale_offset(vmin, cands[best])
        return s, o, losses
    return scales[best], torch.zeros_like(scales[best]), losses


def _kth_extreme(flat: Sequence[Tensor], k: int, largest: bool) -> Tensor:
    if len(flat) == 1:
        x = flat[0]
        return torch.kthvalue(x, x.numel() - k + 1 if largest else k).values
    tops = torch.cat([torch.topk(c, min(k, c.numel()), largest=largest).values for c in flat])
    return torch.topk(tops, k, largest=largest).values[-1]


def clip_losses(x: Tensor, lows: Tensor, highs: Tensor, scales: Tensor) -> Tensor:
    """``sum((round_away(clamp(x, low_i, high_i) / s_i) * s_i - x)^2)`` of every candidate ``i`` (float64)."""
    count = len(highs)
    lo, hi, s = lows.reshape(-1, 1), highs.reshape(-1, 1), scales.reshape(-1, 1)
    step = max(1, LOSS_BLOCK_ELEMENTS // count)
    total = torch.zeros(count, dtype=torch.float64, device=x.device)
    for start in range(0, x.numel(), step):
        block = x[start:start + step].reshape(1, -1)
        q = round_away(torch.minimum(torch.maximum(block, lo), hi) / s) * s
        total += torch.sum((q - block) ** 2, dim=1, dtype=torch.float64)
    return total
