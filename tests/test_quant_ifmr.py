"""quant.ifmr: IFMR calibration (docs/amct-reference.md §8.4) against hand cases, the brute-force numpy
search of tests/references/quant.py and the brute-force torch search of tests/references/ifmr.py (which the
fast search must reproduce bit for bit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_caffe.errors import ConfigError
from amct_caffe.quant import ifmr as ifmr_module
from amct_caffe.quant.ifmr import ifmr, ifmr_gathered, ifmr_to_clips, percentile_rank, search_ratios
from amct_caffe.quant.numerics import QuantDataError, data_scale_offset
from tests.references import ifmr as ifmr_reference
from tests.references import quant

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_percentile_rank_and_search_ratios() -> None:
    assert percentile_rank(10, 0.8) == 2  # 10 - floor(8.0)
    assert percentile_rank(10, 0.7) == 3  # 10 - floor(7.0)
    assert percentile_rank(10, 0.999999) == 1  # 10 - floor(9.99999)
    assert percentile_rank(4, 0.5) == 2
    assert percentile_rank(7, 1.0) == 1
    r = search_ratios(0.7, 1.3, 0.01)
    assert len(r) == 61 and r[0] == 0.7 and r[-1] == pytest.approx(1.3)
    assert search_ratios(1.0, 1.0, 0.01) == [1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_ifmr_percentile_positions_hand_case(device: str) -> None:
    """Data -5..4 shuffled. max_percentile 0.8 -> rank 2 from the top: 3; min_percentile 0.8 -> rank 2 from
    the bottom: -4. One candidate (ratio 1.0): s = (3 - (-4))/255 = 7/255; -4/s = -145.71 -> -146;
    o = 146 - 128 = 18."""
    data = torch.tensor([2.0, -5.0, 4.0, 0.0, -1.0, 3.0, -3.0, 1.0, -4.0, -2.0], device=device)
    s, o = ifmr(data, max_percentile=0.8, min_percentile=0.8, search_start=1.0, search_end=1.0)
    assert s.item() == pytest.approx(7 / 255, rel=1e-6) and o.item() == 18
    # min_percentile 0.7 -> rank 3 from the bottom: -3; s = 6/255, -3/s = -127.5 (also in float32)
    # -> round_away -128 -> o = 128 - 128 = 0
    s, o = ifmr(data, max_percentile=0.8, min_percentile=0.7, search_start=1.0, search_end=1.0)
    assert s.item() == pytest.approx(6 / 255, rel=1e-6) and o.item() == 0
    # defaults (n < 1e6): the true extremes 4 and -5
    s, o = ifmr(data, search_start=1.0, search_end=1.0)
    assert s.item() == pytest.approx(9 / 255, rel=1e-6) and o.item() == -round(-5 / (9 / 255)) - 128


@pytest.mark.parametrize("with_offset", [True, False])
def test_ifmr_matches_brute_force(with_offset: bool) -> None:
    rng = np.random.default_rng(11)
    for scale_pos, scale_neg in [(3.0, 1.0), (1.0, 0.2), (0.5, 2.0)]:
        x = np.concatenate([rng.exponential(scale_pos, 60), -rng.exponential(scale_neg, 40)])
        x = x.astype(np.float32)
        ref = quant.ifmr(x, with_offset)
        ordered = np.sort(ref.losses)
        assert ordered[1] - ordered[0] > 1e-9 * ordered[0]  # a clear winner, so float sums cannot flip it
        assert 0 < ref.best < 60  # the optimum is inside the search range, not at its ends
        s, o = ifmr(x, with_offset=with_offset)
        assert s.item() == ref.s and o.item() == ref.o


def test_ifmr_one_sided_and_degenerate_data() -> None:
    # all positive: min clamps to 0 -> o = -128
    s, o = ifmr(np.array([0.5, 1.0, 2.0, 3.0], dtype=np.float32))
    assert o.item() == -128
    # all negative: max clamps to 0, every candidate is 0 -> s = 2/255 from min = -2, o = 127
    s, o = ifmr(np.array([-2.0, -1.0, -0.5], dtype=np.float32))
    assert s.item() == pytest.approx(2 / 255, rel=1e-7) and o.item() == 127
    # all zero: s below FLT_EPSILON -> 1, o = -128
    s, o = ifmr(torch.zeros(16))
    assert (s.item(), o.item()) == (1.0, -128)


def test_ifmr_errors() -> None:
    with pytest.raises(QuantDataError):
        ifmr(torch.tensor([1.0, math.inf]))
    with pytest.raises(QuantDataError):
        ifmr(torch.tensor([1.0, math.nan]))
    with pytest.raises(QuantDataError):
        ifmr(torch.zeros(0))
    with pytest.raises(ConfigError):
        ifmr(torch.ones(4), search_step=0.0)
    with pytest.raises(ConfigError):
        ifmr(torch.ones(4), search_start=1.3, search_end=0.7)
    with pytest.raises(ConfigError):
        ifmr(torch.ones(4), max_percentile=1.5)


def test_ifmr_to_clips_hand_and_round_trip() -> None:
    cmin, cmax = ifmr_to_clips(0.5, -100)  # cmin = -(28)*0.5, cmax = -14 + 127.5
    assert (cmin.item(), cmax.item()) == (-14.0, 113.5)
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(500) * 2 + 0.7).astype(np.float32)
    s, o = ifmr(x)
    cmin, cmax = ifmr_to_clips(s, o)
    assert cmin.item() == pytest.approx(-(o.item() + 128) * s.item(), rel=1e-6)
    s2, o2 = data_scale_offset(cmin, cmax)
    assert o2.item() == o.item()
    np.testing.assert_array_max_ulp(s2.numpy(), s.numpy(), maxulp=1)


# -- the fast search against the brute-force one (tests/references/ifmr.py) --------------------------------
def distribution(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Test data of one kind: normal, skewed, ReLU outputs (half zeros), constant, values on a grid (ties at
    rounding boundaries), far from zero, subnormal-small."""
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "skewed":
        x = rng.exponential(1.0, n) * rng.choice([1.0, -0.2], n)
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(n) * 3.0, 0.0)
    elif kind == "constant":
        x = np.full(n, rng.standard_normal())
    elif kind == "grid":
        # multiples of 1/8 from -4 to 4 plus the maximum 4: many values sit exactly on k + 1/2 of some scale
        x = np.concatenate([np.round(rng.uniform(-32, 32, n)) / 8, [4.0]])
    elif kind == "far":
        x = rng.standard_normal(n) * 0.01 + 50.0
    else:
        x = rng.standard_normal(n) * 1e-38
    return x.astype(np.float32)


