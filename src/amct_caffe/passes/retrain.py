"""Insert the QAT retrain layers (``ActivationQAT``, ``WeightQAT``) for the layers a QAT config enables.

The wiring is docs/decisions.md row 2, made concrete in its §5:

* For each input value ``x`` read by enabled layers (Convolution, Deconvolution, InnerProduct, AVE Pooling):
  one ``ActivationQAT`` named ``<c1>_act_retrain`` (``c1``: the first enabled reader in file order), bottom
  ``x``, top ``<c1>_act_retrain``, placed just before ``c1``; every enabled reader of ``x`` reads its top.
  ``retrain_data_quant_param { clip_max clip_min ifmr_init with_offset: true fixed_min object_layer:
  "<c1>-<c2>-..." record_file_path }`` and two ``param { lr_mult: 1 decay_mult: 0 }`` (the clip bounds are
  range parameters: weight decay would shrink the range whatever the data). With configured clips the
  caffemodel holds its blobs ``[clip_max], [clip_min]`` and ``ifmr_init`` is false; without, it holds no
  blobs for the layer and ``ifmr_init: true`` lets the engine layer initialise them by IFMR.
* For each enabled layer ``L`` with weights: one ``WeightQAT`` named ``<L>_wts_retrain`` between the
  ``ActivationQAT`` and ``L`` (bottom: the ``ActivationQAT`` top; top ``<L>_wts_retrain``, which ``L``
  reads). ``retrain_weight_quant_param { cout cin h w channel_wise layer_type with_offset: false }``;
  ``h``/``w`` are left out for InnerProduct. For Deconvolution, whose weight is ``[in, out, kh, kw]``,
  ``cout``/``cin`` are the weight's axes 1/0 (the output channel is what ARQ scales per channel). Blobs
  ``[fake-quantized weight, float shadow weight]``; params ``{ name: "<L>_wts_retrain_w" lr_mult: 0
  decay_mult: 0 }`` (blob 0 is rewritten from the shadow at every forward) and ``{ lr_mult, decay_mult }``
  of ``L``'s weight (default 1, 1) for the shadow. ``L``'s weight param becomes ``{ name:
  "<L>_wts_retrain_w" lr_mult: 0 decay_mult: 0 }``, so Caffe's parameter sharing makes ``L`` convolve the
  fake-quantized weight; ``L``'s other params (bias) are unchanged, and ``L``'s weight blob in the
  caffemodel is the fake-quantized weight too (the shared blob has one value).

Phases: the net the user trains holds both phases, so the layers are inserted into the full prototxt. When
some layers have ``include``/``exclude`` rules, the readers of each value are found in the TRAIN and in the
TEST view; the plan must be the same in both (the common case: per-phase data layers writing the same blob
names, everything after them shared), otherwise :class:`ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from amct_caffe.errors import AmctError, ConfigError, ModelFormatError, WeightShapeError, model_where
from amct_caffe.log import get_logger
from amct_caffe.model.graph import Graph
from amct_caffe.model.layer_types import ACTIVATION_QAT
from amct_caffe.model.weights import Weights
from amct_caffe.passes.fuse_bn import phase_views
from amct_caffe.passes.quant_insert import readers_by_value
from amct_caffe.passes.quantizable import check_not_quantized
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.arq import arq_fake_quant, weight_channel_axis
from amct_caffe.quant.config import WEIGHTLESS_TYPES, LayerRetrainConfig

LOGGER = get_logger("passes.retrain")

ACT_SUFFIX = "_act_retrain"
WTS_SUFFIX = "_wts_retrain"
SHARED_WEIGHT_SUFFIX = "_wts_retrain_w"


@dataclass(frozen=True)
class ActivationGroup:
    """The enabled layers that read one value, and the ``ActivationQAT`` they share.

    Attributes:
        name: the ``ActivationQAT`` layer's name, which is also its top (``<first consumer>_act_retrain``).
        bottom: the blob the consumers read.
        consumers: the enabled readers of that value, in file order (``object_layer`` joins them with ``-``).
    """

    name: str
    bottom: str
    consumers: tuple[str, ...]

    @property
    def object_layer(self) -> str:
        return "-".join(self.consumers)


def act_layer_name(layer: str) -> str:
    """Name (and top) of the ``ActivationQAT`` in front of ``layer`` when it is the first consumer."""
    return layer + ACT_SUFFIX


def wts_layer_name(layer: str) -> str:
    """Name (and top) of the ``WeightQAT`` of ``layer``."""
    return layer + WTS_SUFFIX


def shared_weight_name(layer: str) -> str:
    """The ``param { name }`` that ties ``layer``'s weight to its ``WeightQAT``'s blob 0."""
    return layer + SHARED_WEIGHT_SUFFIX


# -- planning ----------------------------------------------------------------------------------------------
def _groups_in(graph: Graph, enabled: Sequence[str]) -> list[ActivationGroup]:
    """Group the enabled layers of ``graph`` by the value they read (producer layer and top, or blob name)."""
    return [ActivationGroup(act_layer_name(readers[0]), blob, readers)
            for blob, readers in readers_by_value(graph, enabled)]


def plan_activation_groups(
    graph: Graph, config: Mapping[str, LayerRetrainConfig], config_file: str = ""
) -> list[ActivationGroup]:
    """The ``ActivationQAT`` layers to insert for the enabled layers of ``config``, in file order.

    Raises:
        ConfigError: an enabled layer is missing from the net, defined twice, not a one-bottom layer, only
            present in one phase, or its readers' wiring differs between the TRAIN and TEST phases.
    """
    where = model_where(graph.label, role="config", file=config_file)
    enabled = [name for name, cfg in config.items() if cfg.retrain_enable]
    for name in enabled:
        if name not in graph:
            raise ConfigError(f"The QAT config enables layer '{name}', which {where} does not have; "
                              "regenerate the config with create_quant_retrain_config for this model.")
        layer = graph.layer(name)
        if len(layer.bottom) != 1 or len(layer.top) != 1 or layer.top[0] == layer.bottom[0]:
            raise ConfigError(f"Layer '{name}' of {where} must read one bottom and write one other top to be "
                              "retrained; set retrain_enable to false for it.")
    order = {name: i for i, name in enumerate(layer.name for layer in graph)}
    enabled.sort(key=order.__getitem__)
    views = phase_views(graph)
    if not views:
        return _groups_in(graph, enabled)
    plans = []
    for view in views:
        phase = caffe_pb2.Phase.Name(view.net.state.phase)
        missing = [name for name in enabled if name not in view]
        if missing:
            raise ConfigError(
                f"Layer '{missing[0]}' of {where} is not in the {phase} phase (include/exclude rules), but "
                "QAT trains the retrain layers in TRAIN and evaluates them in TEST; remove its phase rules "
                "or set retrain_enable to false for it."
            )
        plans.append((phase, {g.consumers: g for g in _groups_in(view, enabled)}))
    (phase_a, plan_a), (phase_b, plan_b) = plans
    if plan_a != plan_b:
        differing = sorted(set(plan_a) ^ set(plan_b), key=lambda names: order[names[0]])[0]
        group_a = next(g for g in plan_a.values() if differing[0] in g.consumers)
        group_b = next(g for g in plan_b.values() if differing[0] in g.consumers)
        raise ConfigError(
            f"Layer '{differing[0]}' of {where} reads its input with different wiring in the two phases: "
            f"'{group_a.bottom}' shared with {list(group_a.consumers)} in {phase_a}, '{group_b.bottom}' "
            f"shared with {list(group_b.consumers)} in {phase_b}. The retrain layers are inserted once for "
            "both phases; make the layers between the data layers and the quantized layers "
            "phase-independent, or set retrain_enable to false for the layers involved."
        )
    return sorted(plan_a.values(), key=lambda g: order[g.consumers[0]])


def _group_data_settings(
    group: ActivationGroup, config: Mapping[str, LayerRetrainConfig], where: str
) -> tuple[float | None, float | None, bool]:
    """``(clip_max, clip_min, fixed_min)`` shared by the group's layers; they must agree."""
    first = config[group.consumers[0]]
    settings = (first.clip_max, first.clip_min, bool(first.fixed_min))
    for name in group.consumers[1:]:
        cfg = config[name]
        other = (cfg.clip_max, cfg.clip_min, bool(cfg.fixed_min))
        if other != settings:
            raise ConfigError(
                f"Layers '{first.name}' and '{name}' of {where} read the same input '{group.bottom}' and "
                "share one activation retrain layer, but their retrain_data_config differ (clip_max, "
                f"clip_min, fixed_min: {settings} vs {other}); give both layers the same values."
            )
    return settings


