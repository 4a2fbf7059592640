"""ULQ: AMCT's activation quantization with learnable clip bounds, used by ``ActivationQAT``
(docs/amct-reference.md §3.4-3.5).

Forward, per call, with ``cmax``/``cmin`` the layer's two blobs after ClipCheck (and ``cmin = 0`` when
``fixed_min``): ``s = (cmax - cmin) / 255``, ``o_ulq = round_away(cmin / s)`` (an integer <= 0), and

    y = round_even(clamp(x, s*o_ulq, s*(o_ulq + 255)) / s) * s

The clamp bounds are the grid-aligned versions of the clips. This equals the record form
``(clamp(round_even(x/s) + o_d, -128, 127) - o_d) * s`` with ``o_d = -o_ulq - 128``, i.e. the activation
factors that :func:`ulq_record_factors` gives and the saved ``Quant`` layer uses (whose rounding is
round_away, so the two can differ at exact .5 ties only). ``s``/``o`` come from
:func:`~amct_caffe.quant.numerics.data_scale_offset`, so the FLT_EPSILON rule and the ``cmin <= 0 <= cmax``
clamping are the same here as in the record.

Backward is AMCT's straight-through estimator: ``dx = dy`` inside the grid-aligned bounds, 0 outside, and
clip gradients summed over all elements with ``D(v) = (round_away(v/s) - v/s) / 255``:

* ``x > upper``:  ``dcmax += dy*(D(cmin) + 1)``, ``dcmin += -dy*D(cmin)``
* ``x < lower``:  ``dcmax += dy*D(cmin)``,       ``dcmin += dy*(1 - D(cmin))``
* otherwise:      ``dcmax += dy*D(x)``,          ``dcmin += -dy*D(x)``

These are the exact derivatives of the surrogate ``y = v + s*r``, ``v = clamp(x, cmin, cmax)``, with the
rounding residual ``r = round(v/s) - v/s`` held constant (``D(cmax) = D(cmin)`` because
``cmax/s - cmin/s = 255``). They are not the derivatives of the forward itself, which is piecewise
constant in the clips.

Implementation (docs/design.md, "QAT kernels"): the training forward (:func:`ulq_forward_train`) computes,
from the same quotient ``v / s`` as the output, each element's ``dcmax`` weight ``W`` (``D(x)`` inside,
``D(cmin) + 1`` above, ``D(cmin)`` below; stored as ``255 * W``) and the outside mask. The three cases then
fold into ``dcmax = sum(dy * W)`` and ``dcmin = sum_outside(dy) - dcmax`` (each element's ``dcmin`` weight
is ``-W``, plus 1 outside), so :func:`ulq_backward_saved` is a few reads of ``dy``. :class:`ULQFunction`
keeps ``x`` (usually held by another layer anyway) and computes ``W`` and the mask in its backward: keeping
them from the forward instead would add a float and a bool tensor per activation to the step's peak
memory. ``D``'s ``round_away`` is the forward's
``round_even`` corrected at exact .5 ties, the only values where they differ. With
``AMCT_CAFFE_COMPILE=1`` both directions run as fused kernels (:mod:`amct_caffe.quant.fused`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from amct_caffe.quant.fused import FUSED
from amct_caffe.quant.numerics import (
    DATA_SPAN,
    INT8_MIN,
    ArrayLike,
    Tensor,
    as_float_tensor,
    as_tensor,
    data_scale_offset,
    div_exact,
    memory_flat_views,
    round_away,
    where_ties_,
)


class ClipCheckResult(NamedTuple):
    """What :func:`clip_check` accepted: the clips to use now, and the new "previous good" values.

    In every branch the new previous values equal the accepted ones; both are returned to mirror AMCT's
    in/out parameters. ``flipped`` is True where ``cmax <= cmin`` (AMCT logs it).
    """

    clip_max: Tensor
    clip_min: Tensor
    clip_max_pre: Tensor
    clip_min_pre: Tensor
    flipped: Tensor


def clip_check(
    cmax: ArrayLike, cmin: ArrayLike, cmax_pre: ArrayLike, cmin_pre: ArrayLike
) -> ClipCheckResult:
    """AMCT's ClipCheck on learned clips against the previous good values (AMCT reference §3.4 step 2).

    * ``cmax <= cmin``: restore both from the previous values;
    * else ``cmax < 0``: restore ``cmax``; accept ``cmin`` (it becomes the new previous min);
    * else ``cmin > 0``: restore ``cmin``; accept ``cmax``;
    * else accept both.

    Elementwise on tensors (no host synchronisation); Python numbers become float32 tensors. NaN clips
    fail every comparison and are accepted, as in AMCT; the scale computation then rejects them.
    """
    cmax_t = as_float_tensor(cmax)
    cmin_t = as_tensor(cmin, like=cmax_t)
    cmax_pre_t = as_tensor(cmax_pre, like=cmax_t)
    cmin_pre_t = as_tensor(cmin_pre, like=cmax_t)
    flipped = cmax_t <= cmin_t
    restore_max = flipped | (cmax_t < 0)
    restore_min = flipped | (~restore_max & (cmin_t > 0))
    new_max = torch.where(restore_max, cmax_pre_t, cmax_t)
    new_min = torch.where(restore_min, cmin_pre_t, cmin_t)
    return ClipCheckResult(new_max, new_min, new_max.clone(), new_min.clone(), flipped)


def ulq_record_factors(cmax: ArrayLike, cmin: ArrayLike, fixed_min: bool = False) -> tuple[Tensor, Tensor]:
    """Record-form activation factors ``(s_d, o_d)`` of a ULQ layer
    (``scale_d``/``offset_d``, AMCT reference §8.1).

    ``fixed_min`` forces ``cmin = 0`` as the layer's forward does. Tensors of the clips' dtype.
    """
    cmax_t = as_float_tensor(cmax)
    cmin_t = torch.zeros_like(cmax_t) if fixed_min else as_tensor(cmin, like=cmax_t)
    return data_scale_offset(cmin_t, cmax_t)


def _grid(cmax: ArrayLike, cmin: ArrayLike, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s, o_ulq, lower, upper)`` in ``like``'s dtype/device: the scale, the integer grid offset and the
    grid-aligned clamp bounds ``s*o_ulq`` and ``s*(o_ulq + 255)``."""
    s, o_d = data_scale_offset(as_tensor(cmin, like=like), as_tensor(cmax, like=like))
    o_ulq = -o_d + INT8_MIN
    return s, o_ulq, s * o_ulq, s * (o_ulq + DATA_SPAN)


