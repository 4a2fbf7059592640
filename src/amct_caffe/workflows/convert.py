"""``convert_model``: fake-quant and deploy models from a record the user wrote (AMCT reference §1.2, §5.1).

The quantization factors come from outside (another tool, a hand computation); the record lists every layer
to quantize with ``scale_d``, ``offset_d`` and -- for layers with weights -- ``scale_w`` (one value, or one
per output channel for Convolution/Deconvolution) and ``offset_w`` (all 0). The flow:

1. read the model's inference view (``ptq.inference_view``); a model that already holds AMCT layers
   (``Quant``, ``DeQuant``, ``AntiQuant``, ...) is refused: it was quantized before;
2. read and validate the record: ``shift_bit`` is refused (shift-N is not supported), every layer must be
   in the model and quantizable and carry its factors;
3. fold BatchNorm (+ Scale) into the Convolution/Deconvolution/InnerProduct before it, except for the
   layers whose record entry says ``skip_fusion: true`` (the factors refer to the folded weights);
4. quantize the weights with the record's ``scale_w`` (``clamp(round(w / scale_w), -128, 127)``; a
   ``scale_w`` per output channel means ``channel_wise``), insert ``Quant``/``DeQuant`` and write the four
   model files all-or-nothing, in the formats ``save_model`` writes. The record is only read.
"""

from __future__ import annotations

import os

import numpy as np

from amct_caffe.errors import ConfigError, RecordError
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import has_legacy_shape
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import load_caffemodel
from amct_caffe.model.validate import check_weights
from amct_caffe.model.weights import weights_from_net
from amct_caffe.passes.fuse_bn import FOLDABLE_TYPES, fuse_bn_one_phase
from amct_caffe.passes.quantizable import describe_layers
from amct_caffe.quant.arq import weight_channel_axis
from amct_caffe.quant.config import CHANNEL_WISE_TYPES, WEIGHTLESS_TYPES
from amct_caffe.quant.numerics import BiasOverflowError
from amct_caffe.quant.record import LayerRecord, read_records
from amct_caffe.workflows.inference import InputShapes, atc_request, recorded_by_blob
from amct_caffe.workflows.ptq import (
    SavedModels,
    build_saved_models,
    inference_view,
    plan_quant_groups,
    write_saved_models,
)
from amct_caffe.workflows.save import model_paths

LOGGER = get_logger("convert")

API = "convert_model"


def _record_layers(
    graph: Graph, records: dict[str, LayerRecord], record_file: str, model_file: str
) -> dict[str, str]:
    """The quantized layers of the record and their types; every entry must be usable.

    Raises:
        RecordError: ``shift_bit`` is set; a layer is not in the model, cannot be quantized, or lacks its
            ``scale_d``/``offset_d``/``scale_w``.
    """
    where = f"{API}: record '{record_file}'"
    described = {layer.name: layer for layer in describe_layers(graph)}
    if not records:
        raise RecordError(f"{where} lists no layer; write one 'record "
                          f"{{ key: \"<layer>\" value {{ scale_d ... }} }}' "
                          "entry per layer to quantize.")
    types = {}
    for name, rec in records.items():
        if rec.shift_bit:
            raise RecordError(f"{where}, layer '{name}': shift_bit is not supported by convert_model "
                              "(shift-N quantization is not available); remove the shift_bit values.")
        layer = described.get(name)
        if layer is None:
            raise RecordError(f"{where}, layer '{name}': model '{model_file}' has no such layer (in its "
                              "TEST-phase view); remove the entry or correct the layer name.")
        if not layer.quantizable:
            raise RecordError(f"{where}, layer '{name}': this {layer.layer_type} layer cannot be quantized "
                              f"({layer.unsupported_reason}); remove the entry.")
        missing = [f for f in ("scale_d", "offset_d") if getattr(rec, f) is None]
        if layer.layer_type not in WEIGHTLESS_TYPES and not rec.scale_w:
            missing.append("scale_w")
        if missing:
            raise RecordError(f"{where}, layer '{name}': {', '.join(missing)} missing; convert_model needs "
                              "the activation factors scale_d/offset_d (and scale_w for layers with "
                              "weights).")
        types[name] = layer.layer_type
    return types


