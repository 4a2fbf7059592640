"""Element-wise activation layers: one bottom, one top, same shape (Caffe's ``NeuronLayer`` family).

Every layer here may run in place (top == bottom in the prototxt). The engine still returns a new tensor:
the net keeps the old value under the bottom's name until the top is written, and autograd needs the
input of the op unchanged, so nothing here writes into a bottom.

The formulas, the operation order of scalar constants and the parameter checks follow BVLC Caffe's
``src/caffe/layers/*_layer.cpp``. Where Caffe's hand-written backward equals the autograd gradient of the
forward (all layers here, see the notes per class) autograd is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from amct_caffe.engine import fillers
from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.proto import caffe_pb2


class _Neuron(Layer):
    """Base of the element-wise layers: exactly one bottom and one top."""

    exact_bottoms = 1
    exact_tops = 1

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return [self.apply(bottoms[0])]

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError


@register("ReLU")
class ReLU(_Neuron):
    """``y = max(x, 0) + negative_slope * min(x, 0)``.

    Caffe's gradient is ``(x > 0) + negative_slope * (x <= 0)``, i.e. the slope at exactly 0, which is
    what ``leaky_relu``'s autograd gives too (and plain ``relu``'s 0 for slope 0).
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.negative_slope = float(param.relu_param.negative_slope)

    def apply(self, x: Tensor) -> Tensor:
        if self.negative_slope == 0.0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)


@register("ReLU6")
class ReLU6(_Neuron):
    """``y = min(max(x, 0), 6)``: the MobileNet forks' layer (no parameters in our schema).

    The forks' gradient passes where ``0 < x < 6`` exclusive, as ``hardtanh``'s autograd does.
    """

    def apply(self, x: Tensor) -> Tensor:
        return F.hardtanh(x, 0.0, 6.0)


@register("PReLU")
class PReLU(_Neuron):
    """``y = max(x, 0) + a_c * min(x, 0)`` with a learned slope per channel (axis 1) or one shared slope.

    Blob 0: shape ``[C]``, or ``[]`` (a 0-axis blob holding one value) when ``channel_shared``, exactly as
    Caffe creates it, so caffemodels of real Caffe load. Default filler: constant 0.25. The autograd
    gradients (``x > 0 ? dy : a*dy`` and ``sum(dy * x * (x <= 0))``) are Caffe's.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.channel_shared = bool(param.prelu_param.channel_shared)

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        p = self.param.prelu_param
        x = bottoms[0]
        if x.dim() < 2:
            raise self.error(
                f"needs a bottom with at least 2 axes (N, C, ...), got shape {tuple(x.shape)}; "
                "PReLU's slopes are per channel (axis 1)."
            )
        filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(type="constant", value=0.25)
        shape: tuple[int, ...] = () if self.channel_shared else (int(x.shape[1]),)
        self.blobs = [self.new_blob(shape, filler)]

    def apply(self, x: Tensor) -> Tensor:
        slope = self.blobs[0]
        if x.dim() < 2:
            raise self.error(f"needs a bottom with at least 2 axes, got shape {tuple(x.shape)}.")
        if not self.channel_shared and slope.numel() != x.shape[1]:
            raise self.error(
                f"has {slope.numel()} slopes but its bottom has {x.shape[1]} channels; the slope blob "
                "must have one value per channel (or set channel_shared)."
            )
        return F.prelu(x, slope.reshape(-1).to(x.dtype))


@register("ELU")
class ELU(_Neuron):
    """``y = x > 0 ? x : alpha * (exp(x) - 1)``; Caffe's gradient ``x > 0 ? dy : dy * (y + alpha)`` is
    ``alpha * exp(x)``, the autograd one."""

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.alpha = float(param.elu_param.alpha)

    def apply(self, x: Tensor) -> Tensor:
        return F.elu(x, self.alpha)


@register("Sigmoid")
class Sigmoid(_Neuron):
    """``y = 1 / (1 + exp(-x))``."""

    def apply(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)


@register("TanH")
class TanH(_Neuron):
    """``y = tanh(x)``."""

    def apply(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


@register("AbsVal")
class AbsVal(_Neuron):
    """``y = |x|``; gradient ``sign(x) * dy`` with sign(0) = 0, as ``abs``'s autograd."""

    def apply(self, x: Tensor) -> Tensor:
        return torch.abs(x)


@register("BNLL")
class BNLL(_Neuron):
    """Binomial normal log likelihood ``y = log(1 + exp(x))``.

    Caffe evaluates it stably as ``x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x))`` in double precision
    for the ``log(1 + .)``. ``softplus`` (threshold 20, above which ``log1p(exp(-x))`` is below float32's
    resolution of ``x``) gives the same float32 values; its gradient is the sigmoid, which is Caffe's
    (Caffe clamps the exponent at 50, where the sigmoid is 1 in float32 anyway).
    """

    def apply(self, x: Tensor) -> Tensor:
        return F.softplus(x)


