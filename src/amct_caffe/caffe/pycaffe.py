"""A pycaffe-style facade over the engine: ``caffe.Net``, ``net.blobs``, ``net.params``, ``net.forward()``.

It follows pycaffe's behaviour where scripts depend on it: ``blob.data`` is a numpy array that shares memory
with the engine's tensor on the CPU (so writing into an input blob before ``forward`` feeds the net, and
writing into a parameter changes the weights); ``forward`` returns the output blobs' arrays; ``params`` lists
only layers with blobs; ``outputs`` are the blobs no layer consumes. A deploy caffemodel (integer blobs)
runs in the integer emulation: ``Net`` builds itself with the layers :mod:`amct_caffe.emulation.loader`
chooses for the caffemodel.
In GPU mode, arrays of intermediate blobs and parameters are host copies; input blobs stay writable because
their buffers live on the host.

Training: ``caffe.SGDSolver(path)`` (and ``NesterovSolver``, ``AdaGradSolver``, ``RMSPropSolver``,
``AdaDeltaSolver``, ``AdamSolver``) and ``caffe.get_solver(path)`` wrap :mod:`amct_caffe.engine.solver`
with facade nets; a TRAIN-phase ``Net`` makes its trained blobs (own ``lr_mult != 0``) require grad at
construction, as Caffe's ``Net::Init`` decides which parameters get diffs, so ``net.backward()`` after
``net.forward()`` fills ``net.params[name][i].diff``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from amct_caffe.emulation.loader import plan_net
from amct_caffe.engine import solver as _solver
from amct_caffe.engine.device import set_device, set_mode_cpu, set_mode_gpu
from amct_caffe.engine.fillers import set_random_seed
from amct_caffe.engine.layers import supported_types, user_types
from amct_caffe.engine.layers.base import Layer
from amct_caffe.engine.layers.python import LegacyBlobAxes
from amct_caffe.engine.net import Net as EngineNet
from amct_caffe.engine.optimize import note_param_array
from amct_caffe.errors import RuntimeEngineError
from amct_caffe.proto import caffe_pb2

__all__ = [
    "TEST", "TRAIN", "AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Blob", "NesterovSolver", "Net",
    "RMSPropSolver", "SGDSolver", "get_solver", "layer_type_list", "set_device", "set_mode_cpu",
    "set_mode_gpu", "set_random_seed",
]

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach()
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


class Blob(LegacyBlobAxes):
    """One activation blob of a net (pycaffe's ``Blob``)."""

    def __init__(self, net: EngineNet, name: str) -> None:
        self._net = net
        self._name = name

    @property
    def data(self) -> np.ndarray:
        if self._name in self._net.inputs:
            return self._net.input_layer(self._name).buffers[self._name].numpy()
        return _as_numpy(self._net.nchw_tensor(self._name))

    @property
    def diff(self) -> np.ndarray:
        """The blob's diff, writable: set a top's diff here before ``net.backward()`` (pycaffe's
        ``blob.diff``); the array shares memory with the net's diff until a reshape."""
        return self._net.diff(self._name).numpy()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._net.tensor(self._name).shape)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def reshape(self, *shape: int) -> None:
        """Give the blob a new shape (values become zeros); call ``net.reshape()`` to propagate it."""
        value = torch.zeros(tuple(int(s) for s in shape), dtype=torch.float32)
        self._net.set_tensor(self._name, value.to(self._net.device) if self._name not in self._net.inputs
                             else value)


