"""AMCT's fake-quant layers as Caffe Python layers, for running fake-quant models in a STOCK Caffe.

AMCT's saved ``*_fake_quant_model.prototxt`` uses the custom layer types ``Quant``, ``DeQuant`` and
``AntiQuant``, which only AMCT's patched Caffe (and this project's engine) know. A stock pycaffe built with
``WITH_PYTHON_LAYER=1`` can run the same model once those layers are rewritten into ``type: "Python"``
layers backed by the classes of this module::

    amct-caffe pycaffe-rewrite net_fake_quant_model.prototxt net_pycaffe.prototxt

(or :func:`amct_caffe.caffe.rewrite.rewrite_fake_quant_for_pycaffe`). The rewritten layers keep
their names, bottoms and tops, and the DeQuant layers own their three blobs, so the fake-quant caffemodel
loads unchanged (Caffe matches caffemodel blobs to layers by layer name, Python layers included).

Caffe constructs the classes by importing this module inside its own process (``bp::import`` of
``python_param.module``), so this module imports ONLY the standard library and numpy: no torch, no protobuf,
nothing else of amct_caffe (whose package ``__init__`` is lazy). The process then needs ``amct_caffe`` on
``sys.path`` (e.g. ``PYTHONPATH=<amct-caffe>/src``) and numpy, nothing more.

The formulas are numpy twins of :mod:`amct_caffe.quant.numerics` and of the engine's layers in
:mod:`amct_caffe.engine.layers.quant` (which work on torch tensors): one formula, two array libraries, with
the same dtypes and operation order, so both give bit-identical results (tests/test_pycaffe_layers.py checks
this on random values and exact ties).

Python-layer protocol (pycaffe): Caffe sets ``self.param_str`` (``python_param.param_str``) and
``self.phase`` and then calls ``setup(bottom, top)``, ``reshape`` before every forward, ``forward(bottom,
top)`` and ``backward(top, propagate_down, bottom)``; blobs expose numpy views ``.data``/``.diff`` and
``.reshape(*shape)``; ``self.blobs.add_blob(*shape)`` appends a zero-filled learnable blob. The parameters
travel as a JSON object in ``param_str``. Outside a Caffe process (no importable ``caffe``) the classes
derive from :class:`StandaloneLayer`, a numpy stand-in for ``caffe.Layer``, so they can be used and tested
without Caffe; :func:`standalone_layer` builds such an instance even where ``caffe`` is importable.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = [
    "AntiQuant",
    "DeQuant",
    "ParamStrError",
    "Quant",
    "StandaloneBlob",
    "StandaloneLayer",
    "fake_quant_data",
    "offset_byte",
    "quant_scale_d",
    "round_away",
    "shift_n",
    "standalone_layer",
]

INT8_MIN = -128
INT8_MAX = 127
INT16_MIN = -(2**15)
INT16_MAX = 2**15 - 1
#: DeQuant's shift-N range: AMCT's shift_bit factors are integers in [1, 16] (0 = no shift).
SHIFT_MIN = 1
SHIFT_MAX = 16


# -- numpy twins of amct_caffe.quant.numerics ---------------------------------------------------------------
def round_away(x: np.ndarray) -> np.ndarray:
    """C ``round()``: nearest integer, ties away from zero (``2.5 -> 3``, ``-2.5 -> -3``), in ``x``'s dtype.

    Numpy twin of :func:`amct_caffe.quant.numerics.round_away`: ``x - trunc(x)`` is exact in floating
    point, so the tie test is exact (``floor(x + 0.5)`` is not, and rounds negative ties up). inf and NaN
    pass through; integer arrays are returned unchanged.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return x
    t = np.trunc(x)
    with np.errstate(invalid="ignore"):  # inf - inf = NaN, whose comparison is False: inf stays inf
        return np.where(np.abs(x - t) >= 0.5, t + np.sign(x), t)


class ParamStrError(ValueError):
    """A Python layer's ``param_str`` (or a value in it) that the layer cannot use.

    A plain ``ValueError`` subclass: this module runs inside a stock Caffe and imports nothing of
    amct_caffe, so it cannot raise the package's own errors; the message names the layer and the fix.
    """


