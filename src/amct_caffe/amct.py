"""AMCT's public API for Caffe: ``from amct_caffe import amct`` (or ``import amct_caffe as amct``).

Every function keeps AMCT's name, argument order, defaults and output files, so an AMCT-Caffe script runs
unchanged. This module only checks the arguments and calls the flow in ``amct_caffe.workflows``.

Beyond AMCT, it also offers the engine's extension points: ``register_layer``/``CustomLayer`` (a layer type
of your own in Python and torch) and ``allow_python_layers`` (a block inside which nets may import their
``type: "Python"`` layers' modules), also reachable as ``amct_caffe.register_layer`` and so on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from amct_caffe.engine.layers import CustomLayer, allow_python_layers, register_layer, unregister_layer
from amct_caffe.errors import ConfigError, NotImplementedFeatureError
from amct_caffe.workflows import auto_calibration as _auto_calibration
from amct_caffe.workflows import convert as _convert
from amct_caffe.workflows import ptq as _ptq
from amct_caffe.workflows import qat as _qat
from amct_caffe.workflows import save as _save
from amct_caffe.workflows.ptq import CalibrationGraph

__all__ = [
    "CalibrationGraph",
    "CustomLayer",
    "allow_python_layers",
    "register_layer",
    "unregister_layer",
    "accuracy_based_auto_calibration",
    "auto_decomposition",
    "auto_nuq",
    "convert_model",
    "create_quant_config",
    "create_quant_retrain_config",
    "create_quant_retrain_model",
    "init",
    "quantize_model",
    "save_model",
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
    *,
    for_atc: bool = False,
    input_shape: Mapping[str, Sequence[int]] | None = None,
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
            (``scale_d``, ``offset_d``, ``scale_w``, ``offset_w``, ``channels/height/width``). None: the
            record the retrain model names (the ``record_file_path`` that ``create_quant_retrain_model``
            wrote into its ``ActivationQAT`` layers); a ``MissingRecordPathError`` when it names none.
        config_file: the QAT JSON config; it selects which retrained layers are saved quantized (a layer it
            disables is saved in float). None: every layer with retrain layers is quantized.
        for_atc: keyword-only, not part of AMCT's API; False (default) writes exactly AMCT's models. True
            writes the prototxts in inference form: every data layer becomes an ``Input`` layer with its
            shape, loss and accuracy layers (and what only they read) and ``Dropout`` are removed; the
            deploy prototxt also gets the type strings ATC's Caffe parser needs (``DetectionOutput`` ->
            ``SSDDetectionOutput``, ``ConvolutionDepthwise``/``DepthwiseConvolution`` -> ``Convolution``
            with ``group``, ...), so ATC converts it as it is (docs/design.md, "ATC-ready models").
        input_shape: keyword-only, with ``for_atc``: ``{input blob: shape}`` for data layers whose shape
            the net cannot tell (default: built from the data layer, else the record's input shape, batch 1).

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
        AtcUnsupportedLayerError: ``for_atc`` and the deploy model holds a layer type ATC does not convert
            (the message names each).
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
        config_file, for_atc=for_atc, input_shape=input_shape,
    )


# ---------------------------------------------------------------------------------------------------------
# Post-training quantization (calibration)
# ---------------------------------------------------------------------------------------------------------
def create_quant_config(
    config_file: str,
    model_file: str,
    weights_file: str,
    skip_layers: list[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    config_defination: str | None = None,
) -> None:
    """Find the layers post-training quantization can quantize and write the PTQ config file.

    The config is a JSON file: the calibration settings, then one entry per quantizable layer of the model's
    TEST-phase view (Convolution with a 4-D filter, Deconvolution with group 1 and dilation 1, InnerProduct
    with axis 1 and no transpose, AVE Pooling that is not global)::

        {"version": 1, "batch_num": 1, "activation_offset": true, "do_fusion": true,
         "skip_fusion_layers": [],
         "conv1": {"quant_enable": true,
                   "activation_quant_params": {"max_percentile": 0.999999, "min_percentile": 0.999999,
                                               "search_range": [0.7, 1.3], "search_step": 0.01},
                   "weight_quant_params": {"channel_wise": true}}, ...}

    Args:
        config_file: path of the JSON config to write; an existing file is overwritten, missing folders
            are created.
        model_file: the float model (.prototxt), inference-ready.
        weights_file: its float weights (.caffemodel); it must exist and parse.
        skip_layers: names of layers to keep float (written with ``quant_enable: false``).
        batch_num: calibration batches (> 0); ``batch_num`` x batch size images are calibrated on, all held
            in memory by the calibration layers, so keep it small.
        activation_offset: True: asymmetric activations (with an offset); False: symmetric (offset 0).
        config_defination: a simplified config (proto text of ``AMCTConfig``, AMCT's
            ``calibration_config_caffe.proto``). When given, ``skip_layers``, ``batch_num`` and
            ``activation_offset`` are ignored and must be set in that file (``common_config``,
            ``override_layer_types``, ``override_layer_configs`` in increasing priority; ``skip_layers``,
            ``skip_layer_types``, ``do_fusion``, ``skip_fusion_layers``).

    Returns:
        None. Output: ``config_file``.

    Raises:
        ConfigError: an argument has the wrong type or value (e.g. ``batch_num`` <= 0, a skip layer the
            model lacks); the model has nothing to quantize or already holds AMCT layers;
            ``config_defination`` is invalid (the message names the file, the field or layer and the fix).
            No config is written then, and an existing one is left untouched.
        ModelFormatError: the prototxt or caffemodel is missing or cannot be parsed.
    """
    api = "create_quant_config"
    _check_path(api, "config_file", config_file)
    _check_path(api, "model_file", model_file)
    _check_path(api, "weights_file", weights_file)
    _check_path(api, "config_defination", config_defination, optional=True)
    if skip_layers is not None and (isinstance(skip_layers, str) or not all(
            isinstance(name, str) for name in skip_layers)):
        raise ConfigError(f"{api}: argument 'skip_layers' must be a list of layer names (str) or None, got "
                          f"{skip_layers!r}.")
    if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num <= 0:
        raise ConfigError(f"{api}: argument 'batch_num' must be an integer > 0, got {batch_num!r}.")
    if not isinstance(activation_offset, bool):
        raise ConfigError(f"{api}: argument 'activation_offset' must be True or False, got "
                          f"{activation_offset!r}.")
    _ptq.create_quant_config(config_file, model_file, weights_file, skip_layers, batch_num, activation_offset,
                             config_defination)


def init(
    config_file: str, model_file: str, weights_file: str, scale_offset_record_file: str
) -> CalibrationGraph:
    """Parse the model for post-training quantization and create the record file.

    The model's inference view is used: its TEST phase, with every BatchNorm on its stored statistics. The
    config is validated against it (a config made for another model is an error), the caffemodel is checked
    against the prototxt, and ``scale_offset_record_file`` is created empty (an existing file is
    overwritten).

    Args:
        config_file: the PTQ config from ``create_quant_config`` (possibly edited).
        model_file: the float model (.prototxt) the config was made for.
        weights_file: its float weights (.caffemodel).
        scale_offset_record_file: the record file to create; ``quantize_model`` writes the weight scales into
            it and the calibration model's IFMR layers the activation factors.

    Returns:
        The graph (``CalibrationGraph``) to pass to ``quantize_model`` and ``save_model``. It remembers the
        three input files; once one of them changes, the graph is refused (call ``init`` again).

    Raises:
        ConfigError: an argument has the wrong type; the config does not fit the model or enables no layer;
            the model already holds AMCT layers; the record path is an input file or a folder.
        ModelFormatError: a file is missing or malformed; the caffemodel does not fit the prototxt.
    """
    api = "init"
    for name, value in (("config_file", config_file), ("model_file", model_file),
                        ("weights_file", weights_file),
                        ("scale_offset_record_file", scale_offset_record_file)):
        _check_path(api, name, value)
    return _ptq.init(config_file, model_file, weights_file, scale_offset_record_file)


def quantize_model(graph: CalibrationGraph, modified_model_file: str, modified_weights_file: str) -> None:
    """Write the calibration model: fusions applied, weight scales recorded, IFMR layers inserted.

    BatchNorm (+ Scale) after a Convolution, Deconvolution or InnerProduct is folded into it (``do_fusion``,
    except ``skip_fusion_layers``); the ARQ weight scales of every quantized layer go into the record
    (``scale_w``, ``offset_w``); an ``IFMR`` layer is placed in front of every quantized input. Then run the
    modified model forward ``batch_num`` times on calibration data, e.g.::

        net = caffe.Net(modified_model_file, caffe.TEST, weights=modified_weights_file)
        for batch in batches:
            net.forward(data=batch)

    (in ``amct_caffe.caffe``, or in a stock pycaffe after ``amct-caffe pycaffe-rewrite``). The IFMR layers
    gather their input over ALL ``batch_num`` batches and, after the last, write ``scale_d``, ``offset_d``
    and the input shape of each quantized layer into the record.

    Args:
        graph: the graph ``init`` returned.
        modified_model_file: the calibration prototxt to write.
        modified_weights_file: the calibration caffemodel to write (folded float weights).

    Returns:
        None. Outputs: ``modified_model_file``, ``modified_weights_file`` and the record file (weight scales
        only; a calibration of an earlier ``quantize_model`` is discarded), written all-or-nothing.

    Raises:
        GraphStateError: the config, model or weights file changed since ``init``.
        ConfigError: an argument has the wrong type, or an output is an input file or another output.
        ModelFormatError: a quantized layer has no weights; an inserted name is taken.
    """
    api = "quantize_model"
    _check_path(api, "modified_model_file", modified_model_file)
    _check_path(api, "modified_weights_file", modified_weights_file)
    _ptq.quantize_model(graph, modified_model_file, modified_weights_file)


def save_model(
    graph: CalibrationGraph,
    save_type: str,
    save_path: str,
    *,
    refine: str | Sequence[str] | None = None,
    calibration_data: Sequence[Mapping[str, np.ndarray]] | None = None,
    for_atc: bool = False,
    input_shape: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Save the calibrated model as a fake-quant model for Caffe and/or a deploy model for ATC.

    The record must hold every quantized layer's ``scale_d``/``offset_d``: the calibration model of
    ``quantize_model`` has run its ``batch_num`` forward batches. ``Quant`` (``<first layer>_quant_layer``,
    one per quantized input) and ``DeQuant`` (``<layer>_dequant_layer``) layers are inserted into the folded
    model, in the formats ``save_quant_retrain_model`` writes: the fake-quant model holds float32 weights
    ``int8 code * scale_w`` and bias ``round(b / (scale_d * scale_w)) * scale_d * scale_w``; the deploy
    model INT8 weights, INT32 bias and the packed ``deq_scale``.

    Args:
        graph: the graph ``init`` returned, after ``quantize_model`` and the calibration.
        save_type: ``'Fakequant'``, ``'Deploy'`` or ``'Both'`` (exactly so spelled).
        save_path: folder plus file-name prefix, e.g. ``./result/model``; missing folders are created.
        refine: keyword-only, not part of AMCT's API; None (default) writes exactly AMCT's models.
            ``"bias_correction"`` first shifts the float bias of every quantized Convolution/Deconvolution/
            InnerProduct that has one by the per-channel mean of (float output - fake-quant output) on
            ``calibration_data``, layer after layer; the models keep their structure and the deploy bias is
            ``round(b' / (scale_d * scale_w))`` as usual. ``"adaround"`` instead chooses every weight's
            INT8 code between ``floor`` and ``ceil`` of ``w / scale_w`` (the record's scales unchanged) to
            bring each layer's output on ``calibration_data`` closer to the float layer's, layer after layer.
            ``"end_to_end"`` trains the INT8 weight codes (any code on the record's ``scale_w`` grid) and the
            float biases of all quantized layers together, the whole fake-quant model in the loop, against
            the float model's outputs on ``calibration_data`` (docs/design.md, "Post-training refinement").
            ``"equalization"`` -- alone or in a list with one of the three, e.g.
            ``["equalization", "end_to_end"]``, and always run first -- multiplies the output channels of a
            layer that feeds a quantized layer through ReLU/PReLU/MAX Pooling only by ``k_c >= 1`` and
            divides the reader's weights by ``k_c``, so every channel of the quantized input fills the one
            activation grid; the touched layers get new ARQ and IFMR factors on ``calibration_data``. The
            record file keeps the calibration's factors; the models hold the new ones and
            ``<save_path>_quant.json`` lists each rescaled pair and its ``k_c`` under ``equalizations``.
        calibration_data: keyword-only, needed by ``refine``: the calibration batches, a list of
            ``{input blob name: array}`` (the arrays the calibration model ran on).
        for_atc: keyword-only, not part of AMCT's API; False (default) writes exactly AMCT's models. True
            writes the prototxts in inference form: every data layer becomes an ``Input`` layer with its
            shape, loss and accuracy layers (and what only they read) and ``Dropout`` are removed; the
            deploy prototxt also gets the type strings ATC's Caffe parser needs (``DetectionOutput`` ->
            ``SSDDetectionOutput``, ``ConvolutionDepthwise``/``DepthwiseConvolution`` -> ``Convolution``
            with ``group``, ...), so ATC converts it as it is (docs/design.md, "ATC-ready models").
        input_shape: keyword-only, with ``for_atc``: ``{input blob: shape}`` for data layers whose shape
            the net cannot tell (default: built from the data layer, else the record's input shape, batch 1).

    Returns:
        None. Outputs: ``<save_path>_fake_quant_model.prototxt`` / ``_fake_quant_weights.caffemodel``
        ('Fakequant', 'Both'), ``<save_path>_deploy_model.prototxt`` / ``_deploy_weights.caffemodel``
        ('Deploy', 'Both') and ``<save_path>_quant.json`` (where the quant layers went, which fusions were
        done), all written together: on any error none is written.

    Raises:
        RecordError: the calibration has not run (no ``quantize_model`` on this graph, or the record lacks
            the activation factors: run the modified model ``batch_num`` times first).
        GraphStateError: the config, model or weights file changed since ``init``.
        ConfigError: a bad argument (an unknown ``refine``, two weight refinements, ``refine`` without
            ``calibration_data``); a
            quantized bias does not fit INT32 (``BiasOverflowError``: set ``quant_enable`` false for that
            layer in the config).
        AtcUnsupportedLayerError: ``for_atc`` and the deploy model holds a layer type ATC does not convert
            (the message names each).
    """
    api = "save_model"
    if not isinstance(save_type, str):
        raise ConfigError(f"{api}: argument 'save_type' must be 'Fakequant', 'Deploy' or 'Both', got "
                          f"{save_type!r}.")
    _check_path(api, "save_path", save_path)
    _ptq.save_model(graph, save_type, save_path, refine=refine, calibration_data=calibration_data,
                    for_atc=for_atc, input_shape=input_shape)


