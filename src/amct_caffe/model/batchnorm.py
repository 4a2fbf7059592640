"""Caffe's BatchNorm blob format and how its stored statistics decode.

Caffe's ``BatchNorm`` keeps *unnormalised* running sums and a moving-average factor in its three blobs
``[mean_sum, var_sum, factor]``; the statistics it uses with ``use_global_stats`` are
``mean = mean_sum * s`` and ``var = var_sum * s`` with ``s = 0 if factor == 0 else 1 / factor``
(``BatchNormLayer::Forward_cpu``), so an untrained layer normalises with mean 0 and variance 0. The engine's
layer, its fast TEST forward and the BatchNorm folding pass all decode through :func:`global_statistics`.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def global_statistics(mean_sum: Array, var_sum: Array, factor: Array) -> tuple[Array, Array]:
    """``(mean, var)`` from BatchNorm's three blobs, in the blobs' dtype (torch tensors or numpy arrays).

    ``factor`` is the one-element third blob. Torch tensors stay on their device (no host round trip).
    """
    if isinstance(mean_sum, torch.Tensor):
        f = torch.as_tensor(factor, device=mean_sum.device)
        inv = torch.where(f == 0, torch.zeros_like(f), 1.0 / f)
        return mean_sum * inv, var_sum * inv
    f = float(np.asarray(factor).reshape(-1)[0])
    inv = 0.0 if f == 0 else 1.0 / f
    return mean_sum * inv, var_sum * inv
