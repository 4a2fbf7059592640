"""Loss and evaluation layers: Accuracy, SoftmaxWithLoss, EuclideanLoss, SigmoidCrossEntropyLoss.

They follow BVLC caffe-master (the commit AMCT patches). Loss tops are 0-axis scalars (Caffe reshapes them
to ``vector<int>(0)``), so they are 0-dim tensors here; the net adds ``loss_weight × top`` to its loss, with
``loss_weight`` defaulting to 1 for top 0 of a loss layer (``loss_layer = True``).

Where Caffe's hand-written backward differs from autograd of the forward (the ``FLT_MIN`` clamp in
SoftmaxWithLoss, the stable formula and Caffe's sigmoid in SigmoidCrossEntropyLoss) a
``torch.autograd.Function`` gives Caffe's gradient. Labels never receive a gradient (Caffe refuses to
backpropagate into them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.proto import caffe_pb2

Norm = caffe_pb2.LossParameter
FLT_MIN = float(np.finfo(np.float32).tiny)


def _count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    total = 1
    for d in list(shape)[start:end]:
        total *= int(d)
    return total


def _check_top_range(layer: Layer, low: int, high: int) -> None:
    n = len(layer.param.top)
    if not low <= n <= high:
        raise layer.error(f"needs {low} to {high} top(s), has {n}.")


def _labels(layer: Layer, label: Tensor, num_classes: int, ignore: int | None) -> tuple[Tensor, Tensor]:
    """Integer labels (C++ ``static_cast<int>``: truncation toward zero) and the mask of non-ignored ones.

    Caffe only ``DCHECK``s the label range (reading out of bounds in release builds); we raise instead.
    Ignored positions get label 0 so that they can be gathered safely.
    """
    idx = label.detach().to(torch.int64)
    valid = torch.ones_like(idx, dtype=torch.bool) if ignore is None else idx != ignore
    bad = valid & ((idx < 0) | (idx >= num_classes))
    if bool(bad.any()):
        first = float(label.detach().reshape(-1)[bad.reshape(-1)][0])
        raise layer.error(
            f"label {first:g} is outside [0, {num_classes - 1}] for {num_classes} classes; fix the labels or "
            "set ignore_label for the positions to skip."
        )
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def _normalizer(mode: int, outer: int, inner: int, valid_count: Tensor) -> Tensor:
    """Caffe's ``get_normalizer``: FULL, VALID (non-ignored count), BATCH_SIZE or NONE, never below 1."""
    if mode == Norm.FULL:
        value = torch.tensor(float(outer * inner), device=valid_count.device)
    elif mode == Norm.VALID:
        value = valid_count.to(torch.float32)
    elif mode == Norm.BATCH_SIZE:
        value = torch.tensor(float(outer), device=valid_count.device)
    else:
        value = torch.tensor(1.0, device=valid_count.device)
    return torch.clamp(value.to(torch.float32), min=1.0)


def _normalization(layer: Layer, default: int) -> int:
    """Caffe's loss normalization: ``normalization`` if set, else the legacy ``normalize`` bool (VALID or
    BATCH_SIZE), else the layer's own default."""
    p = layer.param.loss_param
    mode: int
    if p.HasField("normalization"):
        mode = p.normalization
    elif p.HasField("normalize"):
        mode = Norm.VALID if p.normalize else Norm.BATCH_SIZE
    else:
        mode = default
    if mode not in (Norm.FULL, Norm.VALID, Norm.BATCH_SIZE, Norm.NONE):
        raise layer.error(f"unknown normalization mode {mode}; use FULL, VALID, BATCH_SIZE or NONE.")
    return mode


def _class_split(
    layer: Layer, shape: tuple[int, ...], axis_param: int, label: Tensor
) -> tuple[int, int, int]:
    """(outer, classes, inner) counts of predictions split at the class axis; one label per outer*inner."""
    axis = layer.canonical_axis(axis_param, len(shape))
    outer, classes, inner = _count(shape, 0, axis), shape[axis], _count(shape, axis + 1)
    if outer * inner != label.numel():
        raise layer.error(
            f"has {label.numel()} labels for {outer * inner} predictions (bottom shape {list(shape)}, "
            f"axis {axis}); e.g. for class axis 1 and predictions (N, C, H, W) give N*H*W labels in "
            "{0, ..., C-1}."
        )
    return outer, classes, inner


