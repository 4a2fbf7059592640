"""The inference view of a saved net and the prototxt ATC converts as it is (docs/decisions.md row 19).

Two rewrites of a saved (fake-quant or deploy) net, neither of which changes a weight:

* :func:`inference_net` -- what a deploy model needs to take an image: the TEST-phase view with every data
  layer replaced by an ``Input`` layer of the same name holding the shapes of the tops still read, the
  loss, accuracy and sink layers removed together with the layers that only prepare their other inputs
  (a label's ``Reshape``; the prediction a loss reads stays, as the net's output), and ``Dropout`` removed
  (an identity at inference). The fake-quant model is written so; it keeps Caffe's type strings, so any
  Caffe runs it.
* :func:`atc_net` -- on top of that, the type strings ATC's Caffe parser asks for: ``DetectionOutput`` ->
  ``SSDDetectionOutput``, the depthwise forks -> the ``Convolution`` they compute
  (``passes.depthwise.as_grouped_convolution``), YOLO's ``Region`` and
  ``Detection`` -> ``Yolo``. A layer type outside ATC's Caffe operator list is refused with
  :class:`AtcUnsupportedLayerError` naming every such layer: ATC rejects an unknown type anyway, so a file
  it would refuse is never written as "ATC-ready".

The passes take the input shapes as arguments; finding them (the engine's data layers, the data layers'
parameters, the record, the user) is the workflow's job (``workflows.inference``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from amct_caffe.errors import ConfigError, UnsupportedLayerError
from amct_caffe.model.graph import Graph, producer_index, value_readers
from amct_caffe.model.layer_types import FAKE_QUANT_TYPES
from amct_caffe.model.phase import TEST, filter_net
from amct_caffe.passes.depthwise import as_grouped_convolution
from amct_caffe.proto import caffe_pb2

__all__ = [
    "ATC_LAYER_TYPES", "AtcUnsupportedLayerError", "DATA_LAYER_TYPES", "DATA_SOURCE_TYPES", "InferenceNet",
    "atc_caffemodel_types", "atc_net", "atc_type", "data_tops", "inference_net", "is_training_only",
]

#: Layer types that feed a net from files, memory or fillers (and ``Input``): replaced by ``Input`` layers.
DATA_LAYER_TYPES = frozenset({"Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData",
                              "AnnotatedData", "VideoData", "Input"})
#: The data layers proper: they read data from files, memory or fillers (``Input`` only holds what is fed).
DATA_SOURCE_TYPES = DATA_LAYER_TYPES - {"Input"}
#: Layers that only consume (a loss, a metric, a sink): removed from the inference view.
_TRAINING_ONLY_TYPES = frozenset({"Accuracy", "Silence", "HDF5Output", "ConfusionMatrix"})
#: Layers that are the identity at inference: removed, their readers read their input.
_IDENTITY_AT_INFERENCE = frozenset({"Dropout"})

#: ATC's Caffe operator list (the BVLC layers it converts, its extension layers, AMCT's deploy layers).
ATC_LAYER_TYPES = frozenset({
    # BVLC layers
    "AbsVal", "ArgMax", "BatchNorm", "Bias", "BNLL", "Clip", "Concat", "Convolution", "Crop", "Deconvolution",
    "Eltwise", "ELU", "Exp", "Flatten", "InnerProduct", "Input", "Log", "LRN", "LSTM", "MVN", "Pooling",
    "Power", "PReLU", "ReLU", "LeakyReLU", "Reduction", "Reshape", "RNN", "Scale", "Sigmoid", "Slice",
    "Softmax", "Split", "SPP", "TanH", "Threshold", "Tile",
    # ATC's extension layers (PassThrough is ATC's name of the darknet Reorg; both spellings are read)
    "Interp", "Normalize", "Permute", "PriorBox", "SSDDetectionOutput", "Proposal", "ROIPooling",
    "PSROIPooling", "ROIAlign", "FSRDetectionOutput", "ShuffleChannel", "PassThrough", "Reorg", "Upsample",
    "Yolo", "YoloV2DetectionOutput", "YoloV3DetectionOutput", "Reverse", "ReLU6", "SpatialTransformer",
    "L2Normalize",
    # AMCT's deploy layers (ATC plugins)
    *FAKE_QUANT_TYPES,
})
#: Type strings ATC reads under another name.
_ATC_RENAMES = {"DetectionOutput": "SSDDetectionOutput", "Region": "Yolo", "Detection": "Yolo"}
#: The depthwise convolution forks ATC reads as a grouped ``Convolution``.
_DEPTHWISE_TYPES = frozenset({"ConvolutionDepthwise", "DepthwiseConvolution", "DepthwiseConv"})


class AtcUnsupportedLayerError(UnsupportedLayerError):
    """A net asked for in ATC-ready form holds layer types ATC's Caffe parser does not convert."""


