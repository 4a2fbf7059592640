"""The fast paths of the QAT kernels against the numpy loop references of tests/references/quant.py, on
adversarial inputs: exact .5 ties (in the blocks of the sparse tie fix-up and in the tail after them),
values exactly on the grid-aligned bounds, outside both bounds, +-inf, NaN, ``fixed_min``, zero-size
tensors, 0-d tensors and channels-last / non-contiguous layouts.

* ULQ: :func:`ulq_forward_train` (the autograd Function's forward) must give :func:`ulq_forward`'s output
  bit for bit and the reference's; the gradients of :func:`ulq_backward_saved` must be the reference's
  (``dx`` exactly, the clip gradients up to float32 summation order).
* ``round_away`` (round_even corrected at ties, block by block) against the numpy reference.
* ARQ against the numpy reference, with ties in the quotients.
* The opt-in fused kernels (``AMCT_CAFFE_COMPILE=1``) against the eager path, and their fallback.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amct_caffe.quant import ulq as ulq_module
from amct_caffe.quant.arq import arq_fake_quant
from amct_caffe.quant.fused import FusedKernels
from amct_caffe.quant.numerics import TIE_BLOCK, QuantDataError, round_away
from amct_caffe.quant.ulq import (
    ULQFunction,
    ulq_backward,
    ulq_backward_saved,
    ulq_forward,
    ulq_forward_train,
)
from tests.references import quant

# s = (cmax - cmin) / 255 = 1/16 exactly, o_ulq = -128: the grid-aligned bounds are cmin and cmax
# themselves, and every (k + 0.5) / 16 is an exact tie of the quotient x / s
S = 0.0625
CMIN = -128 * S
CMAX = 127 * S


def _bits(t: torch.Tensor) -> np.ndarray:
    """The float32 bit patterns (tells -0.0 from 0.0)."""
    return t.detach().cpu().contiguous().numpy().astype(np.float32).view(np.int32)


def _adversarial(n: int, seed: int) -> np.ndarray:
    """``n`` float32 values: exact ties on both sides of 0 (+-0.5 included), values on both bounds and next
    to them, outside both bounds, +-inf and ordinary values, shuffled so that ties land in many blocks."""
    rng = np.random.default_rng(seed)
    total = max(n, 64)
    k = rng.integers(-128, 127, total // 4)
    ties = (k + 0.5) * S
    above_max = np.nextafter(np.float32(CMAX), np.float32(9))
    below_min = np.nextafter(np.float32(CMIN), np.float32(-9))
    special = np.array([0.5 * S, -0.5 * S, 1.5 * S, -1.5 * S, CMIN, CMAX, above_max, below_min,
                        np.inf, -np.inf, 0.0, -0.0, 3 * CMAX, 3 * CMIN], np.float32)
    plain = rng.uniform(1.3 * CMIN, 1.3 * CMAX, total - ties.size - special.size)
    x = np.concatenate([ties, special, plain]).astype(np.float32)
    rng.shuffle(x)
    return x[:n]


def _check_against_reference(
    x: np.ndarray, dy: np.ndarray, cmax: float, cmin: float, fixed_min: bool
) -> None:
    used_min = 0.0 if fixed_min else cmin
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    y, coeff, outside = ulq_forward_train(xt, torch.tensor([cmax]), torch.tensor([cmin]), fixed_min)
    y_plain = ulq_forward(xt, torch.tensor([cmax]), torch.tensor([cmin]), fixed_min)
    np.testing.assert_array_equal(_bits(y), _bits(y_plain))
    np.testing.assert_array_equal(y.numpy(), quant.ulq_forward(x, cmax, used_min))
    dx, gmax, gmin = ulq_backward_saved(dyt, coeff, outside)
    dx_ref, gmax_ref, gmin_ref = quant.ulq_backward(x, dy, cmax, used_min)
    np.testing.assert_array_equal(dx.numpy(), dx_ref)
    scale = float(np.abs(dy).sum())  # float32 summation error is relative to the sum of magnitudes
    assert gmax.item() == pytest.approx(gmax_ref, rel=1e-5, abs=1e-6 * scale)
    assert gmin.item() == pytest.approx(gmin_ref, rel=1e-5, abs=1e-6 * scale)


# -- ULQ ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, TIE_BLOCK, 3 * TIE_BLOCK + 17, 6000])
def test_ulq_fast_path_on_ties_bounds_and_infinities(n: int) -> None:
    x = _adversarial(n, seed=n)
    dy = np.random.default_rng(n + 1).standard_normal(n).astype(np.float32)
    _check_against_reference(x, dy, CMAX, CMIN, fixed_min=False)


def test_ulq_fast_path_fixed_min() -> None:
    x = _adversarial(4000, seed=3)
    dy = np.random.default_rng(4).standard_normal(x.size).astype(np.float32)
    # with fixed_min, cmin = 0: s = cmax / 255 and the ties are those of that grid
    _check_against_reference(x, dy, 255 * S, CMIN, fixed_min=True)
    _check_against_reference(np.abs(x), dy, 255 * S, 0.0, fixed_min=False)


def test_ulq_tie_residuals_are_round_away() -> None:
    """Only ties, unit gradients: every element adds D(x) = 0.5*sign(q)/255 to dcmax (round_even's residual
    would be -0.5*sign(q)/255 for half of them), so a missed fix-up shows at full size."""
    k = np.arange(-128, 127)
    x = np.tile(((k + 0.5) * S).astype(np.float32), 40)
    np.random.default_rng(5).shuffle(x)
    dy = np.ones_like(x)
    _, coeff, outside = ulq_forward_train(torch.from_numpy(x), torch.tensor([CMAX]), torch.tensor([CMIN]))
    assert outside is None
    np.testing.assert_array_equal(coeff.numpy(), 0.5 * np.sign(x))
    _, gmax, gmin = ulq_backward_saved(torch.from_numpy(dy), coeff, outside)
    expected = float(np.sum(0.5 * np.sign(x))) / 255
    assert gmax.item() == pytest.approx(expected, abs=1e-6)
    assert gmin.item() == pytest.approx(-expected, abs=1e-6)
    _check_against_reference(x, dy, CMAX, CMIN, fixed_min=False)


def test_ulq_fast_path_nan_stays_inside() -> None:
    """NaN fails both bound comparisons: inside, dx = dy, and the clip gradients become NaN (as the per-case
    formulas give)."""
    x = torch.tensor([0.3, float("nan"), 9.0, -9.0])
    dy = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y, coeff, outside = ulq_forward_train(x, torch.tensor([CMAX]), torch.tensor([CMIN]))
    assert torch.isnan(y[1]) and outside is not None and outside.tolist() == [False, False, True, True]
    dx, gmax, gmin = ulq_backward_saved(dy, coeff, outside)
    assert dx.tolist()[0] == 1.0 and dx.tolist()[2:] == [0.0, 0.0] and dx.tolist()[1] == 2.0
    assert torch.isnan(gmax) and torch.isnan(gmin)


def test_ulq_fast_path_zero_size_and_0d() -> None:
    empty = torch.zeros(0, 3)
    y, coeff, outside = ulq_forward_train(empty, torch.tensor([CMAX]), torch.tensor([CMIN]))
    assert y.shape == (0, 3) and coeff.shape == (0, 3) and outside is None
    dx, gmax, gmin = ulq_backward_saved(torch.zeros(0, 3), coeff, outside)
    assert dx.shape == (0, 3) and gmax.item() == 0.0 and gmin.item() == 0.0
    clips = (torch.tensor([CMAX]), torch.tensor([CMIN]))
    dx, gmax, gmin = ulq_backward(torch.tensor(9.0), torch.tensor(2.0), *clips)
    _, gmax_ref, gmin_ref = quant.ulq_backward(np.array([9.0], np.float32), np.array([2.0], np.float32),
                                               CMAX, CMIN)
    assert dx.reshape(-1).tolist() == [0.0]
    assert gmax.item() == pytest.approx(gmax_ref, rel=1e-6)
    assert gmin.item() == pytest.approx(gmin_ref, rel=1e-6)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
def test_ulq_fast_path_layouts(layout: str) -> None:
    """Memory layouts other than contiguous: the block passes follow memory order, the results the logical
    order; tensors that are not dense take the copying fallbacks."""
    x_np = _adversarial(2 * 6 * 9 * 11, seed=11).reshape(2, 6, 9, 11)
    dy_np = np.random.default_rng(12).standard_normal(x_np.shape).astype(np.float32)
    x, dy = torch.from_numpy(x_np), torch.from_numpy(dy_np)
    if layout == "channels_last":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x, dy = x.transpose(1, 3), dy.transpose(1, 3)
    else:  # not dense: every other column, and dy laid out differently from x
        x, dy = x[..., ::2], dy.transpose(1, 3).contiguous().transpose(1, 3)[..., ::2]
    xr, dyr = x.contiguous().numpy().reshape(-1), dy.contiguous().numpy().reshape(-1)
    y, coeff, outside = ulq_forward_train(x, torch.tensor([CMAX]), torch.tensor([CMIN]))
    np.testing.assert_array_equal(y.contiguous().numpy().reshape(-1), quant.ulq_forward(xr, CMAX, CMIN))
    dx, gmax, gmin = ulq_backward_saved(dy, coeff, outside)
    dx_ref, gmax_ref, gmin_ref = quant.ulq_backward(xr, dyr, CMAX, CMIN)
    np.testing.assert_array_equal(dx.contiguous().numpy().reshape(-1), dx_ref)
    scale = float(np.abs(dyr).sum())
    assert gmax.item() == pytest.approx(gmax_ref, rel=1e-5, abs=1e-6 * scale)
    assert gmin.item() == pytest.approx(gmin_ref, rel=1e-5, abs=1e-6 * scale)


def test_ulq_function_uses_the_fast_path_and_twice_backward() -> None:
    """The autograd Function: reference gradients; a retained graph gives the same gradients again (the
    saved values are not consumed)."""
    x_np = _adversarial(3000, seed=21).reshape(3, 10, 100)
    x_np[~np.isfinite(x_np)] = 5.0  # autograd accumulates dy * 1: keep the loss finite
    dy_np = np.random.default_rng(22).standard_normal(x_np.shape).astype(np.float32)
    x = torch.tensor(x_np, requires_grad=True)
    cmax = torch.tensor([CMAX], requires_grad=True)
    cmin = torch.tensor([CMIN], requires_grad=True)
    y = ULQFunction.apply(x, cmax, cmin, False)
    y.backward(torch.from_numpy(dy_np), retain_graph=True)
    first = (x.grad.clone(), cmax.grad.clone(), cmin.grad.clone())
    dx_ref, gmax_ref, gmin_ref = quant.ulq_backward(x_np.reshape(-1), dy_np.reshape(-1), CMAX, CMIN)
    np.testing.assert_array_equal(first[0].numpy().reshape(-1), dx_ref)
    scale = float(np.abs(dy_np).sum())
    assert first[1].item() == pytest.approx(gmax_ref, rel=1e-5, abs=1e-6 * scale)
    assert first[2].item() == pytest.approx(gmin_ref, rel=1e-5, abs=1e-6 * scale)
    for t in (x, cmax, cmin):
        t.grad = None
    y.backward(torch.from_numpy(dy_np))
    assert torch.equal(x.grad, first[0])
    assert torch.equal(cmax.grad, first[1]) and torch.equal(cmin.grad, first[2])


# -- round_away --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_away_blocks_match_reference(dtype: type) -> None:
    rng = np.random.default_rng(31)
    n = 5 * TIE_BLOCK + 101
    v = rng.uniform(-300, 300, n).astype(dtype)
    v[rng.integers(0, n, 60)] = rng.integers(-300, 300, 60) + 0.5  # ties, some in the tail
    v[-3:] = [-0.5, 0.5, 2.5]
    v[:6] = [np.inf, -np.inf, np.nan, -0.0, 0.0, 0.49999997]
    got = round_away(torch.from_numpy(v)).numpy()
    ref = quant.round_away(v)
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == v.dtype
    np.testing.assert_array_equal(np.signbit(got[np.isfinite(got)]), np.signbit(ref[np.isfinite(ref)]))


def test_round_away_layouts_empty_and_autograd() -> None:
    v = torch.arange(-40, 40, dtype=torch.float32).reshape(2, 4, 10) + 0.5
    ref = quant.round_away(v.numpy())
    assert np.array_equal(round_away(v.transpose(0, 2)).numpy(), ref.transpose(2, 1, 0))
    assert round_away(torch.zeros(0)).shape == (0,)
    assert round_away(torch.tensor(-2.5)).item() == -3.0
    w = v.clone().requires_grad_(True)
    out = round_away(w)
    assert np.array_equal(out.detach().numpy(), ref) and out.requires_grad


# -- ARQ ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("channel_wise", "axis"), [(True, 0), (True, 1), (False, 0)])
def test_arq_fast_path_with_ties(channel_wise: bool, axis: int) -> None:
    rng = np.random.default_rng(41)
    w = rng.standard_normal((16, 12, 3, 3)).astype(np.float32)
    # codes that tie: w = (k + 0.5) * 2**-6 with the extreme 127 * 2**-6 per row, so s = 2**-6 exactly
    w[:, :, 0, 0] = (rng.integers(-100, 100, (16, 12)) + 0.5) * 2.0**-6
    w[0, 0, 1, 1] = 127 * 2.0**-6
    w[:, 3] = 0.0
    w_hat, s_w = arq_fake_quant(torch.from_numpy(w), channel_wise, axis)
    w_ref, s_ref = quant.arq_fake_quant(w, channel_wise, axis)
    np.testing.assert_array_equal(s_w.numpy(), s_ref)
    np.testing.assert_array_equal(w_hat.numpy(), w_ref)


def test_arq_fast_path_rejects_inf_and_nan_anywhere() -> None:
    for bad in (np.inf, -np.inf, np.nan):
        w = np.ones((4, 3, 2, 2), np.float32)
        w[2, 1, 1, 0] = bad
        with pytest.raises(QuantDataError):
            arq_fake_quant(torch.from_numpy(w))
        with pytest.raises(QuantDataError):
            arq_fake_quant(torch.from_numpy(w), channel_wise=False)


# -- the opt-in fused kernels (torch.compile) ----------------------------------------------------------
@pytest.fixture(scope="module")
def fused_kernels() -> FusedKernels:
    """Fused kernels turned on and compiled once for the module; skips where compiling is impossible."""
    kernels = FusedKernels(enabled=True)
    x = torch.linspace(-3, 3, 50)
    out = kernels.ulq_forward(x, torch.tensor([0.02]), torch.tensor([-2.0]), torch.tensor([2.0]),
                              torch.tensor(255.0), torch.tensor(0.0))
    if out is None:
        pytest.skip("torch.compile is not usable here (the eager path took over, as it should)")
    return kernels


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch.compile's imports
def test_fused_kernels_equal_eager(fused_kernels: FusedKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """AMCT_CAFFE_COMPILE=1's kernels: output, coefficients, mask and dx bit for bit the eager path's, the
    clip gradients the reference's; channels-last tensors keep their layout."""
    x_np = _adversarial(4 * 6 * 10 * 10, seed=51).reshape(4, 6, 10, 10)
    dy_np = np.random.default_rng(52).standard_normal(x_np.shape).astype(np.float32)
    clips = (torch.tensor([CMAX]), torch.tensor([CMIN]))
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.from_numpy(x_np).contiguous(memory_format=layout)
        dy = torch.from_numpy(dy_np).contiguous(memory_format=layout)
        y_e, coeff_e, outside_e = ulq_forward_train(x, *clips)
        dx_e, gmax_e, gmin_e = ulq_backward_saved(dy, coeff_e, outside_e)
        monkeypatch.setattr(ulq_module, "FUSED", fused_kernels)
        y, coeff, outside = ulq_forward_train(x, *clips)
        dx, gmax, gmin = ulq_backward_saved(dy, coeff, outside)
        monkeypatch.undo()
        assert not fused_kernels.failed
        assert y.stride() == x.stride() and dx.stride() == dy.stride()
        np.testing.assert_array_equal(_bits(y), _bits(y_e))
        np.testing.assert_array_equal(coeff.numpy(), coeff_e.numpy())
        assert outside_e is not None and torch.equal(outside, outside_e)
        np.testing.assert_array_equal(_bits(dx), _bits(dx_e))
        assert gmax.item() == pytest.approx(gmax_e.item(), rel=1e-5, abs=1e-4)
        assert gmin.item() == pytest.approx(gmin_e.item(), rel=1e-5, abs=1e-4)


