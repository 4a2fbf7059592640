"""Caffe's update rules (``ComputeUpdateValue`` of each solver type) and the steps around them.

Per learnable blob, Caffe's ``SGDSolver::ApplyUpdate`` runs, in this order:

1. ``Normalize``: the accumulated gradient times ``1 / iter_size``;
2. ``Regularize``: ``weight_decay * decay_mult`` times the blob (L2) or its sign (L1) added to the gradient;
3. ``ComputeUpdateValue``: the type's rule with ``local_rate = rate * lr_mult`` (a table below);
4. ``blob -= update``.

(Before all blobs, ``ClipGradients`` scales every gradient when their joint L2 norm exceeds
``clip_gradients``.) A rule sees one blob's regularised gradient and its history tensors and returns the
value subtracted from the blob; AdaDelta and Adam keep two history tensors per blob, the others one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from amct_caffe.engine.solver.float32 import c_pow, f32
from amct_caffe.errors import ModelFormatError
from amct_caffe.log import get_logger
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.solver")

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlobStep:
    """What a rule needs to update one learnable blob at one iteration."""

    param: caffe_pb2.SolverParameter
    #: this blob's history tensors (one, or two for AdaDelta and Adam), updated in place by the rule.
    history: Sequence[Tensor]
    #: ``rate * lr_mult``.
    local_rate: float
    #: the iteration being applied (Adam's bias correction uses ``iter + 1``).
    iteration: int


def sgd(diff: Tensor, s: BlobStep) -> Tensor:
    """SGD with momentum: ``h = momentum * h + local_rate * g``; the update is ``h``."""
    (h,) = s.history
    h.mul_(float(f32(s.param.momentum))).add_(diff, alpha=s.local_rate)
    return h


def nesterov(diff: Tensor, s: BlobStep) -> Tensor:
    """Nesterov as Caffe writes it: ``h' = momentum * h + local_rate * g``; update
    ``(1 + momentum) * h' - momentum * h``."""
    (h,) = s.history
    momentum = float(f32(s.param.momentum))
    previous = h.clone()
    h.mul_(momentum).add_(diff, alpha=s.local_rate)
    return h.mul(float(f32(1.0) + f32(momentum))).sub_(previous, alpha=momentum)


def adagrad(diff: Tensor, s: BlobStep) -> Tensor:
    """AdaGrad: ``h += g^2``; update ``local_rate * g / (sqrt(h) + delta)``."""
    (h,) = s.history
    h.add_(diff * diff)
    return diff / (h.sqrt() + float(f32(s.param.delta))) * s.local_rate


def rmsprop(diff: Tensor, s: BlobStep) -> Tensor:
    """RMSProp: ``h = (1 - rms_decay) * g^2 + rms_decay * h``; update
    ``local_rate * g / (sqrt(h) + delta)``."""
    (h,) = s.history
    decay = f32(s.param.rms_decay)
    h.mul_(float(decay)).add_(diff * diff, alpha=float(f32(1.0) - decay))
    return diff / (h.sqrt() + float(f32(s.param.delta))) * s.local_rate


def adadelta(diff: Tensor, s: BlobStep) -> Tensor:
    """AdaDelta in Caffe's form (``momentum`` is the decay, ``delta`` the epsilon; history ``E[g^2]``, then
    ``E[dx^2]``)::

        E[g^2]  = (1 - momentum) g^2 + momentum E[g^2]
        dx      = g * sqrt((E[dx^2] + delta) / (E[g^2] + delta))
        E[dx^2] = (1 - momentum) dx^2 + momentum E[dx^2]
        update  = local_rate * dx
    """
    hg, hu = s.history
    momentum = f32(s.param.momentum)
    delta = float(f32(s.param.delta))
    one_minus = float(f32(1.0) - momentum)
    hg.mul_(float(momentum)).add_(diff * diff, alpha=one_minus)
    dx = diff * ((hu + delta) / (hg + delta)).sqrt()
    hu.mul_(float(momentum)).add_(dx * dx, alpha=one_minus)
    return dx.mul_(s.local_rate)


