"""The quantization formulas every AMCT algorithm shares, one function per formula.

Everything here is a pure function on torch tensors, so the engine can call it on CPU or CUDA (inside
autograd Functions too) and the passes can call it on weights read from a caffemodel. Inputs may also be
numpy arrays or Python numbers; they are converted at the boundary by :func:`as_tensor` (numpy arrays keep
their dtype, Python numbers become float32, the engine's dtype). Results are tensors, except the
``deq_scale`` packing helpers, which work on numpy ``uint64`` arrays because only files use that format.

Rounding (docs/decisions.md row 9, docs/amct-reference.md §8.6): AMCT's C++ library rounds with C ``round()``
-- half away from zero -- everywhere (``Quant`` layer, ARQ, IFMR search, offsets, bias) except in the ULQ
training forward, which uses ``rint()`` -- half to even. :func:`round_away` and :func:`round_even` are the
only two rounding functions of the project.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from amct_caffe.errors import AmctError, ConfigError

Tensor = torch.Tensor
ArrayLike = Tensor | np.ndarray | float | int
Rounding = Callable[[Tensor], Tensor]

INT8_MIN = -128
INT8_MAX = 127
INT16_MIN = -(2**15)
INT16_MAX = 2**15 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
NUM_BITS = 8
#: The unsigned span of an 8-bit code, 2**8 - 1: activation scales are (clip_max - clip_min) / DATA_SPAN.
DATA_SPAN = 2**NUM_BITS - 1
#: C's FLT_EPSILON (2**-23): the smallest scale AMCT accepts, and the smallest accepted 1/scale.
FLT_EPSILON = 2.0**-23


class InvalidScaleError(ConfigError):
    """A quantization scale is inf/NaN, or so large that its reciprocal is below FLT_EPSILON."""


class QuantDataError(AmctError):
    """Data or weights to be quantized are unusable (inf or NaN values, or no values at all)."""


class BiasOverflowError(ConfigError):
    """A quantized bias does not fit INT32.

    ``channels`` lists the offending output channels and ``layer`` the layer name when the caller gave one.
    A caller that did not pass ``layer`` can catch this and re-raise with the layer named; the message
    already tells the user the remedy (skip the layer).
    """

    def __init__(self, message: str, channels: list[int], layer: str | None = None) -> None:
        super().__init__(message)
        self.channels = channels
        self.layer = layer


# -- conversions -------------------------------------------------------------------------------------------
def as_tensor(x: ArrayLike, dtype: torch.dtype | None = None, like: Tensor | None = None) -> Tensor:
    """``x`` as a tensor: tensors pass through, numpy arrays keep their dtype, Python numbers become float32.

    ``dtype`` casts the result; ``like`` moves it to that tensor's device (and dtype, unless ``dtype`` is
    given). No copy is made when nothing changes.
    """
    if isinstance(x, np.generic):
        x = np.array(x)
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        elif not (x.flags.c_contiguous and x.flags.writeable):
            x = x.copy()
        t = torch.from_numpy(x)
    else:
        t = torch.tensor(x, dtype=torch.float32)
    if like is not None:
        t = t.to(device=like.device, dtype=dtype or like.dtype)
    elif dtype is not None:
        t = t.to(dtype)
    return t


def as_float_tensor(x: ArrayLike) -> Tensor:
    """:func:`as_tensor`, with integer and bool inputs converted to float32."""
    t = as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.float32)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def div_exact(a: Tensor, k: float) -> Tensor:
    """``a / k`` for a Python-number divisor, correctly rounded on every device.

    PyTorch's CUDA kernel multiplies by the reciprocal of a CPU-scalar divisor, which can be one ulp off
    the IEEE quotient (e.g. ``x / 255``); dividing by a 0-d tensor on ``a``'s device avoids that, so CPU and
    CUDA give bit-identical factors.
    """
    return a / torch.full((), k, dtype=a.dtype, device=a.device)


def check_finite(x: Tensor, what: str) -> None:
    """Raise :class:`QuantDataError` if ``x`` holds inf or NaN (AMCT refuses such data,
    AMCT reference §1.4)."""
    if not bool(torch.isfinite(x).all()):
        raise non_finite_data_error(what)


def non_finite_data_error(what: str) -> QuantDataError:
    """The error for ``what`` (data or weights) holding inf or NaN values."""
    return QuantDataError(
        f"The {what} to be quantized contains inf or NaN values; check the model's weights and the "
        "input data (a diverged training run produces such values)."
    )


# -- rounding ----------------------------------------------------------------------------------------------
def round_away(x: ArrayLike) -> Tensor:
    """C ``round()``: nearest integer, ties away from zero (``2.5 -> 3``, ``-2.5 -> -3``).

    Exact for every float. Computed as ``r = round_even(x)`` corrected at exact .5 ties, the only values
    where the two roundings differ: ``x - r`` is exact (``r`` is within a factor 2 of ``x``, or 0), so
    ``|x - r| == 0.5`` is an exact tie test, and at a tie ``x + 0.5*sign(x)`` is exact. (``floor(x + 0.5)``
    is not: in float32 ``0.49999997 + 0.5`` rounds up to 1.0, and it rounds negative ties towards +inf.)
    The correction visits only the blocks that hold a tie (:func:`where_ties_`), so the usual cost is three
    elementwise passes. inf and NaN pass through. Integer tensors are returned unchanged.
    """
    x = as_tensor(x)
    if not x.is_floating_point():
        return x
    return _round_away_float(x, consume=False)


def _round_away_float(x: Tensor, consume: bool) -> Tensor:
    """:func:`round_away` of a floating tensor; ``consume`` lets it overwrite ``x`` (a fresh tensor the
    caller no longer needs) with ``x - round_even(x)`` instead of allocating that."""
    if (x.requires_grad and torch.is_grad_enabled()) or torch.jit.is_tracing():
        # out of place, for an autograd graph or a traced export (the sparse tie pass depends on the
        # data, which a trace would freeze): the same values by the plain formula
        t = torch.trunc(x)
        return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)
    r = torch.round(x)
    where_ties_(r, x.sub_(r) if consume else x - r, _away_at_tie)
    return r


def _away_at_tie(r: Tensor, frac: Tensor, *_: Tensor) -> Tensor:
    """round_away at a tie, from ``r = round_even(x)`` and ``frac = x - r`` (so ``r + frac == x``)."""
    x = r + frac
    return torch.sign(x).mul_(0.5).add_(x)


#: Block length of :func:`where_ties_`'s sparse pass.
TIE_BLOCK = 256


def memory_flat(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t``'s elements in memory order, or None when ``t`` is not densely laid out."""
    if t.dim() == 0:
        return t.reshape(1)
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda d: -strides[d])
    p = t.permute(order)
    return p.view(-1) if p.is_contiguous() else None