class ParamBlob:
    """One learnable blob of a layer; ``data`` writes go straight into the weights on the CPU."""

    def __init__(self, layer: Layer, index: int) -> None:
        self._layer = layer
        self._index = index

    @property
    def data(self) -> np.ndarray:
        tensor = self._layer.blobs[self._index]
        array = _as_numpy(tensor)
        # numpy writes bump no torch version counter: tell the optimised forward to refold from this blob
        note_param_array(tensor, array)
        return array

    @property
    def diff(self) -> np.ndarray:
        grad = self._layer.blobs[self._index].grad
        return _as_numpy(grad) if grad is not None else np.zeros(self.shape, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._layer.blobs[self._index].shape)

    @property
    def count(self) -> int:
        return int(self._layer.blobs[self._index].numel())

    @property
    def num(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def channels(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1

    def reshape(self, *shape: int) -> None:
        self._layer.blobs[self._index] = torch.zeros(shape, dtype=torch.float32, device=self._layer.device)


class LayerView:
    """What pycaffe's ``net.layers[i]`` offers: ``type`` and ``blobs``."""

    def __init__(self, layer: Layer) -> None:
        self._layer = layer

    @property
    def type(self) -> str:
        return self._layer.type_name

    @property
    def name(self) -> str:
        return self._layer.name

    @property
    def blobs(self) -> list[ParamBlob]:
        return [ParamBlob(self._layer, i) for i in range(len(self._layer.blobs))]


class Net(EngineNet):
    """pycaffe's ``caffe.Net``.

    Accepted forms (as pycaffe)::

        Net(prototxt, phase)
        Net(prototxt, caffemodel, phase)
        Net(prototxt, phase, weights=caffemodel, level=0, stages=[...])

    ``allow_python_layers=True`` (ours) lets ``type: "Python"`` layers import their modules (see
    :mod:`amct_caffe.engine.layers.python`); without it (or ``AMCT_CAFFE_ALLOW_PYTHON_LAYERS=1``) such a
    net raises :class:`~amct_caffe.errors.PythonLayerNotAllowedError` before importing anything.
    """

    def __init__(self, network_file: Any, *args: Any, **kwargs: Any) -> None:
        weights = kwargs.pop("weights", None)
        level = kwargs.pop("level", 0)
        stages = kwargs.pop("stages", None) or ()
        allow_python_layers = kwargs.pop("allow_python_layers", None)
        if kwargs:
            raise TypeError(f"Net() got unexpected keyword arguments {sorted(kwargs)}")
        if len(args) == 1:
            phase = args[0]
        elif len(args) == 2:
            weights, phase = args
        else:
            raise TypeError("Net(prototxt, phase) or Net(prototxt, weights, phase) expected")
        if phase not in (TRAIN, TEST):
            raise TypeError(f"phase must be caffe.TRAIN or caffe.TEST, got {phase!r}")
        if isinstance(network_file, bytes):
            network_file = network_file.decode()
        stages = tuple(stages)
        plan = plan_net(network_file, weights, phase, level=level, stages=stages)
        super().__init__(network_file, phase, level=level, stages=stages, variants=plan.variants,
                         allow_python_layers=allow_python_layers)
        plan.copy_weights(self)
        if phase == TRAIN:
            # Caffe's Net::Init decides which blobs get gradients (own lr_mult != 0), so backward() works
            _solver.enable_param_grads(self)

    # -- pycaffe properties ---------------------------------------------------------------------------
    @property
    def blobs(self) -> OrderedDict[str, Blob]:
        return OrderedDict((name, Blob(self, name)) for name in self.blob_names)

    @property
    def params(self) -> OrderedDict[str, list[ParamBlob]]:
        return OrderedDict(
            (layer.name, [ParamBlob(layer, i) for i in range(len(layer.blobs))])
            for layer in self.engine_layers
            if layer.blobs
        )

    @property
    def layer_dict(self) -> OrderedDict[str, LayerView]:
        return OrderedDict((layer.name, LayerView(layer)) for layer in self.engine_layers)

    @property
    def _layer_names(self) -> list[str]:
        return list(self.layer_names)

    @property
    def _blob_names(self) -> list[str]:
        """pycaffe's blob names in blob order (the keys of ``blobs``)."""
        return list(self.blob_names)

    @property
    def _inputs(self) -> list[int]:
        """pycaffe's indices (into ``_blob_names``) of the input blobs."""
        return [self.blob_names.index(name) for name in self.inputs]

    @property
    def _outputs(self) -> list[int]:
        """pycaffe's indices (into ``_blob_names``) of the output blobs."""
        return [self.blob_names.index(name) for name in self.outputs]

    def _bottom_ids(self, index: int) -> list[int]:
        """pycaffe's blob indices of layer ``index``'s bottoms."""
        return [self.blob_names.index(name) for name in self.layer_bottoms[index]]

    def _top_ids(self, index: int) -> list[int]:
        """pycaffe's blob indices of layer ``index``'s tops."""
        return [self.blob_names.index(name) for name in self.layer_tops[index]]

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        weights = OrderedDict((name, 0.0) for name in self.blob_names)
        for (li, ti), w in self.loss_weights.items():
            weights[self.layer_tops[li][ti]] = w
        return weights

    @property
    def top_names(self) -> OrderedDict[str, list[str]]:
        """pycaffe's ``{layer name: its top blob names}``."""
        return OrderedDict(zip(self.layer_names, (list(t) for t in self.layer_tops)))

    @property
    def bottom_names(self) -> OrderedDict[str, list[str]]:
        """pycaffe's ``{layer name: its bottom blob names}``."""
        return OrderedDict(zip(self.layer_names, (list(b) for b in self.layer_bottoms)))

    @property
    def layers(self) -> list[LayerView]:
        """pycaffe's list of layers (``type`` and ``blobs``); the engine's own are ``engine_layers``."""
        return [LayerView(layer) for layer in self.engine_layers]

    # -- running ---------------------------------------------------------------------------------------
    def forward(
        self,
        blobs: Iterable[str] | None = None,
        start: str | None = None,
        end: str | None = None,
        **kwargs: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Run the net forward (pycaffe's ``Net.forward``).

        Args:
            blobs: extra blob names to return.
            start, end: layer names to start at / end at (inclusive).
            kwargs: input arrays by input blob name, copied into the input blobs first.

        Returns:
            ``{blob name: array}`` for the net's outputs (or ``end``'s tops) plus ``blobs``.
        """
        if kwargs:
            if set(kwargs) != set(self.inputs):
                raise RuntimeEngineError(
                    f"Input blob arguments {sorted(kwargs)} do not match the net's inputs {self.inputs}."
                )
            for name, value in kwargs.items():
                self._feed(name, np.asarray(value))
        start_ind = self.layer_index(start) if start is not None else 0
        end_ind = self.layer_index(end) if end is not None else len(self.engine_layers) - 1
        if start is None:
            self._refresh_inputs()
        names = list(self.layer_tops[end_ind]) if end is not None else list(self.outputs)
        names += [b for b in (blobs or []) if b not in names]
        # asked for intermediate blobs: one engine forward gives them all (see Net.backend)
        self.run(start_ind, end_ind, engine_only=set(names) > set(self.outputs))
        return {name: Blob(self, name).data for name in names}

    def _feed(self, name: str, value: np.ndarray) -> None:
        target = Blob(self, name).data
        if value.shape[:1] != target.shape[:1]:
            raise RuntimeEngineError(
                f"Input '{name}' has batch size {value.shape[0] if value.ndim else 1} but the net's blob has "
                f"shape {target.shape}; reshape the blob first (net.blobs['{name}'].reshape(...); "
                "net.reshape())."
            )
        try:
            target[...] = value
        except ValueError as exc:
            raise RuntimeEngineError(
                f"Input '{name}' of shape {value.shape} does not fit the net's blob of shape {target.shape}; "
                f"reshape the blob first (net.blobs['{name}'].reshape(...); net.reshape())."
            ) from exc

    def _refresh_inputs(self) -> None:
        # Input buffers may have been replaced by Blob.reshape; make the data map point at them.
        for name in self.inputs:
            self._data[name] = self.input_layer(name).buffers[name].to(self.device)

    def forward_all(self, blobs: Sequence[str] | None = None, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the net over inputs of any batch count, in batches of the input blob's size (pycaffe)."""
        outputs: dict[str, list[np.ndarray]] = {}
        batch = Blob(self, self.inputs[0]).shape[0]
        total = len(next(iter(kwargs.values())))
        for start in range(0, total, batch):
            chunk = {k: v[start:start + batch] for k, v in kwargs.items()}
            count = len(next(iter(chunk.values())))
            if count < batch:
                chunk = {k: np.concatenate([v, np.zeros((batch - count,) + v.shape[1:], v.dtype)])
                         for k, v in chunk.items()}
            result = self.forward(blobs, None, None, **chunk)
            for k, v in result.items():
                outputs.setdefault(k, []).append(np.array(v[:count]))
        return {k: np.concatenate(v) for k, v in outputs.items()}

    def backward(  # type: ignore[override]  # pycaffe's signature: blob names and layer names
        self,
        diffs: Sequence[str] | None = None,
        start: str | None = None,
        end: str | None = None,
        **kwargs: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Back-propagate the last forward (pycaffe's ``Net.backward``).

        Args:
            diffs: extra blob names whose diffs to return.
            start, end: layer names to start at (default: the last layer) and end at (inclusive; default:
                the first layer).
            kwargs: top diffs by output blob name (all of the net's outputs), copied into the blobs' diffs
                first; without them, the diffs already in the blobs are used (a loss top's is its weight).

        Returns:
            ``{blob name: diff array}`` for the net's inputs (or ``end``'s bottoms) plus ``diffs``.

        Raises:
            RuntimeEngineError: ``kwargs`` do not name exactly the outputs, a diff's batch size differs from
                its blob's, or a TRAIN net was not forwarded with gradients first.

        Which layers compute diffs follows Caffe: layers no loss depends on compute nothing unless the net
        sets ``force_backward: true``, and input blobs get diffs only with ``force_backward``
        (see :meth:`amct_caffe.engine.net.Net.backward`).
        """
        start_ind = self.layer_index(start) if start is not None else len(self.engine_layers) - 1
        if end is not None:
            end_ind = self.layer_index(end)
            names = list(self.layer_bottoms[end_ind])
        else:
            end_ind = 0
            names = list(self.inputs)
        names += [d for d in (diffs or []) if d not in names]
        if kwargs:
            if set(kwargs) != set(self.outputs):
                raise RuntimeEngineError(f"Top diff arguments {sorted(kwargs)} do not match the net's "
                                         f"outputs {self.outputs}.")
            for top, value in kwargs.items():
                value = np.asarray(value)
                target = Blob(self, top).diff
                if value.shape[:1] != target.shape[:1]:
                    raise RuntimeEngineError(f"The diff for '{top}' is not batch sized: shape {value.shape}, "
                                             f"blob shape {target.shape}.")
                target[...] = value
        super().backward(start_ind, end_ind)
        return {name: Blob(self, name).diff for name in names}

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed a MemoryData first layer (pycaffe's ``net.set_input_arrays``): ``data`` float32
        (N, C, H, W), ``labels`` float32 with N values, N a multiple of the batch size; the layer keeps the
        arrays (no copy) and serves ``batch_size`` rows per forward."""
        first = self.engine_layers[0] if self.engine_layers else None
        if first is None or first.type_name != "MemoryData":
            raise RuntimeEngineError(
                "set_input_arrays may only be called if the first layer is a MemoryDataLayer (the net's "
                f"first layer is {first.type_name if first is not None else 'missing'})."
            )
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        first.set_input_arrays(data, labels)  # type: ignore[attr-defined]

    def share_with(self, other: EngineNet) -> None:
        """Use ``other``'s learnable blob tensors in the layers of the same name (Caffe's
        ShareTrainedLayersWith; the blob counts and shapes must match)."""
        _solver.share_trained_layers(self, other)


def layer_type_list() -> list[str]:
    """Every layer type the engine can run (pycaffe's ``caffe.layer_type_list()``): the built-in types,
    then the user's registered ones (``amct_caffe.register_layer``)."""
    return supported_types() + user_types()


# -- solvers ------------------------------------------------------------------------------------------------
class _FacadeNets:
    """Mixin: the solver's nets are pycaffe facade ``Net`` objects (``solver.net.blobs``, ``.params``...)."""

    def make_net(self, source: str | caffe_pb2.NetParameter, phase: int, level: int,
                 stages: Sequence[str]) -> EngineNet:
        return Net(source, phase, level=level, stages=list(stages))


class SGDSolver(_FacadeNets, _solver.SGDSolver):
    """pycaffe's ``caffe.SGDSolver(solver_file)``: SGD updates whatever ``type`` the file names, as pycaffe's
    solver classes do (``caffe.get_solver`` follows the file's type).

    ``solver.net`` and ``solver.test_nets`` are facade :class:`Net` objects (``solver.net.copy_from``,
    ``.blobs``, ``.params``); ``solver.iter``, ``step(n)``, ``solve(resume_file=None)``, ``snapshot()``,
    ``restore(path)`` behave as in pycaffe. The update rules are in :mod:`amct_caffe.engine.solver`.
    """


class NesterovSolver(_FacadeNets, _solver.NesterovSolver):
    """pycaffe's ``caffe.NesterovSolver(solver_file)`` (Nesterov updates; see :class:`SGDSolver`)."""


class AdaGradSolver(_FacadeNets, _solver.AdaGradSolver):
    """pycaffe's ``caffe.AdaGradSolver(solver_file)`` (AdaGrad updates; see :class:`SGDSolver`)."""


class RMSPropSolver(_FacadeNets, _solver.RMSPropSolver):
    """pycaffe's ``caffe.RMSPropSolver(solver_file)`` (RMSProp updates; see :class:`SGDSolver`)."""


class AdaDeltaSolver(_FacadeNets, _solver.AdaDeltaSolver):
    """pycaffe's ``caffe.AdaDeltaSolver(solver_file)`` (AdaDelta updates; see :class:`SGDSolver`)."""


class AdamSolver(_FacadeNets, _solver.AdamSolver):
    """pycaffe's ``caffe.AdamSolver(solver_file)`` (Adam updates; see :class:`SGDSolver`)."""


_FACADE_SOLVERS: dict[str, type[_solver.Solver]] = {
    cls.type_name: cls
    for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)
}


def get_solver(solver_file: str | os.PathLike[str] | caffe_pb2.SolverParameter) -> _solver.Solver:
    """pycaffe's ``caffe.get_solver``: the engine's ``get_solver`` choosing among the facade classes, whose
    nets are facade :class:`Net` objects."""
    return _solver.get_solver(solver_file, _FACADE_SOLVERS)
