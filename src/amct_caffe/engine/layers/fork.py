"""Layers of the Caffe forks that public models use, each with the semantics of its canonical source.

Every class names the fork source file it follows; docs/fork-layers.md lists them with their origin, their
parameters (``proto/caffe.proto``: Huawei's ATC message where ATC defines one) and what we decided where
the forks disagree. The forward passes are differentiable torch ops, so autograd gives the backward the
C++ sources implement (checked against numpy references written from those sources in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from amct_caffe.engine.layers.base import TEST, Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.engine.layers.vision import Convolution
from amct_caffe.errors import UnsupportedLayerError
from amct_caffe.proto import caffe_pb2


def _four_axes(layer: Layer, x: Tensor, what: str = "bottom") -> None:
    if x.dim() != 4:
        raise layer.error(f"{what} must have 4 axes (N, C, H, W); it has shape {tuple(x.shape)}.")


# ---------------------------------------------------------------------------------------------------
# Depthwise convolution
# ---------------------------------------------------------------------------------------------------
@register("ConvolutionDepthwise")
class ConvolutionDepthwise(Convolution):
    """The depthwise convolution of the MobileNet ports; follows farmingyard/caffe-mobilenet's
    ``conv_dw_layer.cpp``.

    ``convolution_param`` gives kernel, stride, pad, dilation and ``bias_term``; ``num_output`` and
    ``group`` are ignored: both are the bottom's channel count C, so the weight is ``[C, 1, kh, kw]``, the
    bias ``[C]`` and the top has C channels -- exactly a ``Convolution`` with ``group: C``, which is what
    the quantization flows rewrite it to (docs/fork-layers.md).
    """

    origin = "MobileNet ports"
    depthwise = True


@register("DepthwiseConvolution")
class DepthwiseConvolution(Convolution):
    """A faster grouped convolution of the MobileNet ports; follows yonghenglh6/DepthwiseConvolution's
    ``depthwise_conv_layer.cpp``, which computes what ``Convolution`` computes with the same
    ``convolution_param`` (``group`` is normally the channel count)."""

    origin = "MobileNet ports"


# ---------------------------------------------------------------------------------------------------
# ShuffleChannel, Axpy, Reorg
# ---------------------------------------------------------------------------------------------------
@register("ShuffleChannel")
class ShuffleChannel(Layer):
    """ShuffleNet's channel shuffle; follows farmingyard/ShuffleNet's ``shuffle_channel_layer.cpp``.

    The C channels, read as a ``group x C/group`` matrix, are written transposed: top channel
    ``j * group + i`` is bottom channel ``i * C/group + j``. The shape is unchanged; C must be a multiple of
    ``shuffle_channel_param.group`` (default 1, the identity).
    """

    origin = "ShuffleNet"
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.group = int(param.shuffle_channel_param.group)
        if self.group <= 0:
            raise self.error(f"shuffle_channel_param.group must be positive (got {self.group}).")

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if x.dim() < 2 or x.shape[1] % self.group != 0:
            raise self.error(
                f"the bottom's channels (shape {tuple(x.shape)}) must be a multiple of group {self.group}."
            )
        n, c = int(x.shape[0]), int(x.shape[1])
        rest = tuple(x.shape[2:])
        shuffled = x.reshape(n, self.group, c // self.group, *rest).transpose(1, 2)
        return [shuffled.reshape(x.shape)]


@register("Axpy")
class Axpy(Layer):
    """SENet's fused scale-and-add; follows hujie-frank/SENet's ``axpy_layer.cpp``.

    Bottoms ``a`` (N, C, 1, 1), ``x`` and ``y`` (both N, C, H, W): ``top = a * x + y`` with ``a``
    broadcast over H and W.
    """

    origin = "SENet"
    exact_bottoms = 3
    exact_tops = 1

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        a, x, y = bottoms
        if x.shape != y.shape:
            raise self.error(f"bottoms 1 and 2 must have the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}.")
        if x.dim() < 2 or a.dim() != x.dim() or tuple(a.shape[:2]) != tuple(x.shape[:2]) or \
                any(int(d) != 1 for d in a.shape[2:]):
            raise self.error(
                f"bottom 0 must be (N, C, 1, 1) for bottoms of shape {tuple(x.shape)}; it is "
                f"{tuple(a.shape)}."
            )
        return [a * x + y]


@register("Reorg")
class Reorg(Layer):
    """YOLOv2's reorg (ATC's PassThrough); follows gklz1982/caffe-yolov2's ``reorg_layer.cpp``, which keeps
    darknet's index rule rather than a plain space-to-depth.

    With stride s and a bottom (N, C, H, W), the top is (N, C*s*s, H/s, W/s). Darknet reads the bottom's
    buffer as if it were (C/(s*s), H*s, W*s): top channel ``(dy*s + dx) * C/(s*s) + c`` at (h, w) is that
    view's element ``(c, h*s + dy, w*s + dx)``. ``reverse: true`` is the inverse map (top
    (N, C/(s*s), H*s, W*s)). C must be a multiple of s*s and, without ``reverse``, H and W of s.
    """

    origin = "YOLOv2 ports"
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        if param.bottom and param.top and param.bottom[0] == param.top[0]:
            raise self.error("cannot run in place (its top must be a new blob).")
        p = param.reorg_param
        self.stride = int(p.stride)
        self.reverse = bool(p.reverse)
        if self.stride <= 0:
            raise self.error(f"reorg_param.stride must be positive (got {self.stride}).")

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        _four_axes(self, x)
        n, c, h, w = (int(d) for d in x.shape)
        s = self.stride
        if c % (s * s) != 0 or (not self.reverse and (h % s or w % s)):
            raise self.error(
                f"a bottom of shape {tuple(x.shape)} does not reorganise with stride {s}: the channels must "
                f"be a multiple of {s * s}" + ("" if self.reverse else f" and H, W multiples of {s}") + "."
            )
        small_c = c // (s * s)
        if self.reverse:
            # top buffer as (small_c, H*s, W*s) from the bottom's (s, s, small_c, H, W) blocks
            blocks = x.reshape(n, s, s, small_c, h, w).permute(0, 3, 4, 1, 5, 2)
            return [blocks.reshape(n, small_c, h * s, w * s)]
        # bottom buffer as (small_c, H*s, W*s) -- darknet's view -- gathered into (s, s, small_c, H, W)
        view = x.reshape(n, small_c, h, s, w, s).permute(0, 3, 5, 1, 2, 4)
        return [view.reshape(n, c * s * s, h // s, w // s)]


# ---------------------------------------------------------------------------------------------------
# Interp
# ---------------------------------------------------------------------------------------------------
@register("Interp")
class Interp(Layer):
    """Bilinear resize of PSPNet and DeepLab; follows hszhao/PSPNet's ``interp_layer.cpp`` and
    ``util/interp.cpp``.

    ``pad_beg``/``pad_end`` (<= 0) crop the bottom: the effective input is ``eff = in + pad_beg + pad_end``
    rows/columns starting at ``-pad_beg``. The output size comes from the first rule that applies:
    ``shrink_factor`` alone: ``(eff - 1) / shrink + 1``; ``zoom_factor`` alone: ``eff + (eff - 1) *
    (zoom - 1)``; ``height`` and ``width``; both factors: shrink, then zoom. The values are align-corners
    bilinear (source row ``h * (eff - 1) / (out - 1)``); an output of the effective size is a copy.
    """

    origin = "PSPNet/DeepLab"
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.interp_param
        self.pad_beg, self.pad_end = int(p.pad_beg), int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise UnsupportedLayerError(
                f"Layer '{self.name}' (type Interp): pad_beg {self.pad_beg} / pad_end {self.pad_end}: only "
                "values <= 0 (cropping) are supported, as in PSPNet."
            )
        has_shrink, has_zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
        if not (has_shrink or has_zoom or (p.HasField("height") and p.HasField("width"))):
            raise self.error("needs shrink_factor, zoom_factor, both, or height and width in interp_param.")
        if has_shrink and p.shrink_factor < 1:
            raise self.error(f"shrink_factor must be >= 1 (got {p.shrink_factor}).")
        if has_zoom and p.zoom_factor < 1:
            raise self.error(f"zoom_factor must be >= 1 (got {p.zoom_factor}).")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The top's (height, width) for a bottom of ``height x width``."""
        p = self.param.interp_param
        eff = (height + self.pad_beg + self.pad_end, width + self.pad_beg + self.pad_end)
        if min(eff) <= 0:
            raise self.error(f"cropping {-self.pad_beg}/{-self.pad_end} leaves nothing of a {height}x{width} "
                             "bottom.")
        has_shrink, has_zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
        if has_shrink or has_zoom:
            out_h, out_w = eff
            if has_shrink:
                out_h, out_w = (out_h - 1) // p.shrink_factor + 1, (out_w - 1) // p.shrink_factor + 1
            if has_zoom:
                zoom = int(p.zoom_factor)
                out_h, out_w = out_h + (out_h - 1) * (zoom - 1), out_w + (out_w - 1) * (zoom - 1)
        else:
            out_h, out_w = int(p.height), int(p.width)
        if min(out_h, out_w) <= 0:
            raise self.error(f"the output size {out_h}x{out_w} must be positive.")
        return out_h, out_w

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        _four_axes(self, x)
        height, width = int(x.shape[2]), int(x.shape[3])
        out = self.output_size(height, width)
        start = -self.pad_beg
        cropped = x[:, :, start:height + self.pad_end, start:width + self.pad_end]
        if tuple(cropped.shape[2:]) == out:
            return [cropped.clone()]
        return [F.interpolate(cropped, size=out, mode="bilinear", align_corners=True)]


