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


#: Elements of the (candidates x data) block the exact loss evaluation runs at once (about 16 MiB per float32
#: temporary); the blocks also fix the order of the float64 sums, which is the brute-force search's.
LOSS_BLOCK_ELEMENTS = 1 << 22
#: Values per step of the histogram pass: its buffers (allocated once) stay in the CPU caches.
PASS_ELEMENTS = 1 << 18
#: Values per row of the data's per-row extremes (see _Rows).
ROW_ELEMENTS = 1 << 10
#: Values in the extreme's own cell above which the k-th extreme is first checked for a repeated extreme.
_SELECT_ELEMENTS = 1 << 16
#: Rows counted at a time when checking for a repeated extreme.
_REPEAT_ROWS = 1 << 6
#: About this many histogram cells span the data's range (the cell width is the power of two above
#: range / HISTOGRAM_CELLS): fine enough that a candidate's rounding boundaries rarely leave doubt.
HISTOGRAM_CELLS = 1 << 18
#: ulps searched on each side of a rounding boundary's float64 estimate (2 always suffice; see _thresholds).
_BOUNDARY_ULPS = 4
_U64 = 2.0**-53  # float64 unit roundoff


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

    The result is exactly that of the brute-force search (every candidate quantizing every value, losses
    summed in float64) on ``torch.cat([c.reshape(-1) for c in chunks])``, at the cost of a few passes over
    the data instead of one per candidate (see :func:`_best_candidate`). A chunk listed twice counts twice.
    Chunks must share one floating dtype and device; everything runs on that device.
    """
    check_params(max_percentile, min_percentile, search_start, search_end, search_step)
    flat = [c.reshape(-1) for c in chunks if c.numel()]
    n = sum(c.numel() for c in flat)
    if n == 0:
        raise QuantDataError("IFMR calibration got an empty tensor; there is no data to calibrate on.")
    rows = _Rows(flat)
    xmin, xmax = rows.extremes()
    check_finite(torch.stack([xmin, xmax]), "calibration data")  # amin/amax propagate NaN

    k_max, k_min = percentile_rank(n, max_percentile), percentile_rank(n, min_percentile)
    hist = _Histogram.of(flat, xmin, xmax) if k_max > 1 or k_min > 1 else None
    vmax = xmax if hist is None or k_max == 1 else hist.kth_extreme(rows, k_max, largest=True)
    vmin = xmin if hist is None or k_min == 1 else hist.kth_extreme(rows, k_min, largest=False)
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
    best = _best_candidate(flat, n, (xmin, xmax), hist, lows, cands, scales)

    if with_offset:
        return data_scale_offset(vmin, cands[best])
    return scales[best], torch.zeros_like(scales[best])


# -- the search --------------------------------------------------------------------------------------------
def _best_candidate(flat: Sequence[Tensor], n: int, extremes: tuple[Tensor, Tensor], hist: _Histogram | None,
                    lows: Tensor, highs: Tensor, scales: Tensor) -> int:
    """Index of the first candidate of least brute-force loss.

    Candidates with equal ``(low, high, scale)`` have equal losses, so only the first of them competes. A
    histogram of the data (power-of-two cells, counts and float64 sums; see :class:`_Histogram`) gives every
    remaining candidate an interval that provably holds its brute-force loss (less the candidate-independent
    ``sum(x^2)``): the values of a cell that no rounding boundary of the candidate cuts share one code, so
    their error is ``n q^2 - 2 q sum(x) + sum(x^2)``; a cut cell bounds what its values can add; the bounds
    also cover the float32 rounding of the brute-force errors and every float64 rounding on both sides. When
    one interval lies below all others its candidate wins; otherwise the brute-force loss of the few
    candidates whose intervals reach the lowest upper bound decides, computed exactly as the brute-force
    search does.
    """
    keys: dict[tuple[float, float, float], int] = {}
    for i, key in enumerate(zip(lows.tolist(), highs.tolist(), scales.tolist(), strict=True)):
        keys.setdefault(key, i)
    distinct = sorted(keys.values())
    if len(distinct) == 1:
        return distinct[0]
    if hist is None:
        hist = _Histogram.of(flat, *extremes)
    pick = torch.tensor(distinct, device=highs.device)
    lower, upper = _loss_bounds(hist, n, lows[pick], highs[pick], scales[pick])
    contenders = [distinct[i] for i in torch.nonzero(lower <= upper.min()).reshape(-1).tolist()]
    if len(contenders) == 1:
        return contenders[0]
    rows = torch.tensor(contenders, device=highs.device)
    step = max(1, LOSS_BLOCK_ELEMENTS // len(highs))  # the brute-force search's blocks
    losses = torch.zeros(len(contenders), dtype=torch.float64, device=highs.device)
    for c in flat:
        losses += _clip_losses(c, lows[rows], highs[rows], scales[rows], step)
    return contenders[int(torch.argmin(losses))]  # the first of least loss, as in the brute-force search


def _clip_losses(x: Tensor, lows: Tensor, highs: Tensor, scales: Tensor, step: int) -> Tensor:
    """``sum((round_away(clamp(x, low_i, high_i) / s_i) * s_i - x)^2)`` for every candidate ``i`` (float64),
    over blocks of ``step`` values; the quantization runs in ``x``'s dtype, the sums in float64."""
    lo, hi, s = lows.reshape(-1, 1), highs.reshape(-1, 1), scales.reshape(-1, 1)
    total = torch.zeros(len(highs), dtype=torch.float64, device=x.device)
    for start in range(0, x.numel(), step):
        block = x[start:start + step].reshape(1, -1)
        q = round_away(torch.minimum(torch.maximum(block, lo), hi) / s) * s
        total += torch.sum((q - block) ** 2, dim=1, dtype=torch.float64)  # n * MSE: same argmin
    return total


