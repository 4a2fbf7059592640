"""quant.arq: ARQ weight scales, codes and fake quantization (docs/amct-reference.md §8.2), against hand
values and the loop reference of tests/references/quant.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amct_caffe.errors import UnsupportedLayerError
from amct_caffe.quant.arq import arq_fake_quant, arq_quantize, arq_scale, weight_channel_axis
from amct_caffe.quant.numerics import QuantDataError
from tests.references import quant

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Dyadic hand weight: row 0 is dominated by its minimum -2 (s = 2/128 = 2**-6), row 1 by its maximum
# 127 * 2**-7 (s = 2**-7). 1.0078125 = 64.5 * 2**-6 and -0.48828125 = -62.5 * 2**-7 are exact ties.
W = [[0.5, -2.0, 1.0078125], [0.9921875, -0.48828125, 0.0]]


def test_weight_channel_axis() -> None:
    assert weight_channel_axis("Convolution") == 0
    assert weight_channel_axis("InnerProduct") == 0
    assert weight_channel_axis("Deconvolution") == 1
    with pytest.raises(UnsupportedLayerError):
        weight_channel_axis("Pooling")


@pytest.mark.parametrize("device", DEVICES)
def test_arq_channel_wise_axis0_hand(device: str) -> None:
    w = torch.tensor(W, dtype=torch.float32, device=device)
    s = arq_scale(w, channel_wise=True, axis=0)
    assert s.shape == (2,) and s.cpu().tolist() == [2.0**-6, 2.0**-7]
    # codes: row 0: 32, -128, 64.5 -> 65 (away); row 1: 127, -62.5 -> -63 (away), 0
    q = arq_quantize(w, s, axis=0)
    assert q.dtype == torch.int8 and q.cpu().tolist() == [[32, -128, 65], [127, -63, 0]]
    w_hat, s2 = arq_fake_quant(w, channel_wise=True, axis=0)
    assert s2.cpu().tolist() == [2.0**-6, 2.0**-7]
    assert w_hat.cpu().tolist() == [[0.5, -2.0, 65 * 2.0**-6], [0.9921875, -63 * 2.0**-7, 0.0]]


def test_arq_per_tensor_hand() -> None:
    w = np.array(W, dtype=np.float32)
    s = arq_scale(w, channel_wise=False)
    assert s.tolist() == [2.0**-6]  # |max| = 1.0078125 < |min| = 2 -> m = -2 -> 2/128
    # row 1 with s = 2**-6: 0.9921875 -> 63.5 -> 64; -0.48828125 -> -31.25 -> -31
    assert arq_quantize(w, s).tolist() == [[32, -128, 65], [64, -31, 0]]
    w_hat, _ = arq_fake_quant(w, channel_wise=False)
    assert w_hat.tolist() == [[0.5, -2.0, 65 / 64], [1.0, -31 / 64, 0.0]]


def test_arq_deconvolution_axis1_hand() -> None:
    w = torch.tensor(W, dtype=torch.float32)
    s = arq_scale(w, channel_wise=True, axis=weight_channel_axis("Deconvolution"))
    # columns: [0.5, 0.9921875] -> 0.9921875/127 = 2**-7; [-2, -0.488] -> 2/128; [1.0078125, 0] -> /127
    assert s.shape == (3,)
    assert s[:2].tolist() == [2.0**-7, 2.0**-6]
    assert s[2].item() == pytest.approx(1.0078125 / 127, rel=1e-7)
    assert arq_quantize(w, s, axis=1).tolist() == [[64, -128, 127], [127, -31, 0]]


@pytest.mark.parametrize("axis", [0, 1])
def test_arq_matches_loop_reference_on_random_4d(axis: int) -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 5, 3, 3)) * rng.uniform(0.01, 2, (6, 5, 1, 1))).astype(np.float32)
    w[2 if axis == 0 else 0] = 0.0  # an all-zero channel (axis 0) / a zero input slice (axis 1)
    w_hat, s = arq_fake_quant(w, channel_wise=True, axis=axis)
    w_hat_ref, s_ref = quant.arq_fake_quant(w, channel_wise=True, axis=axis)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(w_hat.numpy(), w_hat_ref)


def test_arq_flt_epsilon_rule_and_saturation() -> None:
    w = torch.tensor([[0.0, 0.0], [1e-6, -5e-7]], dtype=torch.float32)
    s = arq_scale(w, channel_wise=True)
    assert s.tolist() == [1.0, 1.0]  # 0 and 1e-6/127 are below FLT_EPSILON
    assert arq_quantize(w, s).tolist() == [[0, 0], [0, 0]]
    q = arq_quantize(torch.tensor([[3.0, -3.0, 1.27, -1.285]]), torch.tensor([0.01]))
    assert q.tolist() == [[127, -128, 127, -128]]


def test_arq_rejects_non_finite_weights() -> None:
    with pytest.raises(QuantDataError):
        arq_scale(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(QuantDataError):
        arq_fake_quant(np.array([[1.0, np.inf]], dtype=np.float32))


def test_arq_idempotent() -> None:
    """Re-running ARQ on fake-quantized weights keeps every code; the scale can move by one float32 ulp
    (fl(fl(127 s)/127) != s for some s), never for a negative extreme (division by 128 is exact)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    rows = w.reshape(32, -1)
    # keep clear of the |max| ~ |min| tie documented in the next test
    ratio = np.abs(rows.min(1)) / np.abs(rows.max(1))
    w = w[np.abs(ratio - 1) > 0.01]
    w_hat, s = arq_fake_quant(w, channel_wise=True)
    w_hat2, s2 = arq_fake_quant(w_hat, channel_wise=True)
    q = arq_quantize(w, s)
    assert torch.equal(arq_quantize(w_hat, s2), q)
    np.testing.assert_array_max_ulp(s2.numpy(), s.numpy(), maxulp=1)
    np.testing.assert_array_max_ulp(w_hat2.numpy(), w_hat.numpy(), maxulp=1)
    negative = (q.reshape(q.shape[0], -1) == -128).any(dim=1)
    assert negative.any() and torch.equal(s2[negative], s[negative])
    # a third pass changes nothing any more: fixed point reached
    w_hat3, s3 = arq_fake_quant(w_hat2, channel_wise=True)
    assert torch.equal(arq_quantize(w_hat2, s3), q)
    np.testing.assert_array_max_ulp(s3.numpy(), s2.numpy(), maxulp=1)


def test_arq_tie_after_quantization_changes_scale() -> None:
    """Pins AMCT's tie rule (|max| > |min| strictly, else min): w = [1, -0.999] quantizes to codes
    [127, -127], so w_hat has |max| == |min| and the second pass takes min -> scale |min|/128."""
    w = torch.tensor([[1.0, -0.999]])
    w_hat, s = arq_fake_quant(w)
    assert s.item() == np.float32(1.0) / np.float32(127)
    assert arq_quantize(w, s).tolist() == [[127, -127]]
    _, s2 = arq_fake_quant(w_hat)
    assert s2.item() == pytest.approx(1.0 / 128, rel=1e-6)
