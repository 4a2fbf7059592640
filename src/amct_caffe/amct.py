"""AMCT's public API for Caffe: ``from amct_caffe import amct`` (or ``import amct_caffe as amct``).

Every function keeps AMCT's name, argument order, defaults and output files, so an AMCT-Caffe script runs
unchanged. This module only checks the arguments and calls the flow in ``amct_caffe.workflows``.
"""

from __future__ import annotations

import os
from typing import Any

from amct_caffe.errors import ConfigError
from amct_caffe.workflows import qat as _qat
from amct_caffe.workflows import save as _save

__all__ = [
    "create_quant_retrain_config",
    "create_quant_retrain_model",
    "save_quant_retrain_model",
    "set_cpu_mode",
    "set_gpu_mode",
]


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


def create_quant_retrain_model(
    model_file: str,
    weights_file: str,
    config_file: str,
    modified_model_file: str,
    modified_weights_file: str,
    scale_offset_record_file: str,
) -> None:
    """Build the quantization-aware training (retrain) model of a float model.

    First every Convolution/Deconvolution + BatchNorm (+ Scale) is folded into the convolution (QAT
    trains the folded convolution). Then, for every layer the config enables, retrain layers are
    inserted: one ``ActivationQAT`` per quantized input (``<first layer>_act_retrain``, shared by every
    enabled layer reading that input; ULQ fake quantization with learnable clip bounds) and one
    ``WeightQAT`` per layer with weights (``<layer>_wts_retrain``; ARQ fake quantization of a float shadow
    weight, which the layer uses through parameter sharing). The whole prototxt is kept (TRAIN and TEST
    layers, data, loss, accuracy), so the modified model is trained with an ordinary solver
    (``net: modified_model_file``, a TEST phase with ``test_initialization: false``), starting from
    ``modified_weights_file``.

    Args:
        model_file: the original float model (training prototxt, both phases).
        weights_file: its trained float weights (.caffemodel).
        config_file: the QAT JSON config from ``create_quant_retrain_config`` (possibly edited).
        modified_model_file: path of the retrain prototxt to write.
        modified_weights_file: path of the retrain caffemodel to write (folded weights, fake-quantized and
            shadow weights, configured clip bounds; clip bounds that are not configured are initialised by
            IFMR on the retrain model's first forward).
        scale_offset_record_file: path of the scale/offset record file; it is created with the input shape
            (channels, height, width) of every quantized layer and its path is written into the retrain
            layers. ``save_quant_retrain_model`` uses it (and ``config_file``) when given ``None``.

    Returns:
        None. Outputs: ``modified_model_file``, ``modified_weights_file``, ``scale_offset_record_file``,
        written all-or-nothing (existing files are replaced).

    Raises:
        ConfigError: an argument has the wrong type or two outputs coincide; the config is invalid for this
            model or enables no layer; the model already holds AMCT layers; the wiring of a quantized layer
            differs between the TRAIN and TEST phases. The message names the file, the layer and the fix.
        ModelFormatError: the prototxt or caffemodel is missing, malformed, or they do not belong together.
        On any error no output file is written and existing ones are left untouched.
    """
    api = "create_quant_retrain_model"
    for name, value in (
        ("model_file", model_file),
        ("weights_file", weights_file),
        ("config_file", config_file),
        ("modified_model_file", modified_model_file),
        ("modified_weights_file", modified_weights_file),
        ("scale_offset_record_file", scale_offset_record_file),
    ):
        _check_path(api, name, value)
    _qat.create_quant_retrain_model(
        model_file, weights_file, config_file, modified_model_file, modified_weights_file,
        scale_offset_record_file,
    )


def set_cpu_mode() -> None:
    """AMCT's ``set_cpu_mode()``: compute on the CPU (the default), including the weight quantization.

    Sets the engine's global mode (as ``caffe.set_mode_cpu()``); nets built afterwards run on the CPU.
    """
    from amct_caffe.engine import device

    device.set_mode_cpu()


def set_gpu_mode() -> None:
    """AMCT's ``set_gpu_mode()``: compute on a CUDA GPU (the card is chosen by ``caffe.set_device(id)`` or
    ``CUDA_VISIBLE_DEVICES``, as in AMCT). Sets the engine's global mode (as ``caffe.set_mode_gpu()``).

    Raises:
        RuntimeEngineError: torch sees no CUDA device.
    """
    from amct_caffe.engine import device

    device.set_mode_gpu()


