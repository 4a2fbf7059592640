"""Cross-layer range equalization: scale a layer's output channels up and its reader's input weights down
so that every channel of a quantized layer's input fills the one per-tensor activation grid.

AMCT quantizes an activation with one scale and offset for the whole tensor. When the channels of that
tensor have very different ranges (the input of FSRCNN's Deconvolution: 56 channels spanning 1.9 to 9.6),
the narrow channels use a few codes of the grid and their rounding noise is large next to their signal.
A float model does not change when output channel ``c`` of a layer ``P`` is multiplied by ``k_c > 0`` and
the weights that read channel ``c`` in the next layer ``C`` are divided by ``k_c``, as long as what lies
between them is positively homogeneous per channel: ``ReLU`` (any ``negative_slope``), ``PReLU`` (per
channel or shared slope) and MAX ``Pooling``, since ``f(k x) = k f(x)`` for ``k > 0``.

The pattern (:func:`equalization_pairs`): ``C`` is a quantized Convolution (any ``group``; a depthwise
reader's weight row ``c`` reads channel ``c`` alone, so its per-channel weight grid simply follows),
Deconvolution (``group: 1``) or InnerProduct (``axis: 1``, no ``transpose``) with one bottom; the value it
reads comes from ``P`` -- a Convolution (any ``group``), Deconvolution (``group: 1``) or InnerProduct
(``axis: 1``, no ``transpose``) with one bottom and one top and weights in the caffemodel -- through zero or
more ReLU/PReLU/MAX Pooling layers, in place or not, and every value on that path has exactly one reader
(the next layer of the path). So nothing else sees the rescaled channels. A ``P`` quantized with one weight
scale for all its rows is left out (its grown rows would coarsen the grid of the others).

The scales (:func:`equalizing_scales`): from each channel's extremes over the calibration data,
``k_c = min(hi / hi_c, lo / lo_c)`` over the sides the channel has (``hi``, ``lo``: the tensor's extremes),
capped at :data:`MAX_SCALE`. Every channel grows until one of its extremes meets the tensor's, so the
tensor's range -- and with it the quantization step -- is what it was, and each channel's share of the
grid is as large as it can be without clipping. Channels that are always zero keep ``k_c = 1``.

:func:`equalize_weights` applies the scales: ``P``'s weights along its output-channel axis and its bias,
``C``'s weights along its input-channel axis (InnerProduct: the ``channels x spatial`` blocks of its
input). The quantization factors of ``P`` and ``C`` must be computed again afterwards (``P``'s ARQ scales
follow ``k_c`` exactly, ``C``'s do not; ``C``'s input needs a new calibration).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amct_caffe.model.graph import Graph
from amct_caffe.model.weights import Weights
from amct_caffe.proto import caffe_pb2

#: Largest factor a channel is scaled by: a channel whose range is a thousandth of the tensor's carries
#: nothing the grid could resolve, and larger factors would only push its reader's weights toward zero.
MAX_SCALE = 1024.0
#: Layers between ``P`` and ``C`` that commute with a positive scale per channel (and MAX Pooling).
HOMOGENEOUS_TYPES = ("ReLU", "PReLU")
_WEIGHTED_TYPES = ("Convolution", "Deconvolution", "InnerProduct")


@dataclass(frozen=True)
class EqualizationPair:
    """A producer ``P`` whose output channels are scaled and the quantized reader ``C`` that compensates.

    Attributes:
        producer: ``P``'s name.
        consumer: ``C``'s name.
        blob: the blob ``C`` reads (the value after the ReLU/PReLU/MAX Pooling layers, if any).
        channels: the number of channels scaled.
        values: the blobs on the way, each scaled by ``k_c`` per channel: ``P``'s top and the top of every
            ReLU/PReLU/MAX Pooling up to ``blob`` (one name when they run in place).
    """

    producer: str
    consumer: str
    blob: str
    channels: int
    values: tuple[str, ...] = ()


def _homogeneous(layer: caffe_pb2.LayerParameter) -> bool:
    """ReLU, PReLU or MAX Pooling: ``f(k x) = k f(x)`` per channel for ``k > 0``."""
    if layer.type == "Pooling":
        return layer.pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    return layer.type in HOMOGENEOUS_TYPES


def _single_reader(graph: Graph, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter | None:
    readers = graph.consumers(layer.name, 0)
    return readers[0][0] if len(readers) == 1 else None


def _one_in_one_out(layer: caffe_pb2.LayerParameter) -> bool:
    return len(layer.bottom) == 1 and len(layer.top) == 1


def _plain_weighted(layer: caffe_pb2.LayerParameter) -> bool:
    """A Convolution/Deconvolution/InnerProduct whose channels are weight rows or columns one to one."""
    if layer.type == "InnerProduct":
        p = layer.inner_product_param
        return not p.transpose and p.axis == 1
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        return p.group == 1 and p.axis in (1, -3)
    return False


def _reads_channels(layer: caffe_pb2.LayerParameter) -> bool:
    """A layer whose weights for input channel ``c`` can be scaled on their own: the plain ones and a
    grouped Convolution (channel ``c`` is column ``c % (C_in / g)`` of the rows of its group)."""
    if layer.type == "Convolution":
        return layer.convolution_param.axis in (1, -3)
    return _plain_weighted(layer)


def _scalable_outputs(layer: caffe_pb2.LayerParameter) -> bool:
    """A layer whose output channel ``c`` is weight row (column, for Deconvolution) ``c`` and bias ``c``; a
    grouped Convolution's outputs are rows all the same."""
    if layer.type == "Convolution":
        return layer.convolution_param.axis in (1, -3)
    return _plain_weighted(layer)