def convert_model(
    model_file: str,
    weights_file: str,
    scale_offset_record_file: str,
    save_path: str,
    *,
    for_atc: bool = False,
    input_shape: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Build the fake-quant and deploy models of a float model from a record of externally computed factors.

    Each layer of the record (Convolution, Deconvolution, InnerProduct, AVE Pooling) is quantized with its
    ``scale_d``, ``offset_d`` and ``scale_w`` (one value, or one per output channel for convolutions; every
    ``offset_w`` 0). BatchNorm (+ Scale) is folded into the layer before it unless the record sets
    ``skip_fusion: true`` for that layer (the factors refer to the folded weights).

    Args:
        model_file: the float model (.prototxt); it must not hold Quant/DeQuant/AntiQuant layers already.
        weights_file: its float weights (.caffemodel).
        scale_offset_record_file: the record (protobuf text of ``ScaleOffsetRecord``); ``shift_bit`` is not
            supported.
        save_path: folder plus file-name prefix of the outputs.
        for_atc: keyword-only, not part of AMCT's API; False (default) writes exactly AMCT's models. True
            writes the prototxts in inference form: every data layer becomes an ``Input`` layer with its
            shape, loss and accuracy layers (and what only they read) and ``Dropout`` are removed; the
            deploy prototxt also gets the type strings ATC's Caffe parser needs (``DetectionOutput`` ->
            ``SSDDetectionOutput``, ``ConvolutionDepthwise``/``DepthwiseConvolution`` -> ``Convolution``
            with ``group``, ...), so ATC converts it as it is (docs/design.md, "ATC-ready models").
        input_shape: keyword-only, with ``for_atc``: ``{input blob: shape}`` for data layers whose shape
            the net cannot tell (default: built from the data layer, else the record's input shape, batch 1).

    Returns:
        None. Outputs: the fake-quant and deploy prototxt/caffemodel pairs (as ``save_model`` 'Both'),
        written all-or-nothing.

    Raises:
        RecordError: the record is missing or malformed, sets ``shift_bit``, names a layer the model lacks or
            cannot quantize, or lacks a layer's factors.
        ConfigError: the model already holds AMCT layers (it was quantized); a bad argument; a quantized bias
            does not fit INT32.
        ModelFormatError: the prototxt or caffemodel is missing or malformed.
        AtcUnsupportedLayerError: ``for_atc`` and the deploy model holds a layer type ATC does not convert
            (the message names each).
    """
    api = "convert_model"
    for name, value in (("model_file", model_file), ("weights_file", weights_file),
                        ("scale_offset_record_file", scale_offset_record_file), ("save_path", save_path)):
        _check_path(api, name, value)
    _convert.convert_model(model_file, weights_file, scale_offset_record_file, save_path, for_atc=for_atc,
                           input_shape=input_shape)


def accuracy_based_auto_calibration(
    model_file: str,
    weights_file: str,
    model_evaluator: Any,
    config_file: str,
    record_file: str,
    save_dir: str,
    strategy: Any = "BinarySearch",
    sensitivity: Any = "CosineSimilarity",
    *,
    for_atc: bool = False,
    input_shape: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Post-training quantization that keeps the most sensitive layers float until the accuracy goal holds.

    The float model is evaluated; then plain PTQ runs with ``config_file`` (``init``, ``quantize_model``,
    the evaluator's ``calibration`` on the calibration model, a fake-quant model) and its fake-quant model is
    evaluated. If ``metric_eval`` is not satisfied, every quantized layer's sensitivity is measured (cosine
    similarity of the net outputs of the float model and of the model with only that layer quantized, over
    the calibration inputs the evaluator fed) and a binary search finds the fewest most-sensitive layers to
    keep float (``quant_enable: false``) for ``metric_eval`` to be satisfied, each probe a full calibration
    and evaluation. When no probe satisfies it, a WARNING says so and the probe with the smallest loss is
    saved.

    Args:
        model_file: the float model (.prototxt), inference-ready.
        weights_file: its float weights (.caffemodel).
        model_evaluator: an instance of a subclass of
            ``amct_caffe.common.auto_calibration.AutoCalibrationEvaluatorBase`` with
            ``calibration(model_file, weights_file)`` (run ``batch_num`` forward batches of the given model,
            in ``amct_caffe.caffe``), ``evaluate(model_file, weights_file)`` (the metric) and
            ``metric_eval(original_metric, new_metric)`` (``(satisfied, loss)``, smaller loss is better).
        config_file: the PTQ config from ``create_quant_config``; it is read, not changed. Layers it leaves
            float stay float.
        record_file: the record to write (overwritten) with the factors of the saved models.
        save_dir: folder plus file-name prefix of the outputs, e.g. ``./result/model``.
        strategy: ``'BinarySearch'`` or a ``BinarySearchStrategy()``.
        sensitivity: ``'CosineSimilarity'`` or a ``CosineSimilaritySensitivity()``.
        for_atc: keyword-only, not part of AMCT's API; False (default) writes exactly AMCT's models. True
            writes the prototxts in inference form: every data layer becomes an ``Input`` layer with its
            shape, loss and accuracy layers (and what only they read) and ``Dropout`` are removed; the
            deploy prototxt also gets the type strings ATC's Caffe parser needs (``DetectionOutput`` ->
            ``SSDDetectionOutput``, ``ConvolutionDepthwise``/``DepthwiseConvolution`` -> ``Convolution``
            with ``group``, ...), so ATC converts it as it is (docs/design.md, "ATC-ready models").
        input_shape: keyword-only, with ``for_atc``: ``{input blob: shape}`` for data layers whose shape
            the net cannot tell (default: built from the data layer, else the record's input shape, batch 1).

    Returns:
        None. Outputs, written all-or-nothing at the end: the fake-quant and deploy models and
        ``<save_dir>_quant.json`` (as ``save_model`` 'Both'), ``record_file``,
        ``<save_dir>_quant_config.json`` (the config of the saved models), ``<save_dir>_sensitivity.json``
        (the layers ranked most sensitive first) and ``<save_dir>_fallback_history.json`` (every probe: the
        layers kept float, the metric, the loss, whether it was satisfied; and the probe saved).

    Raises:
        EvaluatorError: ``model_evaluator`` is not an instance of a subclass of the base class, does not
            override a method, or ``metric_eval`` does not return ``(bool, number)``.
        ConfigError: a bad argument (an unknown strategy or sensitivity, a ``save_dir`` without a file-name
            prefix or below a file, outputs that are inputs); the config does not fit the model; anything
            the PTQ flow refuses.
        ModelFormatError, RecordError: a model file is malformed; the evaluator's calibration did not run
            the calibration model ``batch_num`` times.
        AtcUnsupportedLayerError: ``for_atc`` and the deploy model holds a layer type ATC does not convert
            (the message names each).
        On any error no output is written and existing files are left untouched.
    """
    api = "accuracy_based_auto_calibration"
    for name, value in (("model_file", model_file), ("weights_file", weights_file),
                        ("config_file", config_file), ("record_file", record_file), ("save_dir", save_dir)):
        _check_path(api, name, value)
    _auto_calibration.accuracy_based_auto_calibration(
        model_file, weights_file, model_evaluator, config_file, record_file, save_dir, strategy, sensitivity,
        for_atc=for_atc, input_shape=input_shape)


def auto_nuq(*args: Any, **kwargs: Any) -> None:
    """AMCT's non-uniform weight quantization search: not implemented in amct-caffe.

    Raises:
        NotImplementedFeatureError: always.
    """
    raise NotImplementedFeatureError(
        "auto_nuq (non-uniform quantization) is not implemented in amct-caffe; AMCT documents no performance "
        "gain from it on current products. Use uniform post-training quantization (create_quant_config, "
        "init, quantize_model, save_model) or QAT instead."
    )


def auto_decomposition(*args: Any, **kwargs: Any) -> None:
    """AMCT's tensor decomposition: not implemented in amct-caffe.

    Raises:
        NotImplementedFeatureError: always.
    """
    raise NotImplementedFeatureError(
        "auto_decomposition (tensor decomposition) is not implemented in amct-caffe; quantize the model as "
        "it is (post-training quantization or QAT)."
    )