def test_fused_kernels_fall_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that cannot compile or run disables the fused path for good; the results stay the eager
    ones. Off by default, and off for tensors without a dense layout."""
    assert FusedKernels(enabled=False).ulq_forward(torch.ones(3), *[torch.tensor(1.0)] * 5) is None
    kernels = FusedKernels(enabled=True)
    assert kernels.ulq_forward(torch.ones(4, 4)[:, ::2], *[torch.tensor(1.0)] * 5) is None

    def broken(fn: object, dynamic: bool) -> object:
        def run(*_: object) -> None:
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(ulq_module, "FUSED", kernels)
    x = torch.from_numpy(_adversarial(600, seed=61))
    y, coeff, outside = ulq_forward_train(x, torch.tensor([CMAX]), torch.tensor([CMIN]))
    assert kernels.failed and not kernels.active
    np.testing.assert_array_equal(y.numpy(), quant.ulq_forward(x.numpy(), CMAX, CMIN))


def test_ulq_function_all_inside_passes_dy_through() -> None:
    """No element outside: nothing is masked, dx is dy, and dcmin = -dcmax (reference gradients)."""
    x_np = (np.arange(-100, 100, dtype=np.float32) * 0.037).reshape(4, 50)
    dy_np = np.random.default_rng(71).standard_normal(x_np.shape).astype(np.float32)
    x = torch.tensor(x_np, requires_grad=True)
    cmax = torch.tensor([CMAX], requires_grad=True)
    cmin = torch.tensor([CMIN], requires_grad=True)
    ULQFunction.apply(x, cmax, cmin, False).backward(torch.from_numpy(dy_np))
    dx_ref, gmax_ref, gmin_ref = quant.ulq_backward(x_np.reshape(-1), dy_np.reshape(-1), CMAX, CMIN)
    np.testing.assert_array_equal(x.grad.numpy().reshape(-1), dx_ref)
    assert cmax.grad.item() == pytest.approx(gmax_ref, rel=1e-5, abs=1e-6)
    assert cmin.grad.item() == pytest.approx(gmin_ref, rel=1e-5, abs=1e-6)