def memory_flat_views(*tensors: Tensor) -> list[Tensor] | None:
    """Tensors of one shape as 1-D views whose elements correspond (memory order), or None when they are
    not all laid out alike and densely."""
    first = tensors[0]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors[1:]):
        return None
    flat = [memory_flat(t) for t in tensors]
    return None if any(f is None for f in flat) else [f for f in flat if f is not None]


def where_ties_(
    dst: Tensor, frac: Tensor, at_tie: Callable[..., Tensor], *extra: Tensor
) -> None:
    """``dst = where(|frac| == 0.5, at_tie(dst, frac, *extra), dst)`` in place, elementwise.

    ``frac`` is ``x - round_even(x)`` or its negation, so ``|frac| <= 0.5`` and an exact .5 tie is an
    extreme. Exact ties are rare (about one float32 element in 10**5) but a large tensor nearly always
    holds some, so on CPU, for tensors laid out alike and densely, the extremes of each block of
    :data:`TIE_BLOCK` elements are taken (two vectorised reductions) and only blocks reaching +-0.5 (or
    holding NaN) are computed. Elsewhere every element is, so that no host synchronisation is needed.
    ``extra`` tensors (``dst``'s shape) are passed to ``at_tie`` alongside.
    """
    sparse = dst.device.type == "cpu" and not torch.jit.is_tracing()  # a trace must not freeze the blocks
    flat = memory_flat_views(dst, frac, *extra) if sparse else None
    if flat is None:
        dst.copy_(torch.where(frac.abs() == 0.5, at_tie(dst, frac, *extra), dst))
        return
    n = flat[0].numel()
    k = n // TIE_BLOCK
    head = k * TIE_BLOCK

    def fix(parts: list[Tensor]) -> Tensor:
        d, f = parts[0], parts[1]
        return torch.where(f.abs() == 0.5, at_tie(*parts), d)

    if k:
        blocks = [f[:head].view(k, TIE_BLOCK) for f in flat]
        # amax + amin: torch.aminmax along a dimension is an unvectorised loop, several times slower
        hit = ~((blocks[1].amax(dim=1) < 0.5) & (blocks[1].amin(dim=1) > -0.5))
        rows = hit.nonzero().reshape(-1)
        if rows.numel():
            blocks[0][rows] = fix([b[rows] for b in blocks])
    if head < n:
        flat[0][head:] = fix([f[head:] for f in flat])


