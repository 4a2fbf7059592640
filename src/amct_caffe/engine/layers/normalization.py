"""Normalisation layers: BatchNorm, Scale, Bias, LRN, MVN, as BVLC Caffe computes them.

Caffe's BatchNorm only normalises (no affine part; a following Scale layer with ``bias_term`` supplies
it) and keeps *unnormalised* running sums plus a scale factor in its three blobs, so the blobs are
``[mean_sum, var_sum, factor]`` and the statistics are ``blob / factor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amct_caffe.engine.layers.base import TEST, Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.model.batchnorm import global_statistics
from amct_caffe.proto import caffe_pb2


def _f32(value: float) -> float:
    """``value`` rounded to float32, as Caffe holds every layer parameter (Dtype float)."""
    return float(np.float32(value))


def _constant(value: float) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(type="constant", value=value)



def _broadcastable(layer: Layer, t: Tensor, x: Tensor, axis_param: int, what: str) -> Tensor:
    """``t`` viewed so that it multiplies/adds onto ``x`` starting at axis ``axis_param`` of ``x``.

    Caffe (Scale/Bias ``Reshape``): a 0-axis ``t`` is a scalar (the axis is then ignored); otherwise
    ``x.shape[axis : axis + t.dim()]`` must equal ``t.shape``. Axes of ``x`` before ``axis`` are "outer",
    after it "inner"; broadcasting covers both.
    """
    if t.dim() == 0:
        return t
    axis = layer.canonical_axis(axis_param, x.dim(), "axis")
    span = tuple(x.shape[axis : axis + t.dim()])
    if x.dim() < axis + t.dim() or span != tuple(t.shape):
        raise layer.error(
            f"{what} of shape {tuple(t.shape)} does not match bottom[0] of shape {tuple(x.shape)} at axis "
            f"{axis}: bottom[0].shape[{axis}:{axis + t.dim()}] is {span}; fix axis/num_axes or the shapes."
        )
    return t.reshape(tuple(t.shape) + (1,) * (x.dim() - axis - t.dim()))


def _param_shape(layer: Layer, x: Tensor, axis_param: int, num_axes: int) -> tuple[int, ...]:
    """The learned blob's shape for Scale/Bias with one bottom: ``x.shape[axis : axis + num_axes]``."""
    axis = layer.canonical_axis(axis_param, x.dim(), "axis")
    if num_axes < -1:
        raise layer.error(f"num_axes is {num_axes}; it must be >= 0, or -1 for all axes from `axis` on.")
    if num_axes >= 0 and x.dim() < axis + num_axes:
        raise layer.error(
            f"the parameter blob would span axes {axis}..{axis + num_axes - 1}, past the bottom's "
            f"{x.dim()} axes (shape {tuple(x.shape)}); reduce num_axes or axis."
        )
    end = x.dim() if num_axes == -1 else axis + num_axes
    return tuple(int(d) for d in x.shape[axis:end])