def ulq_forward(x: ArrayLike, cmax: ArrayLike, cmin: ArrayLike, fixed_min: bool = False) -> Tensor:
    """ULQ training forward ``round_even(clamp(x, lower, upper) / s) * s`` (see the module docstring).

    ``cmax``/``cmin`` are the layer's clip values after ClipCheck (tensors of shape [1] or numbers);
    ``fixed_min`` uses ``cmin = 0``. Not differentiable by autograd: use :class:`ULQFunction` to train
    (its forward is :func:`ulq_forward_train`, which gives the same output).
    """
    x = as_float_tensor(x)
    cmax_t = as_tensor(cmax, like=x)
    cmin_t = torch.zeros_like(cmax_t) if fixed_min else as_tensor(cmin, like=x)
    s, _, lower, upper = _grid(cmax_t, cmin_t, x)
    with torch.no_grad():
        # round_ is round_even (torch.round); in place on the fresh clamp result: one allocation
        return torch.clamp(x, lower, upper).div_(s).round_().mul_(s)


class UlqTrainForward(NamedTuple):
    """What :func:`ulq_forward_train` returns: the output and what :func:`ulq_backward_saved` needs.

    ``coeff`` holds ``255 * W`` per element, where ``W`` is the element's ``dcmax`` weight: ``D(x)`` inside
    the grid-aligned bounds, ``D(cmin) + 1`` above, ``D(cmin)`` below (module docstring). ``outside`` is
    True where ``x`` lies outside the bounds, or None when no element does. Shapes are the output's.
    """

    y: Tensor
    coeff: Tensor
    outside: Tensor | None


#: Block length of :func:`_dot`: blocks are summed with one BLAS dot product each, then added by torch's
#: pairwise summation, which keeps the float32 error near that of ``(a * b).sum()``.
DOT_BLOCK = 256


