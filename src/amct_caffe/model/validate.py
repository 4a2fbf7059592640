"""Caffe's own checks of a net's wiring and of its weights' blob counts, in one place.

The engine runs them when it builds a net, and the QAT and PTQ flows run them on the model they read and on
the model they write, so a flow never writes a model its own engine (or Caffe) would refuse. The rules are
those of Caffe's ``Net::Init`` on one phase's view of the net:

* layer names are unique;
* every bottom is a blob an earlier layer produced (layers run in file order, so a net cannot have a
  cycle: a layer that reads a blob produced later is refused);
* a top is produced once, except in place: top ``j`` of a layer may repeat a blob name only when it is the
  layer's bottom ``j`` (Caffe: "Top blob 'x' produced by multiple sources").

And Caffe's ``CopyTrainedLayersFrom``: a caffemodel layer with blobs has as many as the net's layer of the
same name (for the types whose blob count the prototxt fixes).
"""

from __future__ import annotations

from collections.abc import Sequence

from amct_caffe.errors import ModelFormatError, WeightShapeError
from amct_caffe.model.phase import TEST, TRAIN, filter_net
from amct_caffe.proto import caffe_pb2


def check_layers(layers: Sequence[caffe_pb2.LayerParameter], label: str, phase: str = "") -> None:
    """Caffe's wiring checks on one phase's layer list (every layer named).

    Args:
        layers: the layers in file order, already filtered to one phase.
        label: the net's file (or name) for messages.
        phase: the phase's name for messages (empty: not said).

    Raises:
        ModelFormatError: a bottom no earlier layer produces, or a top produced by two layers not in
            place; the message names the file and the layer.
    """
    where = f"'{label}'" + (f" (phase {phase})" if phase else "")
    producer: dict[str, str] = {}
    # Two layers of one name are allowed, as Caffe runs such nets; the quantization flows, whose configs and
    # records key on names, refuse them when they build their graph (DuplicateLayerNameError).
    for layer in layers:
        for i, bottom in enumerate(layer.bottom):
            if bottom not in producer:
                raise ModelFormatError(
                    f"Layer '{layer.name}' in {where} reads bottom {i} '{bottom}', which no earlier layer "
                    "produces; check the layer order and blob names (layers run in file order, so a net "
                    "cannot read a blob that a later layer produces)."
                )
        for j, top in enumerate(layer.top):
            in_place = j < len(layer.bottom) and layer.bottom[j] == top
            if top in producer and not in_place:
                raise ModelFormatError(
                    f"Layer '{layer.name}' in {where}: top blob '{top}' is produced by multiple sources "
                    f"(layer '{producer[top]}' produces it too), which Caffe refuses; give the top its own "
                    f"name, or make the layer in place (top {j} the same as bottom {j})."
                )
            producer[top] = layer.name


def check_net(net: caffe_pb2.NetParameter, path: str = "", phases: Sequence[int] = (TRAIN, TEST)) -> None:
    """:func:`check_layers` on the views of ``net`` in ``phases`` (default: TRAIN and TEST; a flow that reads
    one phase checks that one), unnamed layers named as Caffe names them.

    Raises:
        ModelFormatError: as :func:`check_layers`.
    """
    label = path or net.name
    for phase in phases:
        view = filter_net(net, phase, path=path)
        named = []
        for index, layer in enumerate(view.layer):
            if not layer.name:
                layer.name = f"{layer.type}_{index}"
            named.append(layer)
        check_layers(named, label, caffe_pb2.Phase.Name(phase))


def expected_blob_count(layer: caffe_pb2.LayerParameter) -> int | None:
    """How many blobs Caffe gives a layer of this type and parameters; None when the type does not fix it."""
    kind = layer.type
    if kind in ("Convolution", "Deconvolution"):
        return 1 + int(layer.convolution_param.bias_term)
    if kind == "InnerProduct":
        return 1 + int(layer.inner_product_param.bias_term)
    if kind == "Embed":
        return 1 + int(layer.embed_param.bias_term)
    if kind == "Scale":
        return 1 + int(layer.scale_param.bias_term)
    if kind == "BatchNorm":
        return 3
    if kind in ("Bias", "PReLU"):
        return 1
    return None


def check_weights(net: caffe_pb2.NetParameter, caffemodel: caffe_pb2.NetParameter, weights_file: str) -> None:
    """Every caffemodel layer with blobs has as many as the net's layer of the same name (for the types
    :func:`expected_blob_count` knows), as Caffe's ``CopyTrainedLayersFrom`` requires.

    Raises:
        WeightShapeError: a layer's blob count differs; the message names the file and the layer.
    """
    by_name = {layer.name: layer for layer in net.layer}
    for source in caffemodel.layer:
        target = by_name.get(source.name)
        if target is None or not source.blobs:
            continue
        want = expected_blob_count(target)
        if want is not None and len(source.blobs) != want:
            raise WeightShapeError(
                f"Layer '{source.name}': the caffemodel '{weights_file}' holds {len(source.blobs)} blob(s) "
                f"but the net's layer (type {target.type}) has {want}; the prototxt and the caffemodel do "
                "not belong together (check bias_term and the layer type)."
            )
