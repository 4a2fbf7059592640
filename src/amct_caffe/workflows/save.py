"""``save_quant_retrain_model``: the fake-quant and deploy models of a retrained QAT net
(docs/amct-reference.md §1.3.3, §10).

The flow (docs/decisions.md rows 3, 3b, 5-7, 10, 11, 14; §6):

1. check ``save_type`` ('Fakequant' | 'Deploy' | 'Both') and the paths; resolve the record path (``None``:
   the ``record_file_path`` the retrain model's ``ActivationQAT`` layers carry, else a
   :class:`MissingRecordPathError`);
2. load the retrain prototxt and the retrained caffemodel; take the TEST-phase view (``filter_net``);
3. read every factor from the weights (``passes.retrain_removal.read_retrain_factors``): clips -> ``s_d``,
   ``o_d``; float shadow weights -> ARQ ``s_w``;
4. remove the retrain layers (quantized layers read their original input and hold their float shadow
   weight again), decide which layers are saved quantized (``config_file``, see below), fold any
   Convolution/Deconvolution + BatchNorm (+ Scale) left (ARQ scales of a folded layer are recomputed on the
   folded weight);
5. infer the input shape of each quantized layer by building the float TEST net in the engine (batch 1);
6. insert ``Quant``/``DeQuant`` (``passes.quant_insert``), build the fake-quant and/or deploy caffemodels
   (``passes.fake_quant``, ``passes.deploy``) and the record (``scale_d``, ``offset_d``, ``scale_w``,
   ``offset_w`` = 0, ``channels/height/width``);
7. write every file through ONE ``model.io.AtomicFiles``: on any error no file is written and existing
   files are left untouched.

``config_file``: ``None`` -- every layer that has retrain layers is saved quantized. Given -- it is read
against the model (the retrain layers removed) like ``create_quant_retrain_model`` reads it, and decides
only WHICH layers are quantized; the numbers always come from the retrain layers:

* a layer enabled in the config (``retrain_enable: true``) without retrain layers in the model is a
  :class:`ConfigError` (it cannot be quantized: nothing was trained for it);
* a layer with retrain layers that the config disables, or does not list, is saved in float (its trained
  shadow weight, no ``Quant``/``DeQuant``; logged at INFO, or WARNING when it is not listed). This is how a
  layer whose quantized bias overflows INT32 is skipped at save time;
* a ``fixed_min`` or ``channel_wise`` in the config that differs from the retrain layer's is logged as a
  WARNING; the retrain layer's value (what was trained) is used;
* a config that leaves no layer quantized is a :class:`ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amct_caffe.engine.shapes import shape_net
from amct_caffe.errors import ConfigError, RecordError, UnsupportedLayerError
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import has_legacy_shape
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import AtomicFiles, load_caffemodel, load_prototxt, output_conflict, prototxt_text
from amct_caffe.model.layer_types import ACTIVATION_QAT
from amct_caffe.model.phase import TEST, filter_net, restore_state
from amct_caffe.model.validate import check_net, check_weights
from amct_caffe.model.weights import Weights, weights_from_net, weights_to_net
from amct_caffe.passes.deploy import deploy_caffemodel
from amct_caffe.passes.fake_quant import fake_quant_caffemodel
from amct_caffe.passes.quant_insert import QuantGroup, QuantizedLayer, all_weight_codes, insert_quant_layers
from amct_caffe.passes.quantizable import describe_layers
from amct_caffe.passes.retrain_removal import (
    RetrainFactors,
    fold_batch_norms,
    read_retrain_factors,
    remove_retrain_layers,
)
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.arq import arq_scale
from amct_caffe.quant.config import load_json_config
from amct_caffe.quant.numerics import BiasOverflowError
from amct_caffe.quant.record import LayerRecord, legacy_chw, read_records, record_text, validate_records
from amct_caffe.workflows.inference import InputShapes, atc_request, inference_models, recorded_by_blob

LOGGER = get_logger("save")

API = "save_quant_retrain_model"
SAVE_TYPES = ("Fakequant", "Deploy", "Both")


@dataclass(frozen=True)
class SavePaths:
    """The files ``save_quant_retrain_model`` writes (``None``: not written for this ``save_type``)."""

    fake_model: str | None
    fake_weights: str | None
    deploy_model: str | None
    deploy_weights: str | None
    record: str

    def all(self) -> list[tuple[str, str]]:
        """``(what, path)`` of every file written."""
        named = [("fake-quant model", self.fake_model), ("fake-quant weights", self.fake_weights),
                 ("deploy model", self.deploy_model), ("deploy weights", self.deploy_weights),
                 ("scale_offset_record_file", self.record)]
        return [(what, path) for what, path in named if path is not None]


def check_save_type(save_type: object, api: str = "save_quant_retrain_model") -> str:
    """``save_type`` must be exactly one of 'Fakequant', 'Deploy', 'Both' (AMCT's spellings)."""
    if not isinstance(save_type, str) or save_type not in SAVE_TYPES:
        raise ConfigError(
            f"{api}: save_type {save_type!r} is not supported; use one of "
            f"{', '.join(repr(t) for t in SAVE_TYPES)} (exactly so spelled)."
        )
    return save_type


def model_paths(
    save_path: str, save_type: str, api: str = "save_quant_retrain_model"
) -> tuple[str | None, str | None, str | None, str | None]:
    """``(fake model, fake weights, deploy model, deploy weights)`` for ``save_path`` (folder + file-name
    prefix) and ``save_type``; None for the files ``save_type`` leaves out.

    Raises:
        ConfigError: ``save_path`` has no file-name prefix (it ends with a path separator).
    """
    if not os.path.basename(save_path):
        raise ConfigError(
            f"{api}: save_path '{save_path}' has no file-name prefix; give a folder plus "
            "a prefix, e.g. './result/model' writes './result/model_fake_quant_model.prototxt', ..."
        )
    fake = save_type in ("Fakequant", "Both")
    deploy = save_type in ("Deploy", "Both")
    return (
        save_path + "_fake_quant_model.prototxt" if fake else None,
        save_path + "_fake_quant_weights.caffemodel" if fake else None,
        save_path + "_deploy_model.prototxt" if deploy else None,
        save_path + "_deploy_weights.caffemodel" if deploy else None,
    )


class MissingRecordPathError(RecordError):
    """``scale_offset_record_file=None`` but the retrain model names no record file (its ``ActivationQAT``
    layers have no ``record_file_path``), or its layers name different ones."""


def record_path_of(net: caffe_pb2.NetParameter, model_file: str) -> str:
    """The record file the retrain model's ``ActivationQAT`` layers name (``record_file_path``, written by
    ``create_quant_retrain_model``; a relative path is relative to the working directory, as the layers
    open it).

    Raises:
        MissingRecordPathError: no ``ActivationQAT`` names a record file, or they name different ones.
    """
    named = {layer.retrain_data_quant_param.record_file_path for layer in net.layer
             if layer.type == ACTIVATION_QAT and layer.retrain_data_quant_param.record_file_path}
    if len(named) == 1:
        return named.pop()
    if not any(layer.type == ACTIVATION_QAT for layer in net.layer):
        raise MissingRecordPathError(
            f"{API}: scale_offset_record_file is None but '{model_file}' has no ActivationQAT layer to read "
            "the record path from: it is not a retrain model. Give the modified_model_file written by "
            "create_quant_retrain_model (or pass scale_offset_record_file)."
        )
    if not named:
        raise MissingRecordPathError(
            f"{API}: scale_offset_record_file is None but retrain model '{model_file}' names no record file "
            "(its ActivationQAT layers have no record_file_path). Pass scale_offset_record_file, the record "
            "path given to create_quant_retrain_model."
        )
    raise MissingRecordPathError(
        f"{API}: scale_offset_record_file is None but the ActivationQAT layers of retrain model "
        f"'{model_file}' name different record files {sorted(named)}; pass scale_offset_record_file."
    )


def resolve_record_path(record_file: str | None, model_file: str) -> str:
    """``record_file``, or when None the record path the retrain prototxt ``model_file`` carries
    (:func:`record_path_of`; docs/decisions.md row 3b).

    Raises:
        MissingRecordPathError: None and the model names no single record file.
        ModelFormatError: ``model_file`` is missing or malformed (only read when ``record_file`` is None).
    """
    if record_file is not None:
        return record_file
    return record_path_of(load_prototxt(model_file), model_file)


def output_paths(save_path: str, save_type: str, record_file: str) -> SavePaths:
    """The output files for ``save_path`` (folder + file-name prefix), ``save_type`` and the record path.

    Raises:
        ConfigError: ``save_path`` has no file-name prefix (it ends with a path separator).
    """
    return SavePaths(*model_paths(save_path, save_type), record_file)


def _check_paths(paths: SavePaths, inputs: Mapping[str, str | None]) -> None:
    """Outputs must be distinct, none of the inputs, and not existing folders."""
    conflict = output_conflict(paths.all(), inputs.items())
    if conflict is None:
        return
    what, path = conflict.name, conflict.path
    if conflict.kind == "folder":
        raise ConfigError(f"save_quant_retrain_model: the {what} path '{path}' is a folder; choose "
                          "another save_path or scale_offset_record_file.")
    if conflict.kind == "input":
        raise ConfigError(f"save_quant_retrain_model: the {what} path '{path}' is the input "
                          f"{conflict.other}; choose another save_path or scale_offset_record_file.")
    raise ConfigError(f"save_quant_retrain_model: the {what} and the {conflict.other} would both be "
                      f"written to '{path}'; choose another scale_offset_record_file.")


# -- which layers are saved quantized ----------------------------------------------------------------------
def _selected_layers(
    graph: Graph, factors: RetrainFactors, config_file: str | None, model_file: str
) -> list[str]:
    """The quantized layers to save quantized, in the order of ``factors`` (module docstring)."""
    quantized = factors.quantized_layers
    if config_file is None:
        return quantized
    config = load_json_config(config_file, describe_layers(graph), model_file)
    present = set(quantized)
    for name, entry in config.items():
        if entry.retrain_enable and name not in present:
            raise ConfigError(
                f"QAT config '{config_file}' enables layer '{name}', but retrain model '{model_file}' has no "
                "retrain layers for it, so nothing was trained to quantize it with. Pass the config the "
                "retrain model was created with (or config_file=None), or set retrain_enable to false for "
                f"'{name}'."
            )
    chosen = []
    for name in quantized:
        cfg = config.get(name)
        if cfg is None:
            LOGGER.warning("Layer '%s' has retrain layers but QAT config '%s' does not list it; it is saved "
                           "in float.", name, config_file)
            continue
        if not cfg.retrain_enable:
            LOGGER.info("Layer '%s': retrain_enable is false in QAT config '%s'; it is saved in float.", name,
                        config_file)
            continue
        act = factors.activation_of(name)
        if cfg.fixed_min is not None and bool(cfg.fixed_min) != act.fixed_min:
            LOGGER.warning("Layer '%s': fixed_min is %s in QAT config '%s' but %s in the retrain layer '%s'; "
                           "the retrain layer's value is used.", name, cfg.fixed_min, config_file,
                           act.fixed_min, act.layer)
        wf = factors.weights.get(name)
        if wf is not None and cfg.channel_wise is not None and bool(cfg.channel_wise) != wf.channel_wise:
            LOGGER.warning("Layer '%s': channel_wise is %s in QAT config '%s' but %s in the retrain layer "
                           "'%s'; the retrain layer's value is used.", name, cfg.channel_wise, config_file,
                           wf.channel_wise, wf.retrain_layer)
        chosen.append(name)
    if not chosen:
        raise ConfigError(
            f"QAT config '{config_file}' leaves no layer of retrain model '{model_file}' quantized (every "
            "retrained layer has retrain_enable false); enable at least one layer or pass config_file=None."
        )
    return chosen


def build_plan(
    graph: Graph, weights: Weights, factors: RetrainFactors, selected: Sequence[str], folded: Sequence[str]
) -> list[QuantGroup]:
    """The quantization plan: one group per quantized input value, its selected layers in file order.

    The ARQ scales of a layer a BatchNorm was folded into are those of its folded weight.
    """
    order = {layer.name: i for i, layer in enumerate(graph)}
    chosen = set(selected)
    refolded = set(folded)
    groups = []
    for act in factors.activations:
        layers = []
        for name in sorted((n for n in act.consumers if n in chosen), key=order.__getitem__):
            wf = factors.weights.get(name)
            if wf is None:  # AVE Pooling: scale_w 1, per tensor (docs/decisions.md row 10)
                layers.append(QuantizedLayer(name, graph.layer(name).type, act.scale_d, act.offset_d,
                                             np.ones(1, np.float32), False))
                continue
            if wf.channel_wise and wf.layer_type != "InnerProduct" and \
                    graph.layer(name).convolution_param.axis not in (1, -3):
                # The DeQuant's per-channel blobs exist only for a 4-D (N, C, H, W) output.
                raise UnsupportedLayerError(
                    f"Layer '{name}' of '{graph.path}' has convolution_param axis "
                    f"{graph.layer(name).convolution_param.axis}: its output is not N x C x H x W, so its "
                    "DeQuant cannot hold channel-wise scales. Retrain it with channel_wise false, or skip it."
                )
            scale_w = wf.scale_w
            if name in refolded:
                scale_w = arq_scale(weights[name][0], wf.channel_wise, wf.axis).numpy().astype(np.float32)
                LOGGER.debug("Layer '%s': BatchNorm folded at save time; scale_w recomputed on the folded "
                             "weight.", name)
            layers.append(QuantizedLayer(name, wf.layer_type, act.scale_d, act.offset_d, scale_w,
                                         wf.channel_wise))
        if layers:
            groups.append(QuantGroup(act.bottom, act.scale_d, act.offset_d, tuple(layers)))
    return groups


# -- shapes for the record -----------------------------------------------------------------------------------
def _input_shapes(
    net: caffe_pb2.NetParameter, groups: Sequence[QuantGroup], model_file: str, record_file: str
) -> dict[str, tuple[int, int, int]]:
    """The input (channels, height, width) of every quantized layer.

    From shape inference of the float TEST net (retrain layers removed, before insertion) in the engine,
    with batch 1 when the net allows it; when the net cannot be built (e.g. data layers whose sources are
    missing), from the shapes an existing record file holds (written by ``create_quant_retrain_model`` and
    by the retrain layers during training); else none, with a WARNING.
    """
    engine, problem = shape_net(net, TEST)
    shapes: dict[str, tuple[int, int, int]] = {}
    if engine is not None:
        for group in groups:
            chw = legacy_chw(tuple(engine.tensor(group.bottom).shape))
            if chw is not None:
                shapes.update({layer.name: chw for layer in group.layers})
        return shapes
    names = [layer.name for group in groups for layer in group.layers]
    old = {}
    if os.path.isfile(record_file):
        try:
            old = read_records(record_file, validate=False)
        except RecordError as exc:
            LOGGER.debug("Record '%s' gives no shapes: %s", record_file, exc)
    for name in names:
        shape = old[name].shape if name in old else None
        if shape is not None:
            shapes[name] = shape
    if len(shapes) < len(names):
        LOGGER.warning(
            "Cannot build the TEST phase of '%s' in the engine to find the input shapes of the quantized "
            "layers (%s); the record gets channels/height/width only for the %d layer(s) the existing "
            "record lists.",
            model_file, problem, len(shapes),
        )
    return shapes


def _records(
    groups: Sequence[QuantGroup], shapes: Mapping[str, tuple[int, int, int]]
) -> dict[str, LayerRecord]:
    records = {}
    for group in groups:
        for layer in group.layers:
            rec = LayerRecord(
                scale_d=layer.scale_d, offset_d=layer.offset_d,
                scale_w=[float(v) for v in layer.scale_w], offset_w=[0] * layer.scale_w.size,
            )
            if layer.name in shapes:
                rec.channels, rec.height, rec.width = shapes[layer.name]
            records[layer.name] = rec
    return records


def _has_legacy_shapes(net: caffe_pb2.NetParameter) -> bool:
    return any(has_legacy_shape(blob) for layer in net.layer for blob in layer.blobs)



# -- the flow ----------------------------------------------------------------------------------------------
def _without_retrain_layers(
    model_file: str, weights_file: str
) -> tuple[caffe_pb2.NetParameter, Graph, Weights, caffe_pb2.NetParameter | None, RetrainFactors]:
    """Steps 2-4 up to the removal: the retrain prototxt, its TEST view with the retrain layers removed
    (each quantized layer holding its float shadow weight), those weights, the caffemodel to imitate (legacy
    shapes) and the factors read before the removal."""
    net = load_prototxt(model_file)
    check_net(net, model_file, phases=(TEST,))
    caffemodel = load_caffemodel(weights_file)
    check_weights(net, caffemodel, weights_file)
    weights = weights_from_net(caffemodel, weights_file)
    # Keep the parsed caffemodel only when it has legacy 4-D blob shapes to write back the same way
    # (weights_to_net's ``like``); otherwise free it: it is as large as the weights themselves.
    like = caffemodel if _has_legacy_shapes(caffemodel) else None
    del caffemodel
    graph = Graph(filter_net(net, TEST, path=model_file), path=model_file)
    factors = read_retrain_factors(graph, weights, weights_file)
    remove_retrain_layers(graph, weights, factors)
    return net, graph, weights, like, factors


@dataclass(frozen=True)
class RetrainedFloat:
    """A retrained net with quantization off, and what it takes to quantize its layers one by one.

    Attributes:
        net: the TEST view of the retrain model without its retrain layers (BatchNorms not folded).
        weights: its caffemodel: every quantized layer holds its trained float shadow weight.
        layers: the layers that have retrain layers, in the retrain model's order.
    """

    net: caffe_pb2.NetParameter
    weights: caffe_pb2.NetParameter
    layers: list[str]


def retrained_float_model(
    retrained_model_file: str | os.PathLike[str], retrained_weights_file: str | os.PathLike[str]
) -> RetrainedFloat:
    """The float model a retrained net holds: its retrain layers removed, its shadow weights in place.

    This is the reference a comparison of the saved quantized models needs after training: the original
    float weights also differ by what training changed.

    Raises:
        ModelFormatError: not a retrain model, or its retrain layers are wired differently from what
            ``create_quant_retrain_model`` writes.
        RecordError: an ``ActivationQAT`` has no clip values (run the model forward/train first).
    """
    model_file, weights_file = os.fspath(retrained_model_file), os.fspath(retrained_weights_file)
    _, graph, weights, like, factors = _without_retrain_layers(model_file, weights_file)
    float_net = graph.to_net_parameter()
    return RetrainedFloat(float_net, weights_to_net(weights, float_net, like=like), factors.quantized_layers)


def fake_quant_of_layers(
    retrained_model_file: str | os.PathLike[str], retrained_weights_file: str | os.PathLike[str],
    layers: Sequence[str],
) -> tuple[caffe_pb2.NetParameter, caffe_pb2.NetParameter]:
    """The fake-quant model (prototxt, caffemodel) of a retrained net with only ``layers`` quantized, in
    memory; the others keep their float shadow weights (as ``save_quant_retrain_model`` with a config that
    enables only ``layers``).

    Raises:
        ConfigError: a name in ``layers`` has no retrain layers.
        (and what :func:`retrained_float_model` raises)
    """
    model_file, weights_file = os.fspath(retrained_model_file), os.fspath(retrained_weights_file)
    _, graph, weights, like, factors = _without_retrain_layers(model_file, weights_file)
    unknown = sorted(set(layers) - set(factors.quantized_layers))
    if unknown:
        raise ConfigError(f"Retrain model '{model_file}' has no retrain layers for {unknown}; its quantized "
                          f"layers are {factors.quantized_layers}.")
    folds = fold_batch_norms(graph, weights)
    groups = build_plan(graph, weights, factors, list(layers), [fold.conv for fold in folds])
    insert_quant_layers(graph, groups)
    net = graph.to_net_parameter()
    return net, fake_quant_caffemodel(net, weights, groups, like, all_weight_codes(weights, groups))


def save_quant_retrain_model(
    retrained_model_file: str | os.PathLike[str],
    retrained_weights_file: str | os.PathLike[str],
    save_type: str,
    save_path: str | os.PathLike[str],
    scale_offset_record_file: str | os.PathLike[str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    *,
    for_atc: bool = False,
    input_shape: InputShapes | None = None,
) -> list[QuantGroup]:
    """Write the fake-quant and/or deploy model of a retrained net (``amct_caffe.amct.
    save_quant_retrain_model``; the steps are in the module docstring).

    Returns:
        The quantization plan used (one group per ``Quant`` layer).

    Raises:
        ConfigError: bad ``save_type`` or paths; a config inconsistent with the model; an unusable clip
            range; a quantized bias outside INT32 (:class:`BiasOverflowError`).
        ModelFormatError: missing or malformed inputs; not a retrain model; retrain layers wired or stored
            differently from what ``create_quant_retrain_model`` writes.
        RecordError: an ``ActivationQAT`` has no clip values (run the model forward/train first).
        UnsupportedLayerError: channel-wise scales for a convolution whose output is not N x C x H x W.
    """
    save_type = check_save_type(save_type)
    atc_request(for_atc, input_shape, API)  # argument check before any file is read
    model_file, weights_file, save_path = (os.fspath(p) for p in (retrained_model_file,
                                                                   retrained_weights_file, save_path))
    record_arg = None if scale_offset_record_file is None else os.fspath(scale_offset_record_file)
    config = None if config_file is None else os.fspath(config_file)
    model_paths(save_path, save_type)  # the save_path check before any file is read
    net = load_prototxt(model_file)
    paths = output_paths(save_path, save_type,
                         record_path_of(net, model_file) if record_arg is None else record_arg)
    _check_paths(paths, {"retrained_model_file": model_file, "retrained_weights_file": weights_file,
                         "config_file": config})

    net, graph, weights, like, factors = _without_retrain_layers(model_file, weights_file)
    selected = _selected_layers(graph, factors, config, model_file)
    folds = fold_batch_norms(graph, weights)
    groups = build_plan(graph, weights, factors, selected, [fold.conv for fold in folds])
    shapes = _input_shapes(graph.to_net_parameter(), groups, model_file, paths.record)
    insert_quant_layers(graph, groups)
    saved = graph.to_net_parameter()
    restore_state(saved, net)

    try:
        codes = all_weight_codes(weights, groups)
        fake = fake_quant_caffemodel(saved, weights, groups, like, codes) if paths.fake_model else None
        deploy = deploy_caffemodel(saved, weights, groups, like, codes) if paths.deploy_model else None
    except BiasOverflowError as exc:
        raise BiasOverflowError(
            f"save_quant_retrain_model, retrain model '{model_file}', weights '{weights_file}': {exc} At "
            f"save time: set \"retrain_enable\": false for layer '{exc.layer}' in the QAT config and pass "
            "it as config_file (the layer is then saved in float).",
            exc.channels, exc.layer,
        ) from exc

    records = _records(groups, shapes)
    order = [layer.name for group in groups for layer in group.layers]
    validate_records(records, paths.record)
    text = prototxt_text(saved).encode("utf-8")
    fake_text = deploy_text = text
    request = atc_request(for_atc, input_shape, API, recorded_by_blob(groups, shapes))
    if request is not None:
        views = inference_models(saved, weights, request, model_file, fake=fake is not None,
                                 deploy=deploy is not None)
        if views.fake is not None:
            fake_text = prototxt_text(views.fake).encode("utf-8")
        if views.deploy is not None and deploy is not None:
            deploy_text = prototxt_text(views.deploy.net).encode("utf-8")
            views.retype_deploy_weights(deploy)
    with AtomicFiles() as files:
        if fake is not None and paths.fake_model and paths.fake_weights:
            files.write(paths.fake_model, fake_text)
            files.write(paths.fake_weights, fake.SerializeToString())
        if deploy is not None and paths.deploy_model and paths.deploy_weights:
            files.write(paths.deploy_model, deploy_text)
            files.write(paths.deploy_weights, deploy.SerializeToString())
        files.write(paths.record, record_text(records, order).encode("utf-8"))

    for group in groups:
        for layer in group.layers:
            LOGGER.debug(
                "Layer '%s' (%s): scale_d %.9g, offset_d %d, scale_w %s (%s), input shape %s.",
                layer.name, layer.layer_type, layer.scale_d, layer.offset_d,
                np.array2string(layer.scale_w, precision=9, threshold=16),
                "channel-wise" if layer.channel_wise else "per tensor", shapes.get(layer.name),
            )
            LOGGER.info('Do layer: "%s" quant success!', layer.name)
    written = ", ".join(f"'{path}'" for _, path in paths.all())
    LOGGER.info("Save quant retrain model (%s) success: %d quantized layer(s), %d Quant layer(s); files %s.",
                save_type, len(order), len(groups), written)
    return groups

