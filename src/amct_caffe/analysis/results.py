"""What the analysis hands back: the per-layer report (:class:`ReportResult`) with its JSON form, and the
rows of the fake-quant vs deploy agreement table (:class:`BlobAgreement`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from amct_caffe.analysis.metrics import Metrics, Saturation

#: The compared pairs: (key in the result/JSON, reference model, compared model).
PAIRS = (("float_vs_fake", "float", "fake"), ("float_vs_deploy", "float", "deploy"),
         ("fake_vs_deploy", "fake", "deploy"))
PAIR_LABELS = {"float_vs_fake": "float vs fake-quant", "float_vs_deploy": "float vs deploy",
               "fake_vs_deploy": "fake-quant vs deploy"}
#: How the report names the models.
MODEL_LABELS = {"float": "float", "fake": "fake-quant", "deploy": "deploy"}
SKIP_HINT = ('set "retrain_enable": false for these layers in the QAT config (the JSON of '
             "create_quant_retrain_config) and retrain; errors accumulate along the net, so try the first "
             "one first")
RANDOM_NOTE = ("random inputs: these numbers measure the numerics of quantization, not accuracy (the clip "
               "ranges were learned on real data); use real inputs for decisions")


# ---------------------------------------------------------------------------------------------------------
# the per-layer report
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedLayer:
    """A quantized layer of a fake-quant (or deploy) net, found from its ``DeQuant``.

    Attributes:
        layer: the quantized layer ``L`` (``dequant_param.object_layer``).
        layer_type: its Caffe type ('' when no layer writes the DeQuant's bottom).
        blob: the DeQuant's top, L's original top.
        quant_layer: the ``Quant`` layer whose codes ``L`` reads ('' when none).
        scale_d, offset_d: that Quant's factors (None when none).
    """

    layer: str
    layer_type: str
    blob: str
    quant_layer: str
    scale_d: float | None
    offset_d: int | None


@dataclass(frozen=True)
class LayerReport(QuantizedLayer):
    """One quantized layer: where it is (the :class:`QuantizedLayer` fields) and what was measured there.

    Attributes:
        shape: the blob's shape in the float model (last batch).
        is_output: True when the blob is an output of the float net.
        metrics: ``{pair key: Metrics or None}`` for the pairs of :data:`PAIRS` that were run (None: the
            blob is missing from a model or its shapes differ).
        saturation: ``{"fake": Saturation, "deploy": Saturation}`` (models that were run).
        samples: ``{"float"|"fake"|"deploy": values}`` at the same random positions, for the plots (not
            written to the JSON).
    """

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
    """Everything :func:`amct_caffe.analysis.report.compare_report` measured.

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
        accuracy: ``{Accuracy top of the float net: {"float"|"fake"|"deploy": mean over the batches}}``;
            empty when the net has no Accuracy layer.
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
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """True when at least one layer or output has metrics: two unrelated models share no quantized
        layer and no output blob, and then nothing was compared."""
        rows = [*(r.metrics for r in self.layers), *(o.metrics for o in self.outputs)]
        return any(m is not None for metrics in rows for m in metrics.values())

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (samples left out; non-finite floats as strings)."""
        layers = [{
            "layer": r.layer, "type": r.layer_type, "blob": r.blob, "quant_layer": r.quant_layer,
            "scale_d": r.scale_d, "offset_d": r.offset_d, "shape": list(r.shape),
            "is_output": r.is_output,
            "worst_cosine": r.worst_cosine(),
            "skip_candidate": r.layer in self.skip_candidates,
            "saturation": {k: asdict(s) for k, s in r.saturation.items()},
            **{k: metrics_dict(m) for k, m in r.metrics.items()},
        } for r in self.layers]
        outputs = [{"blob": o.blob, "shape": list(o.shape),
                    **{k: metrics_dict(m) for k, m in o.metrics.items()}} for o in self.outputs]
        data = {
            "format": "amct-caffe compare report", "version": 1,
            "models": dict(self.models), "inputs": self.inputs, "batches": self.batches, "seed": self.seed,
            "quant_formula": self.quant_formula, "threshold": self.threshold, "pairs": list(self.pairs),
            "layers": layers, "outputs": outputs,
            "skip_candidates": list(self.skip_candidates),
            "accuracy": {blob: dict(values) for blob, values in self.accuracy.items()},
            "skip_hint": SKIP_HINT if self.skip_candidates else "",
        }
        if self.inputs == "random":
            data["note"] = RANDOM_NOTE
        return json_safe(data)


def metrics_dict(m: Metrics | None) -> dict[str, Any] | None:
    """The report's JSON entry of one pair's metrics (the report does not list the relative error)."""
    if m is None:
        return None
    return {"cosine": m.cosine, "snr_db": m.snr_db, "max_abs": m.max_abs, "count": m.count,
            "max_lsb": m.max_lsb}


def json_safe(value: Any) -> Any:
    """Non-finite floats as the strings "inf"/"-inf"/"nan" (strict JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# the fake-quant vs deploy agreement table
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BlobAgreement:
    """Agreement of one blob between the fake-quant and the deploy model.

    Attributes:
        blob: the blob name (present in both nets).
        layer: the deploy net's layer that last writes it.
        kind: how the deploy value was read: ``"codes"``, ``"accumulator"`` or ``"real"``.
        shape: the blob's shape.
        max_abs_diff: ``max |fake - deploy|`` in real units.
        step: the output quantization step used for ``max_lsb`` (the smallest one when per channel), or
            None when unknown.
        max_lsb: ``max |fake - deploy| / step`` (element-wise with per-channel steps), or None.
        cosine: cosine similarity of the flattened values (1.0 when both are all zero).
        rel_err: ``||fake - deploy||_2 / ||fake||_2`` (0 when both are zero, inf when only fake is).
        is_output: True for the net's outputs (blobs no layer consumes).
        flips: for a Quant top (``kind == "codes"``): how many codes differ (by half a step or more)
            between the models; None for other blobs.
    """

    blob: str
    layer: str
    kind: str
    shape: tuple[int, ...]
    max_abs_diff: float
    step: float | None
    max_lsb: float | None
    cosine: float
    rel_err: float
    is_output: bool = False
    flips: int | None = None
