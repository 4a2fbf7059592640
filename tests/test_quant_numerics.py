"""quant.numerics: rounding, scale rules, activation factors, INT8 quantize, bias and deq_scale packing.

Expected values are hand computations (dyadic numbers where exactness matters) or small references
written here; never the output of the code under test.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from amct_caffe.errors import AmctError, ConfigError
from amct_caffe.quant.numerics import (
    FLT_EPSILON,
    INT8_MAX,
    INT8_MIN,
    BiasOverflowError,
    InvalidScaleError,
    data_scale_offset,
    deq_scale,
    fake_quant_bias,
    fake_quant_data,
    pack_deq_scale,
    process_scale,
    quant_codes,
    quantize_bias,
    round_away,
    round_even,
    unpack_deq_scale,
)
from tests.references import quant

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))  # 0.49999997 in float32


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_constants() -> None:
    assert (INT8_MIN, INT8_MAX) == (-128, 127)
    assert FLT_EPSILON == float(np.finfo(np.float32).eps) == 1.1920928955078125e-07


# -- rounding ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_round_away_ties_and_hard_cases(device: str) -> None:
    x = f32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, BELOW_HALF, -BELOW_HALF, 4194304.5, -4194304.5, 8388609.0,
             2.4999998, -2.4999998, 0.0, 1e30, -7.0]).to(device)
    big = float(np.float32(1e30))  # an integer-valued float: unchanged
    expected = [1, 2, 3, -1, -2, -3, 0, 0, 4194305, -4194305, 8388609, 2, -2, 0, big, -7]
    assert round_away(x).cpu().tolist() == expected
    # the naive floor(x + 0.5) is wrong at both hard cases this test pins
    assert torch.floor(f32([BELOW_HALF]) + 0.5).item() == 1.0
    assert torch.floor(f32([-2.5]) + 0.5).item() == -2.0


def test_round_away_float64_numpy_and_specials() -> None:
    y = round_away(np.array([0.49999999999999994, -0.5, 2.5], dtype=np.float64))
    assert y.dtype == torch.float64 and y.tolist() == [0.0, -1.0, 3.0]
    z = round_away(f32([math.inf, -math.inf, math.nan]))
    assert z[0].item() == math.inf and z[1].item() == -math.inf and math.isnan(z[2].item())
    assert round_away(torch.tensor([3, -4])).tolist() == [3, -4]


def test_round_away_matches_reference_on_random_floats() -> None:
    rng = np.random.default_rng(1)
    halves = (rng.integers(-2000, 2000, 500) + 0.5).astype(np.float32)  # exact ties
    rand = (rng.standard_normal(2000) * 300).astype(np.float32)
    neighbours = [np.nextafter(halves, np.float32(0)), np.nextafter(halves, np.float32(1e9))]
    x = np.concatenate([halves, rand, *neighbours])
    ref = np.array([quant.round_away_decimal(float(v)) for v in x], dtype=np.float32)
    np.testing.assert_array_equal(round_away(x).numpy(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_round_even_ties(device: str) -> None:
    x = f32([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, BELOW_HALF, 2.6]).to(device)
    assert round_even(x).cpu().tolist() == [0, 2, 2, 4, 0, -2, -2, 0, 3]


# -- process_scale -----------------------------------------------------------------------------------------
def test_process_scale_rules() -> None:
    s = process_scale(f32([1e-8, 0.0, -3.0, FLT_EPSILON, 0.5, 2.0**23]))
    assert s.tolist() == [1.0, 1.0, 1.0, FLT_EPSILON, 0.5, 2.0**23]
    assert process_scale(1e-9).item() == 1.0
    for bad in (math.inf, math.nan, 2.0**24):  # 1/2**24 < FLT_EPSILON
        with pytest.raises(InvalidScaleError):
            process_scale(f32([0.5, bad]))
    assert issubclass(InvalidScaleError, ConfigError) and issubclass(InvalidScaleError, AmctError)


# -- activation factors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_data_scale_offset_hand_cases(device: str) -> None:
    def run(cmin: float, cmax: float) -> tuple[float, int]:
        s, o = data_scale_offset(f32(cmin).to(device), f32(cmax).to(device))
        assert s.device.type == device and float(o) == int(o)
        return s.item(), int(o)

    s, o = run(-1.0, 3.0)  # s = 4/255; cmin/s = -63.75 -> -64; o = 64 - 128
    assert s == pytest.approx(4 / 255, rel=1e-7) and o == -64
    # tie: cmin/s = -0.5 exactly -> round_away gives -1 (half-even would give 0 -> -128)
    assert run(-0.5, 254.5) == (1.0, -127)
    # all negative: cmax clamps to 0 -> s = 2/255, cmin/s = -255 -> o = 127
    s, o = run(-2.0, -1.0)
    assert s == pytest.approx(2 / 255, rel=1e-7) and o == 127
    # all positive (after ReLU): cmin clamps to 0 -> o = -128
    s, o = run(1.0, 3.0)
    assert s == pytest.approx(3 / 255, rel=1e-7) and o == -128
    # range too small: s = 2e-6/255 < FLT_EPSILON -> s = 1, o = -128
    assert run(-1e-6, 1e-6) == (1.0, -128)
    assert run(0.0, 0.0) == (1.0, -128)
    assert run(-3e-5, 0.0) == (1.0, -128)


def test_data_scale_offset_python_numbers_numpy_and_range() -> None:
    s, o = data_scale_offset(-1.0, 3.0)
    assert s.dtype == torch.float32 and int(o) == -64
    rng = np.random.default_rng(2)
    cmin = -rng.uniform(0, 10, 1000).astype(np.float32)
    cmax = rng.uniform(0, 10, 1000).astype(np.float32)
    s, o = data_scale_offset(cmin, cmax)
    assert o.min() >= -128 and o.max() <= 127
    factors = [quant.data_scale_offset(hi, lo) for hi, lo in zip(cmax, cmin)]
    s_ref = np.array([f[0] for f in factors], np.float32)
    o_ref = np.array([f[1] for f in factors], np.float32)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(o.numpy(), o_ref)
    with pytest.raises(InvalidScaleError):
        data_scale_offset(-1.0, math.inf)


# -- quantize / fake quantize ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_quant_codes_hand_case(device: str) -> None:
    x = f32([-100.0, -69.25, 0.25, 0.75, 58.5, 100.0, -0.75]).to(device)
    # x/s = [-200, -138.5, 0.5, 1.5, 117, 200, -1.5]; away: [-200, -139, 1, 2, 117, 200, -2]; +10; clamp
    q = quant_codes(x, 0.5, 10)
    assert q.dtype == torch.float64
    assert q.cpu().tolist() == [-128, -128, 11, 12, 127, 127, 8]
    assert quant_codes(x, 0.5, 10, clamp=False).cpu().tolist() == [-190, -129, 11, 12, 127, 210, 8]
    y = fake_quant_data(x, 0.5, 10)
    assert y.cpu().tolist() == [-69.0, -69.0, 0.5, 1.0, 58.5, 58.5, -1.0]
    # half-to-even: 0.5 -> 0, 1.5 -> 2, -1.5 -> -2
    y_even = fake_quant_data(x, 0.5, 10, rounding=round_even)
    assert y_even.cpu().tolist() == [-69.0, -69.0, 0.0, 1.0, 58.5, 58.5, -1.0]


def test_quant_codes_post_relu_offset_and_numpy() -> None:
    # o_d = -128 (cmin = 0): negatives saturate at code -128, i.e. value 0
    x = np.array([-5.0, 0.0, 0.3, 12.75, 20.0], dtype=np.float32)
    assert quant_codes(torch.from_numpy(x), 0.05, -128).tolist() == [-128, -128, -122, 127, 127]
    y = fake_quant_data(x, 0.05, -128)
    np.testing.assert_allclose(y.numpy(), [0.0, 0.0, 0.3, 12.75, 12.75], rtol=1e-6)


# -- bias and deq_scale ------------------------------------------------------------------------------------
def test_deq_scale_is_float32_product() -> None:
    d = deq_scale(0.5, [0.25, 3.0, 0.1])
    assert d.dtype == torch.float32
    np.testing.assert_array_equal(d.numpy(), np.float32(0.5) * np.array([0.25, 3.0, 0.1], dtype=np.float32))
    assert deq_scale(0.0213, [1.0]).item() == np.float32(0.0213)


def test_quantize_bias_hand_case() -> None:
    s_w = [0.25, 0.125, 2.0**-10]  # s_d * s_w = [0.125, 0.0625, 2**-11]
    b = np.array([1.0625, -0.21875, 3.0], dtype=np.float32)  # b/(s_d s_w) = [8.5, -3.5, 6144]
    q = quantize_bias(b, 0.5, s_w)
    assert q.dtype == torch.int32 and q.tolist() == [9, -4, 6144]
    assert quantize_bias(b, 0.5, [0.25]).tolist() == [9, -2, 24]  # per-tensor: [8.5, -1.75, 24]
    assert fake_quant_bias(b, 0.5, s_w).tolist() == [1.125, -0.25, 3.0]


def test_quantize_bias_int32_range() -> None:
    ok = torch.tensor([2147483647.0, -2147483648.0, 2147483647.4], dtype=torch.float64)
    assert quantize_bias(ok, 1.0, [1.0]).tolist() == [2147483647, -2147483648, 2147483647]
    bad = torch.tensor([0.0, 2147483647.5, 1.0, -2147483648.5], dtype=torch.float64)
    with pytest.raises(BiasOverflowError) as info:
        quantize_bias(bad, 1.0, [1.0], layer="conv1")
    assert info.value.channels == [1, 3] and info.value.layer == "conv1"
    assert "conv1" in str(info.value) and "skip" in str(info.value)
    with pytest.raises(ConfigError):
        fake_quant_bias(np.array([1e6], dtype=np.float32), 2.0**-20, [2.0**-20])


def _float_bits(v: float) -> int:
    return int.from_bytes(struct.pack("<f", v), "little")


def test_pack_deq_scale_bit_patterns() -> None:
    deq = np.array([1.0, 0.0213 * 0.00448, 3.5e-7, 0.5], dtype=np.float32)
    packed = pack_deq_scale(deq)
    assert packed.dtype == np.uint64 and packed.shape == (4,)
    assert [int(p) for p in packed] == [_float_bits(float(v)) for v in deq]
    assert int(packed[0]) == 0x3F800000
    assert all(int(p) >> 32 == 0 for p in packed)
    # N = 3 in bits 32-39, offset_w = -2 (0xFE) in bits 40-47
    word = pack_deq_scale(np.array([0.5], dtype=np.float32), shift=[3], offset_w=[-2])
    assert int(word[0]) == 0x3F000000 | (3 << 32) | (0xFE << 40)
    d, n, ow = unpack_deq_scale(word)
    assert d.dtype == np.float32 and d.tolist() == [0.5] and n.tolist() == [3] and ow.tolist() == [-2]
    d, n, ow = unpack_deq_scale(packed)
    np.testing.assert_array_equal(d, deq)
    assert n.tolist() == [0, 0, 0, 0] and ow.tolist() == [0, 0, 0, 0]
    # tensors are accepted too
    assert pack_deq_scale(torch.tensor([1.0])).tolist() == [0x3F800000]
    with pytest.raises(ValueError):
        pack_deq_scale([1.0], offset_w=[200])
