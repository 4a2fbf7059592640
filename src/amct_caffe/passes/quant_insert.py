"""The topology shared by the fake-quant and the deploy model: ``Quant``/``DeQuant`` insertion and naming.

Both saved models have the same layers and names (docs/amct-reference.md §6.1, §7.1; docs/decisions.md rows 5
and 6); they differ only in their caffemodels (``passes.fake_quant``, ``passes.deploy``). For every quantized
input value ``x`` (one :class:`QuantGroup`) and every quantized layer ``L`` reading it (one
:class:`QuantizedLayer`):

* ONE ``Quant`` named ``<first consumer>_quant_layer``, top of the same name, bottom ``x``, placed just before
  the first consumer and read by all the group's consumers; ``quant_param { scale: 1/s_d (float32) offset:
  <o_d as one two's-complement byte> with_offset: true object_layer: "<c1>-<c2>-..." }``;
* for each ``L``: its top renamed ``<L>_dequant_layer_in``; a ``DeQuant`` named ``<L>_dequant_layer`` right
  after ``L`` reads it and writes ``L``'s original top, so everything downstream (in-place ReLU included)
  is untouched; ``dequant_param { channel_wise layer_type object_layer: "<L>" }``.

The numbers both caffemodels derive from one plan live here too (:func:`weight_codes`,
:func:`dequant_scales`), so the two models cannot disagree on them: ``deq_scale[c] = float32(s_d*s_w[c])``
and the INT8 weight codes ``clamp(round_away(w / s_w[c]), -128, 127)``. AVE Pooling has ``s_w = [1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amct_caffe.errors import ModelFormatError
from amct_caffe.model.graph import Graph
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.arq import arq_quantize, weight_channel_axis
from amct_caffe.quant.numerics import deq_scale

QUANT_SUFFIX = "_quant_layer"
DEQUANT_SUFFIX = "_dequant_layer"
DEQUANT_IN_SUFFIX = "_dequant_layer_in"

#: Layer name -> INT8 weight codes (int8 array of the weight's shape).
Codes = dict[str, np.ndarray]


def quant_layer_name(first_consumer: str) -> str:
    """Name (and top) of the ``Quant`` in front of ``first_consumer`` and the layers sharing its input."""
    return first_consumer + QUANT_SUFFIX


def dequant_layer_name(layer: str) -> str:
    """Name of the ``DeQuant`` after ``layer``."""
    return layer + DEQUANT_SUFFIX


def dequant_input_name(layer: str) -> str:
    """The new top of ``layer`` that its ``DeQuant`` reads."""
    return layer + DEQUANT_IN_SUFFIX


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized layer and its factors.

    Attributes:
        name, layer_type: the layer and its Caffe type.
        scale_d, offset_d: the activation factors of its input (float32 value, int in [-128, 127]).
        scale_w: float32 weight scales: C_out values (channel-wise) or one; ``[1.0]`` for AVE Pooling.
        channel_wise: per-output-channel weight scales (``dequant_param.channel_wise``).
    """

    name: str
    layer_type: str
    scale_d: float
    offset_d: int
    scale_w: np.ndarray
    channel_wise: bool

    @property
    def has_weights(self) -> bool:
        return self.layer_type != "Pooling"

    @property
    def axis(self) -> int:
        """The weight's output-channel axis (1 for Deconvolution, else 0)."""
        return weight_channel_axis(self.layer_type)


@dataclass(frozen=True)
class QuantGroup:
    """One quantized input value and the layers reading it through one shared ``Quant``."""

    bottom: str
    scale_d: float
    offset_d: int
    layers: tuple[QuantizedLayer, ...]
    #: ``quant_param.with_offset``: false for PTQ's symmetric activations (``activation_offset: false``).
    with_offset: bool = True

    @property
    def name(self) -> str:
        """The ``Quant`` layer's name (and top)."""
        return quant_layer_name(self.layers[0].name)

    @property
    def object_layer(self) -> str:
        return "-".join(layer.name for layer in self.layers)