def _output_axis(layer_type: str) -> int:
    """The output-channel axis of the layer's weight blob."""
    return 1 if layer_type == "Deconvolution" else 0


def _input_axis(layer_type: str) -> int:
    """The input-channel axis of the layer's weight blob."""
    return 0 if layer_type == "Deconvolution" else 1


def _groups(layer: caffe_pb2.LayerParameter) -> int:
    return int(layer.convolution_param.group) if layer.type == "Convolution" else 1


def _channels(layer: caffe_pb2.LayerParameter, weights: Weights) -> int | None:
    blobs = weights.get(layer.name)
    if not blobs:
        return None
    return int(blobs[0].shape[_output_axis(layer.type)])


def _pair_of(graph: Graph, consumer: caffe_pb2.LayerParameter, weights: Weights) -> EqualizationPair | None:
    """The pair ending at ``consumer``, or None when the path to its producer does not fit the pattern."""
    if not (_one_in_one_out(consumer) and _reads_channels(consumer) and weights.get(consumer.name)):
        return None
    reader, node = consumer, graph.producer(consumer.name, 0)
    tops: list[str] = []
    while node is not None and _homogeneous(node):
        if not _one_in_one_out(node) or _single_reader(graph, node) is not reader:
            return None
        tops.append(node.top[0])
        reader, node = node, graph.producer(node.name, 0)
    if node is None or not (_one_in_one_out(node) and _scalable_outputs(node)):
        return None
    if _single_reader(graph, node) is not reader:
        return None
    channels = _channels(node, weights)
    if channels is None or channels < 2:
        return None
    inputs = weights[consumer.name][0].shape[_input_axis(consumer.type)] * _groups(consumer)
    if consumer.type != "InnerProduct" and inputs != channels:
        return None
    if consumer.type == "InnerProduct" and inputs % channels:
        return None
    values = tuple(dict.fromkeys([node.top[0], *reversed(tops)]))
    return EqualizationPair(node.name, consumer.name, consumer.bottom[0], channels, values)


def equalization_pairs(
    graph: Graph, weights: Weights, quantized: Collection[str], per_tensor: Collection[str] = ()
) -> list[EqualizationPair]:
    """Every producer/quantized-reader pair of ``graph`` that equalization may rescale (module docstring), in
    file order of the readers. ``quantized``: the names of the quantized layers; ``per_tensor``: those whose
    weights are quantized with one scale. Such a layer is never a producer: its grown rows would widen the
    one weight grid of all its rows."""
    pairs = []
    for layer in graph:
        if layer.name in quantized:
            pair = _pair_of(graph, layer, weights)
            if pair is not None and pair.producer not in per_tensor:
                pairs.append(pair)
    return pairs


def equalizing_scales(low: np.ndarray, high: np.ndarray, max_scale: float = MAX_SCALE) -> np.ndarray:
    """The factor ``k_c >= 1`` of each channel from its extremes ``low[c] <= high[c]`` over the calibration
    data (module docstring), float64."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    top, bottom = max(float(high.max()), 0.0), min(float(low.min()), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(high > 0.0, top / high, np.inf)
        down = np.where(low < 0.0, bottom / low, np.inf)
    scales = np.minimum(up, down)
    return np.minimum(np.where(np.isfinite(scales), scales, 1.0), max_scale)


def _along(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def _scaled_input(layer: caffe_pb2.LayerParameter, weight: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``weight`` with the columns that read channel ``c`` multiplied by ``inverse[c]``."""
    if layer.type == "InnerProduct":  # [out, channels * spatial]: each channel is a block of columns
        blocks = weight.reshape(weight.shape[0], inverse.size, -1)
        return (blocks * inverse.reshape(1, -1, 1)).reshape(weight.shape)
    groups = _groups(layer)
    if groups > 1:  # [out, in / g, kh, kw]: row o of group o // (out / g) reads channels of that group
        per_group = weight.shape[1]
        group_of_row = np.arange(weight.shape[0]) // (weight.shape[0] // groups)
        columns = inverse.reshape(groups, per_group)[group_of_row]
        return weight * columns.reshape(weight.shape[0], per_group, *([1] * (weight.ndim - 2)))
    return weight * _along(inverse, weight.ndim, _input_axis(layer.type))


def equalize_weights(
    graph: Graph, weights: Weights, pairs: Sequence[EqualizationPair], scales: Mapping[str, np.ndarray]
) -> Weights:
    """A copy of ``weights`` with every pair rescaled by ``scales[pair.consumer]`` (float64 math, float32
    blobs); the other layers' arrays are shared with ``weights``."""
    out: Weights = dict(weights)
    for pair in pairs:
        k = np.asarray(scales[pair.consumer], np.float64)
        producer, consumer = graph.layer(pair.producer), graph.layer(pair.consumer)
        blobs = [np.asarray(b, np.float64) for b in out[pair.producer]]
        blobs[0] = blobs[0] * _along(k, blobs[0].ndim, _output_axis(producer.type))
        if len(blobs) > 1:
            blobs[1] = blobs[1] * k.reshape(blobs[1].shape)
        out[pair.producer] = [b.astype(np.float32) for b in blobs]
        reader = [np.asarray(b) for b in out[pair.consumer]]
        reader[0] = _scaled_input(consumer, reader[0].astype(np.float64), 1.0 / k).astype(np.float32)
        out[pair.consumer] = reader
    return out
