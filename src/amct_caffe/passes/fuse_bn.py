"""Fold BatchNorm (and the Scale that follows it) into the Convolution/Deconvolution before it
(docs/amct-reference.md §2.2).

AMCT applies this fusion before it inserts the QAT retrain layers, so QAT trains the folded convolution
(docs/decisions.md row 2), and again when it saves quantized models. The math, per output channel ``c``,
computed in float64 and stored as float32:

* Caffe's BatchNorm blobs are ``[mean_sum, var_sum, factor]``: ``mean = mean_sum * s``,
  ``var = var_sum * s`` with ``s = 0 if factor == 0 else 1 / factor`` (``BatchNormLayer::Forward_cpu``);
  ``eps`` is ``batch_norm_param.eps`` (default 1e-5);
* Scale's blobs are ``[gamma]`` or ``[gamma, beta]`` (``bias_term``); no Scale means gamma 1, beta 0;
* ``k_c = gamma_c / sqrt(var_c + eps)``; ``W'[c] = W[c] * k_c``; ``b'_c = (b_c - mean_c) * k_c + beta_c``
  (``b_c = 0`` when the convolution had no bias; the folded layer gets ``bias_term: true``);
* Deconvolution weights are ``[in, out/group, kh, kw]``: the output channel is weight axis 1;
* PTQ also folds into InnerProduct (``axis: 1``, no ``transpose``; weight ``[out, in]``), as AMCT's fusion
  table (AMCT reference §2.2) lists for PTQ; QAT folds into the convolutions only.

The pattern: a Convolution or Deconvolution with one bottom and one top whose output value is read by a
BatchNorm only; then, if the BatchNorm's output value is read by a one-bottom Scale only (``axis: 1``,
``num_axes: 1``), that Scale is folded too. The layers may be in place or not. The BatchNorm and Scale
layers are removed; when they were not in place the convolution's top takes the name of the last folded
layer's top, so every layer downstream keeps its bottoms.

Choices (beyond AMCT's documented ``Conv + BatchNorm + Scale`` pattern):

* A BatchNorm without a Scale after it is folded as well (gamma 1, beta 0): the fold is exact, and a float
  BatchNorm after a quantized convolution would rescale its quantized output channel by channel.
* ``use_global_stats`` is not looked at: the stored statistics are folded whether it is unset, true or
  false. A training net normally leaves it unset (batch statistics in TRAIN); AMCT folds before QAT all the
  same, and the folded convolution is what trains, so its inference is what training sees.
* Skipped (logged at DEBUG with the reason): grouped Deconvolution, a convolution whose ``axis`` is not 1,
  blobs missing from the caffemodel or of a shape that does not match the channels, a pre-BatchNorm value
  that another layer also reads, and wiring that differs between the TRAIN and TEST phases of the net.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from amct_caffe.log import get_logger
from amct_caffe.model.batchnorm import global_statistics
from amct_caffe.model.graph import Graph
from amct_caffe.model.phase import TEST, TRAIN, filter_net
from amct_caffe.model.weights import Weights
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("passes.fuse_bn")

#: Layer types a BatchNorm (+ Scale) after them is folded into (QAT; PTQ adds InnerProduct: AMCT reference
#: §2.2).
FOLD_TARGET_TYPES = ("Convolution", "Deconvolution")
#: Every layer type the fold supports.
FOLDABLE_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
NO_BATCH_NORM = "no BatchNorm reads its output"


@dataclass(frozen=True)
class BNFold:
    """One fold: the convolution and the BatchNorm and (optional) Scale folded into it."""

    conv: str
    batch_norm: str
    scale: str | None


def phase_views(graph: Graph) -> list[Graph]:
    """The TRAIN and TEST views of the net (``model.phase.filter_net``), when any layer has phase rules.

    An empty list when no layer has ``include``/``exclude`` rules: the net is the same in both phases.
    """
    if not any(layer.include or layer.exclude for layer in graph):
        return []
    path = graph.path
    return [Graph(filter_net(graph.net, phase, path=path), path=path) for phase in (TRAIN, TEST)]


def _match(graph: Graph, conv_name: str) -> tuple[BNFold | None, str]:
    """The BatchNorm(+Scale) pattern after ``conv_name`` in ``graph`` (topology only), or None and why not."""
    conv = graph.layer(conv_name)
    if len(conv.bottom) != 1 or len(conv.top) != 1:
        return None, (f"it has {len(conv.bottom)} bottoms and {len(conv.top)} tops (the fold needs one of "
                      "each)")
    if conv.top[0] == conv.bottom[0]:
        return None, "it is computed in place"
    readers = [layer for layer, _ in graph.consumers(conv_name, 0)]
    if not any(layer.type == "BatchNorm" for layer in readers):
        return None, NO_BATCH_NORM
    if len(readers) != 1:
        names = ", ".join(f"'{layer.name}'" for layer in readers)
        return None, (f"its output is read by several layers ({names}); the others must keep seeing the "
                      "value before BatchNorm")
    bn = readers[0]
    if len(bn.bottom) != 1 or len(bn.top) != 1:
        return None, f"BatchNorm '{bn.name}' does not have exactly one bottom and one top"
    scale = None
    bn_readers = graph.consumers(bn.name, 0)
    if len(bn_readers) == 1 and bn_readers[0][0].type == "Scale":
        candidate = bn_readers[0][0]
        p = candidate.scale_param
        if len(candidate.bottom) == 1 and len(candidate.top) == 1 and p.axis == 1 and p.num_axes == 1:
            scale = candidate.name
        else:
            LOGGER.debug("Scale '%s' after BatchNorm '%s' is not folded: it needs one bottom, one top, "
                         "axis 1 and num_axes 1.", candidate.name, bn.name)
    return BNFold(conv_name, bn.name, scale), ""


def _same_rules(*layers: caffe_pb2.LayerParameter) -> bool:
    first = layers[0]
    return all(list(layer.include) == list(first.include) and list(layer.exclude) == list(first.exclude)
               for layer in layers[1:])


def _check_phases(fold: BNFold, graph: Graph, views: Sequence[Graph]) -> str:
    """Why the fold's wiring differs between the phase views ('' when it is the same in each)."""
    members = [graph.layer(fold.conv), graph.layer(fold.batch_norm)]
    if fold.scale is not None:
        members.append(graph.layer(fold.scale))
    if not _same_rules(*members):
        return "the convolution, BatchNorm and Scale have different include/exclude phase rules"
    for view in views:
        if fold.conv not in view:
            continue
        phase = caffe_pb2.Phase.Name(view.net.state.phase)
        seen, why = _match(view, fold.conv)
        if seen is None:
            return f"in the {phase} phase {why}"
        if seen != fold:
            return f"the layers after it differ in the {phase} phase"
    return ""


