"""Read the quantization factors out of a retrained net and take its retrain layers out again.

This is the first half of ``save_quant_retrain_model`` (docs/decisions.md rows 3 and 14; §6). It works on the
TEST-phase view of the retrain prototxt written by ``create_quant_retrain_model`` (``passes.retrain``) and the
weights of a trained snapshot of it:

* :func:`read_retrain_factors` is one pure step from (net, weights) to the factors of every quantized layer:

  - each ``ActivationQAT`` ``A``: its blobs ``[clip_max], [clip_min]`` through AMCT's ClipCheck against the
    prototxt's initial values (what the engine layer does with freshly loaded blobs), ``fixed_min`` -> the
    minimum is 0, then ``quant.ulq.ulq_record_factors`` -> ``(s_d, o_d)``. The layers ``A`` feeds are its
    quantized consumers: the layer behind each ``WeightQAT`` reading ``A``, and AVE Pooling layers reading
    ``A`` directly. ``A`` lacking its blobs is a :class:`~amct_caffe.errors.RecordError` ("run the retrain
    model forward/train before saving"): an IFMR-initialised layer gets its clips on its first forward only;
  - each ``WeightQAT`` ``W`` of a layer ``L``: ARQ scales ``s_w`` of the float shadow weight ``W.blobs[1]``
    (not ``W.blobs[0]``, the fake-quantized copy: ARQ is not exactly idempotent, see ``quant.arq``), per
    output channel when ``channel_wise`` (axis 1 for Deconvolution, else 0) or per tensor.

  Nothing is edited; every inconsistency of the wiring is a :class:`~amct_caffe.errors.ModelFormatError`
  naming the file, the layer and the fix.
* :func:`remove_retrain_layers` deletes every ``ActivationQAT``/``WeightQAT``, makes each quantized layer
  read the activation layer's original bottom again, gives ``L`` its float shadow weight back as its weight,
  drops the ``<L>_wts_retrain_w`` sharing name (``L``'s weight ``param`` goes back to the defaults; a
  trailing all-default ``param {}`` is dropped) and removes the retrain layers' blobs from the weights.
* :func:`fold_batch_norms` then folds any Convolution/Deconvolution + BatchNorm (+ Scale) still in the net
  (a retrain model built by hand, or a fold ``create_quant_retrain_model`` had to skip) with
  ``passes.fuse_bn`` -- AMCT's fusion pass runs on the whole net before quantization
  (docs/amct-reference.md §2.2). The saved weight scales of a folded layer are ARQ of the folded shadow
  weight: for ``channel_wise`` that equals ``|k_c| * s_w[c]`` (ARQ is equivariant to a per-channel factor),
  for per-tensor scales ARQ is recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from amct_caffe.errors import AmctError, ConfigError, ModelFormatError, RecordError, model_where
from amct_caffe.log import get_logger
from amct_caffe.model.graph import Graph
from amct_caffe.model.layer_types import ACTIVATION_QAT, WEIGHT_QAT
from amct_caffe.model.weights import Weights
from amct_caffe.passes.fuse_bn import BNFold, fuse_bn_one_phase
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.arq import WEIGHT_CHANNEL_AXIS, arq_scale, weight_channel_axis
from amct_caffe.quant.ulq import clip_check, ulq_record_factors

LOGGER = get_logger("passes.retrain_removal")

RETRAIN_TYPES = (ACTIVATION_QAT, WEIGHT_QAT)
#: The layer types whose input an ``ActivationQAT`` may feed directly (no weights to quantize).
WEIGHTLESS_QUANT_TYPES = ("Pooling",)


@dataclass(frozen=True)
class ActivationFactors:
    """One ``ActivationQAT`` and the activation factors of the value it quantizes.

    Attributes:
        layer: the ``ActivationQAT``'s name.
        bottom: the blob it reads (the value the saved ``Quant`` layer quantizes).
        consumers: the quantized layers fed by it, in file order.
        clip_max, clip_min: the clips after ClipCheck and ``fixed_min`` (float32 values).
        fixed_min: the layer's ``fixed_min``.
        scale_d, offset_d: ``s_d`` (a float32 value) and ``o_d`` in [-128, 127].
    """

    layer: str
    bottom: str
    consumers: tuple[str, ...]
    clip_max: float
    clip_min: float
    fixed_min: bool
    scale_d: float
    offset_d: int


@dataclass(frozen=True)
class WeightFactors:
    """One quantized layer with weights: its ``WeightQAT``, float shadow weight and ARQ scales.

    Attributes:
        layer: the quantized layer ``L``.
        layer_type: ``L``'s Caffe type (Convolution, Deconvolution, InnerProduct).
        retrain_layer: the ``WeightQAT``'s name.
        channel_wise: per output channel (``scale_w`` has C_out entries) or per tensor (one entry).
        shadow: the float shadow weight (``WeightQAT.blobs[1]``), float32 in ``L``'s weight layout.
        scale_w: ARQ scales of ``shadow``, float32.
    """

    layer: str
    layer_type: str
    retrain_layer: str
    channel_wise: bool
    shadow: np.ndarray
    scale_w: np.ndarray

    @property
    def axis(self) -> int:
        """The output-channel axis of the weight (1 for Deconvolution, else 0)."""
        return weight_channel_axis(self.layer_type)


@dataclass(frozen=True)
class RetrainFactors:
    """Everything :func:`read_retrain_factors` found: activation groups (file order) and weight factors."""

    activations: tuple[ActivationFactors, ...]
    weights: Mapping[str, WeightFactors]

    @property
    def quantized_layers(self) -> list[str]:
        """Every layer that has retrain layers, in the order of the activation groups."""
        return [name for act in self.activations for name in act.consumers]

    def activation_of(self, layer: str) -> ActivationFactors:
        """The activation group that quantizes ``layer``'s input."""
        for act in self.activations:
            if layer in act.consumers:
                return act
        raise KeyError(layer)


