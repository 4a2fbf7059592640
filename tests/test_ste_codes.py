"""The straight-through codes and bias grid of the end-to-end refinement (quant/ste_codes.py) against the
numpy references of tests/references/refine.py."""

from __future__ import annotations

import numpy as np
import torch

from amct_caffe.quant.ste_codes import final_codes, ste_bias, ste_codes, ste_round
from tests.references import refine


def test_ste_codes_round_half_away_clamp_and_pass_the_gradient_inside_the_range():
    u = torch.tensor([-130.2, -128.6, -128.4, -2.5, -0.5, -0.49, 0.0, 0.5, 1.49, 2.5, 126.6, 127.4, 127.5,
                      300.0], dtype=torch.float32, requires_grad=True)
    codes = ste_codes(u)
    weights = torch.arange(1.0, u.numel() + 1.0)
    (codes * weights).sum().backward()
    ref_codes, ref_grad = refine.ste_codes(u.detach().numpy())
    np.testing.assert_array_equal(codes.detach().numpy(), ref_codes)
    np.testing.assert_array_equal(u.grad.numpy(), ref_grad * weights.numpy())
    np.testing.assert_array_equal(final_codes(u).numpy(), ref_codes)


def test_ste_round_is_the_identity_in_the_backward():
    x = torch.tensor([-1.5, -0.2, 0.5, 2.49], requires_grad=True)
    y = ste_round(x)
    (y * 3.0).sum().backward()
    np.testing.assert_array_equal(y.detach().numpy(), [-2.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(x.grad.numpy(), [3.0] * 4)


def test_ste_bias_lies_on_the_grid_with_gradient_one():
    rng = np.random.default_rng(0)
    step = np.float32(rng.uniform(1e-4, 1e-2, 5))
    b = torch.tensor(rng.normal(0.0, 0.3, 5), dtype=torch.float64, requires_grad=True)
    y = ste_bias(b, torch.tensor(step, dtype=torch.float64))
    y.sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), refine.bias_on_grid(b.detach().numpy(), step), rtol=1e-12)
    np.testing.assert_array_equal(b.grad.numpy(), np.ones(5))
