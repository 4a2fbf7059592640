"""Which layers QAT can quantize, why the others cannot, and AMCT's default ``fixed_min`` per layer.

Works on the prototxt alone (no weights): filter ranks come from the convolution parameters. Pass the
TEST-phase view of the net (``model.phase.filter_net(net, TEST)``), which is what AMCT's config lists.

The rules are AMCT's table for QAT on Caffe (docs/amct-reference.md §2.1):

======================  ===========================================================
``InnerProduct``        ``transpose: false`` and ``axis: 1``
``Convolution``         4-D filter (two spatial axes)
``Deconvolution``       4-D filter, ``group: 1``, every ``dilation`` 1
``Pooling``             ``pool: AVE`` and not ``global_pooling``
======================  ===========================================================

plus one of ours: the layer reads exactly one bottom (Caffe lets a Convolution/InnerProduct apply its weights
to several bottoms; AMCT's retrain layers sit on one input).
"""

from __future__ import annotations

from amct_caffe.errors import ConfigError
from amct_caffe.model.graph import Graph
from amct_caffe.model.layer_types import AMCT_LAYER_TYPES
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.config import QAT_LAYER_TYPES, ModelLayer

#: Layers that keep a non-negative input non-negative and that ``default_fixed_min`` looks through:
#: Dropout is the identity in TEST and scales by 1/(1 - ratio) > 0 in TRAIN (e.g. AlexNet's
#: fc6 -> relu6 -> drop6 -> fc7, all in place).
_SIGN_PRESERVING_TYPES = frozenset({"Dropout"})

#: Layers whose output has the rank of their (first) input, for the filter-rank rule.
_RANK_PRESERVING_TYPES = frozenset({
    "Convolution", "Deconvolution", "Pooling", "ReLU", "ReLU6", "PReLU", "ELU", "Clip", "Sigmoid", "TanH",
    "AbsVal", "BNLL", "Power", "Exp", "Log", "Swish", "Threshold", "Dropout", "BatchNorm", "Scale", "Bias",
    "LRN", "MVN", "Eltwise", "Concat", "Slice", "Split",
})
#: Data layers whose tops are N x C x H x W.
_IMAGE_DATA_TYPES = frozenset({"Data", "ImageData", "WindowData", "MemoryData", "AnnotatedData"})


def check_not_quantized(graph: Graph) -> None:
    """Raise ConfigError if the net already holds AMCT layers (it was quantized or prepared for it)."""
    for layer in graph:
        if layer.type in AMCT_LAYER_TYPES:
            raise ConfigError(
                f"Model '{graph.label}' is already quantized: layer '{layer.name}' has "
                f"the AMCT type {layer.type}. Give the original float model (no "
                f"{'/'.join(AMCT_LAYER_TYPES)} layers)."
            )


def unsupported_reason(graph: Graph, layer_name: str) -> str | None:
    """Why QAT cannot quantize layer ``layer_name``, as a short phrase; None when it can."""
    layer = graph.layer(layer_name)
    kind = layer.type
    if kind not in QAT_LAYER_TYPES:
        return (f"type {kind} is not quantized by QAT (it quantizes Convolution, Deconvolution, "
                "InnerProduct, AVE Pooling)")
    if len(layer.bottom) != 1:
        return f"{kind} with {len(layer.bottom)} bottoms is not supported (QAT needs exactly one input)"
    if kind == "InnerProduct":
        p = layer.inner_product_param
        if p.transpose:
            return "InnerProduct with transpose: true is not supported (needs transpose: false)"
        if p.axis != 1:
            return f"InnerProduct with axis: {p.axis} is not supported (needs axis: 1)"
        return None
    if kind in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        spatial = _spatial_axes(graph, layer)
        if spatial != 2:
            return (f"{kind} with {spatial} spatial axes (a {spatial + 2}-D filter) is not supported "
                    "(needs a 4-D filter)")
        if kind == "Deconvolution":
            if p.group != 1:
                return f"Deconvolution with group: {p.group} is not supported (needs group: 1)"
            if any(d != 1 for d in p.dilation):
                dilation = ", ".join(str(d) for d in p.dilation)
                return f"Deconvolution with dilation {dilation} is not supported (needs dilation 1)"
        return None
    # Pooling
    p = layer.pooling_param
    if p.pool != caffe_pb2.PoolingParameter.AVE:
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        return f"Pooling with pool: {method} is not supported (needs pool: AVE)"
    if p.global_pooling:
        return "global AVE Pooling (global_pooling: true) is not supported"
    return None