@register("BatchNorm")
class BatchNorm(Layer):
    """Caffe's BatchNorm: ``y = (x - mean) / sqrt(var + eps)`` per channel (axis 1), no affine part.

    Blobs: ``[mean_sum (C), var_sum (C), factor (1)]``, all 0 initially, never trained (Caffe appends
    ``param { lr_mult: 0 }`` for each blob the prototxt does not configure and rejects ``lr_mult != 0``).

    ``use_global_stats`` (default: phase is TEST) uses ``mean = mean_sum * s``, ``var = var_sum * s`` with
    ``s = factor == 0 ? 0 : 1 / factor`` (so an untrained layer divides by ``sqrt(eps)``). Otherwise the
    batch statistics over N and all spatial axes normalise (biased variance), and under no_grad the blobs
    are updated in place: ``factor = factor * maf + 1``, ``mean_sum = maf * mean_sum + mean``,
    ``var_sum = maf * var_sum + m / (m - 1) * var`` with ``m = count / C`` (the unbiased estimate).
    Caffe's training gradient ``(dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps)`` is exactly the
    autograd gradient of that forward; in global-stats mode the statistics are constants (Caffe
    computes no gradient for the blobs).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.batch_norm_param
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else phase == TEST
        self.maf = _f32(p.moving_average_fraction)
        self.eps = _f32(p.eps)
        for i in range(3):
            if len(param.param) == i:
                param.param.add().lr_mult = 0.0
            elif param.param[i].lr_mult != 0.0:
                raise self.error(
                    f"param {i} has lr_mult {param.param[i].lr_mult}; BatchNorm's statistics cannot be "
                    "trained as layer parameters. Set lr_mult: 0 (or drop the param entries)."
                )
        #: Axis 1 of the bottom, set by :meth:`setup` (the blobs' length).
        self.channels: int | None = None

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        x = bottoms[0]
        if x.dim() < 2:
            raise self.error(f"needs a bottom with at least 2 axes (N, C, ...), got shape {tuple(x.shape)}.")
        channels = int(x.shape[1])
        self.channels = channels
        self.blobs = [self.new_blob((channels,)), self.new_blob((channels,)), self.new_blob((1,))]

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        channels = self.channels
        if channels is None or x.dim() < 2 or x.shape[1] != channels:
            raise self.error(
                f"was set up for {channels} channels but its bottom now has shape {tuple(x.shape)}."
            )
        view = (1, channels) + (1,) * (x.dim() - 2)
        if self.use_global_stats:
            mean, var = global_statistics(*(b.detach() for b in self.blobs))
            if x.dtype == mean.dtype and x.numel() > 0:
                # torch's fused kernel: one pass forward and one backward (dy / std) instead of the formula's
                # subtract and divide, in any memory layout
                return [F.batch_norm(x, mean, var, None, None, False, 0.0, float(self.eps))]
            std = torch.sqrt(var + self.eps)
            return [(x - mean.view(view)) / std.view(view)]
        m = x.numel() // channels
        if m > 1 and x.dtype == torch.float32:
            return [self._batch_forward_fused(x, m)]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=dims, keepdim=True)
        y = centered / torch.sqrt(var + self.eps)
        if not self.reshaping:  # the net's shape pass updates no statistics
            bias_correction = float(np.float32(m) / np.float32(m - 1)) if m > 1 else 1.0
            self._update_statistics(mean.reshape(-1), var.reshape(-1) * bias_correction)
        return [y]

    def _batch_forward_fused(self, x: Tensor, m: int) -> Tensor:
        """The batch-statistics forward in torch's fused batch-norm kernel (one pass forward, one backward,
        instead of the six elementwise ops of the formula; the gradient is the same analytic one).

        With momentum 1 the kernel leaves the batch mean and the unbiased batch variance (``m / (m - 1)``
        times the biased one, Caffe's correction) in the running buffers, which feed Caffe's moving sums.
        """
        channels = int(x.shape[1])
        mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
        unbiased_var = torch.ones(channels, dtype=x.dtype, device=x.device)
        y = torch.nn.functional.batch_norm(x, mean, unbiased_var, None, None, training=True, momentum=1.0,
                                           eps=float(self.eps))
        if not self.reshaping:  # the net's shape pass updates no statistics
            self._update_statistics(mean, unbiased_var)
        return y

    def _update_statistics(self, mean: Tensor, unbiased_var: Tensor) -> None:
        with torch.no_grad():
            b0, b1, b2 = self.blobs
            b2.mul_(self.maf).add_(1.0)
            b0.mul_(self.maf).add_(mean.reshape(-1).to(b0.dtype))
            b1.mul_(self.maf).add_(unbiased_var.reshape(-1).to(b1.dtype))


class _AxisLayer(Layer):
    """Shared parameter checks of Scale and Bias (one or two bottoms)."""

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1


@register("Scale")
class Scale(_AxisLayer):
    """``y = x * s (+ b)``, ``s`` broadcast over ``x`` from axis ``axis`` (default 1).

    One bottom: ``s`` is blob 0, of shape ``x.shape[axis : axis + num_axes]`` (``num_axes`` -1: to the
    end; 0: a scalar), filler default constant 1. Two bottoms: ``s`` is bottom 1 (any shape that matches
    ``x`` from ``axis``; it receives a gradient) and the layer has no scale blob. ``bias_term`` adds a bias
    blob (the last blob) as Caffe's internal Bias layer does: same axis, ``num_axes`` of bottom 1 in the
    two-bottom case, filler ``bias_filler`` (default constant 0).
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.axis = int(param.scale_param.axis)
        self.bias_term = bool(param.scale_param.bias_term)

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        p = self.param.scale_param
        x = bottoms[0]
        blobs: list[Tensor] = []
        if len(bottoms) == 1:
            filler = p.filler if p.HasField("filler") else _constant(1.0)
            blobs.append(self.new_blob(_param_shape(self, x, self.axis, int(p.num_axes)), filler))
        if self.bias_term:
            num_axes = bottoms[1].dim() if len(bottoms) == 2 else int(p.num_axes)
            blobs.append(self.new_blob(_param_shape(self, x, self.axis, num_axes), p.bias_filler))
        self.blobs = blobs

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if len(bottoms) == 1 and self._per_channel(x):
            return [self._per_channel_forward(x)]
        scale = bottoms[1] if len(bottoms) == 2 else self.blobs[0]
        y = x * _broadcastable(self, scale.to(x.dtype), x, self.axis, "the scale")
        if self.bias_term:
            y = y + _broadcastable(self, self.blobs[-1].to(x.dtype), x, self.axis, "the bias")
        return [y]

    def _per_channel(self, x: Tensor) -> bool:
        """One scale (and bias) per channel of axis 1, in ``x``'s dtype: the affine part of a batch norm."""
        scale = self.blobs[0]
        return (
            x.dim() >= 2 and scale.dim() == 1 and self.axis in (1, 1 - x.dim()) and x.numel() > 0
            and scale.shape[0] == x.shape[1] and scale.dtype == x.dtype
            and (not self.bias_term or self.blobs[-1].shape == scale.shape)
        )

    def _per_channel_forward(self, x: Tensor) -> Tensor:
        """``x * s + b`` in torch's fused batch-norm kernel with mean 0, variance 1 and eps 0 (its inverse
        standard deviation is exactly 1): one pass forward and one backward, which also gives the scale and
        bias gradients (``sum(dy * x)``, ``sum(dy)``), in any memory layout."""
        channels = int(x.shape[1])
        zeros = torch.zeros(channels, dtype=x.dtype, device=x.device)
        ones = torch.ones(channels, dtype=x.dtype, device=x.device)
        bias = self.blobs[-1] if self.bias_term else None
        return F.batch_norm(x, zeros, ones, self.blobs[0], bias, False, 0.0, 0.0)


@register("Bias")
class Bias(_AxisLayer):
    """``y = x + b``, ``b`` broadcast over ``x`` from axis ``axis`` (default 1).

    One bottom: ``b`` is blob 0 of shape ``x.shape[axis : axis + num_axes]`` (``num_axes`` -1: to the end),
    filler default constant 0. Two bottoms: ``b`` is bottom 1 and the layer has no blob.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.axis = int(param.bias_param.axis)

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        p = self.param.bias_param
        if len(bottoms) == 1:
            filler = p.filler if p.HasField("filler") else _constant(0.0)
            self.blobs = [self.new_blob(_param_shape(self, bottoms[0], self.axis, int(p.num_axes)), filler)]

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        bias = bottoms[1] if len(bottoms) == 2 else self.blobs[0]
        return [x + _broadcastable(self, bias.to(x.dtype), x, self.axis, "the bias")]


@register("LRN")
class LRN(Layer):
    """Local response normalisation of a 4-D (N, C, H, W) bottom: ``y = x * scale ^ -beta``.

    ACROSS_CHANNELS: ``scale = k + alpha / local_size * sum(x^2 over local_size channels centred on c)``,
    zero-padded at the first/last channels.

    WITHIN_CHANNEL: Caffe composes it from sub-layers: AVE pooling of ``x^2`` (kernel ``local_size``,
    stride 1, pad ``(local_size - 1) / 2``) and a Power layer ``(1 + alpha * pooled) ^ -beta``. So ``k`` is
    ignored (the shift is 1), and the pooling divisor is ``local_size^2`` for every window, borders
    included: Caffe's AVE pooling counts the window's extent clipped to the *padded* input, which with
    stride 1 and this pad is never clipped (``count_include_pad``). Gradients are autograd's, which equal
    Caffe's analytic ones.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            raise self.error(f"local_size is {self.size}; LRN only supports odd values.")
        self.pad = (self.size - 1) // 2
        self.alpha = _f32(p.alpha)
        self.beta = _f32(p.beta)
        self.k = _f32(p.k)
        self.within = p.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if x.dim() != 4:
            raise self.error(
                f"needs a 4-D bottom (num, channels, height, width), got shape {tuple(x.shape)}."
            )
        sq = x * x
        if self.within:
            pooled = F.avg_pool2d(sq, self.size, stride=1, padding=self.pad, count_include_pad=True)
            if self.alpha * self.beta == 0.0:  # Caffe's Power layer constant case: 1 ^ -beta
                return [x.clone()]
            base = pooled * self.alpha if self.alpha != 1.0 else pooled
            return [x * torch.pow(base + 1.0, -self.beta)]
        n, c, h, w = x.shape
        # mean over a window of channels (zero-padded): pool a (c, h*w) plane along its first axis
        planes = sq.reshape(n, 1, c, h * w)
        window_mean = F.avg_pool2d(planes, (self.size, 1), stride=1, padding=(self.pad, 0))
        window_mean = window_mean.reshape(n, c, h, w)
        scale = window_mean * self.alpha + self.k
        return [x * torch.pow(scale, -self.beta)]


class _MVNNormalize(torch.autograd.Function):
    """Rows of ``xc`` (already mean-free) divided by ``sqrt(E[xc^2]) + eps``, with Caffe's backward.

    Caffe's gradient ``(dy - mean(dy) - y * mean(dy * y)) / (sqrt(var) + eps)`` treats the eps as if it
    sat inside the square root; autograd of the forward would differ by a factor ``(sigma + eps) / sigma``
    on the last term and give NaN for constant rows, where Caffe's stays finite.
    """

    @staticmethod
    def forward(ctx: Any, xc: Tensor, eps: float) -> Tensor:
        var = (xc * xc).mean(dim=1, keepdim=True)
        std = torch.sqrt(var) + eps
        y = xc / std
        ctx.save_for_backward(y, std)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None]:
        y, std = ctx.saved_tensors
        dx = dy - dy.mean(dim=1, keepdim=True) - y * (dy * y).mean(dim=1, keepdim=True)
        return dx / std, None