def _vector(arrays: list[np.ndarray], index: int, channels: int) -> np.ndarray | None:
    if index >= len(arrays) or arrays[index].size != channels:
        return None
    return arrays[index].reshape(-1).astype(np.float64)


def _fold_values(
    graph: Graph, weights: Weights, fold: BNFold
) -> tuple[np.ndarray, np.ndarray, str] | tuple[None, None, str]:
    """The folded (weight, bias) as float32, or (None, None, why) when the blobs do not allow it."""
    conv = graph.layer(fold.conv)
    why = _unfoldable_params(conv)
    if why:
        return None, None, why
    bias_term = _has_bias(conv)
    conv_blobs = weights.get(fold.conv, [])
    if not conv_blobs:
        return None, None, "the caffemodel has no weights for it"
    if len(conv_blobs) != (2 if bias_term else 1):
        return None, None, (f"it has {len(conv_blobs)} blob(s) in the caffemodel but bias_term "
                            f"{str(bias_term).lower()}")
    weight = conv_blobs[0].astype(np.float64)
    axis = 1 if conv.type == "Deconvolution" else 0
    if weight.ndim < 2:
        return None, None, f"its weight has shape {weight.shape}"
    channels = weight.shape[axis]
    bias = _vector(conv_blobs, 1, channels) if bias_term else np.zeros(channels)
    if bias is None:
        return None, None, f"its bias does not have {channels} values"

    bn = graph.layer(fold.batch_norm)
    bn_blobs = weights.get(fold.batch_norm, [])
    if len(bn_blobs) != 3:
        return None, None, (f"BatchNorm '{fold.batch_norm}' has {len(bn_blobs)} blob(s) in the caffemodel "
                            "(needs 3)")
    mean_sum, var_sum = _vector(bn_blobs, 0, channels), _vector(bn_blobs, 1, channels)
    if mean_sum is None or var_sum is None or bn_blobs[2].size != 1:
        shapes = ", ".join(str(tuple(b.shape)) for b in bn_blobs)
        return None, None, (f"BatchNorm '{fold.batch_norm}' blobs have shapes {shapes}; folding needs "
                            f"[{channels}], [{channels}], [1]")
    mean, var = global_statistics(mean_sum, var_sum, bn_blobs[2])
    eps = float(np.float32(bn.batch_norm_param.eps))

    gamma, beta = np.ones(channels), np.zeros(channels)
    if fold.scale is not None:
        scale = graph.layer(fold.scale)
        scale_blobs = weights.get(fold.scale, [])
        expected = 2 if scale.scale_param.bias_term else 1
        if len(scale_blobs) != expected:
            return None, None, (f"Scale '{fold.scale}' has {len(scale_blobs)} blob(s) in the caffemodel but "
                                f"bias_term {str(scale.scale_param.bias_term).lower()}")
        gamma_v = _vector(scale_blobs, 0, channels)
        beta_v = _vector(scale_blobs, 1, channels) if expected == 2 else beta
        if gamma_v is None or beta_v is None:
            shapes = ", ".join(str(tuple(b.shape)) for b in scale_blobs)
            return None, None, f"Scale '{fold.scale}' blobs have shapes {shapes}; folding needs [{channels}]"
        gamma, beta = gamma_v, beta_v

    k = gamma / np.sqrt(var + eps)
    view = [1] * weight.ndim
    view[axis] = channels
    new_weight = weight * k.reshape(view)
    new_bias = (bias - mean) * k + beta
    return new_weight.astype(np.float32), new_bias.astype(np.float32), ""


