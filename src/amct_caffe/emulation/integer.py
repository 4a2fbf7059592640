"""Integer emulation of the deploy model: what the NPU computes for ``<prefix>_deploy_model.prototxt`` +
``<prefix>_deploy_weights.caffemodel`` (spec §7, §8).

How a deploy model runs (the choice)
------------------------------------
``caffe.Net(deploy_prototxt, deploy_caffemodel, caffe.TEST)`` (and the engine's ``Net(..., weights=...)``,
``net.copy_from(...)``) just work: before copying blobs, :meth:`Net.copy_from` calls
:func:`prepare_integer_layers`, which looks at the caffemodel's storage fields. A caffemodel without
``int8_data``/``int32_data``/``uint64_data`` blobs changes nothing (float and fake-quant models run as
before). A deploy caffemodel makes it replace, for each pattern ``Quant -> L -> DeQuant`` whose DeQuant blob
is ``uint64_data`` (L = Convolution/Deconvolution/InnerProduct with an ``int8_data`` weight, or Pooling),
the three float layers by integer ones (same names, parameters and positions; the layers' Caffe types
stay what pycaffe reports). Everything else -- the layers before the first Quant, after each DeQuant -- are
the ordinary float layers. There is no separate net class: the prototxts of the fake-quant and the deploy
model are the same, the caffemodel's storage decides, exactly as it decides the data types for ATC (spec
§7.2). :func:`load_deploy_net` is the explicit entry point that also checks the model *is* a deploy model.
Integer emulation is inference only: a TRAIN-phase net refuses a deploy caffemodel with a clear error.

Semantics (one formula per layer)
---------------------------------
* ``Quant`` -> INT8 codes, carried as a ``torch.int8`` tensor (the blob's value is the code). Two formulas
  exist for the same layer (:data:`QUANT_FORMULAS`), which differ only next to rounding boundaries:

  - ``"ascend"`` (AscendQuant's formula as spec §7.1 states it): ``q = sat8(round(x*scale + offset))``
    with ``scale = quant_param.scale`` (= 1/s_d, float32), evaluated in float32: the product
    ``fl32(x*scale)``, then ``fl32(. + offset)``, then rounding half away from zero (the NPU's tie rule
    is not published; DECISIONS row 9 picks half away for every ``Quant``);
  - ``"caffe"`` (default; what the fake-quant ``Quant`` layer computes, spec §6.2):
    ``q = clamp(round_away(x / s_d) + o_d, -128, 127)`` with ``s_d = 1/(double)scale``, in double.

  The default is the fake-quant layer's formula: the NPU's precision and tie rule for AscendQuant are not
  published (spec §8.6), so the emulation keeps the activation codes of the fake-quant model and isolates
  what the deploy model certainly changes, the integer accumulation and the INT32 bias. ``"ascend"``
  shows how sensitive a model is to the other reading.

  They differ (i) where the float32 product ``x*scale`` (or the float32 sum with the offset) rounds onto
  or across a ``.5`` boundary that the double quotient ``x/s_d`` does not reach, and (ii) at ties, because
  rounding half away from zero is not shift-invariant: the tie ``x*scale = 0.5`` with ``offset = -14``
  gives ``round_away(-13.5) = -14`` here but ``round_away(0.5) - 14 = -13`` in the fake layer. Inputs on
  a quantization grid (an AVE pooling of codes feeding the next Quant) hit such ties in real models. Set
  ``layer.formula`` on a Quant layer, or pass ``quant_formula=`` to :func:`load_deploy_net` /
  :func:`~amct_caffe.analysis.compare.compare_models`. A NaN input is coded as the real zero (``o_d``).
* ``Convolution`` / ``Deconvolution`` / ``InnerProduct``: INT8 codes ``q_x`` (offset ``o_d`` of the Quant
  that produced them), INT8 weights ``q_w`` (``int8_data``), INT32 bias ``b_q`` (``int32_data``), and the
  INT32 accumulator ``acc = sum((q_x - o_d) * q_w) + b_q``: ATC's offset handling (spec §7.2: the conv
  gets ``offset_x = o_d``; its bias optimisation folds ``-o_d * sum(q_w)`` into the bias, which is the same
  sum). The real zero of the input is the code ``o_d``, so the convolution's zero padding pads ``o_d``:
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
  float32 ``deq_scale`` (spec §7.3, :func:`~amct_caffe.quant.numerics.unpack_deq_scale`); shift N and
  ``offset_w`` must be 0 (every QAT flow). ``y = fl32(acc * deq_scale)`` -- the exact product rounded
  once (AscendDequant may output float16 on the device; the emulation keeps float32).

Blob values are therefore codes (Quant tops), accumulators (the quantized layer's top, i.e.
``<L>_dequant_layer_in``) or real values (everything else); :func:`integer_blob_scales` says how to turn
each into real values, which :mod:`amct_caffe.analysis.compare` uses.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from amct_caffe.engine.layers.base import TEST, Layer, Tensor
from amct_caffe.engine.layers.quant import DeQuant, Quant
from amct_caffe.engine.layers.vision import Convolution, Deconvolution, InnerProduct, Pooling
from amct_caffe.errors import ModelFormatError, UnsupportedLayerError, WeightShapeError
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import blob_shape, storage_kind
from amct_caffe.model.graph import producer_index, value_readers
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

if TYPE_CHECKING:
    from amct_caffe.engine.net import Net

LOGGER = get_logger("emulation.integer")

#: The two Quant formulas (see the module docstring); ``"caffe"`` is the default.
QUANT_FORMULAS = ("ascend", "caffe")
DEFAULT_QUANT_FORMULA = "caffe"

#: Blob storage kinds that only a deploy caffemodel uses.
INTEGER_KINDS = frozenset({"int8", "int32", "uint64"})

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


def _channel_view(values: Tensor, x: Tensor) -> Tensor:
    """Per-channel (axis 1) factors shaped to broadcast against ``x``; a single factor as a scalar."""
    if values.numel() == 1:
        return values.reshape(())
    return values.reshape([1, -1] + [1] * (x.dim() - 2))


# ---------------------------------------------------------------------------------------------------
# integer layers
# ---------------------------------------------------------------------------------------------------
class IntegerQuant(Layer):
    """``Quant`` on the NPU (AscendQuant): float input -> INT8 codes (``torch.int8``).

    ``formula`` selects ``"ascend"`` or ``"caffe"`` (module docstring). Attributes ``scale`` (float32
    ``quant_param.scale`` = 1/s_d), ``scale_d`` (``1/(double)scale``, the step of a code) and ``offset_d``.
    """

    type_name = QUANT
    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True

    def __init__(self, float_layer: Quant, formula: str = DEFAULT_QUANT_FORMULA) -> None:
        super().__init__(float_layer.param, float_layer.phase, float_layer.device)
        self.scale = float(np.float32(float_layer.param.quant_param.scale))
        self.scale_d = float(float_layer.scale_d)
        self.offset_d = int(float_layer.offset_d)
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


class _IntegerCube(Layer):
    """Shared part of the INT8 Convolution / Deconvolution / InnerProduct: blobs, checks, bias, INT32 top.

    ``blobs = [q_w (torch.int8, the float layer's weight shape), b_q (torch.int32, [num_output])]``
    (the bias only with ``bias_term``); ``quant`` is the IntegerQuant whose codes the layer reads.
    """

    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True
    #: output-channel axis of the weight blob (ARQ's per-channel axis)
    weight_axis = 0

    def __init__(self, float_layer: Layer, quant: IntegerQuant) -> None:
        super().__init__(float_layer.param, float_layer.phase, float_layer.device)
        self.float_layer = float_layer
        self.quant = quant
        self.bias_term = bool(float_layer.bias_term)  # type: ignore[attr-defined]
        weight = float_layer.blobs[0]
        self.blobs = [torch.zeros(tuple(weight.shape), dtype=torch.int8, device=weight.device)]
        if self.bias_term:
            bias = float_layer.blobs[1]
            self.blobs.append(torch.zeros(tuple(bias.shape), dtype=torch.int32, device=bias.device))
        _check_exact_size(self, self._terms())

    def _terms(self) -> int:
        raise NotImplementedError

    def _check_blobs(self) -> tuple[Tensor, Tensor | None]:
        w = self.blobs[0]
        if w.dtype != torch.int8:
            raise self.error(
                f"the integer (deploy) layer needs an INT8 weight blob (int8_data), it holds {w.dtype}; "
                "load the deploy caffemodel into a new Net instead of float weights into a deploy net."
            )
        b = self.blobs[1] if self.bias_term else None
        if b is not None and b.dtype != torch.int32:
            raise self.error(
                f"the integer (deploy) layer needs an INT32 bias blob (int32_data), it holds {b.dtype}."
            )
        return w, b

    def _centred(self, x: Tensor) -> Tensor:
        if x.dtype != torch.int8:
            raise self.error(
                f"reads a {x.dtype} bottom; in the deploy model its bottom must be the INT8 output of a "
                "Quant layer."
            )
        return x.to(torch.float64) - float(self.quant.offset_d)

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


class IntegerConvolution(_IntegerCube):
    """INT8 Convolution: ``acc = conv2d(q_x - o_d, q_w) + b_q`` exactly (zero padding = the code ``o_d``)."""

    type_name = "Convolution"

    def _terms(self) -> int:
        w = self.blobs[0]
        return int(w.shape[1] * w.shape[2] * w.shape[3])

    def _accumulate(self, xc: Tensor, w: Tensor) -> Tensor:
        layer: Convolution = self.float_layer  # type: ignore[assignment]
        layer._check_bottoms([xc])
        return F.conv2d(xc, w, None, layer.stride, layer.pad, layer.dilation, layer.group)


class IntegerDeconvolution(_IntegerCube):
    """INT8 Deconvolution: ``acc = conv_transpose2d(q_x - o_d, q_w) + b_q`` exactly; weight
    ``[C_in, num_output/group, kh, kw]`` with output channels on axis 1."""

    type_name = "Deconvolution"
    weight_axis = 1

    def _terms(self) -> int:
        # each output sums over its group's input channels and (at most) every kernel tap
        w = self.blobs[0]
        return int(w.shape[0] * w.shape[2] * w.shape[3])

    def _accumulate(self, xc: Tensor, w: Tensor) -> Tensor:
        layer: Deconvolution = self.float_layer  # type: ignore[assignment]
        layer._check_bottoms([xc])
        return F.conv_transpose2d(xc, w, None, layer.stride, layer.pad, 0, layer.group, layer.dilation)


class IntegerInnerProduct(_IntegerCube):
    """INT8 InnerProduct: ``acc = flatten(q_x - o_d, axis) @ q_w^T + b_q`` exactly (honours ``transpose``)."""

    type_name = "InnerProduct"

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


class IntegerPooling(Layer):
    """Pooling on INT8 codes: Caffe's pooling of the centred codes ``q_x - o_d`` (padding = real zero),
    in float64, rounded once to float32 (units of ``s_d``)."""

    type_name = "Pooling"
    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True

    def __init__(self, float_layer: Pooling, quant: IntegerQuant) -> None:
        super().__init__(float_layer.param, float_layer.phase, float_layer.device)
        self.float_layer = float_layer
        self.quant = quant

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if x.dtype != torch.int8:
            raise self.error(
                f"reads a {x.dtype} bottom; in the deploy model its bottom must be the INT8 output of a "
                "Quant layer."
            )
        xc = x.to(torch.float64) - float(self.quant.offset_d)
        return [self.float_layer.forward([xc])[0].to(torch.float32)]


class IntegerDeQuant(Layer):
    """``DeQuant`` on the NPU (AscendDequant): ``y = fl32(acc * deq_scale)`` per channel (axis 1) or tensor.

    One blob: the ``uint64_data`` words, held bit for bit in a ``torch.int64`` tensor (torch < 2.3 has no
    uint64; the net saves int64 blobs back as ``uint64_data``); bits 0-31 the float32 ``deq_scale``; shift N
    and ``offset_w`` must be 0.
    """

    type_name = DEQUANT
    exact_bottoms = 1
    exact_tops = 1
    accepts_integer_blobs = True

    def __init__(self, float_layer: DeQuant, shape: tuple[int, ...]) -> None:
        super().__init__(float_layer.param, float_layer.phase, float_layer.device)
        self.blobs = [torch.zeros(shape, dtype=torch.int64)]
        self._cache: tuple[int, int, Tensor] | None = None

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


INTEGER_LAYER_TYPES: tuple[type[Layer], ...] = (
    IntegerQuant, IntegerConvolution, IntegerDeconvolution, IntegerInnerProduct, IntegerPooling,
    IntegerDeQuant,
)
_CUBES: dict[type[Layer], type[_IntegerCube]] = {
    Convolution: IntegerConvolution,
    Deconvolution: IntegerDeconvolution,
    InnerProduct: IntegerInnerProduct,
}


# ---------------------------------------------------------------------------------------------------
# building a deploy net
# ---------------------------------------------------------------------------------------------------
def integer_layers_of(source: caffe_pb2.NetParameter) -> dict[str, list[str]]:
    """``{layer name: storage kinds of its blobs}`` for the caffemodel layers that hold integer blobs."""
    out: dict[str, list[str]] = {}
    for lp in source.layer:
        kinds = [storage_kind(b) for b in lp.blobs]
        if any(k in INTEGER_KINDS for k in kinds):
            out[lp.name] = kinds
    return out


def is_deploy_model(source: caffe_pb2.NetParameter) -> bool:
    """True when the caffemodel stores any blob in ``int8_data``/``int32_data``/``uint64_data``."""
    return bool(integer_layers_of(source))


def _params(net: Net) -> list[caffe_pb2.LayerParameter]:
    return [layer.param for layer in net.engine_layers]


def _fail(path: str, layer: str, message: str) -> WeightShapeError:
    where = f" of '{path}'" if path else ""
    return WeightShapeError(f"Deploy model{where}, layer '{layer}': {message}")


def prepare_integer_layers(
    net: Net, source: caffe_pb2.NetParameter, path: str = "", quant_formula: str | None = None
) -> bool:
    """Swap in the integer layers a deploy caffemodel needs; called by ``Net.copy_from`` before copying.

    Does nothing (returns False) when ``source`` has no integer blobs. Otherwise, for each DeQuant layer
    whose caffemodel blob is ``uint64_data``: its bottom's producer ``L`` (Convolution, Deconvolution or
    InnerProduct with an ``int8_data`` weight and an ``int32_data`` bias, or Pooling) and ``L``'s bottom's
    producer (a ``Quant``) are replaced by their integer versions. Returns True when the net is (now) an
    integer net.

    Raises:
        WeightShapeError: the net is not TEST phase, or an integer blob belongs to a layer that does not
            fit the pattern (its message says why: no Quant before it, no DeQuant after it, a float layer
            reading INT8 codes, a float bias, ...).
    """
    kinds = integer_layers_of(source)
    if not kinds:
        return False
    formula = quant_formula or DEFAULT_QUANT_FORMULA
    if formula not in QUANT_FORMULAS:
        raise ValueError(f"quant_formula must be one of {QUANT_FORMULAS}, got {formula!r}")
    layers = net.engine_layers
    index = {layer.name: i for i, layer in enumerate(layers)}
    present = {name: k for name, k in kinds.items() if name in index}
    if not present:
        return False
    if net.phase != TEST:
        name = next(iter(present))
        raise _fail(
            path, name,
            f"stores {present[name]} blobs: a deploy model runs only in the integer emulation, which is "
            "inference only. Build the net in TEST phase (the float/fake-quant model is the one to train)."
        )
    by_src = {lp.name: lp for lp in source.layer}
    quants: dict[int, IntegerQuant] = {}
    handled: set[str] = set()
    for di, layer in enumerate(list(layers)):
        if layer.type_name != DEQUANT or present.get(layer.name) != ["uint64"]:
            continue
        d_shape = blob_shape(by_src[layer.name].blobs[0])
        li = producer_index(_params(net), di, layer.param.bottom[0])
        if li is None:
            raise _fail(path, layer.name, "DeQuant has no producer of its bottom.")
        cube = layers[li]
        qi = producer_index(_params(net), li, cube.param.bottom[0]) if len(cube.param.bottom) == 1 else None
        _check_pattern(net, path, layer, cube, qi, present, by_src)
        assert qi is not None
        quant = quants.get(qi)
        if quant is None:
            q_layer = layers[qi]
            quant = q_layer if isinstance(q_layer, IntegerQuant) else IntegerQuant(q_layer, formula)  # type: ignore[arg-type]
            quants[qi] = quant
            layers[qi] = quant
        # (a net loaded from a deploy caffemodel before keeps its integer layers)
        if isinstance(cube, Pooling):
            layers[li] = IntegerPooling(cube, quant)
        elif not isinstance(cube, (_IntegerCube, IntegerPooling)):
            layers[li] = _CUBES[type(cube)](cube, quant)
        channels = _channels_of(net, li)
        if len(d_shape) != 1 or (channels is not None and d_shape[0] not in {1, channels}):
            raise _fail(
                path, layer.name,
                f"the DeQuant blob has shape {d_shape}; it must be [{channels}] (per channel) or [1]."
            )
        if not isinstance(layer, IntegerDeQuant):
            layers[di] = IntegerDeQuant(layer, d_shape)  # type: ignore[arg-type]
        handled.update({layer.name, cube.name})
    for name, k in present.items():
        if name not in handled:
            layer = layers[index[name]]
            raise _fail(
                path, name,
                f"stores {k} blobs but is not part of a Quant -> (Convolution | Deconvolution | "
                "InnerProduct | Pooling) -> DeQuant pattern with a uint64_data DeQuant blob (layer type "
                f"{layer.type_name}); the integer emulation cannot run it. Integer blobs belong only to "
                "such layers."
            )
    for qi, quant in quants.items():
        for ri in value_readers(_params(net), qi, quant.param.top[0]):
            if not isinstance(layers[ri], INTEGER_LAYER_TYPES):
                raise _fail(
                    path, layers[ri].name,
                    f"reads the INT8 codes of Quant layer '{quant.name}' but is a float layer "
                    f"(type {layers[ri].type_name}); in a deploy model a Quant feeds only quantized layers."
                )
    for li in range(len(layers)):
        if isinstance(layers[li], (_IntegerCube, IntegerPooling)):
            readers = value_readers(_params(net), li, layers[li].param.top[0])
            if [type(layers[r]) for r in readers] != [IntegerDeQuant]:
                raise _fail(
                    path, layers[li].name,
                    "its INT32 output must be read by exactly one layer, its DeQuant "
                    f"(readers: {[layers[r].name for r in readers]})."
                )
    return True


def _channels_of(net: Net, li: int) -> int | None:
    """Channels (axis 1) of layer ``li``'s top from the net's last shape pass, None when unknown."""
    value = getattr(net, "_data", {}).get(net.engine_layers[li].param.top[0])
    if value is None or value.dim() < 2:
        return None
    return int(value.shape[1])


def _check_pattern(
    net: Net,
    path: str,
    dequant: Layer,
    cube: Layer,
    qi: int | None,
    present: dict[str, list[str]],
    by_src: dict[str, caffe_pb2.LayerParameter],
) -> None:
    """Validate ``Quant -> cube -> dequant`` for the integer emulation, with an error saying what is wrong."""
    inner = getattr(cube, "float_layer", cube)
    if isinstance(inner, Pooling):
        if cube.name in present:
            raise _fail(path, cube.name, "a Pooling layer has no blobs, but the caffemodel gives it some.")
    elif type(inner) in _CUBES:
        if len(cube.param.bottom) != 1 or len(cube.param.top) != 1:
            raise _fail(
                path, cube.name,
                f"has {len(cube.param.bottom)} bottoms and {len(cube.param.top)} tops; the integer emulation "
                "supports one of each."
            )
        src = by_src.get(cube.name)
        kinds = [storage_kind(b) for b in src.blobs] if src is not None else []
        want = ["int8", "int32"] if inner.bias_term else ["int8"]  # type: ignore[attr-defined]
        if kinds != want:
            raise _fail(
                path, cube.name,
                f"the caffemodel stores its blobs as {kinds or 'nothing'}; a quantized {cube.type_name} "
                f"before DeQuant '{dequant.name}' needs {want} (weight in int8_data, bias in int32_data)."
            )
    else:
        raise _fail(
            path, dequant.name,
            f"the DeQuant reads the output of '{cube.name}' (type {cube.type_name}); the integer emulation "
            "supports Convolution, Deconvolution, InnerProduct and Pooling between Quant and DeQuant."
        )
    if qi is None or net.engine_layers[qi].type_name != QUANT:
        who = net.engine_layers[qi].name if qi is not None else "nothing"
        raise _fail(
            path, cube.name,
            f"its bottom is produced by '{who}', not by a Quant layer; a quantized layer of a deploy model "
            "reads the INT8 codes of a Quant layer."
        )


def load_deploy_net(
    model: str | os.PathLike[str] | caffe_pb2.NetParameter,
    weights: str | os.PathLike[str] | caffe_pb2.NetParameter,
    *,
    device: torch.device | str | None = None,
    quant_formula: str = DEFAULT_QUANT_FORMULA,
) -> Net:
    """The deploy model as an engine net in TEST phase, running the integer emulation.

    Same as ``Net(model, TEST, weights=weights)`` but checks that ``weights`` is a deploy caffemodel
    (integer blobs) and sets the ``Quant`` formula.

    Raises:
        ModelFormatError: ``weights`` holds no integer blobs (a float or fake-quant caffemodel).
    """
    from amct_caffe.engine.net import Net
    from amct_caffe.model.io import load_caffemodel

    source = weights if isinstance(weights, caffe_pb2.NetParameter) else load_caffemodel(weights)
    if not is_deploy_model(source):
        raise ModelFormatError(
            f"'{weights if not isinstance(weights, caffe_pb2.NetParameter) else source.name}' holds no "
            "int8_data/int32_data/uint64_data blobs: it is not a deploy caffemodel (run float and fake-quant "
            "models with Net directly)."
        )
    net = Net(model, TEST, device=device)
    net.copy_from(source)
    set_quant_formula(net, quant_formula)
    return net


def set_quant_formula(net: Net, formula: str) -> None:
    """Set the formula of every integer ``Quant`` layer of ``net`` (``"ascend"`` or ``"caffe"``)."""
    if formula not in QUANT_FORMULAS:
        raise ValueError(f"quant_formula must be one of {QUANT_FORMULAS}, got {formula!r}")
    for layer in net.engine_layers:
        if isinstance(layer, IntegerQuant):
            layer.formula = formula


def is_integer_net(net: Net) -> bool:
    """True when ``net`` runs integer layers (a deploy model was loaded into it)."""
    return any(isinstance(layer, INTEGER_LAYER_TYPES) for layer in net.engine_layers)


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


def integer_blob_scales(net: Net) -> dict[str, BlobScale]:
    """For every Quant top and every quantized layer's top of an integer net: how to read it as real values.

    Codes: ``(q - o_d) * s_d``; accumulators (and pooled centred codes): ``acc * deq_scale``.
    """
    out: dict[str, BlobScale] = {}
    layers = net.engine_layers
    for i, layer in enumerate(layers):
        if isinstance(layer, IntegerQuant):
            out[layer.param.top[0]] = BlobScale("codes", layer.name, np.array([layer.scale_d]),
                                                float(layer.offset_d))
        elif isinstance(layer, IntegerDeQuant):
            li = producer_index(_params(net), i, layer.param.bottom[0])
            if li is None:
                continue
            deq = layer.deq_scale().numpy().astype(np.float64)
            out[layer.param.bottom[0]] = BlobScale("accumulator", layers[li].name, deq)
    return out
