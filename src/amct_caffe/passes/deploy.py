"""The deploy model's weights (docs/amct-reference.md §7.2-7.3; docs/decisions.md §6): what
ATC converts for the NPU.

For every quantized layer ``L`` of the plan (``passes.quant_insert``):

* ``L``'s weight: the INT8 ARQ codes ``clamp(round_away(w / s_w[c]), -128, 127)`` in ``BlobProto.int8_data``
  (one two's-complement byte per element, Caffe's row-major order, ``shape`` set, ``data`` empty);
* ``L``'s bias (if any): ``round_away(b / (s_d * s_w[c]))`` in ``int32_data``; a value outside INT32 is a
  :class:`~amct_caffe.quant.numerics.BiasOverflowError` naming the layer (skip it in the config);
* ``<L>_dequant_layer``: ONE blob whose ``uint64_data`` holds the zero-extended IEEE-754 float32 bits of
  ``deq_scale[c] = float32(s_d * s_w[c])`` (shift N and ``offset_w`` are 0; ``quant.numerics.
  pack_deq_scale``), shape ``[C_out]`` when ``channel_wise`` else ``[1]``;
* ``Quant`` layers have no blobs; every other layer keeps its float blobs.

ATC picks each blob's type by the first populated field among double, int8, int32, uint64, float, so
exactly one field is set per blob.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from amct_caffe.model.blobs import array_to_blob
from amct_caffe.model.weights import Weights, weights_to_net
from amct_caffe.passes.quant_insert import (
    Codes,
    QuantGroup,
    all_weight_codes,
    dequant_layer_name,
    dequant_scales,
)
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.numerics import pack_deq_scale, quantize_bias

#: Layer name -> its blobs as (array, storage kind of ``model.blobs.array_to_blob``).
TypedBlobs = dict[str, list[tuple[np.ndarray, str]]]


def deploy_blobs(weights: Weights, groups: Sequence[QuantGroup], codes: Codes | None = None) -> TypedBlobs:
    """The integer blobs of the quantized layers and their ``DeQuant`` layers, by layer name (``codes``: the
    INT8 weight codes of ``quant_insert.all_weight_codes``, when already computed).

    Raises:
        BiasOverflowError: a quantized bias does not fit INT32 (the message names the layer).
    """
    codes = all_weight_codes(weights, groups) if codes is None else codes
    out: TypedBlobs = {}
    for group in groups:
        for layer in group.layers:
            if layer.has_weights:
                blobs = weights[layer.name]
                typed = [(codes[layer.name], "int8")]
                if len(blobs) > 1:
                    bias = quantize_bias(blobs[1], np.float32(layer.scale_d), layer.scale_w, layer.name)
                    typed.append((bias.numpy().reshape(blobs[1].shape), "int32"))
                out[layer.name] = typed + [(np.asarray(b, np.float32), "float") for b in blobs[2:]]
            out[dequant_layer_name(layer.name)] = [(pack_deq_scale(dequant_scales(layer)), "uint64")]
    return out


def caffemodel_with_typed_blobs(
    net: caffe_pb2.NetParameter,
    weights: Weights,
    typed: Mapping[str, Sequence[tuple[np.ndarray, str]]],
    like: caffe_pb2.NetParameter | None = None,
) -> caffe_pb2.NetParameter:
    """A caffemodel of ``net``: float ``weights`` for most layers, the ``typed`` blobs for the layers named.

    Layers keep the saved net's order (``model.weights.weights_to_net``).
    """
    merged: Weights = dict(weights)
    for name, blobs in typed.items():
        merged[name] = [np.zeros(0, np.float32) for _ in blobs]  # placeholders, replaced below
    out = weights_to_net(merged, net, like=like)
    for lp in out.layer:
        layer_blobs = typed.get(lp.name)
        if layer_blobs is None:
            continue
        del lp.blobs[:]
        for array, kind in layer_blobs:
            array_to_blob(array, lp.blobs.add(), kind)
    return out


def deploy_caffemodel(
    net: caffe_pb2.NetParameter,
    weights: Weights,
    groups: Sequence[QuantGroup],
    like: caffe_pb2.NetParameter | None = None,
    codes: Codes | None = None,
) -> caffe_pb2.NetParameter:
    """The deploy caffemodel of the saved ``net`` (its prototxt, ``Quant``/``DeQuant`` inserted)."""
    return caffemodel_with_typed_blobs(net, weights, deploy_blobs(weights, groups, codes), like)
