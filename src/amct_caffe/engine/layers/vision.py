"""Vision layers: Convolution, Deconvolution, InnerProduct and Pooling, with BVLC Caffe's semantics.

Every layer validates its parameters the way Caffe's ``LayerSetUp``/``Reshape`` CHECKs do, but raises a
:class:`~amct_caffe.errors.ModelFormatError` naming the layer instead of aborting. The forward passes use
torch's native ops (``F.conv2d``, ``F.conv_transpose2d``, ``F.linear``, ``F.max_pool2d``,
``F.avg_pool2d``); the gradients autograd derives from them are the ones Caffe's backward computes (max
pooling routes the gradient to the first maximum of each window, as Caffe's argmax mask does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.errors import BlobSizeError, UnsupportedLayerError
from amct_caffe.model.limits import elements_problem
from amct_caffe.proto import caffe_pb2

_FLT_MAX = float(torch.finfo(torch.float32).max)


def _unsupported(layer: Layer, message: str) -> UnsupportedLayerError:
    """An UnsupportedLayerError naming the layer: valid Caffe that this engine does not implement."""
    return UnsupportedLayerError(f"Layer '{layer.name}' (type {layer.type_name}): {message}")



# ---------------------------------------------------------------------------------------------------
# Convolution / Deconvolution
# ---------------------------------------------------------------------------------------------------
def _spatial_pair(
    layer: Layer,
    values: Sequence[int],
    has_hw: bool,
    h: int,
    w: int,
    name: str,
    default: int | None,
) -> tuple[int, int]:
    """Resolve one 2-D geometry parameter of ``ConvolutionParameter`` as Caffe's LayerSetUp does.

    ``name_h``/``name_w`` win when either is set (the other then takes its proto default) and must not be
    combined with the repeated ``name``; the repeated form gives one value for both spatial axes or one
    per axis; absent, ``default`` applies (None: the parameter is required).
    """
    if has_hw:
        if len(values) != 0:
            raise layer.error(f"either {name} or {name}_h/{name}_w should be specified; not both.")
        return int(h), int(w)
    if len(values) == 0:
        if default is None:
            raise layer.error(f"{name} must be specified (once, or once per spatial axis: 2 values).")
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise layer.error(
        f"{name} must be specified once, or once per spatial dimension ({name} specified {len(values)} "
        "times; 2 spatial dims)."
    )


class _ConvolutionBase(Layer):
    """Shared parameter handling of Caffe's ``BaseConvolutionLayer`` (2 spatial axes only).

    Like Caffe, the layer takes one or more bottoms of the same shape and produces one top per bottom,
    all computed with the same weights.
    """

    min_bottoms = 1
    min_tops = 1
    #: Deconvolution swaps the roles of input and output channels in the weight layout.
    reverse_dimensions: bool = False
    #: A depthwise layer (the forks' ConvolutionDepthwise) ignores num_output and group: both become the
    #: bottom's channel count in :meth:`setup`.
    depthwise: bool = False

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        if len(param.top) != len(param.bottom):
            raise self.error(
                f"has {len(param.bottom)} bottom(s) and {len(param.top)} top(s); Caffe computes one top "
                "per bottom, so give the same number of each."
            )
        p = param.convolution_param
        kernel = _spatial_pair(
            self, p.kernel_size, p.HasField("kernel_h") or p.HasField("kernel_w"), p.kernel_h, p.kernel_w,
            "kernel_size", None,
        )
        if min(kernel) <= 0:
            raise self.error(f"filter dimensions must be nonzero (kernel {kernel[0]}x{kernel[1]}).")
        stride = _spatial_pair(
            self, p.stride, p.HasField("stride_h") or p.HasField("stride_w"), p.stride_h, p.stride_w,
            "stride", 1,
        )
        if min(stride) <= 0:
            raise self.error(
                f"stride dimensions must be nonzero (stride {stride[0]}x{stride[1]}); when using "
                "stride_h/stride_w set both."
            )
        pad = _spatial_pair(
            self, p.pad, p.HasField("pad_h") or p.HasField("pad_w"), p.pad_h, p.pad_w, "pad", 0
        )
        dilation = _spatial_pair(self, p.dilation, False, 0, 0, "dilation", 1)
        if min(dilation) <= 0:
            raise self.error(f"dilation must be positive (got {dilation[0]}x{dilation[1]}).")
        self.kernel, self.stride, self.pad, self.dilation = kernel, stride, pad, dilation
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        if not self.depthwise:
            if self.num_output <= 0:
                raise self.error("num_output must be greater than 0.")
            if self.group <= 0:
                raise self.error(f"group must be positive (got {self.group}).")
            if self.num_output % self.group != 0:
                raise self.error(
                    f"num_output {self.num_output} should be a multiple of group {self.group}."
                )
        self.bias_term = bool(p.bias_term)
        #: The bottoms' channel count (axis 1), set by :meth:`setup`.
        self.channels: int | None = None
        #: The bottom shape that last passed :meth:`_check_bottoms` (checked once per shape).
        self._checked_shape: torch.Size | None = None

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        p = self.param.convolution_param
        x = bottoms[0]
        axis = self.canonical_axis(int(p.axis), x.dim(), "axis")
        if axis != 1:
            raise _unsupported(
                self, f"axis {p.axis} puts the channel axis at {axis}; only axis 1 (N, C, H, W) is supported."
            )
        if x.dim() != 4:
            raise _unsupported(
                self,
                f"has a bottom with {x.dim()} axes ({x.dim() - 2} spatial); only 2-D convolution on "
                "(N, C, H, W) bottoms is supported."
            )
        channels = int(x.shape[1])
        if self.depthwise:
            self.num_output = self.group = channels
        if channels % self.group != 0:
            raise self.error(f"the bottom's {channels} channels are not a multiple of group {self.group}.")
        self.channels = channels
        if self.reverse_dimensions:
            out_ch, in_ch = channels, self.num_output
        else:
            out_ch, in_ch = self.num_output, channels
        blobs = [self.new_blob((out_ch, in_ch // self.group, *self.kernel), p.weight_filler)]
        if self.bias_term:
            blobs.append(self.new_blob((self.num_output,), p.bias_filler))
        self.blobs = blobs

    def _check_bottoms(self, bottoms: Sequence[Tensor]) -> None:
        x = bottoms[0]
        if len(bottoms) == 1 and x.shape == self._checked_shape:
            return
        if x.dim() != 4:
            raise self.error(f"bottom num_axes may not change (was 4, now {x.dim()}).")
        if x.shape[1] != self.channels:
            raise self.error(
                f"input size incompatible with convolution kernel: the bottom has {x.shape[1]} channels, "
                f"the layer was set up for {self.channels}."
            )
        for i in range(1, len(bottoms)):
            if bottoms[i].shape != x.shape:
                raise self.error(
                    f"all inputs must have the same shape: bottom {i} is {tuple(bottoms[i].shape)}, "
                    f"bottom 0 is {tuple(x.shape)}."
                )
        for axis in (0, 1):
            if self._output_dim(int(x.shape[2 + axis]), axis) <= 0:
                raise self.error(
                    f"spatial axis {axis} of size {x.shape[2 + axis]} gives no output with kernel "
                    f"{self.kernel[axis]}, stride {self.stride[axis]}, pad {self.pad[axis]}, dilation "
                    f"{self.dilation[axis]}; enlarge the input or change the geometry."
                )
        top = (int(x.shape[0]), self.num_output, *(self._output_dim(int(x.shape[2 + a]), a) for a in (0, 1)))
        problem = elements_problem(top)
        if problem is not None:
            raise BlobSizeError(f"Layer '{self.name}' (type {self.type_name}): its top {problem}")
        self._checked_shape = x.shape

    def _output_dim(self, size: int, axis: int) -> int:
        raise NotImplementedError

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        self._check_bottoms(bottoms)
        weight = self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        return [self._apply(x, weight, bias) for x in bottoms]

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's operation on ``x`` with the given weight and bias in place of its blobs (the
        forward of one bottom; used to evaluate candidate weights, e.g. learned rounding)."""
        return self._apply(x, weight, bias)

    def _apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError


