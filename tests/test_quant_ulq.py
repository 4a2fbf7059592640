"""quant.ulq: ClipCheck, ULQ forward/backward (docs/amct-reference.md §3.4-3.5), the autograd Function, and
finite-difference checks of the clip gradients.

The references are the loop implementations of tests/references/quant.py (numpy float32, AMCT's
operation order), hand cases, and central finite differences in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amct_caffe.quant.numerics import data_scale_offset, fake_quant_data, round_even
from amct_caffe.quant.ulq import (
    ULQFunction,
    clip_check,
    ulq_backward,
    ulq_forward,
    ulq_record_factors,
)
from tests.references import quant

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# -- ClipCheck ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cmax", "cmin", "expected", "flipped"),
    [
        (1.0, 2.0, (3.0, -1.0), True),  # cmax <= cmin: restore both
        (1.5, 1.5, (3.0, -1.0), True),  # equal counts as flipped
        (-0.5, -2.0, (3.0, -2.0), False),  # cmax < 0: restore max, accept min
        (4.0, 0.5, (4.0, -1.0), False),  # cmin > 0: restore min, accept max
        (4.0, -0.5, (4.0, -0.5), False),  # accept both
    ],
)
def test_clip_check_branches(cmax: float, cmin: float, expected: tuple[float, float], flipped: bool) -> None:
    r = clip_check(cmax, cmin, 3.0, -1.0)
    assert (r.clip_max.item(), r.clip_min.item()) == expected
    assert (r.clip_max_pre.item(), r.clip_min_pre.item()) == expected
    assert bool(r.flipped) is flipped


def test_clip_check_on_tensors() -> None:
    r = clip_check(torch.tensor([-0.5]), torch.tensor([-2.0]), torch.tensor([3.0]), torch.tensor([-1.0]))
    assert r.clip_max.tolist() == [3.0] and r.clip_min.tolist() == [-2.0] and r.clip_max.shape == (1,)


# -- forward -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_ulq_forward_hand_cases(device: str) -> None:
    t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    # s = 1, o_ulq = 0: clamp to [0, 255], ties to even
    y = ulq_forward(t([-3.0, 0.5, 1.5, 2.5, 254.5, 300.0]), t([255.0]), t([0.0]))
    assert y.cpu().tolist() == [0.0, 0.0, 2.0, 2.0, 254.0, 255.0]
    # cmin = -0.5: s = 1, o_ulq = round_away(-0.5) = -1 -> grid-aligned bounds [-1, 254]
    y = ulq_forward(t([-3.0, -0.5, 0.5, 253.5, 254.4, 300.0]), t([254.5]), t([-0.5]))
    assert y.cpu().tolist() == [-1.0, 0.0, 0.0, 254.0, 254.0, 254.0]
    # fixed_min: cmin forced to 0 -> s = 2.55/255 = 0.01
    y = ulq_forward(t([-1.0, 0.013, 3.0]), t([2.55]), t([-1.0]), fixed_min=True)
    np.testing.assert_allclose(y.cpu().numpy(), [0.0, 0.01, 2.55], rtol=1e-6)


def test_ulq_forward_matches_loop_reference() -> None:
    rng = np.random.default_rng(5)
    for cmax, cmin in [(3.0, -1.0), (6.0, 0.0), (0.37, -2.9), (1.0, -1e-3)]:
        x = (rng.standard_normal(3000) * 3).astype(np.float32)
        y_ref = quant.ulq_forward(x, cmax, cmin)
        y = ulq_forward(x, torch.tensor([cmax]), torch.tensor([cmin]))
        np.testing.assert_array_equal(y.numpy(), y_ref)


def test_ulq_two_forms_identical_and_record_factors() -> None:
    """AMCT reference §3.4: clamp-then-rint on the grid-aligned bounds equals the record
    form with (s_d, o_d)."""
    rng = np.random.default_rng(6)
    for _ in range(20):
        cmax = float(rng.uniform(0.05, 8))
        cmin = float(-rng.uniform(0, 8)) if rng.uniform() < 0.8 else 0.0
        x = torch.from_numpy((rng.standard_normal(2000) * 6).astype(np.float32))
        s_d, o_d = ulq_record_factors(torch.tensor([cmax]), torch.tensor([cmin]))
        y_ulq = ulq_forward(x, torch.tensor([cmax]), torch.tensor([cmin]))
        y_rec = fake_quant_data(x, s_d, o_d, rounding=round_even)
        assert torch.equal(y_ulq, y_rec)
        # the record factors are data_scale_offset of the grid-aligned bounds (s up to one ulp)
        grid = quant.ulq_grid(cmax, cmin)
        s2, o2 = data_scale_offset(torch.tensor([grid.lower]), torch.tensor([grid.upper]))
        assert o2.item() == o_d.item() == -quant.round_away(cmin / float(grid.s)) - 128
        np.testing.assert_array_max_ulp(s2.numpy(), s_d.numpy(), maxulp=1)
    s_d, o_d = ulq_record_factors(3.0, -1.0, fixed_min=True)
    assert s_d.item() == pytest.approx(3 / 255, rel=1e-7) and o_d.item() == -128


# -- backward ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cmax", "cmin"), [(3.0, -1.0), (2.5, 0.0), (0.8, -4.0)])
def test_ulq_backward_matches_loop_reference(cmax: float, cmin: float) -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(2000) * 3).astype(np.float32)
    dy = rng.standard_normal(2000).astype(np.float32)
    dx_ref, gmax_ref, gmin_ref = quant.ulq_backward(x, dy, cmax, cmin)
    dx, gmax, gmin = ulq_backward(x, dy, torch.tensor([cmax]), torch.tensor([cmin]))
    np.testing.assert_array_equal(dx.numpy(), dx_ref)
    assert gmax.item() == pytest.approx(gmax_ref, rel=1e-4, abs=1e-4)
    assert gmin.item() == pytest.approx(gmin_ref, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fixed_min", [False, True])
def test_ulq_function_autograd(device: str, fixed_min: bool) -> None:
    rng = np.random.default_rng(8)
    x_np = (rng.standard_normal((4, 3, 5, 5)) * 2).astype(np.float32)
    dy_np = rng.standard_normal(x_np.shape).astype(np.float32)
    cmax_v, cmin_v = 2.2, -1.3
    x = torch.tensor(x_np, device=device, requires_grad=True)
    cmax = torch.tensor([cmax_v], device=device, requires_grad=True)
    cmin = torch.tensor([cmin_v], device=device, requires_grad=True)
    y = ULQFunction.apply(x, cmax, cmin, fixed_min)
    y.backward(torch.tensor(dy_np, device=device))
    used_min = 0.0 if fixed_min else cmin_v
    y_ref = quant.ulq_forward(x_np.reshape(-1), cmax_v, used_min)
    np.testing.assert_array_equal(y.detach().cpu().numpy().reshape(-1), y_ref)
    flat_x, flat_dy = x_np.reshape(-1), dy_np.reshape(-1)
    dx_ref, gmax_ref, gmin_ref = quant.ulq_backward(flat_x, flat_dy, cmax_v, used_min)
    np.testing.assert_array_equal(x.grad.cpu().numpy().reshape(-1), dx_ref)
    assert cmax.grad.shape == (1,) and cmin.grad.shape == (1,)
    assert cmax.grad.item() == pytest.approx(gmax_ref, rel=1e-4, abs=1e-4)
    assert cmin.grad.item() == pytest.approx(gmin_ref, rel=1e-4, abs=1e-4)


# -- finite differences ------------------------------------------------------------------------------------
# The clip gradient is a straight-through estimator, not the derivative of the (piecewise-constant) forward,
# so finite differences can only check it where the two coincide or against the surrogate it is the
# derivative of:
#  1. the true forward, for elements clipped at the top with cmin = 0: y = s*(o_ulq + 255) = cmax exactly
#     (o_ulq stays 0), dy/dcmax = 1 = D(0) + 1; clipped at the bottom, y = 0 and D(0) = 0;
#  2. the surrogate y = v + s*r, v = clamp(x, cmin, cmax), rounding residual r frozen at the base point,
#     whose exact derivatives are AMCT's formulas for every element and both clips.
def _sum_forward(x: torch.Tensor, dy: torch.Tensor, cmax: float, cmin: float) -> float:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return float((ulq_forward(x, t(cmax), t(cmin)) * dy).sum())


def test_ulq_dcmax_clipped_part_matches_finite_differences() -> None:
    rng = np.random.default_rng(9)
    cmax, cmin, h = 2.0, 0.0, 1e-6
    x = torch.from_numpy(np.concatenate([rng.uniform(2.5, 9, 300), rng.uniform(-9, -0.5, 300)]))
    dy = torch.from_numpy(rng.standard_normal(600))
    fd = (_sum_forward(x, dy, cmax + h, cmin) - _sum_forward(x, dy, cmax - h, cmin)) / (2 * h)
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    _, gmax, _ = ulq_backward(x, dy, t(cmax), t(cmin))
    assert fd == pytest.approx(float(dy[:300].sum()), rel=1e-7)
    assert gmax.item() == pytest.approx(fd, rel=1e-7, abs=1e-9)


def test_ulq_clip_gradients_match_finite_differences_of_surrogate() -> None:
    rng = np.random.default_rng(10)
    cmax, cmin, h = 2.3, -0.85, 1e-6
    s = (cmax - cmin) / 255
    x = np.concatenate([
        rng.uniform(cmax + 2 * s, 6, 200),  # clipped at the top
        rng.uniform(-6, cmin - 2 * s, 200),  # clipped at the bottom
        rng.uniform(cmin + 2 * s, cmax - 2 * s, 400),  # inside
    ])
    dy = rng.standard_normal(x.size)

    r0 = quant.ulq_residual(np.clip(x, cmin, cmax), s)

    def surrogate(cmx: float, cmn: float) -> float:
        return float(np.sum(dy * quant.ulq_surrogate(x, cmx, cmn, r0)))

    fd_max = (surrogate(cmax + h, cmin) - surrogate(cmax - h, cmin)) / (2 * h)
    fd_min = (surrogate(cmax, cmin + h) - surrogate(cmax, cmin - h)) / (2 * h)
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    dx, gmax, gmin = ulq_backward(torch.from_numpy(x), torch.from_numpy(dy), t(cmax), t(cmin))
    assert gmax.item() == pytest.approx(fd_max, rel=1e-6)
    assert gmin.item() == pytest.approx(fd_min, rel=1e-6)
    # and dx is the derivative of the surrogate in x: 1 inside, 0 where clipped
    np.testing.assert_array_equal(dx.numpy(), np.concatenate([np.zeros(400), dy[400:]]))
