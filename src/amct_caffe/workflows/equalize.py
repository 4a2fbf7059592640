"""The ``equalization`` refinement of ``save_model``: cross-layer range equalization on the calibration data,
then new factors for the layers it touched.

Three steps over the folded float model (``passes.equalize`` has the pattern and the formula):

1. one forward per calibration batch gathers, per channel, the extremes of every value a pair rescales;
2. the weights are rescaled (the float model's outputs do not change);
3. the touched layers get new factors: ARQ on their new weights (``scale_w``), and IFMR -- with the layer's
   own search settings from the config -- on their new inputs over the same batches (``scale_d``,
   ``offset_d``), computed by the engine's ``IFMR`` layers without a record file.

The record file is not rewritten: it stays the calibration's record of the model the user gave (what
``convert_model`` with the original weights reproduces); the saved models hold the equalized factors, and
``<save_path>_quant.json`` lists every pair with its per-channel factors under ``equalizations`` so that a
tool comparing the float model's blobs with the saved models' can undo them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from amct_caffe.engine.layers.calibration import IFMR
from amct_caffe.engine.net import Net
from amct_caffe.log import get_logger
from amct_caffe.model.graph import Graph
from amct_caffe.model.phase import TEST
from amct_caffe.model.weights import Weights, weights_to_net
from amct_caffe.passes.calibration import CalibrationGroup, insert_calibration_layers
from amct_caffe.passes.equalize import (
    EqualizationPair,
    equalization_pairs,
    equalize_weights,
    equalizing_scales,
)
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.arq import arq_scale, weight_channel_axis
from amct_caffe.quant.numerics import QuantDataError
from amct_caffe.workflows.refine import calibration_batches

LOGGER = get_logger("ptq.equalize")

#: One quantized layer's ``(type, scale_d, offset_d, scale_w, channel_wise)``.
LayerFactors = tuple[str, float, int, np.ndarray, bool]
#: ``name -> LayerFactors``, the factors ``ptq.plan_quant_groups`` takes.
Factors = dict[str, LayerFactors]


@dataclass
class Equalized:
    """What equalization made.

    Attributes:
        weights: the float weights with every pair rescaled.
        factors: the quantized layers' factors, new for the touched layers.
        pairs: the pairs rescaled, in file order of their readers.
        scales: reader name -> the per-channel factors ``k_c`` its producer's outputs were multiplied by.
    """

    weights: Weights
    factors: Factors
    pairs: list[EqualizationPair] = field(default_factory=list)
    scales: dict[str, np.ndarray] = field(default_factory=dict)

    def info(self) -> list[dict[str, object]]:
        """The ``equalizations`` entries of ``<save_path>_quant.json``."""
        return [{"producer": p.producer, "consumer": p.consumer, "blob": p.blob, "blobs": list(p.values),
                 "scales": [float(v) for v in self.scales[p.consumer]]} for p in self.pairs]


def _each_forward(engine: Net, data: Sequence[Mapping[str, np.ndarray]], desc: str,
                  api: str) -> Iterator[int]:
    """Run ``engine`` forward on each calibration batch (a progress bar over them); yields the batch index
    after each forward, while the engine holds that batch's blobs."""
    batches = calibration_batches(data, engine.inputs, engine.device, api)
    for i, batch in enumerate(tqdm(batches, desc=desc, disable=None)):
        for name, value in batch.items():
            engine.set_tensor(name, value)
        engine.reshape()
        engine.run()
        yield i


