"""Rewrite a fake-quant (or calibration) prototxt so that a STOCK pycaffe (built with Python layers) runs it.

AMCT's fake-quant model uses the custom layer types ``Quant``, ``DeQuant`` and ``AntiQuant`` of AMCT's
patched Caffe. :func:`rewrite_fake_quant_for_pycaffe` turns each of them into a Caffe Python layer backed by
:mod:`amct_caffe.caffe.python_layers`::

    layer { name: "conv1_quant_layer" type: "Python" bottom: "data" top: "conv1_quant_layer"
            python_param { module: "amct_caffe.caffe.python_layers" layer: "Quant"
                           param_str: "{\\"offset\\": -3, \\"scale\\": 16.0, ...}" } }

Names, bottoms, tops, phase rules and every other generic field stay, so the fake-quant caffemodel loads
unchanged: Caffe copies caffemodel blobs into the layer of the same name whatever its type, and the Python
DeQuant layer creates its three blobs ``[deq_scale, shift_bit, offset_w]`` with AMCT's shape rule. The
AMCT-only parameter messages (``quant_param``, ``dequant_param``) are removed, because a stock
``caffe.proto`` does not know them; their values travel as JSON in ``param_str`` (``quant_param.offset``,
a byte string, as its signed first byte).

A DeQuant layer without ``param`` specs gets ``param { lr_mult: 0 decay_mult: 0 }`` for each of its three
blobs: they are fixed factors, and a stock solver would otherwise apply weight decay to them (their
gradient is zero, but decay still shrinks ``deq_scale``) if the rewritten model is trained.

Only the prototxt is rewritten. Use it with the FAKE-QUANT caffemodel: the deploy caffemodel stores one
packed uint64 DeQuant blob and int8 weights, which a float Caffe cannot use.

The calibration model of ``quantize_model`` is rewritten the same way: each ``IFMR`` layer becomes a Python
layer of :mod:`amct_caffe.caffe.python_calibration` whose ``param_str`` carries its ``ifmr_param`` (plus the
indices of its distinct bottom names), so ``batch_num`` forward batches in a stock pycaffe write the record
file as the engine does.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from amct_caffe.errors import ModelFormatError
from amct_caffe.log import get_logger
from amct_caffe.model.io import atomic_write, load_prototxt, prototxt_text
from amct_caffe.model.layer_types import ANTI_QUANT, DEQUANT, FAKE_QUANT_TYPES, IFMR, QUANT, RETRAIN_TYPES
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.numerics import offset_byte

LOGGER = get_logger("caffe.rewrite")

#: The module Caffe imports for the rewritten layers (``python_param.module``).
PYCAFFE_LAYERS_MODULE = "amct_caffe.caffe.python_layers"
#: The module of the rewritten ``IFMR`` calibration layers.
PYCAFFE_CALIBRATION_MODULE = "amct_caffe.caffe.python_calibration"
#: Every layer type rewritten, each into the Python layer class of the same name.
REWRITTEN_TYPES = (*FAKE_QUANT_TYPES, IFMR)
#: The layer types rewritten, each into the Python layer class of the same name.
#: Layer types that mark a retrain (QAT) model, which must be saved before it can be rewritten.
#: The AMCT parameter messages a rewritten layer drops (a stock caffe.proto lacks them).
_AMCT_PARAM_FIELDS = ("quant_param", "dequant_param", "ifmr_param")


def _layer_error(layer: caffe_pb2.LayerParameter, message: str) -> ModelFormatError:
    return ModelFormatError(f"Layer '{layer.name}' (type {layer.type}): {message}")


def _quant_params(layer: caffe_pb2.LayerParameter) -> dict[str, Any]:
    p = layer.quant_param
    scale = float(p.scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise _layer_error(
            layer,
            f"quant_param.scale is {scale}; it must be 1/scale_d, a finite value > 0 (set quant_param "
            "{ scale: ... }).",
        )
    # The float32 field widened to a Python float: its repr in JSON round-trips exactly.
    return {
        "scale": scale,
        "offset": offset_byte(p.offset),
        "with_offset": bool(p.with_offset),
        "object_layer": p.object_layer,
    }


def _dequant_params(layer: caffe_pb2.LayerParameter) -> dict[str, Any]:
    params: dict[str, Any] = {"channel_wise": bool(layer.dequant_param.channel_wise)}
    for field, value in layer.dequant_param.ListFields():
        if not isinstance(value, (str, bytes, bool, int, float)):  # a repeated field
            params[field.name] = [float(v) for v in value]
        else:
            params[field.name] = value
    return params


def _ifmr_params(layer: caffe_pb2.LayerParameter) -> dict[str, Any]:
    p = layer.ifmr_param
    first: dict[str, int] = {}
    for i, name in enumerate(layer.bottom):
        first.setdefault(name, i)
    params: dict[str, Any] = {name: float(getattr(p, name)) for name in (
        "search_range_start", "search_range_end", "search_step", "max_percentile", "min_percentile")}
    params.update(batch_num=int(p.batch_num), with_offset=bool(p.with_offset),
                  object_layer=list(p.object_layer), record_file_path=p.record_file_path,
                  distinct=list(first.values()))
    return params


def pycaffe_param_str(layer: caffe_pb2.LayerParameter) -> str:
    """The JSON ``param_str`` that carries a Quant/DeQuant/AntiQuant/IFMR layer's parameters.

    Raises:
        ModelFormatError: a Quant layer's scale is not a finite value > 0 (the engine refuses it too).
    """
    if layer.type == QUANT:
        params = _quant_params(layer)
    elif layer.type == DEQUANT:
        params = _dequant_params(layer)
    elif layer.type == ANTI_QUANT:
        params = {}
    elif layer.type == IFMR:
        params = _ifmr_params(layer)
    else:
        raise ValueError(f"layer '{layer.name}' of type {layer.type} is not a fake-quant layer")
    return json.dumps(params, sort_keys=True, allow_nan=False)


def rewrite_net_for_pycaffe(net: caffe_pb2.NetParameter, path: str = "") -> tuple[caffe_pb2.NetParameter,
                                                                                    dict[str, int]]:
    """A copy of ``net`` with every Quant/DeQuant/AntiQuant/IFMR layer turned into a pycaffe Python layer.

    Returns the new net and the number of layers rewritten per type.

    Raises:
        ModelFormatError: the net is a retrain model (ActivationQAT/WeightQAT layers: save it with
            ``save_quant_retrain_model`` first), has no fake-quant layer, or a Quant layer is invalid.
    """
    where = f" '{path}'" if path else ""
    retrain = [layer.name for layer in net.layer if layer.type in RETRAIN_TYPES]
    if retrain:
        raise ModelFormatError(
            f"Model{where} is a retrain (QAT) model (layers {retrain[:4]}); save it with "
            "save_quant_retrain_model(..., 'Fakequant', ...) and rewrite the fake-quant model it writes."
        )
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    counts = dict.fromkeys(FAKE_QUANT_TYPES, 0)  # IFMR counted only when present
    for layer in out.layer:
        if layer.type not in REWRITTEN_TYPES:
            continue
        kind = layer.type
        param_str = pycaffe_param_str(layer)
        for name in _AMCT_PARAM_FIELDS:
            layer.ClearField(name)
        layer.type = "Python"
        module = PYCAFFE_CALIBRATION_MODULE if kind == IFMR else PYCAFFE_LAYERS_MODULE
        layer.python_param.module = module
        layer.python_param.layer = kind
        layer.python_param.param_str = param_str
        if kind == DEQUANT and not layer.param:
            for _ in range(3):
                layer.param.add(lr_mult=0.0, decay_mult=0.0)
        counts[kind] = counts.get(kind, 0) + 1
    if not any(counts.values()):
        raise ModelFormatError(
            f"Model{where} has no Quant, DeQuant or AntiQuant layer (nor an IFMR calibration layer); give "
            "the *_fake_quant_model.prototxt that save_quant_retrain_model/save_model writes, or the "
            "calibration model of quantize_model."
        )
    return out, counts


def rewrite_fake_quant_for_pycaffe(
    model_in: str | os.PathLike[str], model_out: str | os.PathLike[str]
) -> dict[str, int]:
    """Rewrite the fake-quant prototxt ``model_in`` into ``model_out`` for a stock pycaffe (Python layers).

    The output runs in any Caffe built with ``WITH_PYTHON_LAYER=1`` whose Python can import
    ``amct_caffe.caffe.python_layers`` (it needs only numpy: e.g. ``PYTHONPATH=<amct-caffe>/src``), with the
    fake-quant caffemodel unchanged. ``model_out`` is written atomically (it may be ``model_in``).

    Returns:
        The number of layers rewritten per type (``{"Quant": n, "DeQuant": n, "AntiQuant": n}``).

    Raises:
        ModelFormatError: ``model_in`` is missing or unparsable, is a retrain model, has no fake-quant
            layer, or holds an invalid Quant layer. Nothing is written then.
    """
    path = str(model_in)
    net = load_prototxt(path, upgrade=False)
    out, counts = rewrite_net_for_pycaffe(net, path)
    atomic_write(model_out, prototxt_text(out).encode("utf-8"))
    LOGGER.info(
        "Rewrote %s into %s for pycaffe: %s", path, os.fspath(model_out),
        ", ".join(f"{n} {kind}" for kind, n in counts.items()),
    )
    return counts