def quant_scale_d(scale: float) -> float:
    """``s_d`` as AMCT's Quant layer recovers it: ``1 / (double)scale``, ``scale`` = ``quant_param.scale``.

    ``scale`` is a float32 proto field holding ``1/s_d``; it is first rounded to float32 (a JSON number or a
    hand-written value may carry more digits), then widened exactly to double and inverted in double.
    Raises ValueError unless the float32 scale is finite and > 0.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ParamStrError(f"quant_param.scale is {scale!r}; it must be 1/scale_d, a number > 0.")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, rejected below
        s32 = np.float32(scale)
    if not (math.isfinite(float(s32)) and float(s32) > 0.0):
        raise ParamStrError(
            f"quant_param.scale is {float(s32)!r}; it must be 1/scale_d, a finite float32 value > 0."
        )
    return 1.0 / float(s32)


def offset_byte(value: bytes) -> int:
    """``quant_param.offset`` as AMCT's Quant layer reads it: the first byte as two's-complement int8.

    Twin of ``amct_caffe.quant.numerics.offset_byte`` (an empty string reads as 0).
    """
    if not value:
        return 0
    b = value[0]
    return b - 256 if b > INT8_MAX else b


def fake_quant_data(x: np.ndarray, scale_d: float, offset_d: int) -> np.ndarray:
    """The Quant layer's float forward: ``(clamp(round_away(x / s_d) + o_d, -128, 127) - o_d) * s_d``.

    Computed in double precision from the float32 input (as the patched Caffe's quant layer and the
    engine's ``Quant`` do) and rounded once to float32. Twin of
    :func:`amct_caffe.quant.numerics.fake_quant_data` called on float64 data with a float64 ``s_d``.
    """
    x64 = np.asarray(x, dtype=np.float64)
    q = np.clip(round_away(x64 / np.float64(scale_d)) + offset_d, INT8_MIN, INT8_MAX)
    return ((q - offset_d) * np.float64(scale_d)).astype(np.float32)


def _per_channel(blob: np.ndarray, x: np.ndarray, who: str) -> np.ndarray:
    """A DeQuant factor blob broadcast against ``x``: a scalar for one value, else one value per channel."""
    if blob.size == 1:
        return blob.reshape(())
    if x.ndim < 2 or x.shape[1] != blob.size:
        raise ValueError(
            f"{who}: has {blob.size} per-channel factors but the bottom has shape {tuple(x.shape)}; the "
            "bottom's channel count must match."
        )
    return blob.reshape([1, -1] + [1] * (x.ndim - 2))


def shift_n(x: np.ndarray, deq: np.ndarray, shift: np.ndarray, who: str = "DeQuant") -> np.ndarray:
    """DeQuant's shift-N requantisation emulation, per channel, in float32 (docs/amct-reference.md §6.3).

    ``t = round_away(x / deq)``, ``t = round_away(t / 2^N)``, ``t = clamp(t, -32768, 32767)``,
    ``y = t * deq * 2^N``: the INT32 accumulator is divided by ``2^N`` and saturated to INT16 as the old
    hardware's shift-N mode does, then brought back to float. ``deq``/``shift`` have one value or one per
    channel (axis 1 of ``x``). Float32 operations in the engine's order, so the result is bit-identical.
    """
    x = np.asarray(x, dtype=np.float32)
    d = _per_channel(np.asarray(deq, dtype=np.float32), x, who)
    pow2 = np.exp2(_per_channel(np.asarray(shift, dtype=np.float32), x, who))
    t = round_away(x / d)
    t = np.clip(round_away(t / pow2), INT16_MIN, INT16_MAX).astype(np.float32)
    return (t * d * pow2).astype(np.float32, copy=False)


# -- a numpy stand-in for caffe.Layer -----------------------------------------------------------------------
class StandaloneBlob:
    """A numpy stand-in for a pycaffe ``Blob``: ``data``, ``diff`` (float32 arrays), ``shape``, ``reshape``.

    ``reshape`` reallocates zero-filled arrays when the shape changes, as Caffe's Blob does (its contents
    are then undefined in Caffe; zeros here).
    """

    def __init__(self, *shape: int) -> None:
        self.data = np.zeros(tuple(int(d) for d in shape), dtype=np.float32)
        self.diff = np.zeros_like(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def reshape(self, *shape: int) -> None:
        shape = tuple(int(d) for d in shape)
        if shape != self.data.shape:
            self.data = np.zeros(shape, dtype=np.float32)
            self.diff = np.zeros_like(self.data)

    @classmethod
    def from_array(cls, array: np.ndarray) -> StandaloneBlob:
        """A blob holding a float32 copy of ``array``."""
        blob = cls(*np.shape(array))
        blob.data[...] = array
        return blob


class StandaloneBlobVec(list):
    """A list of :class:`StandaloneBlob` with pycaffe's ``BlobVec.add_blob(*shape)``."""

    def add_blob(self, *shape: int) -> None:
        self.append(StandaloneBlob(*shape))