# ---------------------------------------------------------------------------------------------------
# Upsample
# ---------------------------------------------------------------------------------------------------
@register("Upsample")
class Upsample(Layer):
    """Upsample in its two public meanings, chosen by the bottoms and parameters given.

    * Two bottoms (x and a MAX Pooling's argmax mask): SegNet/ENet max-unpooling; follows
      alexgkendall/caffe-segnet's ``upsample_layer.cpp`` (the same in TimoSaemann/caffe-enet). The top is
      zero except ``top[mask[i]] = x[i]`` per plane; its size is ``upsample_h x upsample_w`` when both are
      given, else ``in * scale - pad_out`` (``scale_h``/``scale_w`` or ``scale``, default 2 there).
    * One bottom: nearest-neighbour upsampling; follows ChenYingpeng/darknet2caffe's
      ``caffe_layers/upsample_layer``: ``top[h, w] = x[h / s, w / s]`` with s = ``scale`` (an integer).
      When ``stride``/``stride_h``/``stride_w`` is given the parameters are read as ATC's instead: the
      size factor is the stride and ``scale`` multiplies the values.
    """

    origin = "darknet ports, SegNet/ENet"
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.upsample_param
        self.unpool = len(param.bottom) == 2
        #: Nearest-neighbour factors (h, w) and the value factor (one bottom).
        self.factors = (1, 1)
        self.value_scale = 1.0
        #: Max-unpooling: a fixed output size, or the factors and the pad_out subtracted.
        self.fixed_size: tuple[int, int] | None = None
        self.pad_out = (0, 0)
        if self.unpool:
            self._setup_unpool(p)
        else:
            self._setup_nearest(p)

    def _setup_unpool(self, p: caffe_pb2.UpsampleParameter) -> None:
        if p.HasField("upsample_h") and p.HasField("upsample_w"):
            self.fixed_size = (int(p.upsample_h), int(p.upsample_w))
            if min(self.fixed_size) <= 1:
                raise self.error("upsample_h and upsample_w must be greater than 1.")
            return
        if p.HasField("scale_h") != p.HasField("scale_w") or (p.HasField("scale_h") and p.HasField("scale")):
            raise self.error("give upsample_h and upsample_w, or scale, or scale_h and scale_w.")
        if p.HasField("scale_h"):
            factors = (int(p.scale_h), int(p.scale_w))
        else:
            scale = p.scale if p.HasField("scale") else 2.0  # SegNet's default
            if scale != int(scale):
                raise self.error(f"scale must be an integer for max-unpooling (got {scale}).")
            factors = (int(scale), int(scale))
        if min(factors) <= 1:
            raise self.error(
                f"the upsampling factors must be greater than 1 (got {factors[0]}x{factors[1]})."
            )
        pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        for axis, name in ((0, "h"), (1, "w")):
            if pad_out[axis] and factors[axis] != 2:
                raise self.error(f"pad_out_{name} needs a factor of 2 along {name}, got {factors[axis]}.")
        self.factors, self.pad_out = factors, pad_out

    def _setup_nearest(self, p: caffe_pb2.UpsampleParameter) -> None:
        if any(p.HasField(f) for f in ("upsample_h", "upsample_w", "scale_h", "scale_w", "pad_out_h",
                                       "pad_out_w")):
            raise self.error(
                "upsample_h/upsample_w/scale_h/scale_w/pad_out are SegNet max-unpooling parameters and need "
                "a second bottom (the pooling mask)."
            )
        if p.HasField("stride") or p.HasField("stride_h") or p.HasField("stride_w"):
            stride = int(p.stride) if p.HasField("stride") else 2
            factors = (int(p.stride_h) if p.HasField("stride_h") else stride,
                       int(p.stride_w) if p.HasField("stride_w") else stride)
            self.value_scale = float(p.scale)
        else:
            if p.scale != int(p.scale):
                raise self.error(f"scale must be a whole number for nearest upsampling (got {p.scale}).")
            factors = (int(p.scale), int(p.scale))
        if min(factors) < 1:
            raise self.error(f"the upsampling factors must be at least 1 (got {factors[0]}x{factors[1]}).")
        self.factors = factors

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        _four_axes(self, x)
        if self.unpool:
            return [self._unpool(x, bottoms[1])]
        fh, fw = self.factors
        y = x.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)
        return [y * self.value_scale if self.value_scale != 1.0 else y]

    def _unpool(self, x: Tensor, mask: Tensor) -> Tensor:
        if mask.shape != x.shape:
            raise self.error(
                f"the mask (bottom 1, shape {tuple(mask.shape)}) must have the shape of bottom 0 "
                f"{tuple(x.shape)}."
            )
        n, c, h, w = (int(d) for d in x.shape)
        if self.fixed_size is not None:
            out_h, out_w = self.fixed_size
        else:
            out_h, out_w = h * self.factors[0] - self.pad_out[0], w * self.factors[1] - self.pad_out[1]
        index = mask.detach().reshape(n * c, h * w).to(torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= out_h * out_w):
            raise self.error(
                f"a mask index is outside the {out_h}x{out_w} top; the scale settings must match the "
                "pooling layer that wrote the mask."
            )
        index = index.clamp(0, max(out_h * out_w - 1, 0))
        # SegNet writes in input order, so the last input mapped to a position wins: find it per position
        order = torch.arange(h * w, device=x.device).expand(n * c, h * w)
        winner = torch.full((n * c, out_h * out_w), -1, dtype=torch.int64, device=x.device)
        winner.scatter_reduce_(1, index, order, reduce="amax")
        values = x.reshape(n * c, h * w).gather(1, winner.clamp(min=0))
        top = torch.where(winner >= 0, values, torch.zeros_like(values))
        return top.reshape(n, c, out_h, out_w)


