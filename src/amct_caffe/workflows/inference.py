"""The inference (fake-quant) and ATC-ready (deploy) prototxts of the save functions' ``for_atc`` option
(``passes.atc``; docs/decisions.md row 19, docs/design.md "ATC-ready models").

The shapes of the ``Input`` layers that replace the data layers come from, in this order:

1. the shapes the user gives (``input_shape``: ``{top: shape}``);
2. an ``Input`` layer's own shape (kept as written);
3. the data layers built alone in the engine at batch 1 (a ``DummyData``/``MemoryData`` layer's parameters,
   an ``ImageData``/``Data`` layer's files and ``transform_param``);
4. the record: a quantized layer reading the data top directly has its input (channels, height, width)
   recorded; the batch is 1.

A data top still read at inference with no shape from any of them is a :class:`ConfigError` asking for the
shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from amct_caffe.engine.shapes import batch_one, shape_net
from amct_caffe.errors import ConfigError, RecordError
from amct_caffe.log import get_logger
from amct_caffe.model.phase import TEST, filter_net
from amct_caffe.model.weights import Weights
from amct_caffe.passes.atc import DATA_LAYER_TYPES, InferenceNet, atc_caffemodel_types, atc_net, inference_net
from amct_caffe.passes.quant_insert import QuantGroup
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.record import read_records

LOGGER = get_logger("inference")

#: ``{top: shape}`` as the API takes it.
InputShapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class AtcRequest:
    """What ``for_atc`` asks of a save function: the user's input shapes (may be empty) and the
    ``{blob: (channels, height, width)}`` the record knows for blobs quantized layers read."""

    input_shape: Mapping[str, tuple[int, ...]]
    recorded: Mapping[str, tuple[int, int, int]]


def check_input_shape(input_shape: object, api: str) -> dict[str, tuple[int, ...]]:
    """``input_shape`` as ``{top: shape}`` of positive integers (None: empty).

    Raises:
        ConfigError: not a mapping of names to sequences of positive integers.
    """
    if input_shape is None:
        return {}
    if not isinstance(input_shape, Mapping):
        raise ConfigError(f"{api}: input_shape must be a dict {{input blob: shape}}, e.g. "
                          f"{{'data': (1, 3, 224, 224)}}, got {input_shape!r}.")
    out = {}
    for name, shape in input_shape.items():
        dims = tuple(shape) if isinstance(shape, Sequence) and not isinstance(shape, str) else None
        if not isinstance(name, str) or not dims or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise ConfigError(f"{api}: input_shape entry {name!r}: {shape!r} is not a shape (positive "
                              "integers, e.g. (1, 3, 224, 224)).")
        out[name] = tuple(int(d) for d in dims)
    return out


def atc_request(
    for_atc: object, input_shape: object, api: str,
    recorded: Mapping[str, tuple[int, int, int]] | None = None,
) -> AtcRequest | None:
    """The checked ``for_atc``/``input_shape`` arguments of a save function (None: ``for_atc`` False).

    Raises:
        ConfigError: ``for_atc`` is not a bool; a bad ``input_shape``; ``input_shape`` without ``for_atc``.
    """
    if not isinstance(for_atc, bool):
        raise ConfigError(f"{api}: for_atc must be True or False, got {for_atc!r}.")
    shapes = check_input_shape(input_shape, api)
    if not for_atc:
        if shapes:
            raise ConfigError(f"{api}: input_shape is used only with for_atc=True (the shapes of the Input "
                              "layers of the ATC-ready models); add for_atc=True or leave input_shape out.")
        return None
    return AtcRequest(shapes, dict(recorded or {}))


def recorded_by_blob(
    groups: Sequence[QuantGroup], shapes: Mapping[str, tuple[int, int, int] | None]
) -> dict[str, tuple[int, int, int]]:
    """``{blob a Quant reads: (channels, height, width)}`` from the record's per-layer shapes."""
    out = {}
    for group in groups:
        for layer in group.layers:
            chw = shapes.get(layer.name)
            if chw is not None:
                out[group.bottom] = chw
    return out


def record_shapes(record_file: str) -> dict[str, tuple[int, int, int] | None]:
    """``{layer: (channels, height, width) or None}`` of a record file (empty when it cannot be read)."""
    try:
        return {name: rec.shape for name, rec in read_records(record_file, validate=False).items()}
    except (RecordError, OSError) as exc:
        LOGGER.debug("Record '%s' gives no input shapes: %s", record_file, exc)
        return {}


