"""Layers that produce blobs from outside the net: Input (fed from Python) and DummyData."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from amct_caffe.engine.fillers import fill
from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.errors import BlobSizeError
from amct_caffe.model.limits import elements_problem
from amct_caffe.proto import caffe_pb2


def _shapes(param_shapes: Sequence[caffe_pb2.BlobShape], count: int, layer: Layer) -> list[tuple[int, ...]]:
    # Caffe: one shape for all tops, or one per top.
    if len(param_shapes) not in (1, count):
        raise layer.error(f"gives {len(param_shapes)} shapes for {count} tops; give 1 or one per top.")
    shapes = [_allowed(tuple(int(d) for d in s.dim), layer) for s in param_shapes]
    return shapes * count if len(shapes) == 1 else shapes


def _allowed(shape: tuple[int, ...], layer: Layer) -> tuple[int, ...]:
    """``shape`` when a top may have it (no negative axis, within the element limit), else an error."""
    problem = elements_problem(shape)
    if problem is not None:
        raise BlobSizeError(f"Layer '{layer.name}' (type {layer.type_name}): its top {problem}")
    return shape


@register("Input")
class Input(Layer):
    """Holds the net's input blobs; their values are set from Python (``net.blobs[name].data[...] = x``).

    The buffers live on the CPU so that numpy views of them stay writable in every mode; they are moved to
    the compute device at forward.
    """

    exact_bottoms = 0
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        shapes = _shapes(param.input_param.shape, len(param.top), self)
        self.buffers: dict[str, Tensor] = {
            top: torch.zeros(shape, dtype=torch.float32) for top, shape in zip(param.top, shapes)
        }

    def set_input(self, name: str, value: Tensor) -> None:
        self.buffers[name] = value.detach().to("cpu", torch.float32)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return [self.buffers[top].to(self.device) for top in self.param.top]


@register("DummyData")
class DummyData(Layer):
    """Fills its tops with a filler on every forward (constant fillers once, as Caffe refills only others).

    The first values are drawn in :meth:`setup`, so that random fillers draw from the engine's generator in
    layer order, interleaved with the learnable blobs of the layers around it, as at any other setup.
    """

    exact_bottoms = 0
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.dummy_data_param
        count = len(param.top)
        if p.shape:
            shapes = _shapes(p.shape, count, self)
        else:
            # legacy num/channels/height/width lists, one value or one per top
            def pick(values: Sequence[int], i: int) -> int:
                return int(values[0] if len(values) == 1 else values[i])

            if not all(len(v) in (1, count) for v in (p.num, p.channels, p.height, p.width)):
                raise self.error("needs shape, or num/channels/height/width with 1 or one value per top.")
            shapes = [
                _allowed((pick(p.num, i), pick(p.channels, i), pick(p.height, i), pick(p.width, i)), self)
                for i in range(count)
            ]
        fillers = list(p.data_filler)
        if len(fillers) not in (0, 1, count):
            raise self.error(f"gives {len(fillers)} data_filler for {count} tops; give 0, 1 or one per top.")
        if not fillers:
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0.0)]
        self.fillers = fillers * count if len(fillers) == 1 else fillers
        self.shapes = shapes
        #: The tops' current values, drawn first by :meth:`setup`.
        self.values: list[Tensor] = []

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        self.values = [
            fill(torch.empty(shape, dtype=torch.float32), f).to(self.device)
            for shape, f in zip(self.shapes, self.fillers)
        ]

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        for i, f in enumerate(self.fillers):
            if (f.type or "constant") != "constant":
                refill = torch.empty(self.values[i].shape, dtype=torch.float32)
                self.values[i] = fill(refill, f).to(self.device)
        return list(self.values)
