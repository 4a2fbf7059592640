"""Property-based tests of quant/ (hypothesis): rounding, ARQ, ULQ's gradients, the INT8 codes, and the numpy
twins of amct_caffe.caffe.python_layers.

Each property is checked on generated inputs against an independent statement of it: a decimal-arithmetic
C ``round()``, an exact scaling argument (ARQ), the function ULQ's straight-through gradients are the
derivatives of (finite differences), order and range facts (codes), and the numpy twins' torch originals.
The run is bounded and reproducible: conftest.py loads a derandomized profile with a fixed example count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amct_caffe.caffe import python_layers
from amct_caffe.quant import numerics
from amct_caffe.quant.arq import arq_quantize, arq_scale
from amct_caffe.quant.ulq import ulq_backward, ulq_forward
from tests.references import quant

DTYPES = [np.float32, np.float64]


# -- strategies ----------------------------------------------------------------------------------------------
def any_floats(dtype: type) -> st.SearchStrategy[float]:
    """Every float of ``dtype``, weighted towards the hard cases: exact ties k + 1/2 (both signs, up to the
    last binade with a fraction), their neighbours one ulp away, signed zeros, inf and NaN."""
    width = 32 if dtype == np.float32 else 64
    frac_limit = 2**23 if dtype == np.float32 else 2**52
    ties = st.integers(-frac_limit, frac_limit - 1).map(lambda k: k + 0.5)
    near = st.tuples(ties, st.sampled_from([-np.inf, np.inf])).map(
        lambda t: float(np.nextafter(dtype(t[0]), dtype(t[1]))))
    return st.one_of(st.floats(width=width), ties, near, st.sampled_from([0.0, -0.0, 0.5, -0.5]))


def float_arrays(dtype: type) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(dtype, st.integers(1, 64), elements=any_floats(dtype))


# -- (a) round_away against decimal arithmetic ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_round_away_equals_decimal_reference(dtype: type, data: st.DataObject) -> None:
    x = data.draw(float_arrays(dtype))
    expected = np.array([quant.round_away_decimal(float(v)) for v in x], dtype=dtype)
    got = numerics.round_away(torch.from_numpy(x)).numpy()
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)  # NaN positions compare equal
    assert np.array_equal(np.signbit(got), np.signbit(expected))  # -0.3 -> -0.0, as C round()
    # the vectorised numpy reference other tests use says the same
    np.testing.assert_array_equal(quant.round_away(x), expected)


# -- (b) ARQ: power-of-two equivariance per channel ---------------------------------------------------------
@st.composite
def weights_and_scaling(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """A float32 weight [channels, k] whose every channel has an element of magnitude >= 2**-10 (so no scale
    falls under FLT_EPSILON, even after scaling) and no nonzero element below 2**-100 (so scaling keeps every
    value a normal float32); a channel and a shift in [-6, 6]."""
    channels, k = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    magnitude = st.floats(2.0**-100, 1e6, width=32)
    element = st.one_of(st.just(0.0), magnitude, magnitude.map(lambda v: -v))
    w = np.array([[draw(element) for _ in range(k)] for _ in range(channels)], dtype=np.float32)
    for row in w:
        anchor = draw(st.floats(2.0**-10, 1e6, width=32)) * draw(st.sampled_from([-1.0, 1.0]))
        row[draw(st.integers(0, k - 1))] = anchor
    return w, draw(st.integers(0, channels - 1)), draw(st.integers(-6, 6))


@pytest.mark.parametrize("axis", [0, 1])
@given(case=weights_and_scaling())
def test_arq_scale_is_equivariant_to_a_power_of_two_per_channel(
    axis: int, case: tuple[np.ndarray, int, int]
) -> None:
    """Scaling channel c by 2**e scales its ARQ scale by exactly 2**e and keeps its codes (the extreme, its
    division by 127 or 128 and every quotient w/s scale exactly); the other channels do not move."""
    rows, c, e = case
    w = rows if axis == 0 else np.ascontiguousarray(rows.T)  # Deconvolution's channels are on axis 1
    scaled = w.copy()
    index: tuple[slice | int, ...] = (c, slice(None)) if axis == 0 else (slice(None), c)
    scaled[index] = w[index] * np.float32(2.0**e)
    s, s2 = arq_scale(w, True, axis).numpy(), arq_scale(scaled, True, axis).numpy()
    q, q2 = arq_quantize(w, s, axis).numpy(), arq_quantize(scaled, s2, axis).numpy()
    others = np.arange(len(s)) != c
    assert s2[c] == s[c] * np.float32(2.0**e)
    np.testing.assert_array_equal(s2[others], s[others])
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s, quant.arq_scales(w, True, axis))


# -- (c) ULQ backward: the exact derivatives of its straight-through surrogate -------------------------------
@st.composite
def ulq_case(draw: st.DrawFn) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Clips ``cmin <= 0 < cmax`` (cmin = 0 a quarter of the time), inputs on both sides of and between
    them, and upstream gradients; float64."""
    cmax = draw(st.floats(0.05, 8.0))
    cmin = draw(st.one_of(st.just(0.0), st.floats(-8.0, -0.05)))
    n = draw(st.integers(1, 40))
    x = np.array(draw(st.lists(st.floats(-12.0, 12.0), min_size=n, max_size=n)))
    dy = np.array(draw(st.lists(st.floats(-2.0, 2.0), min_size=n, max_size=n)))
    return cmax, cmin, x, dy


