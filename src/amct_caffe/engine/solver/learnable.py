"""Caffe's learnable parameters of a net: which blobs a solver updates, with which multipliers, and how
test nets share them.

Learnable blobs are Caffe's ``learnable_params``: every blob of every layer, in layer order, except a blob
that shares (``param { name }``) a blob seen earlier, which is updated once through its owner. The owner's
``lr_mult``/``decay_mult`` come from the first ``ParamSpec`` of the sharing group that sets them (later ones
must agree, as Caffe CHECKs); missing ``ParamSpec`` fields mean 1. A blob whose ``lr_mult`` is 0 is never
changed and needs no gradient: gradients are turned on only for blobs some layer trains (Caffe's
``param_propagate_down``) and never turned off (``WeightQAT`` enables it on its ``lr_mult: 0`` blob 0 to
route the gradient to its shadow weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.proto import caffe_pb2

Tensor = torch.Tensor


@dataclass
class LearnableParam:
    """One of Caffe's ``learnable_params``: a blob owned by ``(layer, index)`` of the train net.

    ``users`` are every ``(layer, index)`` holding it (the owner first, then the layers sharing it by
    ``param { name }``); ``need_grad`` is true when any of them has its own ``lr_mult != 0`` (Caffe then
    computes the blob's gradient).
    """

    layer: int
    index: int
    name: str
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    has_lr_mult: bool = False
    has_decay_mult: bool = False
    need_grad: bool = True
    users: list[tuple[int, int]] = field(default_factory=list)


def _shared_mult(owner_value: float | None, spec: caffe_pb2.ParamSpec, what: str, layer: str, owner: str
                 ) -> float | None:
    """The multiplier ``what`` of a sharing group after one more ``ParamSpec``: unchanged when the spec does
    not set it, the spec's value when the group had none yet.

    Raises:
        ModelFormatError: the spec sets a value different from the group's.
    """
    if not spec.HasField(what):
        return owner_value
    value = float(getattr(spec, what))
    if owner_value is not None and value != owner_value:
        raise ModelFormatError(
            f"Shared param '{spec.name}' has mismatched {what}: layer '{layer}' gives {value}, layer "
            f"'{owner}' (or an earlier sharer) {owner_value}; give every layer sharing it the same {what}."
        )
    return value


def _join_sharer(owner: LearnableParam, spec: caffe_pb2.ParamSpec, li: int, bi: int, layer: str,
                 owner_layer: str) -> None:
    """Caffe's ``AppendParam`` for a blob that shares ``owner``'s (``param { name }``)."""
    owner.users.append((li, bi))
    owner.need_grad = owner.need_grad or float(spec.lr_mult) != 0.0
    lr = _shared_mult(owner.lr_mult if owner.has_lr_mult else None, spec, "lr_mult", layer, owner_layer)
    decay = _shared_mult(owner.decay_mult if owner.has_decay_mult else None, spec, "decay_mult", layer,
                         owner_layer)
    if lr is not None:
        owner.lr_mult, owner.has_lr_mult = lr, True
    if decay is not None:
        owner.decay_mult, owner.has_decay_mult = decay, True


def learnable_params(net: Net) -> list[LearnableParam]:
    """Caffe's ``Net::AppendParam`` over the whole net: the learnable blobs with their multipliers.

    Raises:
        ModelFormatError: layers sharing a named blob give different ``lr_mult`` or ``decay_mult``.
    """
    params: list[LearnableParam] = []
    by_name: dict[str, int] = {}
    for li, layer in enumerate(net.engine_layers):
        specs = layer.param.param
        for bi in range(len(layer.blobs)):
            spec = specs[bi] if bi < len(specs) else caffe_pb2.ParamSpec()
            if spec.name and spec.name in by_name:
                owner = params[by_name[spec.name]]
                _join_sharer(owner, spec, li, bi, layer.name, net.engine_layers[owner.layer].name)
                continue
            if spec.name:
                by_name[spec.name] = len(params)
            params.append(LearnableParam(
                li, bi, spec.name or f"{layer.name}/{bi}", float(spec.lr_mult), float(spec.decay_mult),
                spec.HasField("lr_mult"), spec.HasField("decay_mult"), float(spec.lr_mult) != 0.0, [(li, bi)],
            ))
    return params


def enable_param_grads(net: Net, params: Sequence[LearnableParam] | None = None) -> None:
    """Make every blob that some layer trains (own ``lr_mult != 0``) require grad, as Caffe's
    ``param_propagate_down``; other blobs are left as they are."""
    for p in params if params is not None else learnable_params(net):
        if not p.need_grad:
            continue
        for li, bi in p.users:
            t = net.engine_layers[li].blobs[bi]
            if t.is_leaf and not t.requires_grad:
                t.requires_grad_(True)


def share_trained_layers(target: Net, source: Net) -> None:
    """Caffe's ``Net::ShareTrainedLayersWith``: every layer of ``target`` named like a layer of ``source``
    uses ``source``'s blob tensors (the objects themselves, so later updates are seen), and is told so
    (``Layer.blobs_shared``) to share whatever state goes with them.

    Raises:
        ModelFormatError: a layer's blob count or a blob's shape differs between the two nets.
    """
    theirs = {layer.name: layer for layer in source.engine_layers}
    for layer in target.engine_layers:
        src = theirs.get(layer.name)
        if src is None:
            continue
        if len(src.blobs) != len(layer.blobs):
            raise ModelFormatError(
                f"Incompatible number of blobs for layer '{layer.name}': {len(src.blobs)} in the train net, "
                f"{len(layer.blobs)} in the test net; the TRAIN and TEST versions of a layer must have the "
                "same parameters."
            )
        for i, blob in enumerate(src.blobs):
            if tuple(blob.shape) != tuple(layer.blobs[i].shape):
                raise ModelFormatError(
                    f"Cannot share param {i} weights from layer '{layer.name}'; shape mismatch. Source param "
                    f"shape is {tuple(blob.shape)}; target param shape is {tuple(layer.blobs[i].shape)}."
                )
            layer.blobs[i] = blob
        layer.blobs_shared(src)


def blob_of(net: Net, lp: LearnableParam) -> Tensor:
    """The owner's tensor of a learnable blob."""
    return net.engine_layers[lp.layer].blobs[lp.index]


def accumulated_gradient(net: Net, lp: LearnableParam) -> Tensor | None:
    """The blob's accumulated gradient (summed over the distinct tensors of its users), or None when Caffe
    computes none for it (no user has ``lr_mult != 0``) or none arrived."""
    if not lp.need_grad:
        return None
    total: Tensor | None = None
    seen: set[int] = set()
    owner = blob_of(net, lp)
    for li, bi in lp.users:
        t = net.engine_layers[li].blobs[bi]
        if id(t) in seen or t.grad is None:
            continue
        seen.add(id(t))
        g = t.grad.detach().reshape(owner.shape)
        total = g.clone() if total is None else total.add_(g)
    return total


def clear_param_grads(net: Net, params: Sequence[LearnableParam]) -> None:
    """Caffe's ``ClearParamDiffs``, and gradients re-enabled on blobs ``copy_from`` may have replaced."""
    for layer in net.engine_layers:
        for blob in layer.blobs:
            if blob.is_leaf:
                blob.grad = None
    enable_param_grads(net, params)
