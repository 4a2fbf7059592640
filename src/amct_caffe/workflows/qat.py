"""The QAT flow of AMCT for Caffe: the retrain config and the retrain model (saving is ``workflows.save``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from amct_caffe.engine.shapes import shape_net
from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import (
    AtomicFiles,
    atomic_write,
    load_caffemodel,
    load_prototxt,
    output_conflict,
    prototxt_text,
)
from amct_caffe.model.phase import TEST, TRAIN, filter_net
from amct_caffe.model.validate import check_net, check_weights
from amct_caffe.model.weights import weights_from_net, weights_to_net
from amct_caffe.passes.atc import DATA_SOURCE_TYPES
from amct_caffe.passes.depthwise import depthwise_as_convolution
from amct_caffe.passes.fuse_bn import fuse_bn
from amct_caffe.passes.quantizable import check_not_quantized, describe_layers
from amct_caffe.passes.retrain import ActivationGroup, insert_retrain_layers
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.config import (
    QAT_LAYER_TYPES,
    ModelLayer,
    default_config,
    dumps_json,
    load_cfg_config,
    load_json_config,
)
from amct_caffe.quant.record import LayerRecord, legacy_chw, record_text

LOGGER = get_logger("qat")


def qat_model_layers(model_file: str) -> list[ModelLayer]:
    """Every layer of the TEST-phase view of ``model_file`` with its QAT quantizability.

    Raises:
        ModelFormatError: the prototxt is missing or malformed.
        ConfigError: the model already holds AMCT layers.
    """
    net = load_prototxt(model_file)
    check_net(net, model_file, phases=(TEST,))
    depthwise_as_convolution(net, model_file)
    graph = Graph(filter_net(net, TEST, path=model_file), path=model_file)
    return describe_layers(graph)


def create_quant_retrain_config(
    config_file: str | os.PathLike[str],
    model_file: str | os.PathLike[str],
    weights_file: str | os.PathLike[str],
    config_defination: str | os.PathLike[str] | None = None,
) -> None:
    """Write the QAT JSON config of a model (see ``amct_caffe.amct.create_quant_retrain_config``).

    The config lists every layer of the model's TEST-phase view that QAT can quantize: with AMCT's defaults,
    or as the simplified ``.cfg`` ``config_defination`` says. The weights are read only to check that the
    caffemodel exists and parses, as AMCT requires it; nothing in the config depends on them. The file is
    written atomically: on any error no config is written and an existing one is untouched.
    """
    config_file, model_file = os.fspath(config_file), os.fspath(model_file)
    weights_file = os.fspath(weights_file)
    layers = qat_model_layers(model_file)
    load_caffemodel(weights_file)
    left_float = [layer for layer in layers if not layer.quantizable and layer.layer_type in QAT_LAYER_TYPES]
    for layer in left_float:
        LOGGER.debug("Layer '%s' stays float: %s.", layer.name, layer.unsupported_reason)
    targets = [layer for layer in layers if layer.quantizable]
    if not targets:
        raise ConfigError(
            f"Model '{model_file}' has no layer that QAT can quantize (Convolution with a 4-D filter, "
            "Deconvolution with group 1 and dilation 1, InnerProduct with axis 1 and no transpose, AVE "
            "Pooling that is not global); there is nothing to write to the QAT config."
        )
    if config_defination is None:
        config = default_config((layer.name, layer.layer_type, layer.default_fixed_min) for layer in targets)
    else:
        config = load_cfg_config(os.fspath(config_defination), layers, model_file)
    text = dumps_json(config)
    for setting in config.values():
        LOGGER.debug(
            "Layer '%s' (%s): retrain_enable %s, fixed_min %s, clip_max %s, clip_min %s, channel_wise %s.",
            setting.name, setting.layer_type, setting.retrain_enable, setting.fixed_min, setting.clip_max,
            setting.clip_min, setting.channel_wise,
        )
    atomic_write(config_file, text.encode("utf-8"))
    enabled = sum(setting.retrain_enable for setting in config.values())
    LOGGER.info(
        "Create quant retrain config file '%s' success: %d layer(s), %d enabled for retrain; %d layer(s) of "
        "quantizable types stay float (their reasons are logged at DEBUG level).",
        config_file, len(config), enabled, len(left_float),
    )


# -- create_quant_retrain_model --------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainPaths:
    """The files the last successful ``create_quant_retrain_model`` of this process used (absolute paths).

    Informational only: ``save_quant_retrain_model`` reads the record path from the retrain model itself,
    never from here (docs/decisions.md row 3b).
    """

    record_file: str
    config_file: str


_LAST_RETRAIN: RetrainPaths | None = None


def last_retrain_paths() -> RetrainPaths | None:
    """The record and config paths of this process's last successful ``create_quant_retrain_model``; None
    when it has not run (successfully) yet."""
    return _LAST_RETRAIN


def create_quant_retrain_model(
    model_file: str | os.PathLike[str],
    weights_file: str | os.PathLike[str],
    config_file: str | os.PathLike[str],
    modified_model_file: str | os.PathLike[str],
    modified_weights_file: str | os.PathLike[str],
    scale_offset_record_file: str | os.PathLike[str],
) -> list[ActivationGroup]:
    """Write the retrain (QAT) model of a float model (see ``amct_caffe.amct.create_quant_retrain_model``).

    Steps: read the full prototxt (both phases) and the caffemodel; validate the JSON config against the
    model's TEST-phase view; fold Convolution/Deconvolution + BatchNorm (+ Scale)
    (``passes.fuse_bn``); insert the retrain layers for the enabled layers (``passes.retrain``); infer the
    input shape of every quantized layer by building the TEST-phase retrain net in the engine; write the
    prototxt, the caffemodel and the record file (the shapes) all-or-nothing.

    Returns:
        The activation retrain groups inserted (one per quantized input value).

    Raises:
        ConfigError: bad config or arguments, nothing enabled, a model already prepared for quantization,
            or wiring the retrain layers cannot follow (see ``passes.retrain``).
        ModelFormatError: the prototxt or caffemodel is missing, malformed or inconsistent.
    """
    global _LAST_RETRAIN
    model_file, weights_file, config_file = (os.fspath(p) for p in (model_file, weights_file, config_file))
    outputs = [os.fspath(p) for p in (modified_model_file, modified_weights_file, scale_offset_record_file)]
    _check_outputs(outputs, [model_file, weights_file, config_file])
    record_path = os.path.abspath(outputs[2])

    net = load_prototxt(model_file)
    # the TEST view here (the flow's own checks explain a TRAIN view the retrain layers cannot follow);
    # both phases of the model it writes below
    check_net(net, model_file, phases=(TEST,))
    depthwise_as_convolution(net, model_file)
    check_not_quantized(Graph(_unique_layer_names(net)[0], path=model_file))
    layers = describe_layers(Graph(filter_net(net, TEST, path=model_file), path=model_file))
    config = load_json_config(config_file, layers, model_file)
    enabled = [name for name, layer in config.items() if layer.retrain_enable]
    if not enabled:
        raise ConfigError(
            f"QAT config '{config_file}' enables no layer (every retrain_enable is false), so there is "
            "nothing to retrain; set retrain_enable to true for the layers to quantize."
        )
    _check_unique_targets(net, enabled, model_file)
    _warn_if_untrainable(net, model_file)
    caffemodel = load_caffemodel(weights_file)
    check_weights(net, caffemodel, weights_file)
    weights = weights_from_net(caffemodel, weights_file)

    unique_net, original_names = _unique_layer_names(net)
    graph = Graph(unique_net, path=model_file)
    fuse_bn(graph, weights)
    groups = insert_retrain_layers(graph, weights, config, record_path, config_file=config_file,
                                   weights_file=weights_file)
    retrain_net = graph.to_net_parameter()
    for layer in retrain_net.layer:
        layer.name = original_names.get(layer.name, layer.name)
    retrain_weights = weights_to_net(weights, retrain_net, like=caffemodel)
    # what is written must pass the checks the engine runs when it loads it
    check_net(retrain_net, model_file)
    check_weights(retrain_net, retrain_weights, weights_file)

    order = [name for group in groups for name in group.consumers]
    shapes = _input_shapes(retrain_net, groups, model_file)
    records = {name: LayerRecord() for name in order}
    for name, (channels, height, width) in shapes.items():
        records[name] = LayerRecord(channels=channels, height=height, width=width)

    with AtomicFiles() as files:
        files.write(outputs[0], prototxt_text(retrain_net).encode("utf-8"))
        files.write(outputs[1], retrain_weights.SerializeToString())
        files.write(outputs[2], record_text(records, order).encode("utf-8"))
    _LAST_RETRAIN = RetrainPaths(record_path, os.path.abspath(config_file))
    LOGGER.info(
        "Create quant retrain model success: '%s' and '%s' with %d quantized layer(s) (%d activation retrain "
        "layer(s)); record file '%s'.",
        outputs[0], outputs[1], len(order), len(groups), outputs[2],
    )
    return groups


def _warn_if_untrainable(net: caffe_pb2.NetParameter, model_file: str) -> None:
    """A WARNING when the TRAIN phase has no data layer or no loss: a solver would train nothing (QAT on a
    deploy prototxt); the retrain model is still written (it runs forward and saves)."""
    train = filter_net(net, TRAIN, path=model_file)
    missing = []
    if not any(layer.type in DATA_SOURCE_TYPES for layer in train.layer):
        missing.append("no data layer (its inputs would stay zero)")
    if not any(layer.type.endswith("Loss") or any(layer.loss_weight) for layer in train.layer):
        missing.append("no loss layer (no gradient would reach a weight)")
    if missing:
        LOGGER.warning(
            "The TRAIN phase of '%s' has %s: training its retrain model learns nothing. QAT needs the "
            "training prototxt (data layers with the training data, the loss), as AMCT's samples use; a "
            "deploy prototxt only serves PTQ (create_quant_config / calibration).", model_file,
            " and ".join(missing))


def _check_outputs(outputs: Sequence[str], inputs: Sequence[str]) -> None:
    """The three outputs must be distinct files that are none of the inputs (nor existing folders)."""
    names = ("modified_model_file", "modified_weights_file", "scale_offset_record_file")
    conflict = output_conflict(zip(names, outputs), [("input", p) for p in inputs])
    if conflict is None:
        return
    name, path = conflict.name, conflict.path
    if conflict.kind == "folder":
        raise ConfigError(f"create_quant_retrain_model: {name} '{path}' is a folder; give a file path.")
    if conflict.kind == "same":
        raise ConfigError(f"create_quant_retrain_model: {name} and {conflict.other} are the same file "
                          f"'{path}'; give each output its own path.")
    raise ConfigError(f"create_quant_retrain_model: {name} '{path}' is one of the input files; write "
                      "the retrain model to new files.")


def _unique_layer_names(net: caffe_pb2.NetParameter) -> tuple[caffe_pb2.NetParameter, dict[str, str]]:
    """A copy of ``net`` whose layer names are unique, and the map back to the original names.

    Training prototxts often name the TRAIN and the TEST data layer alike (Caffe only needs names to be
    unique within one phase); the graph needs one name per layer, so every layer of a repeated name is
    renamed ``<name>#<k>`` while the passes run and gets its name back afterwards. Renaming them all (not
    only the later ones) keeps the weights, which are looked up by name, away from the passes: a fold into
    one of two same-named convolutions would change the weights Caffe loads into both.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    counts: dict[str, int] = {}
    for layer in out.layer:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    taken = set(counts)
    original: dict[str, str] = {}
    for layer in out.layer:
        if counts[layer.name] == 1:
            continue
        k = 0
        while f"{layer.name}#{k}" in taken:
            k += 1
        new = f"{layer.name}#{k}"
        taken.add(new)
        original[new] = layer.name
        layer.name = new
    return out, original


