"""AMCT's post-training calibration layer ``IFMR`` (``ifmr_param``, AMCT reference §3.1-3.2, §5.3, §8.4).

``quantize_model`` puts one ``IFMR`` layer in front of every quantized input value of the calibration model:
its bottoms are that value (once per quantized layer reading it, as AMCT's C++ layer pairs bottom ``i``
with ``object_layer[i]``), it has no top, and it changes nothing the net computes. The user runs the model
``batch_num`` times; the layer's life is three explicit steps:

1. :meth:`IFMR.gather` -- every real forward copies its input values into one buffer on the net's device
   (sized for ``batch_num`` batches on the first one; :attr:`IFMR.gathered` is its filled part), until
   ``batch_num`` batches are held;
2. :meth:`IFMR.calibrate` -- after the last one, IFMR runs once over ALL gathered values (torch on the
   net's device, :func:`amct_caffe.quant.ifmr.ifmr_gathered`) and gives :attr:`IFMR.result`: ``scale_d``,
   ``offset_d`` and each quantized layer's input shape; the gathered data is released;
3. :meth:`IFMR.on_calibration_end` -- the result goes to the layer's :attr:`IFMR.recorder`. By default that
   is a :class:`RecordFileRecorder` for ``ifmr_param.record_file_path``, which writes ``scale_d``,
   ``offset_d``, ``channels``, ``height``, ``width`` of every ``object_layer`` into the record file: AMCT's
   documented contract for this layer. Code that wants the factors elsewhere (a test, an in-memory flow)
   sets ``layer.recorder`` to any :class:`CalibrationRecorder` (or None) before the last batch.

Further forwards do nothing (AMCT's layer stops after its calibration, too). Nothing happens during the
net's shape pass (``self.reshaping``). Bottoms listed twice under one blob name are the same values and are
gathered once (AMCT's C++ layer stores them twice; with the default percentiles the factors are the same).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.errors import AmctError
from amct_caffe.log import get_logger
from amct_caffe.model.layer_types import IFMR as IFMR_TYPE
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.ifmr import check_params, ifmr_gathered
from amct_caffe.quant.record import LayerRecord, legacy_chw, update_layers

LOGGER = get_logger("engine.layers.calibration")


@dataclass(frozen=True)
class CalibrationResult:
    """What one ``IFMR`` layer found.

    Attributes:
        layer: the IFMR layer's name.
        scale_d, offset_d: the activation factors (float32 value; integer in [-128, 127], 0 when symmetric).
        shapes: ``object_layer`` name -> its input's (channels, height, width), or None for a blob of more
            than 4 axes.
        batches: how many batches the factors were computed from.
    """

    layer: str
    scale_d: float
    offset_d: int
    shapes: Mapping[str, tuple[int, int, int] | None]
    batches: int

    @property
    def object_layers(self) -> tuple[str, ...]:
        return tuple(self.shapes)


class CalibrationRecorder(Protocol):
    """Receives the result of an ``IFMR`` layer once its calibration is done."""

    def record(self, result: CalibrationResult) -> None:
        """Store ``result`` (called once per layer, after its last calibration batch)."""


class RecordFileRecorder:
    """Writes calibration results into a scale/offset record file (update-or-append per layer).

    Every ``object_layer`` gets ``scale_d``, ``offset_d`` and its input shape; the other fields of its entry
    (``scale_w``/``offset_w`` written by ``quantize_model``) stay as they are.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def record(self, result: CalibrationResult) -> None:
        updates = {}
        for name, shape in result.shapes.items():
            rec = LayerRecord(scale_d=result.scale_d, offset_d=result.offset_d)
            if shape is not None:
                rec.channels, rec.height, rec.width = shape
            updates[name] = rec
        update_layers(self.path, updates)


