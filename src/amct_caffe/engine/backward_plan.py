"""Which layers, bottoms and parameters a backward pass computes: Caffe's ``Net::Init`` rules.

Caffe decides this once, when the net is built, and ``net.backward()`` (pycaffe) follows it, so the same rules
give the same diffs:

- a layer needs backward when one of its bottoms needs it or one of its parameters has ``lr_mult != 0``; its
  tops then need backward; a net input (a top of a layer without bottoms and parameters) does not;
- ``propagate_down`` on a layer overrides, per bottom, whether that bottom gets a diff;
- walking back from the losses, a layer that no loss depends on computes nothing (a deploy net without a loss
  layer computes no diffs at all), unless the net sets ``force_backward: true``;
- ``force_backward`` makes every layer compute diffs for every bottom it allows (a loss layer's labels,
  bottom 1, never get one) and for every parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amct_caffe.engine.layers.base import Layer
from amct_caffe.proto.caffe_pb2 import LayerParameter


@dataclass(frozen=True)
class BackwardPlan:
    """What a backward pass computes, per layer index.

    Attributes:
        layer: the layer runs its backward at all.
        bottom: per bottom, the layer writes that bottom's diff.
        param: per parameter blob, the layer accumulates that parameter's diff.
    """

    layer: tuple[bool, ...]
    bottom: tuple[tuple[bool, ...], ...]
    param: tuple[tuple[bool, ...], ...]


def _allows_force_backward(layer: Layer, bottom_index: int) -> bool:
    # Caffe's LossLayer::AllowForceBackward: labels (bottom 1) never take a diff
    return not (layer.loss_layer and bottom_index == 1)


def _lr_mult(lp: LayerParameter, index: int) -> float:
    if index < len(lp.param) and lp.param[index].HasField("lr_mult"):
        return float(lp.param[index].lr_mult)
    return 1.0


def plan_backward(
    layers: Sequence[Layer],
    bottoms: Sequence[Sequence[str]],
    tops: Sequence[Sequence[str]],
    loss_tops: set[tuple[int, int]],
    force_backward: bool,
) -> BackwardPlan:
    """Caffe's backward decisions for a net (see the module docstring).

    Args:
        layers: the net's layers in order; each layer's ``param`` (its ``LayerParameter``) gives
            ``propagate_down`` and the ``lr_mult`` of its parameters.
        bottoms, tops: each layer's bottom and top blob names.
        loss_tops: ``(layer index, top index)`` of every top with a non-zero loss weight.
        force_backward: the net's ``force_backward`` flag.

    Returns:
        The per-layer :class:`BackwardPlan`.
    """
    blob_needs: dict[str, bool] = {}
    layer_need: list[bool] = []
    bottom_need: list[list[bool]] = []
    param_need: list[list[bool]] = []
    for layer, layer_bottoms, layer_tops in zip(layers, bottoms, tops):
        lp = layer.param
        needs = []
        for j, name in enumerate(layer_bottoms):
            need = blob_needs.get(name, False)
            if len(lp.propagate_down) > 0:
                need = bool(lp.propagate_down[j]) if j < len(lp.propagate_down) else need
            needs.append(need)
        params = [_lr_mult(lp, p) != 0.0 for p in range(len(layer.blobs))]
        need_layer = any(blob_needs.get(name, False) for name in layer_bottoms) or any(params)
        for name in layer_tops:
            blob_needs[name] = blob_needs.get(name, False) or need_layer
        layer_need.append(need_layer)
        bottom_need.append(needs)
        param_need.append(params)
    under_loss: set[str] = set()
    skip: set[str] = set()
    for i in range(len(layers) - 1, -1, -1):
        contributes = any((i, t) in loss_tops or name in under_loss for t, name in enumerate(tops[i]))
        skip_down = all(name in skip for name in tops[i]) if tops[i] else True
        if layer_need[i] and skip_down:
            layer_need[i] = False
            bottom_need[i] = [False] * len(bottom_need[i])
        if not contributes:
            layer_need[i] = False
        for j, name in enumerate(bottoms[i]):
            if contributes:
                under_loss.add(name)
            else:
                bottom_need[i][j] = False
            if not bottom_need[i][j]:
                skip.add(name)
    if force_backward:
        for i, layer in enumerate(layers):
            layer_need[i] = True
            bottom_need[i] = [need or _allows_force_backward(layer, j)
                              for j, need in enumerate(bottom_need[i])]
            param_need[i] = [True] * len(param_need[i])
    else:
        param_need = [[need and layer_need[i] for need in params] for i, params in enumerate(param_need)]
    return BackwardPlan(
        layer=tuple(layer_need),
        bottom=tuple(tuple(b) for b in bottom_need),
        param=tuple(tuple(p) for p in param_need),
    )