def _unfoldable_params(layer: caffe_pb2.LayerParameter) -> str:
    """Why the layer's own parameters rule a fold out ('' when they allow it)."""
    if layer.type == "InnerProduct":
        p = layer.inner_product_param
        if p.axis != 1:
            return f"its inner_product_param axis is {p.axis} (BatchNorm normalises axis 1)"
        if p.transpose:
            return "it has transpose: true (its weight is [in, out])"
        return ""
    cp = layer.convolution_param
    if cp.axis != 1:
        return f"its convolution_param axis is {cp.axis} (BatchNorm normalises axis 1)"
    if layer.type == "Deconvolution" and cp.group != 1:
        return f"it is a Deconvolution with group {cp.group} (grouped deconvolution is not folded)"
    return ""


def _has_bias(layer: caffe_pb2.LayerParameter) -> bool:
    if layer.type == "InnerProduct":
        return bool(layer.inner_product_param.bias_term)
    return bool(layer.convolution_param.bias_term)


def _set_bias_term(layer: caffe_pb2.LayerParameter) -> None:
    if layer.type == "InnerProduct":
        layer.inner_product_param.bias_term = True
    else:
        layer.convolution_param.bias_term = True


def find_bn_folds(
    graph: Graph,
    weights: Weights,
    targets: Sequence[str] = FOLD_TARGET_TYPES,
    skip: Collection[str] = (),
) -> list[tuple[BNFold, np.ndarray, np.ndarray]]:
    """Every fold that applies in ``graph`` with its folded weight and bias; the others are logged (DEBUG).

    ``targets``: the layer types folded into (a subset of ``FOLDABLE_TYPES``); ``skip``: layer names whose
    BatchNorm is left alone (PTQ's ``skip_fusion_layers``, the record's ``skip_fusion``).
    """
    unknown = set(targets) - set(FOLDABLE_TYPES)
    if unknown:
        raise ValueError(f"find_bn_folds: cannot fold into {sorted(unknown)}")
    views = phase_views(graph)
    found = []
    for conv in list(graph):
        if conv.type not in targets:
            continue
        if conv.name in skip:
            if _match(graph, conv.name)[0] is not None:
                LOGGER.debug("%s '%s': BatchNorm not folded (fusion skipped for this layer).", conv.type,
                             conv.name)
            continue
        fold, why = _match(graph, conv.name)
        if fold is None:
            if why != NO_BATCH_NORM:
                LOGGER.debug("%s '%s': BatchNorm not folded: %s.", conv.type, conv.name, why)
            continue
        why = _check_phases(fold, graph, views)
        weight = bias = None
        if not why:
            weight, bias, why = _fold_values(graph, weights, fold)
        if why or weight is None or bias is None:
            LOGGER.debug("%s '%s': BatchNorm '%s' not folded: %s.", conv.type, conv.name, fold.batch_norm,
                         why)
            continue
        if not _renamable(graph, fold):
            LOGGER.debug("%s '%s': BatchNorm '%s' not folded: the name of the folded output is used by "
                         "another layer between them.", conv.type, conv.name, fold.batch_norm)
            continue
        found.append((fold, weight, bias))
    return found


