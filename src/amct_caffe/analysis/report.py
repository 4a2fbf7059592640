"""Per-layer accuracy report: float vs fake-quant vs deploy model on the same inputs.

:func:`compare_report` runs the float model, the fake-quant model and (optionally) the deploy model of
``save_quant_retrain_model`` in the engine on the same inputs and measures, for every quantized layer and
for every output blob of the float net:

* cosine similarity, SNR in dB and the largest absolute error (:mod:`amct_caffe.analysis.metrics`), for
  the pairs float vs fake-quant, float vs deploy and fake-quant vs deploy (the last also in output
  quantization steps, ``max_lsb``, see :func:`amct_caffe.analysis.collect.output_steps`);
* the saturation rate of each layer's activation quantizer: the fraction of the ``Quant`` layer's input
  values clipped to code -128 or 127. The deploy model's rate uses the same (fake-quant) formula on the
  deploy model's ``Quant`` inputs.

A quantized layer's numbers are those of L's original top (:mod:`amct_caffe.analysis.collect` says which
blob that is through in-place chains and folded BatchNorms). Errors accumulate along the net: a layer's
numbers include everything upstream of it.

The flow is collect (:mod:`~amct_caffe.analysis.collect`: run the nets, accumulate) -> metrics (this
module: the accumulated sums become a :class:`~amct_caffe.analysis.results.ReportResult`) -> render
(:mod:`~amct_caffe.analysis.render`: table, JSON, HTML, plots) -> write (:func:`write_report`).

Inputs
------
``inputs`` given: ``{input blob: array}`` (the arrays' axis 0 is split into ``batches`` forward passes),
or a sequence of such dicts (one forward each). ``inputs=None`` and the float net has ``Input`` blobs:
``batches`` batches of standard-normal random values of the nets' input shapes (seeded by ``seed``).
Random inputs measure the NUMERICS of quantization (how the quantized models deviate from the float model
on generic data), not ACCURACY: the clip ranges were learned on real data, so random data may saturate
more (or less) than real data would, and a layer that looks bad on noise may be fine on images. Use real
inputs for decisions. ``inputs=None`` and no ``Input`` blobs: every net runs its own data layers (the saved
models keep the TEST-phase data layers); the report checks that the three nets read identical batches.

Candidates to skip
------------------
A layer whose cosine similarity (float vs fake-quant or float vs deploy, the lower) is below ``threshold``
is named as a candidate to skip: set ``"retrain_enable": false`` for it in the QAT config and retrain.
Because errors accumulate, the first candidate in net order is the one to try first.

Output files (:func:`write_report`)
-----------------------------------
``report.json`` (all numbers), ``report.html`` and the PNG plots it shows (``cosine.png``, ``snr.png``,
``saturation.png``, ``worst_<k>.png``), all written together through
:class:`amct_caffe.model.io.AtomicFiles`. The plots need matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from amct_caffe.analysis import render
from amct_caffe.analysis.collect import (
    DEFAULT_QUANT_FORMULA,
    Collected,
    InputBatch,
    ModelArg,
    collect_report,
    load_report_nets,
)
from amct_caffe.analysis.metrics import Metrics
from amct_caffe.analysis.results import (
    RANDOM_NOTE,
    SKIP_HINT,
    LayerReport,
    OutputReport,
    QuantizedLayer,
    ReportResult,
)
from amct_caffe.errors import AmctError, ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.io import AtomicFiles

LOGGER = get_logger("analysis.report")


def compare_report(
    float_model: ModelArg,
    float_weights: ModelArg,
    fake_model: ModelArg,
    fake_weights: ModelArg,
    deploy_model: ModelArg | None = None,
    deploy_weights: ModelArg | None = None,
    inputs: InputBatch | Sequence[InputBatch] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    threshold: float = 0.99,
    batches: int = 1,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    quant_formula: str = DEFAULT_QUANT_FORMULA,
    progress: bool | None = None,
    equalizations: Mapping[str, Sequence[float] | np.ndarray] | None = None,
) -> ReportResult:
    """Compare the float, fake-quant and deploy models layer by layer (see the module docstring).

    Args:
        float_model, float_weights: the original float prototxt and caffemodel (paths or NetParameters;
            the TEST phase is used).
        fake_model, fake_weights: ``<prefix>_fake_quant_model.prototxt`` / ``_weights.caffemodel``.
        deploy_model, deploy_weights: ``<prefix>_deploy_model.prototxt`` / ``_weights.caffemodel``, or both
            None (then only float vs fake-quant is measured).
        inputs: ``{input blob: array}`` whose axis 0 is split into ``batches`` forward passes, a list of such
            dicts (one forward each), or None: random standard-normal inputs of the nets' input shapes
            (``batches`` of them, seeded by ``seed``) -- they measure numerics, not accuracy -- or, for nets
            without ``Input`` blobs, the nets' own data layers.
        out_dir: folder for ``report.json``, ``report.html`` and the PNG plots (created; see
            :func:`write_report`); None writes nothing.
        threshold: layers whose cosine similarity to the float model is below it are skip candidates.
        batches: forward passes (for random inputs or data layers; for a dict of inputs, the split).
        seed: seed of the random inputs and of the positions sampled for the plots.
        device: torch device of the nets (default: the global mode).
        quant_formula: the deploy model's Quant formula, ``"caffe"`` (default) or ``"ascend"``
            (:mod:`amct_caffe.emulation.integer`).
        progress: show a tqdm bar over the batches (None: only on a terminal).
        equalizations: for models saved with ``refine=["equalization", ...]``: blob -> the per-channel
            factors the quantized models' values carry against the float model's
            (``analysis.collect.read_equalizations(<prefix>_quant.json)``); the float values are multiplied
            by them before any comparison. None: the blobs are compared as they are.

    Returns:
        The :class:`ReportResult`; :func:`amct_caffe.analysis.render.format_table` prints it.

    Raises:
        ConfigError: bad arguments (threshold, batches, only one of the deploy files, inputs); matplotlib is
            missing while ``out_dir`` is given (checked before running anything).
        ModelFormatError: a model cannot be loaded; ``deploy_weights`` is not a deploy caffemodel.
        RuntimeEngineError: an input blob has no value; the data layers of the nets read different batches.
    """
    _check_arguments(threshold, batches, deploy_model, deploy_weights)
    if out_dir is not None:
        render.plot_figure_factory()  # fail on a missing matplotlib before the (possibly long) runs
    nets = load_report_nets(float_model, float_weights, fake_model, fake_weights, deploy_model,
                            deploy_weights, device=device, quant_formula=quant_formula,
                            float_scales=equalizations)
    collected = collect_report(nets, inputs, batches, seed, progress=progress)
    result = _result(collected, float(threshold), seed, quant_formula, nets.models)
    _log_findings(result)
    if out_dir is not None:
        write_report(result, out_dir)
    return result


def _check_arguments(threshold: float, batches: int, deploy_model: ModelArg | None,
                     deploy_weights: ModelArg | None) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"compare_report: threshold must be a finite number (a cosine), got {threshold!r}.")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"compare_report: batches must be an integer >= 1, got {batches!r}.")
    if (deploy_model is None) != (deploy_weights is None):
        raise ConfigError("compare_report: give both deploy_model and deploy_weights, or neither.")


def _metrics_of(collected: Collected, blob: str) -> dict[str, Metrics | None]:
    return {key: None if stats is None else stats.metrics()
            for key, stats in collected.agreement[blob].items()}


def _layer_report(collected: Collected, q: QuantizedLayer) -> LayerReport:
    saturation = {which: counts[q.quant_layer].result() for which, counts in collected.saturation.items()
                  if q.quant_layer in counts}
    return LayerReport(q.layer, q.layer_type, q.blob, q.quant_layer, q.scale_d, q.offset_d,
                       collected.shapes.get(q.blob, ()), q.blob in collected.outputs,
                       _metrics_of(collected, q.blob), saturation, collected.samples.get(q.blob, {}))


def _result(collected: Collected, threshold: float, seed: int, quant_formula: str,
            models: dict[str, str]) -> ReportResult:
    """The collected sums as the report: metrics per layer and output, skip candidates."""
    layers = [_layer_report(collected, q) for q in collected.quantized]
    outputs = [OutputReport(o, collected.shapes.get(o, ()), _metrics_of(collected, o))
               for o in collected.outputs]
    candidates = [r.layer for r in layers if (worst := r.worst_cosine()) is not None and worst < threshold]
    accuracy = {blob: {which: total / max(collected.count, 1) for which, total in sums.items()}
                for blob, sums in collected.accuracy.items()}
    return ReportResult(layers, outputs, threshold, candidates, collected.pairs, collected.mode,
                        collected.count, seed, quant_formula, models, accuracy)


def _log_findings(result: ReportResult) -> None:
    if not result.measured:
        LOGGER.warning("compare_report: nothing was measured: the models share no quantized layer and no "
                       "output blob (are they the float model and its own quantized model?).")
    if result.skip_candidates:
        LOGGER.warning("compare_report: %d layer(s) with cosine similarity below %g: %s; %s.",
                       len(result.skip_candidates), result.threshold, ", ".join(result.skip_candidates),
                       SKIP_HINT)
    if result.inputs == "random":
        LOGGER.info("compare_report: %s.", RANDOM_NOTE)


def write_report(result: ReportResult, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``report.json``, ``report.html`` and the PNG plots into ``out_dir`` (created), all-or-nothing.

    Returns:
        ``{file name: path}`` of the files written.

    Raises:
        ConfigError: matplotlib is not installed (nothing is written).
        AmctError: a file cannot be written (nothing is written, existing files are untouched).
    """
    folder = os.fspath(out_dir)
    files = render.report_files(result)
    written = {name: os.path.join(folder, name) for name in files}
    try:
        with AtomicFiles() as atomic:
            for name, payload in files.items():
                atomic.write(written[name], payload)
    except OSError as exc:
        raise AmctError(f"Cannot write the compare report into '{folder}': {exc}.") from exc
    LOGGER.info("Compare report written: %s", os.path.join(folder, "report.html"))
    return written