def _channel_extremes(
    net: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter, blobs: Sequence[str],
    data: Sequence[Mapping[str, np.ndarray]], api: str,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per blob, the per-channel (axis 1) minimum and maximum over every calibration batch."""
    engine = Net(net, TEST, weights=weights)
    lows: dict[str, torch.Tensor] = {}
    highs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in _each_forward(engine, data, "equalization statistics", api):
            for blob in blobs:
                value = engine.tensor(blob)
                per_channel = value.transpose(0, 1).reshape(value.shape[1], -1)
                low, high = per_channel.amin(dim=1), per_channel.amax(dim=1)
                lows[blob] = torch.minimum(lows[blob], low) if blob in lows else low
                highs[blob] = torch.maximum(highs[blob], high) if blob in highs else high
    return {blob: (lows[blob].double().cpu().numpy(), highs[blob].double().cpu().numpy()) for blob in blobs}


def _calibrated(
    net: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter, groups: Sequence[CalibrationGroup],
    with_offset: bool, data: Sequence[Mapping[str, np.ndarray]], model_file: str, api: str,
) -> dict[str, tuple[float, int]]:
    """IFMR's ``(scale_d, offset_d)`` of every layer of ``groups`` over the calibration batches."""
    graph = Graph(net, model_file)
    # no record file: the results stay in the layers
    insert_calibration_layers(graph, groups, len(data), with_offset, "")
    engine = Net(graph.to_net_parameter(), TEST, weights=weights)
    with torch.no_grad():
        for _ in _each_forward(engine, data, "equalization calibration", api):
            pass
    found = {}
    for group in groups:
        layer = engine.engine_layers[engine.layer_index(group.name)]
        assert isinstance(layer, IFMR) and layer.result is not None, group.name
        for name in group.layers:
            found[name] = (float(layer.result.scale_d), int(layer.result.offset_d))
    return found


def equalize(
    net: caffe_pb2.NetParameter,
    weights: Weights,
    factors: Factors,
    groups: Sequence[CalibrationGroup],
    with_offset: bool,
    data: Sequence[Mapping[str, np.ndarray]],
    model_file: str,
    like: caffe_pb2.NetParameter | None = None,
    api: str = "save_model",
) -> Equalized:
    """Equalize the ranges of the quantized layers' inputs (module docstring).

    Args:
        net, weights: the folded float model the saved models are built from (``weights`` is not changed).
        factors: the calibrated factors of the quantized layers.
        groups: the calibration's IFMR groups (their search settings are used again).
        with_offset: asymmetric activations (the config's ``activation_offset``).
        data: the calibration batches ``{input blob: array}``.
        model_file: the model's path, for messages.
        like: the caffemodel whose blob layouts the engine's weights follow.

    Returns:
        An :class:`Equalized`; without any pair, the inputs unchanged.

    Raises:
        ConfigError: a batch lacks an input blob.
        QuantDataError: a rescaled input holds inf/NaN.
    """
    graph = Graph(net, model_file)
    per_tensor = {name for name, (*_, channel_wise) in factors.items() if not channel_wise}
    pairs = equalization_pairs(graph, weights, set(factors), per_tensor)
    if not pairs:
        LOGGER.info("Equalization: no Convolution/Deconvolution/InnerProduct feeds a quantized layer through "
                    "ReLU/PReLU/MAX Pooling only; nothing to equalize.")
        return Equalized(weights, dict(factors))
    blobs = sorted({p.blob for p in pairs})
    extremes = _channel_extremes(net, weights_to_net(weights, net, like=like), blobs, data, api)
    scales = {p.consumer: equalizing_scales(*extremes[p.blob]) for p in pairs}
    equalized = equalize_weights(graph, weights, pairs, scales)
    rescaled = {p.producer for p in pairs if p.producer in factors} | {p.consumer for p in pairs}
    new_factors = _with_weight_scales(factors, equalized, rescaled)
    readers = sorted(p.consumer for p in pairs)
    try:
        calibrated = _calibrated(net, weights_to_net(equalized, net, like=like),
                                 [g for g in groups if set(readers) & set(g.layers)], with_offset, data,
                                 model_file, api)
    except QuantDataError as exc:
        raise QuantDataError(f"{api}: equalization of '{model_file}': calibration_data gives inf or NaN "
                             f"values at the input of one of the layers {readers}; give finite "
                             "calibration batches.") from exc
    for name, (scale_d, offset_d) in calibrated.items():
        layer_type, _, _, scale_w, channel_wise = new_factors[name]
        new_factors[name] = (layer_type, scale_d, offset_d, scale_w, channel_wise)
    for pair in pairs:
        k = scales[pair.consumer]
        LOGGER.info("Equalized '%s' -> '%s' (blob '%s'): %d channel(s) scaled by %.3g to %.3g.",
                    pair.producer, pair.consumer, pair.blob, pair.channels, float(k.min()), float(k.max()))
    return Equalized(equalized, new_factors, pairs, scales)


def _with_weight_scales(factors: Factors, weights: Weights, names: set[str]) -> Factors:
    """``factors`` with ARQ's ``scale_w`` of ``weights`` for the layers ``names``."""
    out = dict(factors)
    for name in sorted(names):
        layer_type, scale_d, offset_d, _, channel_wise = out[name]
        arq = arq_scale(weights[name][0], channel_wise, weight_channel_axis(layer_type))
        out[name] = (layer_type, scale_d, offset_d, arq.numpy().astype(np.float32), channel_wise)
    return out
