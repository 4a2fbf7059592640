"""Caffe's ``Python`` layer: a class from ``python_param.module``/``layer`` run as pycaffe runs it, on opt-in.

A prototxt names the module to import, so loading one would run code a model file chose. The engine
therefore imports nothing unless the caller opted in, by either

- an argument: ``caffe.Net(..., allow_python_layers=True)``, ``Net(..., allow_python_layers=True)`` of the
  engine, the command line's ``--allow-python-layers``, or the ``with allow_python_layers():`` block
  (around AMCT API calls, whose signatures stay AMCT's); or
- the environment: ``AMCT_CAFFE_ALLOW_PYTHON_LAYERS=1``.

An explicit ``allow_python_layers=False`` (argument or block) refuses even when the variable is set. Without
opt-in, building a net with a Python layer raises :class:`~amct_caffe.errors.PythonLayerNotAllowedError`
before anything is imported. One Python layer needs no opt-in because nothing is imported for it:
py-faster-rcnn's ``rpn.proposal_layer.ProposalLayer`` runs as the native ``Proposal`` layer
(:func:`amct_caffe.engine.layers.region.proposal_from_python`).

The protocol is pycaffe's (``src/caffe/layers/python_layer.hpp`` of BVLC Caffe): the class is called with
the ``LayerParameter``; then ``param_str`` and ``phase`` are set and ``blobs`` (its learnable blobs,
``blobs.add_blob(*shape)``) is given; ``setup(bottom, top)`` and ``reshape(bottom, top)`` run once at set
up; every forward calls ``reshape`` then ``forward(bottom, top)``; ``backward(top, propagate_down,
bottom)`` fills bottom diffs (and learnable blobs' diffs) when training needs them. Bottoms and tops are
:class:`PyBlob` s: numpy ``data``/``diff``, ``shape``, ``count``, ``num``/``channels``/``height``/
``width`` and ``reshape(*shape)``. Arrays are float32 host copies: a layer in a GPU net runs on the host.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.region import PY_FASTER_RCNN_PROPOSAL, proposal_from_python
from amct_caffe.engine.layers.registry import register
from amct_caffe.errors import ModelFormatError, PythonLayerNotAllowedError
from amct_caffe.proto import caffe_pb2

#: The environment variable that opts in to importing Python layers ("1", "true", "yes" or "on").
ENV_VAR = "AMCT_CAFFE_ALLOW_PYTHON_LAYERS"
_TRUE = frozenset({"1", "true", "yes", "on"})

#: The innermost explicit choice (an argument or a ``with`` block); None: the environment decides.
_CHOICE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("amct_python_layers", default=None)


@contextlib.contextmanager
def allow_python_layers(allowed: bool | None = True) -> Iterator[None]:
    """Within the block, nets built by any code (AMCT API calls included) may import their Python layers
    (``allowed=True``), may not (``False``), or follow ``AMCT_CAFFE_ALLOW_PYTHON_LAYERS`` (``None``)."""
    token = _CHOICE.set(allowed)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def python_layers_allowed() -> bool:
    """Whether a net built now may import Python layers: the innermost explicit choice, else the
    environment variable."""
    choice = _CHOICE.get()
    if choice is not None:
        return choice
    return os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


# -- pycaffe's blobs ---------------------------------------------------------------------------------------
class LegacyBlobAxes:
    """pycaffe's ``num``/``channels``/``height``/``width`` of a blob: axes 0-3 of ``shape``, 1 where the blob
    has fewer axes (shared by the Python layers' blobs and the facade's ``caffe.Blob``)."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _legacy(self, axis: int) -> int:
        shape = self.shape
        return int(shape[axis]) if len(shape) > axis else 1

    @property
    def num(self) -> int:
        return self._legacy(0)

    @property
    def channels(self) -> int:
        return self._legacy(1)

    @property
    def height(self) -> int:
        return self._legacy(2)

    @property
    def width(self) -> int:
        return self._legacy(3)