def adam(diff: Tensor, s: BlobStep) -> Tensor:
    """Adam with Caffe's bias correction (history ``m``, then ``v``; ``t = iter + 1``)::

        m      = beta1 m + (1 - beta1) g          (beta1 = momentum)
        v      = beta2 v + (1 - beta2) g^2        (beta2 = momentum2)
        update = local_rate * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + delta)

    ``delta`` (epsilon) is added outside the square root and is not bias-corrected, as in Caffe.
    """
    m, v = s.history
    beta1, beta2 = f32(s.param.momentum), f32(s.param.momentum2)
    t = s.iteration + 1
    correction = f32(math.sqrt(1.0 - c_pow(float(beta2), t)) / (1.0 - c_pow(float(beta1), t)))
    m.mul_(float(beta1)).add_(diff, alpha=float(f32(1.0) - beta1))
    v.mul_(float(beta2)).add_(diff * diff, alpha=float(f32(1.0) - beta2))
    step = m / (v.sqrt() + float(f32(s.param.delta)))
    return step.mul_(float(f32(s.local_rate) * correction))


# -- constructor checks (Caffe's constructor_sanity_check) --------------------------------------------------
def _accept(p: caffe_pb2.SolverParameter, where: str) -> None:
    """No extra requirement."""


def _no_momentum(rule: str) -> Callable[[caffe_pb2.SolverParameter, str], None]:
    def check(p: caffe_pb2.SolverParameter, where: str) -> None:
        if p.momentum != 0:
            raise ModelFormatError(
                f"{where}: momentum cannot be used with {rule} (momentum is {p.momentum}); remove it."
            )

    return check


def _check_rmsprop(p: caffe_pb2.SolverParameter, where: str) -> None:
    _no_momentum("RMSProp")(p, where)
    if not 0 <= p.rms_decay < 1:
        raise ModelFormatError(f"{where}: rms_decay should lie between 0 and 1 (got {p.rms_decay}).")


@dataclass(frozen=True)
class UpdateRule:
    """A solver type: its Caffe ``type`` string, its rule, history tensors per blob, and its field checks."""

    type_name: str
    compute: Callable[[Tensor, BlobStep], Tensor]
    history_sets: int = 1
    check: Callable[[caffe_pb2.SolverParameter, str], None] = _accept


#: Caffe's solver types by ``type`` string.
UPDATE_RULES: dict[str, UpdateRule] = {
    rule.type_name: rule
    for rule in (
        UpdateRule("SGD", sgd),
        UpdateRule("Nesterov", nesterov),
        UpdateRule("AdaGrad", adagrad, check=_no_momentum("AdaGrad")),
        UpdateRule("RMSProp", rmsprop, check=_check_rmsprop),
        UpdateRule("AdaDelta", adadelta, history_sets=2),
        UpdateRule("Adam", adam, history_sets=2),
    )
}


# -- the steps around the rule ---------------------------------------------------------------------------
def clip_gradients(diffs: Sequence[Tensor | None], clip_gradients: float) -> None:
    """Caffe's ``ClipGradients``: when the L2 norm of all gradients exceeds ``clip_gradients`` (>= 0), scale
    every gradient by ``clip_gradients / norm`` (in place)."""
    clip = float(f32(clip_gradients))
    present = [d for d in diffs if d is not None]
    if clip < 0 or not present:
        return
    l2norm = float(torch.sqrt(torch.stack([d.pow(2).sum().cpu() for d in present]).sum()))
    if l2norm > clip:
        scale = float(f32(clip) / f32(l2norm))
        LOGGER.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale factor %g",
                    l2norm, clip, scale)
        for d in present:
            d.mul_(scale)


def regularize(diff: Tensor, data: Tensor, local_decay: float, regularization_type: str) -> None:
    """Caffe's ``Regularize`` (in place): ``diff += local_decay * data`` (L2) or ``* sign(data)`` (L1)."""
    if not local_decay:
        return
    if regularization_type == "L2":
        diff.add_(data.detach(), alpha=local_decay)
    else:
        diff.add_(torch.sign(data.detach()), alpha=local_decay)


def update_blob(rule: UpdateRule, param: caffe_pb2.SolverParameter, data: Tensor, diff: Tensor | None,
                history: Sequence[Tensor], rate: float, lr_mult: float, decay_mult: float,
                iteration: int) -> None:
    """Steps 1-4 of the module docstring for one learnable blob (under ``torch.no_grad``).

    ``diff`` is the (clipped) accumulated gradient, None when none arrived (then zeros). A blob with
    ``lr_mult`` 0 is left unchanged: every rule multiplies its step by ``local_rate = 0``.
    """
    if lr_mult == 0.0:
        return
    if diff is None:
        diff = torch.zeros_like(data)
    if param.iter_size != 1:
        diff.mul_(float(f32(1.0) / f32(param.iter_size)))
    regularize(diff, data, float(f32(param.weight_decay) * f32(decay_mult)), param.regularization_type)
    local_rate = float(f32(rate) * f32(lr_mult))
    data.sub_(rule.compute(diff, BlobStep(param, history, local_rate, iteration)))