@register("MVN")
class MVN(Layer):
    """Mean (and variance) normalisation per (n, c) slice, or per n with ``across_channels``.

    ``y = (x - E[x]) / (sqrt(E[(x - E[x])^2]) + eps)``: BVLC computes the variance from the centred values
    (older Caffe used ``E[x^2] - E[x]^2``; the reference Caffe and BVLC master do not) and adds eps to
    the standard deviation, not the variance. Caffe reads the bottom through the legacy 4-D accessors, so
    the bottom may have at most 4 axes and the top is 4-D ``(num, channels, height, width)`` (missing axes
    are 1): a (N, C) bottom gives a (N, C, 1, 1) top.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = _f32(p.eps)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if not 1 <= x.dim() <= 4:
            raise self.error(
                f"reads its bottom as legacy 4-D (num, channels, height, width) data; shape "
                f"{tuple(x.shape)} has {x.dim()} axes. Reshape it to at most 4 axes."
            )
        legacy = tuple(x.shape) + (1,) * (4 - x.dim())
        rows = legacy[0] if self.across_channels else legacy[0] * legacy[1]
        if x.numel() == 0:
            return [x.reshape(legacy)]
        flat = x.reshape(rows, -1)
        centered = flat - flat.mean(dim=1, keepdim=True)
        y = _MVNNormalize.apply(centered, self.eps) if self.normalize_variance else centered
        return [y.reshape(legacy)]