@register(IFMR_TYPE)
class IFMR(Layer):
    """AMCT's ``IFMR`` calibration layer (see the module docstring for its three steps).

    Parameters (``ifmr_param``): ``batch_num`` (> 0), ``with_offset`` (asymmetric activations),
    ``search_range_start``/``search_range_end``/``search_step``, ``max_percentile``/``min_percentile``,
    ``object_layer`` (one per bottom, or several names for one bottom), ``record_file_path``.

    Declared state:
        gathered (property): the input values held so far, one 1-D tensor on the net's device (a view of
            the layer's buffer, which holds ``batch_num`` batches once the first one is seen).
        batches_gathered: how many forwards were gathered.
        result: the calibration result once ``batch_num`` batches were seen, else None.
        recorder: where the result goes (see :class:`CalibrationRecorder`).
    """

    min_bottoms = 1
    exact_tops = 0

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        if not param.HasField("ifmr_param"):
            raise self.error("has no ifmr_param; an IFMR layer needs its search parameters and batch_num.")
        p = param.ifmr_param
        self.batch_num = int(p.batch_num)
        if self.batch_num <= 0:
            raise self.error(f"ifmr_param.batch_num is {self.batch_num}; it must be > 0 (the number of "
                             "calibration batches).")
        self.with_offset = bool(p.with_offset)
        self.search = (float(p.max_percentile), float(p.min_percentile), float(p.search_range_start),
                       float(p.search_range_end), float(p.search_step))
        if not all(math.isfinite(v) for v in self.search):
            raise self.error(f"ifmr_param holds a non-finite search value {self.search}.")
        try:
            check_params(*self.search)
        except AmctError as exc:
            raise self.error(f"{exc} (ifmr_param)") from exc
        self.object_layers = tuple(p.object_layer)
        bottoms = list(param.bottom)
        if not self.object_layers:
            raise self.error("ifmr_param has no object_layer; name the quantized layer(s) reading the input.")
        if len(bottoms) not in (1, len(self.object_layers)):
            raise self.error(f"has {len(bottoms)} bottoms and {len(self.object_layers)} object_layer names; "
                             "give one bottom per object_layer, or one bottom for all.")
        first: dict[str, int] = {}
        for i, name in enumerate(bottoms):
            first.setdefault(name, i)
        #: Indices of the distinct bottom names: a name listed twice is one value.
        self._distinct = list(first.values())
        self._buffer = torch.empty(0, device=device)
        self._filled = 0
        self.batches_gathered = 0
        self.result: CalibrationResult | None = None
        self.recorder: CalibrationRecorder | None = (
            RecordFileRecorder(p.record_file_path) if p.record_file_path else None
        )

    @property
    def gathered(self) -> Tensor:
        """The input values gathered so far (all batches, distinct bottoms, in order) as one 1-D tensor."""
        return self._buffer[:self._filled]

    @property
    def done(self) -> bool:
        """True once the factors are computed (later forwards change nothing)."""
        return self.result is not None

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        if self.reshaping or self.done:
            return []
        self.gather(bottoms)
        if self.batches_gathered == self.batch_num:
            self.result = self.calibrate(bottoms)
            self.on_calibration_end()
        return []

    # -- the three steps ---------------------------------------------------------------------------------
    def gather(self, bottoms: Sequence[Tensor]) -> None:
        """Step 1: copy this batch's input values (each distinct bottom once) into the buffer."""
        values = [bottoms[i].detach().reshape(-1) for i in self._distinct]
        size = sum(v.numel() for v in values)
        if self._filled + size > self._buffer.numel():
            self._grow(size, values[0])
        for v in values:
            self._buffer[self._filled:self._filled + v.numel()].copy_(v)
            self._filled += v.numel()
        self.batches_gathered += 1
        for name in self.object_layers:
            LOGGER.info('Doing layer: "%s" calibration, already store %d/%d data.', name,
                        self.batches_gathered, self.batch_num)

    def _grow(self, size: int, like: Tensor) -> None:
        """A buffer for the batches still to come at ``size`` values each (batches of another size grow it
        again), holding what was gathered."""
        capacity = self._filled + size * (self.batch_num - self.batches_gathered)
        buffer = torch.empty(capacity, dtype=like.dtype, device=like.device)
        buffer[:self._filled].copy_(self._buffer[:self._filled])
        self._buffer = buffer

    def calibrate(self, bottoms: Sequence[Tensor]) -> CalibrationResult:
        """Step 2: IFMR over every gathered value; releases the gathered data. ``bottoms``: this (last)
        batch's inputs, whose shapes the record gets.

        Raises:
            QuantDataError: the data holds inf/NaN (the message names this layer).
        """
        max_p, min_p, start, end, step = self.search
        try:
            s, o = ifmr_gathered([self.gathered], max_p, min_p, start, end, step, self.with_offset)
        except AmctError as exc:
            raise type(exc)(f"Layer '{self.name}' (type {self.type_name}): {exc}") from exc
        finally:
            self._buffer = self._buffer.new_empty(0)
            self._filled = 0
        shapes = {}
        for k, name in enumerate(self.object_layers):
            bottom = bottoms[k if len(bottoms) == len(self.object_layers) else 0]
            shapes[name] = legacy_chw(tuple(bottom.shape))
        result = CalibrationResult(self.name, float(s), int(o), shapes, self.batches_gathered)
        for name in self.object_layers:
            LOGGER.info('Do layer: "%s" activation calibration success! scale_d %.9g, offset_d %d (%d '
                        'batches).', name, result.scale_d, result.offset_d, result.batches)
        return result

    def on_calibration_end(self) -> None:
        """Step 3: hand the result to the recorder (the record file, by default)."""
        if self.recorder is not None and self.result is not None:
            self.recorder.record(self.result)