class PyBlob(LegacyBlobAxes):
    """A bottom or top blob as pycaffe shows it to a Python layer: float32 numpy ``data`` and ``diff``."""

    def __init__(self, data: np.ndarray | None = None) -> None:
        self.data: np.ndarray = np.zeros((0,), np.float32) if data is None else data
        self.diff: np.ndarray = np.zeros_like(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    def reshape(self, *shape: int) -> None:
        """New zero-filled ``data``/``diff`` when the shape changes (Caffe's contents are undefined then)."""
        dims = tuple(int(d) for d in shape)
        if dims != self.data.shape:
            self.data = np.zeros(dims, np.float32)
            self.diff = np.zeros(dims, np.float32)


class ParamBlob:
    """One learnable blob of a Python layer: ``data`` reads the engine's tensor (shared memory on the
    CPU, so writes change the weights); ``diff`` is the buffer a ``backward`` fills."""

    def __init__(self, owner: PythonLayer, index: int) -> None:
        self._owner = owner
        self._index = index

    @property
    def data(self) -> np.ndarray:
        return self._owner.blobs[self._index].detach().cpu().numpy()

    @property
    def diff(self) -> np.ndarray:
        return self._owner.param_diffs[self._index]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._owner.blobs[self._index].shape)

    @property
    def count(self) -> int:
        return int(self._owner.blobs[self._index].numel())

    def reshape(self, *shape: int) -> None:
        self._owner.blobs[self._index] = torch.zeros(tuple(int(d) for d in shape), dtype=torch.float32,
                                                     device=self._owner.device)
        self._owner.param_diffs[self._index] = np.zeros(tuple(int(d) for d in shape), np.float32)


class ParamBlobVec(Sequence[ParamBlob]):
    """pycaffe's ``layer.blobs``: indexable, ``len``, and ``add_blob(*shape)`` for a zero-filled blob."""

    def __init__(self, owner: PythonLayer) -> None:
        self._owner = owner

    def __len__(self) -> int:
        return len(self._owner.blobs)

    def __getitem__(self, index: int) -> ParamBlob:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"blob index {index} out of range ({len(self)} blobs)")
        return ParamBlob(self._owner, index % len(self))

    def add_blob(self, *shape: int) -> None:
        dims = tuple(int(d) for d in shape)
        self._owner.blobs.append(torch.zeros(dims, dtype=torch.float32, device=self._owner.device))
        self._owner.param_diffs.append(np.zeros(dims, np.float32))


# -- the layer ---------------------------------------------------------------------------------------------
def _import_layer_class(param: caffe_pb2.LayerParameter) -> type:
    python = param.python_param
    where = f"Layer '{param.name}' (type Python)"
    if not python.module or not python.layer:
        raise ModelFormatError(f"{where}: python_param needs 'module' and 'layer'.")
    try:
        module = importlib.import_module(python.module)
    except ImportError as exc:
        raise ModelFormatError(f"{where}: cannot import module '{python.module}' ({exc}); put its folder on "
                               "sys.path (PYTHONPATH).") from exc
    cls = getattr(module, python.layer, None)
    if not isinstance(cls, type):
        raise ModelFormatError(f"{where}: module '{python.module}' has no class '{python.layer}'.")
    return cls