def _away_residual_at_tie(res: Tensor, _frac: Tensor, r: Tensor) -> Tensor:
    """``round_away(q) - q`` at a tie, from ``res = r - q`` and ``r = round_even(q)``: ``0.5 * sign(q)``,
    with ``q = r - res`` exactly."""
    return torch.sign(r - res).mul_(0.5)


def _mark_outside(x: Tensor, lower: Tensor, upper: Tensor, coeff: Tensor, d_cmin: Tensor) -> Tensor | None:
    """Set ``coeff`` to ``255*D(cmin) + 255`` above and ``255*D(cmin)`` below the bounds, in place; return
    the outside mask (None when no element is outside). On CPU one read of ``x`` first tells which of the
    two cases occur (after a ReLU nothing is below ``lower = 0``), and the mask passes of an absent case
    are skipped."""
    if x.numel() == 0:
        return None
    has_above = has_below = True
    if x.device.type == "cpu":
        lo, hi = torch.aminmax(x)
        has_above = not bool(hi <= upper)  # NaN: take the general path, which leaves NaN inside
        has_below = not bool(lo >= lower)
    outside: Tensor | None = None
    if has_above:
        outside = x > upper
        torch.where(outside, d_cmin + DATA_SPAN, coeff, out=coeff)
    if has_below:
        below = x < lower
        torch.where(below, d_cmin, coeff, out=coeff)
        outside = below if outside is None else outside.logical_or_(below)
    return outside


def ulq_forward_train(
    x: ArrayLike, cmax: ArrayLike, cmin: ArrayLike, fixed_min: bool = False
) -> UlqTrainForward:
    """ULQ's training forward: :func:`ulq_forward`'s output (bit-identical) and the per-element values of
    the straight-through backward (:class:`UlqTrainForward`), computed from the same quotient ``v / s``.

    With these the backward is a few reads of ``dy`` (:func:`ulq_backward_saved`).
    ``D(v)``'s ``round_away`` comes from the forward's ``round_even``, corrected at exact .5 ties, the only
    values where they differ. Arguments as :func:`ulq_forward`; with ``fixed_min`` the gradients are those
    of ``cmin = 0``.
    """
    y, coeff, outside = _train_terms(x, cmax, cmin, fixed_min, with_output=True)
    assert y is not None
    return UlqTrainForward(y, coeff, outside)