def default_fixed_min(graph: Graph, layer_name: str) -> bool:
    """AMCT's default ``fixed_min``: true when the value the layer reads comes from a ReLU.

    The producer is the layer that last wrote the bottom blob before this layer, so an in-place ReLU after a
    convolution (``conv -> bn -> scale -> relu``, all writing ``conv``) counts, while a reader placed before
    the in-place ReLU does not. Besides ``ReLU`` with ``negative_slope: 0`` we count the other activations
    whose output is never negative: ``ReLU6`` and ``Clip`` with ``min >= 0``. Dropout between the activation
    and the layer is looked through (see ``_SIGN_PRESERVING_TYPES``). Anything else (MAX pooling after a
    ReLU, a leaky ReLU, a net input) gives false, as AMCT's "producer is a ReLU" rule does.
    """
    producer = graph.producer(layer_name, 0) if graph.layer(layer_name).bottom else None
    seen = 0
    while producer is not None and producer.type in _SIGN_PRESERVING_TYPES and producer.bottom:
        seen += 1
        if seen > len(graph):
            return False
        producer = graph.producer(producer.name, 0)
    return producer is not None and _non_negative_output(producer)


def describe_layers(graph: Graph) -> list[ModelLayer]:
    """Every layer of ``graph`` with why QAT cannot quantize it (if so) and its default ``fixed_min``.

    Raises:
        ConfigError: the net already holds AMCT layers.
    """
    check_not_quantized(graph)
    layers = []
    for layer in graph:
        reason = unsupported_reason(graph, layer.name)
        fixed_min = default_fixed_min(graph, layer.name) if reason is None else False
        layers.append(ModelLayer(layer.name, layer.type, reason, fixed_min))
    return layers


# -- internals --------------------------------------------------------------------------------------------
def _non_negative_output(layer: caffe_pb2.LayerParameter) -> bool:
    if layer.type == "ReLU":
        return layer.relu_param.negative_slope == 0
    if layer.type == "ReLU6":
        return True
    if layer.type == "Clip":
        # Caffe's Clip outputs max(min, min(x, max)) (and `min` when min > max), never below min.
        return layer.HasField("clip_param") and layer.clip_param.min >= 0
    return False


def _spatial_axes(graph: Graph, layer: caffe_pb2.LayerParameter) -> int:
    """The number of spatial axes of a (de)convolution, i.e. its filter rank minus 2.

    Caffe takes it from the input: ``rank - axis - 1``. ``kernel_h/kernel_w`` mean two; a
    ``kernel_size``/``stride``/``pad``/``dilation`` list of several values has one per spatial axis. With
    single values only, the input rank is traced back to an ``Input`` or image data layer; when that fails,
    two (an image) is assumed.
    """
    p = layer.convolution_param
    if p.HasField("kernel_h") or p.HasField("kernel_w"):
        return 2
    counts = {len(p.kernel_size), len(p.stride), len(p.pad), len(p.dilation)} - {0, 1}
    if counts:
        return max(counts)
    rank = _input_rank(graph, layer.name)
    if rank is None:
        return 2
    axis = p.axis + rank if p.axis < 0 else p.axis
    return rank - axis - 1


def _input_rank(graph: Graph, layer_name: str) -> int | None:
    """The rank of the first bottom of ``layer_name`` when a chain of rank-keeping layers tells it."""
    name = layer_name
    for _ in range(len(graph)):
        if not graph.layer(name).bottom:
            return None
        producer = graph.producer(name, 0)
        if producer is None:
            return None
        if producer.type == "Input":
            bottom = graph.layer(name).bottom[0]
            top_index = list(producer.top).index(bottom)
            shapes = producer.input_param.shape
            if not shapes:
                return None
            shape = shapes[top_index] if top_index < len(shapes) else shapes[0]
            return len(shape.dim)
        if producer.type in _IMAGE_DATA_TYPES:
            return 4
        if producer.type not in _RANK_PRESERVING_TYPES:
            return None
        name = producer.name
    return None
