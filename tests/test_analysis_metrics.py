"""The analysis's accumulators (analysis.metrics) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amct_caffe.analysis.metrics import AgreementStats, Saturation, SaturationStats
from amct_caffe.analysis.results import json_safe


def test_metric_conventions():
    same = AgreementStats()
    same.add(torch.ones(3), torch.ones(3))
    m = same.metrics()
    assert m is not None and m.cosine == 1.0 and m.snr_db == math.inf and m.max_abs == 0.0
    zero_ref = AgreementStats()
    zero_ref.add(torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]))
    m = zero_ref.metrics()
    assert m is not None and m.cosine == 0.0 and m.snr_db == -math.inf and m.max_abs == 1.0
    both_zero = AgreementStats()
    both_zero.add(torch.zeros(2), torch.zeros(2))
    assert both_zero.metrics().cosine == 1.0
    # strict JSON: non-finite numbers become strings
    assert json_safe({"a": [math.inf, -math.inf, math.nan, 1.5]}) == {"a": ["inf", "-inf", "nan", 1.5]}


def test_relative_error_conventions():
    assert AgreementStats().metrics().rel_err == 0.0  # nothing added: nothing differs
    same = AgreementStats()
    same.add(torch.tensor([2.0, -1.0]), torch.tensor([2.0, -1.0]))
    assert same.metrics().rel_err == 0.0
    zero_ref = AgreementStats()
    zero_ref.add(torch.zeros(2), torch.tensor([0.0, 3.0]))
    assert zero_ref.metrics().rel_err == math.inf


def test_two_batches_by_hand():
    # ref = [1, 2 | 3, -4], x = [1, 2.5 | 2, -4]: differences [0, -0.5 | 1, 0]
    stats = AgreementStats(np.array([0.5]))
    stats.add(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    stats.add(torch.tensor([3.0, -4.0], dtype=torch.float64), torch.tensor([2.0, -4.0], dtype=torch.float16))
    m = stats.metrics()
    # sum(ref*x) = 1 + 5 + 6 + 16 = 28; sum(ref^2) = 30; sum(x^2) = 27.25; sum(diff^2) = 1.25
    assert m.cosine == pytest.approx(28.0 / math.sqrt(30.0 * 27.25), rel=1e-15)
    assert m.snr_db == pytest.approx(10.0 * math.log10(24.0), rel=1e-15)
    assert m.rel_err == pytest.approx(math.sqrt(1.25 / 30.0), rel=1e-15)
    assert m.max_abs == 1.0 and m.count == 4
    # in steps of 0.5: [0, 1 | 2, 0]
    assert m.max_lsb == 2.0 and m.over_half_step == 2
    # the same values in one batch give the same numbers
    one = AgreementStats(np.array([0.5]))
    one.add(torch.tensor([1.0, 2.0, 3.0, -4.0]), torch.tensor([1.0, 2.5, 2.0, -4.0]))
    assert one.metrics().cosine == pytest.approx(m.cosine, rel=1e-15)
    assert (one.metrics().max_lsb, one.metrics().over_half_step) == (2.0, 2)


def test_without_a_step_no_lsb():
    stats = AgreementStats()
    stats.add(torch.tensor([1.0]), torch.tensor([3.0]))
    m = stats.metrics()
    assert m.max_lsb is None and m.over_half_step is None and m.max_abs == 2.0


def test_per_channel_steps():
    """Steps per channel apply on axis 1: channel 0 in steps of 0.5, channel 1 in steps of 0.25."""
    ref = torch.zeros(1, 2, 1, 2)
    x = torch.tensor([[[[0.25, 0.0]], [[0.1, -0.125]]]])
    stats = AgreementStats(np.array([0.5, 0.25]))
    stats.add(ref, x)
    m = stats.metrics()
    # |diff| / step: channel 0 -> [0.5, 0]; channel 1 -> [0.4, 0.5]
    assert m.max_lsb == 0.5 and m.over_half_step == 2
    # the reference is all zero: cosine 0, SNR -inf, relative error inf
    assert (m.cosine, m.snr_db, m.rel_err) == (0.0, -math.inf, math.inf)
    two_d = AgreementStats(np.array([1.0, 0.125]))
    two_d.add(torch.zeros(3, 2), torch.tensor([[0.0, 0.25], [0.5, 0.0], [0.0, 0.0]]))
    assert two_d.metrics().max_lsb == 2.0 and two_d.metrics().over_half_step == 2


def test_saturation_by_hand():
    # s_d = 0.1, o_d = -128 (fixed_min): codes round(x / 0.1) - 128
    stats = SaturationStats(0.1, -128)
    # codes: -133 (clipped low), -128 (a zero: not clipped), -8, 126, 132 and 872 (clipped high)
    stats.add(torch.tensor([-0.5, 0.0, 12.0]))
    stats.add(torch.tensor([[25.4, 26.0, 100.0]]))
    assert stats.result() == Saturation(rate=0.5, low_rate=1 / 6, high_rate=2 / 6, clipped=3, total=6)
    # symmetric: s_d = 1, o_d = 0; 127.5 rounds half away from zero to 128 and is clipped
    sym = SaturationStats(1.0, 0)
    sym.add(torch.tensor([-128.4, -128.6, 127.4, 127.5]))
    r = sym.result()
    assert (sym.low, sym.high, r.clipped, r.total, r.rate) == (1, 1, 2, 4, 0.5)
    assert SaturationStats(1.0, 0).result() == Saturation(0.0, 0.0, 0.0, 0, 0)