def round_even(x: ArrayLike) -> Tensor:
    """``rint()`` in the default FP mode: nearest integer, ties to even (``2.5 -> 2``, ``-0.5 -> -0``).

    Only AMCT's ULQ training forward rounds this way (AMCT reference §3.4, §8.6).
    """
    x = as_tensor(x)
    return torch.round(x) if x.is_floating_point() else x


# -- scales and activation factors ------------------------------------------------------------------------
def process_scale(scale: ArrayLike, what: str = "quantization") -> Tensor:
    """AMCT's ``ProcessScale`` (AMCT reference §1.4), elementwise.

    A scale below FLT_EPSILON (zero and negative ones included) is replaced by 1.0, because such a scale
    comes from an all-zero (or nearly so) tensor, where any scale quantizes exactly. inf/NaN, or a scale
    whose reciprocal is below FLT_EPSILON, raises :class:`InvalidScaleError`: quantizing with it would
    overflow or lose every value. ``what`` names the scale in the message.
    """
    s = as_float_tensor(scale)
    if not bool(torch.isfinite(s).all()):
        raise InvalidScaleError(
            f"The {what} scale is inf or NaN; the data it was computed from contains inf/NaN values."
        )
    s = replace_tiny_scales(s)
    if not bool(scales_in_range(s)):
        raise scale_too_large_error(what)
    return s


def replace_tiny_scales(s: Tensor) -> Tensor:
    """:func:`process_scale`'s replacement: scales below FLT_EPSILON become 1.0."""
    return torch.where(s < FLT_EPSILON, torch.ones_like(s), s)


def scales_in_range(s: Tensor) -> Tensor:
    """0-d bool tensor: every reciprocal of ``s`` is at least FLT_EPSILON (:func:`process_scale`'s check)."""
    return (1.0 / s >= FLT_EPSILON).all()


def scale_too_large_error(what: str) -> InvalidScaleError:
    """The error for a ``what`` scale whose reciprocal is below FLT_EPSILON."""
    return InvalidScaleError(
        f"The {what} scale is too large (its reciprocal is below FLT_EPSILON = 2**-23); the data range "
        "is too wide for INT8 quantization. Skip this layer in the quantization config."
    )


def data_scale_offset(clip_min: ArrayLike, clip_max: ArrayLike) -> tuple[Tensor, Tensor]:
    """Asymmetric per-tensor activation factors ``(s_d, o_d)`` from clip bounds (AMCT reference §8.1).

    ``cmin <= 0 <= cmax`` is enforced by clamping (the INT8 grid must contain 0 exactly, and AMCT's kernels
    clamp the same way); ``s_d = (cmax - cmin) / 255``; ``o_d = -round_away(cmin / s_d) - 128``, which lies
    in [-128, 127]. A scale below FLT_EPSILON gives ``s_d = 1, o_d = -128`` (AMCT forces the offset with the
    replaced scale). Computed in the inputs' floating dtype (float32 for Python numbers, like the Caffe
    layer); returns tensors, ``o_d`` as an integer-valued float tensor of the same dtype.
    """
    cmin = as_float_tensor(clip_min)
    cmax = as_float_tensor(clip_max)
    dtype = torch.promote_types(cmin.dtype, cmax.dtype)
    cmin = torch.clamp(cmin.to(dtype), max=0.0)
    cmax = torch.clamp(cmax.to(dtype=dtype, device=cmin.device), min=0.0)
    raw = div_exact(cmax - cmin, DATA_SPAN)
    s = process_scale(raw, "activation")
    o = torch.where(raw < FLT_EPSILON, torch.full_like(s, INT8_MIN), -round_away(cmin / s) + INT8_MIN)
    return s, o