class StandaloneLayer:
    """A numpy stand-in for ``caffe.Layer``: ``param_str``, ``phase`` (1 = TEST) and ``blobs``."""

    def __init__(self, param_str: str = "", phase: int = 1) -> None:
        self.param_str = param_str
        self.phase = phase
        self.blobs = StandaloneBlobVec()


def _caffe_layer_base() -> type:
    """``caffe.Layer`` when pycaffe is importable (inside a Caffe process it always is), else the stand-in."""
    try:
        import caffe  # optional: present in a Caffe process
    except ImportError:
        return StandaloneLayer
    base = getattr(caffe, "Layer", None)
    return base if isinstance(base, type) else StandaloneLayer


_LayerBase: Any = _caffe_layer_base()


# -- the layer logic (mixins, so the same code runs on caffe.Layer and on the stand-in) ---------------------
class _FakeQuantLayer:
    """Shared checks and parameter parsing of the three layers."""

    type_name = "?"
    #: ``python_param.param_str``, set by Caffe before ``setup`` (by :class:`StandaloneLayer` outside Caffe).
    param_str: str
    #: The layer's blobs, provided by the base the concrete classes mix this into (``caffe.Layer`` or
    #: :class:`StandaloneLayer`); declared here for the type checker.
    blobs: Any

    def _params(self) -> dict[str, Any]:
        text = self.param_str or ""
        if not text.strip():
            return {}
        shown = text if len(text) <= 80 else text[:77] + "..."
        try:
            params = json.loads(text)
        except (ValueError, RecursionError) as exc:
            reason = "nests too deep" if isinstance(exc, RecursionError) else f"is not JSON ({exc})"
            raise ParamStrError(
                f"{self.type_name} Python layer: param_str {shown!r} {reason}; it must be a JSON object "
                "such as amct-caffe pycaffe-rewrite writes."
            ) from exc
        if not isinstance(params, dict):
            raise ParamStrError(f"{self.type_name} Python layer: param_str {shown!r} must be a JSON object.")
        return params

    def _check_counts(self, bottom: Any, top: Any) -> None:
        if len(bottom) != 1 or len(top) != 1:
            raise ValueError(
                f"{self.type_name} Python layer takes exactly 1 bottom and 1 top (got {len(bottom)} and "
                f"{len(top)})."
            )

    def reshape(self, bottom: Any, top: Any) -> None:
        top[0].reshape(*bottom[0].data.shape)

    def backward(self, top: Any, propagate_down: Any, bottom: Any) -> None:
        """Straight-through: the bottom diff is the top diff (the Caffe layers copy it)."""
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff


class _QuantLogic(_FakeQuantLayer):
    """AMCT ``Quant``, float emulation (AMCT reference §6.2).

    param_str: ``{"scale": 1/s_d, "offset": o_d}`` (plus ``with_offset``/``object_layer``, informative).
    ``offset`` is ``quant_param.offset``'s first byte as a signed int (-128..127); like AMCT's layer and
    ATC's plugin, the offset is used whatever ``with_offset`` says.
    """

    type_name = "Quant"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # From param_str, which Caffe sets after construction: parsed by setup.
        self.scale_d: float | None = None
        self.offset_d = 0

    def setup(self, bottom: Any, top: Any) -> None:
        self._check_counts(bottom, top)
        params = self._params()
        if "scale" not in params:
            raise ParamStrError('Quant Python layer: param_str needs "scale" (quant_param.scale = '
                                "1/scale_d).")
        self.scale_d = quant_scale_d(params["scale"])
        offset = params.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or not INT8_MIN <= offset <= INT8_MAX:
            raise ParamStrError(
                f'Quant Python layer: "offset" is {offset!r}; it must be an integer in [-128, 127].'
            )
        self.offset_d = int(offset)

    def forward(self, bottom: Any, top: Any) -> None:
        if self.scale_d is None:
            raise ValueError("Quant Python layer: forward before setup (Caffe calls setup first).")
        top[0].data[...] = fake_quant_data(bottom[0].data, self.scale_d, self.offset_d)