def with_context(exc: AmctError, prefix: str) -> AmctError:
    """The same kind of error with ``prefix`` (file and layer) in front of its message."""
    try:
        return type(exc)(f"{prefix}: {exc}")
    except TypeError:  # error classes with more constructor arguments
        return ConfigError(f"{prefix}: {exc}")


# -- reading the factors ------------------------------------------------------------------------------------
def _float32(value: float) -> float:
    return float(np.float32(value))


def _clips(weights: Weights, act: caffe_pb2.LayerParameter, where: str) -> tuple[float, float]:
    """The ``ActivationQAT``'s clips after ClipCheck and ``fixed_min`` (float32 values)."""
    blobs = weights.get(act.name)
    if not blobs:
        raise RecordError(
            f"Layer '{act.name}' of {where} has no clip values (clip_max/clip_min blobs) in the caffemodel: "
            "its clips are initialised by IFMR on the first forward. Run the retrain model forward/train "
            "before saving (e.g. solver.step/solve, or net.forward() then net.save()) and pass the "
            "caffemodel saved after that."
        )
    if len(blobs) != 2 or any(b.size != 1 for b in blobs):
        shapes = ", ".join(str(tuple(b.shape)) for b in blobs)
        raise ModelFormatError(
            f"Layer '{act.name}' of {where} has blobs of shapes {shapes} in the caffemodel; an ActivationQAT "
            "has two blobs of shape (1,) (clip_max, clip_min). Give the caffemodel trained from this model."
        )
    p = act.retrain_data_quant_param
    stored_max = blobs[0].reshape(-1)[:1].astype(np.float32)
    stored_min = blobs[1].reshape(-1)[:1].astype(np.float32)
    result = clip_check(stored_max, stored_min, np.array([p.clip_max], np.float32),
                        np.array([p.clip_min], np.float32))
    cmax = float(result.clip_max.reshape(-1)[0])
    cmin = float(result.clip_min.reshape(-1)[0])
    stored = (float(blobs[0].reshape(-1)[0]), float(blobs[1].reshape(-1)[0]))
    # ClipCheck runs on every forward of the retrain layer, so the saved model computes what the retrain net
    # does. A correction below half a quantization step (typically a clip_min the last solver update left a
    # hair above 0) changes nothing worth a warning.
    if (cmax, cmin) != stored and not all(np.isnan(v) for v in stored):
        half_step = (cmax - cmin) / 255 / 2
        moved = max(abs(cmax - stored[0]), abs(cmin - stored[1]))
        level = logging.WARNING if not moved <= half_step else logging.DEBUG
        LOGGER.log(
            level,
            "Layer '%s' of %s: the stored clips (clip_max %.9g, clip_min %.9g) fail AMCT's ClipCheck "
            "(clip_max > clip_min, clip_max >= 0, clip_min <= 0); using clip_max %.9g, clip_min %.9g as the "
            "retrain layer does.", act.name, where, stored[0], stored[1], cmax, cmin,
        )
    if p.fixed_min:
        cmin = 0.0
    return cmax, cmin


