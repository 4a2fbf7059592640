"""AMCT's accuracy-based auto calibration (AMCT reference §1.2; docs/design.md, "Accuracy-based auto
calibration"): post-training quantization that keeps the most sensitive layers float until the user's
evaluator says the accuracy goal holds.

1. ``evaluate`` the float model: the original metric.
2. Plain PTQ with the user's config (``init`` -> ``quantize_model`` -> the evaluator's ``calibration`` on the
   calibration model -> ``save_model('Fakequant')``), ``evaluate`` the fake-quant model, ``metric_eval``.
   While the evaluator calibrates, the inputs it feeds are kept (``engine.net.observe_inputs``).
3. If the goal is missed: the sensitivity of each quantized layer ('CosineSimilarity'): the cosine
   similarity of the net outputs of the float model and of the model with ONLY that layer quantized (with the
   factors of step 2), over the kept calibration inputs. Ranked lowest cosine first (ties: model order).
4. 'BinarySearch': the smallest ``k`` such that the ``k`` most sensitive layers kept float
   (``quant_enable: false``) satisfy ``metric_eval``; every probe is a full PTQ (with the evaluator's
   calibration) and evaluation. ``k`` runs from 1 to (quantized layers - 1): keeping every layer float is
   the float model, which is not a quantization. If no probe satisfies the goal, a WARNING says so and the
   probe with the smallest ``loss`` (ties: fewer float layers) is kept.
5. The chosen probe is saved with ``save_model('Both')`` under ``save_dir`` (folder + file-name prefix), in
   the same all-or-nothing step as the record (``record_file``, overwritten), the config used
   (``<prefix>_quant_config.json``), the ranking (``<prefix>_sensitivity.json``) and the search history
   (``<prefix>_fallback_history.json``). All intermediate files live in a temporary folder that is removed.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from amct_caffe.analysis.metrics import AgreementStats
from amct_caffe.common.auto_calibration import (
    SENSITIVITIES,
    STRATEGIES,
    AutoCalibrationEvaluatorBase,
    BinarySearchStrategy,
    CosineSimilaritySensitivity,
)
from amct_caffe.engine.layers.base import TEST
from amct_caffe.engine.net import Net, observe_inputs
from amct_caffe.errors import ConfigError, EvaluatorError
from amct_caffe.log import get_logger
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import atomic_write, output_conflict
from amct_caffe.model.weights import weights_to_net
from amct_caffe.quant.ptq_config import QuantConfig, dumps_json, load_json_config
from amct_caffe.workflows import ptq
from amct_caffe.workflows.inference import InputShapes, atc_request
from amct_caffe.workflows.save import model_paths

LOGGER = get_logger("auto_calibration")

API = "accuracy_based_auto_calibration"
CONFIG_SUFFIX = "_quant_config.json"
SENSITIVITY_SUFFIX = "_sensitivity.json"
HISTORY_SUFFIX = "_fallback_history.json"
#: Version of the sensitivity and fallback-history JSON formats (docs/design.md).
FORMAT_VERSION = 1

Batch = dict[str, torch.Tensor]


# -- the arguments -------------------------------------------------------------------------------------------
def resolve_strategy(strategy: Any) -> BinarySearchStrategy:
    """``strategy`` as an object: a :class:`BinarySearchStrategy` or its name.

    Raises:
        ConfigError: any other value.
    """
    if isinstance(strategy, BinarySearchStrategy):
        return strategy
    if isinstance(strategy, str) and strategy in STRATEGIES:
        return STRATEGIES[strategy]()
    raise ConfigError(f"{API}: unknown strategy {strategy!r}; give one of {sorted(STRATEGIES)} or a "
                      "BinarySearchStrategy() instance.")


def resolve_sensitivity(sensitivity: Any) -> CosineSimilaritySensitivity:
    """``sensitivity`` as an object: a :class:`CosineSimilaritySensitivity` or its name.

    Raises:
        ConfigError: any other value.
    """
    if isinstance(sensitivity, CosineSimilaritySensitivity):
        return sensitivity
    if isinstance(sensitivity, str) and sensitivity in SENSITIVITIES:
        return SENSITIVITIES[sensitivity]()
    raise ConfigError(f"{API}: unknown sensitivity {sensitivity!r}; give one of {sorted(SENSITIVITIES)} or a "
                      "CosineSimilaritySensitivity() instance.")


def check_evaluator(evaluator: Any) -> AutoCalibrationEvaluatorBase:
    """Raises :class:`EvaluatorError` unless ``evaluator`` is an instance of a subclass of the base class."""
    if not isinstance(evaluator, AutoCalibrationEvaluatorBase):
        raise EvaluatorError(
            f"{API}: model_evaluator must be an instance of a subclass of "
            "amct_caffe.common.auto_calibration.AutoCalibrationEvaluatorBase (with calibration, evaluate and "
            f"metric_eval), got {type(evaluator).__name__}."
        )
    return evaluator


def metric_verdict(result: Any) -> tuple[bool, float]:
    """``metric_eval``'s return value as ``(satisfied, loss)``.

    Raises:
        EvaluatorError: not a pair of a bool and a real number.
    """
    ok = isinstance(result, tuple) and len(result) == 2
    if ok:
        satisfied, loss = result
        ok = isinstance(satisfied, (bool, np.bool_))
        ok = ok and isinstance(loss, numbers.Real) and not isinstance(loss, bool)
    if not ok:
        raise EvaluatorError(f"{API}: the evaluator's metric_eval must return (satisfied: bool, loss: "
                             f"number), got {result!r}.")
    return bool(satisfied), float(loss)


# -- the calibration inputs ----------------------------------------------------------------------------------
class InputCapture:
    """Keeps (copies of) the inputs of every whole forward of the net built from ``model_file``."""

    def __init__(self, model_file: str) -> None:
        self.model_file = os.path.abspath(model_file)
        self.batches: list[Batch] = []

    def __call__(self, net: Net, inputs: Mapping[str, torch.Tensor]) -> None:
        if net.path and os.path.abspath(net.path) == self.model_file:
            self.batches.append({name: value.detach().to("cpu", copy=True) for name, value in inputs.items()})


def calibrate_seeing_inputs(evaluator: AutoCalibrationEvaluatorBase, model_file: str,
                            weights_file: str) -> list[Batch]:
    """The evaluator's calibration of ``model_file``, returning the inputs it fed to that model."""
    capture = InputCapture(model_file)
    with observe_inputs(capture):
        evaluator.calibration(model_file, weights_file)
    return capture.batches


