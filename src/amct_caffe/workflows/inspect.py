"""What ``amct-caffe inspect`` shows about a net: per layer its blobs' shapes, a parameter summary and whether
QAT can quantize it (and why not). The command line only prints the rows this module returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from amct_caffe.engine.net import Net
from amct_caffe.errors import ConfigError
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import load_prototxt
from amct_caffe.model.layer_types import AMCT_LAYER_TYPES, DEPTHWISE_CONVOLUTION_TYPES
from amct_caffe.model.phase import filter_net
from amct_caffe.passes.depthwise import depthwise_as_convolution
from amct_caffe.passes.quantizable import check_not_quantized, unsupported_reason
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.config import QAT_LAYER_TYPES


@dataclass(frozen=True)
class BlobInfo:
    """A bottom or top of a layer; ``shape`` is None when the net was not built."""

    name: str
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class LayerInfo:
    """One layer of the inspected net.

    ``qat`` is ``"yes"``, ``"no"``, ``"no: <reason>"`` or, in a model that already holds AMCT layers,
    ``"AMCT layer"``/``"-"``.
    """

    name: str
    type: str
    bottoms: tuple[BlobInfo, ...]
    tops: tuple[BlobInfo, ...]
    params: str
    learnable: int
    qat: str


@dataclass(frozen=True)
class NetSummary:
    """The inspected net: its layers, and what QAT would do with it."""

    name: str
    phase: str
    layers: tuple[LayerInfo, ...]
    shapes_known: bool
    already_quantized: bool
    quantizable: tuple[str, ...] = field(default=())
    #: The layers that read data files (their sources are never opened by inspect, so no shapes are known).
    data_layers: tuple[str, ...] = field(default=())

    @property
    def learnable(self) -> int:
        """Learnable values of every layer (0 when the net was not built)."""
        return sum(layer.learnable for layer in self.layers)


def shape_text(shape: Sequence[int] | None) -> str:
    """``2x3x4`` (``scalar`` for a 0-axis blob)."""
    if shape is None:
        return ""
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _repeated(values: Sequence[int], h: int, w: int, has_hw: bool, default: int) -> str:
    """A convolution's kernel/stride/pad as Caffe resolves it: ``h x w`` when given, else the repeated
    field."""
    if has_hw:
        return f"{h}x{w}"
    return "x".join(str(v) for v in (list(values) or [default]))


def _conv_summary(p: caffe_pb2.ConvolutionParameter) -> list[str]:
    parts = [f"out {p.num_output}",
             "k " + _repeated(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"), 0)]
    stride = _repeated(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"), 1)
    pad = _repeated(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h"), 0)
    if stride != "1":
        parts.append(f"s {stride}")
    if pad != "0":
        parts.append(f"p {pad}")
    if p.group != 1:
        parts.append(f"g {p.group}")
    if any(d != 1 for d in p.dilation):
        parts.append("d " + "x".join(str(d) for d in p.dilation))
    return parts


def _pool_summary(p: caffe_pb2.PoolingParameter) -> list[str]:
    method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
    if p.global_pooling:
        return [f"{method} global"]
    k = f"{p.kernel_h}x{p.kernel_w}" if p.HasField("kernel_h") else str(p.kernel_size)
    s = f"{p.stride_h}x{p.stride_w}" if p.HasField("stride_h") else str(p.stride)
    return [f"{method} k {k} s {s}" + (f" p {p.pad}" if p.pad else "")]


def param_summary(lp: caffe_pb2.LayerParameter, blobs: Sequence[torch.Tensor]) -> str:
    """A short summary of a layer's main parameters and of its learnable blobs (``-`` when there is none)."""
    parts: list[str] = []
    if lp.type in ("Convolution", "Deconvolution", *DEPTHWISE_CONVOLUTION_TYPES):
        parts += _conv_summary(lp.convolution_param)
    elif lp.type == "InnerProduct":
        parts.append(f"out {lp.inner_product_param.num_output}")
    elif lp.type == "Pooling":
        parts += _pool_summary(lp.pooling_param)
    if blobs:
        count = sum(int(b.numel()) for b in blobs)
        parts.append(", ".join(shape_text(tuple(b.shape)) for b in blobs) + f" ({count:,})")
    return "; ".join(parts) if parts else "-"