def _activation_consumers(
    graph: Graph, act: caffe_pb2.LayerParameter, where: str
) -> list[tuple[caffe_pb2.LayerParameter, caffe_pb2.LayerParameter | None]]:
    """``(quantized layer, its WeightQAT or None)`` for every reader of the ``ActivationQAT``'s output."""
    out: list[tuple[caffe_pb2.LayerParameter, caffe_pb2.LayerParameter | None]] = []
    for reader, _ in graph.consumers(act.name, 0):
        if reader.type == WEIGHT_QAT:
            readers = [layer for layer, _ in graph.consumers(reader.name, 0)]
            if len(readers) != 1 or readers[0].type == WEIGHT_QAT or len(readers[0].bottom) != 1:
                names = ", ".join(f"'{r.name}'" for r in readers) or "none"
                raise ModelFormatError(
                    f"WeightQAT '{reader.name}' of {where} must be read by exactly one one-input layer (the "
                    f"layer whose weights it quantizes), but is read by {names}. Give the retrain model "
                    "written by create_quant_retrain_model."
                )
            out.append((readers[0], reader))
        elif reader.type in WEIGHTLESS_QUANT_TYPES and len(reader.bottom) == 1:
            p = reader.pooling_param
            if p.pool != caffe_pb2.PoolingParameter.AVE or p.global_pooling:
                raise ModelFormatError(
                    f"Pooling '{reader.name}' of {where} reads the output of ActivationQAT '{act.name}' but "
                    "is not a non-global AVE pooling, the only pooling QAT quantizes. Give the retrain model "
                    "written by create_quant_retrain_model."
                )
            out.append((reader, None))
        else:
            raise ModelFormatError(
                f"Layer '{reader.name}' ({reader.type}) of {where} reads the output of ActivationQAT "
                f"'{act.name}', which only WeightQAT layers and AVE Pooling may read. Give the retrain model "
                "written by create_quant_retrain_model (or make the layer read "
                f"'{act.bottom[0] if act.bottom else '?'}')."
            )
    return out