def _last_top(graph: Graph, fold: BNFold) -> str:
    return graph.layer(fold.scale or fold.batch_norm).top[0]


def _renamable(graph: Graph, fold: BNFold) -> bool:
    """True when no layer between the convolution and the last folded layer reads or writes the name the
    convolution's top takes (it would see the convolution's output after the fold)."""
    conv = graph.layer(fold.conv)
    final = _last_top(graph, fold)
    if final == conv.top[0]:
        return True
    members = {fold.conv, fold.batch_norm, fold.scale}
    start, end = graph.index(fold.conv), graph.index(fold.scale or fold.batch_norm)
    for layer in graph.layers[start + 1:end]:
        if layer.name not in members and (final in layer.bottom or final in layer.top):
            return False
    return True


def fuse_bn(
    graph: Graph,
    weights: Weights,
    targets: Sequence[str] = FOLD_TARGET_TYPES,
    skip: Collection[str] = (),
) -> list[BNFold]:
    """Fold every Convolution/Deconvolution + BatchNorm (+ Scale) of ``graph`` (see the module docstring).

    ``targets`` adds InnerProduct for PTQ (the same math, the weight ``[out, in]``: output channel on axis
    0); ``skip`` names layers left unfolded (see :func:`find_bn_folds`).

    Edits ``graph`` (BatchNorm/Scale layers removed, the convolution gets ``bias_term: true`` and, when the
    folded layers were not in place, the last one's top name) and ``weights`` (the convolution's blobs
    become ``[W', b']``; the BatchNorm/Scale entries are removed).

    Returns:
        The folds made, in file order.
    """
    folds = find_bn_folds(graph, weights, targets, skip)
    for fold, weight, bias in folds:
        conv = graph.layer(fold.conv)
        final = _last_top(graph, fold)
        old_top = conv.top[0]
        had_bias = _has_bias(conv)
        _set_bias_term(conv)
        if not had_bias and fold.scale is not None:
            _adopt_bias_spec(conv, graph.layer(fold.scale))
        for name in (fold.scale, fold.batch_norm):
            if name is not None:
                graph.remove_layer(name, reconnect=False)
                weights.pop(name, None)
        if final != old_top:
            graph.rename_top(fold.conv, old_top, final, update_readers=False)
        weights[fold.conv] = [weight, bias]
        LOGGER.debug("Folded BatchNorm '%s'%s into %s '%s'.", fold.batch_norm,
                     f" and Scale '{fold.scale}'" if fold.scale else "", conv.type, fold.conv)
    if folds:
        LOGGER.info("Folded %d BatchNorm layer(s) into the convolutions before them.", len(folds))
    return [fold for fold, _, _ in folds]


def fuse_bn_one_phase(
    graph: Graph,
    weights: Weights,
    targets: Sequence[str] = FOLD_TARGET_TYPES,
    skip: Collection[str] = (),
) -> list[BNFold]:
    """:func:`fuse_bn` on a graph that is one phase's view already (``model.phase.filter_net``).

    Its include/exclude rules are set aside while the folds are found (``fuse_bn`` would otherwise compare
    the wiring against a TRAIN view of a TEST-only net) and put back afterwards on the layers that remain.
    """
    rules: dict[str, tuple[list[caffe_pb2.NetStateRule], list[caffe_pb2.NetStateRule]]] = {}
    for layer in graph:
        if layer.include or layer.exclude:
            rules[layer.name] = ([_copy_rule(r) for r in layer.include],
                                 [_copy_rule(r) for r in layer.exclude])
            del layer.include[:]
            del layer.exclude[:]
    try:
        folds = fuse_bn(graph, weights, targets, skip)
    finally:
        for name, (include, exclude) in rules.items():
            if name in graph:
                layer = graph.layer(name)
                layer.include.extend(include)
                layer.exclude.extend(exclude)
    return folds


def _copy_rule(rule: caffe_pb2.NetStateRule) -> caffe_pb2.NetStateRule:
    out = caffe_pb2.NetStateRule()
    out.CopyFrom(rule)
    return out


def _adopt_bias_spec(conv: caffe_pb2.LayerParameter, scale: caffe_pb2.LayerParameter) -> None:
    """Give a convolution's new bias the learning-rate settings of the Scale's beta, which it replaces."""
    if len(scale.param) < 2 or len(conv.param) > 1:
        return
    if not conv.param:
        conv.param.add()
    spec = conv.param.add()
    spec.CopyFrom(scale.param[1])
    spec.ClearField("name")
