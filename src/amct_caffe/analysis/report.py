"""Per-layer accuracy report: float vs fake-quant vs deploy model on the same inputs (issue 5, item 3).

:func:`compare_report` runs the float model, the fake-quant model and (optionally) the deploy model of
``save_quant_retrain_model`` in the engine on the same inputs and measures, for every quantized layer and
for every output blob of the float net:

* cosine similarity, SNR in dB (``10*log10(sum(ref**2) / sum((ref - x)**2))``) and the largest absolute
  error, for the pairs float vs fake-quant, float vs deploy and fake-quant vs deploy (the last also in
  output quantization steps, ``max_lsb``, with the steps of :func:`amct_caffe.analysis.compare.output_steps`);
* the saturation rate of each layer's activation quantizer: the fraction of the ``Quant`` layer's input
  values whose code ``round(x / s_d) + o_d`` falls outside [-128, 127] and is clipped to the bound.

Which blobs are compared
------------------------
A quantized layer ``L`` of the saved models writes ``<L>_dequant_layer_in`` and its ``DeQuant`` writes L's
ORIGINAL top, so the float model's blob of that name is the reference. Blobs are read by name at the END
of the forward, as pycaffe's ``net.blobs[name]`` shows them: when the float model runs an in-place chain
(Convolution -> BatchNorm -> Scale -> ReLU, all ``top == bottom``) its blob holds the post-chain value, and
so does the quantized models' blob of the same name (the BatchNorm/Scale are folded into the quantized
convolution, the ReLU still runs in place after the DeQuant). A BatchNorm that is not in place gives the
folded convolution the name of the chain's last top (``passes.fuse_bn``), again the float blob of the same
name. Errors accumulate along the net: a layer's numbers include everything upstream of it.

The saturation is measured on the value the ``Quant`` layer reads at the time it runs (the nets run in
segments that end before each ``Quant``). "Clipped" rather than "code at -128 or 127": with ``fixed_min``
(an input after a ReLU) ``clip_min = 0`` and ``o_d = -128``, so every zero input has the code -128 without
any loss; only values beyond the range lose information. A ``Quant`` shared by several layers reports its
rate on each of them. The deploy model's rate uses the same (fake-quant) formula on the deploy model's
``Quant`` inputs.

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
``report.json`` (all numbers; a non-finite number -- an SNR of identical values is +inf -- is written as
the string ``"inf"``, ``"-inf"`` or ``"nan"`` so the file stays strict JSON), ``report.html`` and the PNG
plots it shows (``cosine.png``, ``snr.png``, ``saturation.png``, ``worst_<k>.png``: float vs quantized
values of the worst layers), all written together through :class:`amct_caffe.model.io.AtomicFiles`.
The plots need matplotlib (``pip install matplotlib``), imported only there (Agg, no pyplot state).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from amct_caffe.analysis.compare import feed_inputs, output_steps
from amct_caffe.emulation.integer import DEFAULT_QUANT_FORMULA
from amct_caffe.emulation.loader import load_net
from amct_caffe.engine.layers.base import TEST
from amct_caffe.engine.net import Net
from amct_caffe.errors import AmctError, ConfigError, RuntimeEngineError
from amct_caffe.log import get_logger
from amct_caffe.model.graph import producer_index
from amct_caffe.model.io import AtomicFiles
from amct_caffe.model.layer_types import DEQUANT, QUANT
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.numerics import INT8_MAX, INT8_MIN, quant_codes

LOGGER = get_logger("analysis.report")

ModelArg = str | os.PathLike[str] | caffe_pb2.NetParameter
InputBatch = Mapping[str, np.ndarray | torch.Tensor]

#: The compared pairs: (key in the result/JSON, reference model, compared model).
PAIRS = (("float_vs_fake", "float", "fake"), ("float_vs_deploy", "float", "deploy"),
         ("fake_vs_deploy", "fake", "deploy"))
PAIR_LABELS = {"float_vs_fake": "float vs fake-quant", "float_vs_deploy": "float vs deploy",
               "fake_vs_deploy": "fake-quant vs deploy"}
#: Values kept per blob and model for the scatter/histogram plots (taken from the first batch).
SAMPLE_SIZE = 4096
#: Layers shown in the float-vs-quantized plots (the lowest cosines).
WORST_LAYERS = 3
SKIP_HINT = ('set "retrain_enable": false for these layers in the QAT config (the JSON of '
             "create_quant_retrain_config) and retrain; errors accumulate along the net, so try the first "
             "one first")
RANDOM_NOTE = ("random inputs: these numbers measure the numerics of quantization, not accuracy (the clip "
               "ranges were learned on real data); use real inputs for decisions")


# ---------------------------------------------------------------------------------------------------------
# result types
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Metrics:
    """Agreement of a compared value ``x`` with a reference ``ref`` over all batches.

    Attributes:
        cosine: ``sum(ref*x) / (||ref|| * ||x||)`` over every value of every batch (1.0 when both are all
            zero, 0.0 when only one is).
        snr_db: ``10*log10(sum(ref**2) / sum((ref - x)**2))``; +inf when the values are identical, -inf when
            ``ref`` is all zero and ``x`` is not.
        max_abs: ``max |ref - x|``.
        count: how many values were compared.
        max_lsb: fake-quant vs deploy only, for a quantized layer's blob: ``max |ref - x| / step`` with the
            layer's output quantization step (per channel), else None.
    """

    cosine: float
    snr_db: float
    max_abs: float
    count: int
    max_lsb: float | None = None


@dataclass
class Saturation:
    """Clipping of one ``Quant`` layer over all batches.

    Attributes:
        rate: ``clipped / total``, the fraction of input values clipped to code -128 or 127.
        low_rate, high_rate: the fractions clipped at -128 (below ``clip_min``) and at 127 (above
            ``clip_max``).
        clipped: clipped values (low + high).
        total: values quantized.
    """

    rate: float
    low_rate: float
    high_rate: float
    clipped: int
    total: int


@dataclass
class LayerReport:
    """One quantized layer.

    Attributes:
        layer: the quantized layer ``L`` (``dequant_param.object_layer``).
        layer_type: its Caffe type.
        blob: the compared blob, L's original top (written by ``<L>_dequant_layer``).
        quant_layer: the ``Quant`` layer feeding ``L`` ('' when none was found).
        scale_d, offset_d: that Quant's activation factors (``s_d = 1/quant_param.scale``, ``o_d``).
        shape: the blob's shape in the float model (last batch).
        is_output: True when the blob is an output of the float net.
        metrics: ``{pair key: Metrics or None}`` for the pairs of :data:`PAIRS` that were run (None: the
            blob is missing from a model or its shapes differ).
        saturation: ``{"fake": Saturation, "deploy": Saturation}`` (models that were run).
        samples: ``{"float"|"fake"|"deploy": values}`` at the same random positions of the first batch, for
            the plots (not written to the JSON).
    """

    layer: str
    layer_type: str
    blob: str
    quant_layer: str
    scale_d: float | None
    offset_d: int | None
    shape: tuple[int, ...]
    is_output: bool
    metrics: dict[str, Metrics | None]
    saturation: dict[str, Saturation]
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def worst_cosine(self) -> float | None:
        """The lower cosine of float vs fake-quant and float vs deploy (None when neither was measured)."""
        values = [m.cosine for key, m in self.metrics.items() if key != "fake_vs_deploy" and m is not None]
        return min(values) if values else None


@dataclass
class OutputReport:
    """One output blob of the float net (``metrics`` as in :class:`LayerReport`)."""

    blob: str
    shape: tuple[int, ...]
    metrics: dict[str, Metrics | None]


@dataclass
class ReportResult:
    """Everything :func:`compare_report` measured.

    Attributes:
        layers: one entry per quantized layer, in the fake-quant net's order.
        outputs: one entry per output blob of the float net (sorted by name, as Caffe lists outputs).
        threshold: the cosine threshold for skip candidates.
        skip_candidates: layers whose worst cosine is below ``threshold``, in net order.
        pairs: the pair keys that were measured.
        inputs: ``"random"``, ``"given"`` or ``"data layers"``.
        batches: forward passes run.
        seed: the seed of random inputs and of the plot samples.
        quant_formula: the deploy model's Quant formula.
        models: ``{"float"|"fake"|"deploy": "<prototxt> + <caffemodel>"}`` (descriptions of the arguments).
    """

    layers: list[LayerReport]
    outputs: list[OutputReport]
    threshold: float
    skip_candidates: list[str]
    pairs: list[str]
    inputs: str
    batches: int
    seed: int
    quant_formula: str
    models: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (samples left out; non-finite floats as strings)."""
        layers = []
        for r in self.layers:
            layers.append({
                "layer": r.layer, "type": r.layer_type, "blob": r.blob, "quant_layer": r.quant_layer,
                "scale_d": r.scale_d, "offset_d": r.offset_d, "shape": list(r.shape),
                "is_output": r.is_output,
                "worst_cosine": r.worst_cosine(),
                "skip_candidate": r.layer in self.skip_candidates,
                "saturation": {k: vars(s).copy() for k, s in r.saturation.items()},
                **{k: _metrics_dict(m) for k, m in r.metrics.items()},
            })
        outputs = [{"blob": o.blob, "shape": list(o.shape),
                    **{k: _metrics_dict(m) for k, m in o.metrics.items()}} for o in self.outputs]
        data = {
            "format": "amct-caffe compare report", "version": 1,
            "models": dict(self.models), "inputs": self.inputs, "batches": self.batches, "seed": self.seed,
            "quant_formula": self.quant_formula, "threshold": self.threshold, "pairs": list(self.pairs),
            "layers": layers, "outputs": outputs,
            "skip_candidates": list(self.skip_candidates),
            "skip_hint": SKIP_HINT if self.skip_candidates else "",
        }
        if self.inputs == "random":
            data["note"] = RANDOM_NOTE
        return _json_safe(data)


