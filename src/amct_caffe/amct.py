"""AMCT's public API for Caffe: ``from amct_caffe import amct`` (or ``import amct_caffe as amct``).

Every function keeps AMCT's name, argument order, defaults and output files, so an AMCT-Caffe script runs
unchanged. This module only checks the arguments and calls the flow in ``amct_caffe.workflows``.
"""

from __future__ import annotations

import os
from typing import Any

from amct_caffe.errors import ConfigError
from amct_caffe.workflows import qat as _qat

__all__ = ["create_quant_retrain_config"]


def _check_path(api: str, name: str, value: Any, optional: bool = False) -> None:
    """A path argument must be a non-empty ``str`` (or ``os.PathLike``), as AMCT's type checks require."""
    if optional and value is None:
        return
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        kind = "a file path (str) or None" if optional else "a non-empty file path (str)"
        raise ConfigError(f"{api}: argument '{name}' must be {kind}, got {value!r}.")


def create_quant_retrain_config(
    config_file: str,
    model_file: str,
    weights_file: str,
    config_defination: str | None = None,
) -> None:
    """Find the layers that quantization-aware training can quantize and write the QAT config file.

    The config is a JSON file with one entry per quantizable layer of the model's TEST-phase view
    (Convolution with a 4-D filter, Deconvolution with group 1 and dilation 1, InnerProduct with axis 1
    and no transpose, AVE Pooling that is not global)::

        {"version": 1,
         "conv1": {"retrain_enable": true,
                   "retrain_data_config": {"algo": "ulq_quantize", "fixed_min": false},
                   "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true}}, ...}

    ``fixed_min`` is true where the layer's input comes from a ReLU; ``channel_wise`` is true for
    Convolution/Deconvolution and false for InnerProduct; AVE Pooling has no ``retrain_weight_config``.
    Edit the file (or give ``config_defination``) to skip layers (``retrain_enable: false``), to set the
    initial clip bounds ``clip_max``/``clip_min``, or to change ``fixed_min``/``channel_wise``.

    Args:
        config_file: path of the JSON config to write; an existing file is overwritten, missing folders
            are created.
        model_file: the original float model (training prototxt).
        weights_file: the original float weights (.caffemodel); it must exist and parse.
        config_defination: optional path of a simplified config (proto text of ``AMCTRetrainConfig``,
            AMCT's ``retrain_config_caffe.proto``): global ``retrain_data_quant_config`` /
            ``retrain_weight_quant_config``, ``override_layer_types``, ``override_layer_configs`` (that
            order of increasing priority), ``skip_layers``/``quant_skip_layers``. If None, AMCT's defaults
            are written.

    Returns:
        None. Output: ``config_file``.

    Raises:
        ConfigError: an argument has the wrong type; the model has no quantizable layer or already holds
            AMCT layers; ``config_defination`` is invalid (the message names the file, the field or layer,
            and the fix). No config is written then, and an existing one is left untouched.
        ModelFormatError: the prototxt or caffemodel is missing or cannot be parsed.
    """
    api = "create_quant_retrain_config"
    _check_path(api, "config_file", config_file)
    _check_path(api, "model_file", model_file)
    _check_path(api, "weights_file", weights_file)
    _check_path(api, "config_defination", config_defination, optional=True)
    _qat.create_quant_retrain_config(config_file, model_file, weights_file, config_defination)