# ---------------------------------------------------------------------------------------------------
# BN
# ---------------------------------------------------------------------------------------------------
_PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")
_SEGNET_FIELDS = ("scale_filler", "shift_filler", "bn_mode")


@register("BN")
class BN(Layer):
    """Batch normalisation with its own affine part, in its two public forms (docs/fork-layers.md says how
    the form is chosen).

    * SegNet/ENet: follows alexgkendall/caffe-segnet's ``bn_layer.cpp``. Blobs scale, shift (1, C, 1, 1).
      ``bn_mode: INFERENCE``: ``y = scale * x + shift``; ``LEARN``: the batch's statistics (over N, H, W;
      ``var = E[x^2] - E[x]^2``) normalise, ``y = scale * (x - mean) / sqrt(var + 1e-9) + shift``.
    * PSPNet: follows hszhao/PSPNet's ``bn_layer.cpp``. Blobs slope, bias, mean, variance (1, C, 1, 1);
      ``y = slope * (x - mean) / sqrt(var + eps) + bias``. TEST or ``frozen``: the stored statistics;
      TRAIN: the batch's (biased variance), and the stored ones move towards them
      (``stored = momentum * stored + (1 - momentum) * batch``). The statistics never train
      (``lr_mult: 0``); ``frozen`` also fixes slope and bias.
    """

    origin = "SegNet/ENet, PSPNet"
    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.bn_param
        pspnet = any(p.HasField(f) for f in _PSPNET_FIELDS)
        segnet = any(p.HasField(f) for f in _SEGNET_FIELDS)
        if pspnet and segnet:
            raise self.error(
                f"bn_param mixes PSPNet's fields ({', '.join(_PSPNET_FIELDS)}) with SegNet's "
                f"({', '.join(_SEGNET_FIELDS)}); give the fields of one form."
            )
        #: PSPNet's four-blob form (else SegNet's two blobs).
        self.pspnet = pspnet or (not segnet and len(param.param) > 2)
        #: The bottom's channel count, set by :meth:`setup`.
        self.channels: int | None = None
        #: PSPNet's parameters (unused in SegNet's form).
        self.momentum, self.eps, self.frozen = float(p.momentum), float(p.eps), bool(p.frozen)
        #: SegNet's ``bn_mode: INFERENCE`` (unused in PSPNet's form).
        self.inference = p.bn_mode == caffe_pb2.BNParameter.INFERENCE
        if self.pspnet:
            self._fix_learning_rates(param)

    def _fix_learning_rates(self, param: caffe_pb2.LayerParameter) -> None:
        """As PSPNet's LayerSetUp: the statistics (and, when frozen, slope and bias) get lr_mult 0."""
        while len(param.param) < 4:
            param.param.add()
        fixed = (0, 1, 2, 3) if self.frozen else (2, 3)
        for i in fixed:
            param.param[i].lr_mult = 0.0
            param.param[i].decay_mult = 0.0

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        x = bottoms[0]
        _four_axes(self, x)
        channels = int(x.shape[1])
        self.channels = channels
        p = self.param.bn_param
        shape = (1, channels, 1, 1)
        if self.pspnet:
            variance_fill = caffe_pb2.FillerParameter(type="constant", value=1.0 if self.frozen else 0.0)
            self.blobs = [self.new_blob(shape, p.slope_filler), self.new_blob(shape, p.bias_filler),
                          self.new_blob(shape), self.new_blob(shape, variance_fill)]
        else:
            self.blobs = [self.new_blob(shape, p.scale_filler), self.new_blob(shape, p.shift_filler)]

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        _four_axes(self, x)
        if x.shape[1] != self.channels:
            raise self.error(f"was set up for {self.channels} channels but its bottom now has shape "
                             f"{tuple(x.shape)}.")
        scale, shift = self.blobs[0], self.blobs[1]
        if self.pspnet:
            return [self._pspnet(x, scale, shift)]
        if self.inference:
            return [scale * x + shift]
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x * x).mean(dim=(0, 2, 3), keepdim=True) - mean * mean
        return [scale * (x - mean) / torch.sqrt(var + 1e-9) + shift]

    def _pspnet(self, x: Tensor, slope: Tensor, bias: Tensor) -> Tensor:
        if self.frozen or self.phase == TEST:
            mean, var = self.blobs[2].detach(), self.blobs[3].detach()
        else:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            centered = x - mean
            var = (centered * centered).mean(dim=(0, 2, 3), keepdim=True)
            if not self.reshaping:  # the net's shape pass updates no statistics
                with torch.no_grad():
                    for stored, batch in ((self.blobs[2], mean), (self.blobs[3], var)):
                        stored.mul_(self.momentum).add_((1.0 - self.momentum) * batch.detach())
        return slope * (x - mean) / torch.sqrt(var + self.eps) + bias