def save_quant_retrain_model(
    retrained_model_file: str,
    retrained_weights_file: str,
    save_type: str,
    save_path: str,
    scale_offset_record_file: str | None = None,
    config_file: str | None = None,
) -> None:
    """Save a retrained (QAT) model as a fake-quant model for Caffe and/or a deploy model for ATC.

    Every factor is recomputed from the retrained weights: the activation scale and offset of each
    ``ActivationQAT`` from its learned clip bounds (``scale_d = (clip_max - clip_min) / 255``,
    ``offset_d = -round(clip_min / scale_d) - 128``), the weight scales of each ``WeightQAT`` by ARQ of its
    float shadow weight (per output channel or per tensor). The retrain layers are removed from the
    TEST-phase view of the net, a BatchNorm (+ Scale) still following a convolution is folded into it, and
    for every quantized layer ``L`` (Convolution, Deconvolution, InnerProduct, AVE Pooling) a ``Quant``
    (``<first layer>_quant_layer``, one per quantized input, shared by the layers reading it) and a
    ``DeQuant`` (``<L>_dequant_layer``, writing ``L``'s original top) are inserted. Data, loss and accuracy
    layers of the TEST phase stay as written.

    * Fake-quant model (runs in Caffe / ``amct_caffe.caffe``): float32 weights ``int8 code * scale_w``,
      bias ``round(b / (scale_d * scale_w)) * scale_d * scale_w``, DeQuant blobs ``[deq_scale, 0, 0]``.
    * Deploy model (for ATC): weights in ``int8_data``, bias in ``int32_data``, DeQuant ``deq_scale``
      packed in ``uint64_data`` (the float32 bits of ``scale_d * scale_w``).

    Args:
        retrained_model_file: the retrain prototxt written by ``create_quant_retrain_model``.
        retrained_weights_file: the trained caffemodel (e.g. the solver's snapshot); it must come from a net
            that ran forward at least once, so that IFMR-initialised clip bounds exist.
        save_type: ``'Fakequant'``, ``'Deploy'`` or ``'Both'`` (exactly so spelled).
        save_path: folder plus file-name prefix, e.g. ``./result/model``; missing folders are created.
        scale_offset_record_file: the record file to (re)write with the factors of the saved models
            (``scale_d``, ``offset_d``, ``scale_w``, ``offset_w``, ``channels/height/width``). None: the path
            given to ``create_quant_retrain_model`` earlier in this process, else
            ``<save_path>_scale_offset_record.txt``.
        config_file: the QAT JSON config; it selects which retrained layers are saved quantized (a layer it
            disables is saved in float). None: every layer with retrain layers is quantized.

    Returns:
        None. Outputs: ``<save_path>_fake_quant_model.prototxt`` and
        ``<save_path>_fake_quant_weights.caffemodel`` ('Fakequant', 'Both'),
        ``<save_path>_deploy_model.prototxt`` and ``<save_path>_deploy_weights.caffemodel`` ('Deploy',
        'Both'), and the record file, all written together: on any error none is written and existing files
        are left untouched.

    Raises:
        ConfigError: an argument has the wrong type or value (e.g. ``save_type``); the config enables a layer
            that has no retrain layers or leaves no layer quantized; a clip range gives an unusable scale; a
            quantized bias does not fit INT32 (``BiasOverflowError``: set ``retrain_enable`` false for that
            layer in the config and pass it as ``config_file``).
        ModelFormatError: a file is missing or malformed; the model is not a retrain model; the retrain
            layers or their blobs are not what ``create_quant_retrain_model`` writes.
        RecordError: an activation retrain layer has no clip values in the caffemodel (run the retrain model
            forward/train before saving).
    """
    api = "save_quant_retrain_model"
    if not isinstance(save_type, str):
        raise ConfigError(f"{api}: argument 'save_type' must be 'Fakequant', 'Deploy' or 'Both', got "
                          f"{save_type!r}.")
    _check_path(api, "retrained_model_file", retrained_model_file)
    _check_path(api, "retrained_weights_file", retrained_weights_file)
    _check_path(api, "save_path", save_path)
    _check_path(api, "scale_offset_record_file", scale_offset_record_file, optional=True)
    _check_path(api, "config_file", config_file, optional=True)
    _save.save_quant_retrain_model(
        retrained_model_file, retrained_weights_file, save_type, save_path, scale_offset_record_file,
        config_file,
    )