# -- building the inserted layers ---------------------------------------------------------------------------
def activation_qat_layer(
    group: ActivationGroup,
    clip_max: float | None,
    clip_min: float | None,
    fixed_min: bool,
    record_file: str,
) -> caffe_pb2.LayerParameter:
    """The ``ActivationQAT`` layer of ``group`` (without blobs)."""
    layer = caffe_pb2.LayerParameter(name=group.name, type=ACTIVATION_QAT)
    layer.bottom.append(group.bottom)
    layer.top.append(group.name)
    for _ in range(2):
        spec = layer.param.add()
        spec.lr_mult = 1.0
        spec.decay_mult = 0.0
    p = layer.retrain_data_quant_param
    if clip_max is not None and clip_min is not None:
        p.clip_max = clip_max
        p.clip_min = clip_min
        p.ifmr_init = False
    else:
        p.ifmr_init = True
    p.with_offset = True
    p.fixed_min = fixed_min
    p.object_layer = group.object_layer
    p.record_file_path = record_file
    return layer


def weight_qat_layer(
    target: caffe_pb2.LayerParameter, bottom: str, weight_shape: Sequence[int], channel_wise: bool
) -> caffe_pb2.LayerParameter:
    """The ``WeightQAT`` layer of ``target`` reading ``bottom`` (without blobs)."""
    name = wts_layer_name(target.name)
    layer = caffe_pb2.LayerParameter(name=name, type="WeightQAT")
    layer.bottom.append(bottom)
    layer.top.append(name)
    shared = layer.param.add()
    shared.name = shared_weight_name(target.name)
    shared.lr_mult = 0.0
    shared.decay_mult = 0.0
    shadow = layer.param.add()
    own = target.param[0] if target.param else caffe_pb2.ParamSpec()
    shadow.lr_mult = own.lr_mult
    shadow.decay_mult = own.decay_mult
    p = layer.retrain_weight_quant_param
    if target.type == "Deconvolution":
        p.cout, p.cin = int(weight_shape[1]), int(weight_shape[0])
    else:
        p.cout, p.cin = int(weight_shape[0]), int(weight_shape[1])
    if target.type != "InnerProduct":
        p.h, p.w = int(weight_shape[2]), int(weight_shape[3])
    p.channel_wise = channel_wise
    p.layer_type = target.type
    p.with_offset = False
    return layer