def convert_model(
    model_file: str | os.PathLike[str],
    weights_file: str | os.PathLike[str],
    scale_offset_record_file: str | os.PathLike[str],
    save_path: str | os.PathLike[str],
    *,
    for_atc: bool = False,
    input_shape: InputShapes | None = None,
) -> SavedModels:
    """Write the fake-quant and deploy models of a float model from a user-written record (module docstring;
    ``amct_caffe.amct.convert_model``); ``for_atc``/``input_shape`` as in ``ptq.save_model``.

    Raises:
        ConfigError: the model already holds AMCT layers; a bad ``save_path``; a quantized bias outside
            INT32; outputs that would overwrite the inputs.
        ModelFormatError: the prototxt or caffemodel is missing or malformed.
        RecordError: the record is missing, malformed, uses ``shift_bit``, or does not fit the model.
    """
    model_file, weights_file, record_file, save_path = (
        os.fspath(p) for p in (model_file, weights_file, scale_offset_record_file, save_path))
    atc_request(for_atc, input_shape, API)  # argument check before any file is read
    paths = model_paths(save_path, "Both", API)
    sources = {os.path.abspath(p) for p in (model_file, weights_file, record_file)}
    for path in paths:
        if path and (os.path.abspath(path) in sources or os.path.isdir(path)):
            raise ConfigError(f"{API}: the output '{path}' is an input file or a folder; choose another "
                              "save_path.")
    _, graph = inference_view(model_file)
    describe_layers(graph)  # refuses models that already hold AMCT layers
    records = read_records(record_file)
    types = _record_layers(graph, records, record_file, model_file)

    caffemodel = load_caffemodel(weights_file)
    check_weights(graph.net, caffemodel, weights_file)
    weights = weights_from_net(caffemodel, weights_file)
    like = caffemodel if any(has_legacy_shape(b) for layer in caffemodel.layer for b in layer.blobs) else None
    del caffemodel
    skip = {name for name, rec in records.items() if rec.skip_fusion}
    folds = fuse_bn_one_phase(graph, weights, FOLDABLE_TYPES, skip)

    factors = {}
    for name, layer_type in types.items():
        rec = records[name]
        if layer_type in WEIGHTLESS_TYPES:
            factors[name] = (layer_type, float(rec.scale_d), int(rec.offset_d),  # type: ignore[arg-type]
                             np.ones(1, np.float32), False)
            continue
        blobs = weights.get(name)
        if not blobs:
            raise RecordError(f"{API}: layer '{name}' of model '{model_file}' has no weights in "
                              f"'{weights_file}'; give the caffemodel of this model.")
        cout = int(blobs[0].shape[weight_channel_axis(layer_type)])
        scale_w = np.asarray(rec.scale_w, np.float32)
        if scale_w.size not in (1, cout) or (scale_w.size > 1 and layer_type not in CHANNEL_WISE_TYPES):
            allowed = f"1 or {cout}" if layer_type in CHANNEL_WISE_TYPES else "1 (InnerProduct is per tensor)"
            raise RecordError(f"{API}: record '{record_file}', layer '{name}': scale_w has {scale_w.size} "
                              f"values; it needs {allowed} (the layer's weight has {cout} output channels"
                              f"{' after BatchNorm folding' if name in {f.conv for f in folds} else ''}).")
        channel_wise = layer_type in CHANNEL_WISE_TYPES and scale_w.size == cout and cout > 1
        factors[name] = (layer_type, float(rec.scale_d), int(rec.offset_d),  # type: ignore[arg-type]
                         scale_w, channel_wise)
    groups = plan_quant_groups(graph, factors, with_offset=True)
    try:
        models = build_saved_models(graph.to_net_parameter(), weights, groups, "Both", API, like)
    except BiasOverflowError as exc:
        raise BiasOverflowError(f"{exc} Remove layer '{exc.layer}' from the record '{record_file}' to keep "
                                "it float, or give it larger scales.", exc.channels, exc.layer) from exc
    recorded = {name: rec.shape for name, rec in records.items()}
    atc = atc_request(for_atc, input_shape, API, recorded_by_blob(groups, recorded))
    write_saved_models(paths, models, {}, atc, model_file)
    for fold in folds:
        LOGGER.debug("Fused BatchNorm '%s' into '%s'.", fold.batch_norm, fold.conv)
    LOGGER.info("Convert model success: %d quantized layer(s) from record '%s'; files %s.", len(factors),
                record_file, ", ".join(f"'{p}'" for p in paths if p))
    return models
