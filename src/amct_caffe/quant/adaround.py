"""Learned weight rounding on the ARQ grid (AdaRound-style; not part of AMCT).

ARQ rounds every weight to the nearest code ``round(w / s_w)``. Learned rounding keeps the scale ``s_w`` and
chooses, per weight, the code below or above: ``q = clamp(floor(w / s_w) + r * span, -128, 127)`` with
``r in {0, 1}`` and ``span = ceil(w / s_w) - floor(w / s_w)``. So the codes stay INT8 on the same grid, each
within one step of ARQ's, and an element already on the grid (``w / s_w`` an integer, e.g. the extreme
element ARQ maps to 127 or -128) keeps its code.

During the optimisation ``r`` is relaxed to ``h(v) = clamp(sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)`` (a
sigmoid stretched a little beyond [0, 1] and clipped, so it reaches 0 and 1 exactly), and a regulariser
``sum(1 - |2 h(v) - 1| ** beta)`` with ``beta`` falling during the run pushes every ``h(v)`` to 0 or 1.
The decision at the end is ``r = 1`` where ``v >= 0`` (``h(v) >= 0.5``). ``v`` starts where ``h(v)`` equals
the fractional part of ``w / s_w``, so the relaxed weight starts at the float weight.
"""

from __future__ import annotations

import torch

from amct_caffe.quant.numerics import INT8_MAX, INT8_MIN, Tensor, round_away

#: The stretch of the rectified sigmoid (AdaRound's zeta and gamma).
ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(v) = clamp(sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)``: the relaxed rounding offset."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_start(w: Tensor, s_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(floor(w / s_w), ceil(w / s_w) - floor(w / s_w), v0)`` with ``h(v0)`` the fractional part.

    ``s_w`` broadcasts against ``w`` (one scale per output channel along its axis). The span is 0 for an
    element on the grid (it keeps its code whatever ``v`` does), else 1. The fractional part is kept inside
    (0, 1) by a margin so that ``v0`` is finite.
    """
    ratio = w / s_w
    floor = torch.floor(ratio)
    span = torch.ceil(ratio) - floor
    rest = torch.clamp(ratio - floor, 0.01, 0.99)
    p = (rest - GAMMA) / (ZETA - GAMMA)
    return floor, span, torch.log(p / (1.0 - p))


def soft_weight(floor: Tensor, span: Tensor, v: Tensor, s_w: Tensor) -> Tensor:
    """The relaxed fake-quantized weight ``s_w * clamp(floor + span * h(v), -128, 127)`` (differentiable in
    ``v``)."""
    return s_w * torch.clamp(floor + span * rectified_sigmoid(v), INT8_MIN, INT8_MAX)


def hard_codes(floor: Tensor, span: Tensor, v: Tensor) -> Tensor:
    """The final INT8 codes ``clamp(floor + span * [v >= 0], -128, 127)``: ``floor(w / s_w)`` or
    ``ceil(w / s_w)``, as a float tensor of integer values."""
    return torch.clamp(floor + span * (v >= 0).to(floor.dtype), INT8_MIN, INT8_MAX)


def rounding_penalty(v: Tensor, beta: float) -> Tensor:
    """``mean(1 - |2 h(v) - 1| ** beta)``: 0 when every ``h(v)`` is 0 or 1, largest at 0.5."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).mean()


def annealed_beta(step: int, steps: int, start: float = 20.0, end: float = 2.0) -> float:
    """``beta`` falling linearly from ``start`` to ``end`` over ``steps`` (a high ``beta`` leaves the
    relaxed offsets free, a low one pushes them to 0 or 1)."""
    if steps <= 1:
        return end
    return start + (end - start) * step / (steps - 1)


def nearest_codes(w: Tensor, s_w: Tensor) -> Tensor:
    """ARQ's codes ``clamp(round_half_away(w / s_w), -128, 127)`` as a float tensor (for comparison)."""
    return torch.clamp(round_away(w / s_w), INT8_MIN, INT8_MAX)