def _check_same_num(layer: Layer, a: Tensor, b: Tensor) -> None:
    # LossLayer::Reshape: the data and label must have the same first dimension.
    if a.dim() < 1 or b.dim() < 1 or a.shape[0] != b.shape[0]:
        raise layer.error(
            f"bottom shapes {list(a.shape)} and {list(b.shape)}: the data and label should have the same "
            "first dimension."
        )


# ------------------------------------------------------------------------------------------------------
@register("Accuracy")
class Accuracy(Layer):
    """Top-k classification accuracy over ``axis`` (default 1), skipping ``ignore_label``.

    Caffe-master's rule: a prediction is correct when fewer than ``top_k`` classes score *greater than or
    equal to* the true class, the true class itself excluded. So a tie with another class counts against
    the sample. (Older Caffe, and the SSD-based reference fork, sort ``(score, index)`` pairs instead, which
    gives ties to the higher class index; the two agree whenever scores are distinct.)

    Top 0 is the accuracy, a 0-axis scalar (0 when every label is ignored). An optional top 1 holds the
    per-class accuracy (shape ``[C]``; 0 for classes with no sample). Accuracy is not a loss and has no
    backward: its tops carry no gradient.
    """

    exact_bottoms = 2
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        _check_top_range(self, 1, 2)
        p = param.accuracy_param
        self.top_k = int(p.top_k)
        self.ignore = int(p.ignore_label) if p.HasField("ignore_label") else None

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x, label = bottoms[0].detach(), bottoms[1]
        shape = tuple(int(d) for d in x.shape)
        if label.numel() == 0 or self.top_k > x.numel() // label.numel():
            raise self.error(
                f"top_k {self.top_k} is larger than the number of classes; it must be less than or equal to "
                "the number of classes."
            )
        outer, classes, inner = _class_split(self, shape, self.param.accuracy_param.axis, label)
        scores = x.reshape(outer, classes, inner)
        idx, valid = _labels(self, label.reshape(outer, inner), classes, self.ignore)
        true_score = torch.gather(scores, 1, idx.unsqueeze(1))
        better = (scores >= true_score).sum(dim=1) - 1  # the true class counts itself
        correct = (better < self.top_k) & valid
        count = valid.sum().to(torch.float32)
        hits = correct.sum().to(torch.float32)
        accuracy = torch.where(count > 0, hits / torch.clamp(count, min=1.0), torch.zeros_like(hits))
        tops = [accuracy]
        if len(self.param.top) > 1:
            flat_idx = idx[valid]
            nums = torch.bincount(flat_idx, minlength=classes).to(torch.float32)
            per_hit = torch.bincount(idx[correct], minlength=classes).to(torch.float32)
            tops.append(torch.where(nums > 0, per_hit / torch.clamp(nums, min=1.0), torch.zeros_like(nums)))
        return tops


# ------------------------------------------------------------------------------------------------------
class _SoftmaxLossFn(torch.autograd.Function):
    """Softmax + multinomial logistic loss with Caffe's forward and backward.

    Input ``x`` is ``[outer, C, inner]``. Forward: ``-sum(log(max(p_true, FLT_MIN))) / normalizer`` over the
    non-ignored positions. Backward (Caffe's): ``(p - onehot) / normalizer`` at non-ignored positions, 0 at
    ignored ones, even where the FLT_MIN clamp was active. The probabilities (second output) get no gradient,
    as Caffe ignores the diff of the optional ``prob`` top.
    """

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, valid: Tensor, normalizer: Tensor) -> tuple[Tensor, Tensor]:
        prob = torch.softmax(x, dim=1)
        p_true = torch.gather(prob, 1, idx.unsqueeze(1)).squeeze(1)
        logs = torch.log(torch.clamp(p_true, min=FLT_MIN))
        loss = -torch.where(valid, logs, torch.zeros_like(logs)).sum() / normalizer
        ctx.save_for_backward(prob, idx, valid, normalizer)
        ctx.mark_non_differentiable(prob)
        return loss, prob

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_prob: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        prob, idx, valid, normalizer = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad = prob.clone()
        grad.scatter_add_(1, idx.unsqueeze(1), torch.full_like(prob[:, :1], -1.0))
        grad = grad * valid.unsqueeze(1).to(grad.dtype)
        return grad * (grad_loss / normalizer), None, None, None


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(Layer):
    """Softmax over ``softmax_param.axis`` (default 1) followed by the multinomial logistic loss.

    ``loss_param``: ``ignore_label`` skips positions; ``normalization`` is VALID by default (the count of
    non-ignored positions), FULL (all positions), BATCH_SIZE (``outer``) or NONE; the legacy ``normalize``
    bool, used only when ``normalization`` is unset, means VALID (true) or BATCH_SIZE (false). The normalizer
    is at least 1, so an all-ignored batch gives loss 0 instead of NaN. An optional second top holds the
    probabilities.
    """

    loss_layer = True
    exact_bottoms = 2
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        _check_top_range(self, 1, 2)
        p = param.loss_param
        self.ignore = int(p.ignore_label) if p.HasField("ignore_label") else None
        self.normalization = _normalization(self, Norm.VALID)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x, label = bottoms
        _check_same_num(self, x, label)
        shape = tuple(int(d) for d in x.shape)
        outer, classes, inner = _class_split(self, shape, self.param.softmax_param.axis, label)
        idx, valid = _labels(self, label.reshape(outer, inner), classes, self.ignore)
        normalizer = _normalizer(self.normalization, outer, inner, valid.sum())
        loss, prob = _SoftmaxLossFn.apply(x.reshape(outer, classes, inner), idx, valid, normalizer)
        tops = [loss]
        if len(self.param.top) > 1:
            tops.append(prob.reshape(shape))
        return tops


