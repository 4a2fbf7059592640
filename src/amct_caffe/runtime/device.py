"""Where the engine computes: pycaffe's global mode (``set_mode_cpu``/``set_mode_gpu``/``set_device``)."""

from __future__ import annotations

import torch

from amct_caffe.errors import RuntimeEngineError

_STATE = {"mode": "cpu", "device_id": 0}


def set_mode_cpu() -> None:
    """Compute on the CPU (the default)."""
    _STATE["mode"] = "cpu"


def set_mode_gpu() -> None:
    """Compute on a CUDA GPU; raises when torch has no CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeEngineError(
            "set_mode_gpu(): this torch build sees no CUDA device; install a CUDA build of torch or "
            "stay in CPU mode."
        )
    _STATE["mode"] = "gpu"


def set_device(device_id: int) -> None:
    """Choose the CUDA device used in GPU mode (as pycaffe's ``caffe.set_device``)."""
    _STATE["device_id"] = int(device_id)


def current_device() -> torch.device:
    """The torch device new nets are built on."""
    if _STATE["mode"] == "gpu":
        return torch.device("cuda", _STATE["device_id"])
    return torch.device("cpu")