def readers_by_value(graph: Graph, names: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Group the one-bottom layers ``names`` of ``graph`` by the value they read.

    Two layers read the same value when their bottom has the same producer layer and top (an in-place layer
    between them makes two values of one blob name); net inputs are keyed by blob name. Returns
    ``(blob, readers)`` pairs, each group's readers and the groups in file order of their first reader.
    """
    groups: dict[tuple, list[str]] = {}
    bottoms: dict[tuple, str] = {}
    wanted = set(names)
    for layer in graph:
        if layer.name not in wanted:
            continue
        blob = layer.bottom[0]
        producer = graph.producer(layer.name, 0)
        if producer is None:
            key: tuple = ("<net input>", blob)
        else:
            key = (producer.name, list(producer.top).index(blob) if blob in producer.top else blob)
        groups.setdefault(key, []).append(layer.name)
        bottoms[key] = blob
    return [(bottoms[key], tuple(readers)) for key, readers in groups.items()]


# -- numbers shared by both caffemodels ----------------------------------------------------------------------
def dequant_scales(layer: QuantizedLayer) -> np.ndarray:
    """``deq_scale = float32(s_d * s_w[c])``, C_out values (channel-wise) or one (``quant.numerics``)."""
    return deq_scale(np.float32(layer.scale_d), layer.scale_w).numpy().astype(np.float32)


def scale_w_along_axis(layer: QuantizedLayer, ndim: int) -> np.ndarray:
    """``scale_w`` shaped to broadcast along the weight's output-channel axis."""
    if layer.scale_w.size == 1:
        return layer.scale_w.reshape([1] * ndim)
    shape = [1] * ndim
    shape[layer.axis] = -1
    return layer.scale_w.reshape(shape)


def weight_codes(layer: QuantizedLayer, weight: np.ndarray) -> np.ndarray:
    """The INT8 weight codes ``clamp(round_away(w / s_w[c]), -128, 127)`` (int8, ``weight``'s shape)."""
    return arq_quantize(np.asarray(weight, np.float32), layer.scale_w, layer.axis).numpy()


def all_weight_codes(weights: Mapping[str, Sequence[np.ndarray]], groups: Sequence[QuantGroup]) -> Codes:
    """The INT8 weight codes of every quantized layer with weights, by layer name: computed once and handed
    to both caffemodel builders (they are the costly part of a save)."""
    return {layer.name: weight_codes(layer, weights[layer.name][0])
            for group in groups for layer in group.layers if layer.has_weights}


def fake_quant_weight(layer: QuantizedLayer, codes: np.ndarray) -> np.ndarray:
    """``w_hat = codes * s_w[c]`` as float32 (each product rounded once, as ARQ's fake quantization)."""
    return codes.astype(np.float32) * scale_w_along_axis(layer, codes.ndim)


# -- the prototxt ------------------------------------------------------------------------------------------
def quant_layer(group: QuantGroup) -> caffe_pb2.LayerParameter:
    """The group's ``Quant`` layer: ``scale = 1/s_d`` (float32 division, correctly rounded), ``offset`` the
    byte of ``o_d``."""
    layer = caffe_pb2.LayerParameter(name=group.name, type="Quant")
    layer.bottom.append(group.bottom)
    layer.top.append(group.name)
    p = layer.quant_param
    p.scale = float(np.float32(1.0) / np.float32(group.scale_d))
    p.offset = bytes([int(group.offset_d) & 0xFF])
    p.with_offset = group.with_offset
    p.object_layer = group.object_layer
    return layer


def dequant_layer(layer: QuantizedLayer, top: str) -> caffe_pb2.LayerParameter:
    """The ``DeQuant`` after ``layer``, writing ``top`` (the layer's original top)."""
    out = caffe_pb2.LayerParameter(name=dequant_layer_name(layer.name), type="DeQuant")
    out.bottom.append(dequant_input_name(layer.name))
    out.top.append(top)
    p = out.dequant_param
    p.channel_wise = layer.channel_wise
    p.layer_type = layer.layer_type
    p.object_layer = layer.name
    return out


def _check_names(graph: Graph, groups: Sequence[QuantGroup]) -> None:
    """The inserted names must be free: no layer, blob or param of the net may use them."""
    used = {layer.name for layer in graph}
    used |= {b for layer in graph for b in list(layer.bottom) + list(layer.top)}
    new: list[str] = []
    for group in groups:
        new.append(group.name)
        for layer in group.layers:
            new += [dequant_layer_name(layer.name), dequant_input_name(layer.name)]
    for name in new:
        if name in used or new.count(name) > 1:
            raise ModelFormatError(
                f"Model '{graph.label}' already uses the name '{name}', which the inserted "
                "Quant/DeQuant layers need; rename that layer or blob in the retrain model."
            )


def insert_quant_layers(graph: Graph, groups: Sequence[QuantGroup]) -> None:
    """Insert the ``Quant``/``DeQuant`` layers of ``groups`` into ``graph`` (module docstring).

    Every layer of a group must read the group's bottom as its only bottom and write one other top.

    Raises:
        ModelFormatError: an inserted name is taken, or a quantized layer is not a one-input layer.
    """
    _check_names(graph, groups)
    for group in groups:
        for layer in group.layers:
            lp = graph.layer(layer.name)
            if list(lp.bottom) != [group.bottom] or len(lp.top) != 1 or lp.top[0] == group.bottom:
                raise ModelFormatError(
                    f"Layer '{layer.name}' of '{graph.label}' must read '{group.bottom}' as "
                    "its only bottom and write one other top to be quantized."
                )
        graph.insert_before(group.layers[0].name, quant_layer(group))
        for layer in group.layers:
            graph.replace_bottom(layer.name, group.bottom, group.name)
            top = graph.layer(layer.name).top[0]
            graph.rename_top(layer.name, top, dequant_input_name(layer.name), update_readers=False)
            graph.insert_after(layer.name, dequant_layer(layer, top))