def _weight_factors(
    graph: Graph, weights: Weights, layer: caffe_pb2.LayerParameter, wts: caffe_pb2.LayerParameter, where: str
) -> WeightFactors:
    p = wts.retrain_weight_quant_param
    if layer.type not in WEIGHT_CHANNEL_AXIS:
        raise ModelFormatError(
            f"WeightQAT '{wts.name}' of {where} feeds layer '{layer.name}' of type {layer.type}; only "
            f"{', '.join(sorted(WEIGHT_CHANNEL_AXIS))} layers have quantized weights."
        )
    if p.layer_type and p.layer_type != layer.type:
        raise ModelFormatError(
            f"WeightQAT '{wts.name}' of {where} says layer_type '{p.layer_type}' but feeds the {layer.type} "
            f"layer '{layer.name}'. Give the retrain model written by create_quant_retrain_model."
        )
    shared = wts.param[0].name if wts.param else ""
    if not shared or not layer.param or layer.param[0].name != shared:
        raise ModelFormatError(
            f"Layer '{layer.name}' of {where} does not share its weight with WeightQAT '{wts.name}' "
            f"(param name '{shared}'); the retrain model was edited. Give the retrain model written by "
            "create_quant_retrain_model."
        )
    blobs = weights.get(wts.name)
    if not blobs or len(blobs) != 2:
        raise ModelFormatError(
            f"WeightQAT '{wts.name}' of {where} has {len(blobs) if blobs else 0} blob(s) in the caffemodel; "
            "it needs two (the fake-quantized weight and the float shadow weight). Give the caffemodel "
            "trained from this retrain model."
        )
    shadow = np.asarray(blobs[1], dtype=np.float32)
    own = weights.get(layer.name)
    if own and tuple(own[0].shape) != tuple(shadow.shape):
        raise ModelFormatError(
            f"Layer '{layer.name}' of {where}: its weight has shape {tuple(own[0].shape)} but the shadow "
            f"weight of WeightQAT '{wts.name}' has shape {tuple(shadow.shape)}; give the caffemodel trained "
            "from this retrain model."
        )
    channel_wise = bool(p.channel_wise)
    if channel_wise and layer.type == "InnerProduct":
        raise ConfigError(
            f"WeightQAT '{wts.name}' of {where} asks for channel-wise scales of InnerProduct '{layer.name}'; "
            "InnerProduct weights are quantized per tensor. Set retrain_weight_quant_param { channel_wise: "
            "false }."
        )
    axis = weight_channel_axis(layer.type)
    if shadow.ndim < 2 or (channel_wise and shadow.ndim <= axis):
        raise ModelFormatError(
            f"WeightQAT '{wts.name}' of {where}: the shadow weight has shape {tuple(shadow.shape)}, not a "
            f"{layer.type} weight."
        )
    try:
        scale_w = arq_scale(shadow, channel_wise, axis).numpy().astype(np.float32)
    except AmctError as exc:
        raise with_context(exc, f"Layer '{layer.name}' of {where}") from exc
    return WeightFactors(layer.name, layer.type, wts.name, channel_wise, shadow, scale_w)


