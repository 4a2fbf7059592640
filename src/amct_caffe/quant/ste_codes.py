"""Straight-through INT8 weight codes and INT32 biases on fixed grids (end-to-end refinement; not AMCT).

The end-to-end refinement (``workflows.refine``) keeps every scale of the calibration (the record's
``s_w`` and ``s_d``) and learns, per quantized layer, a latent weight ``u`` in code units (``w / s_w``) and
a float bias. The network it trains is exactly the one the saved models hold:

    weight = s_w * clamp(round_away(u), -128, 127)          (an INT8 code on ARQ's grid)
    bias   = round_away(b / (s_d * s_w)) * (s_d * s_w)      (an INT32 code on the bias grid)

Rounding has no useful gradient, so the backward treats it as the identity (the straight-through
estimator): ``d weight / d u = s_w`` where ``u`` lies inside [-128.5, 127.5) and 0 outside (the clamp),
``d bias / d b = 1``. The forward value is the rounded one, so the loss of every step is the loss of the
model with the codes that step holds.
"""

from __future__ import annotations

import torch

from amct_caffe.quant.numerics import INT8_MAX, INT8_MIN, Tensor, round_away


def ste_round(x: Tensor) -> Tensor:
    """``round_away(x)`` in the forward, the identity in the backward."""
    return x + (round_away(x.detach()) - x).detach()


def ste_codes(u: Tensor) -> Tensor:
    """The INT8 codes ``clamp(round_away(u), -128, 127)`` of latent weights ``u`` (code units), as a float
    tensor; gradient 1 where ``round_away(u)`` lies inside [-128, 127], else 0."""
    rounded = ste_round(u)
    inside = ((rounded >= INT8_MIN) & (rounded <= INT8_MAX)).to(u.dtype)
    return rounded * inside + torch.clamp(rounded.detach(), INT8_MIN, INT8_MAX) * (1.0 - inside)


def ste_bias(b: Tensor, step: Tensor) -> Tensor:
    """The bias on its grid ``round_away(b / step) * step`` (``step = s_d * s_w`` per channel), gradient 1
    with respect to ``b``."""
    return ste_round(b / step) * step


def final_codes(u: Tensor) -> Tensor:
    """The INT8 codes the saved models hold for latent weights ``u``: ``clamp(round_away(u), -128, 127)``."""
    return torch.clamp(round_away(u.detach()), INT8_MIN, INT8_MAX)
