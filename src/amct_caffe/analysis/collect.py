"""Run the float, fake-quant and deploy models on the same batches and collect what the analysis measures.

Loading
-------
The float and the fake-quant model are ordinary engine nets in the TEST phase. The deploy model runs the
integer emulation; :func:`_load_deploy` is the one place that calls into :mod:`amct_caffe.emulation`: it
loads the net and says how its integer blobs read as real values (a Quant top holds INT8 codes, read as
``(q - o_d) * s_d``; a quantized layer's top ``<L>_dequant_layer_in`` holds the INT32 accumulator, read as
``acc * deq_scale``; every other blob is already real).

Which blobs the report compares
-------------------------------
A quantized layer ``L`` of the saved models writes ``<L>_dequant_layer_in`` and its ``DeQuant`` writes L's
ORIGINAL top, so the float model's blob of that name is the reference. Blobs are read by name at the END
of the forward, as pycaffe's ``net.blobs[name]`` shows them: when the float model runs an in-place chain
(Convolution -> BatchNorm -> Scale -> ReLU, all ``top == bottom``) its blob holds the post-chain value, and
so does the quantized models' blob of the same name (the BatchNorm/Scale are folded into the quantized
convolution, the ReLU still runs in place after the DeQuant). A BatchNorm that is not in place gives the
folded convolution the name of the chain's last top (``passes.fuse_bn``), again the float blob of the same
name. The output blobs of the float net are compared too.

The saturation is measured on the value the ``Quant`` layer reads at the time it runs: the quantized nets
run in segments that end before each ``Quant``. A ``Quant`` shared by several layers counts once and is
reported on each of them.

Output steps
------------
Each quantized layer of the deploy model has an output quantization step: the ``s_d`` of the next
``Quant`` that reads its DeQuant's top (through in-place layers and ReLUs, which keep the grid), else its
``deq_scale`` (per channel); it applies to the DeQuant's top and to the accumulator before it. A Quant top's
step is its own ``s_d``.

Accuracy
--------
The tops of the float net's ``Accuracy`` layers are averaged over the batches in every model, so the report
shows each model's accuracy where the net measures one (TEST-phase data layers, or given labels).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import torch
from tqdm.auto import tqdm

from amct_caffe.analysis.metrics import AgreementStats, SaturationStats
from amct_caffe.analysis.results import MODEL_LABELS, PAIR_LABELS, PAIRS, QuantizedLayer
from amct_caffe.emulation.integer import DEFAULT_QUANT_FORMULA, BlobScale, integer_blob_scales
from amct_caffe.emulation.loader import load_net
from amct_caffe.engine.layers.base import TEST
from amct_caffe.engine.net import Net
from amct_caffe.errors import ConfigError, ModelFormatError, ModelMismatchError, RuntimeEngineError
from amct_caffe.log import get_logger
from amct_caffe.model.graph import producer_index, value_readers
from amct_caffe.model.layer_types import DEQUANT, QUANT
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.numerics import offset_byte, quant_step

__all__ = [
    "DEFAULT_QUANT_FORMULA", "BlobPair", "Collected", "DeployNet", "InputBatch", "InputPlan", "ModelArg",
    "QuantizedLayer", "ReportNets", "collect_report", "fake_deploy_pairs", "feed_inputs", "input_plan",
    "load_report_nets", "output_steps", "quant_factors", "quantized_layers",
]

LOGGER = get_logger("analysis.collect")

ModelArg: TypeAlias = str | os.PathLike[str] | caffe_pb2.NetParameter
InputBatch: TypeAlias = Mapping[str, np.ndarray | torch.Tensor]

#: Values kept per blob and model for the plots (spread over the batches).
SAMPLE_SIZE = 4096


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeployNet:
    """The deploy model running the integer emulation, and how its integer blobs read as real values.

    Attributes:
        net: the engine net (TEST phase).
        scales: ``{blob: BlobScale}`` for every Quant top (``kind == "codes"``) and every quantized layer's
            top (``kind == "accumulator"``); other blobs are real values.
    """

    net: Net
    scales: dict[str, BlobScale]


def _load_deploy(model: ModelArg, weights: ModelArg, device: torch.device | str | None,
                 quant_formula: str) -> DeployNet:
    """The deploy model: the analysis's only call into the deploy emulation."""
    net = load_net(model, weights, TEST, quant_formula=quant_formula, require_deploy=True, device=device)
    return DeployNet(net, integer_blob_scales(net.engine_layers))


