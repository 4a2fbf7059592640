"""Integer emulation of the deploy model: what the NPU computes for ``<prefix>_deploy_model.prototxt`` +
``<prefix>_deploy_weights.caffemodel`` (docs/amct-reference.md §7, §8).

How a deploy model runs (the choice)
------------------------------------
The integer layers here are *variants* of the engine's ``Quant``, ``Convolution``, ``Deconvolution``,
``InnerProduct``, ``Pooling`` and ``DeQuant`` layers, registered as :data:`INTEGER` in the engine's layer
registry (same Caffe types, so pycaffe reports the types it always did). The engine never chooses them:
:func:`amct_caffe.emulation.loader.load_net` (and ``caffe.Net``, which uses it) reads the caffemodel,
and when it stores ``int8_data``/``int32_data``/``uint64_data`` blobs it checks every ``Quant -> L ->
DeQuant`` pattern and builds the net with these variants for exactly those layers. Everything else -- the
layers before the first Quant, after each DeQuant -- are the ordinary float layers. There is no separate
net class: the prototxts of the fake-quant and the deploy model are the same, the caffemodel's storage
decides, exactly as it decides the data types for ATC (AMCT reference §7.2). Integer
emulation is inference only.

A quantized layer reads the offset of the Quant that produced its codes: the net hands it its producers
when it is built (:meth:`_IntegerCube.link`), so no layer looks into the net.

Semantics (one formula per layer)
---------------------------------
* ``Quant`` -> INT8 codes, carried as a ``torch.int8`` tensor (the blob's value is the code). Two formulas
  exist for the same layer (:data:`QUANT_FORMULAS`), which differ only next to rounding boundaries:

  - ``"ascend"`` (AscendQuant's formula as AMCT reference §7.1 states it):
    ``q = sat8(round(x*scale + offset))`` with ``scale = quant_param.scale`` (= 1/s_d, float32), evaluated in
    float32: the product ``fl32(x*scale)``, then ``fl32(. + offset)``, then rounding half away from zero (the
    NPU's tie rule is not published; docs/decisions.md row 9 picks half away for every ``Quant``);
  - ``"caffe"`` (default; what the fake-quant ``Quant`` layer computes, AMCT reference §6.2):
    ``q = clamp(round_away(x / s_d) + o_d, -128, 127)`` with ``s_d = 1/(double)scale``, in double.

  The default is the fake-quant layer's formula: the NPU's precision and tie rule for AscendQuant are not
  published (AMCT reference §8.6), so the emulation keeps the activation codes of the fake-quant model and
  isolates what the deploy model certainly changes, the integer accumulation and the INT32 bias. ``"ascend"``
  shows how sensitive a model is to the other reading.

  They differ (i) where the float32 product ``x*scale`` (or the float32 sum with the offset) rounds onto
  or across a ``.5`` boundary that the double quotient ``x/s_d`` does not reach, and (ii) at ties, because
  rounding half away from zero is not shift-invariant: the tie ``x*scale = 0.5`` with ``offset = -14``
  gives ``round_away(-13.5) = -14`` here but ``round_away(0.5) - 14 = -13`` in the fake layer. Inputs on
  a quantization grid (an AVE pooling of codes feeding the next Quant) hit such ties in real models. Set
  ``layer.formula`` on a Quant layer (:func:`set_quant_formula`), or pass ``quant_formula=`` to
  :func:`~amct_caffe.emulation.loader.load_net` /
  :func:`~amct_caffe.analysis.compare.compare_models`. A NaN input is coded as the real zero (``o_d``).
* ``Convolution`` / ``Deconvolution`` / ``InnerProduct``: INT8 codes ``q_x`` (offset ``o_d`` of the Quant
  that produced them), INT8 weights ``q_w`` (``int8_data``), INT32 bias ``b_q`` (``int32_data``), and the
  INT32 accumulator ``acc = sum((q_x - o_d) * q_w) + b_q``: ATC's offset handling (AMCT reference §7.2: the
  conv gets ``offset_x = o_d``; its bias optimisation folds ``-o_d * sum(q_w)`` into the bias, which is the
  same sum). The real zero of the input is the code ``o_d``, so the convolution's zero padding pads ``o_d``:
  the codes are centred (``q_x - o_d``) *before* padding. Deconvolution's padding crops its output, and
  its weight holds output channels on axis 1. The top is a ``torch.int32`` tensor.

  Exactness: the sum is computed by torch's float64 ``conv2d``/``conv_transpose2d``/``linear`` on
  integer-valued tensors. Each product has magnitude at most ``255 * 128 < 2**15`` and a sum of ``K``
  of them (``K = C/group * kh * kw``, or the InnerProduct's input size) at most ``K * 2**15``; every
  partial sum, in whatever order the backend adds, is an integer below ``2**53`` while ``K < 2**38``, and
  integers below ``2**53`` add and multiply exactly in float64 (FMA included). So the float64 result is
  the exact integer sum; :func:`_check_exact_size` refuses larger layers. On CUDA the ops run with cuDNN
  disabled (its FFT/Winograd algorithms are not exact); the fallback is im2col + cuBLAS, exact as above.
  A sum outside INT32 (possible only for ``K > 2**17`` or a huge bias) wraps around as a 32-bit adder
  does, with a warning.
* ``Pooling`` between Quant and DeQuant (AVE; MAX works the same way): on the centred codes
  ``q_x - o_d`` (so the padding is the real zero, as in the float model), Caffe's window and divisor rules
  of the float layer, computed in float64 (the sum is exact) and rounded once to float32: the top is the
  float32 average in units of ``s_d`` (DeQuant's ``deq_scale = s_d`` turns it into the real value).
* ``DeQuant``: one ``uint64_data`` blob, shape ``[C]`` (per channel, axis 1) or ``[1]``; bits 0-31 are the
  float32 ``deq_scale`` (AMCT reference §7.3, :func:`~amct_caffe.quant.numerics.unpack_deq_scale`); shift N
  and ``offset_w`` must be 0 (every QAT flow). ``y = fl32(acc * deq_scale)`` -- the exact product rounded
  once (AscendDequant may output float16 on the device; the emulation keeps float32).

Blob values are therefore codes (Quant tops), accumulators (the quantized layer's top, i.e.
``<L>_dequant_layer_in``) or real values (everything else); :func:`integer_blob_scales` says how to turn
each into real values, which :mod:`amct_caffe.analysis.compare` uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.quant import Quant
from amct_caffe.engine.layers.registry import register
from amct_caffe.engine.layers.vision import Convolution, Deconvolution, InnerProduct, Pooling
from amct_caffe.errors import ConfigError, UnsupportedLayerError, WeightShapeError
from amct_caffe.log import get_logger
from amct_caffe.model.graph import producer_index
from amct_caffe.model.layer_types import DEQUANT, QUANT
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.numerics import (
    INT8_MAX,
    INT8_MIN,
    INT32_MAX,
    INT32_MIN,
    quant_codes,
    round_away,
    unpack_deq_scale,
)

LOGGER = get_logger("emulation.integer")

#: The registry variant of the integer layers.
INTEGER = "integer"

#: The two Quant formulas (see the module docstring); ``"caffe"`` is the default.
QUANT_FORMULAS = ("ascend", "caffe")
DEFAULT_QUANT_FORMULA = "caffe"

#: Largest reduction length for which float64 accumulation of INT8 x INT8 products is exact (module doc).
MAX_EXACT_TERMS = 2**37


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _exact_backend(device: torch.device) -> Iterator[None]:
    """Run float64 convolutions with an exact algorithm: cuDNN off on CUDA (no-op elsewhere)."""
    if device.type == "cuda":
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


def _check_exact_size(layer: Layer, terms: int) -> None:
    if terms >= MAX_EXACT_TERMS:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' (type {layer.type_name}): sums {terms} INT8 products per output, more "
            f"than the {MAX_EXACT_TERMS} the exact float64 integer emulation supports."
        )


def _wrap_int32(layer: Layer, acc: Tensor) -> Tensor:
    """The exact float64 sums as INT32; values outside INT32 wrap around (two's complement) with a warning."""
    acc64 = acc.to(torch.int64)
    if acc64.numel() and bool(((acc64 < INT32_MIN) | (acc64 > INT32_MAX)).any()):
        LOGGER.warning(
            "Layer '%s': the INT32 accumulator overflows (|acc| up to %d); the emulation wraps around as a "
            "32-bit adder. Skip this layer in the quantization config.",
            layer.name, int(acc64.abs().max()),
        )
        acc64 = torch.remainder(acc64 - INT32_MIN, 2**32) + INT32_MIN
    return acc64.to(torch.int32)


def check_quant_formula(formula: object) -> str:
    """``formula`` when it is one of :data:`QUANT_FORMULAS`.

    Raises:
        ConfigError: any other value.
    """
    if not isinstance(formula, str) or formula not in QUANT_FORMULAS:
        raise ConfigError(f"quant_formula must be one of {', '.join(QUANT_FORMULAS)}, got {formula!r}.")
    return formula


def _check_options(layer_type: str, param: caffe_pb2.LayerParameter, options: Mapping[str, object],
             known: set[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"Layer '{param.name}' (integer {layer_type}): unknown option(s) {unknown}; it takes "
            f"{sorted(known) or 'none'}."
        )


def _channel_view(values: Tensor, x: Tensor) -> Tensor:
    """Per-channel (axis 1) factors shaped to broadcast against ``x``; a single factor as a scalar."""
    if values.numel() == 1:
        return values.reshape(())
    return values.reshape([1, -1] + [1] * (x.dim() - 2))


# ---------------------------------------------------------------------------------------------------
# integer layers
# ---------------------------------------------------------------------------------------------------
@register(QUANT, variant=INTEGER)
class IntegerQuant(Layer):
    """``Quant`` on the NPU (AscendQuant): float input -> INT8 codes (``torch.int8``).

    ``formula`` selects ``"ascend"`` or ``"caffe"`` (module docstring; option ``formula`` of the variant).
    Attributes ``scale`` (float32 ``quant_param.scale`` = 1/s_d), ``scale_d`` (``1/(double)scale``, the
    step of a code) and ``offset_d``, read and checked as the float ``Quant`` layer reads them.
    """

    type_name = QUANT
    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True

    @classmethod
    def create(
        cls, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, options: Mapping[str, object]
    ) -> Layer:
        _check_options(QUANT, param, options, {"formula"})
        formula = check_quant_formula(options.get("formula", DEFAULT_QUANT_FORMULA))
        return cls(param, phase, device, formula=formula)

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, *,
                 formula: str = DEFAULT_QUANT_FORMULA) -> None:
        super().__init__(param, phase, device)
        parsed = Quant(param, phase, device)  # the float layer's reading and checks of quant_param
        self.scale = float(np.float32(param.quant_param.scale))
        self.scale_d = float(parsed.scale_d)
        self.offset_d = int(parsed.offset_d)
        self.formula = formula

    def codes(self, x: Tensor) -> Tensor:
        """INT8 codes of ``x`` by :attr:`formula`, as a float tensor of integer values."""
        if self.formula == "ascend":
            x32 = x.to(torch.float32)
            u = x32 * torch.tensor(self.scale, dtype=torch.float32, device=x.device)
            v = u + torch.tensor(float(self.offset_d), dtype=torch.float32, device=x.device)
            q = round_away(v)
        elif self.formula == "caffe":
            q = quant_codes(x, self.scale_d, self.offset_d, clamp=False)
        else:
            raise self.error(
                f"unknown Quant formula {self.formula!r}; use one of {', '.join(QUANT_FORMULAS)}."
            )
        q = torch.nan_to_num(q, nan=float(self.offset_d))
        return torch.clamp(q, INT8_MIN, INT8_MAX)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if not x.is_floating_point():
            raise self.error(
                f"reads a {x.dtype} bottom; a Quant layer quantizes float values (is its bottom another "
                "Quant layer's INT8 output?)."
            )
        return [self.codes(x).to(torch.int8)]


def _linked_quant(layer: Layer, producers: Sequence[Layer]) -> IntegerQuant:
    """The integer Quant that writes ``layer``'s bottom, or an error naming what writes it instead."""
    quant = producers[0]
    if not isinstance(quant, IntegerQuant):
        raise layer.error(
            f"its bottom is written by layer '{quant.name}' (type {quant.type_name}, "
            f"{type(quant).__name__}); the integer {layer.type_name} reads the INT8 codes of an integer "
            "Quant layer."
        )
    return quant


class _IntegerCube(Layer):
    """Shared part of the INT8 Convolution / Deconvolution / InnerProduct: blobs, checks, bias, INT32 top.

    ``blobs = [q_w (torch.int8, the float layer's weight shape), b_q (torch.int32, [num_output])]``
    (the bias only with ``bias_term``); ``quant`` is the IntegerQuant whose codes the layer reads (given
    by :meth:`link`). The float layer of the same parameters (``float_layer``) reads the geometry and
    checks the bottoms; its own float blobs are dropped once their shapes are known.
    """

    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True
    #: output-channel axis of the weight blob (ARQ's per-channel axis)
    weight_axis = 0
    #: the float layer whose geometry this one shares
    float_type: ClassVar[type[Layer]]

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.float_layer = self.float_type(param, phase, device)
        self.quant: IntegerQuant | None = None
        self.bias_term = False

    def link(self, producers: Sequence[Layer]) -> None:
        self.quant = _linked_quant(self, producers)

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        self.float_layer.setup(bottoms)
        self.bias_term = bool(self.float_layer.bias_term)  # type: ignore[attr-defined]
        shapes = self.float_layer.blob_shapes()
        self.float_layer.blobs = []
        self.blobs = [torch.zeros(shapes[0], dtype=torch.int8, device=self.device)]
        if self.bias_term:
            self.blobs.append(torch.zeros(shapes[1], dtype=torch.int32, device=self.device))
        _check_exact_size(self, self._terms())

    def _terms(self) -> int:
        raise NotImplementedError

    def _check_blobs(self) -> tuple[Tensor, Tensor | None]:
        w = self.blobs[0]
        if w.dtype != torch.int8:
            raise self.error(
                f"the integer (deploy) layer needs an INT8 weight blob (int8_data), it holds {w.dtype}; "
                "copy the deploy caffemodel's blobs into a deploy net, not float weights."
            )
        b = self.blobs[1] if self.bias_term else None
        if b is not None and b.dtype != torch.int32:
            raise self.error(
                f"the integer (deploy) layer needs an INT32 bias blob (int32_data), it holds {b.dtype}."
            )
        return w, b

    def _centred(self, x: Tensor) -> Tensor:
        return _centred_codes(self, self.quant, x)

    def _accumulate(self, xc: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        w, b = self._check_blobs()
        x = bottoms[0]
        xc = self._centred(x)
        with _exact_backend(x.device):
            acc = self._accumulate(xc, w.to(device=x.device, dtype=torch.float64))
        if b is not None:
            acc = acc + self._bias_view(b.to(device=x.device, dtype=torch.float64), acc)
        return [_wrap_int32(self, acc)]

    def _bias_view(self, b: Tensor, acc: Tensor) -> Tensor:
        """The bias shaped to broadcast over the output channels (axis 1 for convolutions)."""
        return _channel_view(b, acc)


def _centred_codes(layer: Layer, quant: IntegerQuant | None, x: Tensor) -> Tensor:
    """``q_x - o_d`` in float64: the codes of ``quant`` centred on the real zero."""
    if quant is None:
        raise layer.error("is not linked to the Quant layer whose codes it reads (build it in a Net).")
    if x.dtype != torch.int8:
        raise layer.error(
            f"reads a {x.dtype} bottom; in the deploy model its bottom must be the INT8 output of a "
            "Quant layer."
        )
    return x.to(torch.float64) - float(quant.offset_d)


@register("Convolution", variant=INTEGER)
class IntegerConvolution(_IntegerCube):
    """INT8 Convolution: ``acc = conv2d(q_x - o_d, q_w) + b_q`` exactly (zero padding = the code ``o_d``)."""

    type_name = "Convolution"
    float_type = Convolution

    def _terms(self) -> int:
        w = self.blobs[0]
        return int(w.shape[1] * w.shape[2] * w.shape[3])

    def _accumulate(self, xc: Tensor, w: Tensor) -> Tensor:
        layer: Convolution = self.float_layer  # type: ignore[assignment]
        layer._check_bottoms([xc])
        return F.conv2d(xc, w, None, layer.stride, layer.pad, layer.dilation, layer.group)


@register("Deconvolution", variant=INTEGER)
class IntegerDeconvolution(_IntegerCube):
    """INT8 Deconvolution: ``acc = conv_transpose2d(q_x - o_d, q_w) + b_q`` exactly; weight
    ``[C_in, num_output/group, kh, kw]`` with output channels on axis 1."""

    type_name = "Deconvolution"
    float_type = Deconvolution
    weight_axis = 1

    def _terms(self) -> int:
        # each output sums over its group's input channels and (at most) every kernel tap
        w = self.blobs[0]
        return int(w.shape[0] * w.shape[2] * w.shape[3])

    def _accumulate(self, xc: Tensor, w: Tensor) -> Tensor:
        layer: Deconvolution = self.float_layer  # type: ignore[assignment]
        layer._check_bottoms([xc])
        return F.conv_transpose2d(xc, w, None, layer.stride, layer.pad, 0, layer.group, layer.dilation)


@register("InnerProduct", variant=INTEGER)
class IntegerInnerProduct(_IntegerCube):
    """INT8 InnerProduct: ``acc = flatten(q_x - o_d, axis) @ q_w^T + b_q`` exactly (honours ``transpose``)."""

    type_name = "InnerProduct"
    float_type = InnerProduct

    def _terms(self) -> int:
        return int(self.float_layer.k)  # type: ignore[attr-defined]

    def _accumulate(self, xc: Tensor, w: Tensor) -> Tensor:
        layer: InnerProduct = self.float_layer  # type: ignore[assignment]
        if xc.dim() <= layer.axis:
            raise self.error(f"the bottom has {xc.dim()} axes but axis is {layer.axis}.")
        flat = xc.flatten(layer.axis)
        if flat.shape[-1] != layer.k:
            raise self.error(
                f"input size incompatible with inner product parameters: the bottom has {flat.shape[-1]} "
                f"values from axis {layer.axis} on, the weights expect {layer.k}."
            )
        return F.linear(flat, w.t() if layer.transpose else w)

    def _bias_view(self, b: Tensor, acc: Tensor) -> Tensor:
        return b  # the outputs are the last axis (top shape: bottom.shape[:axis] + [num_output])


@register("Pooling", variant=INTEGER)
class IntegerPooling(Layer):
    """Pooling on INT8 codes: Caffe's pooling of the centred codes ``q_x - o_d`` (padding = real zero),
    in float64, rounded once to float32 (units of ``s_d``). ``quant`` is given by :meth:`link`."""

    type_name = "Pooling"
    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.float_layer = Pooling(param, phase, device)
        self.quant: IntegerQuant | None = None

    def link(self, producers: Sequence[Layer]) -> None:
        self.quant = _linked_quant(self, producers)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        xc = _centred_codes(self, self.quant, bottoms[0])
        return [self.float_layer.forward([xc])[0].to(torch.float32)]


@register(DEQUANT, variant=INTEGER)
class IntegerDeQuant(Layer):
    """``DeQuant`` on the NPU (AscendDequant): ``y = fl32(acc * deq_scale)`` per channel (axis 1) or tensor.

    One blob: the ``uint64_data`` words, held bit for bit in a ``torch.int64`` tensor (torch < 2.3 has no
    uint64; the net saves int64 blobs back as ``uint64_data``); bits 0-31 the float32 ``deq_scale``; shift N
    and ``offset_w`` must be 0. Its shape is the caffemodel's (option ``blob_shape`` of the variant):
    ``[C]`` for the bottom's C channels (axis 1) or ``[1]``; without the option, the float DeQuant's rule
    (``[C]`` when ``dequant_param.channel_wise`` and the bottom is 4-D, else ``[1]``).
    """

    type_name = DEQUANT
    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True

    @classmethod
    def create(
        cls, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, options: Mapping[str, object]
    ) -> Layer:
        _check_options(DEQUANT, param, options, {"blob_shape"})
        shape = options.get("blob_shape")
        if shape is not None and not (isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)):
            raise ConfigError(
                f"Layer '{param.name}' (integer {DEQUANT}): blob_shape must be a tuple of ints, "
                f"got {shape!r}."
            )
        return cls(param, phase, device, blob_shape=shape)

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, *,
                 blob_shape: tuple[int, ...] | None = None) -> None:
        super().__init__(param, phase, device)
        self.blob_shape = blob_shape
        self._cache: tuple[int, int, Tensor] | None = None

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        x = bottoms[0]
        channels = int(x.shape[1]) if x.dim() >= 2 else None
        shape = self.blob_shape
        if shape is None:
            shape = (channels if self.param.dequant_param.channel_wise and x.dim() == 4 and channels else 1,)
        if len(shape) != 1 or (channels is not None and shape[0] not in {1, channels}):
            raise WeightShapeError(
                f"Layer '{self.name}' (type {DEQUANT}): the DeQuant blob has shape {shape}; it must be "
                f"[{channels if channels is not None else 'C'}] (per channel) or [1]."
            )
        self.blobs = [torch.zeros(shape, dtype=torch.int64)]  # decoded on the CPU (deq_scale)

    def deq_scale(self) -> Tensor:
        """The decoded float32 ``deq_scale`` values (1-D, CPU), checked: shift and offset_w all 0."""
        blob = self.blobs[0]
        key = (id(blob), int(blob._version))
        if self._cache is not None and self._cache[:2] == key:
            return self._cache[2]
        if blob.dtype != torch.int64:
            raise self.error(
                f"the integer (deploy) DeQuant needs one uint64_data blob, it holds {blob.dtype}."
            )
        deq, shift, offset_w = unpack_deq_scale(blob.detach().cpu().numpy().reshape(-1).view(np.uint64))
        if shift.any() or offset_w.any():
            raise UnsupportedLayerError(
                f"Layer '{self.name}' (type DeQuant): the packed deq_scale words carry a shift N "
                f"({sorted(set(shift.tolist()))}) or weight offset ({sorted(set(offset_w.tolist()))}); the "
                "integer emulation supports shift 0 and offset_w 0 only (every QAT model)."
            )
        if not np.isfinite(deq).all():
            raise self.error("the packed deq_scale holds inf/NaN values.")
        values = torch.from_numpy(deq.copy())
        self._cache = (key[0], key[1], values)
        return values

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        deq = self.deq_scale()
        if deq.numel() != 1 and (x.dim() < 2 or x.shape[1] != deq.numel()):
            raise self.error(
                f"has {deq.numel()} per-channel deq_scale values but the bottom has shape {tuple(x.shape)}; "
                "the bottom's channel count (axis 1) must match."
            )
        factor = _channel_view(deq.to(device=x.device, dtype=torch.float64), x)
        return [(x.to(torch.float64) * factor).to(torch.float32)]