@register("Convolution")
class Convolution(_ConvolutionBase):
    """Caffe's ConvolutionLayer: weight ``[num_output, C/group, kh, kw]``, bias ``[num_output]``.

    Output size per spatial axis: ``(in + 2*pad - (dilation*(k-1)+1)) / stride + 1`` (integer division).
    Caffe's im2col would also accept a kernel larger than the padded input (producing values from the
    implicit zero padding); that is rejected here with an error instead.
    """

    def _output_dim(self, size: int, axis: int) -> int:
        extent = self.dilation[axis] * (self.kernel[axis] - 1) + 1
        numerator = size + 2 * self.pad[axis] - extent
        if numerator < 0:
            return 0
        return numerator // self.stride[axis] + 1

    def _apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.pad, self.dilation, self.group)


@register("Deconvolution")
class Deconvolution(_ConvolutionBase):
    """Caffe's DeconvolutionLayer (the gradient of a convolution with the same weights).

    Weight ``[C_in, num_output/group, kh, kw]``, bias ``[num_output]``. Output size per spatial axis:
    ``stride*(in-1) + dilation*(k-1)+1 - 2*pad``. Caffe's grouped layout (group ``g`` owns input channels
    ``g*C_in/group ..`` and output channels ``g*num_output/group ..``) is exactly torch's
    ``conv_transpose2d`` layout, so the blob is used as is.
    """

    reverse_dimensions = True

    def _output_dim(self, size: int, axis: int) -> int:
        extent = self.dilation[axis] * (self.kernel[axis] - 1) + 1
        return self.stride[axis] * (size - 1) + extent - 2 * self.pad[axis]

    def _apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv_transpose2d(x, weight, bias, self.stride, self.pad, 0, self.group, self.dilation)


