"""The fake-quant model's weights (docs/amct-reference.md §6; docs/decisions.md §6):
float32 blobs Caffe can run.

For every quantized layer ``L`` of the plan (``passes.quant_insert``):

* ``L``'s weight is ``w_hat = codes * s_w[c]`` with the INT8 ARQ codes of its float weight
  (``quant_insert.fake_quant_weight``), stored in the ordinary float ``data`` field, same shape;
* ``L``'s bias (if any) is ``round_away(b / (s_d * s_w[c])) * deq_scale[c]`` (``quant.numerics.
  fake_quant_bias``, docs/decisions.md row 7), so the fake-quant and the deploy model differ only in the order
  of their accumulations; an INT32 overflow is a :class:`~amct_caffe.quant.numerics.BiasOverflowError`;
* ``<L>_dequant_layer`` gets three float blobs ``[deq_scale, shift_bit = 0, offset_w = 0]``, each of shape
  ``[C_out]`` when ``channel_wise`` (the patched Caffe's DeQuant allocates them that way for a 4-D bottom),
  else ``[1]``; ``deq_scale[c] = float32(s_d * s_w[c])``;
* ``Quant`` layers have no blobs; every other layer keeps its float blobs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amct_caffe.model.weights import Weights, weights_to_net
from amct_caffe.passes.quant_insert import (
    Codes,
    QuantGroup,
    all_weight_codes,
    dequant_layer_name,
    dequant_scales,
    fake_quant_weight,
)
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.numerics import fake_quant_bias


def fake_quant_weights(weights: Weights, groups: Sequence[QuantGroup], codes: Codes | None = None) -> Weights:
    """The fake-quant model's blobs by layer name (a new mapping; ``weights`` is not changed).

    Args:
        weights: the float weights of the saved net (retrain layers removed, BatchNorm folded).
        groups: the quantization plan.
        codes: the INT8 weight codes (``quant_insert.all_weight_codes``), when already computed.

    Raises:
        BiasOverflowError: a quantized bias does not fit INT32 (the message names the layer).
    """
    codes = all_weight_codes(weights, groups) if codes is None else codes
    out: Weights = dict(weights)
    for group in groups:
        for layer in group.layers:
            deq = dequant_scales(layer)
            if layer.has_weights:
                blobs = weights[layer.name]
                new = [fake_quant_weight(layer, codes[layer.name])]
                if len(blobs) > 1:
                    bias = fake_quant_bias(blobs[1], np.float32(layer.scale_d), layer.scale_w, layer.name)
                    new.append(bias.numpy().reshape(blobs[1].shape))
                out[layer.name] = new + list(blobs[2:])
            zeros = np.zeros_like(deq)
            out[dequant_layer_name(layer.name)] = [deq, zeros, zeros.copy()]
    return out


def fake_quant_caffemodel(
    net: caffe_pb2.NetParameter,
    weights: Weights,
    groups: Sequence[QuantGroup],
    like: caffe_pb2.NetParameter | None = None,
    codes: Codes | None = None,
) -> caffe_pb2.NetParameter:
    """The fake-quant caffemodel of the saved ``net`` (its prototxt, ``Quant``/``DeQuant`` inserted).

    ``like`` is the retrained caffemodel: blobs it stored with the legacy 4-D fields keep them
    (``model.weights.weights_to_net``).
    """
    return weights_to_net(fake_quant_weights(weights, groups, codes), net, like=like)