def set_quant_formula(layers: Iterable[Layer], formula: str) -> None:
    """Set the formula of every integer ``Quant`` layer among ``layers`` (``"ascend"`` or ``"caffe"``).

    Raises:
        ConfigError: an unknown formula.
    """
    check_quant_formula(formula)
    for layer in layers:
        if isinstance(layer, IntegerQuant):
            layer.formula = formula


# ---------------------------------------------------------------------------------------------------
# what the blobs mean
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlobScale:
    """How an integer net's blob maps to real values: ``real = (value - offset) * scale`` (``scale`` per
    channel on axis 1 when it has several entries). ``kind`` is ``"codes"`` (a Quant top),
    ``"accumulator"`` (a quantized layer's top before its DeQuant) or ``"real"``; ``layer`` the layer that
    writes the blob."""

    kind: str
    layer: str
    scale: np.ndarray
    offset: float = 0.0

    def to_real(self, value: Tensor) -> Tensor:
        """``(value - offset) * scale`` in float64."""
        v = value.detach().to(torch.float64)
        s = torch.from_numpy(np.asarray(self.scale, dtype=np.float64)).to(v.device)
        return (v - self.offset) * _channel_view(s, v)


def integer_blob_scales(layers: Sequence[Layer]) -> dict[str, BlobScale]:
    """For every Quant top and every quantized layer's top of a net's ``layers`` (in order): how to read it
    as real values.

    Codes: ``(q - o_d) * s_d``; accumulators (and pooled centred codes): ``acc * deq_scale``.
    """
    out: dict[str, BlobScale] = {}
    params = [layer.param for layer in layers]
    for i, layer in enumerate(layers):
        if isinstance(layer, IntegerQuant):
            out[layer.param.top[0]] = BlobScale("codes", layer.name, np.array([layer.scale_d]),
                                                float(layer.offset_d))
        elif isinstance(layer, IntegerDeQuant):
            li = producer_index(params, i, layer.param.bottom[0])
            if li is None:
                continue
            deq = layer.deq_scale().numpy().astype(np.float64)
            out[layer.param.bottom[0]] = BlobScale("accumulator", layers[li].name, deq)
    return out