# -- quantize / dequantize ---------------------------------------------------------------------------------
def int8_codes(x: Tensor, scale: ArrayLike, offset: ArrayLike = 0, rounding: Rounding = round_away) -> Tensor:
    """``clamp(rounding(x / scale) + offset, -128, 127)`` as a float tensor of ``x``'s dtype.

    The one INT8 quantize formula: activations (``offset = o_d``) and ARQ weights (``offset = 0``, ``scale``
    broadcast per channel) both use it. ``scale``/``offset`` broadcast against ``x``.
    """
    s = as_tensor(scale, like=x)
    o = as_tensor(offset, like=x)
    q = x / s
    codes = _round_away_float(q, consume=True) if rounding is round_away else rounding(q)
    if torch.broadcast_shapes(codes.shape, o.shape) == codes.shape and not codes.requires_grad:
        codes.add_(o)  # in place on the fresh rounding result: one full-size allocation less
    else:
        codes = codes + o
    return torch.clamp_(codes, INT8_MIN, INT8_MAX)


def dequantize(q: Tensor, scale: ArrayLike, offset: ArrayLike = 0) -> Tensor:
    """``(q - offset) * scale`` in the dtype of ``scale`` (float32 for Python numbers)."""
    s = as_float_tensor(scale)
    s = s.to(q.device)
    return (q.to(s.dtype) - as_tensor(offset, like=s)) * s


def fake_quant_data(
    x: ArrayLike, s_d: ArrayLike, o_d: ArrayLike, rounding: Rounding = round_away
) -> Tensor:
    """Activation fake quantization
    ``(clamp(rounding(x / s_d) + o_d, -128, 127) - o_d) * s_d`` (AMCT reference §8.5).

    ``round_away`` is the ``Quant`` layer's rounding; ULQ's training forward is the same formula with
    ``round_even`` (see :mod:`amct_caffe.quant.ulq`). Result in ``x``'s dtype.
    """
    x = as_float_tensor(x)
    return dequantize(int8_codes(x, s_d, o_d, rounding), as_tensor(s_d, like=x), o_d)


# -- the Quant layer -------------------------------------------------------------------------------------
def quant_step(scale: float) -> float:
    """``s_d`` as AMCT's ``Quant`` layer recovers it from ``quant_param.scale`` (which holds ``1/s_d``).

    The field is float32: the value is rounded to float32 first (a JSON number or a hand-written value may
    carry more digits), then widened exactly to double and inverted in double (AMCT reference §6.2). The
    caller checks that the float32 value is finite and > 0.
    """
    return 1.0 / float(np.float32(scale))


def offset_byte(value: bytes) -> int:
    """``quant_param.offset`` as AMCT's ``Quant`` layer reads it: the first byte as two's-complement int8
    (an empty string reads as 0)."""
    if not value:
        return 0
    b = value[0]
    return b - 256 if b > INT8_MAX else b


def quant_codes(x: Tensor, scale_d: float, offset_d: int, clamp: bool = True) -> Tensor:
    """The ``Quant`` layer's INT8 codes ``clamp(round_away(x / s_d) + o_d, -128, 127)`` (AMCT reference §6.2).

    Computed in double precision from ``x`` (as the patched Caffe's quant layer does), returned as a float64
    tensor of integer values. ``clamp=False`` gives the codes before the clamp, which tell saturation.
    The engine's ``Quant``, the deploy emulation's ``Quant`` (its default formula) and the report's
    saturation counter all call this function; ``amct_caffe.caffe.python_layers`` holds a numpy twin that a
    test keeps equal to it.
    """
    q = round_away(div_exact(x.to(torch.float64), scale_d)) + offset_d
    return torch.clamp(q, INT8_MIN, INT8_MAX) if clamp else q


# -- bias and deq_scale ------------------------------------------------------------------------------------
def deq_scale(s_d: ArrayLike, s_w: ArrayLike) -> Tensor:
    """``deq_scale[c] = s_d * s_w[c]`` as float32 (AMCT reference §8.3), one value per entry of ``s_w``.

    Computed as the exact float64 product of the float32 factors, rounded once to float32 -- the same
    value a float32 multiplication gives. AVE pooling uses ``s_w = 1`` (docs/decisions.md row 10).
    """
    sd = as_tensor(s_d).to(torch.float32).to(torch.float64)
    sw = as_tensor(s_w).to(torch.float32).to(torch.float64).reshape(-1)
    return (sd.to(sw.device) * sw).to(torch.float32)