@torch.no_grad()
def _train_terms(
    x: ArrayLike, cmax: ArrayLike, cmin: ArrayLike, fixed_min: bool, with_output: bool
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """:func:`ulq_forward_train`'s ``(y, coeff, outside)``; ``y`` is None (not computed) unless
    ``with_output``: the backward needs only the other two."""
    x = as_float_tensor(x)
    cmax_t = as_tensor(cmax, like=x)
    cmin_t = torch.zeros_like(cmax_t) if fixed_min else as_tensor(cmin, like=x)
    s, _, lower, upper = _grid(cmax_t, cmin_t, x)
    q_cmin = torch.clamp(cmin_t, max=0.0) / s
    d_cmin = (round_away(q_cmin) - q_cmin).reshape(())
    fused = FUSED.ulq_forward(x, s, lower, upper, d_cmin + DATA_SPAN, d_cmin)
    if fused is not None:
        return fused[0] if with_output else None, fused[1], fused[2]
    q = torch.clamp(x, lower, upper).div_(s)
    r = torch.round(q)
    # r - q is exact (r and q are within a factor 2 of each other, or r is 0): D(v) up to the tie fix
    coeff = torch.sub(r, q, out=q)
    where_ties_(coeff, coeff, _away_residual_at_tie, r)
    return r.mul_(s) if with_output else None, coeff, _mark_outside(x, lower, upper, coeff, d_cmin)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` over all elements (same shape) in one read of each, without a product tensor."""
    flat = memory_flat_views(a, b)
    fa, fb = flat if flat is not None else (a.reshape(-1), b.reshape(-1))
    k = fa.numel() // DOT_BLOCK
    head = k * DOT_BLOCK
    tail = torch.dot(fa[head:], fb[head:])
    if k == 0:
        return tail
    blocks = torch.bmm(fa[:head].view(k, 1, DOT_BLOCK), fb[:head].view(k, DOT_BLOCK, 1))
    return blocks.sum() + tail


@torch.no_grad()
def ulq_backward_saved(
    dy: Tensor, coeff: Tensor, outside: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """ULQ straight-through gradients ``(dx, dcmax, dcmin)`` from :func:`ulq_forward_train`'s values.

    ``dx = dy`` inside, 0 outside; ``dcmax = sum(dy * W)``; and, since ``dcmin``'s per-element weight is
    ``-W``, plus 1 outside the bounds (module docstring), ``dcmin = sum_outside(dy) - dcmax`` with
    ``sum_outside(dy) = sum(dy) - sum(dx)``. At most four reads of ``dy``-sized tensors; ``dcmax`` and
    ``dcmin`` are 0-d tensors, summed in float32 in another order than the per-case formulas (equal up to
    rounding). With ``outside`` None, ``dx`` is ``dy`` itself.
    """
    dy = as_tensor(dy, like=coeff).expand_as(coeff)
    fused = FUSED.ulq_backward(dy, coeff, outside) if outside is not None else None
    if fused is not None:
        dx, dot, outside_sum = fused
        dcmax = div_exact(dot, DATA_SPAN)
        return dx, dcmax, outside_sum - dcmax
    dcmax = div_exact(_dot(dy, coeff), DATA_SPAN)
    if outside is None:
        return dy, dcmax, -dcmax
    dx = dy.masked_fill(outside, 0.0)
    dcmin = (dy.sum() - dx.sum()) - dcmax
    return dx, dcmax, dcmin


def ulq_backward(
    x: ArrayLike, dy: ArrayLike, cmax: ArrayLike, cmin: ArrayLike
) -> tuple[Tensor, Tensor, Tensor]:
    """ULQ straight-through gradients ``(dx, dcmax, dcmin)`` (AMCT reference §3.5; formulas
    in the module docstring).

    ``cmax``/``cmin`` are the values the forward used (pass ``cmin = 0`` for ``fixed_min``; a ``cmin > 0``
    or ``cmax < 0`` is clamped to 0 as in the forward). ``dcmax``/``dcmin`` are 0-d tensors, summed over
    every element of ``x``. :class:`ULQFunction`'s backward: :func:`ulq_forward_train`'s coefficients
    (without its output) then :func:`ulq_backward_saved`.
    """
    x = as_float_tensor(x)
    _, coeff, outside = _train_terms(x, cmax, cmin, False, with_output=False)
    return ulq_backward_saved(as_tensor(dy, like=x), coeff, outside)


class ULQFunction(torch.autograd.Function):
    """ULQ as an autograd op: ``ULQFunction.apply(x, clip_max, clip_min, fixed_min)``.

    ``clip_max``/``clip_min`` are the layer's clip tensors (shape [1], already through ClipCheck); their
    gradients come back in the same shapes. With ``fixed_min`` the forward uses ``cmin = 0`` and the
    ``clip_min`` gradient is still computed (with ``cmin = 0``), as AMCT writes it into the blob's diff;
    the layer overwrites ``clip_min`` with 0 on every forward, so it never takes effect.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, clip_max: Tensor, clip_min: Tensor, fixed_min: bool = False) -> Tensor:
        # Keep x, not the backward's coefficients: x is usually held anyway (by the ReLU or the layer that
        # wrote it), while the coefficient tensor and the mask would add a full-size float and a bool
        # tensor per ActivationQAT to the step's peak memory (measured: 3x the float step's at batch 32
        # on MobileNet-v2). The backward recomputes them from x (ulq_backward).
        ctx.fixed_min = bool(fixed_min)
        ctx.save_for_backward(x, clip_max, clip_min)
        return ulq_forward(x.detach(), clip_max.detach(), clip_min.detach(), ctx.fixed_min)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, clip_max, clip_min = ctx.saved_tensors
        cmin = torch.zeros_like(clip_min) if ctx.fixed_min else clip_min
        dx, dcmax, dcmin = ulq_backward(x.detach(), dy, clip_max.detach(), cmin.detach())
        return (
            dx if ctx.needs_input_grad[0] else None,
            dcmax.reshape(clip_max.shape).to(clip_max.dtype) if ctx.needs_input_grad[1] else None,
            dcmin.reshape(clip_min.shape).to(clip_min.dtype) if ctx.needs_input_grad[2] else None,
            None,
        )