def _load_float(model: ModelArg, weights: ModelArg, device: torch.device | str | None) -> Net:
    """A float or fake-quant model in the TEST phase."""
    return Net(model, TEST, weights=weights, device=device)


def _describe(model: ModelArg, weights: ModelArg | None) -> str:
    def one(x: ModelArg | None) -> str:
        if x is None:
            return "-"
        if isinstance(x, caffe_pb2.NetParameter):
            return f"<NetParameter {x.name!r}>"
        return os.fspath(x)

    return f"{one(model)} + {one(weights)}"


@dataclass(frozen=True)
class ReportNets:
    """The models the report runs.

    Attributes:
        nets: ``{"float"|"fake"|"deploy": Net}`` ("deploy" only when a deploy model was given).
        models: ``{"float"|"fake"|"deploy": "<prototxt> + <caffemodel>"}``, descriptions of the arguments.
        steps: the output steps of the deploy model's quantized blobs (:func:`output_steps`; empty without
            a deploy model).
        float_scales: blob -> per-channel factors the quantized models' values of that blob carry against
            the float model's (equalization, :func:`read_equalizations`); the float values are multiplied
            by them before they are compared.
    """

    nets: dict[str, Net]
    models: dict[str, str]
    steps: dict[str, np.ndarray]
    float_scales: dict[str, np.ndarray] = field(default_factory=dict)


