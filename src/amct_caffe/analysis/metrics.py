"""The numbers the analysis reports, accumulated over batches: agreement of two models' values and the
saturation of a ``Quant`` layer.

Agreement (:class:`AgreementStats` -> :class:`Metrics`) of a compared value ``x`` with a reference ``ref``,
over every value of every batch added:

* cosine similarity ``sum(ref*x) / (||ref|| * ||x||)``: 1.0 when both are all zero, 0.0 when only one is;
* SNR in dB ``10*log10(sum(ref**2) / sum((ref - x)**2))``: +inf when the values are identical, -inf when
  ``ref`` is all zero and ``x`` is not;
* relative error ``||ref - x|| / ||ref||``: 0.0 when the values are identical, +inf when only ``ref`` is
  all zero;
* the largest absolute difference ``max |ref - x|``, and with a quantization step (one value, or one per
  channel on axis 1) the largest difference in steps (``max_lsb``) and how many values are at least half
  a step apart (for INT8 codes: how many codes differ).

The sums are float64; batches only add to them, so the numbers do not depend on how the values were
split into batches (up to float64 rounding).

Saturation (:class:`SaturationStats` -> :class:`Saturation`): the fraction of a ``Quant`` layer's input
values whose code ``round(x / s_d) + o_d`` (:func:`amct_caffe.quant.numerics.quant_codes`) falls outside
[-128, 127] and is clipped to the bound. "Clipped" rather than "code at -128 or 127": with ``fixed_min``
(an input after a ReLU) ``clip_min = 0`` and ``o_d = -128``, so every zero input has the code -128 without
any loss; only values beyond the range lose information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from amct_caffe.quant.numerics import INT8_MAX, INT8_MIN, quant_codes


@dataclass(frozen=True)
class Metrics:
    """Agreement of a compared value ``x`` with a reference ``ref`` over all batches (module docstring).

    Attributes:
        cosine: cosine similarity.
        snr_db: signal-to-noise ratio in dB.
        max_abs: ``max |ref - x|`` (0.0 when nothing was compared).
        count: how many values were compared.
        rel_err: ``||ref - x|| / ||ref||``.
        max_lsb: ``max |ref - x| / step`` when a step was given, else None.
        over_half_step: how many values are at least half a step apart when a step was given, else None.
    """

    cosine: float
    snr_db: float
    max_abs: float
    count: int
    rel_err: float
    max_lsb: float | None = None
    over_half_step: int | None = None


class AgreementStats:
    """Running float64 sums of the agreement of ``x`` with ``ref`` (module docstring).

    Args:
        step: the quantization step of the compared blob, one value or one per channel (axis 1), for
            ``max_lsb`` and ``over_half_step``; None when the blob has no known step.
    """

    def __init__(self, step: np.ndarray | None = None) -> None:
        self.step = None if step is None else torch.from_numpy(np.asarray(step, dtype=np.float64).reshape(-1))
        self.dot = 0.0
        self.ref2 = 0.0
        self.x2 = 0.0
        self.noise2 = 0.0
        self.max_abs = 0.0
        self.count = 0
        self.max_lsb = 0.0
        self.over_half_step = 0

    def add(self, ref: torch.Tensor, x: torch.Tensor) -> None:
        """Add one batch: ``ref`` and ``x`` of the same shape (any dtype and device)."""
        a = ref.detach().to(torch.float64)
        b = x.detach().to(torch.float64)
        diff = a - b
        fa, fb, fd = a.reshape(-1), b.reshape(-1), diff.reshape(-1)
        self.dot += float(fa @ fb)
        self.ref2 += float(fa @ fa)
        self.x2 += float(fb @ fb)
        self.noise2 += float(fd @ fd)
        self.count += int(fa.numel())
        if not fa.numel():
            return
        abs_diff = diff.abs()
        self.max_abs = max(self.max_abs, float(abs_diff.max()))
        if self.step is not None:
            lsb = abs_diff / self._step_view(abs_diff)
            self.max_lsb = max(self.max_lsb, float(lsb.max()))
            self.over_half_step += int((lsb >= 0.5).sum())

    def _step_view(self, values: torch.Tensor) -> torch.Tensor:
        """The step broadcast against ``values``: one value, or one per channel on axis 1."""
        assert self.step is not None
        step = self.step.to(values.device)
        if step.numel() == 1:
            return step.reshape(())
        return step.reshape([1, -1] + [1] * (values.dim() - 2))

    def metrics(self) -> Metrics:
        """The :class:`Metrics` of everything added so far."""
        norm_ref, norm_x = math.sqrt(self.ref2), math.sqrt(self.x2)
        if norm_ref == 0.0 and norm_x == 0.0:
            cosine = 1.0
        elif norm_ref == 0.0 or norm_x == 0.0:
            cosine = 0.0
        else:
            cosine = min(1.0, max(-1.0, self.dot / (norm_ref * norm_x)))  # rounding may step past +-1
        if self.noise2 == 0.0:
            snr, rel = math.inf, 0.0
        elif self.ref2 == 0.0:
            snr, rel = -math.inf, math.inf
        else:
            snr = 10.0 * math.log10(self.ref2 / self.noise2)
            rel = math.sqrt(self.noise2) / norm_ref
        with_step = self.step is not None
        return Metrics(cosine, snr, self.max_abs, self.count, rel,
                       self.max_lsb if with_step else None, self.over_half_step if with_step else None)


@dataclass(frozen=True)
class Saturation:
    """Clipping of one ``Quant`` layer over all batches.

    Attributes:
        rate: ``clipped / total``, the fraction of input values clipped to code -128 or 127.
        low_rate, high_rate: the fractions clipped at -128 (below ``clip_min``) and at 127 (above
            ``clip_max``).
        clipped: clipped values (low + high).
        total: values quantized.
    """

    rate: float
    low_rate: float
    high_rate: float
    clipped: int
    total: int


class SaturationStats:
    """Running counts of the clipped inputs of a ``Quant`` layer with factors ``scale_d`` and ``offset_d``."""

    def __init__(self, scale_d: float, offset_d: int) -> None:
        self.scale_d = scale_d
        self.offset_d = offset_d
        self.low = 0
        self.high = 0
        self.total = 0

    def add(self, x: torch.Tensor) -> None:
        """Count the values of one batch of the ``Quant`` layer's input."""
        codes = quant_codes(x.detach(), self.scale_d, self.offset_d, clamp=False)
        self.low += int((codes < INT8_MIN).sum())
        self.high += int((codes > INT8_MAX).sum())
        self.total += int(codes.numel())

    def result(self) -> Saturation:
        """The :class:`Saturation` of everything counted so far (rates 0.0 when nothing was)."""
        total = max(self.total, 1)
        clipped = self.low + self.high
        return Saturation(clipped / total, self.low / total, self.high / total, clipped, self.total)