def read_retrain_factors(graph: Graph, weights: Weights, weights_file: str = "") -> RetrainFactors:
    """The factors of every quantized layer of a retrained net (see the module docstring); edits nothing.

    Args:
        graph: the TEST-phase view of the retrain model.
        weights: the trained weights by layer name (``model.weights.weights_from_net``).
        weights_file: the caffemodel path, for messages.

    Raises:
        ModelFormatError: the net holds no retrain layers ("not a retrain model"), or their wiring or blobs
            are not those ``create_quant_retrain_model`` writes.
        RecordError: an ``ActivationQAT`` has no clip blobs (the model was never run forward).
        ConfigError: a clip range gives an unusable scale (inf/NaN), or channel-wise InnerProduct scales.
    """
    where = model_where(graph.label, "retrain model", role="weights", file=weights_file)
    retrain = [layer for layer in graph if layer.type in RETRAIN_TYPES]
    if not retrain:
        raise ModelFormatError(
            f"Model '{graph.label}' has no ActivationQAT/WeightQAT layers in its TEST "
            "phase: it is not a retrain model. Give the modified_model_file written by "
            "create_quant_retrain_model and the caffemodel trained from it."
        )
    activations: list[ActivationFactors] = []
    factors: dict[str, WeightFactors] = {}
    fed: set[str] = set()
    for act in retrain:
        if act.type != ACTIVATION_QAT:
            continue
        if len(act.bottom) != 1 or len(act.top) != 1 or act.top[0] == act.bottom[0]:
            raise ModelFormatError(
                f"ActivationQAT '{act.name}' of {where} must read one bottom and write one other top."
            )
        pairs = _activation_consumers(graph, act, where)
        if not pairs:
            LOGGER.warning("ActivationQAT '%s' of %s feeds no quantized layer; it is removed.", act.name,
                           where)
        cmax, cmin = _clips(weights, act, where)
        p = act.retrain_data_quant_param
        try:
            s_d, o_d = ulq_record_factors(np.array([cmax], np.float32), np.array([cmin], np.float32),
                                          bool(p.fixed_min))
        except AmctError as exc:
            raise with_context(exc, f"Layer '{act.name}' of {where}") from exc
        consumers = []
        for layer, wts in pairs:
            consumers.append(layer.name)
            if wts is not None:
                fed.add(wts.name)
                factors[layer.name] = _weight_factors(graph, weights, layer, wts, where)
        objects = [n for n in p.object_layer.split("-") if n]
        if objects and objects != consumers:
            LOGGER.debug("ActivationQAT '%s': object_layer '%s' differs from the wiring %s; the wiring is "
                         "used.", act.name, p.object_layer, consumers)
        activations.append(ActivationFactors(
            act.name, act.bottom[0], tuple(consumers), _float32(cmax), _float32(cmin), bool(p.fixed_min),
            float(s_d.reshape(-1)[0]), int(o_d.reshape(-1)[0]),
        ))
    for wts in retrain:
        if wts.type == WEIGHT_QAT and wts.name not in fed:
            raise ModelFormatError(
                f"WeightQAT '{wts.name}' of {where} does not read the output of an ActivationQAT; weights "
                "are quantized only together with their layer's input. Give the retrain model written by "
                "create_quant_retrain_model."
            )
    return RetrainFactors(tuple(activations), factors)


# -- removing the retrain layers --------------------------------------------------------------------------
def _reset_weight_param(layer: caffe_pb2.LayerParameter) -> None:
    """``L``'s weight ``param`` back to the defaults (no sharing name); trailing default specs dropped."""
    if layer.param:
        layer.param[0].Clear()
    empty = caffe_pb2.ParamSpec()
    while layer.param and layer.param[-1] == empty:
        del layer.param[-1]


def remove_retrain_layers(graph: Graph, weights: Weights, factors: RetrainFactors) -> None:
    """Delete the retrain layers of ``graph`` and restore the quantized layers (module docstring).

    Edits ``graph`` and ``weights``: each quantized layer reads the ``ActivationQAT``'s bottom, its weight
    blob is the float shadow weight, its weight ``param`` has no sharing name; the ``ActivationQAT`` and
    ``WeightQAT`` layers and their blobs are gone.
    """
    for wf in factors.weights.values():
        graph.remove_layer(wf.retrain_layer, reconnect=True)
        weights.pop(wf.retrain_layer, None)
        layer = graph.layer(wf.layer)
        _reset_weight_param(layer)
        own = weights.get(wf.layer)
        weights[wf.layer] = [wf.shadow] + (list(own[1:]) if own else [])
    for act in factors.activations:
        graph.remove_layer(act.layer, reconnect=True)
        weights.pop(act.layer, None)
    leftover = [layer.name for layer in graph if layer.type in RETRAIN_TYPES]
    if leftover:  # pragma: no cover - read_retrain_factors rejects such nets
        raise ModelFormatError(f"Retrain layers {leftover} of '{graph.path}' could not be removed.")


def fold_batch_norms(graph: Graph, weights: Weights) -> list[BNFold]:
    """Fold every Convolution/Deconvolution + BatchNorm (+ Scale) of the TEST-phase ``graph``
    (``fuse_bn.fuse_bn_one_phase``)."""
    return fuse_bn_one_phase(graph, weights)