# -- one probe: PTQ with some layers float, then the evaluation ----------------------------------------------
@dataclass(frozen=True)
class Probe:
    """One PTQ run of the search: the layers kept float, the fake-quant model's metric and the verdict."""

    fallback: tuple[str, ...]
    metric: Any
    satisfied: bool
    loss: float


@dataclass
class ProbeRun:
    """A probe and what it built: the graph (to save from), the config text it used, and the calibration
    inputs the evaluator fed (kept only when asked for)."""

    probe: Probe
    graph: ptq.CalibrationGraph
    config_text: str
    inputs: list[Batch]


class Prober:
    """Runs probes in a work folder for one model, config and evaluator.

    Args:
        model_file, weights_file: the float model.
        config: the user's PTQ config.
        evaluator: the user's evaluator.
        original_metric: the float model's metric.
        work: the (temporary) folder for every probe's files.
    """

    def __init__(self, model_file: str, weights_file: str, config: QuantConfig,
                 evaluator: AutoCalibrationEvaluatorBase, original_metric: Any, work: str) -> None:
        self.model_file = model_file
        self.weights_file = weights_file
        self.config = config
        self.evaluator = evaluator
        self.original_metric = original_metric
        self.work = work
        self.history: list[Probe] = []

    def run(self, fallback: Sequence[str], keep_inputs: bool = False) -> ProbeRun:
        """PTQ with ``fallback`` kept float, the evaluator's calibration (its inputs kept if
        ``keep_inputs``), the fake-quant model evaluated."""
        folder = os.path.join(self.work, f"probe_{len(self.history)}")
        os.makedirs(folder)
        config = replace(self.config, layers={
            name: replace(layer, quant_enable=False) if name in fallback else layer
            for name, layer in self.config.layers.items()})
        config_text = dumps_json(config)
        config_file = os.path.join(folder, "quant_config.json")
        record_file = os.path.join(folder, "record.txt")
        atomic_write(config_file, config_text.encode("utf-8"))
        graph = ptq.init(config_file, self.model_file, self.weights_file, record_file)
        calibration_files = (os.path.join(folder, "calibration_model.prototxt"),
                             os.path.join(folder, "calibration_weights.caffemodel"))
        ptq.quantize_model(graph, *calibration_files)
        inputs: list[Batch] = []
        if keep_inputs:
            inputs = calibrate_seeing_inputs(self.evaluator, *calibration_files)
        else:
            self.evaluator.calibration(*calibration_files)
        prefix = os.path.join(folder, "model")
        ptq.save_model(graph, "Fakequant", prefix)
        fake_model, fake_weights, _, _ = model_paths(prefix, "Fakequant", API)
        assert fake_model is not None and fake_weights is not None
        metric = self.evaluator.evaluate(fake_model, fake_weights)
        satisfied, loss = metric_verdict(self.evaluator.metric_eval(self.original_metric, metric))
        probe = Probe(tuple(fallback), metric, satisfied, loss)
        self.history.append(probe)
        LOGGER.info("Probe %d: %d layer(s) kept float %s: metric %r, loss %g, %s.", len(self.history) - 1,
                    len(fallback), list(fallback), metric, loss,
                    "satisfied" if satisfied else "not satisfied")
        return ProbeRun(probe, graph, config_text, inputs)


