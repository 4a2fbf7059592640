"""pycaffe's ``caffe.draw``: a net's graph (layers as boxes, blobs as octagons) through Graphviz.

Needs pydot and the Graphviz ``dot`` program (the optional extra ``amct-caffe[draw]`` installs pydot;
Graphviz comes from the system's packages); without them the functions raise a
:class:`~amct_caffe.errors.RuntimeEngineError` that says what to install.
"""

from __future__ import annotations

import os
from typing import Any

from amct_caffe.errors import RuntimeEngineError
from amct_caffe.model.phase import filter_net
from amct_caffe.proto import caffe_pb2

LAYER_STYLE = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

#: layer types drawn as neurons (element-wise, usually in place)
_NEURON_TYPES = frozenset({"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log",
                           "Threshold", "Dropout", "Scale", "Bias", "BatchNorm"})


def _pydot() -> Any:
    try:
        import pydot  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeEngineError("caffe.draw needs pydot and Graphviz: pip install 'amct-caffe[draw]' and "
                                 "install Graphviz's 'dot' (e.g. apt-get install graphviz).") from None
    return pydot


def get_layer_label(layer: caffe_pb2.LayerParameter, rankdir: str, display_lrm: bool = False) -> str:
    """The text of a layer's node: name, type, and the kernel/stride/pad of convolutions and poolings."""
    separator = " " if rankdir in ("TB", "BT") else "\\n"
    parts = [layer.name, f"({layer.type})"]
    if layer.type in ("Convolution", "Deconvolution"):
        conv = layer.convolution_param
        kernel = conv.kernel_size[0] if len(conv.kernel_size) else 1
        stride = conv.stride[0] if len(conv.stride) else 1
        pad = conv.pad[0] if len(conv.pad) else 0
        parts.append(f"kernel size: {kernel}{separator}stride: {stride}{separator}pad: {pad}")
    elif layer.type == "Pooling":
        pool = layer.pooling_param
        parts.append(f"{caffe_pb2.PoolingParameter.PoolMethod.Name(pool.pool)}{separator}kernel size: "
                     f"{pool.kernel_size}{separator}stride: {pool.stride}{separator}pad: {pool.pad}")
    if display_lrm:
        mults = [f"{p.lr_mult:g}" for p in layer.param]
        if mults:
            parts.append("lr mult: " + ", ".join(mults))
    return f'"{separator.join(parts)}"'


def get_pydot_graph(caffe_net: caffe_pb2.NetParameter, rankdir: str, label_edges: bool = True,
                    phase: int | None = None, display_lrm: bool = False) -> Any:
    """The net as a ``pydot.Dot`` graph; ``phase`` draws only that phase's layers.

    Raises:
        RuntimeEngineError: pydot is not installed.
    """
    pydot = _pydot()
    net = filter_net(caffe_net, phase, 0, [], "") if phase is not None else caffe_net
    graph = pydot.Dot(net.name if net.name else "Net", graph_type="digraph", rankdir=rankdir)
    nodes: dict[str, Any] = {}
    edges = []
    for layer in net.layer:
        node_name = f"{layer.name}_{layer.type}"
        style = NEURON_LAYER_STYLE if layer.type in _NEURON_TYPES else LAYER_STYLE
        nodes[node_name] = pydot.Node(node_name, label=get_layer_label(layer, rankdir, display_lrm), **style)
        for bottom in layer.bottom:
            nodes.setdefault(f"{bottom}_blob", pydot.Node(f"{bottom}_blob", label=bottom, **BLOB_STYLE))
            edges.append((f"{bottom}_blob", node_name, ""))
        for top in layer.top:
            nodes.setdefault(f"{top}_blob", pydot.Node(f"{top}_blob", label=top, **BLOB_STYLE))
            edges.append((node_name, f"{top}_blob", top if label_edges else ""))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=label) if label else
                       pydot.Edge(nodes[src], nodes[dst]))
    return graph


def draw_net(caffe_net: caffe_pb2.NetParameter, rankdir: str, ext: str = "png", phase: int | None = None,
             display_lrm: bool = False) -> bytes:
    """The net's drawing in format ``ext`` (png, svg, pdf, ... as Graphviz writes them)."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    try:
        return bytes(graph.create(format=ext))
    except (OSError, FileNotFoundError) as exc:
        raise RuntimeEngineError(f"caffe.draw: Graphviz's 'dot' failed ({exc}); install Graphviz.") from None


def draw_net_to_file(caffe_net: caffe_pb2.NetParameter, filename: str | os.PathLike[str], rankdir: str = "LR",
                     phase: int | None = None, display_lrm: bool = False) -> None:
    """Write the net's drawing to ``filename``; its extension picks the format."""
    ext = os.path.splitext(str(filename))[1][1:] or "png"
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with open(filename, "wb") as out:
        out.write(data)