# ------------------------------------------------------------------------------------------------------
@register("EuclideanLoss")
class EuclideanLoss(Layer):
    """``sum((a - b)^2) / N / 2`` with ``N = a.shape[0]``; both bottoms get gradients (``±(a - b)/N``).

    The bottoms need the same first dimension and the same count per sample (their shapes may differ).
    Caffe divides by the legacy ``num()``, which refuses blobs of more than 4 axes; so do we.
    """

    loss_layer = True
    exact_bottoms = 2
    exact_tops = 1

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        a, b = bottoms
        _check_same_num(self, a, b)
        if a.numel() != b.numel():
            raise self.error(
                f"bottom shapes {list(a.shape)} and {list(b.shape)}: inputs must have the same dimension."
            )
        if a.dim() > 4:
            raise self.error(f"bottom 0 has {a.dim()} axes; EuclideanLoss (legacy num()) takes at most 4.")
        diff = a - b.reshape(a.shape)
        return [(diff * diff).sum() / float(a.shape[0]) / 2.0]


# ------------------------------------------------------------------------------------------------------
class _SigmoidCELossFn(torch.autograd.Function):
    """Caffe's stable sigmoid cross-entropy and its backward ``(sigmoid(x) - t) / normalizer``.

    Forward per element: ``-(x * (t - [x >= 0]) - log(1 + exp(x - 2 x [x >= 0])))``, summed over
    non-ignored elements. The backward uses Caffe's sigmoid ``0.5 tanh(0.5 x) + 0.5`` and zeroes ignored
    elements; the target gets no gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, valid: Tensor, normalizer: Tensor) -> Tensor:
        pos = (x >= 0).to(x.dtype)
        term = x * (target - pos) - torch.log(1.0 + torch.exp(x - 2.0 * x * pos))
        loss = -torch.where(valid, term, torch.zeros_like(term)).sum() / normalizer
        ctx.save_for_backward(x, target, valid, normalizer)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, target, valid, normalizer = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        sig = 0.5 * torch.tanh(0.5 * x) + 0.5
        grad = torch.where(valid, sig - target, torch.zeros_like(x))
        return grad * (grad_loss / normalizer), None, None, None


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(Layer):
    """Cross-entropy of ``sigmoid(bottom 0)`` against targets in bottom 1 (same count), Caffe's stable form.

    ``loss_param``: ``ignore_label`` skips elements whose target (truncated to int) equals it;
    ``normalization`` defaults to BATCH_SIZE here (caffe-master keeps the old divide-by-batch behaviour when
    neither ``normalization`` nor the legacy ``normalize`` is set; ``normalize: true`` means VALID).
    """

    loss_layer = True
    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.loss_param
        self.ignore = int(p.ignore_label) if p.HasField("ignore_label") else None
        self.normalization = _normalization(self, Norm.BATCH_SIZE)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x, target = bottoms
        _check_same_num(self, x, target)
        if x.numel() != target.numel():
            raise self.error(
                f"bottom shapes {list(x.shape)} and {list(target.shape)}: the inputs must have the same "
                "count."
            )
        t = target.detach().reshape(x.shape)
        if self.ignore is None:
            valid = torch.ones_like(t, dtype=torch.bool)
        else:
            valid = t.to(torch.int64) != self.ignore
        outer = int(x.shape[0])
        inner = _count(tuple(x.shape), 1)
        normalizer = _normalizer(self.normalization, outer, inner, valid.sum())
        return [_SigmoidCELossFn.apply(x, t, valid, normalizer)]