def _check_unique_targets(net: caffe_pb2.NetParameter, enabled: Sequence[str], model_file: str) -> None:
    counts: dict[str, int] = {}
    for layer in net.layer:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    for name in enabled:
        if counts.get(name, 0) > 1:
            raise ConfigError(
                f"Layer '{name}' of model '{model_file}' is defined {counts[name]} times (one definition per "
                "phase); QAT inserts one set of retrain layers for both phases, so give the layer a single "
                "definition without phase rules, or set retrain_enable to false for it."
            )


def _input_shapes(
    net: caffe_pb2.NetParameter, groups: Sequence[ActivationGroup], model_file: str
) -> Mapping[str, tuple[int, int, int]]:
    """The input (channels, height, width) of every quantized layer, from the TEST-phase retrain net.

    The net is built in the engine as written (its shape pass runs every layer once on placeholder values,
    during which an ``ActivationQAT`` neither initialises its clips nor does anything else), with batch 1
    when the net allows it, else with its own batch. Building a net writes no file: the record's shapes
    during training are a separate step that only the solver runs. If the net cannot be built (e.g. data
    layers whose sources are missing), a WARNING is logged and no shapes are returned
    (``save_quant_retrain_model`` infers them again).
    """
    engine, problem = shape_net(net, caffe_pb2.TEST)
    if engine is None:
        LOGGER.warning(
            "Cannot build the TEST phase of the retrain model of '%s' to find the input shapes of the "
            "quantized layers (%s); the record file gets no shapes (save_quant_retrain_model infers them).",
            model_file, problem,
        )
        return {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for group in groups:
        chw = legacy_chw(tuple(engine.tensor(group.name).shape))
        if chw is None:
            LOGGER.debug("Layer(s) %s: the input has more than 4 axes; no shape recorded.", group.consumers)
            continue
        for name in group.consumers:
            shapes[name] = chw
    return shapes