@register("Python")
class PythonLayer(Layer):
    """A ``type: "Python"`` layer (see the module docstring for the opt-in and the protocol)."""

    @classmethod
    def create(
        cls, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, options: Mapping[str, object]
    ) -> Layer:
        """py-faster-rcnn's proposal layer runs natively; any other needs the opt-in.

        Raises:
            PythonLayerNotAllowedError: no opt-in (raised before anything is imported).
            ModelFormatError: the module or class cannot be found.
        """
        python = param.python_param
        if (python.module, python.layer) == PY_FASTER_RCNN_PROPOSAL:
            return proposal_from_python(param, phase, device, options)
        if not python_layers_allowed():
            raise PythonLayerNotAllowedError(
                f"Layer '{param.name}' is a Python layer (module '{python.module}', class '{python.layer}'); "
                "running it would import and execute that module, which amct-caffe does only when asked. "
                f"Opt in with caffe.Net(..., allow_python_layers=True), the command line's "
                f"--allow-python-layers, `with amct_caffe.allow_python_layers():` around the call, or the "
                f"environment variable {ENV_VAR}=1; only do so for a model and module you trust."
            )
        return super().create(param, phase, device, options)

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        #: The diff buffers of the learnable blobs (one per ``self.blobs`` entry), filled by ``backward``.
        self.param_diffs: list[np.ndarray] = []
        self.tops = [PyBlob() for _ in param.top]
        self.impl: Any = _import_layer_class(param)(param)
        self.impl.param_str = param.python_param.param_str
        self.impl.param_str_ = param.python_param.param_str  # the name older pycaffe forks used
        self.impl.phase = phase
        self.impl.blobs = ParamBlobVec(self)

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        wrapped = _wrap(bottoms)
        self.impl.setup(wrapped, self.tops)
        self.impl.reshape(wrapped, self.tops)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        if self.reshaping:
            # Caffe's Net::Reshape calls reshape only: the tops get their shapes, no forward runs.
            self.impl.reshape(_wrap(bottoms), self.tops)
            return [torch.zeros(t.shape, dtype=torch.float32, device=self.device) for t in self.tops]
        outs = _PythonFunction.apply(self, len(bottoms), *bottoms, *self.blobs)
        return list(outs)

    def run_forward(self, bottoms: Sequence[Tensor]) -> tuple[list[PyBlob], list[Tensor]]:
        """pycaffe's Forward (reshape, then forward) on host copies; the bottoms' blobs and the tops."""
        wrapped = _wrap(bottoms)
        self.impl.reshape(wrapped, self.tops)
        self.impl.forward(wrapped, self.tops)
        outs = [torch.from_numpy(np.array(t.data, dtype=np.float32)).to(self.device) for t in self.tops]
        return wrapped, outs

    def run_backward(self, bottoms: list[PyBlob], grads: Sequence[Tensor | None], propagate: list[bool]
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """pycaffe's Backward: top diffs from ``grads``, cleared bottom and blob diffs, then ``backward``."""
        for top, grad in zip(self.tops, grads):
            top.diff = (np.zeros(top.shape, np.float32) if grad is None
                        else grad.detach().to("cpu", torch.float32).numpy().reshape(top.shape).copy())
        for blob in bottoms:
            blob.diff = np.zeros(blob.shape, np.float32)
        self.param_diffs[:] = [np.zeros(tuple(b.shape), np.float32) for b in self.blobs]
        self.impl.backward(self.tops, propagate, bottoms)
        return [b.diff for b in bottoms], list(self.param_diffs)


def _wrap(bottoms: Sequence[Tensor]) -> list[PyBlob]:
    return [PyBlob(b.detach().to("cpu", torch.float32).numpy().copy()) for b in bottoms]


class _PythonFunction(torch.autograd.Function):
    """Autograd around a Python layer: its own ``backward`` gives the bottoms' and blobs' gradients."""

    @staticmethod
    def forward(ctx: Any, layer: PythonLayer, n_bottoms: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        bottoms, outs = layer.run_forward(tensors[:n_bottoms])
        ctx.layer = layer
        ctx.n_bottoms = n_bottoms
        ctx.bottoms = bottoms
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        layer: PythonLayer = ctx.layer
        n = ctx.n_bottoms
        propagate = [bool(ctx.needs_input_grad[2 + i]) for i in range(n)]
        bottom_diffs, param_diffs = layer.run_backward(ctx.bottoms, grads, propagate)
        device = layer.device
        out: list[Tensor | None] = [None, None]
        out += [torch.from_numpy(np.asarray(d, np.float32)).to(device) if p else None
                for d, p in zip(bottom_diffs, propagate)]
        out += [torch.from_numpy(np.asarray(d, np.float32)).to(device) for d in param_diffs]
        return tuple(out)