# ---------------------------------------------------------------------------------------------------
# InnerProduct
# ---------------------------------------------------------------------------------------------------
@register("InnerProduct")
class InnerProduct(Layer):
    """Caffe's InnerProductLayer: ``top = flatten(bottom, axis) @ W^T + b``.

    The axes from ``axis`` on are flattened into K inputs; the leading axes are kept (top shape
    ``bottom.shape[:axis] + [num_output]``). The weight is ``[num_output, K]``, or ``[K, num_output]``
    with ``transpose: true``; the bias is ``[num_output]``.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.inner_product_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("num_output must be greater than 0.")
        self.transpose = bool(p.transpose)
        self.bias_term = bool(p.bias_term)
        #: (axis, K) for the bottom :meth:`setup` saw; see :attr:`axis` and :attr:`k`.
        self._flattening: tuple[int, int] | None = None

    @property
    def axis(self) -> int:
        """The first flattened axis: ``inner_product_param.axis`` made non-negative for the bottom's rank."""
        return self._set_up_flattening()[0]

    @property
    def k(self) -> int:
        """The number of inputs: the product of the bottom's axes from :attr:`axis` on."""
        return self._set_up_flattening()[1]

    def _set_up_flattening(self) -> tuple[int, int]:
        if self._flattening is None:
            raise self.error("is used before setup(); the net sets every layer up when it is built.")
        return self._flattening

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        p = self.param.inner_product_param
        x = bottoms[0]
        axis = self.canonical_axis(int(p.axis), x.dim(), "axis")
        k = math.prod(int(d) for d in x.shape[axis:])
        self._flattening = (axis, k)
        shape = (k, self.num_output) if self.transpose else (self.num_output, k)
        blobs = [self.new_blob(shape, p.weight_filler)]
        if self.bias_term:
            blobs.append(self.new_blob((self.num_output,), p.bias_filler))
        self.blobs = blobs

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        axis, k = self._set_up_flattening()
        if x.dim() <= axis:
            raise self.error(f"the bottom has {x.dim()} axes but axis is {axis}.")
        flat = x.flatten(axis)
        if flat.shape[-1] != k:
            raise self.error(
                f"input size incompatible with inner product parameters: the bottom has "
                f"{flat.shape[-1]} values from axis {axis} on, the weights expect {k}."
            )
        return [self._linear(flat, self.blobs[0], self.blobs[1] if self.bias_term else None)]

    def _linear(self, flat: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(flat, weight.t() if self.transpose else weight, bias)

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's operation on ``x`` with the given weight (the blob's layout) and bias in place of
        its blobs (used to evaluate candidate weights, e.g. learned rounding)."""
        return self._linear(x.flatten(self._set_up_flattening()[0]), weight, bias)


# ---------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------
_MAX = caffe_pb2.PoolingParameter.MAX
_AVE = caffe_pb2.PoolingParameter.AVE
_STOCHASTIC = caffe_pb2.PoolingParameter.STOCHASTIC
_FLOOR = caffe_pb2.PoolingParameter.FLOOR


@dataclass
class _PoolPlan:
    """How to pool one input size: output size and either torch's native op or explicit padding."""

    kernel: tuple[int, int]
    pooled: tuple[int, int]
    native: bool
    global_: bool = False
    ceil_mode: bool = True
    extra: tuple[int, int] = (0, 0)  # right/bottom padding of the explicit path
    divisor_cpu: Tensor | None = None  # AVE explicit path: Caffe's pool_size per output position
    divisors: dict[torch.device, Tensor] = field(default_factory=dict)

    def divisor(self, device: torch.device) -> Tensor:
        cached = self.divisors.get(device)
        if cached is None:
            assert self.divisor_cpu is not None
            cached = self.divisor_cpu.to(device)
            self.divisors[device] = cached
        return cached