def quantize_bias(b: ArrayLike, s_d: ArrayLike, s_w: ArrayLike, layer: str | None = None) -> Tensor:
    """Deploy bias ``b_q[c] = round_away(b[c] / (s_d * s_w[c]))`` as an int32 tensor
    (AMCT reference §7.2, §8.3).

    Computed in float64 from the given values (the float32 factors' product is exact there), so the
    division adds a single rounding. ``s_w`` has one entry per channel of ``b`` or a single entry
    (per-tensor weights). Values outside INT32 raise :class:`BiasOverflowError` listing the channels; its
    message names ``layer`` when given (otherwise the caller catches it and adds the name) and tells the
    user to skip the layer, as AMCT does.
    """
    bias = as_tensor(b).to(torch.float64).reshape(-1)
    sd = as_tensor(s_d).to(torch.float64).to(bias.device)
    sw = as_tensor(s_w).to(torch.float64).to(bias.device).reshape(-1)
    if sw.numel() not in (1, bias.numel()):
        raise ValueError(f"quantize_bias: {sw.numel()} weight scales for a bias of {bias.numel()} values")
    q = round_away(bias / (sd * sw))
    bad = ~torch.isfinite(q) | (q < INT32_MIN) | (q > INT32_MAX)
    if bool(bad.any()):
        channels = [int(i) for i in torch.nonzero(bad).reshape(-1).tolist()]
        who = f"layer '{layer}': " if layer else ""
        raise BiasOverflowError(
            f"{who}the quantized bias of channel(s) {channels[:8]}{'...' if len(channels) > 8 else ''} does "
            "not fit INT32 (bias / (scale_d * scale_w) is too large). Put this layer into the skip list "
            "of the quantization config (retrain_enable: false / skip_layers) to keep it in float.",
            channels,
            layer,
        )
    return q.to(torch.int32)


def fake_quant_bias(b: ArrayLike, s_d: ArrayLike, s_w: ArrayLike, layer: str | None = None) -> Tensor:
    """Fake-quant bias ``round_away(b / (s_d * s_w)) * deq_scale`` as float32 (docs/decisions.md row 7).

    The product of the INT32 code and the float32 ``deq_scale`` is rounded once to float32: exactly the
    bias term the deploy model's ``acc * deq_scale`` contributes, so fake-quant and deploy differ only by
    accumulation order. Raises :class:`BiasOverflowError` like :func:`quantize_bias`.
    """
    q = quantize_bias(b, s_d, s_w, layer)
    deq = deq_scale(s_d, s_w).to(q.device)
    return (q.to(torch.float64) * deq.to(torch.float64)).to(torch.float32)


def pack_deq_scale(
    deq: ArrayLike, shift: ArrayLike | None = None, offset_w: ArrayLike | None = None
) -> np.ndarray:
    """Pack ``deq_scale`` values into AscendDequant's uint64 words (AMCT reference §7.3,
    docs/decisions.md row 11).

    Bits 0-31: the IEEE-754 float32 bit pattern of ``deq``; bits 32-39: shift N (uint8); bits 40-47:
    ``offset_w`` (int8, two's complement); bits 48-63: 0. Every current flow has N = 0 and ``offset_w = 0``
    (the defaults), so the word is the zero-extended float32 bits. Returns a numpy uint64 array of
    ``deq``'s shape.
    """
    d = np.ascontiguousarray(_to_numpy(deq), dtype=np.float32)
    word = d.view(np.uint32).astype(np.uint64)
    if shift is not None:
        n = np.broadcast_to(_to_numpy(shift), d.shape).astype(np.int64)
        if ((n < 0) | (n > 255)).any():
            raise ValueError("pack_deq_scale: shift N must be in [0, 255]")
        word |= n.astype(np.uint64) << np.uint64(32)
    if offset_w is not None:
        ow = np.broadcast_to(_to_numpy(offset_w), d.shape).astype(np.int64)
        if ((ow < INT8_MIN) | (ow > INT8_MAX)).any():
            raise ValueError("pack_deq_scale: offset_w must be in [-128, 127]")
        word |= (ow.astype(np.uint64) & np.uint64(0xFF)) << np.uint64(40)
    return word


def unpack_deq_scale(packed: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_deq_scale`: ``(deq float32, shift uint8, offset_w int8)`` numpy arrays."""
    word = np.ascontiguousarray(_to_numpy(packed)).astype(np.uint64)
    deq = (word & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    shift = ((word >> np.uint64(32)) & np.uint64(0xFF)).astype(np.uint8)
    offset_w = ((word >> np.uint64(40)) & np.uint64(0xFF)).astype(np.uint8).view(np.int8)
    return deq, shift, offset_w
