"""AMCT's post-training quantization (PTQ, "calibration") config: the JSON file and the simplified ``.cfg``.

Like :mod:`amct_caffe.quant.config` (the QAT config, whose readers and message helpers this module shares),
this is pure data: the model is described by :class:`~amct_caffe.quant.config.ModelLayer` records.

The JSON file (written by ``create_quant_config``, read by ``init``)::

    {
        "version": 1,
        "batch_num": 1,
        "activation_offset": true,
        "do_fusion": true,
        "skip_fusion_layers": [],
        "conv1": {
            "quant_enable": true,
            "activation_quant_params": {"max_percentile": 0.999999, "min_percentile": 0.999999,
                                        "search_range": [0.7, 1.3], "search_step": 0.01},
            "weight_quant_params": {"channel_wise": true}
        },
        "pool2": {
            "quant_enable": true,
            "activation_quant_params": {...}
        }
    }

Rules (AMCT's documented ranges; the choices where its documentation is silent are in docs/design.md):

* ``batch_num`` an integer > 0; ``activation_offset``/``do_fusion``/``quant_enable``/``channel_wise``
  booleans; ``skip_fusion_layers`` names Convolution/Deconvolution/InnerProduct layers of the model;
* ``max_percentile``/``min_percentile`` in (0.5, 1]; ``search_range`` ``[start, end]`` with
  ``0 < start < end``; ``search_step`` in (0, end - start];
* ``channel_wise`` true only for Convolution/Deconvolution (the record holds per-channel weight scales for
  them only); AVE Pooling has no ``weight_quant_params``;
* every layer key is a layer of the model that amct-caffe can quantize (a config of another model fails
  here); quantizable layers the file does not list stay float.

The simplified ``.cfg`` is proto text of ``amct.AMCTConfig`` (AMCT's ``calibration_config_caffe.proto``):
``batch_num``, ``activation_offset``, ``do_fusion``, ``skip_fusion_layers``, ``skip_layers``,
``skip_layer_types``, ``common_config``, ``override_layer_types``, ``override_layer_configs``. A layer's
``calibration_config`` is taken as a whole message from the first that applies -- its
``override_layer_configs`` entry, the ``override_layer_types`` entry of its type, ``common_config`` -- as the
QAT ``.cfg`` does; fields unset in that message take AMCT's defaults.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import text_format

from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.proto import amct_pb2
from amct_caffe.quant.config import (
    CHANNEL_WISE_TYPES,
    JSON_VERSION,
    QAT_LAYER_TYPES,
    WEIGHTLESS_TYPES,
    ConfigReporter,
    JsonObject,
    ModelLayer,
    check_channel_wise,
    check_json_object,
    default_channel_wise,
    expect_json,
    float32_value,
    json_key,
    loads_json,
    read_config_text,
)

LOGGER = get_logger("quant.ptq_config")

#: How the PTQ JSON config and the simplified PTQ config are named in messages.
JSON_KIND = "PTQ config"
CFG_KIND = "Simplified PTQ config"
#: The layer types PTQ quantizes (the same family as QAT: AMCT reference §2.1).
PTQ_LAYER_TYPES = QAT_LAYER_TYPES
#: The layer types a BatchNorm (+ Scale) after them is folded into by PTQ (``skip_fusion_layers`` names them).
FUSION_LAYER_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
#: The top-level keys of the JSON file (a layer cannot have one of these names).
GLOBAL_KEYS = ("version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers")
_LAYER_KEYS = ("quant_enable", "activation_quant_params", "weight_quant_params")
_ACTIVATION_KEYS = ("max_percentile", "min_percentile", "search_range", "search_step")
_WEIGHT_KEYS = ("channel_wise",)


@dataclass(frozen=True)
class IfmrParams:
    """The IFMR search of one layer's input (``activation_quant_params``; the ``IFMR`` layer's parameter).

    Attributes:
        max_percentile, min_percentile: which ranked values are the range's ends (in (0.5, 1]).
        search_range_start, search_range_end: clip candidates are these multiples of the maximum.
        search_step: the step between candidates.
    """

    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range_start: float = 0.7
    search_range_end: float = 1.3
    search_step: float = 0.01


@dataclass(frozen=True)
class LayerQuantConfig:
    """The PTQ settings of one layer (one layer entry of the JSON config).

    Attributes:
        name: the Caffe layer name (the JSON key).
        layer_type: its Caffe type (not written; decides which settings apply).
        quant_enable: false keeps the layer float.
        ifmr: the activation calibration settings.
        channel_wise: per-output-channel weight scales; None for layers without weights (AVE Pooling).
    """

    name: str
    layer_type: str
    quant_enable: bool = True
    ifmr: IfmrParams = field(default_factory=IfmrParams)
    channel_wise: bool | None = None

    @property
    def has_weights(self) -> bool:
        return self.layer_type not in WEIGHTLESS_TYPES


@dataclass(frozen=True)
class QuantConfig:
    """A whole PTQ config.

    Attributes:
        batch_num: calibration batches the ``IFMR`` layers gather before they compute the factors.
        activation_offset: asymmetric activations (an offset); false: symmetric, ``offset_d = 0``.
        do_fusion: fold BatchNorm (+ Scale) into the Convolution/Deconvolution/InnerProduct before them.
        skip_fusion_layers: layers whose BatchNorm is not folded (when ``do_fusion``).
        layers: layer name -> settings, in model order.
    """

    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: tuple[str, ...] = ()
    layers: Mapping[str, LayerQuantConfig] = field(default_factory=dict)

    @property
    def enabled(self) -> list[str]:
        """The layers to quantize, in model order."""
        return [name for name, layer in self.layers.items() if layer.quant_enable]

    def fusion_allowed(self, layer: str) -> bool:
        """Whether a BatchNorm (+ Scale) after ``layer`` is folded into it."""
        return self.do_fusion and layer not in self.skip_fusion_layers


# -- defaults and the arguments of create_quant_config -------------------------------------------------------
def default_layer_config(name: str, layer_type: str, quant_enable: bool = True) -> LayerQuantConfig:
    """The settings ``create_quant_config`` writes for a layer when no ``.cfg`` is given."""
    return LayerQuantConfig(name, layer_type, quant_enable, IfmrParams(), default_channel_wise(layer_type))


def check_batch_num(value: Any, where: str) -> int:
    """``batch_num`` must be an int > 0 (a bool is not); ``where`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: batch_num must be an integer > 0, got {value!r}. The calibration runs "
                          "batch_num forward batches; give e.g. batch_num=1.")
    return value


def default_config(
    model: Sequence[ModelLayer],
    skip_layers: Iterable[str] = (),
    batch_num: int = 1,
    activation_offset: bool = True,
    model_file: str = "",
) -> QuantConfig:
    """The PTQ config ``create_quant_config`` writes from its arguments: every quantizable layer of ``model``,
    those in ``skip_layers`` with ``quant_enable: false``.

    Raises:
        ConfigError: a skip layer is not in the model; a bad ``batch_num``/``activation_offset``.
    """
    where = f"create_quant_config (model '{model_file}')" if model_file else "create_quant_config"
    check_batch_num(batch_num, where)
    if not isinstance(activation_offset, bool):
        raise ConfigError(f"{where}: activation_offset must be True or False, got {activation_offset!r}.")
    by_name = {layer.name: layer for layer in model}
    skipped = set()
    for name in skip_layers:
        if name not in by_name:
            raise ConfigError(f"{where}: skip_layers names '{name}', which the model has no layer of (in its "
                              "TEST-phase view); remove it or correct the layer name.")
        if not by_name[name].quantizable:
            LOGGER.info("skip_layers names '%s' (%s), which is not quantized anyway.", name,
                        by_name[name].layer_type)
        skipped.add(name)
    layers = {}
    for layer in model:
        if layer.quantizable:
            check_layer_name(layer.name, where)
            layers[layer.name] = default_layer_config(layer.name, layer.layer_type, layer.name not in skipped)
    return QuantConfig(batch_num, activation_offset, True, (), layers)


def check_layer_name(name: str, where: str) -> None:
    """A layer cannot be written to the JSON config under a name its top level uses."""
    if name in GLOBAL_KEYS:
        raise ConfigError(
            f"{where}: a layer named '{name}' cannot be written to a PTQ JSON config: the key is the file's "
            f"'{name}' field. Rename the layer in the prototxt."
        )


# -- writing ------------------------------------------------------------------------------------------------
def _activation_json(params: IfmrParams) -> dict[str, Any]:
    return {
        "max_percentile": params.max_percentile,
        "min_percentile": params.min_percentile,
        "search_range": [params.search_range_start, params.search_range_end],
        "search_step": params.search_step,
    }


def config_to_json_dict(config: QuantConfig) -> dict[str, Any]:
    """The JSON object of a config: the global keys, then the layers in model order."""
    out: dict[str, Any] = {
        "version": JSON_VERSION,
        "batch_num": config.batch_num,
        "activation_offset": config.activation_offset,
        "do_fusion": config.do_fusion,
        "skip_fusion_layers": list(config.skip_fusion_layers),
    }
    for name, layer in config.layers.items():
        check_layer_name(name, "PTQ config")
        entry: dict[str, Any] = {"quant_enable": layer.quant_enable,
                                 "activation_quant_params": _activation_json(layer.ifmr)}
        if layer.has_weights:
            channel_wise = layer.channel_wise
            if channel_wise is None:
                channel_wise = bool(default_channel_wise(layer.layer_type))
            entry["weight_quant_params"] = {"channel_wise": channel_wise}
        out[name] = entry
    return out


def dumps_json(config: QuantConfig) -> str:
    """The text of the JSON config file (4-space indent and a final newline, as the QAT config)."""
    return json.dumps(config_to_json_dict(config), indent=4) + "\n"


# -- shared value checks -------------------------------------------------------------------------------------
def _check_percentile(value: float, rep: ConfigReporter, where: str) -> None:
    if not (math.isfinite(value) and 0.5 < value <= 1.0):
        raise rep.error(where, f"must be in (0.5, 1], got {value}",
                        "Use e.g. 0.999999 (the extreme value unless there are more than a million values).")


def _check_search(start: float, end: float, step: float, rep: ConfigReporter, at: Callable[[str], str],
                  names: tuple[str, str, str]) -> None:
    """``0 < start < end`` and ``0 < step <= end - start``; ``at(name)`` says where ``name`` is."""
    start_name, end_name, step_name = names
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 < start < end):
        raise rep.error(at(start_name), f"the search range [{start}, {end}] must satisfy 0 < {start_name} < "
                        f"{end_name}", "Use e.g. [0.7, 1.3].")
    if not (math.isfinite(step) and 0.0 < step <= end - start):
        raise rep.error(at(step_name), f"{step_name} must be in (0, {end_name} - {start_name}] = (0, "
                        f"{end - start:.9g}], got {step}", "Use e.g. 0.01.")


def _check_skip_fusion(names: Iterable[str], by_name: Mapping[str, ModelLayer], rep: ConfigReporter,
                       where: str) -> tuple[str, ...]:
    out = []
    for name in names:
        layer = by_name.get(name)
        if layer is None:
            raise rep.error(f"{where} '{name}'", f"{rep.model} has no layer named '{name}'",
                            "Remove it or correct the layer name.")
        if layer.layer_type not in FUSION_LAYER_TYPES:
            raise rep.error(f"{where} '{name}'", f"layer '{name}' is a {layer.layer_type}; only "
                            f"{', '.join(FUSION_LAYER_TYPES)} layers have a BatchNorm folded into them",
                            "Remove it from the list.")
        if name not in out:
            out.append(name)
    return tuple(out)


def _not_quantizable(layer: ModelLayer) -> str:
    if layer.layer_type not in PTQ_LAYER_TYPES:
        return (f"type {layer.layer_type} is not quantized (amct-caffe quantizes "
                f"{', '.join(PTQ_LAYER_TYPES)})")
    return str(layer.unsupported_reason)


# -- reading the JSON ----------------------------------------------------------------------------------------
def load_json_config(
    path: str | os.PathLike[str], model: Sequence[ModelLayer], model_file: str = ""
) -> QuantConfig:
    """Read and validate a PTQ JSON config against the model's layers (see :func:`parse_json_config`)."""
    path = str(path)
    return parse_json_config(read_config_text(path, JSON_KIND), path, model, model_file)


def parse_json_config(
    text: str, path: str, model: Sequence[ModelLayer], model_file: str = ""
) -> QuantConfig:
    """Validate the text of a PTQ JSON config against the model and return it.

    Args:
        text: the JSON text.
        path: the file it came from (for messages).
        model: every layer of the model (TEST-phase view), with why it cannot be quantized if so.
        model_file: the prototxt, for messages.

    Returns:
        The config; keys left out take AMCT's defaults (a missing ``channel_wise`` the type's default).

    Raises:
        ConfigError: the file is not JSON; a key appears twice, is unknown or has the wrong type or range;
            a layer is not in the model or cannot be quantized (a config of another model); ``channel_wise``
            true on a layer that is not a Convolution/Deconvolution; weight settings on an AVE Pooling.
    """
    rep = ConfigReporter(path, model_file, JSON_KIND)
    root = loads_json(text, rep, JsonObject)
    if not isinstance(root, JsonObject):
        raise rep.error("", "the file must hold one JSON object",
                        'Write {"version": 1, "batch_num": 1, ..., "<layer>": {...}}.')
    check_json_object(root, None, rep, "", "")
    by_name = {layer.name: layer for layer in model}

    version = root.get("version", JSON_VERSION)
    if type(version) is not int or version != JSON_VERSION:
        raise rep.error("key 'version'", f"must be the integer {JSON_VERSION}, got {version!r}",
                        f'Write "version": {JSON_VERSION}.')
    batch_num = root.get("batch_num", 1)
    if type(batch_num) is not int or batch_num <= 0:
        raise rep.error("key 'batch_num'", f"must be an integer > 0, got {json.dumps(batch_num)}",
                        'Write e.g. "batch_num": 1.')
    flags = {}
    for key in ("activation_offset", "do_fusion"):
        flags[key] = root.get(key, True)
        expect_json(flags[key], "bool", rep, f"key '{key}'")
    skip_fusion = root.get("skip_fusion_layers", [])
    if not isinstance(skip_fusion, list) or not all(isinstance(n, str) for n in skip_fusion):
        raise rep.error("key 'skip_fusion_layers'", f"must be a list of layer names, got "
                        f"{json.dumps(skip_fusion)}", 'Write e.g. "skip_fusion_layers": ["conv1"].')
    skip_fusion_layers = _check_skip_fusion(skip_fusion, by_name, rep, "skip_fusion_layers")

    layers: dict[str, LayerQuantConfig] = {}
    for key, value in root.items():
        if key in GLOBAL_KEYS:
            continue
        layer = by_name.get(key)
        if layer is None:
            raise rep.error(f"layer '{key}'",
                            f"{rep.model} has no layer named '{key}' (in its TEST-phase view)",
                            "Remove the entry, correct the layer name, or create the config for this model "
                            "with create_quant_config.")
        if not layer.quantizable:
            raise rep.error(f"layer '{key}'", f"this {layer.layer_type} layer cannot be quantized: "
                            f"{_not_quantizable(layer)}", "Remove the entry from the config.")
        layers[key] = _layer_from_json(value, layer, rep)
    order = {layer.name: i for i, layer in enumerate(model)}
    layers = dict(sorted(layers.items(), key=lambda item: order[item[0]]))
    return QuantConfig(batch_num, flags["activation_offset"], flags["do_fusion"], skip_fusion_layers, layers)


def _number(value: Any, rep: ConfigReporter, where: str) -> float:
    expect_json(value, "number", rep, where)
    return float(value)


def _layer_from_json(value: Any, layer: ModelLayer, rep: ConfigReporter) -> LayerQuantConfig:
    name = layer.name

    def at(path: str) -> str:
        return json_key(name, path)

    expect_json(value, "object", rep, f"layer '{name}'")
    check_json_object(value, _LAYER_KEYS, rep, name, "")
    enable = value.get("quant_enable", True)
    expect_json(enable, "bool", rep, at("quant_enable"))

    act = value.get("activation_quant_params", JsonObject([]))
    expect_json(act, "object", rep, at("activation_quant_params"))
    check_json_object(act, _ACTIVATION_KEYS, rep, name, "activation_quant_params.")
    defaults = IfmrParams()
    max_p = _number(act.get("max_percentile", defaults.max_percentile), rep,
                    at("activation_quant_params.max_percentile"))
    min_p = _number(act.get("min_percentile", defaults.min_percentile), rep,
                    at("activation_quant_params.min_percentile"))
    _check_percentile(max_p, rep, at("activation_quant_params.max_percentile"))
    _check_percentile(min_p, rep, at("activation_quant_params.min_percentile"))
    search_range = act.get("search_range", [defaults.search_range_start, defaults.search_range_end])
    if not isinstance(search_range, list) or len(search_range) != 2:
        raise rep.error(at("activation_quant_params.search_range"), f"must be a list of two numbers, got "
                        f"{json.dumps(search_range)}", "Write e.g. [0.7, 1.3].")
    start = _number(search_range[0], rep, at("activation_quant_params.search_range"))
    end = _number(search_range[1], rep, at("activation_quant_params.search_range"))
    step = _number(act.get("search_step", defaults.search_step), rep,
                   at("activation_quant_params.search_step"))
    _check_search(start, end, step, rep, lambda key: at(f"activation_quant_params.{key}"),
                  ("search_range[0]", "search_range[1]", "search_step"))

    weights = value.get("weight_quant_params")
    channel_wise = default_channel_wise(layer.layer_type)
    if layer.layer_type in WEIGHTLESS_TYPES:
        if weights is not None:
            raise rep.error(at("weight_quant_params"), f"a {layer.layer_type} layer has no weights",
                            "Remove weight_quant_params from this layer.")
    elif weights is not None:
        expect_json(weights, "object", rep, at("weight_quant_params"))
        check_json_object(weights, _WEIGHT_KEYS, rep, name, "weight_quant_params.")
        if "channel_wise" in weights:
            channel_wise = weights["channel_wise"]
            expect_json(channel_wise, "bool", rep, at("weight_quant_params.channel_wise"))
            check_channel_wise(channel_wise, layer, rep, at("weight_quant_params.channel_wise"))
    return LayerQuantConfig(name, layer.layer_type, enable, IfmrParams(max_p, min_p, start, end, step),
                            channel_wise)


# -- reading the simplified .cfg -----------------------------------------------------------------------------
def load_cfg_config(
    path: str | os.PathLike[str], model: Sequence[ModelLayer], model_file: str = ""
) -> QuantConfig:
    """Build the PTQ config from a simplified ``.cfg`` file (see :func:`parse_cfg_config`)."""
    path = str(path)
    return parse_cfg_config(read_config_text(path, CFG_KIND), path, model, model_file)


def parse_cfg_config(
    text: str, path: str, model: Sequence[ModelLayer], model_file: str = ""
) -> QuantConfig:
    """Build the PTQ config of every quantizable layer from a simplified config (``AMCTConfig`` text).

    Each layer's ``calibration_config`` is the first that applies, as a whole message: its
    ``override_layer_configs`` entry, the ``override_layer_types`` entry of its type, ``common_config``.
    In it, an unset ``ifmr_quantize`` (or field of it) takes AMCT's defaults, an unset
    ``arq_quantize.channel_wise`` the type's default. A ``common_config`` ``channel_wise: true`` applies to
    Convolution/Deconvolution only (InnerProduct keeps per-tensor scales); in an override of an InnerProduct
    layer or type it is an error. ``arq_quantize`` on AVE Pooling (no weights) is ignored. ``skip_layers``
    and the layers of ``skip_layer_types`` get ``quant_enable: false``.

    Raises:
        ConfigError: the text does not parse or lacks a required field; ``batch_num`` is 0; a skipped,
            overridden or skip-fusion layer name is not in the model; an overridden layer or type cannot be
            quantized or is overridden twice; ``nuq_quantize`` (not implemented); IFMR values out of range.
    """
    rep = ConfigReporter(path, model_file, CFG_KIND)
    cfg = amct_pb2.AMCTConfig()
    try:
        text_format.Merge(text, cfg)
    except text_format.ParseError as exc:
        raise rep.error("", f"cannot parse it as an AMCTConfig ({exc})",
                        "Check field names and syntax against AMCT's calibration_config_caffe.proto."
                        ) from exc
    if not cfg.IsInitialized():
        missing = ", ".join(cfg.FindInitializationErrors())
        raise rep.error("", f"required field(s) missing: {missing}", "Add the missing field(s).")
    if cfg.batch_num <= 0:
        raise rep.error("field 'batch_num'", f"must be > 0, got {cfg.batch_num}", "Write e.g. batch_num: 1.")

    by_name = {layer.name: layer for layer in model}
    skipped = set()
    for name in cfg.skip_layers:
        if name not in by_name:
            raise rep.error(f"skip_layers '{name}'", f"{rep.model} has no layer named '{name}'",
                            "Remove it or correct the layer name.")
        skipped.add(name)
    skipped_types = set()
    for layer_type in cfg.skip_layer_types:
        if layer_type not in PTQ_LAYER_TYPES:
            raise rep.error(f"skip_layer_types '{layer_type}'", f"layers of type '{layer_type}' are not "
                            "quantized anyway",
                            f"Remove it; the quantized types are {', '.join(PTQ_LAYER_TYPES)}.")
        skipped_types.add(layer_type)
    skip_fusion = _check_skip_fusion(cfg.skip_fusion_layers, by_name, rep, "skip_fusion_layers")

    layer_overrides: dict[str, amct_pb2.CalibrationConfig] = {}
    for override in cfg.override_layer_configs:
        name = override.layer_name
        where = f"override_layer_configs '{name}'"
        layer = by_name.get(name)
        if layer is None:
            raise rep.error(where, f"{rep.model} has no layer named '{name}'",
                            "Remove the override or correct the layer name.")
        if not layer.quantizable:
            raise rep.error(where,
                            f"this {layer.layer_type} layer cannot be quantized: {_not_quantizable(layer)}",
                            "Remove the override.")
        if name in layer_overrides:
            raise rep.error(where, "the layer is overridden more than once", "Keep one override per layer.")
        _check_calibration(override.calibration_config, rep, f"{where}, calibration_config", layer.layer_type)
        layer_overrides[name] = override.calibration_config

    type_overrides: dict[str, amct_pb2.CalibrationConfig] = {}
    for type_override in cfg.override_layer_types:
        layer_type = type_override.layer_type
        where = f"override_layer_types '{layer_type}'"
        if layer_type not in PTQ_LAYER_TYPES:
            raise rep.error(where, f"layers of type '{layer_type}' are not quantized",
                            f"Remove the override; the quantized types are {', '.join(PTQ_LAYER_TYPES)}.")
        if layer_type in type_overrides:
            raise rep.error(where, "the type is overridden more than once", "Keep one override per type.")
        _check_calibration(type_override.calibration_config, rep, f"{where}, calibration_config", layer_type)
        type_overrides[layer_type] = type_override.calibration_config
    _check_calibration(cfg.common_config, rep, "common_config", None)

    layers: dict[str, LayerQuantConfig] = {}
    for layer in model:
        if not layer.quantizable:
            continue
        source = cfg.common_config
        if layer.name in layer_overrides:
            source = layer_overrides[layer.name]
        elif layer.layer_type in type_overrides:
            source = type_overrides[layer.layer_type]
        enable = layer.name not in skipped and layer.layer_type not in skipped_types
        layers[layer.name] = _layer_from_cfg(layer, source, enable)
    return QuantConfig(int(cfg.batch_num), bool(cfg.activation_offset), bool(cfg.do_fusion), skip_fusion,
                       layers)


def _check_calibration(source: amct_pb2.CalibrationConfig, rep: ConfigReporter, where: str,
                       layer_type: str | None) -> None:
    """Check one ``calibration_config`` (``layer_type`` given for overrides, None for ``common_config``)."""
    if source.WhichOneof("weight_config") == "nuq_quantize":
        raise rep.error(f"{where}.nuq_quantize", "non-uniform weight quantization (nuq_quantize) is not "
                        "implemented in amct-caffe", "Use arq_quantize { channel_wise: ... } instead.")
    ifmr = source.ifmr_quantize
    _check_percentile(float32_value(ifmr.max_percentile), rep, f"{where}.ifmr_quantize.max_percentile")
    _check_percentile(float32_value(ifmr.min_percentile), rep, f"{where}.ifmr_quantize.min_percentile")
    _check_search(float32_value(ifmr.search_range_start), float32_value(ifmr.search_range_end),
                  float32_value(ifmr.search_step), rep,
                  lambda key: f"{where}.ifmr_quantize.{key}",
                  ("search_range_start", "search_range_end", "search_step"))
    arq = source.arq_quantize
    if (layer_type is not None and arq.HasField("channel_wise") and arq.channel_wise
            and layer_type not in CHANNEL_WISE_TYPES and layer_type not in WEIGHTLESS_TYPES):
        raise rep.error(f"{where}.arq_quantize.channel_wise",
                        f"channel_wise true is not supported for {layer_type} (per-channel weight factors "
                        "exist for Convolution and Deconvolution only)",
                        "Set channel_wise to false in this override.")


def _layer_from_cfg(layer: ModelLayer, source: amct_pb2.CalibrationConfig, enable: bool) -> LayerQuantConfig:
    ifmr = source.ifmr_quantize
    params = IfmrParams(
        max_percentile=float32_value(ifmr.max_percentile),
        min_percentile=float32_value(ifmr.min_percentile),
        search_range_start=float32_value(ifmr.search_range_start),
        search_range_end=float32_value(ifmr.search_range_end),
        search_step=float32_value(ifmr.search_step),
    )
    channel_wise = default_channel_wise(layer.layer_type)
    arq = source.arq_quantize
    if channel_wise is not None and arq.HasField("channel_wise"):
        if arq.channel_wise and layer.layer_type not in CHANNEL_WISE_TYPES:
            # Only common_config gets here (overrides were checked): it is meant for the convolutions.
            LOGGER.debug("Layer '%s' (%s): the common channel_wise true does not apply; using false.",
                         layer.name, layer.layer_type)
        else:
            channel_wise = arq.channel_wise
    return LayerQuantConfig(layer.name, layer.layer_type, enable, params, channel_wise)