def _torch_pool_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """Output size of torch's pooling (``pooling_output_shape``); clips the last window in ceil mode."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


@register("Pooling")
class Pooling(Layer):
    """Caffe's PoolingLayer (MAX and AVE; STOCHASTIC is rejected).

    Output size (Caffe, not torch): ``pooled = ceil((in + 2*pad - k) / stride) + 1`` (``floor`` with
    ``round_mode: FLOOR``, or with the forks' ``ceil_mode: false`` -- BVLC PR 3057, Huawei's ATC proto;
    giving both with opposite meanings is an error, docs/fork-layers.md); then, only when some pad is
    nonzero, a last window that would start in the right/bottom padding is dropped
    (``(pooled-1)*stride >= in + pad``). Without padding Caffe keeps such a window even when it lies wholly
    outside the image (MAX then yields ``-FLT_MAX``, AVE ``0`` or NaN as Caffe's division by its window size
    gives).

    MAX ignores positions outside the image. With a second top, MAX also writes Caffe's argmax mask: the
    index ``h * W + w`` of each window's first maximum within its input plane (as float; -1 for a window
    that covers no input position), the mask that SegNet's ``Upsample`` reads. AVE divides each window's
    sum over the image by Caffe's ``pool_size``: the window clipped to the padded image
    ``[-pad, in + pad)``, so the left/top padding counts but the ceil-mode overhang past ``in + pad`` does
    not.

    Fast path: torch's ``max_pool2d``/``avg_pool2d`` (``count_include_pad=True``) use the same window and
    divisor rules and the same last-window clipping, so they give Caffe's result whenever their output size
    agrees and ``pad <= k/2`` (a torch limit). Otherwise the input is padded explicitly (``-FLT_MAX`` for
    MAX, 0 for AVE) and pooled without padding, AVE dividing a sum pool by a precomputed divisor map.
    """

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.pooling_param
        if p.pool == _STOCHASTIC:
            raise _unsupported(self, "STOCHASTIC pooling is not supported by amct-caffe; use MAX or AVE.")
        if p.pool not in (_MAX, _AVE):
            raise self.error(f"unknown pooling method {p.pool}.")
        if len(param.top) > 1 and not (p.pool == _MAX and len(param.top) == 2):
            produced = "1 top, or 2 for MAX (the output and its argmax mask)"
            raise self.error(f"has {len(param.top)} tops; {self._method_name()} pooling produces {produced}.")
        #: MAX with a second top: also write the argmax mask.
        self.with_mask = len(param.top) == 2
        self.method = int(p.pool)
        self.global_pooling = bool(p.global_pooling)
        #: (kh, kw); None with global pooling, whose window is the whole input.
        self.kernel = self._kernel()
        self.pad, self.stride = self._pad_stride()
        self.ceil_mode = self._rounds_up()
        self._plans: dict[tuple[int, int], _PoolPlan] = {}

    def _rounds_up(self) -> bool:
        """Whether the output size rounds up: BVLC's ``round_mode`` or the forks' ``ceil_mode``, whichever is
        given (both default to rounding up); both given with opposite meanings is an error."""
        p = self.param.pooling_param
        by_round_mode = p.round_mode != _FLOOR
        if p.HasField("ceil_mode") and p.HasField("round_mode") and p.ceil_mode != by_round_mode:
            mode = caffe_pb2.PoolingParameter.RoundMode.Name(p.round_mode)
            raise self.error(
                f"ceil_mode: {str(p.ceil_mode).lower()} and round_mode: {mode} disagree; give one of them "
                "(ceil_mode: false is round_mode: FLOOR)."
            )
        return p.ceil_mode if p.HasField("ceil_mode") else by_round_mode

    def _method_name(self) -> str:
        return "MAX" if self.param.pooling_param.pool == _MAX else "AVE"

    def _kernel(self) -> tuple[int, int] | None:
        p = self.param.pooling_param
        has_ks, has_kh, has_kw = p.HasField("kernel_size"), p.HasField("kernel_h"), p.HasField("kernel_w")
        if self.global_pooling:
            if has_ks or has_kh or has_kw:
                raise self.error("with global_pooling: true the filter size cannot be specified.")
            return None
        if has_ks and (has_kh or has_kw):
            raise self.error("filter size is kernel_size OR kernel_h and kernel_w; not both.")
        if not has_ks and not (has_kh and has_kw):
            raise self.error(
                "needs kernel_size, or both kernel_h and kernel_w (or global_pooling: true)."
            )
        kernel = (p.kernel_size, p.kernel_size) if has_ks else (p.kernel_h, p.kernel_w)
        if min(kernel) <= 0:
            raise self.error("filter dimensions cannot be zero.")
        return kernel

    def _pad_stride(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(pad, stride), each (h, w), checked against the kernel as Caffe's LayerSetUp does."""
        p = self.param.pooling_param
        has_ph, has_pw = p.HasField("pad_h"), p.HasField("pad_w")
        if not ((not p.HasField("pad") and has_ph and has_pw) or (not has_ph and not has_pw)):
            raise self.error("pad is pad OR pad_h and pad_w are required.")
        has_sh, has_sw = p.HasField("stride_h"), p.HasField("stride_w")
        if not ((not p.HasField("stride") and has_sh and has_sw) or (not has_sh and not has_sw)):
            raise self.error("stride is stride OR stride_h and stride_w are required.")
        pad = (p.pad_h, p.pad_w) if has_ph else (p.pad, p.pad)
        stride = (p.stride_h, p.stride_w) if has_sh else (p.stride, p.stride)
        if self.kernel is None:
            if pad != (0, 0) or stride != (1, 1):
                raise self.error("with global_pooling: true only pad = 0 and stride = 1 are allowed.")
        elif pad != (0, 0):
            for axis, name in ((0, "h"), (1, "w")):
                if pad[axis] >= self.kernel[axis]:
                    raise self.error(
                        f"pad_{name} {pad[axis]} must be smaller than kernel_{name} {self.kernel[axis]}."
                    )
        if min(stride) <= 0:
            raise self.error(f"stride must be positive (got {stride[0]}x{stride[1]}).")
        return pad, stride

    # -- geometry ----------------------------------------------------------------------------------
    def _pooled_dim(self, size: int, k: int, s: int, p: int) -> int:
        numerator = size + 2 * p - k
        return (-(-numerator // s) if self.ceil_mode else numerator // s) + 1

    def _plan(self, height: int, width: int) -> _PoolPlan:
        plan = self._plans.get((height, width))
        if plan is not None:
            return plan
        sizes = (height, width)
        if self.global_pooling:
            plan = _PoolPlan(kernel=sizes, pooled=(1, 1), native=True, global_=True)
            self._plans[sizes] = plan
            return plan
        k, s, p = self.kernel, self.stride, self.pad
        assert k is not None
        pooled = [self._pooled_dim(sizes[a], k[a], s[a], p[a]) for a in (0, 1)]
        if p != (0, 0):
            # Caffe: with padding, the last window must start inside the image or the left padding.
            for a in (0, 1):
                if (pooled[a] - 1) * s[a] >= sizes[a] + p[a]:
                    pooled[a] -= 1
        if min(pooled) <= 0:
            raise self.error(
                f"a {height}x{width} input gives a {pooled[0]}x{pooled[1]} output with kernel "
                f"{k[0]}x{k[1]}, stride {s[0]}x{s[1]}, pad {p[0]}x{p[1]}; enlarge the input or shrink the "
                "kernel."
            )
        native = all(
            p[a] <= k[a] // 2
            and sizes[a] + 2 * p[a] >= k[a]
            and _torch_pool_size(sizes[a], k[a], s[a], p[a], self.ceil_mode) == pooled[a]
            for a in (0, 1)
        )
        plan = _PoolPlan(kernel=k, pooled=(pooled[0], pooled[1]), native=native, ceil_mode=self.ceil_mode)
        if not native:
            plan.extra = tuple(  # type: ignore[assignment]
                max(0, (pooled[a] - 1) * s[a] - p[a] + k[a] - sizes[a]) for a in (0, 1)
            )
            if self.method == _AVE:
                extents = []
                for a in (0, 1):
                    starts = torch.arange(pooled[a], dtype=torch.int64) * s[a] - p[a]
                    ends = torch.clamp(starts + k[a], max=sizes[a] + p[a])
                    extents.append(ends - starts)
                plan.divisor_cpu = (extents[0][:, None] * extents[1][None, :]).to(torch.float32)
        self._plans[sizes] = plan
        return plan

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if x.dim() != 4:
            raise self.error(
                f"input must have 4 axes (num, channels, height, width); the bottom has {x.dim()}."
            )
        plan = self._plan(int(x.shape[2]), int(x.shape[3]))
        if self.with_mask:
            return self._max_with_mask(x, plan)
        if plan.global_:
            if self.method == _AVE:
                return [x.mean(dim=(2, 3), keepdim=True)]
            # max_pool2d (not amax) so that the gradient goes to the first maximum, as Caffe's mask.
            return [F.max_pool2d(x, plan.kernel)]
        if plan.native:
            if self.method == _MAX:
                return [F.max_pool2d(x, plan.kernel, self.stride, self.pad, ceil_mode=plan.ceil_mode)]
            return [F.avg_pool2d(x, plan.kernel, self.stride, self.pad, ceil_mode=plan.ceil_mode,
                                 count_include_pad=True)]
        return [self._explicit(x, plan)]

    def _explicit(self, x: Tensor, plan: _PoolPlan) -> Tensor:
        (ph, pw), (eh, ew) = self.pad, plan.extra
        oh, ow = plan.pooled
        if self.method == _MAX:
            # Caffe initialises each output to -FLT_MAX and skips positions outside the image.
            padded = F.pad(x, (pw, ew, ph, eh), value=-_FLT_MAX)
            return F.max_pool2d(padded, plan.kernel, self.stride)[:, :, :oh, :ow]
        padded = F.pad(x, (pw, ew, ph, eh))
        sums = F.avg_pool2d(padded, plan.kernel, self.stride, divisor_override=1)[:, :, :oh, :ow]
        return sums / plan.divisor(x.device).to(x.dtype)

    def _max_with_mask(self, x: Tensor, plan: _PoolPlan) -> list[Tensor]:
        """MAX pooling and Caffe's argmax mask (torch's indices are per plane and also pick the first
        maximum; the explicit path's indices are mapped back from the padded plane)."""
        if plan.global_:
            top, index = F.max_pool2d(x, plan.kernel, return_indices=True)
            return [top, index.to(x.dtype)]
        if plan.native:
            top, index = F.max_pool2d(x, plan.kernel, self.stride, self.pad, ceil_mode=plan.ceil_mode,
                                      return_indices=True)
            return [top, index.to(x.dtype)]
        (ph, pw), (eh, ew) = self.pad, plan.extra
        oh, ow = plan.pooled
        height, width = int(x.shape[2]), int(x.shape[3])
        padded = F.pad(x, (pw, ew, ph, eh), value=-_FLT_MAX)
        top, index = F.max_pool2d(padded, plan.kernel, self.stride, return_indices=True)
        top, index = top[:, :, :oh, :ow], index[:, :, :oh, :ow]
        padded_width = width + pw + ew
        h, w = index // padded_width - ph, index % padded_width - pw
        inside = (h >= 0) & (h < height) & (w >= 0) & (w < width)
        mask = torch.where(inside, h * width + w, torch.full_like(index, -1))
        return [top, mask.to(x.dtype)]