def _codes(v: Tensor, lo: Tensor, hi: Tensor, s: Tensor) -> Tensor:
    """The brute-force search's integer code of ``v``: ``round_away(clamp(v, lo, hi) / s)``."""
    return round_away(torch.minimum(torch.maximum(v, lo), hi) / s)


def _threshold_cells(hist: _Histogram, lo: Tensor, hi: Tensor,
                     s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The cell of every candidate's rounding boundaries, exactly: ``(codes, kmin, cells, valid, resolved)``.

    ``lo``, ``hi``, ``s``: (U, 1). The code of a value is monotone in it, so the values of code ``>= k`` are
    those from a threshold: the least float whose code is ``>= codes[u, j] = kmin + 1 + j`` (for
    ``kmin < k <= kmax``, the codes of the clips; ``valid`` marks them). The threshold lies within 2 ulps of
    ``(k - 1/2) s``: a correctly rounded quotient moves the half-way point by less than one ulp of the value.
    The bracket of ``_BOUNDARY_ULPS`` ulps either side holds it when the code (computed by the brute-force
    search's own operations) is below ``k`` at its low end and reaches ``k`` at its high end; ``resolved``
    is False where it does not (the candidate then competes by its exact loss). Cells are monotone in the
    value, so where both ends of the bracket share a cell that is the threshold's; only brackets across a
    cell edge (rare: a few ulps in a cell of thousands) search the threshold itself.
    """
    kmin, kmax = _codes(lo, lo, hi, s), _codes(hi, lo, hi, s)
    count = int((kmax - kmin).max().item())
    codes = kmin + 1 + torch.arange(count, dtype=s.dtype, device=s.device)
    valid = codes <= kmax
    guess = ((codes.double() - 0.5) * s.double()).to(s.dtype)
    down, up = _step_ulps(guess, -_BOUNDARY_ULPS), _step_ulps(guess, _BOUNDARY_ULPS)
    resolved = ((_codes(down, lo, hi, s) < codes) & (_codes(up, lo, hi, s) >= codes)) | ~valid
    cells = hist.cell_of(down)
    across = torch.nonzero(valid & resolved & (cells != hist.cell_of(up)), as_tuple=True)
    if len(across[0]):
        bracket = [down[across]]
        for _ in range(2 * _BOUNDARY_ULPS):
            bracket.append(_step_ulps(bracket[-1], 1))
        floats = torch.stack(bracket, dim=-1)  # the bracket's floats, ascending
        row = across[0]
        reached = _codes(floats, lo[row], hi[row], s[row]) >= codes[across][:, None]
        first = torch.argmax(reached.to(torch.int8), dim=-1, keepdim=True)
        cells[across] = hist.cell_of(torch.gather(floats, -1, first).squeeze(-1))
    return codes, kmin, cells, valid, resolved.all(dim=1)


def _step_ulps(x: Tensor, steps: int) -> Tensor:
    """``x`` moved ``|steps|`` floats up (``steps > 0``) or down."""
    toward = torch.full_like(x, math.inf if steps > 0 else -math.inf)
    for _ in range(abs(steps)):
        x = torch.nextafter(x, toward)
    return x


def _loss_bounds(hist: _Histogram, n: int, lows: Tensor, highs: Tensor,
                 scales: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 ``(lower, upper)`` bounds of each candidate's brute-force loss minus ``sum(x^2)``."""
    lo, hi, s = lows.reshape(-1, 1), highs.reshape(-1, 1), scales.reshape(-1, 1)
    codes, kmin, cell, valid, resolved = _threshold_cells(hist, lo, hi, s)
    cells, width, base = hist.cells, hist.width, hist.base
    count = codes.shape[1]

    # the cell of every threshold: values in lower cells are below it, values in higher cells above it
    cell = cell.clamp(-1, cells)
    cell = torch.where(valid, cell, torch.full_like(cell, cells)).long()

    # where the thresholds fall among the occupied cells: ``below`` of them lie below a threshold's cell,
    # ``above`` at or below it (one more when the threshold cuts an occupied cell)
    inside = valid & (cell >= 0) & (cell < cells)
    upto, n_c, sum_c = hist.locate(cell.clamp(0, cells - 1))
    occupied = len(hist.positions)
    above = torch.where(cell < 0, 0, torch.where(cell >= cells, occupied, upto))
    below = above - (inside & (n_c > 0)).long()

    # regions: the cells strictly between two consecutive thresholds' cells share one code, kmin + r
    zero = torch.zeros_like(cell[:, :1])
    filled = (torch.cat([cell, zero + cells], dim=1).clamp(0, cells)
              > torch.cat([zero, cell + 1], dim=1).clamp(0, cells))
    start = torch.cat([zero, above], dim=1)  # prefix sums run over the occupied cells
    end = torch.cat([below, zero + occupied], dim=1)
    n_r = torch.where(filled, _pick(hist.prefix_counts, end) - _pick(hist.prefix_counts, start), 0)
    j_r = torch.where(filled, _pick(hist.prefix_index, end) - _pick(hist.prefix_index, start), 0).double()
    d_r = torch.where(filled, _pick(hist.prefix_rest, end) - _pick(hist.prefix_rest, start), 0.0)
    n_r = n_r.double()
    big = n_r * base * width
    sum_r = (big + j_r * width) + d_r
    region_codes = kmin + torch.arange(count + 1, dtype=s.dtype, device=s.device)
    q_r = (region_codes * s).double()
    loss = (n_r * q_r * q_r - 2.0 * q_r * sum_r).sum(dim=1)
    size = (n_r * q_r * q_r + 2.0 * q_r.abs() * (sum_r.abs() + big.abs() + (j_r * width).abs()
                                                 + d_r.abs())).sum(dim=1)

    # cut cells: all their values take the code below the cell's first threshold, plus what each threshold
    # in the cell can add for the values at or above it: (q_k - q_{k-1}) (q_k + q_{k-1} - 2x), x in the cell
    cut = inside
    previous = torch.cat([torch.full_like(cell[:, :1], -2), cell[:, :-1]], dim=1)
    first = cut & (cell != previous)
    at = cell.clamp(0, cells - 1)
    q_below = ((codes - 1) * s).double()
    q_at = (codes * s).double()
    base_c = torch.where(first, n_c * q_below * q_below - 2.0 * q_below * sum_c, 0.0)
    x_a, x_b = hist.low(at), hist.high(at)
    d_a = (q_at - q_below) * (q_at + q_below - 2.0 * x_a)
    d_b = (q_at - q_below) * (q_at + q_below - 2.0 * x_b)
    zero_f = torch.zeros_like(d_a)
    add_lo = torch.where(cut, n_c * torch.minimum(torch.minimum(d_a, d_b), zero_f), 0.0).sum(dim=1)
    add_hi = torch.where(cut, n_c * torch.maximum(torch.maximum(d_a, d_b), zero_f), 0.0).sum(dim=1)
    loss = loss + base_c.sum(dim=1)
    size = size + torch.where(first, n_c * q_below * q_below + 2.0 * (q_below * sum_c).abs(), 0.0).sum(dim=1)
    size = size + torch.where(cut, n_c * torch.maximum(d_a.abs(), d_b.abs()), 0.0).sum(dim=1)

    # rounding: the float64 arithmetic above (a few roundings per term, (count + 2)-term sums), the cells'
    # sums, and the brute-force search's own float32 errors and float64 sums
    arith = (4.0 * count + 32.0) * _U64 * size
    q_max = torch.maximum((kmin * s).abs(), ((kmin + count) * s).abs()).double().reshape(-1)
    sums = 2.0 * q_max * (hist.sum_error + 2.0 * (count + 1) * hist.prefix_error)
    finfo = torch.finfo(s.dtype)
    upper = loss + add_hi + arith + sums
    brute = (4.0 * finfo.eps / 2 + (n + 2) * _U64) * (upper + hist.square_bound).clamp(min=0.0)
    brute = brute + n * 2.0 * finfo.smallest_normal * finfo.eps
    lower = loss + add_lo - arith - sums - brute
    upper = upper + brute
    inf = torch.full_like(lower, math.inf)
    return torch.where(resolved, lower, -inf), torch.where(resolved, upper, inf)


class _Histogram:
    """Counts and float64 sums of the data in cells of a power-of-two width ``w = 2**p``.

    A value's cell is ``trunc(x * 2**-p - base)`` computed in the data's dtype, with ``base = floor(xmin *
    2**-p)`` kept below 2**24 so that it is exact. It is monotone in ``x``, which is what the bounds rely on
    (a value in a lower cell than a threshold's is below it), and within ``slack`` cells of the exact
    ``floor(x / w) - base`` (the rounding of the subtraction), so cell ``j`` holds values in
    ``[low(j), high(j)]`` = ``[(base + j - slack) w, (base + j + 1 + slack) w]``. ``of`` makes one pass over
    the data; apart from two cheap scans of the per-cell tables (occupancy and its running count) everything
    else runs over the occupied cells (at most the number of values), not over all ``cells``.

    Declared state: ``scale`` (``2**-p``, 0-d, data dtype), ``shift`` (``-base``, 0-d, data dtype),
    ``width``, ``base``, ``cells`` (cell positions run over ``0 .. cells - 1``), ``slack``, ``extremes``
    (the data's ``(min, max)``, 0-d tensors), per cell ``ranks`` (how many occupied cells lie at or below
    it, int64); for the occupied cells ``positions`` (ascending, int64), ``counts`` and ``sums`` (float64;
    counts are exact integers), and their prefix sums ``prefix_counts``, ``prefix_index`` (of count * cell
    position; both int64) and ``prefix_rest`` (of each cell's sum less count * its nominal start); the error
    bounds ``sum_error`` (all cells' float64 sums together), ``prefix_error`` (one ``prefix_rest`` entry)
    and ``square_bound`` (above ``sum(x^2)``).
    """

    def __init__(self, scale: Tensor, shift: Tensor, width: float, extremes: tuple[Tensor, Tensor],
                 counts: Tensor, sums: Tensor) -> None:
        self.scale = scale
        self.shift = shift
        self.width = width
        self.base = -int(shift)
        self.cells = len(counts)
        self.slack = (self.cells + 2) * 2.0**-23  # < 1: only the cells at 0 and -1 hold both signs
        self.extremes = extremes
        occupied = counts > 0
        self.ranks = torch.cumsum(occupied, 0)
        self.positions = torch.nonzero(occupied).reshape(-1)
        self.counts = n = counts[self.positions]
        self.sums = sums[self.positions]
        offset = (self.positions + self.base).double()
        start = offset * width
        rest = torch.addcmul(self.sums, n, start, value=-1.0)  # at most two roundings, as sums - n * start
        self.prefix_counts = _prefix_sum(n.long())
        self.prefix_index = _prefix_sum(n.long() * self.positions)
        self.prefix_rest = _prefix_sum(rest)
        # |x| <= largest for every value of a cell, so |its sum| <= n largest and sum(x^2) <= n largest^2; a
        # cell's float64 sum errs by at most n U sum(|x|), its rest by U (|sum| + n |start|)
        largest = (offset.abs() + (1.0 + self.slack)) * width
        self.sum_error = float(torch.dot(n * (n + 2.0), largest)) * _U64 * 1.01
        self.prefix_error = float(len(n) * _U64 * rest.abs().sum()) * 1.01
        self.square_bound = float(torch.dot(n, largest * largest)) * (1.0 + 1e-9)

    def low(self, cell: Tensor) -> Tensor:
        """The least value cells ``cell`` (an integer tensor) can hold, float64."""
        return ((cell + self.base).double() - self.slack) * self.width

    def high(self, cell: Tensor) -> Tensor:
        """The largest value cells ``cell`` can hold, float64."""
        return ((cell + self.base).double() + 1.0 + self.slack) * self.width

    @staticmethod
    def of(flat: Sequence[Tensor], xmin: Tensor, xmax: Tensor) -> _Histogram:
        """The histogram of all values of ``flat`` (whose extremes are ``xmin``, ``xmax``)."""
        lo, hi = float(xmin), float(xmax)
        span = hi - lo if hi > lo else max(abs(lo), abs(hi), 1.0) * HISTOGRAM_CELLS
        # 2**power > span / HISTOGRAM_CELLS, and |xmin| / 2**power < 2**24 (an exact shift)
        power = max(math.frexp(span / HISTOGRAM_CELLS)[1], math.frexp(max(abs(lo), abs(hi)) * 2.0**-23)[1])
        power = min(max(power, -126), 126)  # a normal float32 scale
        scale = torch.full((), 2.0**-power, dtype=xmin.dtype, device=xmin.device)
        shift = -torch.floor(xmin * scale)
        cells = int(torch.add(shift, xmax, alpha=2.0**-power)) + 1
        counts, sums = _cell_totals(flat, shift, 2.0**-power, cells)
        return _Histogram(scale, shift, 2.0**power, (xmin, xmax), counts, sums)

    def cell_of(self, x: Tensor) -> Tensor:
        """The cell of each of ``x`` as a float64 tensor (below 0 and from ``cells`` on: outside the data)."""
        return torch.floor(torch.add(self.shift, x, alpha=float(self.scale))).double()

    def locate(self, cell: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For the cell positions ``cell`` (int64, within ``0 .. cells - 1``): how many occupied cells lie
        at or below each, and its count and sum (float64; 0 for an empty cell)."""
        upto = _pick(self.ranks, cell)
        at = (upto - 1).clamp(min=0)  # the last occupied cell at or below: ``cell`` itself when occupied
        occupied = _pick(self.positions, at) == cell
        return (upto, torch.where(occupied, _pick(self.counts, at), 0.0),
                torch.where(occupied, _pick(self.sums, at), 0.0))

    def kth_extreme(self, rows: _Rows, k: int, largest: bool) -> Tensor:
        """The k-th largest (or smallest) value of the data (1-based ``k``), as a 0-d tensor.

        The histogram finds its cell; the values from that cell outwards are read from the rows whose
        extreme reaches that far (usually few), and ``topk`` picks among them. When the cell is the extreme's
        own and holds many values, the extreme often repeats (ReLU's zeros, a clamp): counting its repeats,
        until ``k`` are found, settles that case.
        """
        counts = torch.flip(self.counts, [0]) if largest else self.counts
        outward = int(torch.searchsorted(torch.cumsum(counts, 0), float(k)))
        extreme = self.extremes[1] if largest else self.extremes[0]
        if outward == 0 and float(counts[0]) > _SELECT_ELEMENTS and rows.repeats(extreme, largest, k):
            return extreme
        at = self.positions[-1 - outward if largest else outward]
        edge = float(self.low(at)) if largest else float(self.high(at))
        kept = rows.beyond(_float_toward(edge, extreme.dtype, -math.inf if largest else math.inf), largest)
        return torch.topk(kept, k, largest=largest).values[-1]


class _Rows:
    """The data as rows of ``ROW_ELEMENTS`` values (a chunk's last row may be shorter), with every row's
    minimum and maximum: one cheap pass that gives the data's extremes and lets the selections of the
    k-th extremes read only the rows that can hold what they look for.

    Declared state: ``chunks`` (the flat data), ``mins``, ``maxs`` (per chunk, each row's extremes).
    """

    def __init__(self, chunks: Sequence[Tensor]) -> None:
        self.chunks = list(chunks)
        self.mins: list[Tensor] = []
        self.maxs: list[Tensor] = []
        for c in self.chunks:
            body = self._body(c)
            mins, maxs = body.amin(dim=1), body.amax(dim=1)  # amin/amax reduce rows fast; aminmax does not
            if body.numel() < c.numel():
                tail = c[body.numel():]
                mins, maxs = torch.cat([mins, tail.amin()[None]]), torch.cat([maxs, tail.amax()[None]])
            self.mins.append(mins)
            self.maxs.append(maxs)

    @staticmethod
    def _body(c: Tensor) -> Tensor:
        """The full rows of chunk ``c``, (rows, ``ROW_ELEMENTS``)."""
        full = c.numel() // ROW_ELEMENTS * ROW_ELEMENTS
        return c[:full].reshape(-1, ROW_ELEMENTS)

    def extremes(self) -> tuple[Tensor, Tensor]:
        """The data's minimum and maximum (0-d)."""
        lows, highs = torch.stack([m.min() for m in self.mins]), torch.stack([m.max() for m in self.maxs])
        return lows.min(), highs.max()

    def _rows(self, chunk: int, picked: Tensor) -> Tensor:
        """The values of chunk ``chunk``'s rows ``picked`` (ascending row numbers, int64), flat."""
        c, body = self.chunks[chunk], self._body(self.chunks[chunk])
        full = picked[picked < len(body)]
        values = body.index_select(0, full).reshape(-1)
        if len(full) < len(picked):  # the short last row
            return torch.cat([values, c[body.numel():]])
        return values

    def beyond(self, edge: float, largest: bool) -> Tensor:
        """Every value ``>= edge`` (``largest``) or ``<= edge``."""
        kept = []
        for i in range(len(self.chunks)):
            wanted = self.maxs[i] >= edge if largest else self.mins[i] <= edge
            values = self._rows(i, torch.nonzero(wanted).reshape(-1))
            kept.append(values[values >= edge] if largest else values[values <= edge])
        return torch.cat(kept)

    def repeats(self, value: Tensor, largest: bool, k: int) -> bool:
        """Whether ``value``, the data's maximum (``largest``) or minimum, occurs at least ``k`` times:
        counted over the rows holding it, a block of rows at a time, until ``k`` are found."""
        total = 0
        for i, extremes in enumerate(self.maxs if largest else self.mins):
            holding = torch.nonzero(extremes == value).reshape(-1)
            for block in holding.split(_REPEAT_ROWS):
                total += int(torch.count_nonzero(self._rows(i, block) == value))
                if total >= k:
                    return True
        return False


def _cell_totals(flat: Sequence[Tensor], shift: Tensor, scale: float, cells: int,
                 paired: bool | None = None) -> tuple[Tensor, Tensor]:
    """Count (exact, float64) and float64 sum of the values in each of ``cells`` cells: one pass over the
    data, ``PASS_ELEMENTS`` values at a time through buffers allocated once (cache-sized, no allocation per
    step). ``paired`` (the default on the CPU): one ``index_add_`` of complex values (the value, 1)
    accumulates both at once (measured faster than two); otherwise two float64 ``index_add_``, the form
    every device's ``index_add_`` supports.
    """
    device = shift.device
    size = min(PASS_ELEMENTS, max(c.numel() for c in flat))
    position = torch.empty(size, dtype=shift.dtype, device=device)
    index = torch.empty(size, dtype=torch.int32, device=device)
    if paired if paired is not None else device.type == "cpu":
        table = torch.zeros(cells, dtype=torch.complex128, device=device)
        pairs = torch.empty(size, dtype=torch.complex128, device=device)
        value_and_one = torch.view_as_real(pairs)
        value_and_one[:, 1] = 1.0
        for c in flat:
            for part in c.split(PASS_ELEMENTS):
                m = len(part)
                torch.add(shift, part, alpha=scale, out=position[:m])
                index[:m].copy_(position[:m])  # >= 0: truncation is floor
                value_and_one[:m, 0].copy_(part)
                table.index_add_(0, index[:m], pairs[:m])
        return table.imag, table.real
    counts = torch.zeros(cells, dtype=torch.float64, device=device)
    sums = torch.zeros(cells, dtype=torch.float64, device=device)
    ones = torch.ones(1, dtype=torch.float64, device=device).expand(size)
    values = torch.empty(size, dtype=torch.float64, device=device)
    for c in flat:
        for part in c.split(PASS_ELEMENTS):
            m = len(part)
            torch.add(shift, part, alpha=scale, out=position[:m])
            index[:m].copy_(position[:m])
            counts.index_add_(0, index[:m], ones[:m])
            values[:m].copy_(part)
            sums.index_add_(0, index[:m], values[:m])
    return counts, sums


def _pick(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a 1-D ``table`` (``index_select``: several times faster than indexing)."""
    return table.index_select(0, index.reshape(-1)).reshape(index.shape)


def _prefix_sum(values: Tensor) -> Tensor:
    """``[0, v0, v0 + v1, ...]``: the running sums of ``values`` after a leading 0."""
    prefix = torch.zeros(len(values) + 1, dtype=values.dtype, device=values.device)
    torch.cumsum(values, 0, out=prefix[1:])
    return prefix


def _float_toward(value: float, dtype: torch.dtype, direction: float) -> float:
    """``value`` as a float of ``dtype``, rounded toward ``direction`` (-inf or inf)."""
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if (float(t) > value and direction < 0) or (float(t) < value and direction > 0):
        t = torch.nextafter(t, torch.tensor(direction, dtype=dtype))
    return float(t)


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