def read_equalizations(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Blob -> per-channel factors from the ``equalizations`` of a ``<prefix>_quant.json`` that
    ``save_model(..., refine=["equalization", ...])`` wrote (empty when it has none).

    Raises:
        ModelFormatError: the file is not such a JSON object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        scales: dict[str, np.ndarray] = {}
        for entry in info.get("equalizations", []):
            k = np.asarray(entry["scales"], np.float64)
            if k.ndim != 1 or not np.all(np.isfinite(k)) or np.any(k <= 0):
                raise ValueError(f"entry for '{entry.get('consumer')}' has scales that are not positive")
            for blob in entry["blobs"]:
                scales[str(blob)] = k
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFormatError(f"The quant info file '{os.fspath(path)}' cannot be read as save_model's "
                               f"<prefix>_quant.json ({exc}); give the file save_model wrote.") from None
    return scales


def load_report_nets(
    float_model: ModelArg, float_weights: ModelArg, fake_model: ModelArg, fake_weights: ModelArg,
    deploy_model: ModelArg | None, deploy_weights: ModelArg | None, *,
    device: torch.device | str | None, quant_formula: str,
    float_scales: Mapping[str, Sequence[float] | np.ndarray] | None = None,
) -> ReportNets:
    """Load the float, the fake-quant and (when both of its files are given) the deploy model.

    Raises:
        ModelFormatError: a model cannot be loaded; ``deploy_weights`` is not a deploy caffemodel.
    """
    nets = {"float": _load_float(float_model, float_weights, device),
            "fake": _load_float(fake_model, fake_weights, device)}
    models = {"float": _describe(float_model, float_weights), "fake": _describe(fake_model, fake_weights)}
    steps: dict[str, np.ndarray] = {}
    if deploy_model is not None and deploy_weights is not None:
        deploy = _load_deploy(deploy_model, deploy_weights, device, quant_formula)
        nets["deploy"] = deploy.net
        models["deploy"] = _describe(deploy_model, deploy_weights)
        steps = output_steps(deploy)
    scales = {blob: np.asarray(k, np.float64) for blob, k in (float_scales or {}).items()}
    return ReportNets(nets, models, steps, scales)


# ---------------------------------------------------------------------------------------------------------
# the nets' quantized layers
# ---------------------------------------------------------------------------------------------------------
def _params(net: Net) -> list[caffe_pb2.LayerParameter]:
    return [layer.param for layer in net.engine_layers]


def quant_factors(param: caffe_pb2.LayerParameter) -> tuple[float, int]:
    """``(s_d, o_d)`` of a ``Quant`` layer, read from its ``quant_param`` as the layer reads them."""
    return quant_step(param.quant_param.scale), offset_byte(param.quant_param.offset)


def quantized_layers(net: Net) -> list[QuantizedLayer]:
    """Every ``DeQuant`` of ``net`` with the layer and the ``Quant`` before it, in net order."""
    params = _params(net)
    layers = net.engine_layers
    out = []
    for i, layer in enumerate(layers):
        if layer.type_name != DEQUANT:
            continue
        li = producer_index(params, i, net.layer_bottoms[i][0])
        target = layers[li] if li is not None else None
        name = layer.param.dequant_param.object_layer or (target.name if target is not None else layer.name)
        quant, scale_d, offset_d = "", None, None
        if li is not None and net.layer_bottoms[li]:
            qi = producer_index(params, li, net.layer_bottoms[li][0])
            if qi is not None and layers[qi].type_name == QUANT:
                quant = layers[qi].name
                scale_d, offset_d = quant_factors(layers[qi].param)
        out.append(QuantizedLayer(name, target.type_name if target is not None else "", layer.param.top[0],
                                  quant, scale_d, offset_d))
    return out


#: Layer types between a quantized layer and the next Quant that keep its output grid (a step of the
#: output is a step of the value the Quant reads)
GRID_KEEPING_TYPES = frozenset({"ReLU"})


def _readers_through_in_place(params: Sequence[caffe_pb2.LayerParameter], index: int, blob: str) -> list[int]:
    """The layers reading the value ``blob`` holds after layer ``index``, and, after an in-place layer
    or a ReLU among them, the readers of the value it writes, in net order."""
    out: list[int] = []
    pending = [(index, blob)]
    seen: set[tuple[int, str]] = set()
    while pending:
        at, name = pending.pop(0)
        if (at, name) in seen:
            continue
        seen.add((at, name))
        for reader in value_readers(params, at, name):
            out.append(reader)
            if name in params[reader].top:
                pending.append((reader, name))
            elif params[reader].type in GRID_KEEPING_TYPES and len(params[reader].top) == 1:
                pending.append((reader, params[reader].top[0]))
    return sorted(dict.fromkeys(out))


def output_steps(deploy: DeployNet) -> dict[str, np.ndarray]:
    """The output quantization step of every quantized layer's blobs in a deploy net (module docstring).

    Returns:
        ``{blob: steps}`` (one value, or one per channel) for each integer DeQuant's top and bottom.
    """
    params = _params(deploy.net)
    out: dict[str, np.ndarray] = {}
    for i, param in enumerate(params):
        accumulator = deploy.scales.get(param.bottom[0]) if param.type == DEQUANT else None
        if accumulator is None or accumulator.kind != "accumulator":
            continue
        top = param.top[0]
        step = np.asarray(accumulator.scale, dtype=np.float64)
        for j in _readers_through_in_place(params, i, top):
            codes = deploy.scales.get(params[j].top[0]) if params[j].type == QUANT else None
            if codes is not None and codes.kind == "codes":
                step = np.asarray(codes.scale, dtype=np.float64)
                break
        out[top] = step
        out[param.bottom[0]] = step
    return out


def accuracy_tops(net: Net) -> list[str]:
    """The tops of ``net``'s ``Accuracy`` layers, in net order."""
    return [top for layer, tops in zip(net.engine_layers, net.layer_tops) if layer.type_name == "Accuracy"
            for top in tops]


def _quant_indices(net: Net) -> list[int]:
    return [i for i, layer in enumerate(net.engine_layers) if layer.type_name == QUANT]


def _source_blobs(net: Net) -> list[str]:
    """Tops of the layers without bottoms other than ``Input`` (data layers)."""
    return [t for layer, bottoms, tops in zip(net.engine_layers, net.layer_bottoms, net.layer_tops)
            if not bottoms and layer.type_name != "Input" for t in tops]


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
@dataclass
class InputPlan:
    """Where the report's batches come from.

    Attributes:
        mode: ``"random"``, ``"given"`` or ``"data layers"``.
        count: how many forward passes.
        batches: the ``{input blob: array}`` of each pass, or None when the nets read their data layers.
    """

    mode: str
    count: int
    batches: Iterator[InputBatch] | None


def _as_array(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _random_batches(net: Net, batches: int, seed: int) -> Iterator[InputBatch]:
    rng = np.random.default_rng(seed)
    shapes = {name: tuple(int(d) for d in net.tensor(name).shape) for name in net.inputs}
    for _ in range(batches):
        yield {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def input_plan(
    inputs: InputBatch | Sequence[InputBatch] | None, net: Net, batches: int, seed: int
) -> InputPlan:
    """The batches of the report's ``inputs`` argument (:func:`amct_caffe.analysis.report.compare_report`).

    Raises:
        ConfigError: a dict's arrays hold fewer than ``batches`` samples; ``inputs`` is neither a dict, a
            non-empty list of dicts nor None.
    """
    if inputs is None:
        if not net.inputs:
            return InputPlan("data layers", batches, None)
        return InputPlan("random", batches, _random_batches(net, batches, seed))
    if isinstance(inputs, Mapping):
        arrays = {name: _as_array(v) for name, v in inputs.items()}
        sizes = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
        if any(s < batches for s in sizes.values()):
            raise ConfigError(
                f"compare_report: batches={batches} but the inputs hold {sizes} samples on axis 0; each "
                "array's axis 0 is split into `batches` forward passes, so it needs at least that many."
            )
        splits = {name: np.array_split(a, batches) for name, a in arrays.items()}
        return InputPlan("given", batches, iter([{name: s[i] for name, s in splits.items()}
                                                 for i in range(batches)]))
    batch_list = list(inputs)
    if not batch_list or not all(isinstance(b, Mapping) for b in batch_list):
        raise ConfigError(
            "compare_report: `inputs` must be a dict {input blob: array}, a non-empty list of such dicts "
            "(one forward each), or None (random inputs)."
        )
    return InputPlan("given", len(batch_list), iter(batch_list))


def feed_inputs(net: Net, inputs: InputBatch, which: str) -> None:
    """Set every input blob of ``net`` from ``inputs`` (arrays or tensors); ``which`` names the model in
    the error raised when one is missing.

    Raises:
        RuntimeEngineError: an input blob of ``net`` has no entry in ``inputs``.
    """
    missing = [name for name in net.inputs if name not in inputs]
    if missing:
        raise RuntimeEngineError(
            f"No input given for the {which} model's input blob(s) {missing}; pass them in "
            "`inputs` ({name: array})."
        )
    for name in net.inputs:
        value = inputs[name]
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        net.set_tensor(name, tensor.to(torch.float32))


def _feed_from_float(net: Net, float_net: Net, which: str) -> None:
    """Feed the Input blobs of a model saved in inference form (``for_atc``) with what the float model's data
    layers just read under the same blob names."""
    values = {}
    for name in net.inputs:
        value = _value(float_net, name)
        if value is None:
            raise RuntimeEngineError(
                f"compare_report: the {which} model's input blob '{name}' is not a blob of the float model, "
                "whose data layers feed it; pass `inputs` ({name: array})."
            )
        values[name] = value.detach().clone()
    feed_inputs(net, values, which)


def _check_inputs(batch: InputBatch, nets: Mapping[str, Net]) -> None:
    for which, net in nets.items():
        missing = [name for name in net.inputs if name not in batch]
        if missing:
            raise RuntimeEngineError(
                f"compare_report: the {which} model's input blob(s) {missing} have no value in the inputs "
                f"(given: {sorted(batch)}); the three models must have the same Input blobs."
            )


def _value(net: Net, blob: str) -> torch.Tensor | None:
    try:
        return net.tensor(blob)
    except RuntimeEngineError:
        return None


def _scaled(value: torch.Tensor | None, scales: np.ndarray | None) -> torch.Tensor | None:
    """``value`` with channel ``c`` (axis 1) multiplied by ``scales[c]``; as it is without scales.

    Raises:
        ModelMismatchError: the blob has another number of channels than the scales.
    """
    if value is None or scales is None:
        return value
    if value.dim() < 2 or value.shape[1] != scales.size:
        raise ModelMismatchError(
            f"compare_report: a blob of shape {tuple(value.shape)} has {scales.size} equalization factors; "
            "the quant info file does not belong to these models.")
    shape = [1] * value.dim()
    shape[1] = scales.size
    return value * torch.as_tensor(scales, dtype=value.dtype, device=value.device).reshape(shape)


def _check_same_data(nets: Mapping[str, Net]) -> None:
    ref = nets["float"]
    for name in _source_blobs(ref):
        a = ref.tensor(name)
        for which, net in nets.items():
            b = _value(net, name) if which != "float" else None
            if b is None:
                continue
            if tuple(a.shape) != tuple(b.shape) or not torch.equal(a.cpu(), b.cpu()):
                raise RuntimeEngineError(
                    f"compare_report: the data layers of the float and the {which} model read different "
                    f"values for blob '{name}' (shuffled or random data?); pass `inputs` to compare the "
                    "models on the same data."
                )


# ---------------------------------------------------------------------------------------------------------
# the report's collection
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Collected:
    """What the report's forward passes gathered.

    Attributes:
        quantized: the fake-quant net's quantized layers, in net order.
        outputs: the float net's output blobs.
        pairs: the pair keys of :data:`~amct_caffe.analysis.results.PAIRS` whose two models were run.
        mode, count: the inputs' mode and the number of forward passes (:class:`InputPlan`).
        shapes: ``{blob: shape}`` in the float model (last batch).
        agreement: ``{blob: {pair key: AgreementStats, or None when the pair could not be measured (the
            blob is missing from a model or its shapes differ)}}``.
        saturation: ``{"fake"|"deploy": {Quant layer: SaturationStats}}``.
        samples: ``{blob: {"float"|"fake"|"deploy": values}}`` at the same random positions in each model.
        accuracy: ``{Accuracy top of the float net: {model: sum over the batches}}`` (divide by ``count``).
    """

    quantized: list[QuantizedLayer]
    outputs: list[str]
    pairs: list[str]
    mode: str
    count: int
    shapes: dict[str, tuple[int, ...]]
    agreement: dict[str, dict[str, AgreementStats | None]]
    saturation: dict[str, dict[str, SaturationStats]]
    samples: dict[str, dict[str, np.ndarray]]
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)


def _run_observing(net: Net, quants: Sequence[int], stats: Mapping[str, SaturationStats]) -> None:
    """Run ``net`` forward in segments that end before each Quant, counting the Quant's clipped inputs."""
    start = 0
    with torch.no_grad():
        for qi in quants:
            if qi > start:
                net.run(start, qi - 1)
            stats[net.layer_names[qi]].add(net.tensor(net.layer_bottoms[qi][0]))
            start = qi
        if start < len(net.engine_layers):
            net.run(start)


def _sample(values: Mapping[str, Mapping[str, torch.Tensor | None]], blob: str, rng: np.random.Generator,
            size: int) -> dict[str, np.ndarray]:
    """The values at the same ``size`` random positions of ``blob`` in each model (all when fewer)."""
    ref = values["float"][blob]
    assert ref is not None
    n = int(ref.numel())
    idx = np.sort(rng.choice(n, size=min(n, size), replace=False)) if n else np.zeros(0, np.int64)
    out = {}
    for which, vals in values.items():
        v = vals[blob]
        if v is not None and tuple(v.shape) == tuple(ref.shape):
            out[which] = v.detach().to(torch.float64).cpu().numpy().reshape(-1)[idx]
    return out


def _saturation_stats(net: Net, index: int) -> SaturationStats:
    return SaturationStats(*quant_factors(net.engine_layers[index].param))


def _check_models_match(nets: ReportNets, blobs: Sequence[str]) -> None:
    """Refuse models that do not belong together: an input blob the other model lacks (a model saved in
    inference form has Input blobs where the float model has data layers of the same tops), or a compared
    blob missing."""
    reference = nets.nets["float"]
    for which, net in nets.nets.items():
        fed_alike = (set(net.inputs) <= set(reference.blob_names)
                     and set(reference.inputs) <= set(net.blob_names))
        if not fed_alike:
            raise ModelMismatchError(
                f"compare_report: the {MODEL_LABELS[which]} model {nets.models[which]} has the input blobs "
                f"{sorted(net.inputs)} but the float model {nets.models['float']} has "
                f"{sorted(reference.inputs)}; the models do not belong together."
            )
        missing = [blob for blob in blobs if blob not in net.blob_names]
        if missing:
            raise ModelMismatchError(
                f"compare_report: the {MODEL_LABELS[which]} model {nets.models[which]} has no blob(s) "
                f"{missing}, which the comparison needs (the quantized layers' outputs of the fake-quant "
                "model); the models do not belong together -- give the float "
                "model the quantized models were made from (or, after QAT, the retrain model)."
            )


class _ReportCollector:
    """Runs the report's nets batch by batch and adds each batch to the :class:`Collected` accumulators."""

    def __init__(self, nets: ReportNets, plan: InputPlan, seed: int) -> None:
        self.nets = nets.nets
        self.float_scales = nets.float_scales
        fake = self.nets["fake"]
        quantized = quantized_layers(fake)
        if not quantized:
            raise ModelMismatchError(
                f"compare_report: the fake-quant model {nets.models['fake']} has no DeQuant layer, so it is "
                "not a quantized model; give the <prefix>_fake_quant_model.prototxt and its caffemodel that "
                "save_quant_retrain_model (or PTQ's save_model) wrote."
            )
        _check_models_match(nets, [q.blob for q in quantized])
        # the float model's outputs that every model has (a model saved in inference form has no loss or
        # accuracy tops)
        outputs = [blob for blob in self.nets["float"].outputs
                   if all(blob in net.blob_names for net in self.nets.values())]
        self.blobs = list(dict.fromkeys([q.blob for q in quantized] + outputs))
        self.accuracy_blobs = accuracy_tops(self.nets["float"])
        pairs = [key for key, a, b in PAIRS if a in self.nets and b in self.nets]
        self.quants = {which: _quant_indices(net) for which, net in self.nets.items() if which != "float"}
        # only fake-quant vs deploy is measured in output steps: the float model has no quantization grid
        agreement: dict[str, dict[str, AgreementStats | None]] = {
            blob: {key: AgreementStats(nets.steps.get(blob) if key == "fake_vs_deploy" else None)
                   for key in pairs}
            for blob in self.blobs}
        saturation = {which: {self.nets[which].layer_names[i]: _saturation_stats(self.nets[which], i)
                              for i in idx}
                      for which, idx in self.quants.items()}
        self.collected = Collected(quantized, outputs, pairs, plan.mode, plan.count, shapes={},
                                   agreement=agreement, saturation=saturation, samples={})
        self.rng = np.random.default_rng(seed)
        self.sample_size = -(-SAMPLE_SIZE // max(plan.count, 1))
        self.missing_logged: set[str] = set()

    def run(self, batch: InputBatch | None) -> None:
        """One forward pass of every net (on ``batch``, or on their data layers), then accumulate."""
        if batch is not None:
            _check_inputs(batch, self.nets)
            for which, net in self.nets.items():
                feed_inputs(net, batch, which)
        for which, net in self.nets.items():
            if which == "float":
                with torch.no_grad():
                    net.run()
            else:
                if batch is None and net.inputs:
                    _feed_from_float(net, self.nets["float"], which)
                _run_observing(net, self.quants[which], self.collected.saturation[which])
        if batch is None:
            _check_same_data(self.nets)
        values = {which: {blob: _value(net, blob) for blob in self.blobs} for which, net in self.nets.items()}
        values["float"] = {blob: _scaled(value, self.float_scales.get(blob))
                           for blob, value in values["float"].items()}
        for blob in self.blobs:
            self._add(values, blob)
        for blob in self.accuracy_blobs:
            sums = self.collected.accuracy.setdefault(blob, {})
            for which, net in self.nets.items():
                value = _value(net, blob)
                if value is not None and value.numel() == 1:
                    sums[which] = sums.get(which, 0.0) + float(value.reshape(()))

    def _add(self, values: Mapping[str, Mapping[str, torch.Tensor | None]], blob: str) -> None:
        stats = self.collected.agreement[blob]
        ref = values["float"][blob]
        if ref is None:
            if blob not in self.missing_logged:
                self.missing_logged.add(blob)
                LOGGER.warning("compare_report: the float model has no blob '%s'; it is not compared.", blob)
            stats.update(dict.fromkeys(stats))
            return
        self.collected.shapes[blob] = tuple(int(d) for d in ref.shape)
        for key, a, c in PAIRS:
            st = stats.get(key)
            if st is None:
                continue
            va, vc = values[a][blob], values[c][blob]
            if va is not None and vc is not None and tuple(va.shape) != tuple(vc.shape):
                raise ModelMismatchError(
                    f"compare_report: blob '{blob}' has shape {tuple(va.shape)} in the {MODEL_LABELS[a]} "
                    f"model and {tuple(vc.shape)} in the {MODEL_LABELS[c]} model; the models do not belong "
                    "together."
                )
            if va is None or vc is None:
                LOGGER.warning("compare_report: blob '%s' is missing from or has another shape in the %s "
                               "model; %s not measured for it.", blob, a if va is None else c,
                               PAIR_LABELS[key])
                stats[key] = None
                continue
            st.add(va, vc)
        kept = self.collected.samples.setdefault(blob, {})
        for which, v in _sample(values, blob, self.rng, self.sample_size).items():
            kept[which] = np.concatenate([kept[which], v]) if which in kept else v


def collect_report(
    nets: ReportNets, inputs: InputBatch | Sequence[InputBatch] | None, batches: int, seed: int, *,
    progress: bool | None = None,
) -> Collected:
    """Run the report's nets over the batches of ``inputs`` and collect the per-blob agreement, the
    saturation of every ``Quant`` layer and the values sampled for the plots.

    Raises:
        ConfigError: bad ``inputs`` (:func:`input_plan`).
        RuntimeEngineError: an input blob has no value; the data layers of the nets read different batches.
    """
    plan = input_plan(inputs, nets.nets["float"], batches, seed)
    collector = _ReportCollector(nets, plan, seed)
    bar = tqdm(range(plan.count), desc="Comparing float / fake-quant / deploy", unit="batch",
               disable=None if progress is None else not progress)
    for _ in bar:
        collector.run(next(plan.batches) if plan.batches is not None else None)
    return collector.collected


# ---------------------------------------------------------------------------------------------------------
# the fake-quant vs deploy agreement's collection
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlobPair:
    """One blob of both the fake-quant and the deploy model after the same forward pass.

    Attributes:
        blob: the blob name.
        layer: the deploy net's layer that last writes it.
        kind: how the deploy value was read: ``"codes"``, ``"accumulator"`` or ``"real"``.
        fake: the fake-quant model's value.
        deploy: the deploy model's value in real units.
        step: the blob's output quantization step (one value or per channel), or None when unknown.
        is_output: True for the deploy net's outputs.
    """

    blob: str
    layer: str
    kind: str
    fake: torch.Tensor
    deploy: torch.Tensor
    step: np.ndarray | None
    is_output: bool


def fake_deploy_pairs(
    fake_model: ModelArg, fake_weights: ModelArg, deploy_model: ModelArg, deploy_weights: ModelArg,
    inputs: InputBatch, *, device: torch.device | str | None, quant_formula: str,
) -> Iterator[BlobPair]:
    """Run the fake-quant and the deploy model once on ``inputs`` and yield every blob of both nets (in
    the deploy net's blob order) whose shapes agree; a blob whose shapes differ is logged and left out.

    Raises:
        ModelFormatError: ``deploy_weights`` is not a deploy caffemodel, or a model cannot be loaded.
        RuntimeEngineError: an input blob has no entry in ``inputs``.
    """
    fake = _load_float(fake_model, fake_weights, device)
    deploy = _load_deploy(deploy_model, deploy_weights, device, quant_formula)
    feed_inputs(fake, inputs, "fake-quant")
    feed_inputs(deploy.net, inputs, "deploy")
    with torch.no_grad():
        fake.run()
        deploy.net.run()
    steps = output_steps(deploy)
    for blob, codes in deploy.scales.items():
        if codes.kind == "codes":
            steps.setdefault(blob, np.asarray(codes.scale, dtype=np.float64))
    writers = {top: layer.name for layer in deploy.net.engine_layers for top in layer.param.top}
    outputs = set(deploy.net.outputs)
    fake_blobs = set(fake.blob_names)
    for name in deploy.net.blob_names:
        if name not in fake_blobs:
            continue
        scale = deploy.scales.get(name)
        value = deploy.net.tensor(name)
        real = scale.to_real(value) if scale is not None else value
        ref = fake.tensor(name)
        if tuple(ref.shape) != tuple(real.shape):
            LOGGER.warning("compare_models: blob '%s' has shape %s in the fake-quant model and %s in the "
                           "deploy model; not compared.", name, tuple(ref.shape), tuple(real.shape))
            continue
        yield BlobPair(name, writers.get(name, ""), scale.kind if scale is not None else "real", ref, real,
                       steps.get(name), name in outputs)
