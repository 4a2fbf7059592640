"""The QAT flow of AMCT for Caffe: config, retrain model, saved quantized models (spec §1.3)."""

from __future__ import annotations

import os

from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import atomic_write, load_caffemodel, load_prototxt
from amct_caffe.model.phase import TEST, filter_net
from amct_caffe.passes.quantizable import describe_layers
from amct_caffe.quant.config import (
    QAT_LAYER_TYPES,
    ModelLayer,
    default_config,
    dumps_json,
    load_cfg_config,
)

LOGGER = get_logger("qat")


def qat_model_layers(model_file: str) -> list[ModelLayer]:
    """Every layer of the TEST-phase view of ``model_file`` with its QAT quantizability.

    Raises:
        ModelFormatError: the prototxt is missing or malformed.
        ConfigError: the model already holds AMCT layers.
    """
    net = load_prototxt(model_file)
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
    for layer in config.values():
        LOGGER.debug(
            "Layer '%s' (%s): retrain_enable %s, fixed_min %s, clip_max %s, clip_min %s, channel_wise %s.",
            layer.name, layer.layer_type, layer.retrain_enable, layer.fixed_min, layer.clip_max,
            layer.clip_min, layer.channel_wise,
        )
    atomic_write(config_file, text.encode("utf-8"))
    enabled = sum(layer.retrain_enable for layer in config.values())
    LOGGER.info(
        "Create quant retrain config file '%s' success: %d layer(s), %d enabled for retrain; %d layer(s) of "
        "quantizable types stay float (their reasons are logged at DEBUG level).",
        config_file, len(config), enabled, len(left_float),
    )
