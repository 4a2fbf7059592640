"""AMCT's QAT configuration: per-layer retrain settings, the JSON config file and the simplified ``.cfg``.

This module is pure data: it knows AMCT's file formats (docs/amct-reference.md §4.1, §4.2) and their rules,
not graphs. The model is described to it by :class:`ModelLayer` records
(``passes.quantizable.describe_layers`` makes them from a graph), so every check that needs the model ("is
there such a layer", "can QAT quantize it") works on plain names and types.

The JSON file (written by ``create_quant_retrain_config``, read by ``create_quant_retrain_model``)::

    {
        "version": 1,
        "conv1": {
            "retrain_enable": true,
            "retrain_data_config": {"algo": "ulq_quantize", "fixed_min": false},
            "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true}
        },
        "pool5": {
            "retrain_enable": true,
            "retrain_data_config": {"algo": "ulq_quantize", "fixed_min": true}
        }
    }

Choices where AMCT's documentation is silent (see also docs/decisions.md):

* The generated file always states ``fixed_min`` (the graph's default: the input comes from a ReLU), so
  the user sees what AMCT decided; when a file read back omits it, the graph default is used, as AMCT
  documents.
* AVE ``Pooling`` has no weights, so its entry has no ``retrain_weight_config`` (a file that gives one for
  a Pooling layer is rejected: the setting would have no effect).
* ``channel_wise`` is generated true for Convolution/Deconvolution and false for InnerProduct; true on an
  InnerProduct is an error (docs/decisions.md row 12: the record supports channel-wise
  factors for conv/deconv only).
* ``dst_type`` (newer AMCT docs) is accepted with the value ``"INT8"`` only; it is not written.
* Layers skipped by a ``.cfg`` (``skip_layers``/``quant_skip_layers``) are written with
  ``retrain_enable: false``, so the file lists every layer QAT could quantize.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.limits import CONFIG_LIMIT_ENV, config_limit_bytes
from amct_caffe.proto import amct_pb2

LOGGER = get_logger("quant.config")

#: The only ``version`` AMCT's QAT JSON has.
JSON_VERSION = 1
#: The only activation retrain algorithm (ULQ) and weight retrain algorithm (ARQ) of AMCT-Caffe QAT.
DATA_ALGO = "ulq_quantize"
WEIGHT_ALGO = "arq_retrain"
#: The Caffe types QAT can quantize (AMCT reference §2.1); each layer of them still has
#: per-parameter constraints.
QAT_LAYER_TYPES = ("Convolution", "Deconvolution", "InnerProduct", "Pooling")
#: Types whose weights may be quantized per output channel (AMCT reference §9.5; docs/decisions.md row 12).
CHANNEL_WISE_TYPES = frozenset({"Convolution", "Deconvolution"})
#: Types QAT quantizes without weights (AVE Pooling: activation only).
WEIGHTLESS_TYPES = frozenset({"Pooling"})

_LAYER_KEYS = ("retrain_enable", "retrain_data_config", "retrain_weight_config")
_DATA_KEYS = ("algo", "clip_max", "clip_min", "fixed_min", "dst_type")
_WEIGHT_KEYS = ("algo", "channel_wise", "dst_type")


@dataclass(frozen=True)
class ModelLayer:
    """One layer of the model, as the config rules need it.

    Attributes:
        name: the Caffe layer name.
        layer_type: the Caffe type string.
        unsupported_reason: why QAT cannot quantize the layer; None when it can.
        default_fixed_min: what AMCT picks for ``fixed_min`` (the layer's input comes from a ReLU).
    """

    name: str
    layer_type: str
    unsupported_reason: str | None = None
    default_fixed_min: bool = False

    @property
    def quantizable(self) -> bool:
        return self.unsupported_reason is None


@dataclass(frozen=True)
class LayerRetrainConfig:
    """The QAT settings of one layer (one entry of the JSON config).

    Attributes:
        name: the Caffe layer name (the JSON key).
        layer_type: its Caffe type (not written to the JSON; decides which settings apply).
        retrain_enable: false keeps the layer float.
        clip_max, clip_min: initial ULQ clip bounds (both or neither; None: initialised by IFMR).
        fixed_min: keep ``clip_min`` at 0 (for non-negative inputs).
        channel_wise: per-output-channel weight factors; None for layers without weights (AVE Pooling).
    """

    name: str
    layer_type: str
    retrain_enable: bool = True
    clip_max: float | None = None
    clip_min: float | None = None
    fixed_min: bool | None = None
    channel_wise: bool | None = None

    @property
    def has_weights(self) -> bool:
        return self.layer_type not in WEIGHTLESS_TYPES


#: A whole QAT config: layer name -> settings, in model order.
RetrainConfig = dict[str, LayerRetrainConfig]


def default_channel_wise(layer_type: str) -> bool | None:
    """AMCT's generated ``channel_wise``: true for conv/deconv, false for InnerProduct, None if no weights."""
    if layer_type in WEIGHTLESS_TYPES:
        return None
    return layer_type in CHANNEL_WISE_TYPES


def default_layer_config(name: str, layer_type: str, fixed_min: bool) -> LayerRetrainConfig:
    """The settings ``create_quant_retrain_config`` writes for a layer when no ``.cfg`` is given."""
    return LayerRetrainConfig(
        name=name,
        layer_type=layer_type,
        retrain_enable=True,
        fixed_min=bool(fixed_min),
        channel_wise=default_channel_wise(layer_type),
    )


def default_config(layers: Iterable[tuple[str, str, bool]]) -> RetrainConfig:
    """The default QAT config of the quantizable layers ``(name, type, default fixed_min)``, in that order."""
    config: RetrainConfig = {}
    for name, layer_type, fixed_min in layers:
        if name in config:
            raise ConfigError(f"Layer name '{name}' appears twice; layer names in a QAT config are unique.")
        config[name] = default_layer_config(name, layer_type, fixed_min)
    return config


# -- writing --------------------------------------------------------------------------------------------
def config_to_json_dict(config: Mapping[str, LayerRetrainConfig]) -> dict[str, Any]:
    """The JSON object of a config, keys in AMCT's order (version, then the layers in model order)."""
    out: dict[str, Any] = {"version": JSON_VERSION}
    for name, layer in config.items():
        if name == "version":
            raise ConfigError(
                "A layer named 'version' cannot be written to a QAT JSON config: the key is the file's "
                "version field. Rename the layer in the prototxt."
            )
        data: dict[str, Any] = {"algo": DATA_ALGO}
        if layer.clip_max is not None and layer.clip_min is not None:
            data["clip_max"] = layer.clip_max
            data["clip_min"] = layer.clip_min
        if layer.fixed_min is not None:
            data["fixed_min"] = layer.fixed_min
        entry: dict[str, Any] = {"retrain_enable": layer.retrain_enable, "retrain_data_config": data}
        if layer.has_weights:
            channel_wise = layer.channel_wise
            if channel_wise is None:
                channel_wise = bool(default_channel_wise(layer.layer_type))
            entry["retrain_weight_config"] = {"algo": WEIGHT_ALGO, "channel_wise": channel_wise}
        out[name] = entry
    return out


def dumps_json(config: Mapping[str, LayerRetrainConfig]) -> str:
    """The text of the JSON config file (4-space indent, as AMCT's files, and a final newline)."""
    return json.dumps(config_to_json_dict(config), indent=4) + "\n"


# -- reading the JSON -----------------------------------------------------------------------------------
class _JsonObject(dict):
    """A JSON object that remembers keys given more than once (``json`` would keep the last silently)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        seen: set[str] = set()
        self.duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in self.duplicates:
                self.duplicates.append(key)
            seen.add(key)


def _json_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in JSON ``text`` (brackets inside strings not counted)."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _loads_json(text: str, rep: _Reporter, hook: Callable[[list[tuple[str, Any]]], Any]) -> Any:
    """``json.loads`` within the config limits: nesting depth and number length are checked, so a hostile
    file gives a ConfigError naming it (not a RecursionError or a huge integer conversion)."""
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise rep.error("", f"objects and arrays nest {depth} deep, above the limit of {MAX_JSON_DEPTH}",
                        "A config nests at most 3 deep; check that the file is the config.")

    def number(kind: type[int] | type[float]) -> Callable[[str], int | float]:
        def parse(literal: str) -> int | float:
            if len(literal) > MAX_JSON_NUMBER_CHARS:
                raise rep.error("", f"the number {literal[:20]}... has {len(literal)} characters, above the "
                                f"limit of {MAX_JSON_NUMBER_CHARS}", "Write the number in fewer characters.")
            return kind(literal)
        return parse

    try:
        return json.loads(text, object_pairs_hook=hook, parse_int=number(int), parse_float=number(float))
    except json.JSONDecodeError as exc:
        raise rep.error(
            f"line {exc.lineno} column {exc.colno}", f"not valid JSON ({exc.msg})", "Fix the JSON syntax."
        ) from exc
    except RecursionError as exc:
        raise rep.error("", "the JSON nests too deep to read", "Check that the file is the config.") from exc


class _Reporter:
    """Formats the errors of one config file: the file, where in it, what is wrong, how to fix it.

    ``kind`` names the file in messages ("QAT config", "PTQ config", ...).
    """

    def __init__(self, path: str, model_file: str = "", kind: str = "QAT config") -> None:
        self.path = path
        self.model_file = model_file
        self.kind = kind

    def error(self, where: str, problem: str, fix: str) -> ConfigError:
        place = f", {where}" if where else ""
        return ConfigError(f"{self.kind} '{self.path}'{place}: {problem}. {fix}")

    @property
    def model(self) -> str:
        return f"model '{self.model_file}'" if self.model_file else "the model"


#: Deepest nesting of JSON objects and arrays a config may have (AMCT's configs nest 3 deep).
MAX_JSON_DEPTH = 32
#: Longest number (in characters) a JSON config may hold; a float32 needs under 50.
MAX_JSON_NUMBER_CHARS = 64


def _read_config_text(path: str, kind: str = "QAT config") -> str:
    if not os.path.isfile(path):
        what = "is not a regular file (a folder, a device or a pipe)" if os.path.exists(path) else \
            "does not exist"
        raise ConfigError(f"{kind} '{path}' {what}; check the config file path.")
    size, limit = os.path.getsize(path), config_limit_bytes()
    if size > limit:
        raise ConfigError(f"{kind} '{path}' is {size} bytes, above the limit of {limit} bytes for a config; "
                          f"give the config file (raise {CONFIG_LIMIT_ENV} if it really is that large).")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{kind} '{path}' cannot be read as UTF-8 text ({exc}).") from exc


def load_json_config(
    path: str | os.PathLike[str], model: Sequence[ModelLayer], model_file: str = ""
) -> RetrainConfig:
    """Read and validate a QAT JSON config against the model's layers (see :func:`parse_json_config`)."""
    path = str(path)
    return parse_json_config(_read_config_text(path), path, model, model_file)


def parse_json_config(
    text: str, path: str, model: Sequence[ModelLayer], model_file: str = ""
) -> RetrainConfig:
    """Validate the text of a QAT JSON config against the model and return its settings.

    Args:
        text: the JSON text.
        path: the file it came from (for messages).
        model: every layer of the model (TEST-phase view), with why QAT cannot quantize it if so.
        model_file: the prototxt, for messages.

    Returns:
        The layers of the file in file order; a missing ``fixed_min`` is the model's default, a missing
        ``channel_wise`` AMCT's default for the type.

    Raises:
        ConfigError: the file is not JSON; a key appears twice; a key is unknown or has the wrong type; a
            layer is not in the model or QAT cannot quantize it; an algorithm other than ``ulq_quantize`` /
            ``arq_retrain``; ``clip_max`` <= 0, ``clip_min`` >= 0 or only one of them; ``channel_wise``
            true on a layer that is not a Convolution/Deconvolution; weight settings on an AVE Pooling.
    """
    rep = _Reporter(path, model_file)
    root = _loads_json(text, rep, _JsonObject)
    if not isinstance(root, _JsonObject):  # every JSON object is read as a _JsonObject
        raise rep.error("", "the file must hold one JSON object", 'Write {"version": 1, "<layer>": {...}}.')
    _check_object(root, None, rep, "", "")
    by_name = {layer.name: layer for layer in model}
    config: RetrainConfig = {}
    for key, value in root.items():
        if key == "version":
            if type(value) is not int or value != JSON_VERSION:
                raise rep.error("key 'version'", f"must be the integer {JSON_VERSION}, got {value!r}",
                                f'Write "version": {JSON_VERSION}.')
            continue
        layer = by_name.get(key)
        if layer is None:
            raise rep.error(
                f"layer '{key}'", f"{rep.model} has no layer named '{key}' (in its TEST-phase view)",
                "Remove the entry or correct the layer name.",
            )
        if not layer.quantizable:
            raise rep.error(
                f"layer '{key}'",
                f"QAT cannot quantize this {layer.layer_type} layer: {layer.unsupported_reason}",
                "Remove the entry from the config.",
            )
        config[key] = _layer_from_json(value, layer, rep)
    return config


def _json_key(layer: str, path: str) -> str:
    """Where a JSON key is: ``layer 'conv1', key 'retrain_data_config.clip_max'``."""
    return f"layer '{layer}', key '{path}'" if layer else f"key '{path}'"


def _check_object(
    obj: _JsonObject, allowed: Sequence[str] | None, rep: _Reporter, layer: str, prefix: str
) -> None:
    """No key twice (``json`` would keep the last one silently); with ``allowed``, no unknown key."""
    duplicates = obj.duplicates
    if duplicates:
        what = "layer names must be unique" if not layer else "each setting is given once"
        raise rep.error(_json_key(layer, prefix + duplicates[0]), f"appears more than once ({what})",
                        "Keep one entry per key.")
    if allowed is None:
        return
    for key in obj:
        if key not in allowed:
            raise rep.error(_json_key(layer, prefix + key), "unknown key",
                            f"Remove it; the keys allowed here are {', '.join(allowed)}.")


def _expect(value: Any, kind: str, rep: _Reporter, where: str) -> None:
    """Check a JSON value's type (``bool`` is not a number here, and a number is not a bool)."""
    ok = {
        "bool": type(value) is bool,
        "object": isinstance(value, dict),
        "string": isinstance(value, str),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]
    if not ok:
        example = {"bool": "true or false", "object": "{...}", "string": '"..."', "number": "a number"}[kind]
        raise rep.error(where, f"must be a JSON {kind}, got {json.dumps(value)}", f"Write {example}.")


def _check_dst_type(value: Any, rep: _Reporter, where: str) -> None:
    _expect(value, "string", rep, where)
    if value != "INT8":
        raise rep.error(where, f"dst_type '{value}' is not supported for Caffe (INT8 only)",
                        'Write "INT8" or remove dst_type.')


def _layer_from_json(value: Any, layer: ModelLayer, rep: _Reporter) -> LayerRetrainConfig:
    name = layer.name

    def at(path: str) -> str:
        return _json_key(name, path)

    _expect(value, "object", rep, f"layer '{name}'")
    _check_object(value, _LAYER_KEYS, rep, name, "")
    enable = value.get("retrain_enable", True)
    _expect(enable, "bool", rep, at("retrain_enable"))

    data = value.get("retrain_data_config", _JsonObject([]))
    _expect(data, "object", rep, at("retrain_data_config"))
    _check_object(data, _DATA_KEYS, rep, name, "retrain_data_config.")
    algo = data.get("algo", DATA_ALGO)
    if algo != DATA_ALGO:
        raise rep.error(at("retrain_data_config.algo"),
                        f"unknown activation retrain algorithm {json.dumps(algo)}",
                        f'Write "algo": "{DATA_ALGO}" (the only one).')
    if "dst_type" in data:
        _check_dst_type(data["dst_type"], rep, at("retrain_data_config.dst_type"))
    clip_max = data.get("clip_max")
    clip_min = data.get("clip_min")
    for key, bound in (("clip_max", clip_max), ("clip_min", clip_min)):
        if bound is not None:
            _expect(bound, "number", rep, at(f"retrain_data_config.{key}"))
    clip_max, clip_min = _check_clips(clip_max, clip_min, rep, lambda key: at(f"retrain_data_config.{key}"))
    fixed_min = data.get("fixed_min", layer.default_fixed_min)
    _expect(fixed_min, "bool", rep, at("retrain_data_config.fixed_min"))

    weights = value.get("retrain_weight_config")
    channel_wise = default_channel_wise(layer.layer_type)
    if layer.layer_type in WEIGHTLESS_TYPES:
        if weights is not None:
            raise rep.error(at("retrain_weight_config"), f"a {layer.layer_type} layer has no weights",
                            "Remove retrain_weight_config from this layer.")
    elif weights is not None:
        _expect(weights, "object", rep, at("retrain_weight_config"))
        _check_object(weights, _WEIGHT_KEYS, rep, name, "retrain_weight_config.")
        algo = weights.get("algo", WEIGHT_ALGO)
        if algo != WEIGHT_ALGO:
            raise rep.error(at("retrain_weight_config.algo"), f"unknown weight retrain algorithm "
                            f"{json.dumps(algo)}", f'Write "algo": "{WEIGHT_ALGO}" (the only one).')
        if "dst_type" in weights:
            _check_dst_type(weights["dst_type"], rep, at("retrain_weight_config.dst_type"))
        if "channel_wise" in weights:
            channel_wise = weights["channel_wise"]
            _expect(channel_wise, "bool", rep, at("retrain_weight_config.channel_wise"))
            _check_channel_wise(channel_wise, layer, rep, at("retrain_weight_config.channel_wise"))
    return LayerRetrainConfig(
        name=name,
        layer_type=layer.layer_type,
        retrain_enable=enable,
        clip_max=clip_max,
        clip_min=clip_min,
        fixed_min=fixed_min,
        channel_wise=channel_wise,
    )


def _check_clips(
    clip_max: float | None, clip_min: float | None, rep: _Reporter, at: Callable[[str], str]
) -> tuple[float | None, float | None]:
    """AMCT's rules on initial clip bounds: both or neither, finite, ``clip_max > 0 > clip_min``.

    ``at(key)`` says where ``clip_max``/``clip_min`` are in the file, for the messages.
    """
    if (clip_max is None) != (clip_min is None):
        given, missing = ("clip_max", "clip_min") if clip_min is None else ("clip_min", "clip_max")
        raise rep.error(at(given), f"{given} is given without {missing}",
                        "Give both clip_max and clip_min, or neither (then IFMR initialises them).")
    if clip_max is None or clip_min is None:
        return None, None
    if not math.isfinite(clip_max) or clip_max <= 0:
        raise rep.error(at("clip_max"), f"clip_max must be a finite number > 0, got {clip_max}",
                        "Set it to about 0.3x to 1.7x of the largest activation value seen, or remove both "
                        "bounds.")
    if not math.isfinite(clip_min) or clip_min >= 0:
        raise rep.error(at("clip_min"), f"clip_min must be a finite number < 0, got {clip_min}",
                        "Set it to about 0.3x to 1.7x of the smallest activation value seen, or remove both "
                        "bounds (use fixed_min for non-negative inputs).")
    return float(clip_max), float(clip_min)


def _check_channel_wise(channel_wise: bool, layer: ModelLayer, rep: _Reporter, where: str) -> None:
    if channel_wise and layer.layer_type not in CHANNEL_WISE_TYPES:
        raise rep.error(
            where, f"channel_wise true is not supported for {layer.layer_type} layer '{layer.name}' "
            "(per-channel weight factors exist for Convolution and Deconvolution only)",
            "Set channel_wise to false for this layer.",
        )


# -- reading the simplified .cfg ------------------------------------------------------------------------
def load_cfg_config(
    path: str | os.PathLike[str], model: Sequence[ModelLayer], model_file: str = ""
) -> RetrainConfig:
    """Build the QAT config from a simplified ``.cfg`` file (see :func:`parse_cfg_config`)."""
    path = str(path)
    return parse_cfg_config(_read_config_text(path), path, model, model_file)


def parse_cfg_config(
    text: str, path: str, model: Sequence[ModelLayer], model_file: str = ""
) -> RetrainConfig:
    """Build the QAT config of every quantizable layer from a simplified config (``AMCTRetrainConfig`` text).

    Each layer takes its activation and weight settings from the first of these that applies, as a whole
    message (no field-by-field merge): its ``override_layer_configs`` entry, the ``override_layer_types``
    entry of its type, the global ``retrain_data_quant_config`` / ``retrain_weight_quant_config``. Unset
    ``fixed_min`` is the graph's default; unset ``channel_wise`` is AMCT's default for the type. A global
    ``channel_wise: true`` applies to Convolution/Deconvolution only (InnerProduct keeps false, per-channel
    factors being conv-only), while ``channel_wise: true`` in an override of an InnerProduct layer or type
    is an error. ``skip_layers`` and ``quant_skip_layers`` (a union) give ``retrain_enable: false``.
    ``batch_num`` is accepted and ignored: QAT has no calibration batches.

    Raises:
        ConfigError: the text does not parse or lacks a required field; ``skip_layer_types`` or
            ``quant_skip_types`` is used (not supported for Caffe); a skipped or overridden layer name is not
            in the model; an overridden layer or type cannot be quantized by QAT; a layer or type is
            overridden twice; bad clip bounds; ``dst_type`` other than INT8.
    """
    rep = _Reporter(path, model_file)
    cfg = amct_pb2.AMCTRetrainConfig()
    try:
        text_format.Merge(text, cfg)
    except text_format.ParseError as exc:
        raise rep.error("", f"cannot parse it as an AMCTRetrainConfig ({exc})",
                        "Check field names and syntax against AMCT's retrain_config_caffe.proto.") from exc
    if not cfg.IsInitialized():
        missing = ", ".join(cfg.FindInitializationErrors())
        raise rep.error("", f"required field(s) missing: {missing}", "Add the missing field(s).")
    for field in ("skip_layer_types", "quant_skip_types"):
        if len(getattr(cfg, field)):
            raise rep.error(f"field '{field}'", f"{field} is not supported for Caffe",
                            "List the layers to skip by name in skip_layers instead.")
    if cfg.HasField("batch_num"):
        LOGGER.debug("QAT config '%s': batch_num %d is ignored (QAT has no calibration batches).",
                     path, cfg.batch_num)

    by_name = {layer.name: layer for layer in model}
    skipped = set()
    for field in ("skip_layers", "quant_skip_layers"):
        for name in getattr(cfg, field):
            if name not in by_name:
                raise rep.error(f"{field} '{name}'", f"{rep.model} has no layer named '{name}'",
                                "Remove it or correct the layer name.")
            skipped.add(name)

    layer_overrides: dict[str, amct_pb2.RetrainOverrideLayer] = {}
    for override in cfg.override_layer_configs:
        name = override.layer_name
        where = f"override_layer_configs '{name}'"
        layer = by_name.get(name)
        if layer is None:
            raise rep.error(where, f"{rep.model} has no layer named '{name}'",
                            "Remove the override or correct the layer name.")
        if not layer.quantizable:
            raise rep.error(where, f"QAT cannot quantize this {layer.layer_type} layer: "
                            f"{layer.unsupported_reason}", "Remove the override.")
        if name in layer_overrides:
            raise rep.error(where, "the layer is overridden more than once", "Keep one override per layer.")
        _check_settings(override, rep, where, layer.layer_type)
        layer_overrides[name] = override

    type_overrides: dict[str, amct_pb2.RetrainOverrideLayerType] = {}
    for override in cfg.override_layer_types:
        layer_type = override.layer_type
        where = f"override_layer_types '{layer_type}'"
        if layer_type not in QAT_LAYER_TYPES:
            raise rep.error(where, f"QAT does not quantize layers of type '{layer_type}'",
                            f"Remove the override; QAT quantizes {', '.join(QAT_LAYER_TYPES)}.")
        if layer_type in type_overrides:
            raise rep.error(where, "the type is overridden more than once", "Keep one override per type.")
        _check_settings(override, rep, where, layer_type)
        type_overrides[layer_type] = override
    _check_settings(cfg, rep, "", None)

    config: RetrainConfig = {}
    for layer in model:
        if not layer.quantizable:
            continue
        source: Any = cfg
        if layer.name in layer_overrides:
            source = layer_overrides[layer.name]
        elif layer.layer_type in type_overrides:
            source = type_overrides[layer.layer_type]
        config[layer.name] = _layer_from_cfg(layer, source, layer.name not in skipped)
    return config


def _float32_value(value: float) -> float:
    """A proto float (float32) as the shortest decimal that reads back to it (0.3, not 0.30000001192...)."""
    return float(str(np.float32(value)))


def _check_settings(source: Any, rep: _Reporter, where: str, layer_type: str | None) -> None:
    """Check the activation and weight settings of an override (``layer_type`` given) or the global ones."""
    prefix = f"{where}, " if where else ""
    ulq = source.retrain_data_quant_config.ulq_quantize
    data_where = f"{prefix}retrain_data_quant_config.ulq_quantize"
    if ulq.HasField("dst_type") and ulq.dst_type != amct_pb2.INT8:
        raise rep.error(f"{data_where}.dst_type", f"dst_type {amct_pb2.DataType.Name(ulq.dst_type)} is not "
                        "supported for Caffe (INT8 only)", "Write dst_type: INT8 or remove it.")
    if ulq.HasField("clip_max_min"):
        _check_clips(ulq.clip_max_min.clip_max, ulq.clip_max_min.clip_min, rep,
                     lambda key: f"{data_where}.clip_max_min.{key}")
    arq = source.retrain_weight_quant_config.arq_retrain
    weight_where = f"{prefix}retrain_weight_quant_config.arq_retrain"
    if arq.HasField("dst_type") and arq.dst_type != amct_pb2.INT8:
        raise rep.error(f"{weight_where}.dst_type", f"dst_type {amct_pb2.DataType.Name(arq.dst_type)} is not "
                        "supported for Caffe (INT8 only)", "Write dst_type: INT8 or remove it.")
    if (layer_type is not None and arq.channel_wise and layer_type not in CHANNEL_WISE_TYPES
            and layer_type not in WEIGHTLESS_TYPES):
        raise rep.error(f"{weight_where}.channel_wise",
                        f"channel_wise true is not supported for {layer_type} (per-channel weight factors "
                        "exist for Convolution and Deconvolution only)",
                        "Set channel_wise to false in this override.")


def _layer_from_cfg(layer: ModelLayer, source: Any, enable: bool) -> LayerRetrainConfig:
    ulq = source.retrain_data_quant_config.ulq_quantize
    clip_max = clip_min = None
    if ulq.HasField("clip_max_min"):
        clip_max = _float32_value(ulq.clip_max_min.clip_max)
        clip_min = _float32_value(ulq.clip_max_min.clip_min)
    fixed_min = ulq.fixed_min if ulq.HasField("fixed_min") else layer.default_fixed_min
    channel_wise = default_channel_wise(layer.layer_type)
    arq = source.retrain_weight_quant_config.arq_retrain
    if channel_wise is not None and arq.HasField("channel_wise"):
        if arq.channel_wise and layer.layer_type not in CHANNEL_WISE_TYPES:
            # Only the global setting gets here (overrides were checked): it is meant for the convolutions,
            # and InnerProduct keeps per-tensor factors.
            LOGGER.debug("Layer '%s' (%s): the global channel_wise true does not apply; using false.",
                         layer.name, layer.layer_type)
        else:
            channel_wise = arq.channel_wise
    return LayerRetrainConfig(
        name=layer.name,
        layer_type=layer.layer_type,
        retrain_enable=enable,
        clip_max=clip_max,
        clip_min=clip_min,
        fixed_min=bool(fixed_min),
        channel_wise=channel_wise,
    )


# -- shared with the PTQ config (quant.ptq_config) -----------------------------------------------------------
#: The JSON readers and message helpers above, under the names the PTQ config imports them by.
ConfigReporter = _Reporter
JsonObject = _JsonObject
check_json_object = _check_object
expect_json = _expect
json_key = _json_key
read_config_text = _read_config_text
loads_json = _loads_json
float32_value = _float32_value
check_channel_wise = _check_channel_wise
