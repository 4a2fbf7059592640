"""What ``amct-caffe compare`` does after QAT beyond the per-layer report (:mod:`amct_caffe.analysis.report`).

* The float reference of a retrained net: the retrain model with its retrain layers removed and its float
  shadow weights (:func:`amct_caffe.workflows.save.retrained_float_model`). Compared with the saved
  quantized models, it measures what quantization costs; the original float weights would also count what
  training changed.
* The per-layer sensitivity: each retrained layer quantized alone (its trained factors, every other layer at
  its float shadow weight), ranked by the cosine similarity of the net outputs to the retrained float net,
  lowest first -- the 'CosineSimilarity' measure of PTQ's accuracy-based auto calibration
  (:func:`amct_caffe.workflows.auto_calibration.rank_by_output_cosine`), written in the same JSON form.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from amct_caffe.analysis.collect import InputBatch, input_plan
from amct_caffe.engine.layers.base import TEST
from amct_caffe.engine.net import Net
from amct_caffe.log import get_logger
from amct_caffe.model.io import AtomicFiles
from amct_caffe.workflows.auto_calibration import (
    LayerSensitivity,
    json_bytes,
    rank_by_output_cosine,
    reference_outputs,
    sensitivity_json,
)
from amct_caffe.workflows.save import RetrainedFloat, fake_quant_of_layers, retrained_float_model

LOGGER = get_logger("compare")

#: The sensitivity file ``compare --sensitivity`` writes into its output folder.
SENSITIVITY_FILE = "sensitivity.json"

__all__ = ["SENSITIVITY_FILE", "RetrainedFloat", "layer_sensitivity", "retrained_float_model",
           "write_sensitivity"]


def layer_sensitivity(
    retrained_model: str | os.PathLike[str], retrained_weights: str | os.PathLike[str],
    inputs: InputBatch | Sequence[InputBatch] | None = None, batches: int = 1, seed: int = 0,
) -> list[LayerSensitivity]:
    """The sensitivity of each retrained layer (module docstring), most sensitive first.

    Args:
        retrained_model, retrained_weights: the retrain prototxt and a trained caffemodel of it.
        inputs: as :func:`amct_caffe.analysis.report.compare_report`'s: ``{input blob: array}`` split into
            ``batches`` forward passes, a list of such dicts, or None (random inputs of the input shapes,
            seeded by ``seed``, or the nets' own data layers).

    Raises:
        ModelFormatError, RecordError: not a trained retrain model (see ``retrained_float_model``).
        ConfigError: bad ``inputs``.
    """
    reference = retrained_float_model(retrained_model, retrained_weights)
    float_net = Net(reference.net, TEST, weights=reference.weights)
    plan = input_plan(inputs, float_net, batches, seed)
    feeds = [{name: torch.as_tensor(value) for name, value in batch.items()} for batch in plan.batches] \
        if plan.batches is not None else [{} for _ in range(plan.count)]
    outputs, references = reference_outputs(float_net, feeds)
    types = {layer.name: layer.type for layer in reference.net.layer}
    del float_net

    def alone(name: str) -> Net:
        net, weights = fake_quant_of_layers(retrained_model, retrained_weights, [name])
        return Net(net, TEST, weights=weights)

    return rank_by_output_cosine([(name, types.get(name, "")) for name in reference.layers], alone, feeds,
                                 outputs, references)


def write_sensitivity(ranking: Sequence[LayerSensitivity], out_dir: str | os.PathLike[str]) -> str:
    """Write ``<out_dir>/sensitivity.json`` (the auto calibration's sensitivity format); returns its path."""
    path = os.path.join(os.fspath(out_dir), SENSITIVITY_FILE)
    with AtomicFiles() as files:
        files.write(path, json_bytes(sensitivity_json(list(ranking), "CosineSimilarity")))
    return path
