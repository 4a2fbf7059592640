"""Caffe's solver arithmetic: ``Dtype`` (float32) values and C's ``pow`` on doubles.

Caffe computes learning rates and update coefficients in its ``Dtype``; rounding each intermediate value to
float32 where Caffe stores one keeps our rates and updates bit-identical to its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def f32(value: float | np.floating[Any]) -> np.float32:
    """``value`` as Caffe's ``Dtype`` (float)."""
    return np.float32(value)


def c_pow(base: float, exponent: float) -> float:
    """C's ``pow`` on doubles: NaN where Python would raise or return a complex number, inf on overflow."""
    try:
        return math.pow(base, exponent)
    except ValueError:
        return math.nan
    except OverflowError:
        return math.inf


def c_exp(value: float) -> float:
    """C's ``exp``: inf on overflow instead of an exception."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