@dataclass
class InferenceNet:
    """The result of :func:`inference_net` / :func:`atc_net`.

    Attributes:
        net: the rewritten net (no phase rules, no ``state``).
        inputs: ``{Input top: shape}`` in file order.
        removed: the layers removed (loss, accuracy, what only they read, Dropout).
        retyped: ``{layer: (old type, new type)}`` of the layers :func:`atc_net` gave another type.
    """

    net: caffe_pb2.NetParameter
    inputs: dict[str, tuple[int, ...]]
    removed: list[str] = field(default_factory=list)
    retyped: dict[str, tuple[str, str]] = field(default_factory=dict)


def is_training_only(layer: caffe_pb2.LayerParameter) -> bool:
    """True for a loss, an accuracy or a sink layer (nothing at inference reads what it computes)."""
    return layer.type.endswith("Loss") or layer.type in _TRAINING_ONLY_TYPES


def data_tops(net: caffe_pb2.NetParameter) -> list[str]:
    """The tops of the data (and Input) layers of ``net``, in file order."""
    return [top for layer in net.layer if layer.type in DATA_LAYER_TYPES for top in layer.top]


def _removed_layers(layers: Sequence[caffe_pb2.LayerParameter]) -> set[int]:
    """Indices of the training-only layers and of the layers that only serve them: every reader of their
    values is removed and every value they read comes from a data layer (a label) or a removed layer.

    The second condition keeps the net's predictions: ``fc`` read only by a loss is the inference output,
    while a ``Reshape`` of the label read only by that loss goes. A value nobody reads is an output and keeps
    its layer; data layers are handled by the caller.
    """
    removed = {i for i, layer in enumerate(layers) if is_training_only(layer)}
    data = {i for i, layer in enumerate(layers) if layer.type in DATA_LAYER_TYPES}
    changed = True
    while changed:
        changed = False
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            if i in removed or i in data or not layer.top:
                continue
            readers = [j for top in layer.top for j in value_readers(layers, i, top)]
            sources = [producer_index(layers, i, bottom) for bottom in layer.bottom]
            if readers and all(j in removed for j in readers) and \
                    all(src is None or src in data or src in removed for src in sources):
                removed.add(i)
                changed = True
    return removed


def _drop_identity(net: caffe_pb2.NetParameter, removed: list[str], path: str) -> caffe_pb2.NetParameter:
    """Remove the layers that are the identity at inference; their readers read their input
    (``Graph.remove_layer``)."""
    graph = Graph(net, path)
    for layer in list(graph):
        if layer.type in _IDENTITY_AT_INFERENCE and len(layer.bottom) == 1 and len(layer.top) == 1:
            removed.append(layer.name)
            graph.remove_layer(layer.name)
    return graph.to_net_parameter()


def _input_layer(
    layer: caffe_pb2.LayerParameter, tops: Sequence[str], shapes: Mapping[str, Sequence[int]], path: str
) -> caffe_pb2.LayerParameter:
    out = caffe_pb2.LayerParameter(name=layer.name, type="Input")
    own = {top: tuple(shape.dim) for top, shape in zip(layer.top, layer.input_param.shape)} \
        if layer.type == "Input" else {}
    for top in tops:
        shape = shapes.get(top, own.get(top))
        if shape is None:
            raise ConfigError(
                f"Net '{path}': the shape of top '{top}' of {layer.type} layer '{layer.name}' is unknown, so "
                "it cannot become an Input layer. Give the input shape (for_atc input shape, or "
                f"--input-shape '{top}:N,C,H,W' on the command line)."
            )
        out.top.append(top)
        out.input_param.shape.add().dim.extend(int(d) for d in shape)
    return out