def _qat_status(graph: Graph, lp: caffe_pb2.LayerParameter, already_quantized: bool) -> str:
    if already_quantized:
        return "AMCT layer" if lp.type in AMCT_LAYER_TYPES else "-"
    if lp.type not in QAT_LAYER_TYPES:
        return "no"
    reason = unsupported_reason(graph, lp.name)
    return "yes" if reason is None else f"no: {reason}"


#: The QAT status of a layer whose name another layer of the phase has (docs/fork-layers.md).
_REPEATED = "no: another layer has this name (rename one to quantize)"


def _quantization_graph(view: caffe_pb2.NetParameter, model_file: str) -> tuple[Graph, set[str]]:
    """The graph the quantization flows would see (depthwise convolutions as Convolution with group), with
    repeated layer names made unique, and the names that repeat."""
    work = caffe_pb2.NetParameter()
    work.CopyFrom(view)
    try:
        depthwise_as_convolution(work, model_file)
    except ConfigError:
        work.CopyFrom(view)  # the flows would refuse it; show it as the engine runs it
    counts: dict[str, int] = {}
    for layer in work.layer:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    repeated = {name for name, count in counts.items() if count > 1}
    for index, layer in enumerate(work.layer):
        if layer.name in repeated:
            layer.name = f"{layer.name}#{index}"
    return Graph(work, path=model_file), repeated


def inspect_net(model_file: str, phase: int = caffe_pb2.TEST, build: bool = True) -> NetSummary:
    """Describe the net of ``model_file`` in ``phase``.

    Args:
        model_file: the .prototxt.
        phase: ``caffe_pb2.TEST`` or ``caffe_pb2.TRAIN`` (the layers of that phase view).
        build: build the net in the engine (its shape pass at the prototxt's batch size) to report blob
            shapes and learnable values; False for nets whose data files are absent. A net with layers that
            read data files (Data, ImageData, HDF5Data, WindowData, a ``mean_file``) is never built: inspect
            opens no data (``NetSummary.data_layers`` names those layers).

    Returns:
        A :class:`NetSummary` with one :class:`LayerInfo` per layer in file order.

    Raises:
        ModelFormatError, UnsupportedLayerError: the prototxt cannot be read or the net cannot be built.
    """
    view = filter_net(load_prototxt(model_file), phase, path=model_file)
    graph, repeated = _quantization_graph(view, model_file)
    try:
        check_not_quantized(graph)
        already = False
    except ConfigError:
        already = True
    data_layers = tuple(lp.name for lp in view.layer if reads_data_files(lp))
    engine = Net(model_file, phase) if build and not data_layers else None

    def blobs(names: Sequence[str]) -> tuple[BlobInfo, ...]:
        if engine is None:
            return tuple(BlobInfo(n, None) for n in names)
        return tuple(BlobInfo(n, tuple(engine.tensor(n).shape)) for n in names)

    layers = []
    for i, lp in enumerate(view.layer):
        weights = engine.engine_layers[i].blobs if engine is not None else []
        layers.append(LayerInfo(
            lp.name, lp.type, blobs(lp.bottom), blobs(lp.top), param_summary(lp, weights),
            sum(int(b.numel()) for b in weights),
            _REPEATED if lp.name in repeated else _qat_status(graph, graph.layers[i], already),
        ))
    return NetSummary(
        name=view.name,
        phase="TRAIN" if phase == caffe_pb2.TRAIN else "TEST",
        layers=tuple(layers),
        shapes_known=engine is not None,
        already_quantized=already,
        quantizable=tuple(layer.name for layer in layers if layer.qat == "yes"),
        data_layers=data_layers,
    )


#: Layer types whose parameters name data files to read.
DATA_FILE_TYPES = frozenset({"Data", "ImageData", "HDF5Data", "WindowData"})


def reads_data_files(layer: caffe_pb2.LayerParameter) -> bool:
    """True for a layer that opens data files when it is built: a data-source type, or a mean file."""
    return layer.type in DATA_FILE_TYPES or bool(layer.transform_param.mean_file)