@given(case=ulq_case())
def test_ulq_gradients_are_the_derivatives_of_the_surrogate(case) -> None:
    """AMCT's ULQ gradients are straight-through: not the derivatives of the (piecewise-constant) forward,
    but the exact derivatives of ``y = clamp(x, cmin, cmax) + s*r`` with the rounding residual ``r`` held
    fixed. So central differences of that surrogate (``r`` frozen at the base point) give ``dx`` element by
    element and the clip gradients as sums, for inputs more than one step ``s`` from a clip, where the
    grid-aligned bounds and the raw clips put an element on the same side; ``cmin/s`` is kept away from a
    rounding boundary, where ``D(cmin) = D(cmax)`` holds."""
    cmax, cmin, x, dy = case
    s = (cmax - cmin) / 255.0
    assume(abs(abs(math.fmod(cmin / s, 1.0)) - 0.5) > 1e-6)
    keep = (np.abs(x - cmin) > s) & (np.abs(x - cmax) > s)
    assume(keep.any())
    x, dy = x[keep], dy[keep]
    h = 1e-6
    r = quant.ulq_residual(np.clip(x, cmin, cmax), s)

    def surrogate(xv: np.ndarray, hi: float, lo: float) -> np.ndarray:
        return quant.ulq_surrogate(xv, hi, lo, r)

    fd_x = (surrogate(x + h, cmax, cmin) - surrogate(x - h, cmax, cmin)) / (2 * h)
    fd_max = float(np.sum(dy * (surrogate(x, cmax + h, cmin) - surrogate(x, cmax - h, cmin)))) / (2 * h)
    fd_min = float(np.sum(dy * (surrogate(x, cmax, cmin + h) - surrogate(x, cmax, cmin - h)))) / (2 * h)

    clip = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    dx, gmax, gmin = ulq_backward(torch.from_numpy(x), torch.from_numpy(dy), clip(cmax), clip(cmin))
    np.testing.assert_allclose(dx.numpy(), dy * fd_x, rtol=0, atol=1e-8)
    assert gmax.item() == pytest.approx(fd_max, rel=1e-6, abs=1e-6)
    assert gmin.item() == pytest.approx(fd_min, rel=1e-6, abs=1e-6)
    # the surrogate at the base point is the forward itself away from the .5 ties (the forward rounds half
    # to even, the residual half away)
    y = ulq_forward(torch.from_numpy(x), clip(cmax), clip(cmin)).numpy()
    off_tie = np.abs(np.abs(np.fmod(np.clip(x, cmin, cmax) / s, 1.0)) - 0.5) > 1e-6
    np.testing.assert_allclose(y[off_tie], surrogate(x, cmax, cmin)[off_tie], rtol=1e-9, atol=1e-12)