def _metrics_dict(m: Metrics | None) -> dict[str, Any] | None:
    return None if m is None else vars(m).copy()


def _json_safe(value: Any) -> Any:
    """Non-finite floats as the strings "inf"/"-inf"/"nan" (strict JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# accumulators
# ---------------------------------------------------------------------------------------------------------
class _PairStats:
    """Running sums for :class:`Metrics` (float64)."""

    def __init__(self, step: np.ndarray | None = None) -> None:
        self.dot = self.ref2 = self.x2 = self.noise2 = 0.0
        self.max_abs = 0.0
        self.max_lsb: float | None = None
        self.count = 0
        self.step = step
        self.broken = False

    def add(self, ref: torch.Tensor, x: torch.Tensor) -> None:
        a = ref.detach().to(torch.float64).reshape(-1)
        b = x.detach().to(torch.float64).reshape(-1)
        d = a - b
        self.dot += float(a @ b)
        self.ref2 += float(a @ a)
        self.x2 += float(b @ b)
        self.noise2 += float(d @ d)
        self.count += int(a.numel())
        if a.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))
            if self.step is not None:
                s = torch.from_numpy(np.asarray(self.step, dtype=np.float64))
                diff = (ref.detach().to(torch.float64) - x.detach().to(torch.float64)).abs().cpu()
                view = s.reshape(()) if s.numel() == 1 else s.reshape([1, -1] + [1] * (diff.dim() - 2))
                lsb = float((diff / view).max())
                self.max_lsb = lsb if self.max_lsb is None else max(self.max_lsb, lsb)

    def metrics(self) -> Metrics | None:
        if self.broken:
            return None
        na, nb = math.sqrt(self.ref2), math.sqrt(self.x2)
        if na == 0.0 and nb == 0.0:
            cosine = 1.0
        elif na == 0.0 or nb == 0.0:
            cosine = 0.0
        else:
            cosine = min(1.0, max(-1.0, self.dot / (na * nb)))  # rounding may step past +-1
        if self.noise2 == 0.0:
            snr = math.inf
        elif self.ref2 == 0.0:
            snr = -math.inf
        else:
            snr = 10.0 * math.log10(self.ref2 / self.noise2)
        return Metrics(cosine, snr, self.max_abs, self.count, self.max_lsb)


class _SatStats:
    """Running counts of clipped ``Quant`` inputs."""

    def __init__(self, scale_d: float, offset_d: int) -> None:
        self.scale_d = scale_d
        self.offset_d = offset_d
        self.low = self.high = self.total = 0

    def add(self, x: torch.Tensor) -> None:
        codes = quant_codes(x.detach(), self.scale_d, self.offset_d, clamp=False)
        self.low += int((codes < INT8_MIN).sum())
        self.high += int((codes > INT8_MAX).sum())
        self.total += int(codes.numel())

    def result(self) -> Saturation:
        t = max(self.total, 1)
        return Saturation((self.low + self.high) / t, self.low / t, self.high / t, self.low + self.high,
                          self.total)


# ---------------------------------------------------------------------------------------------------------
# the nets
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _QuantizedLayer:
    layer: str
    layer_type: str
    blob: str
    quant_layer: str
    scale_d: float | None
    offset_d: int | None


def _quantized_layers(net: Net) -> list[_QuantizedLayer]:
    """Every ``DeQuant`` of a fake-quant (or deploy) net with the layer and ``Quant`` before it."""
    out = []
    params = [layer.param for layer in net.engine_layers]
    for i, layer in enumerate(net.engine_layers):
        if layer.type_name != DEQUANT:
            continue
        li = producer_index(params, i, net.layer_bottoms[i][0])
        target = net.engine_layers[li] if li is not None else None
        name = layer.param.dequant_param.object_layer or (target.name if target is not None else layer.name)
        quant, scale_d, offset_d = "", None, None
        if target is not None and li is not None and net.layer_bottoms[li]:
            qi = producer_index(params, li, net.layer_bottoms[li][0])
            if qi is not None and net.engine_layers[qi].type_name == QUANT:
                q = net.engine_layers[qi]
                quant, scale_d, offset_d = q.name, float(q.scale_d), int(q.offset_d)  # type: ignore[attr-defined]
        out.append(_QuantizedLayer(name, target.type_name if target is not None else "", layer.param.top[0],
                                   quant, scale_d, offset_d))
    return out


def _quant_indices(net: Net) -> list[int]:
    return [i for i, layer in enumerate(net.engine_layers) if layer.type_name == QUANT]


def _run_observing(net: Net, quants: Sequence[int], stats: Mapping[str, _SatStats]) -> None:
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


def _source_blobs(net: Net) -> list[str]:
    """Tops of the layers without bottoms other than ``Input`` (data layers)."""
    return [t for layer, bottoms, tops in zip(net.engine_layers, net.layer_bottoms, net.layer_tops)
            if not bottoms and layer.type_name != "Input" for t in tops]


def _describe(model: ModelArg, weights: ModelArg | None) -> str:
    def one(x: ModelArg | None) -> str:
        if x is None:
            return "-"
        if isinstance(x, caffe_pb2.NetParameter):
            return f"<NetParameter {x.name!r}>"
        return os.fspath(x)

    return f"{one(model)} + {one(weights)}"


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def _as_array(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _input_batches(
    inputs: InputBatch | Sequence[InputBatch] | None, net: Net, batches: int, seed: int
) -> tuple[str, int, Iterator[InputBatch] | None]:
    """``(mode, number of batches, iterator of {input: array} or None for data layers)``."""
    if inputs is None:
        if not net.inputs:
            return "data layers", batches, None
        rng = np.random.default_rng(seed)
        shapes = {name: tuple(int(d) for d in net.tensor(name).shape) for name in net.inputs}

        def random() -> Iterator[InputBatch]:
            for _ in range(batches):
                yield {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}

        return "random", batches, random()
    if isinstance(inputs, Mapping):
        arrays = {name: _as_array(v) for name, v in inputs.items()}
        sizes = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
        if any(s < batches for s in sizes.values()):
            raise ConfigError(
                f"compare_report: batches={batches} but the inputs hold {sizes} samples on axis 0; each "
                "array's axis 0 is split into `batches` forward passes, so it needs at least that many."
            )
        splits = {name: np.array_split(a, batches) for name, a in arrays.items()}
        return "given", batches, iter([{name: s[i] for name, s in splits.items()} for i in range(batches)])
    batch_list = list(inputs)
    if not batch_list or not all(isinstance(b, Mapping) for b in batch_list):
        raise ConfigError(
            "compare_report: `inputs` must be a dict {input blob: array}, a non-empty list of such dicts "
            "(one forward each), or None (random inputs)."
        )
    return "given", len(batch_list), iter(batch_list)


def _check_inputs(batch: InputBatch, nets: Mapping[str, Net]) -> None:
    for which, net in nets.items():
        missing = [name for name in net.inputs if name not in batch]
        if missing:
            raise RuntimeEngineError(
                f"compare_report: the {which} model's input blob(s) {missing} have no value in the inputs "
                f"(given: {sorted(batch)}); the three models must have the same Input blobs."
            )


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------
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

    Returns:
        The :class:`ReportResult`; :func:`format_table` prints it.

    Raises:
        ConfigError: bad arguments (threshold, batches, only one of the deploy files, inputs); matplotlib is
            missing while ``out_dir`` is given (checked before running anything).
        ModelFormatError: a model cannot be loaded; ``deploy_weights`` is not a deploy caffemodel.
        RuntimeEngineError: an input blob has no value; the data layers of the nets read different batches.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"compare_report: threshold must be a finite number (a cosine), got {threshold!r}.")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"compare_report: batches must be an integer >= 1, got {batches!r}.")
    if (deploy_model is None) != (deploy_weights is None):
        raise ConfigError("compare_report: give both deploy_model and deploy_weights, or neither.")
    if out_dir is not None:
        _matplotlib()  # fail before the (possibly long) runs

    nets: dict[str, Net] = {
        "float": Net(float_model, TEST, weights=float_weights, device=device),
        "fake": Net(fake_model, TEST, weights=fake_weights, device=device),
    }
    models = {"float": _describe(float_model, float_weights), "fake": _describe(fake_model, fake_weights)}
    if deploy_model is not None:
        assert deploy_weights is not None
        nets["deploy"] = load_net(deploy_model, deploy_weights, TEST, device=device,
                                  quant_formula=quant_formula, require_deploy=True)
        models["deploy"] = _describe(deploy_model, deploy_weights)
    pairs = [key for key, a, b in PAIRS if a in nets and b in nets]

    quantized = _quantized_layers(nets["fake"])
    if not quantized:
        LOGGER.warning("compare_report: the fake-quant model %s has no DeQuant layer (no quantized layer).",
                       models["fake"])
    float_net = nets["float"]
    outputs = list(float_net.outputs)
    blobs = list(dict.fromkeys([q.blob for q in quantized] + outputs))
    steps = output_steps(nets["deploy"]) if "deploy" in nets else {}
    stats = {blob: {key: _PairStats(steps.get(blob) if key == "fake_vs_deploy" else None) for key in pairs}
             for blob in blobs}
    shapes: dict[str, tuple[int, ...]] = {}
    samples: dict[str, dict[str, np.ndarray]] = {}
    quants = {which: _quant_indices(net) for which, net in nets.items() if which != "float"}
    sat: dict[str, dict[str, _SatStats]] = {}
    for which, idx in quants.items():
        layers_of = nets[which].engine_layers
        sat[which] = {layers_of[i].name: _SatStats(float(layers_of[i].scale_d),  # type: ignore[attr-defined]
                                                   int(layers_of[i].offset_d))  # type: ignore[attr-defined]
                      for i in idx}

    mode, count, batch_iter = _input_batches(inputs, float_net, batches, seed)
    rng = np.random.default_rng(seed)
    missing_logged: set[tuple[str, str]] = set()
    bar = tqdm(range(count), desc="Comparing float / fake-quant / deploy", unit="batch",
               disable=None if progress is None else not progress)
    for _ in bar:
        if batch_iter is not None:
            batch = next(batch_iter)
            _check_inputs(batch, nets)
            for which, net in nets.items():
                feed_inputs(net, batch, which)
        for which, net in nets.items():
            if which == "float":
                with torch.no_grad():
                    net.run()
            else:
                _run_observing(net, quants[which], sat[which])
        if batch_iter is None:
            _check_same_data(nets)
        values = {which: {blob: _value(net, blob) for blob in blobs} for which, net in nets.items()}
        for blob in blobs:
            ref = values["float"][blob]
            if ref is None:
                _log_missing(missing_logged, "float", blob)
                for st in stats[blob].values():
                    st.broken = True
                continue
            shapes[blob] = tuple(int(d) for d in ref.shape)
            for key, a, c in PAIRS:
                if key not in stats[blob]:
                    continue
                va, vc = values[a][blob], values[c][blob]
                st = stats[blob][key]
                if va is None or vc is None or tuple(va.shape) != tuple(vc.shape):
                    if not st.broken:
                        LOGGER.warning("compare_report: blob '%s' is missing from or has another shape in "
                                       "the %s model; %s not measured for it.", blob,
                                       a if va is None else c, PAIR_LABELS[key])
                    st.broken = True
                    continue
                st.add(va, vc)
            drawn = _sample(values, blob, rng, -(-SAMPLE_SIZE // count))
            kept = samples.setdefault(blob, {})
            for which, v in drawn.items():
                kept[which] = np.concatenate([kept[which], v]) if which in kept else v

    layers = []
    for q in quantized:
        layers.append(LayerReport(
            q.layer, q.layer_type, q.blob, q.quant_layer, q.scale_d, q.offset_d, shapes.get(q.blob, ()),
            q.blob in outputs, {k: st.metrics() for k, st in stats[q.blob].items()},
            {which: s[q.quant_layer].result() for which, s in sat.items() if q.quant_layer in s},
            samples.get(q.blob, {}),
        ))
    out_reports = [OutputReport(o, shapes.get(o, ()), {k: st.metrics() for k, st in stats[o].items()})
                   for o in outputs]
    candidates = [r.layer for r in layers if (w := r.worst_cosine()) is not None and w < threshold]
    result = ReportResult(layers, out_reports, float(threshold), candidates, pairs, mode, count, seed,
                          quant_formula, models)
    if candidates:
        LOGGER.warning("compare_report: %d layer(s) with cosine similarity below %g: %s; %s.",
                       len(candidates), threshold, ", ".join(candidates), SKIP_HINT)
    if mode == "random":
        LOGGER.info("compare_report: %s.", RANDOM_NOTE)
    if out_dir is not None:
        write_report(result, out_dir)
    return result


def _value(net: Net, blob: str) -> torch.Tensor | None:
    try:
        return net.tensor(blob)
    except RuntimeEngineError:
        return None


def _log_missing(logged: set[tuple[str, str]], which: str, blob: str) -> None:
    if (which, blob) not in logged:
        logged.add((which, blob))
        LOGGER.warning("compare_report: the %s model has no blob '%s'; it is not compared.", which, blob)


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


# ---------------------------------------------------------------------------------------------------------
# text table
# ---------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if math.isinf(value):
        return f"{'inf' if value > 0 else '-inf':>{width}}"
    return f"{value:{width}{spec}}"


def format_table(result: ReportResult) -> str:
    """A plain-text table of the report for the terminal: one line per quantized layer (``*``: a skip
    candidate; ``sat%``: the fake-quant model's saturation), then the net outputs and the skip candidates."""
    pairs = result.pairs
    lsb = "fake_vs_deploy" in pairs
    name_w = max([10] + [len(r.layer) + 1 for r in result.layers] + [len(o.blob) + 1 for o in result.outputs])
    lead = f"{'':<{name_w}} {'':<12} {'':>7}"
    group = "".join(f" {PAIR_LABELS[k]:^28}" for k in pairs)
    head = f"{'layer':<{name_w}} {'type':<12} {'sat%':>7}"
    head += "".join(f" {'cosine':>9} {'SNR dB':>8} {'max abs':>9}" for _ in pairs)
    head += f" {'LSB':>7}" if lsb else ""
    lines = [lead + group, head]

    def cells(metrics: Mapping[str, Metrics | None]) -> str:
        out = ""
        for key in pairs:
            m = metrics.get(key)
            out += (f" {_fmt(m.cosine if m else None, '.6f', 9)} {_fmt(m.snr_db if m else None, '.2f', 8)}"
                    f" {_fmt(m.max_abs if m else None, '.3g', 9)}")
        if lsb:
            m = metrics.get("fake_vs_deploy")
            out += f" {_fmt(m.max_lsb if m else None, '.3f', 7)}"
        return out

    for r in result.layers:
        sat = r.saturation.get("fake")
        mark = "*" if r.layer in result.skip_candidates else " "
        lines.append(f"{mark}{r.layer:<{name_w - 1}} {r.layer_type[:12]:<12} "
                     f"{_fmt(sat.rate * 100 if sat else None, '.3f', 7)}{cells(r.metrics)}")
    if result.outputs:
        lines.append("net outputs:")
        for o in result.outputs:
            lines.append(f" {o.blob:<{name_w - 1}} {'':<12} {'':>7}{cells(o.metrics)}")
    if lsb:
        lines.append("LSB: fake-quant vs deploy in steps of the next Quant reading the layer; for a layer "
                     "no Quant reads, in steps of its INT32 accumulator (deq_scale), where one flipped input "
                     "code shows as many steps.")
    if result.inputs == "random":
        lines.append(f"note: {RANDOM_NOTE}.")
    if result.skip_candidates:
        lines.append(f"candidates to skip (cosine < {result.threshold:g}): "
                     f"{', '.join(result.skip_candidates)}")
        lines.append(f"  hint: {SKIP_HINT}.")
    else:
        lines.append(f"no layer below the cosine threshold {result.threshold:g}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# files: JSON, PNG plots, HTML
# ---------------------------------------------------------------------------------------------------------
def _matplotlib() -> Any:
    """A factory of matplotlib Figures on the Agg canvas (no pyplot), or a clear error when matplotlib is
    missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            "The compare report's plots need matplotlib, which is not installed: pip install matplotlib "
            "(or pass out_dir=None and print format_table(result))."
        ) from exc
    def agg_figure(**kwargs: Any) -> Any:
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
        return fig

    return agg_figure


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _bar_chart(Figure: Any, names: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str,
               ylabel: str, hline: float | None = None, cap_inf: bool = False) -> bytes:
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2.0), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    finite = [v for vals in series.values() for v in vals if v is not None and math.isfinite(v)]
    cap = (max(finite) + 10.0 if finite else 100.0) if cap_inf else None
    for k, (label, vals) in enumerate(series.items()):
        ys = []
        for v in vals:
            if v is None or math.isnan(v):
                ys.append(np.nan)
            elif math.isinf(v) and cap is not None:
                ys.append(cap if v > 0 else 0.0)
            else:
                ys.append(v)
        ax.bar(x + (k - (len(series) - 1) / 2) * width, ys, width, label=label)
    if hline is not None:
        ax.axhline(hline, color="red", linestyle="--", linewidth=1, label=f"threshold {hline:g}")
    if finite and hline is not None:
        low = min(finite + [hline])
        ax.set_ylim(max(-1.0, low - 0.1 * (1.0 - low) - 1e-6), 1.0 + 0.02 * (1.0 - low) + 1e-7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _worst_chart(Figure: Any, r: LayerReport) -> bytes:
    fig = Figure(figsize=(10.0, 4.2))
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    ref = r.samples.get("float")
    labels = {"fake": "fake-quant", "deploy": "deploy"}
    if ref is not None and ref.size:
        for which in ("fake", "deploy"):
            v = r.samples.get(which)
            if v is None:
                continue
            ax1.scatter(ref, v, s=3, alpha=0.4, label=labels[which])
            ax2.hist(v - ref, bins=60, alpha=0.5, label=labels[which])
        lo, hi = float(ref.min()), float(ref.max())
        ax1.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
    cos = r.worst_cosine()
    title = f"{r.layer} ({r.blob}): float vs quantized"
    ax1.set_title(title + (f", cosine {cos:.6f}" if cos is not None else ""), fontsize=9)
    ax1.set_xlabel("float")
    ax1.set_ylabel("quantized")
    ax1.legend(fontsize=8)
    ax2.set_title(f"{r.layer}: error (quantized - float)", fontsize=9)
    ax2.set_xlabel("error")
    ax2.set_ylabel("count")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def render_plots(result: ReportResult) -> dict[str, bytes]:
    """The PNG plots of the report, ``{file name: PNG bytes}`` (needs matplotlib)."""
    Figure = _matplotlib()
    plots: dict[str, bytes] = {}
    names = [r.layer for r in result.layers]
    if not names:
        return plots
    float_pairs = [k for k in result.pairs if k != "fake_vs_deploy"]

    def series(attr: str, keys: Sequence[str]) -> dict[str, list[float | None]]:
        return {PAIR_LABELS[k]: [getattr(r.metrics[k], attr) if r.metrics.get(k) else None
                                 for r in result.layers] for k in keys}

    plots["cosine.png"] = _bar_chart(Figure, names, series("cosine", float_pairs),
                                     "Cosine similarity to the float model per quantized layer", "cosine",
                                     hline=result.threshold)
    plots["snr.png"] = _bar_chart(Figure, names, series("snr_db", float_pairs),
                                  "SNR to the float model per quantized layer", "SNR [dB]", cap_inf=True)
    sat_series = {label: [r.saturation[w].rate * 100 if w in r.saturation else None for r in result.layers]
                  for w, label in (("fake", "fake-quant"), ("deploy", "deploy"))
                  if any(w in r.saturation for r in result.layers)}
    plots["saturation.png"] = _bar_chart(Figure, names, sat_series,
                                         "Saturation of the activation quantizer (inputs clipped)",
                                         "clipped [%]")
    ranked = sorted((r for r in result.layers
                     if r.worst_cosine() is not None and r.samples.get("float") is not None),
                    key=lambda r: r.worst_cosine())  # type: ignore[arg-type,return-value]
    for k, r in enumerate(ranked[:WORST_LAYERS], start=1):
        plots[f"worst_{k}.png"] = _worst_chart(Figure, r)
    return plots


def _cell(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def render_html(result: ReportResult, plots: Sequence[str]) -> str:
    """The HTML page of the report; ``plots`` are the PNG file names it shows (beside it)."""
    e = html.escape
    pairs = result.pairs
    head_cells = "".join(f"<th>cos {e(PAIR_LABELS[k])}</th><th>SNR dB {e(PAIR_LABELS[k])}</th>"
                         f"<th>max abs {e(PAIR_LABELS[k])}</th>" for k in pairs)
    if "fake_vs_deploy" in pairs:
        head_cells += "<th>max LSB fake-quant vs deploy</th>"

    def cells(metrics: Mapping[str, Metrics | None]) -> str:
        out = ""
        for k in pairs:
            m = metrics.get(k)
            out += (f"<td>{_cell(m.cosine if m else None, '.6f')}</td>"
                    f"<td>{_cell(m.snr_db if m else None, '.2f')}</td>"
                    f"<td>{_cell(m.max_abs if m else None, '.4g')}</td>")
        if "fake_vs_deploy" in pairs:
            m = metrics.get("fake_vs_deploy")
            out += f"<td>{_cell(m.max_lsb if m else None, '.3f')}</td>"
        return out

    rows = []
    for r in result.layers:
        sat = r.saturation
        sat_text = " / ".join(f"{sat[w].rate * 100:.3f}%" for w in ("fake", "deploy") if w in sat) or "-"
        cls = ' class="skip"' if r.layer in result.skip_candidates else ""
        rows.append(f"<tr{cls}><td>{e(r.layer)}</td><td>{e(r.layer_type)}</td><td>{e(r.blob)}</td>"
                    f"<td>{e(r.quant_layer)}</td><td>{_cell(r.scale_d, '.6g')}</td>"
                    f"<td>{'-' if r.offset_d is None else r.offset_d}</td><td>{sat_text}</td>"
                    f"{cells(r.metrics)}</tr>")
    out_rows = [f"<tr><td>{e(o.blob)}</td><td>{e(str(list(o.shape)))}</td>{cells(o.metrics)}</tr>"
                for o in result.outputs]
    if result.skip_candidates:
        skip = (f"<p class=\"warn\">Candidates to skip (cosine &lt; {result.threshold:g}): "
                f"<b>{e(', '.join(result.skip_candidates))}</b><br>Hint: {e(SKIP_HINT)}.</p>")
    else:
        skip = f"<p>No layer is below the cosine threshold {result.threshold:g}.</p>"
    note = f"<p class=\"warn\">Note: {e(RANDOM_NOTE)}.</p>" if result.inputs == "random" else ""
    shown = {"float": "float", "fake": "fake-quant", "deploy": "deploy"}
    models = "".join(f"<li>{e(shown.get(k, k))}: <code>{e(v)}</code></li>" for k, v in result.models.items())
    images = "".join(f'<figure><img src="{e(p)}" alt="{e(p)}"><figcaption>{e(p)}</figcaption></figure>'
                     for p in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>amct-caffe compare report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #bbb; padding: 2px 6px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.skip td {{ background: #fde2e2; }}
.warn {{ color: #a00000; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>amct-caffe compare report</h1>
<ul>{models}</ul>
<p>Inputs: {e(result.inputs)}, {result.batches} batch(es), seed {result.seed}; deploy Quant formula
{e(result.quant_formula)}. Errors accumulate along the net: a layer's numbers include everything upstream.
Saturation: fraction of the Quant layer's input values clipped to code -128 or 127 (fake-quant / deploy).</p>
{note}{skip}
<h2>Quantized layers</h2>
<table><tr><th>layer</th><th>type</th><th>blob</th><th>Quant layer</th><th>scale_d</th><th>offset_d</th>
<th>saturation</th>{head_cells}</tr>
{''.join(rows)}
</table>
<h2>Net outputs</h2>
<table><tr><th>blob</th><th>shape</th>{head_cells}</tr>
{''.join(out_rows)}
</table>
<h2>Plots</h2>
{images}
<p>All numbers: <a href="report.json">report.json</a>.</p>
</body></html>
"""


def write_report(result: ReportResult, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``report.json``, ``report.html`` and the PNG plots into ``out_dir`` (created), all-or-nothing.

    Returns:
        ``{file name: path}`` of the files written.

    Raises:
        ConfigError: matplotlib is not installed (nothing is written).
    """
    folder = os.fspath(out_dir)
    plots = render_plots(result)
    data = result.to_dict()
    data["plots"] = sorted(plots)
    files: dict[str, bytes] = {
        "report.json": (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"),
        "report.html": render_html(result, list(plots)).encode("utf-8"),
        **plots,
    }
    written = {name: os.path.join(folder, name) for name in files}
    try:
        with AtomicFiles() as atomic:
            for name, payload in files.items():
                atomic.write(written[name], payload)
    except OSError as exc:
        raise AmctError(f"Cannot write the compare report into '{folder}': {exc}.") from exc
    LOGGER.info("Compare report written: %s", os.path.join(folder, "report.html"))
    return written