def _checked_weight(
    graph: Graph, weights: Weights, layer: caffe_pb2.LayerParameter, weights_file: str
) -> np.ndarray:
    """The layer's weight blob from ``weights``, checked against the layer's parameters."""
    arrays = weights.get(layer.name)
    source = f"caffemodel '{weights_file}'" if weights_file else "the caffemodel"
    if not arrays:
        raise ModelFormatError(
            f"Layer '{layer.name}' of model '{graph.path}' has no weights in {source}; give the caffemodel "
            "trained with this prototxt."
        )
    weight = arrays[0]
    if layer.type == "InnerProduct":
        rank, channels = 2, layer.inner_product_param.num_output
        out_axis = 0
    else:
        rank, channels = 4, layer.convolution_param.num_output
        out_axis = weight_channel_axis(layer.type)
    if weight.ndim != rank or weight.shape[out_axis] != channels:
        raise WeightShapeError(
            f"Layer '{layer.name}' of model '{graph.path}': its weight in {source} has shape "
            f"{tuple(weight.shape)}, which does not fit num_output {channels} (a {rank}-D weight with "
            f"{channels} output channels on axis {out_axis}); give the caffemodel trained with this prototxt."
        )
    return weight


def _check_free_names(graph: Graph, names: Sequence[str], where: str) -> None:
    blobs = {b for layer in graph for b in list(layer.bottom) + list(layer.top)}
    params = {spec.name for layer in graph for spec in layer.param if spec.name}
    for name in names:
        if name in graph or name in blobs or name in params:
            raise ConfigError(
                f"{where[0].upper()}{where[1:]} already uses the name '{name}', which the retrain layers "
                "need (a model cannot be prepared for QAT twice); rename that layer or blob."
            )


def _check_weight_sharing(graph: Graph, layer: caffe_pb2.LayerParameter, where: str) -> None:
    if not layer.param or not layer.param[0].name:
        return
    shared = layer.param[0].name
    for other in graph:
        if other.name != layer.name and any(spec.name == shared for spec in other.param):
            raise ConfigError(
                f"Layer '{layer.name}' of {where} shares its weight (param name '{shared}') with layer "
                f"'{other.name}'; QAT keeps one float shadow weight per layer and cannot retrain shared "
                "weights. Set retrain_enable to false for it."
            )


def _with_layer(exc: AmctError, where: str) -> AmctError:
    """The same kind of error with the layer and files named in front of its message."""
    try:
        return type(exc)(f"{where}: {exc}")
    except TypeError:  # an error class with more constructor arguments
        return ModelFormatError(f"{where}: {exc}")