@register("Power")
class Power(_Neuron):
    """``y = (shift + scale * x) ^ power``.

    Caffe's special case: when ``power * scale == 0`` the output ignores the input and is the constant
    ``power == 0 ? 1 : shift ^ power`` (so ``0 ^ 0`` is 1), with a zero gradient. Otherwise it scales,
    shifts and raises in that order, skipping the identity steps.

    Gradient: autograd of ``pow``. Caffe writes ``power != 1, 2`` with ``shift == 0`` as ``diff_scale * y
    / x``, which is NaN at ``x == 0`` where autograd gives the limit; everywhere else they agree.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.power_param
        self.power = float(np.float32(p.power))
        self.scale = float(np.float32(p.scale))
        self.shift = float(np.float32(p.shift))
        self.diff_scale = float(np.float32(p.power) * np.float32(p.scale))

    def apply(self, x: Tensor) -> Tensor:
        if self.diff_scale == 0.0:
            with np.errstate(all="ignore"):  # e.g. a negative shift to a fractional power: NaN, as C's pow
                value = 1.0 if self.power == 0.0 else float(np.float32(self.shift) ** np.float32(self.power))
            return torch.full_like(x, value)
        y = x
        if self.scale != 1.0:
            y = y * self.scale
        if self.shift != 0.0:
            y = y + self.shift
        if self.power != 1.0:
            y = y * y if self.power == 2.0 else torch.pow(y, self.power)
        return y if y is not x else x.clone()


@register("Exp")
class Exp(_Neuron):
    """``y = base ^ (shift + scale * x)``; ``base = -1`` means e.

    Caffe folds the constants once, in float32: ``inner = log(base) * scale`` (exactly ``scale`` for e)
    and ``outer = base ^ shift`` (1 when shift is 0), then computes ``outer * exp(inner * x)``.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.exp_param
        base = np.float32(p.base)
        if base != -1 and not base > 0:
            raise self.error(f"exp_param.base is {p.base}; it must be strictly positive, or -1 for e.")
        with np.errstate(all="ignore"):
            log_base = np.float32(1.0) if base == -1 else np.log(base)
            if not np.isfinite(log_base):
                raise self.error(f"log(exp_param.base) = log({p.base}) is not finite; choose another base.")
            scale, shift = np.float32(p.scale), np.float32(p.shift)
            self.inner = float(np.float32(log_base * scale))
            self.outer = 1.0 if shift == 0 else float(np.exp(shift) if base == -1 else np.power(base, shift))

    def apply(self, x: Tensor) -> Tensor:
        y = torch.exp(x) if self.inner == 1.0 else torch.exp(x * self.inner)
        return y if self.outer == 1.0 else y * self.outer


@register("Log")
class Log(_Neuron):
    """``y = log_base(shift + scale * x)``; ``base = -1`` means e.

    Caffe computes ``log(scale * x + shift) * (1 / log(base))`` with the factor folded in float32 and
    rejects bases whose log or reciprocal log is not finite (base 1, for instance).
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.log_param
        base = np.float32(p.base)
        if base != -1 and not base > 0:
            raise self.error(f"log_param.base is {p.base}; it must be strictly positive, or -1 for e.")
        with np.errstate(all="ignore"):
            log_base = np.float32(1.0) if base == -1 else np.log(base)
            base_scale = np.float32(1.0) / np.float32(log_base)
        if not np.isfinite(log_base) or not np.isfinite(base_scale):
            raise self.error(
                f"log_param.base {p.base} gives 1/log(base) = {base_scale}, which is not finite; "
                "choose a positive base other than 1."
            )
        self.base_scale = float(base_scale)
        self.scale = float(np.float32(p.scale))
        self.shift = float(np.float32(p.shift))

    def apply(self, x: Tensor) -> Tensor:
        y = x
        if self.scale != 1.0:
            y = y * self.scale
        if self.shift != 0.0:
            y = y + self.shift
        y = torch.log(y)
        return y if self.base_scale == 1.0 else y * self.base_scale


@register("Threshold")
class Threshold(_Neuron):
    """``y = x > threshold ? 1 : 0``. Caffe has no backward for it; here it passes no gradient."""

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.threshold = float(np.float32(param.threshold_param.threshold))

    def apply(self, x: Tensor) -> Tensor:
        return (x > self.threshold).to(x.dtype)


@register("Clip")
class Clip(_Neuron):
    """``y = max(min, min(x, max))``; gradient where ``min <= x <= max`` (bounds included), as ``clamp``.

    Caffe does not check ``min <= max``; with ``min > max`` every output is ``min``, as here.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("needs clip_param { min: ... max: ... } (both are required).")
        self.min = float(np.float32(p.min))
        self.max = float(np.float32(p.max))

    def apply(self, x: Tensor) -> Tensor:
        if self.min > self.max:
            return torch.full_like(x, self.min)
        return torch.clamp(x, self.min, self.max)


@register("Swish")
class Swish(_Neuron):
    """``y = x * sigmoid(beta * x)``; Caffe's gradient ``beta*y + sigmoid(beta*x) * (1 - beta*y)`` is the
    autograd one."""

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.beta = float(np.float32(param.swish_param.beta))

    def apply(self, x: Tensor) -> Tensor:
        if self.beta == 1.0:
            return F.silu(x)
        return x * torch.sigmoid(x * self.beta)


@register("Dropout")
class Dropout(_Neuron):
    """Caffe's inverted dropout.

    TRAIN: each value is kept with probability ``1 - dropout_ratio`` and the kept ones are multiplied by
    ``1 / (1 - dropout_ratio)`` (so TEST needs no rescaling); the mask comes from the engine's random
    generator (the one ``caffe.set_random_seed`` seeds) and a new mask is drawn at every forward.
    TEST: identity.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        ratio = float(np.float32(param.dropout_param.dropout_ratio))
        if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
            raise self.error(f"dropout_ratio is {ratio}; it must be in [0, 1).")
        self.ratio = ratio
        self.scale = float(np.float32(1.0 / (1.0 - float(np.float32(ratio)))))

    def apply(self, x: Tensor) -> Tensor:
        if not self.training or self.ratio == 0.0:
            return x.clone()
        if self.reshaping:  # the net's shape pass: draw no random mask
            return torch.zeros_like(x)
        mask = torch.empty(x.shape, dtype=x.dtype).bernoulli_(1.0 - self.ratio, generator=fillers._GENERATOR)
        return x * mask.to(x.device) * self.scale
