"""quant.ifmr: IFMR calibration (docs/amct-reference.md §8.4) against hand cases and the brute-force numpy
search of tests/references/quant.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amct_caffe.errors import ConfigError
from amct_caffe.quant.ifmr import ifmr, ifmr_to_clips, percentile_rank, search_ratios
from amct_caffe.quant.numerics import QuantDataError, data_scale_offset
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