class _DeQuantLogic(_FakeQuantLayer):
    """AMCT ``DeQuant``, float emulation (AMCT reference §6.3), owning the blobs
    ``[deq_scale, shift_bit, offset_w]``.

    param_str: ``{"channel_wise": bool, ...}``. The blobs have shape ``[C]`` (the bottom's channels) when
    ``channel_wise`` is true and the bottom is 4-D, else ``[1]`` -- AMCT's shape rule, which decides whether
    the caffemodel's DeQuant blobs load (Caffe refuses blobs of another shape). Forward: the identity when
    every shift_bit is 0 (all QAT models); when every shift_bit is an integer in [1, 16], the shift-N
    emulation :func:`shift_n`; anything else is an error. ``offset_w`` is not used (always 0).
    """

    type_name = "DeQuant"

    def setup(self, bottom: Any, top: Any) -> None:
        self._check_counts(bottom, top)
        params = self._params()
        channel_wise = params.get("channel_wise", False)
        if not isinstance(channel_wise, bool):
            raise ParamStrError(f'DeQuant Python layer: "channel_wise" is {channel_wise!r}; it must be '
                                "true or false.")
        shape = bottom[0].data.shape
        channels = int(shape[1]) if channel_wise and len(shape) == 4 else 1
        if len(self.blobs) == 0:
            for _ in range(3):
                self.blobs.add_blob(channels)
        elif len(self.blobs) != 3 or any(b.data.shape != (channels,) for b in self.blobs):
            raise ValueError(
                f"DeQuant Python layer: it needs 3 blobs of shape [{channels}] (channel_wise="
                f"{bool(params.get('channel_wise', False))}, bottom shape {tuple(shape)}); the layer "
                f"parameter carries {[tuple(b.data.shape) for b in self.blobs]}."
            )

    def forward(self, bottom: Any, top: Any) -> None:
        x = bottom[0].data
        shift = np.asarray(self.blobs[1].data)
        if not shift.any():
            top[0].data[...] = x
            return
        valid = (shift >= SHIFT_MIN) & (shift <= SHIFT_MAX) & (shift == np.round(shift))
        if not valid.all():
            raise ValueError(
                f"DeQuant Python layer: shift_bit blob holds {shift.reshape(-1)[:8].tolist()}; the values "
                "must be all 0 (no shift) or all integers in [1, 16]."
            )
        deq = np.asarray(self.blobs[0].data)
        if not (np.isfinite(deq) & (deq > 0)).all():
            raise ValueError("DeQuant Python layer: the deq_scale blob must hold finite values > 0 when "
                             "shift_bit is used.")
        top[0].data[...] = shift_n(x, deq, shift, "DeQuant Python layer")


class _AntiQuantLogic(_FakeQuantLayer):
    """AMCT ``AntiQuant`` (INT8 to float on the NPU): the identity in the float model. No parameters."""

    type_name = "AntiQuant"

    def setup(self, bottom: Any, top: Any) -> None:
        self._check_counts(bottom, top)
        self._params()

    def forward(self, bottom: Any, top: Any) -> None:
        top[0].data[...] = bottom[0].data


class Quant(_QuantLogic, _LayerBase):
    """Caffe Python layer ``amct_caffe.caffe.python_layers.Quant``; see :class:`_QuantLogic`."""


class DeQuant(_DeQuantLogic, _LayerBase):
    """Caffe Python layer ``amct_caffe.caffe.python_layers.DeQuant``; see :class:`_DeQuantLogic`."""


class AntiQuant(_AntiQuantLogic, _LayerBase):
    """Caffe Python layer ``amct_caffe.caffe.python_layers.AntiQuant``; see :class:`_AntiQuantLogic`."""


_LOGIC = {"Quant": _QuantLogic, "DeQuant": _DeQuantLogic, "AntiQuant": _AntiQuantLogic}


def standalone_layer(layer: str, param_str: str = "", phase: int = 1) -> Any:
    """An instance of the ``layer`` logic (``"Quant"``, ``"DeQuant"``, ``"AntiQuant"``) on the numpy
    stand-in base, usable without Caffe: call ``setup``/``reshape``/``forward`` with lists of
    :class:`StandaloneBlob`."""
    try:
        logic = _LOGIC[layer]
    except KeyError:
        raise ValueError(f"unknown layer {layer!r}; expected one of {sorted(_LOGIC)}") from None
    cls = type(layer, (logic, StandaloneLayer), {})
    return cls(param_str=param_str, phase=phase)
