"""Opt-in fused kernels for ULQ's training forward and backward, compiled by ``torch.compile``
(docs/design.md, "QAT kernels").

With the environment variable ``AMCT_CAFFE_COMPILE=1`` the elementwise work of :class:`ULQFunction`
(:mod:`amct_caffe.quant.ulq`) in its backward -- recomputing the coefficients from ``x``, then the
gradients -- runs as two generated kernels instead of a dozen eager passes; the values are the eager
path's (the coefficients and ``dx`` bit for bit, the clip gradients up to float32 summation order).
Compiling costs seconds once per process (more without a warm cache), so it is off by default. Any
failure to compile or run (no C++ compiler, an unsupported torch) logs one WARNING and leaves the eager
path in charge for the rest of the process. Tensors that are not densely laid out, empty or 0-d always
take the eager path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from amct_caffe.log import get_logger
from amct_caffe.quant.numerics import Tensor, memory_flat, memory_flat_views

LOGGER = get_logger("quant.fused")

#: The environment variable that turns the fused kernels on (value ``1``).
COMPILE_ENV = "AMCT_CAFFE_COMPILE"


def ulq_forward_kernel(
    x: Tensor, s: Tensor, lower: Tensor, upper: Tensor, d_above: Tensor, d_below: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """ULQ's training forward on a 1-D tensor, as the compiler fuses it: ``(y, coeff, outside)`` of
    :func:`amct_caffe.quant.ulq.ulq_forward_train`, with the tie fix applied densely (it is free here)."""
    q = torch.clamp(x, lower, upper) / s
    r = torch.round(q)
    res = r - q
    res = torch.where(res.abs() == 0.5, torch.sign(r - res) * 0.5, res)
    above = x > upper
    below = x < lower
    coeff = torch.where(above, d_above, torch.where(below, d_below, res))
    return r * s, coeff, above | below


def ulq_backward_kernel(dy: Tensor, coeff: Tensor, outside: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ULQ's backward on 1-D tensors: ``(dx, sum(dy * coeff), sum_outside(dy))``."""
    dx = torch.where(outside, torch.zeros_like(dy), dy)
    return dx, (dy * coeff).sum(), dy.sum() - dx.sum()


class FusedKernels:
    """The compiled ULQ kernels of this process, compiled on first use.

    Attributes:
        enabled: whether the fused kernels are used (``AMCT_CAFFE_COMPILE=1`` unless given).
        failed: set when compiling or running failed once; the eager path is used from then on.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = os.environ.get(COMPILE_ENV, "") == "1" if enabled is None else enabled
        self.failed = False
        self._forward: Callable[..., Any] | None = None
        self._backward: Callable[..., Any] | None = None

    @property
    def active(self) -> bool:
        """True while the fused kernels are to be tried."""
        return self.enabled and not self.failed

    def _run(self, which: str, fn: Callable[..., Any], *args: Tensor) -> Any:
        """Call ``fn``; on any failure disable the fused path and return None."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler or runtime failure means: use eager
            self.failed = True
            LOGGER.warning(
                "%s=1: the fused ULQ %s kernel failed (%s: %s); using the eager kernels from now on. "
                "Unset %s to silence this.", COMPILE_ENV, which, type(exc).__name__, exc, COMPILE_ENV)
            return None

    def ulq_forward(
        self, x: Tensor, s: Tensor, lower: Tensor, upper: Tensor, d_above: Tensor, d_below: Tensor
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The fused forward's ``(y, coeff, outside)`` in ``x``'s shape and layout, or None when the eager
        path must run (disabled, failed, or ``x`` empty, 0-d or not densely laid out)."""
        flat = memory_flat(x) if self.active and x.dim() > 0 and x.numel() > 0 else None
        if flat is None:
            return None
        if self._forward is None:
            self._forward = torch.compile(ulq_forward_kernel, dynamic=True)
        # detach(): a plain tensor, not a view of x, so the compiled function guards on no base shape
        out = self._run("forward", self._forward, flat.detach(), s, lower, upper, d_above, d_below)
        if out is None:
            return None
        y, coeff, outside = (t.as_strided(x.shape, x.stride()) for t in out)
        return y, coeff, outside

    def ulq_backward(
        self, dy: Tensor, coeff: Tensor, outside: Tensor
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The fused backward's ``(dx, sum(dy * coeff), sum_outside(dy))``, or None for the eager path."""
        flat = memory_flat_views(dy, coeff, outside) if self.active and dy.numel() > 0 else None
        if flat is None:
            return None
        if self._backward is None:
            self._backward = torch.compile(ulq_backward_kernel, dynamic=True)
        out = self._run("backward", self._backward, *(f.detach() for f in flat))
        if out is None:
            return None
        dx, dot, outside_sum = out
        return dx.as_strided(dy.shape, dy.stride()), dot, outside_sum


#: The process's fused kernels (off unless ``AMCT_CAFFE_COMPILE=1``).
FUSED = FusedKernels()
