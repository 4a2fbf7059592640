"""The formulas of learned weight rounding (quant.adaround), against numpy."""

from __future__ import annotations

import numpy as np
import torch

from amct_caffe.quant.adaround import (
    annealed_beta,
    hard_codes,
    rectified_sigmoid,
    rounding_penalty,
    rounding_start,
    soft_weight,
)


def test_the_start_reproduces_the_float_weight_and_the_codes_stay_on_floor_or_ceil():
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 1.0, (4, 3, 3, 3))
    s = np.abs(w).reshape(4, -1).max(axis=1).reshape(4, 1, 1, 1) / 127.0
    w[0, 0, 0, 0] = 127 * s[0, 0, 0, 0]  # an extreme element, on the grid
    floor, span, v0 = rounding_start(torch.from_numpy(w), torch.from_numpy(s))
    ratio = w / s
    np.testing.assert_array_equal(floor.numpy(), np.floor(ratio))
    np.testing.assert_array_equal(span.numpy(), np.ceil(ratio) - np.floor(ratio))
    assert span[0, 0, 0, 0] == 0
    rest = np.clip(ratio - np.floor(ratio), 0.01, 0.99)
    np.testing.assert_allclose(rectified_sigmoid(v0).numpy(), rest, rtol=1e-9, atol=1e-12)
    soft = soft_weight(floor, span, v0, torch.from_numpy(s)).numpy()
    inner = (ratio - np.floor(ratio) > 0.01) & (ratio - np.floor(ratio) < 0.99)
    np.testing.assert_allclose(soft[inner], w[inner], rtol=1e-9)
    for v in (v0, -v0, torch.from_numpy(rng.normal(0, 3, w.shape))):
        codes = hard_codes(floor, span, v).numpy()
        assert np.all((codes == np.floor(ratio)) | (codes == np.ceil(ratio)))
        assert codes[0, 0, 0, 0] == 127


def test_the_relaxation_reaches_zero_and_one_and_the_penalty_vanishes_there():
    v = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0], dtype=torch.float64)
    h = rectified_sigmoid(v).numpy()
    expected = np.clip(1.0 / (1.0 + np.exp(-v.numpy())) * 1.2 - 0.1, 0.0, 1.0)
    np.testing.assert_allclose(h, expected, rtol=1e-12)
    assert h[0] == 0.0 and h[-1] == 1.0 and abs(h[2] - 0.5) < 1e-12
    assert float(rounding_penalty(torch.tensor([-50.0, 50.0], dtype=torch.float64), 2.0)) == 0.0
    assert float(rounding_penalty(torch.tensor([0.0], dtype=torch.float64), 2.0)) == 1.0
    assert annealed_beta(0, 10) == 20.0 and annealed_beta(9, 10) == 2.0 and annealed_beta(0, 1) == 2.0
