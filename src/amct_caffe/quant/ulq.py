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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from amct_caffe.quant.numerics import (
    DATA_SPAN,
    INT8_MIN,
    ArrayLike,
    Tensor,
    as_float_tensor,
    as_tensor,
    data_scale_offset,
    div_exact,
    round_away,
    round_even,
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
    ``fixed_min`` uses ``cmin = 0``. Not differentiable by autograd: use :class:`ULQFunction` to train.
    """
    x = as_float_tensor(x)
    cmax_t = as_tensor(cmax, like=x)
    cmin_t = torch.zeros_like(cmax_t) if fixed_min else as_tensor(cmin, like=x)
    s, _, lower, upper = _grid(cmax_t, cmin_t, x)
    return round_even(torch.clamp(x, lower, upper) / s) * s


def ulq_backward(
    x: ArrayLike, dy: ArrayLike, cmax: ArrayLike, cmin: ArrayLike
) -> tuple[Tensor, Tensor, Tensor]:
    """ULQ straight-through gradients ``(dx, dcmax, dcmin)`` (AMCT reference §3.5; formulas
    in the module docstring).

    ``cmax``/``cmin`` are the values the forward used (pass ``cmin = 0`` for ``fixed_min``; a ``cmin > 0``
    or ``cmax < 0`` is clamped to 0 as in the forward). ``dcmax``/``dcmin`` are 0-d tensors, summed over
    every element of ``x``.
    """
    x = as_float_tensor(x)
    dy = as_tensor(dy, like=x)
    s, _, lower, upper = _grid(cmax, cmin, x)
    cmin_eff = torch.clamp(as_tensor(cmin, like=x), max=0.0)

    def residual(v: Tensor) -> Tensor:
        # D(v): the rounding error of v on the grid, per unit of clip range.
        q = v / s
        return div_exact(round_away(q) - q, DATA_SPAN)

    # The per-element gradients are constants outside the bounds, so the sums split by region: a few
    # full-size passes instead of a where() per case (the backward of every ActivationQAT in training).
    above = x > upper
    below = x < lower
    dx = dy.masked_fill(above | below, 0.0)
    d_c = residual(cmin_eff).reshape(())
    # (outside the bounds dx is 0; the clamp keeps an inf there from turning 0 * D into NaN)
    inside_sum = (dx * residual(torch.clamp(x, lower, upper))).sum()
    above_sum = dy.masked_fill(~above, 0.0).sum()
    below_sum = dy.masked_fill(~below, 0.0).sum()
    dcmax = above_sum * (d_c + 1) + below_sum * d_c + inside_sum
    dcmin = below_sum * (1 - d_c) - above_sum * d_c - inside_sum
    return dx, dcmax, dcmin


class ULQFunction(torch.autograd.Function):
    """ULQ as an autograd op: ``ULQFunction.apply(x, clip_max, clip_min, fixed_min)``.

    ``clip_max``/``clip_min`` are the layer's clip tensors (shape [1], already through ClipCheck); their
    gradients come back in the same shapes. With ``fixed_min`` the forward uses ``cmin = 0`` and the
    ``clip_min`` gradient is still computed (with ``cmin = 0``), as AMCT writes it into the blob's diff;
    the layer overwrites ``clip_min`` with 0 on every forward, so it never takes effect.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, clip_max: Tensor, clip_min: Tensor, fixed_min: bool = False) -> Tensor:
        ctx.fixed_min = bool(fixed_min)
        ctx.save_for_backward(x, clip_max, clip_min)
        return ulq_forward(x, clip_max.detach(), clip_min.detach(), ctx.fixed_min)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, clip_max, clip_min = ctx.saved_tensors
        cmin = torch.zeros_like(clip_min) if ctx.fixed_min else clip_min
        dx, dcmax, dcmin = ulq_backward(x, dy, clip_max, cmin)
        return (
            dx if ctx.needs_input_grad[0] else None,
            dcmax.reshape(clip_max.shape).to(clip_max.dtype) if ctx.needs_input_grad[1] else None,
            dcmin.reshape(clip_min.shape).to(clip_min.dtype) if ctx.needs_input_grad[2] else None,
            None,
        )
