"""Where the engine computes: pycaffe's global mode (``set_mode_cpu``/``set_mode_gpu``/``set_device``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from amct_caffe.errors import RuntimeEngineError

_STATE: dict[str, str | int] = {"mode": "cpu", "device_id": 0}


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
        return torch.device("cuda", int(_STATE["device_id"]))
    return torch.device("cpu")


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """Compute convolutions and matrix products in full float32 on CUDA, as Caffe does.

    torch lets cuDNN use TF32 for convolutions by default on Ampere and later GPUs (10-bit mantissa inputs),
    which moves results by ~1e-3 relative; Caffe's float nets never do. The flags are restored on exit, so
    the user's own torch code keeps its settings.
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        matmul.allow_tf32 = saved