# -- sensitivity ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSensitivity:
    """A quantized layer's cosine similarity of the net outputs with only it quantized (1.0: no effect)."""

    name: str
    layer_type: str
    cosine: float


def _forward(net: Net, batch: Batch, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
    for name, value in batch.items():
        net.set_tensor(name, value.to(net.device))
    net.run()
    return {name: net.tensor(name).detach().clone() for name in outputs}


def cosine_sensitivity(graph: ptq.CalibrationGraph, batches: Sequence[Batch]) -> list[LayerSensitivity]:
    """Each quantized layer of the calibrated ``graph``, most sensitive first (module docstring, step 3).

    Raises:
        EvaluatorError: no calibration inputs were seen, or they do not fit the model's inputs.
    """
    calibration = graph.calibration
    assert calibration is not None
    if not batches:
        raise EvaluatorError(
            f"{API}: the evaluator's calibration ran no forward of the calibration model in amct_caffe's "
            "engine, so the CosineSimilarity sensitivity has no data. Run it with "
            "amct_caffe.caffe.Net(model_file, weights_file, caffe.TEST) and net.forward(...) feeding the "
            "model's Input blobs."
        )
    float_weights = weights_to_net(calibration.weights, calibration.net, like=graph.like)
    float_net = Net(calibration.net, TEST, weights=float_weights)
    unknown = sorted({name for batch in batches for name in batch} - set(float_net.inputs))
    if unknown:
        raise EvaluatorError(f"{API}: the calibration fed {unknown}, which are not inputs of the model "
                             f"'{graph.model_file}' (its inputs: {float_net.inputs}).")
    outputs, references = reference_outputs(float_net, batches)
    del float_net
    factors = ptq.calibrated_factors(graph, calibration)

    def alone(name: str) -> Net:
        groups = ptq.plan_quant_groups(Graph(calibration.net, graph.model_file), {name: factors[name]},
                                       graph.config.activation_offset)
        models = ptq.build_saved_models(calibration.net, calibration.weights, groups, "Fakequant", API,
                                        graph.like)
        return Net(models.net, TEST, weights=models.fake)

    return rank_by_output_cosine([(name, factors[name][0]) for name in factors], alone, batches, outputs,
                                 references)


def reference_outputs(net: Net, batches: Sequence[Batch]) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """The net's output blob names and their values on each batch: the reference of the sensitivity."""
    outputs = list(net.outputs)
    return outputs, [_forward(net, batch, outputs) for batch in batches]


def rank_by_output_cosine(
    layers: Sequence[tuple[str, str]], alone: Callable[[str], Net], batches: Sequence[Batch],
    outputs: Sequence[str], references: Sequence[Mapping[str, torch.Tensor]],
) -> list[LayerSensitivity]:
    """The 'CosineSimilarity' sensitivity: for each ``(layer, type)``, the cosine similarity of the net
    outputs of ``alone(layer)`` (the net with only that layer quantized) to ``references``
    (:func:`reference_outputs` of the float net) over ``batches``; most sensitive (lowest) first, ties in
    the order given."""
    order = [name for name, _ in layers]
    result = []
    for name, layer_type in tqdm(layers, desc="Sensitivity", unit="layer", disable=None):
        net = alone(name)
        stats = AgreementStats()
        for batch, reference in zip(batches, references):
            values = _forward(net, batch, outputs)
            for blob in outputs:
                stats.add(reference[blob], values[blob])
        cosine = stats.metrics().cosine
        result.append(LayerSensitivity(name, layer_type, cosine))
        LOGGER.debug("Layer '%s' alone quantized: output cosine similarity %.6f.", name, cosine)
    return sorted(result, key=lambda s: (s.cosine, order.index(s.name)))


# -- the search ----------------------------------------------------------------------------------------------
def binary_search(low: int, high: int, satisfied: Callable[[int], bool]) -> int | None:
    """The smallest ``k`` in ``[low, high]`` with ``satisfied(k)``, assuming it stays true above that ``k``;
    None when no probed ``k`` is satisfied. Calls ``satisfied`` about ``log2(high - low + 1) + 1`` times."""
    found = None
    while low <= high:
        middle = (low + high) // 2
        if satisfied(middle):
            found, high = middle, middle - 1
        else:
            low = middle + 1
    return found


# -- the files -----------------------------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    """A metric as JSON: numbers as floats (non-finite ones as strings), JSON values as they are, else its
    repr."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def sensitivity_json(ranking: Sequence[LayerSensitivity] | None, measure: str) -> dict[str, Any]:
    """The ``<prefix>_sensitivity.json`` object; ``ranking`` None when plain PTQ met the goal."""
    return {
        "version": FORMAT_VERSION,
        "sensitivity": measure,
        "computed": ranking is not None,
        "layers": [{"rank": i + 1, "layer": s.name, "type": s.layer_type, "cosine_similarity": s.cosine}
                   for i, s in enumerate(ranking or ())],
    }


def history_json(
    strategy: str, original_metric: Any, history: Sequence[Probe], chosen: Probe
) -> dict[str, Any]:
    """The ``<prefix>_fallback_history.json`` object: every probe in order, then the one saved."""
    return {
        "version": FORMAT_VERSION,
        "strategy": strategy,
        "original_metric": _json_value(original_metric),
        "probes": [{"probe": i, "fallback_count": len(p.fallback), "fallback_layers": list(p.fallback),
                    "metric": _json_value(p.metric), "loss": _json_value(p.loss), "satisfied": p.satisfied}
                   for i, p in enumerate(history)],
        "result": {"probe": next(i for i, p in enumerate(history) if p is chosen),
                   "fallback_layers": list(chosen.fallback), "satisfied": chosen.satisfied},
    }


def json_bytes(obj: Mapping[str, Any]) -> bytes:
    """``obj`` as the indented JSON text of the auto calibration's files, UTF-8."""
    return (json.dumps(obj, indent=4) + "\n").encode("utf-8")


@dataclass(frozen=True)
class AutoCalibrationResult:
    """What the flow did: the float metric, the ranking (None when plain PTQ met the goal), every probe, the
    probe saved, and the files written."""

    original_metric: Any
    ranking: list[LayerSensitivity] | None
    history: list[Probe]
    chosen: Probe
    files: list[str]


def _check_outputs(outputs: Mapping[str, str], inputs: Mapping[str, str]) -> None:
    """Outputs must be distinct files, none of them an input, none in a path blocked by a file."""
    conflict = output_conflict(outputs.items(), inputs.items())
    if conflict is not None:
        name, path = conflict.name, conflict.path
        if conflict.kind == "folder":
            raise ConfigError(f"{API}: the {name} '{path}' is a folder; give a file path.")
        if conflict.kind == "input":
            raise ConfigError(f"{API}: the {name} '{path}' is the {conflict.other}; write outputs to new "
                              "files.")
        raise ConfigError(f"{API}: the {name} and the {conflict.other} are the same file '{path}'.")
    for name, path in outputs.items():
        target = os.path.abspath(path)
        parent = os.path.dirname(target)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ConfigError(f"{API}: the {name} '{path}' cannot be written: '{parent}' is a file, not a "
                              "folder; give save_dir as a folder plus a file-name prefix, e.g. "
                              "'./result/model'.")


# -- the flow ------------------------------------------------------------------------------------------------
def accuracy_based_auto_calibration(
    model_file: str | os.PathLike[str],
    weights_file: str | os.PathLike[str],
    model_evaluator: Any,
    config_file: str | os.PathLike[str],
    record_file: str | os.PathLike[str],
    save_dir: str | os.PathLike[str],
    strategy: Any = "BinarySearch",
    sensitivity: Any = "CosineSimilarity",
    *,
    for_atc: bool = False,
    input_shape: InputShapes | None = None,
) -> AutoCalibrationResult:
    """PTQ with the most sensitive layers kept float until the goal holds (see
    ``amct_caffe.amct.accuracy_based_auto_calibration`` and the module docstring); ``for_atc`` and
    ``input_shape`` as in ``ptq.save_model``.

    Raises:
        EvaluatorError: the evaluator is not a subclass instance, misses a method, or ``metric_eval`` returns
            something else than ``(bool, number)``.
        ConfigError: an unknown strategy or sensitivity, a bad ``save_dir``, outputs that collide with inputs
            or each other; anything the PTQ flow refuses.
        ModelFormatError, RecordError: see the PTQ flow.
    """
    evaluator = check_evaluator(model_evaluator)
    atc_request(for_atc, input_shape, API)  # argument check before the evaluations
    search = resolve_strategy(strategy)
    measure = resolve_sensitivity(sensitivity)
    model_file, weights_file, config_file, record_file, prefix = (
        os.fspath(p) for p in (model_file, weights_file, config_file, record_file, save_dir))
    paths = model_paths(prefix, "Both", API)
    outputs = dict(zip(("fake-quant model", "fake-quant weights", "deploy model", "deploy weights"),
                       [p for p in paths if p]))
    outputs.update({"quant info file": prefix + ptq.QUANT_INFO_SUFFIX, "record_file": record_file,
                    "final config": prefix + CONFIG_SUFFIX, "sensitivity file": prefix + SENSITIVITY_SUFFIX,
                    "fallback history": prefix + HISTORY_SUFFIX})
    _check_outputs(outputs, {"model_file": model_file, "weights_file": weights_file,
                             "config_file": config_file})
    _, graph = ptq.inference_view(model_file)
    config = load_json_config(config_file, ptq.ptq_model_layers(graph), model_file)
    candidates = config.enabled
    if not candidates:
        raise ConfigError(f"{API}: the PTQ config '{config_file}' enables no layer; nothing to quantize.")

    with tempfile.TemporaryDirectory(prefix="amct_auto_calibration_") as work:
        LOGGER.info("Evaluating the float model '%s'.", model_file)
        original = evaluator.evaluate(model_file, weights_file)
        prober = Prober(model_file, weights_file, config, evaluator, original, work)
        plain = prober.run((), keep_inputs=True)
        ranking: list[LayerSensitivity] | None = None
        chosen = plain
        if not plain.probe.satisfied:
            LOGGER.info("Plain PTQ misses the goal (loss %g); ranking %d layer(s) by %s.", plain.probe.loss,
                        len(candidates), measure.name)
            ranking = cosine_sensitivity(plain.graph, plain.inputs)
            plain.inputs.clear()
            chosen = _search([s.name for s in ranking], prober, plain, search)
        probe = chosen.probe
        extra = {
            record_file: Path(chosen.graph.record_file).read_bytes(),
            prefix + CONFIG_SUFFIX: chosen.config_text.encode("utf-8"),
            prefix + SENSITIVITY_SUFFIX: json_bytes(sensitivity_json(ranking, measure.name)),
            prefix + HISTORY_SUFFIX: json_bytes(history_json(search.name, original, prober.history, probe)),
        }
        ptq.save_model(chosen.graph, "Both", prefix, extra_files=extra, for_atc=for_atc,
                       input_shape=input_shape)
    files = list(outputs.values())
    LOGGER.info("Accuracy-based auto calibration done: %d of %d layer(s) kept float %s, %s; files %s.",
                len(probe.fallback), len(candidates), list(probe.fallback),
                "goal met" if probe.satisfied else "goal NOT met", ", ".join(f"'{f}'" for f in files))
    return AutoCalibrationResult(original, ranking, list(prober.history), probe, files)


def _search(
    ranked: Sequence[str], prober: Prober, plain: ProbeRun, strategy: BinarySearchStrategy
) -> ProbeRun:
    """The probe to save: the fewest leading ``ranked`` layers kept float that satisfy the goal, else the
    probe with the smallest loss (a WARNING). Keeps only the graphs it may still return."""
    best_failed = plain
    satisfied_runs: dict[int, ProbeRun] = {}
    steps = max(1, (len(ranked) - 1).bit_length())
    bar = tqdm(total=steps, desc=strategy.name, unit="probe", disable=None)

    def probe(k: int) -> bool:
        nonlocal best_failed
        run = prober.run(ranked[:k])
        bar.update(1)
        if run.probe.satisfied:
            satisfied_runs.clear()
            satisfied_runs[k] = run
        elif (run.probe.loss, len(run.probe.fallback)) < (best_failed.probe.loss,
                                                          len(best_failed.probe.fallback)):
            best_failed = run
        return run.probe.satisfied

    try:
        found = binary_search(1, len(ranked) - 1, probe)
    finally:
        bar.close()
    if found is not None:
        return satisfied_runs[found]
    LOGGER.warning(
        "%s: no fallback set meets the accuracy goal (keeping up to %d of %d layer(s) float); saving the "
        "probe with the smallest loss (%g), with %d layer(s) float %s. Check the evaluator's goal.",
        API, max(0, len(ranked) - 1), len(ranked), best_failed.probe.loss, len(best_failed.probe.fallback),
        list(best_failed.probe.fallback))
    return best_failed