# -- the pass ------------------------------------------------------------------------------------------------
def insert_retrain_layers(
    graph: Graph,
    weights: Weights,
    config: Mapping[str, LayerRetrainConfig],
    record_file: str | os.PathLike[str],
    *,
    config_file: str = "",
    weights_file: str = "",
) -> list[ActivationGroup]:
    """Insert ``ActivationQAT``/``WeightQAT`` layers for every layer ``config`` enables (module docstring).

    Edits ``graph`` and ``weights``: ``WeightQAT`` blobs ``[ARQ fake-quant of L's weight, L's weight]``
    (ARQ per ``channel_wise`` on the output-channel axis), ``L``'s weight blob replaced by the fake-quantized
    one, and ``[clip_max], [clip_min]`` blobs for ``ActivationQAT`` layers with configured clips.

    Args:
        graph: the net (all phases), BatchNorm already folded.
        weights: its weights by layer name.
        config: the QAT config (layer name -> settings).
        record_file: the record path written into every ``ActivationQAT`` (``record_file_path``).
        config_file, weights_file: for messages.

    Returns:
        The activation groups inserted, in file order.

    Raises:
        ConfigError: the net already holds AMCT layers, a retrain layer's name is taken, two layers sharing
            an input disagree on their activation settings, an enabled layer shares its weights, or the
            wiring is phase dependent (see :func:`plan_activation_groups`).
        ModelFormatError: an enabled layer's weights are missing from the caffemodel or do not fit it.
    """
    check_not_quantized(graph)
    where = model_where(graph.label, role="config", file=config_file)
    groups = plan_activation_groups(graph, config, config_file)
    record_file = os.fspath(record_file)

    # Check everything before the first edit, so that an error leaves graph and weights untouched.
    new_names, settings = [], []
    fake: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}  # layer: (weight, ARQ fake-quant, channel_wise)
    for group in groups:
        settings.append(_group_data_settings(group, config, where))
        new_names.append(group.name)
        for name in group.consumers:
            layer = graph.layer(name)
            if layer.type in WEIGHTLESS_TYPES:
                continue
            _check_weight_sharing(graph, layer, where)
            weight = _checked_weight(graph, weights, layer, weights_file)
            channel_wise = bool(config[name].channel_wise)
            try:
                quantized, _ = arq_fake_quant(weight, channel_wise, weight_channel_axis(layer.type))
            except AmctError as exc:
                raise _with_layer(exc, f"Layer '{name}' of {where}, weights from '{weights_file}'") from exc
            fake[name] = (weight, quantized.numpy(), channel_wise)
            new_names += [wts_layer_name(name), shared_weight_name(name)]
    if len(set(new_names)) != len(new_names):
        duplicate = next(n for n in new_names if new_names.count(n) > 1)
        raise ConfigError(f"Two retrain layers of {where} would both be named '{duplicate}'; rename one of "
                          "the layers whose names end in that way.")
    _check_free_names(graph, new_names, where)

    for group, (clip_max, clip_min, fixed_min) in zip(groups, settings):
        act = activation_qat_layer(group, clip_max, clip_min, fixed_min, record_file)
        graph.insert_before(group.consumers[0], act)
        if clip_max is not None and clip_min is not None:
            weights[group.name] = [np.array([clip_max], np.float32), np.array([clip_min], np.float32)]
        for name in group.consumers:
            layer = graph.layer(name)
            if name not in fake:
                graph.replace_bottom(name, group.bottom, group.name)
                continue
            weight, w_hat, channel_wise = fake[name]
            wts = weight_qat_layer(layer, group.name, weight.shape, channel_wise)
            graph.insert_before(name, wts)
            graph.replace_bottom(name, group.bottom, wts.name)
            layer = graph.layer(name)
            if not layer.param:
                layer.param.add()
            spec = layer.param[0]
            spec.Clear()
            spec.name = shared_weight_name(name)
            spec.lr_mult = 0.0
            spec.decay_mult = 0.0
            weights[wts.name] = [w_hat, np.array(weight, dtype=np.float32)]
            weights[name] = [w_hat.copy()] + list(weights[name][1:])
        LOGGER.debug("Inserted '%s' (ifmr_init %s, fixed_min %s) for %s.", group.name, clip_max is None,
                     fixed_min, ", ".join(f"'{n}'" for n in group.consumers))
    LOGGER.info("Inserted %d activation and %d weight retrain layer(s).", len(groups), len(fake))
    return groups