def inference_net(
    net: caffe_pb2.NetParameter, input_shapes: Mapping[str, Sequence[int]], path: str = ""
) -> InferenceNet:
    """The inference view of ``net``: data layers -> ``Input`` layers, loss/accuracy (and what only they
    read) and ``Dropout`` removed (module docstring).

    Args:
        net: a saved net (any phase rules; its TEST view is taken).
        input_shapes: ``{data top: shape}`` for every data top an inference layer reads (an ``Input``
            layer's top not listed keeps its own shape).
        path: the file ``net`` came from, for messages.

    Returns:
        The :class:`InferenceNet`.

    Raises:
        ConfigError: a data top that is still read has no shape in ``input_shapes``.
        ModelFormatError: a layer has both include and exclude rules.
    """
    view = filter_net(net, TEST, path=path)
    layers = list(view.layer)
    gone = _removed_layers(layers)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(view)
    out.ClearField("state")
    del out.layer[:]
    removed = [layers[i].name for i in sorted(gone)]
    inputs: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(layers):
        if i in gone:
            continue
        if layer.type in DATA_LAYER_TYPES:
            read = [top for top in layer.top if any(j not in gone for j in value_readers(layers, i, top))]
            if not read:
                removed.append(layer.name)
                continue
            layer = _input_layer(layer, read, input_shapes, path or net.name)
            inputs.update({top: tuple(int(d) for d in shape.dim)
                           for top, shape in zip(layer.top, layer.input_param.shape)})
        kept = out.layer.add()
        kept.CopyFrom(layer)
        del kept.include[:]
        del kept.exclude[:]
    del out.input[:]  # the legacy net-level inputs become Input layers (model.upgrade), never both
    del out.input_shape[:]
    del out.input_dim[:]
    return InferenceNet(_drop_identity(out, removed, path), inputs, removed)


def atc_type(layer_type: str) -> str:
    """The type string ATC reads for ``layer_type`` (the depthwise forks become ``Convolution``)."""
    if layer_type in _DEPTHWISE_TYPES:
        return "Convolution"
    return _ATC_RENAMES.get(layer_type, layer_type)


def atc_net(
    net: caffe_pb2.NetParameter,
    input_shapes: Mapping[str, Sequence[int]],
    weight_shapes: Mapping[str, Sequence[int]] | None = None,
    path: str = "",
) -> InferenceNet:
    """The prototxt ATC converts as it is: :func:`inference_net` plus ATC's type strings (module
    docstring).

    Args:
        net: a saved (deploy) net.
        input_shapes: ``{data top: shape}`` (:func:`inference_net`).
        weight_shapes: ``{layer: shape of its first blob}``; a depthwise layer's channel count is its
            weight's axis 0 (its ``num_output`` when absent).
        path: the file ``net`` came from, for messages.

    Returns:
        The :class:`InferenceNet`, ``retyped`` listing each layer given another type.

    Raises:
        AtcUnsupportedLayerError: layers whose type ATC does not convert (each named with its type).
        ConfigError: see :func:`inference_net`; a depthwise layer without a channel count.
    """
    label = path or net.name
    result = inference_net(net, input_shapes, path)
    for layer in result.net.layer:
        new = atc_type(layer.type)
        if new == layer.type:
            continue
        old = layer.type
        if old in _DEPTHWISE_TYPES:
            shape = (weight_shapes or {}).get(layer.name)
            as_grouped_convolution(layer, int(shape[0]) if shape else None, label)
        else:
            layer.type = new
        result.retyped[layer.name] = (old, new)
    unsupported = [f"'{layer.name}' ({layer.type})" for layer in result.net.layer
                   if layer.type not in ATC_LAYER_TYPES]
    if unsupported:
        proposal = any(layer.type == "Python" and layer.python_param.layer == "ProposalLayer"
                       for layer in result.net.layer)
        hint = (" A py-faster-rcnn proposal layer is written for ATC as a 'Proposal' layer with "
                "proposal_param (feat_stride, pre_nms_topn 6000, post_nms_topn 300, iou_threshold 0.7, "
                "min_size 16 for its TEST settings)." if proposal else "")
        raise AtcUnsupportedLayerError(
            f"Net '{label}': ATC's Caffe parser does not convert layer(s) {', '.join(unsupported)}, so no "
            "ATC-ready prototxt is written. Save without the ATC-ready option (the models are written as "
            "AMCT writes them), or replace these layers with ones ATC converts (docs/design.md, "
            f"\"ATC-ready models\").{hint}"
        )
    return result


def atc_caffemodel_types(caffemodel: caffe_pb2.NetParameter, retyped: Mapping[str, tuple[str, str]]) -> None:
    """Give the caffemodel's layers the type strings :func:`atc_net` gave the prototxt's (blobs unchanged;
    a grouped ``Convolution`` reads the depthwise weight (C, 1, kh, kw) as it is)."""
    for layer in caffemodel.layer:
        if layer.name in retyped:
            layer.type = retyped[layer.name][1]
