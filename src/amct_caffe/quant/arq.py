"""ARQ: AMCT's symmetric INT8 weight quantization (docs/amct-reference.md §3.6, §8.2).

Per output channel (``channel_wise``) or for the whole tensor, the element of largest magnitude ``m`` sets
the scale: ``s_w = m / 127`` when ``m > 0``, else ``s_w = m / -128`` (= |m| / 128, so a dominant negative
extreme uses the full code -128); ``s_w < FLT_EPSILON -> 1.0``. Codes are
``clamp(round_away(w / s_w), -128, 127)`` with ``offset_w = 0``; the fake-quantized weight is
``codes * s_w``. Weight scales are never learned: the ``WeightQAT`` layer recomputes them from the float
shadow weights on every forward.

Caffe's weight layouts put the output channel on axis 0 for Convolution (``[out, in/g, kh, kw]``) and
InnerProduct (``[out, in]``) and on axis 1 for Deconvolution (``[in, out/g, kh, kw]``; AMCT transposes axes
0/1, quantizes per row and transposes back, which is the same as reducing along axis 1):
:func:`weight_channel_axis`.

Idempotence (AMCT reference §8.2 claims ARQ is idempotent, which the save path relies on when it re-quantizes
already fake-quantized weights): the extreme element maps to exactly ``127`` (or ``-128``), so re-running
ARQ on ``w_hat`` gives the same codes; the recomputed scale ``fl(fl(127*s)/127)`` may differ from ``s`` by
one float32 ulp (never for a negative extreme, where /128 is exact). One exception: when the positive and
negative extremes both round to ``+-127`` codes (``|min| >= 126.5 s``), ``w_hat`` has ``|max| == |min|``,
the tie picks the minimum and the second pass uses ``127 s / 128``. Callers should therefore quantize from
the float shadow weights, not from ``w_hat``.
"""

from __future__ import annotations

import torch

from amct_caffe.errors import UnsupportedLayerError
from amct_caffe.quant.numerics import (
    INT8_MAX,
    INT8_MIN,
    ArrayLike,
    Tensor,
    as_float_tensor,
    as_tensor,
    div_exact,
    int8_codes,
    non_finite_data_error,
    replace_tiny_scales,
    round_away,
    scale_too_large_error,
    scales_in_range,
)

#: The weight axis that holds the output channels, per quantizable Caffe layer type.
WEIGHT_CHANNEL_AXIS = {"Convolution": 0, "InnerProduct": 0, "Deconvolution": 1}


def weight_channel_axis(layer_type: str) -> int:
    """The output-channel axis of a Caffe layer's weight blob: 0 for Convolution/InnerProduct, 1 for
    Deconvolution. Other types have no ARQ-quantized weight: :class:`UnsupportedLayerError`."""
    try:
        return WEIGHT_CHANNEL_AXIS[layer_type]
    except KeyError:
        raise UnsupportedLayerError(
            f"Layer type '{layer_type}' has no weights that ARQ can quantize; only "
            f"{', '.join(sorted(WEIGHT_CHANNEL_AXIS))} do."
        ) from None


def _rows(w: Tensor, channel_wise: bool, axis: int) -> Tensor:
    """``w`` as a 2-D view: one row per output channel (channel_wise) or a single row."""
    if not channel_wise:
        return w.reshape(1, -1)
    if not -w.dim() <= axis < w.dim():
        raise ValueError(f"ARQ: channel axis {axis} is out of range for a weight of shape {tuple(w.shape)}")
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def _broadcast_scale(s_w: Tensor, w: Tensor, axis: int) -> Tensor:
    """Reshape a per-channel (or single) scale so that it broadcasts along ``axis`` of ``w``."""
    s_w = s_w.reshape(-1)
    if s_w.numel() == 1:
        return s_w.reshape([1] * w.dim()) if w.dim() else s_w.reshape(())
    if s_w.numel() != w.shape[axis]:
        raise ValueError(
            f"ARQ: {s_w.numel()} weight scales do not match axis {axis} of a weight of shape {tuple(w.shape)}"
        )
    shape = [1] * w.dim()
    shape[axis] = -1
    return s_w.reshape(shape)


def arq_scale(w: ArrayLike, channel_wise: bool = True, axis: int = 0) -> Tensor:
    """ARQ weight scales ``s_w``: shape ``[w.shape[axis]]`` when ``channel_wise``, else ``[1]``.

    Per row: ``m = max`` if ``|max| > |min|`` else ``min``; ``s = m/127`` if ``m > 0`` else ``m/-128``;
    then :func:`~amct_caffe.quant.numerics.process_scale` (below FLT_EPSILON -> 1.0, e.g. an all-zero
    channel). Weights with inf/NaN raise :class:`~amct_caffe.quant.numerics.QuantDataError`.
    """
    w = as_float_tensor(w)
    rows = _rows(w, channel_wise, axis)
    # two vectorised row reductions (torch.aminmax along a dimension is a much slower scalar loop)
    wmax = rows.amax(dim=1)
    wmin = rows.amin(dim=1)
    m = torch.where(wmax.abs() > wmin.abs(), wmax, wmin)
    s = replace_tiny_scales(torch.where(m > 0, div_exact(m, INT8_MAX), div_exact(m, INT8_MIN)))
    # process_scale's checks and the finiteness check with one host read (a single synchronisation on
    # CUDA, per WeightQAT forward): the extremes are finite exactly when every element is (the reductions
    # propagate NaN), and then the scales are finite too
    finite = torch.isfinite(wmax).all() & torch.isfinite(wmin).all()
    all_finite, in_range = torch.stack([finite, scales_in_range(s)]).tolist()
    if not all_finite:
        raise non_finite_data_error("weight")
    if not in_range:
        raise scale_too_large_error("weight")
    return s


def arq_quantize(w: ArrayLike, s_w: ArrayLike, axis: int = 0) -> Tensor:
    """INT8 weight codes ``clamp(round_away(w / s_w[c]), -128, 127)`` (int8 tensor of ``w``'s shape).

    ``s_w`` is per channel along ``axis`` or a single value; this is what the deploy caffemodel stores in
    ``int8_data`` (AMCT reference §7.2).
    """
    w = as_float_tensor(w)
    s = _broadcast_scale(as_tensor(s_w, like=w), w, axis)
    return int8_codes(w, s, 0, round_away).to(torch.int8)


def arq_fake_quant(w: ArrayLike, channel_wise: bool = True, axis: int = 0) -> tuple[Tensor, Tensor]:
    """ARQ fake quantization: ``(w_hat, s_w)`` with ``w_hat = codes * s_w`` in ``w``'s
    dtype (AMCT reference §8.5).

    Not differentiable (the codes are rounded); the ``WeightQAT`` layer applies the straight-through
    estimator itself by copying the gradient of ``w_hat`` to the float shadow weight.
    """
    w = as_float_tensor(w)
    s_w = arq_scale(w, channel_wise, axis)
    s = _broadcast_scale(s_w, w, axis)
    return int8_codes(w, s, 0, round_away).mul_(s), s_w