# -- (d) the INT8 codes: range, integrality, order -----------------------------------------------------------
finite_f32 = st.floats(-(2.0**100), 2.0**100, width=32)
offsets = st.integers(-128, 127)
quant_scales = st.floats(2.0**-20, 2.0**20, width=32)  # quant_param.scale = 1/s_d, a float32


@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=finite_f32), scale=quant_scales,
       offset=offsets)
def test_quant_codes_are_int8_monotone_and_the_reference(x: np.ndarray, scale: float, offset: int) -> None:
    s_d = numerics.quant_step(scale)
    codes = numerics.quant_codes(torch.from_numpy(x), s_d, offset).numpy()
    assert codes.dtype == np.float64
    assert ((codes >= -128) & (codes <= 127)).all() and (codes == np.trunc(codes)).all()
    order = np.argsort(x, kind="stable")
    assert (np.diff(codes[order]) >= 0).all()  # a larger input never gets a smaller code
    raw = numerics.quant_codes(torch.from_numpy(x), s_d, offset, clamp=False).numpy()
    np.testing.assert_array_equal(np.clip(raw, -128, 127), codes)
    np.testing.assert_array_equal(codes, quant.quant_layer_codes(x, scale, offset))


@pytest.mark.parametrize("rounding", [numerics.round_away, numerics.round_even])
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=finite_f32), scale=quant_scales,
       offset=offsets)
def test_int8_codes_are_int8_and_monotone(rounding, x: np.ndarray, scale: float, offset: int) -> None:
    codes = numerics.int8_codes(torch.from_numpy(x), scale, offset, rounding).numpy()
    assert codes.dtype == np.float32
    assert ((codes >= -128) & (codes <= 127)).all() and (codes == np.trunc(codes)).all()
    order = np.argsort(x, kind="stable")
    assert (np.diff(codes[order]) >= 0).all()


# -- (e) caffe/python_layers (numpy twins for a stock pycaffe) equal quant.numerics --------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_python_layers_round_away_equals_numerics(dtype: type, data: st.DataObject) -> None:
    x = data.draw(float_arrays(dtype))
    twin = python_layers.round_away(x)
    torch_result = numerics.round_away(torch.from_numpy(x)).numpy()
    assert twin.dtype == dtype
    np.testing.assert_array_equal(twin, torch_result)
    assert np.array_equal(np.signbit(twin), np.signbit(torch_result))


@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=finite_f32), scale=quant_scales,
       offset=offsets)
def test_python_layers_fake_quant_equals_numerics(x: np.ndarray, scale: float, offset: int) -> None:
    s_d = python_layers.quant_scale_d(scale)
    assert s_d == numerics.quant_step(scale)
    twin = python_layers.fake_quant_data(x, s_d, offset)
    x64 = torch.from_numpy(x.astype(np.float64))
    via_torch = numerics.fake_quant_data(x64, torch.tensor(s_d, dtype=torch.float64), offset)
    np.testing.assert_array_equal(twin, via_torch.to(torch.float32).numpy())
    # the Quant layer's codes, dequantized once to float32
    codes = numerics.quant_codes(torch.from_numpy(x), s_d, offset).numpy()
    np.testing.assert_array_equal(twin, ((codes - offset) * s_d).astype(np.float32))


@given(value=st.binary(max_size=4))
def test_python_layers_offset_byte_equals_numerics(value: bytes) -> None:
    got = python_layers.offset_byte(value)
    assert got == numerics.offset_byte(value)
    assert -128 <= got <= 127 and (got & 0xFF) == (value[0] if value else 0)


@given(scale=st.floats(min_value=float(np.finfo(np.float32).smallest_subnormal),
                       max_value=float(np.finfo(np.float32).max)))
def test_python_layers_quant_scale_d_equals_quant_step(scale: float) -> None:
    with np.errstate(over="ignore"):
        s32 = np.float32(scale)
    assume(math.isfinite(float(s32)) and float(s32) > 0.0)
    assert python_layers.quant_scale_d(scale) == numerics.quant_step(scale) == 1.0 / float(s32)