def _engine_shapes(view: caffe_pb2.NetParameter) -> dict[str, tuple[int, ...]]:
    """The top shapes of the data layers of ``view`` built alone in the engine at batch 1 (empty when they
    cannot be built, e.g. their files are absent)."""
    only_data = caffe_pb2.NetParameter()
    only_data.CopyFrom(view)
    del only_data.layer[:]
    only_data.layer.extend(layer for layer in view.layer if layer.type in DATA_LAYER_TYPES)
    if not only_data.layer:
        return {}
    engine, problem = shape_net(batch_one(only_data), TEST)
    if engine is None:
        LOGGER.debug("The data layers cannot be built in the engine for their shapes: %s", problem)
        return {}
    return {top: tuple(int(d) for d in engine.tensor(top).shape)
            for layer in only_data.layer for top in layer.top}


def input_shapes(net: caffe_pb2.NetParameter, request: AtcRequest) -> dict[str, tuple[int, ...]]:
    """``{data top: shape}`` for the data tops of ``net`` (module docstring for the order of sources); tops
    without any source are left out (the pass names them if they are still read)."""
    view = filter_net(net, TEST)
    tops = [top for layer in view.layer if layer.type in DATA_LAYER_TYPES for top in layer.top]
    shapes: dict[str, tuple[int, ...]] = {t: tuple(request.input_shape[t]) for t in tops
                                          if t in request.input_shape}
    unknown_given = sorted(set(request.input_shape) - set(tops))
    if unknown_given:
        raise ConfigError(f"input_shape names {unknown_given}, which no data or Input layer of the net "
                          f"writes (its data tops: {tops}).")
    for layer in view.layer:
        if layer.type == "Input":
            for top, shape in zip(layer.top, layer.input_param.shape):
                shapes.setdefault(top, tuple(int(d) for d in shape.dim))
    if any(t not in shapes for t in tops):
        for top, shape in _engine_shapes(view).items():
            shapes.setdefault(top, shape)
    for top in tops:
        chw = request.recorded.get(top)
        if top not in shapes and chw is not None:
            shapes[top] = (1, *chw)
    return shapes


@dataclass(frozen=True)
class InferenceModels:
    """The prototxts ``for_atc`` writes: the fake-quant model's inference view and the deploy model's
    ATC-ready view (None when that model is not saved), and the layers the ATC view gave another type."""

    fake: caffe_pb2.NetParameter | None
    deploy: InferenceNet | None

    def retype_deploy_weights(self, caffemodel: caffe_pb2.NetParameter) -> None:
        """Give the deploy caffemodel's layers the ATC view's type strings."""
        if self.deploy is not None:
            atc_caffemodel_types(caffemodel, self.deploy.retyped)


def inference_models(
    saved: caffe_pb2.NetParameter, weights: Weights, request: AtcRequest, path: str, *, fake: bool,
    deploy: bool,
) -> InferenceModels:
    """The inference view of the saved net (for the fake-quant model) and its ATC-ready view (for the deploy
    model), as ``fake``/``deploy`` ask.

    Raises:
        AtcUnsupportedLayerError: a layer ATC does not convert (only when ``deploy``).
        ConfigError: an input shape is missing.
    """
    shapes = input_shapes(saved, request)
    fake_net = inference_net(saved, shapes, path).net if fake else None
    atc = None
    if deploy:
        atc = atc_net(saved, shapes, {name: blobs[0].shape for name, blobs in weights.items() if blobs}, path)
        for layer, (old, new) in atc.retyped.items():
            LOGGER.info("ATC-ready deploy model: layer '%s' is written as type %s (was %s).", layer, new, old)
        for layer in atc.net.layer:
            if layer.type == "Upsample":
                LOGGER.warning(
                    "ATC-ready deploy model: layer '%s' is an Upsample; ATC reads upsample_param.stride as "
                    "the size factor and scale as a value multiplier, which is not what every Caffe fork "
                    "means by them. Check its parameters before converting.", layer.name)
    shown = fake_net if fake_net is not None else (atc.net if atc is not None else None)
    if shown is not None:
        inputs = ", ".join(f"{top} {list(shape)}" for top, shape in shapes.items()
                           if any(top in layer.top and layer.type == "Input" for layer in shown.layer))
        LOGGER.info("Inference prototxt(s) of '%s': Input layer(s) %s.", path, inputs or "none")
    return InferenceModels(fake_net, atc)
