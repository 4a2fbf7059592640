"""The post-training quantization (PTQ, "calibration") flow of AMCT for Caffe (AMCT reference §1.2, §5.3).

``create_quant_config`` -> ``init`` -> ``quantize_model`` -> the user runs ``batch_num`` forward batches of
the calibration model -> ``save_model``:

1. ``create_quant_config`` writes the PTQ JSON config of every quantizable layer of the model's TEST-phase
   view (AMCT's defaults and the API's arguments, or a simplified ``.cfg``; ``quant.ptq_config``).
2. ``init`` reads the model's inference view (TEST phase; a BatchNorm that asks for batch statistics is set
   to its stored ones), validates the config against it (a config of another model fails), checks the
   caffemodel against the prototxt, (re)creates the record file empty, and returns a
   :class:`CalibrationGraph` that remembers the three input files by content hash.
3. ``quantize_model`` folds BatchNorm (+ Scale) into the Convolution/Deconvolution/InnerProduct before it
   (``do_fusion``, ``skip_fusion_layers``), computes each quantized layer's ARQ weight scales into the record
   (``scale_w``, ``offset_w`` = 0, ``skip_fusion: true`` where a fold was skipped), inserts the ``IFMR``
   layers (``passes.calibration``) and writes the calibration model: prototxt, caffemodel (folded float
   weights) and record, all-or-nothing.
4. The user runs the calibration model ``batch_num`` times (``caffe.Net(modified_model_file, caffe.TEST,
   weights=modified_weights_file)`` and ``net.forward()``); its IFMR layers write ``scale_d``, ``offset_d``
   and the input shapes into the record after the last batch.
5. ``save_model`` reads the record (every quantized layer needs ``scale_d``/``offset_d``: otherwise the
   calibration has not run, a :class:`RecordError` says so), inserts ``Quant``/``DeQuant``
   (``passes.quant_insert``; one ``Quant`` per input value and factor pair) into the folded net, and writes
   the fake-quant and/or deploy models in the formats ``save_quant_retrain_model`` uses
   (``passes.fake_quant``, ``passes.deploy``) plus ``<save_path>_quant.json``, all-or-nothing.

A graph whose config, model or weights file changed after ``init`` is refused by ``quantize_model`` and
``save_model`` (:class:`GraphStateError`): run ``init`` again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from amct_caffe.engine.shapes import shape_net
from amct_caffe.errors import (
    AmctError,
    ConfigError,
    GraphStateError,
    ModelFormatError,
    RecordError,
    UnsupportedLayerError,
)
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import has_legacy_shape
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import (
    AtomicFiles,
    atomic_write,
    load_caffemodel,
    load_prototxt,
    output_conflict,
    prototxt_text,
)
from amct_caffe.model.phase import TEST, filter_net, restore_state
from amct_caffe.model.validate import check_net
from amct_caffe.model.weights import Weights, weights_from_net, weights_to_net
from amct_caffe.passes.calibration import CalibrationGroup, insert_calibration_layers, plan_calibration_groups
from amct_caffe.passes.deploy import deploy_caffemodel
from amct_caffe.passes.depthwise import depthwise_as_convolution
from amct_caffe.passes.fake_quant import fake_quant_caffemodel
from amct_caffe.passes.fuse_bn import FOLDABLE_TYPES, BNFold, fuse_bn_one_phase
from amct_caffe.passes.quant_insert import (
    QuantGroup,
    QuantizedLayer,
    all_weight_codes,
    dequant_layer_name,
    insert_quant_layers,
    readers_by_value,
)
from amct_caffe.passes.quantizable import describe_layers
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.arq import arq_scale, weight_channel_axis
from amct_caffe.quant.config import WEIGHTLESS_TYPES, ModelLayer
from amct_caffe.quant.numerics import BiasOverflowError
from amct_caffe.quant.ptq_config import (
    QuantConfig,
    default_config,
    dumps_json,
    load_cfg_config,
    load_json_config,
)
from amct_caffe.quant.record import LayerRecord, read_records, record_text, validate_records
from amct_caffe.workflows.equalize import Equalized, Factors, LayerFactors, equalize
from amct_caffe.workflows.inference import (
    AtcRequest,
    InputShapes,
    atc_request,
    inference_models,
    record_shapes,
    recorded_by_blob,
)
from amct_caffe.workflows.refine import CodeLayer, adaround, bias_correction, end_to_end, refine_plan
from amct_caffe.workflows.save import check_save_type, model_paths

LOGGER = get_logger("ptq")

QUANT_INFO_SUFFIX = "_quant.json"
#: Version of the ``<save_path>_quant.json`` format (docs/design.md, "Post-training quantization").
QUANT_INFO_VERSION = 1


# -- reading the model -------------------------------------------------------------------------------------
def inference_view(model_file: str) -> tuple[caffe_pb2.NetParameter, Graph]:
    """The prototxt as read and its inference view: the TEST phase (the prototxt's own ``state`` kept, so a
    written model reads as the user's), every BatchNorm on stored statistics.

    The forks' depthwise convolutions are read as the ``Convolution`` with ``group`` they compute
    (``passes.depthwise``), so they quantize as convolutions.

    A BatchNorm whose ``use_global_stats`` is false would normalise with batch statistics in TEST; AMCT needs
    an inference-ready model, so it is set to true (with a WARNING naming the layers).

    Raises:
        ModelFormatError: the prototxt is missing or malformed, or wired as Caffe refuses
            (``model.validate``).
    """
    net = load_prototxt(model_file)
    check_net(net, model_file, phases=(TEST,))
    depthwise_as_convolution(net, model_file)
    view = filter_net(net, TEST, path=model_file)
    restore_state(view, net)
    graph = Graph(view, path=model_file)
    switched = []
    for layer in graph:
        p = layer.batch_norm_param
        if layer.type == "BatchNorm" and p.HasField("use_global_stats") and not p.use_global_stats:
            p.use_global_stats = True
            switched.append(layer.name)
    if switched:
        LOGGER.warning("Model '%s': BatchNorm layer(s) %s had use_global_stats: false; PTQ runs the "
                       "inference view, so they use their stored statistics (use_global_stats: true).",
                       model_file, switched)
    return net, graph


def ptq_model_layers(graph: Graph) -> list[ModelLayer]:
    """Every layer of the inference view with why it cannot be quantized, if so.

    Raises:
        ConfigError: the model already holds AMCT layers (Quant, DeQuant, IFMR, ...).
    """
    return describe_layers(graph)


def _quantizable_or_fail(layers: Sequence[ModelLayer], model_file: str) -> None:
    if not any(layer.quantizable for layer in layers):
        raise ConfigError(
            f"Model '{model_file}' has no layer that can be quantized (Convolution with a 4-D filter, "
            "Deconvolution with group 1 and dilation 1, InnerProduct with axis 1 and no transpose, AVE "
            "Pooling that is not global); there is nothing to quantize."
        )


# -- create_quant_config -----------------------------------------------------------------------------------
def create_quant_config(
    config_file: str | os.PathLike[str],
    model_file: str | os.PathLike[str],
    weights_file: str | os.PathLike[str],
    skip_layers: Sequence[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    config_defination: str | os.PathLike[str] | None = None,
) -> QuantConfig:
    """Write the PTQ JSON config of a model (see ``amct_caffe.amct.create_quant_config``); returns it.

    The weights are read only to check that the caffemodel exists and parses. The file is written
    atomically: on any error no config is written and an existing one is untouched.
    """
    config_file, model_file, weights_file = (os.fspath(p) for p in (config_file, model_file, weights_file))
    _, graph = inference_view(model_file)
    layers = ptq_model_layers(graph)
    _quantizable_or_fail(layers, model_file)
    load_caffemodel(weights_file)
    if config_defination is None:
        config = default_config(layers, skip_layers or (), batch_num, activation_offset, model_file)
    else:
        given = {"skip_layers": skip_layers, "batch_num": batch_num, "activation_offset": activation_offset}
        defaults = {"skip_layers": None, "batch_num": 1, "activation_offset": True}
        ignored = [name for name, value in given.items() if value != defaults[name]]
        if ignored:
            LOGGER.warning("create_quant_config: config_defination '%s' is given, so %s are ignored; set "
                           "them in that file.", os.fspath(config_defination), ", ".join(ignored))
        config = load_cfg_config(os.fspath(config_defination), layers, model_file)
    text = dumps_json(config)
    for layer in config.layers.values():
        LOGGER.debug("Layer '%s' (%s): quant_enable %s, %s, channel_wise %s.", layer.name, layer.layer_type,
                     layer.quant_enable, layer.ifmr, layer.channel_wise)
    atomic_write(config_file, text.encode("utf-8"))
    LOGGER.info("Create quant config file '%s' success: %d layer(s), %d enabled, batch_num %d.", config_file,
                len(config.layers), len(config.enabled), config.batch_num)
    return config


# -- the graph init returns ------------------------------------------------------------------------------
def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes (how a graph tells that its input files changed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: A file whose modification time is this close to the moment it was hashed may still change within the
#: same timestamp tick (file systems stamp with a coarse clock); its stat is then not trusted.
_RACY_SECONDS = 2.0


def _stat_key(path: str) -> tuple[int, int, int, int, int] | None:
    """What a rewrite of the file always changes: device, inode, size, mtime and ctime (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class FileFingerprint:
    """A file's SHA-256 and its stat when hashed.

    :meth:`unchanged` trusts an identical stat (a write always moves ctime, which no user call can set
    back) unless the file was modified within :data:`_RACY_SECONDS` of the hashing, when a second write could
    carry the same coarse timestamps; then, and whenever the stat differs, it hashes again. So a graph
    re-reads a 100 MB caffemodel only when it may really have changed.
    """

    digest: str
    stat: tuple[int, int, int, int, int] | None
    trusted_stat: bool

    @classmethod
    def of(cls, path: str) -> FileFingerprint:
        stat = _stat_key(path)
        digest = file_digest(path)
        hashed_at = time.time_ns()
        trusted = stat is not None and stat == _stat_key(path) and \
            hashed_at - max(stat[3], stat[4]) > _RACY_SECONDS * 1e9
        return cls(digest, stat, trusted)

    def unchanged(self, path: str) -> bool | None:
        """True if ``path`` still has these bytes, False if not, None if it is gone."""
        stat = _stat_key(path)
        if stat is None or not os.path.isfile(path):
            return None
        if self.trusted_stat and stat == self.stat:
            return True
        return file_digest(path) == self.digest


@dataclass(frozen=True)
class QuantLayerInfo:
    """A quantized layer as ``quantize_model`` prepared it.

    Attributes:
        name, layer_type: the layer and its Caffe type.
        channel_wise: per-output-channel weight scales (False for AVE Pooling).
        cout: the output channels of its weight (None for AVE Pooling).
        scale_w: the ARQ weight scales written to the record (``[1.0]`` for AVE Pooling).
    """

    name: str
    layer_type: str
    channel_wise: bool
    cout: int | None
    scale_w: np.ndarray

    @property
    def has_weights(self) -> bool:
        return self.layer_type not in WEIGHTLESS_TYPES


@dataclass
class CalibrationModel:
    """What ``quantize_model`` made: the calibration model's files and the folded net ``save_model`` uses.

    Attributes:
        model_file, weights_file: the calibration prototxt and caffemodel written.
        net: the folded inference view WITHOUT the IFMR layers (what the saved models are built from).
        weights: its float weights (BatchNorm folded).
        folds: the BatchNorm folds made.
        layers: the quantized layers, in file order.
        groups: the IFMR layers inserted.
    """

    model_file: str
    weights_file: str
    net: caffe_pb2.NetParameter
    weights: Weights
    folds: list[BNFold]
    layers: dict[str, QuantLayerInfo]
    groups: list[CalibrationGroup]


class CalibrationGraph:
    """The graph ``init`` returns: the model's inference view, its weights and config, and what
    ``quantize_model`` made of them.

    It remembers the files it was built from (absolute paths, SHA-256 of their contents and their stat);
    ``quantize_model`` and ``save_model`` refuse it (:class:`GraphStateError`) once one of them changed.

    Attributes:
        config_file, model_file, weights_file, record_file: the ``init`` arguments (absolute paths).
        config: the validated PTQ config.
        net: the inference view of the model (TEST phase; the original ``state`` kept).
        weights: its float weights by layer name.
        calibration: set by ``quantize_model``; None before.
    """

    def __init__(
        self,
        config_file: str,
        model_file: str,
        weights_file: str,
        record_file: str,
        config: QuantConfig,
        net: caffe_pb2.NetParameter,
        weights: Weights,
        like: caffe_pb2.NetParameter | None = None,
    ) -> None:
        self.config_file = os.path.abspath(config_file)
        self.model_file = os.path.abspath(model_file)
        self.weights_file = os.path.abspath(weights_file)
        self.record_file = os.path.abspath(record_file)
        self.config = config
        self.net = net
        self.weights = weights
        #: The parsed caffemodel, kept only when it stores legacy 4-D blob shapes to write back alike.
        self.like = like
        self.fingerprints = {path: FileFingerprint.of(path) for path in self.input_files}
        self.calibration: CalibrationModel | None = None

    @property
    def input_files(self) -> tuple[str, str, str]:
        return (self.config_file, self.model_file, self.weights_file)

    def check_unchanged(self, api: str) -> None:
        """Raise :class:`GraphStateError` if an input file changed (or vanished) since ``init``."""
        names = {self.config_file: "config_file", self.model_file: "model_file",
                 self.weights_file: "weights_file"}
        for path, fingerprint in self.fingerprints.items():
            same = fingerprint.unchanged(path)
            if not same:
                what = "was removed" if same is None else "changed"
                raise GraphStateError(
                    f"{api}: the {names[path]} '{path}' {what} after init() built this graph; the graph no "
                    "longer matches its files. Call init() again (and create_quant_config() first if the "
                    "model changed)."
                )

    def __repr__(self) -> str:
        state = "quantized" if self.calibration is not None else "initialised"
        return (f"CalibrationGraph(model_file={self.model_file!r}, {len(self.config.enabled)} quantized "
                f"layer(s), {state})")


# -- init ----------------------------------------------------------------------------------------------------
def _check_weights_fit(view: caffe_pb2.NetParameter, caffemodel: caffe_pb2.NetParameter, model_file: str,
                       weights_file: str) -> None:
    """The caffemodel's blobs must fit the prototxt (checked by loading them into the engine's float net).

    A net the engine cannot build (e.g. data layers whose sources are absent) is not checked here.
    """
    engine, problem = shape_net(view, TEST)
    if engine is None:
        LOGGER.debug("Model '%s' not built in the engine (%s); weights not checked against it.", model_file,
                     problem)
        return
    try:
        engine.copy_from(caffemodel)
    except ModelFormatError as exc:
        raise type(exc)(f"Weights '{weights_file}' do not fit model '{model_file}': {exc}") from exc


def init(
    config_file: str | os.PathLike[str],
    model_file: str | os.PathLike[str],
    weights_file: str | os.PathLike[str],
    scale_offset_record_file: str | os.PathLike[str],
) -> CalibrationGraph:
    """Build the graph of the PTQ flow (see ``amct_caffe.amct.init``).

    Raises:
        ConfigError: the config is invalid for this model (another model's config, bad values), enables no
            layer, or the model already holds AMCT layers; the record path is an input or a folder.
        ModelFormatError: the prototxt or caffemodel is missing or malformed, or they do not fit together.
    """
    config_file, model_file, weights_file, record_file = (
        os.fspath(p) for p in (config_file, model_file, weights_file, scale_offset_record_file))
    inputs = {"config_file": config_file, "model_file": model_file, "weights_file": weights_file}
    conflict = output_conflict([("scale_offset_record_file", record_file)], inputs.items())
    if conflict is not None and conflict.kind == "folder":
        raise ConfigError(f"init: scale_offset_record_file '{record_file}' is a folder; give a file path.")
    if conflict is not None:
        raise ConfigError(f"init: scale_offset_record_file '{record_file}' is the {conflict.other}; the "
                          "record is (over)written, give it its own path.")
    _, graph = inference_view(model_file)
    layers = ptq_model_layers(graph)
    _quantizable_or_fail(layers, model_file)
    config = load_json_config(config_file, layers, model_file)
    if not config.enabled:
        raise ConfigError(f"PTQ config '{config_file}' enables no layer (every quant_enable is false); set "
                          "quant_enable to true for the layers to quantize.")
    caffemodel = load_caffemodel(weights_file)
    weights = weights_from_net(caffemodel, weights_file)
    view = graph.to_net_parameter()
    _check_weights_fit(view, caffemodel, model_file, weights_file)
    like = caffemodel if any(has_legacy_shape(b) for layer in caffemodel.layer for b in layer.blobs) else None
    del caffemodel
    result = CalibrationGraph(config_file, model_file, weights_file, record_file, config, view, weights, like)
    atomic_write(record_file, b"")
    LOGGER.info("Init success: model '%s', %d layer(s) to quantize, record file '%s' created.", model_file,
                len(config.enabled), record_file)
    return result



# -- quantize_model ----------------------------------------------------------------------------------------
def _check_outputs(api: str, outputs: Mapping[str, str], inputs: Mapping[str, str]) -> None:
    """Outputs must be distinct files that are none of the inputs (nor existing folders)."""
    conflict = output_conflict(outputs.items(), inputs.items())
    if conflict is None:
        return
    name, path = conflict.name, conflict.path
    if conflict.kind == "folder":
        raise ConfigError(f"{api}: {name} '{path}' is a folder; give a file path.")
    if conflict.kind == "input":
        raise ConfigError(f"{api}: {name} '{path}' is the {conflict.other}; write the outputs to new files.")
    raise ConfigError(f"{api}: {name} and {conflict.other} are the same file '{path}'; give each output its "
                      "own path.")


def _fold(graph: Graph, weights: Weights, config: QuantConfig) -> tuple[list[BNFold], list[str]]:
    """Fold as the config says; returns the folds made and the layers whose fold the config skipped (a
    BatchNorm still reads their output; the record says ``skip_fusion`` for them)."""
    skip = set(config.skip_fusion_layers) if config.do_fusion else {
        layer.name for layer in graph if layer.type in FOLDABLE_TYPES}
    folds = fuse_bn_one_phase(graph, weights, FOLDABLE_TYPES, skip) if config.do_fusion else []
    skipped = [name for name in sorted(skip) if name in graph and graph.layer(name).type in FOLDABLE_TYPES
               and any(reader.type == "BatchNorm" for reader, _ in graph.consumers(name, 0))]
    return folds, skipped


def _layer_info(graph: Graph, weights: Weights, config: QuantConfig, name: str) -> QuantLayerInfo:
    """The quantized layer ``name``: its ARQ weight scales on the folded weights."""
    cfg = config.layers[name]
    layer = graph.layer(name)
    if not cfg.has_weights:
        return QuantLayerInfo(name, layer.type, False, None, np.ones(1, np.float32))
    blobs = weights.get(name)
    if not blobs:
        raise ModelFormatError(f"Layer '{name}' of model '{graph.path}' has no weights in the caffemodel, "
                               "so it cannot be quantized; give the caffemodel of this model.")
    channel_wise = bool(cfg.channel_wise)
    if channel_wise and layer.type != "InnerProduct" and layer.convolution_param.axis not in (1, -3):
        raise UnsupportedLayerError(
            f"Layer '{name}' of '{graph.path}' has convolution_param axis {layer.convolution_param.axis}: "
            "its output is not N x C x H x W, so its DeQuant cannot hold channel-wise scales. Set "
            "channel_wise "
            "to false for it in the PTQ config, or skip the layer."
        )
    axis = weight_channel_axis(layer.type)
    try:
        scale_w = arq_scale(blobs[0], channel_wise, axis).numpy().astype(np.float32)
    except AmctError as exc:
        raise type(exc)(f"Layer '{name}' of '{graph.path}': {exc}") from exc
    return QuantLayerInfo(name, layer.type, channel_wise, int(blobs[0].shape[axis]), scale_w)


def _weight_records(
    layers: Mapping[str, QuantLayerInfo], skipped_folds: Iterable[str]
) -> dict[str, LayerRecord]:
    skipped = set(skipped_folds)
    return {name: LayerRecord(scale_w=[float(v) for v in info.scale_w], offset_w=[0] * info.scale_w.size,
                              skip_fusion=name in skipped)
            for name, info in layers.items()}


def quantize_model(
    graph: CalibrationGraph,
    modified_model_file: str | os.PathLike[str],
    modified_weights_file: str | os.PathLike[str],
) -> CalibrationModel:
    """Write the calibration model (see ``amct_caffe.amct.quantize_model``); the graph remembers it.

    Raises:
        GraphStateError: an input file of the graph changed since ``init``.
        ConfigError: output paths collide with each other or the inputs; an enabled layer cannot take an
            IFMR layer.
        ModelFormatError: a quantized layer has no weights; an inserted name is taken.
        UnsupportedLayerError: channel-wise scales for a convolution whose output is not N x C x H x W.
    """
    api = "quantize_model"
    if not isinstance(graph, CalibrationGraph):
        raise ConfigError(f"{api}: graph must be the object init() returns, got {type(graph).__name__}.")
    graph.check_unchanged(api)
    model_out, weights_out = os.fspath(modified_model_file), os.fspath(modified_weights_file)
    _check_outputs(api, {"modified_model_file": model_out, "modified_weights_file": weights_out,
                         "scale_offset_record_file": graph.record_file},
                   {"config_file": graph.config_file, "model_file": graph.model_file,
                    "weights_file": graph.weights_file})
    config = graph.config
    work = Graph(graph.net, graph.model_file)
    weights: Weights = dict(graph.weights)
    folds, skipped_folds = _fold(work, weights, config)
    layers = {name: _layer_info(work, weights, config, name) for name in config.enabled}
    groups = plan_calibration_groups(work, {name: config.layers[name] for name in config.enabled})
    folded = work.to_net_parameter()
    insert_calibration_layers(work, groups, config.batch_num, config.activation_offset, graph.record_file)
    calibration_net = work.to_net_parameter()
    calibration_weights = weights_to_net(weights, calibration_net, like=graph.like)
    records = _weight_records(layers, skipped_folds)
    order = list(layers)
    validate_records(records, graph.record_file)
    with AtomicFiles() as files:
        files.write(model_out, prototxt_text(calibration_net).encode("utf-8"))
        files.write(weights_out, calibration_weights.SerializeToString())
        files.write(graph.record_file, record_text(records, order).encode("utf-8"))
    graph.calibration = CalibrationModel(model_out, weights_out, folded, weights, folds, layers, groups)
    for fold in folds:
        LOGGER.debug("Fused BatchNorm '%s'%s into %s.", fold.batch_norm,
                     f" and Scale '{fold.scale}'" if fold.scale else "", fold.conv)
    for name in skipped_folds:
        LOGGER.info("Layer '%s': BatchNorm fusion skipped by the config (skip_fusion in the record).", name)
    LOGGER.info("Quantize model success: calibration model '%s' and '%s' with %d IFMR layer(s) for %d "
                "quantized layer(s); run it forward %d time(s), then call save_model.", model_out,
                weights_out, len(groups), len(layers), config.batch_num)
    return graph.calibration


# -- save_model ----------------------------------------------------------------------------------------------
def _calibrated_records(graph: CalibrationGraph, calibration: CalibrationModel) -> dict[str, LayerRecord]:
    """The record's entries of the quantized layers, each complete enough to save.

    Raises:
        RecordError: the record is missing or malformed; a layer lacks ``scale_d``/``offset_d`` (the
            calibration has not run) or its ``scale_w`` does not fit the layer.
    """
    path = graph.record_file
    if not os.path.isfile(path):
        raise RecordError(f"save_model: the scale_offset_record_file '{path}' does not exist; run init(), "
                          "quantize_model() and the calibration batches again.")
    couts = {name: info.cout for name, info in calibration.layers.items() if info.cout is not None}
    records = read_records(path, couts=couts)
    missing = [name for name in calibration.layers
               if name not in records or records[name].scale_d is None or records[name].offset_d is None]
    if missing:
        raise RecordError(
            f"save_model: the scale_offset_record_file '{path}' has no scale_d/offset_d for layer(s) "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}: the calibration has not run. Run the "
            f"calibration model '{calibration.model_file}' (weights '{calibration.weights_file}') forward "
            f"{graph.config.batch_num} time(s) (batch_num) in Caffe or amct_caffe.caffe, then call "
            "save_model."
        )
    for name, info in calibration.layers.items():
        rec = records[name]
        if not info.has_weights:
            continue
        expected = info.cout if info.channel_wise else 1
        if len(rec.scale_w) != expected:
            raise RecordError(
                f"save_model: record '{path}', layer '{name}': scale_w has {len(rec.scale_w)} value(s) but "
                f"the layer is quantized {'per output channel' if info.channel_wise else 'per tensor'} and "
                "needs "
                f"{expected}; the record was changed after quantize_model. Run quantize_model and the "
                "calibration again."
            )
    return records


def calibrated_factors(
    graph: CalibrationGraph, calibration: CalibrationModel
) -> Factors:
    """Each quantized layer's ``(type, scale_d, offset_d, scale_w, channel_wise)`` from the calibrated record,
    in the form :func:`plan_quant_groups` takes.

    Raises:
        RecordError: the record lacks the calibration's factors or does not fit the layers.
    """
    records = _calibrated_records(graph, calibration)
    factors = {}
    for name, info in calibration.layers.items():
        rec = records[name]
        scale_w = np.asarray(rec.scale_w, np.float32) if info.has_weights else np.ones(1, np.float32)
        factors[name] = (info.layer_type, float(rec.scale_d), int(rec.offset_d), scale_w,  # type: ignore[arg-type]
                         info.channel_wise)
    return factors


def plan_quant_groups(
    graph: Graph,
    layers: Mapping[str, LayerFactors],
    with_offset: bool = True,
) -> list[QuantGroup]:
    """The ``Quant`` layers for the quantized ``layers`` (``name -> (type, scale_d, offset_d, scale_w,
    channel_wise)``): one per input value and factor pair, the layers in file order.

    Layers that read one value with equal ``scale_d``/``offset_d`` share a ``Quant`` (the calibration of a
    shared input gives them equal factors); different factors (a hand-written record) get one each.
    """
    groups = []
    for blob, readers in readers_by_value(graph, list(layers)):
        by_factors: dict[tuple[float, int], list[QuantizedLayer]] = {}
        for name in readers:
            layer_type, scale_d, offset_d, scale_w, channel_wise = layers[name]
            key = (float(np.float32(scale_d)), int(offset_d))
            by_factors.setdefault(key, []).append(
                QuantizedLayer(name, layer_type, key[0], key[1], np.asarray(scale_w, np.float32),
                               channel_wise))
        groups += [QuantGroup(blob, key[0], key[1], tuple(members), with_offset)
                   for key, members in by_factors.items()]
    order = {layer.name: i for i, layer in enumerate(graph)}
    return sorted(groups, key=lambda g: order[g.layers[0].name])


@dataclass
class SavedModels:
    """The models ``save_model`` / ``convert_model`` built: the prototxt (both models share it) and the
    caffemodels (None when ``save_type`` leaves one out)."""

    net: caffe_pb2.NetParameter
    fake: caffe_pb2.NetParameter | None
    deploy: caffe_pb2.NetParameter | None
    groups: list[QuantGroup] = field(default_factory=list)
    #: The float weights the caffemodels were built from (the ATC view reads a depthwise layer's channels).
    weights: Weights = field(default_factory=dict)


def build_saved_models(
    net: caffe_pb2.NetParameter,
    weights: Weights,
    groups: Sequence[QuantGroup],
    save_type: str,
    api: str,
    like: caffe_pb2.NetParameter | None = None,
    codes: Mapping[str, np.ndarray] | None = None,
) -> SavedModels:
    """Insert ``Quant``/``DeQuant`` into ``net`` and build the fake-quant and/or deploy caffemodels.

    ``codes`` (layer name -> INT8 weight codes) replace ARQ's codes of those layers (learned rounding).

    Raises:
        BiasOverflowError: a quantized bias does not fit INT32 (the message names the layer; callers add how
            to skip it in their flow).
    """
    graph = Graph(net, net.name)
    insert_quant_layers(graph, groups)
    saved = graph.to_net_parameter()
    try:
        chosen = {**all_weight_codes(weights, groups), **(codes or {})}
        fake = fake_quant_caffemodel(saved, weights, groups, like, chosen) if save_type != "Deploy" else None
        deploy = deploy_caffemodel(saved, weights, groups, like, chosen) if save_type != "Fakequant" else None
    except BiasOverflowError as exc:
        raise BiasOverflowError(f"{api}: {exc}", exc.channels, exc.layer) from exc
    return SavedModels(saved, fake, deploy, list(groups), weights)


def quant_info(
    groups: Sequence[QuantGroup], folds: Sequence[BNFold], net: caffe_pb2.NetParameter
) -> dict[str, Any]:
    """The ``<save_path>_quant.json`` object (docs/design.md): where the quant layers went, what was fused."""
    top_of = {layer.name: layer.top[0] for layer in net.layer if len(layer.top) == 1}
    layers = []
    for group in groups:
        for layer in group.layers:
            dequant = dequant_layer_name(layer.name)
            layers.append({
                "layer": layer.name,
                "type": layer.layer_type,
                "quant_layer": group.name,
                "quant_bottom": group.bottom,
                "dequant_layer": dequant,
                "dequant_top": top_of.get(dequant, ""),
                "scale_d": layer.scale_d,
                "offset_d": layer.offset_d,
                "channel_wise": layer.channel_wise,
            })
    fusions = [{"layer": fold.conv, "fused_layers": [n for n in (fold.batch_norm, fold.scale) if n]}
               for fold in folds]
    return {"version": QUANT_INFO_VERSION, "quantized_layers": layers, "fusions": fusions}


def write_saved_models(
    paths: Sequence[str | None], models: SavedModels, extra: Mapping[str, bytes],
    atc: AtcRequest | None = None, model_file: str = "",
) -> None:
    """Write the saved models (``paths`` from ``save.model_paths``) and ``extra`` files, all-or-nothing;
    with ``atc``, the fake-quant prototxt in its inference view and the deploy prototxt (and its
    caffemodel's type strings) in ATC's form (``workflows.inference``).

    Raises:
        AtcUnsupportedLayerError: ``atc`` and the deploy model holds a layer type ATC does not convert.
        ConfigError: ``atc`` and a data layer's input shape is unknown.
    """
    fake_model, fake_weights, deploy_model, deploy_weights = paths
    fake_text = deploy_text = prototxt_text(models.net).encode("utf-8")
    if atc is not None:
        views = inference_models(models.net, models.weights, atc, model_file or models.net.name,
                                 fake=models.fake is not None, deploy=models.deploy is not None)
        if views.fake is not None:
            fake_text = prototxt_text(views.fake).encode("utf-8")
        if views.deploy is not None and models.deploy is not None:
            deploy_text = prototxt_text(views.deploy.net).encode("utf-8")
            views.retype_deploy_weights(models.deploy)
    with AtomicFiles() as files:
        if models.fake is not None and fake_model and fake_weights:
            files.write(fake_model, fake_text)
            files.write(fake_weights, models.fake.SerializeToString())
        if models.deploy is not None and deploy_model and deploy_weights:
            files.write(deploy_model, deploy_text)
            files.write(deploy_weights, models.deploy.SerializeToString())
        for path, data in extra.items():
            files.write(path, data)


def _refined(
    graph: CalibrationGraph,
    calibration: CalibrationModel,
    weights: Weights,
    groups: Sequence[QuantGroup],
    refine: str,
    data: Sequence[Mapping[str, np.ndarray]],
    api: str,
) -> tuple[Weights, dict[str, np.ndarray] | None]:
    """The float weights and INT8 codes of the saved models after ``refine`` (``workflows.refine``): every
    refinement compares the folded float model with the plain fake-quant model on ``data``, layer by layer
    in file order. ``weights``: the folded float weights (equalized, when that ran)."""
    fake = build_saved_models(calibration.net, weights, groups, "Fakequant", api, graph.like)
    assert fake.fake is not None
    float_weights = weights_to_net(weights, calibration.net, like=graph.like)
    by_name = {layer.name: layer for group in groups for layer in group.layers}
    ordered = [by_name[name] for name in calibration.layers if name in by_name]
    nets = (calibration.net, float_weights, fake.net, fake.fake)
    if refine == "bias_correction":
        factors = {layer.name: (layer.scale_d, layer.scale_w) for layer in ordered}
        return bias_correction(*nets, factors, weights, data, api), None
    weighted = [layer for layer in ordered if layer.has_weights]
    if refine == "adaround":
        grids = {layer.name: (layer.scale_w, layer.axis) for layer in weighted}
        return weights, adaround(*nets, grids, weights, data, api)
    code_layers = {layer.name: CodeLayer(layer.scale_d, layer.scale_w, layer.axis) for layer in weighted}
    return end_to_end(*nets, code_layers, weights, data, api)


def save_model(
    graph: CalibrationGraph,
    save_type: str,
    save_path: str | os.PathLike[str],
    extra_files: Mapping[str, bytes] | None = None,
    *,
    refine: str | Sequence[str] | None = None,
    calibration_data: Sequence[Mapping[str, np.ndarray]] | None = None,
    for_atc: bool = False,
    input_shape: InputShapes | None = None,
) -> SavedModels:
    """Write the fake-quant and/or deploy model after the calibration (see ``amct_caffe.amct.save_model``).

    ``extra_files`` (path -> bytes) are written in the same all-or-nothing step (the command line's copies of
    the config and the record). ``refine="bias_correction"`` (off by default) corrects the quantized layers'
    float biases on ``calibration_data`` before the models are built; ``refine="adaround"`` learns their
    INT8 weight codes (floor or ceil on ARQ's grid) on it instead; ``refine="end_to_end"`` trains the codes
    and the float biases with the whole fake-quant model in the loop (``workflows.refine``);
    ``"equalization"``, alone or in a list with one of those, first rescales the channels of the quantized
    layers' inputs and calibrates them again (``workflows.equalize``). ``for_atc``
    writes the inference / ATC-ready prototxts (``workflows.inference``; ``input_shape``: ``{top: shape}``
    of the Input layers that replace data layers, when the net cannot tell).

    Raises:
        ConfigError: a bad ``save_type``/``save_path``; a quantized bias outside INT32.
        GraphStateError: an input file of the graph changed since ``init``.
        RecordError: ``quantize_model`` has not run on this graph, or the record lacks the calibration's
            factors (the calibration model has not run ``batch_num`` batches).
    """
    api = "save_model"
    if not isinstance(graph, CalibrationGraph):
        raise ConfigError(f"{api}: graph must be the object init() returns, got {type(graph).__name__}.")
    plan = refine_plan(refine, calibration_data, api)
    save_type = check_save_type(save_type, api)
    atc_request(for_atc, input_shape, api)  # argument check before any work
    save_path = os.fspath(save_path)
    paths = model_paths(save_path, save_type, api)
    info_path = save_path + QUANT_INFO_SUFFIX
    outputs = {name: p for name, p in zip(("fake-quant model", "fake-quant weights", "deploy model",
                                            "deploy weights", "quant info file"), (*paths, info_path)) if p}
    graph.check_unchanged(api)
    calibration = graph.calibration
    if calibration is None:
        raise RecordError(
            f"{api}: quantize_model() has not run on this graph, so there is no calibration to save. Call "
            "quantize_model(graph, modified_model_file, modified_weights_file), run the modified model "
            f"forward {graph.config.batch_num} time(s), then save_model()."
        )
    _check_outputs(api, outputs, {"config_file": graph.config_file, "model_file": graph.model_file,
                                  "weights_file": graph.weights_file, "record file": graph.record_file,
                                  "modified model": calibration.model_file,
                                  "modified weights": calibration.weights_file})
    factors = calibrated_factors(graph, calibration)
    equalized: Equalized | None = None
    if plan is not None and plan.equalize and calibration_data:
        equalized = equalize(calibration.net, calibration.weights, factors, calibration.groups,
                             graph.config.activation_offset, calibration_data, graph.model_file, graph.like,
                             api)
        factors = equalized.factors
    net_graph = Graph(calibration.net, graph.model_file)
    groups = plan_quant_groups(net_graph, factors, graph.config.activation_offset)
    hint = (f"Set \"quant_enable\": false for layer '{{layer}}' in the PTQ config '{graph.config_file}' and "
            "run init/quantize_model/calibration again (the layer then stays float).")
    try:
        weights: Weights = calibration.weights if equalized is None else equalized.weights
        codes: dict[str, np.ndarray] | None = None
        if plan is not None and plan.weights is not None and calibration_data:
            weights, codes = _refined(graph, calibration, weights, groups, plan.weights, calibration_data,
                                      api)
        models = build_saved_models(calibration.net, weights, groups, save_type, api, graph.like, codes)
    except BiasOverflowError as exc:
        raise BiasOverflowError(f"{exc} {hint.format(layer=exc.layer)}", exc.channels, exc.layer) from exc
    placement = quant_info(groups, calibration.folds, models.net)
    if equalized is not None and equalized.pairs:
        placement["equalizations"] = equalized.info()
    extra = {info_path: (json.dumps(placement, indent=4) + "\n").encode("utf-8"), **(extra_files or {})}
    atc = atc_request(for_atc, input_shape, api, recorded_by_blob(groups, record_shapes(graph.record_file)))
    write_saved_models(paths, models, extra, atc, graph.model_file)
    for group in groups:
        for layer in group.layers:
            LOGGER.info('Do layer: "%s" quant success!', layer.name)
    written = ", ".join(f"'{p}'" for p in (*paths, info_path) if p)
    LOGGER.info("Save model (%s) success: %d quantized layer(s), %d Quant layer(s); files %s.", save_type,
                sum(len(g.layers) for g in groups), len(groups), written)
    return models