KINDS = ["normal", "skewed", "relu", "constant", "grid", "far", "tiny"]


def check_same_as_brute_force(chunks: list[torch.Tensor], *args: object) -> None:
    s_ref, o_ref, _ = ifmr_reference.ifmr_exact(chunks, *args)
    s, o = ifmr_gathered(chunks, *args)
    assert (s.dtype, o.dtype) == (s_ref.dtype, o_ref.dtype)
    assert s.item() == s_ref.item() and o.item() == o_ref.item()  # bit-identical factors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("percentile", [0.999999, 0.7])
def test_fast_search_equals_brute_force(kind: str, with_offset: bool, percentile: float) -> None:
    rng = np.random.default_rng([KINDS.index(kind), int(with_offset), int(percentile * 1e6)])
    for n in (1, 2, 7, 300, 1500):
        x = torch.from_numpy(distribution(kind, n, rng))
        chunks = list(x.split(max(1, n // 3)))  # several calibration batches
        check_same_as_brute_force(chunks, percentile, percentile, 0.7, 1.3, 0.01, with_offset)
    x = torch.from_numpy(distribution(kind, 500, rng))
    check_same_as_brute_force([x], percentile, 0.9, 0.5, 2.0, 0.05, with_offset)  # other search ranges
    check_same_as_brute_force([x], 0.999999, 0.999999, 1.0, 1.0, 0.01, with_offset)  # one candidate


@pytest.mark.parametrize("kind", KINDS)
def test_exact_losses_decide_when_the_histogram_is_coarse(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 4 histogram cells most candidates' loss intervals overlap, so the exact losses of many of them
    decide: still the brute-force result."""
    monkeypatch.setattr(ifmr_module, "HISTOGRAM_CELLS", 4)
    rng = np.random.default_rng(21)
    for n in (5, 400):
        x = torch.from_numpy(distribution(kind, n, rng))
        for with_offset in (True, False):
            check_same_as_brute_force([x[:n // 2], x[n // 2:]], 0.999999, 0.99, 0.7, 1.3, 0.01, with_offset)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_bounds_hold_the_brute_force_losses(kind: str) -> None:
    """The interval of every candidate holds its brute-force loss less sum(x^2) (computed here in float64
    from the data), and the intervals are tight enough that one candidate usually wins outright."""
    rng = np.random.default_rng(22)
    x = torch.from_numpy(distribution(kind, 4000, rng))
    s_ref, o_ref, losses = ifmr_reference.ifmr_exact([x])
    vmax, vmin = torch.clamp(x.max(), min=0.0), torch.clamp(x.min(), max=0.0)
    cands = torch.tensor(ifmr_reference.search_ratios(0.7, 1.3, 0.01), dtype=torch.float32) * vmax
    scales, _ = data_scale_offset(vmin, cands)
    hist = ifmr_module._Histogram.of([x], x.min(), x.max())
    lower, upper = ifmr_module._loss_bounds(hist, x.numel(), vmin.expand_as(cands), cands, scales)
    squares = float(np.sum(x.numpy().astype(np.float64) ** 2))
    assert bool(((lower <= losses - squares) & (losses - squares <= upper)).all())
    if kind in ("normal", "skewed", "relu"):
        assert int((lower <= upper.min()).sum()) == 1


def test_kth_extreme_from_the_histogram() -> None:
    """Percentile ranks above 1 (n > 10**6 with the default 0.999999) take the k-th value from the histogram's
    cell and the rows that can hold it: the same value as a full sort."""
    rng = np.random.default_rng(23)
    x = torch.from_numpy(rng.standard_normal(3000).astype(np.float32) ** 3)
    check_kth_extremes([x[:1000], x[1000:]], (1, 2, 17, 1500, 3000))
    # full rows of the per-row extremes, a short last row, and chunks of other lengths
    y = torch.from_numpy(rng.standard_normal(7000).astype(np.float32))
    check_kth_extremes([y[:2048], y[2048:2049], y[2049:]], (1, 3, 40, 3500, 7000))


def test_kth_extreme_of_a_repeated_extreme() -> None:
    """ReLU outputs: the k-th smallest is one of many zeros (settled by counting them), and a clamp repeats
    the maximum a few times only (fewer than k: the selection decides)."""
    rng = np.random.default_rng(24)
    x = np.maximum(rng.standard_normal(300_000), 0.0).astype(np.float32)
    x[rng.choice(len(x), 5, replace=False)] = 9.0
    t = torch.from_numpy(x)
    check_kth_extremes([t[:100_000], t[100_000:]], (1, 4, 5, 6, 30, 200_000))
    # the minimum's cell holds many distinct values (an outlier widens the cells): the minimum repeats
    # three times, so counting settles k <= 3 and the selection decides k > 3; mirrored for the maximum
    y = rng.uniform(0.0, 1e-8, 100_000).astype(np.float32)
    y[70_000] = 1.0
    y[[8, 9]] = y.min()
    for data in (y, -y):
        check_kth_extremes([torch.from_numpy(data)], (2, 3, 4, 10, 50_000))


def test_cell_totals_paired_and_separate_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The histogram pass accumulates counts and sums with one complex index_add_ on the CPU and with two
    elsewhere: both give the counts of a direct count and the same float64 sums, over several steps."""
    monkeypatch.setattr(ifmr_module, "PASS_ELEMENTS", 1000)
    rng = np.random.default_rng(25)
    x = torch.from_numpy(np.maximum(rng.standard_normal(5500), 0.0).astype(np.float32))
    chunks = [x[:2500], x[2500:]]
    hist = ifmr_module._Histogram.of(chunks, x.min(), x.max())
    args = (chunks, hist.shift, float(hist.scale), hist.cells)
    counts, sums = ifmr_module._cell_totals(*args, paired=True)
    counts2, sums2 = ifmr_module._cell_totals(*args, paired=False)
    cell = torch.add(hist.shift, x, alpha=float(hist.scale)).long()
    assert torch.equal(counts, torch.bincount(cell, minlength=hist.cells).double())
    assert torch.equal(counts, counts2) and torch.equal(sums, sums2)
    assert float((sums - torch.bincount(cell, x.double(), minlength=hist.cells)).abs().max()) < 1e-9


def check_kth_extremes(chunks: list[torch.Tensor], ranks: tuple[int, ...]) -> None:
    x = torch.cat(chunks)
    ordered = torch.sort(x).values
    hist = ifmr_module._Histogram.of(chunks, x.min(), x.max())
    rows = ifmr_module._Rows(chunks)
    for k in ranks:
        assert hist.kth_extreme(rows, k, largest=True).item() == ordered[-k].item()
        assert hist.kth_extreme(rows, k, largest=False).item() == ordered[k - 1].item()


@settings(max_examples=60, deadline=None)
@given(data=hnp.arrays(np.float32, st.integers(1, 300),
                       elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)),
       with_offset=st.booleans(), percentile=st.sampled_from([0.999999, 0.95, 0.5]),
       split=st.integers(1, 4))
def test_fast_search_equals_brute_force_property(data: np.ndarray, with_offset: bool, percentile: float,
                                                 split: int) -> None:
    chunks = list(torch.from_numpy(data).split(max(1, len(data) // split)))
    check_same_as_brute_force(chunks, percentile, percentile, 0.7, 1.3, 0.01, with_offset)
