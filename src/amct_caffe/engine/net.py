"""The engine's net: builds layers from a NetParameter and runs them in Caffe's order on torch tensors.

Semantics follow Caffe's ``Net``: layers run in file order; a top with the name of a bottom is computed in
place (the name then refers to the new value); blobs are created in order of first appearance; the net's
outputs are the blobs no later layer consumes (sorted by name, as Caffe keeps them in a ``std::set``);
``param { name }`` shares a blob between layers; weights are copied from a caffemodel by layer name.

The net only runs layers. Which implementation each layer gets is the caller's choice: the type's default
(float) layer, or a registered variant named per layer (``variants``), e.g. the deploy model's integer
layers that :mod:`amct_caffe.emulation.loader` chooses from a caffemodel. ``copy_from`` copies blobs and
nothing else; a caffemodel's integer blobs load only into layers that accept them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from amct_caffe.engine.allocation import AllocationGuard, net_total_error
from amct_caffe.engine.backward_plan import BackwardPlan, plan_backward
from amct_caffe.engine.device import current_device, full_float32
from amct_caffe.engine.layers import LayerVariant, layer_class
from amct_caffe.engine.layers.base import TEST, Layer
from amct_caffe.engine.layers.data import Input
from amct_caffe.engine.layers.python import allow_python_layers as python_layer_choice
from amct_caffe.engine.onnx_backend import (
    ENGINE,
    BackendStats,
    OrtBackend,
    check_backend,
    default_backend,
)
from amct_caffe.engine.optimize import (
    InferenceOptions,
    InferencePlan,
    TrainLayout,
    build_plan,
    contiguous_blob,
    is_channels_last,
)
from amct_caffe.errors import (
    AmctError,
    ConfigError,
    ModelFormatError,
    PythonLayerNotAllowedError,
    RuntimeEngineError,
    UnknownLayerError,
    UnknownNameError,
    WeightShapeError,
)
from amct_caffe.log import get_logger, log_once
from amct_caffe.model.blobs import (
    array_to_blob,
    blob_shape,
    blob_to_array,
    check_blob,
    shape_matches,
    storage_kind,
)
from amct_caffe.model.io import load_caffemodel, load_prototxt, save_caffemodel
from amct_caffe.model.layer_types import RETRAIN_TYPES
from amct_caffe.model.limits import max_elements, max_net_elements
from amct_caffe.model.phase import filter_net
from amct_caffe.model.validate import check_layers
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.net")

#: The BlobProto field each blob dtype is saved in (a deploy net's integer blobs keep their storage).
#: ``uint64_data`` words live in int64 tensors, bit for bit: torch < 2.3 has no uint64 dtype.
_STORAGE_KIND = {np.dtype(np.int8): "int8", np.dtype(np.int32): "int32", np.dtype(np.int64): "uint64"}

#: Blob storage kinds only a deploy caffemodel uses (only layers with ``accepts_integer_blobs`` load them).
INTEGER_STORAGE_KINDS = frozenset({"int8", "int32", "uint64"})

Tensor = torch.Tensor

#: Who is told the inputs of every whole forward (``run`` from layer 0) of any net: see ``observe_inputs``.
_INPUT_OBSERVERS: list[Callable[[Net, dict[str, Tensor]], None]] = []


@contextlib.contextmanager
def observe_inputs(observer: Callable[[Net, dict[str, Tensor]], None]) -> Iterator[None]:
    """Within the block, call ``observer(net, {input blob: value})`` before every whole forward of any net.

    This is how a flow sees the data a user's own code feeds (e.g. an evaluator's calibration batches) without
    owning the net; the values are the net's live tensors, so an observer that keeps them copies them.
    """
    _INPUT_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _INPUT_OBSERVERS.remove(observer)


class Recorded(NamedTuple):
    """One layer's part of the last forward that recorded a graph (see ``Net._record``)."""

    #: the blob values the layer read (a value's diff is keyed by the tensor's identity)
    bottoms: list[Tensor]
    #: the values it wrote
    tops: list[Tensor]
    #: per bottom, what the layer's forward was given: an alias of the value that only this layer read
    #: (the value itself where it has no graph)
    inputs: list[Tensor]


def layer_name(layer: caffe_pb2.LayerParameter, index: int) -> str:
    """The name the net gives layer ``index`` of its (phase-filtered) list: its own, or ``<type>_<index>``
    when it has none."""
    return layer.name or f"{layer.type}_{index}"


class Net:
    """A Caffe net in the engine.

    Args:
        model: a prototxt path or a ``NetParameter`` (V2; a path is upgraded on load).
        phase: ``caffe_pb2.TRAIN`` or ``caffe_pb2.TEST``.
        weights: optional caffemodel path or ``NetParameter`` whose blobs are copied in by layer name.
        device: torch device; default: the global mode (:mod:`amct_caffe.engine.device`).
        level, stages: the NetState used for include/exclude rules.
        variants: ``{layer name: variant}`` -- the registered implementation (a variant name or a
            :class:`~amct_caffe.engine.layers.registry.LayerVariant` with options) to build for that layer
            instead of its type's default; a type without the variant builds its default.
        allow_python_layers: True lets ``type: "Python"`` layers import their modules, False refuses,
            None (default) leaves it to ``allow_python_layers()`` blocks and the environment
            (:mod:`amct_caffe.engine.layers.python`).

    Raises:
        ModelFormatError: the net is malformed (unknown bottom, bad layer parameters).
        ConfigError: ``variants`` names a layer the net does not have.
        UnsupportedLayerError: a layer type the engine does not implement.
        PythonLayerNotAllowedError: a Python layer without the opt-in.
        WeightShapeError: a caffemodel blob's shape differs from the layer's.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | caffe_pb2.NetParameter,
        phase: int = TEST,
        *,
        weights: str | os.PathLike[str] | caffe_pb2.NetParameter | None = None,
        device: torch.device | str | None = None,
        level: int = 0,
        stages: Iterable[str] = (),
        variants: Mapping[str, str | LayerVariant] | None = None,
        allow_python_layers: bool | None = None,
    ) -> None:
        if isinstance(model, caffe_pb2.NetParameter):
            self.path = ""
            source = model
        else:
            self.path = str(model)
            source = load_prototxt(self.path)
        self.phase = phase
        self.device = torch.device(device) if device is not None else current_device()
        self.param = filter_net(source, phase, level, list(stages), self.path)
        for lp in self.param.layer:
            # Caffe stamps the net's phase into every layer parameter (it shows in saved caffemodels).
            if not lp.HasField("phase"):
                lp.phase = phase
        self.engine_layers: list[Layer] = []
        self.layer_names: list[str] = []
        self.layer_bottoms: list[list[str]] = []
        self.layer_tops: list[list[str]] = []
        self.blob_names: list[str] = []
        self.loss_weights: dict[tuple[int, int], float] = {}
        self._variants = {
            name: v if isinstance(v, LayerVariant) else LayerVariant(v)
            for name, v in (variants or {}).items()
        }
        self._data: dict[str, Tensor] = {}
        # Caffe's blob diffs: host float32 tensors (pycaffe's ``blob.diff`` arrays share their memory), made
        # when first asked for or written, and kept until a reshape changes the blob's shape
        self._diffs: dict[str, Tensor] = {}
        # the diff each bottom that shares its value with other bottoms last computed (Caffe's split tops)
        self._reader_diffs: dict[tuple[int, int], Tensor] = {}
        # (layer, param index) of every parameter that several layers share (``param { name: ... }``)
        self._shared_slots: set[tuple[int, int]] = set()
        # per layer, the (bottom, top) tensors of the last forward that recorded a graph (see ``run``)
        self._tape: list[Recorded | None] = []
        self._set_up = False
        self._plan: InferencePlan | None = None
        self._backend = default_backend()
        self._onnx = OrtBackend(self.path or self.param.name)
        self._train_layout: TrainLayout | None = None
        self.force_backward = bool(self.param.force_backward)
        self.backward_plan = BackwardPlan((), (), ())  # decided once the layers have their blobs (below)
        # an explicit choice for this net only; None keeps the caller's block or the environment
        choice = allow_python_layers
        with contextlib.nullcontext() if choice is None else python_layer_choice(choice):
            self._build()
        self._link()
        self.inputs: list[str] = self._input_blobs()
        self.outputs: list[str] = self._output_blobs()
        self.reshape()
        self._share_params()
        self.backward_plan = plan_backward(
            self.engine_layers, self.layer_bottoms, self.layer_tops, set(self.loss_weights),
            self.force_backward,
        )
        if weights is not None:
            self.copy_from(weights)

    # -- construction --------------------------------------------------------------------------------
    def _build(self) -> None:
        available: set[str] = set()
        for index, lp in enumerate(self.param.layer):
            lp.name = layer_name(lp, index)
        check_layers(self.param.layer, self.path or self.param.name)
        seen_names: dict[str, int] = {}
        for index, lp in enumerate(self.param.layer):
            if lp.name in seen_names:
                # Caffe runs such nets (HED, SSDLite ports): see copy_from for which layer gets weights.
                LOGGER.info(
                    "Net '%s': layers %d and %d are both named '%s'; a caffemodel's weights of that name "
                    "load into layer %d (the first), as in Caffe.",
                    self.path or self.param.name, seen_names[lp.name], index, lp.name, seen_names[lp.name],
                )
            else:
                seen_names[lp.name] = index
            variant = self._variants.get(lp.name, LayerVariant())
            cls = layer_class(lp.type, lp.name, self.path, variant.name)
            try:
                layer = cls.create(lp, self.phase, self.device, variant.options)
            except PythonLayerNotAllowedError as exc:  # the layer cannot know the file; name it here
                raise PythonLayerNotAllowedError(f"Net '{self.path or self.param.name}': {exc}") from None
            self.engine_layers.append(layer)
            self.layer_names.append(lp.name)
            self.layer_bottoms.append(list(lp.bottom))
            self.layer_tops.append(list(lp.top))
            for t_index, top in enumerate(lp.top):
                if top not in available:
                    self.blob_names.append(top)
                    available.add(top)
                weight = self._loss_weight(layer, lp, t_index)
                if weight:
                    self.loss_weights[(index, t_index)] = weight
        unknown = sorted(set(self._variants) - set(seen_names))
        if unknown:
            raise ConfigError(
                f"Net '{self.path or self.param.name}': variants are given for layers {unknown}, which the "
                f"net (phase {caffe_pb2.Phase.Name(self.phase)}) does not have."
            )

    def _link(self) -> None:
        """Hand every layer the layers that write its bottoms (see :meth:`Layer.link`)."""
        writer: dict[str, Layer] = {}
        for layer, bottoms, tops in zip(self.engine_layers, self.layer_bottoms, self.layer_tops):
            layer.link([writer[b] for b in bottoms])
            for top in tops:
                writer[top] = layer

    @staticmethod
    def _loss_weight(layer: Layer, lp: caffe_pb2.LayerParameter, t_index: int) -> float:
        if t_index < len(lp.loss_weight):
            return float(lp.loss_weight[t_index])
        return 1.0 if layer.loss_layer and t_index == 0 else 0.0

    def _input_blobs(self) -> list[str]:
        return [top for layer, tops in zip(self.engine_layers, self.layer_tops) if layer.type_name == "Input"
                for top in tops]

    def _output_blobs(self) -> list[str]:
        available: set[str] = set()
        for bottoms, tops in zip(self.layer_bottoms, self.layer_tops):
            available.difference_update(bottoms)
            available.update(tops)
        return sorted(available)

    def reshape(self) -> None:
        """(Re)compute every blob's shape from the input shapes; the first call also creates the layer blobs.

        Like Caffe's ``Net::Reshape``; it runs the layers once on the current input values (zeros at
        construction), which also validates the net.
        """
        set_up = self._set_up
        data: dict[str, Tensor] = {}
        label = self.path or self.param.name
        net_limit = max_net_elements()
        top_sizes: dict[str, int] = {}
        param_total = 0
        try:
            with torch.no_grad(), AllocationGuard(max_elements(), label) as guard:
                for layer, bottoms, tops in zip(self.engine_layers, self.layer_bottoms, self.layer_tops):
                    guard.layer = f"Layer '{layer.name}' (type {layer.type_name})"
                    # placeholder values: layers skip their side effects (statistics, data cursors, IFMR)
                    layer.reshaping = True
                    outs = self._shape_layer(layer, [data[b] for b in bottoms], set_up)
                    self._check_top_count(layer, tops, outs)
                    for name, value in zip(tops, outs):
                        data[name] = value
                        top_sizes[name] = value.numel()
                    param_total += sum(b.numel() for b in layer.blobs)
                    total = param_total + sum(top_sizes.values())
                    if total > net_limit:
                        raise net_total_error(label, guard.layer, total, net_limit)
        finally:
            for layer in self.engine_layers:
                layer.reshaping = False
        self._data = data
        self._set_up = True

    @staticmethod
    def _shape_layer(layer: Layer, inputs: list[Tensor], set_up: bool) -> list[Tensor]:
        """One layer's step of the shape pass: a torch error there is the layer's parameters' fault (a shape
        torch refuses, memory it cannot have), so it becomes an error naming the layer."""
        try:
            if not set_up:
                layer.setup(inputs)
            return layer.forward(inputs)
        except (NotImplementedError, AmctError):  # our own errors already name the layer and the fix
            raise
        except (RuntimeError, MemoryError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shapes = [tuple(x.shape) for x in inputs]
            raise layer.error(f"cannot be set up with its parameters and bottom shapes {shapes}: {reason}"
                              ) from exc

    @staticmethod
    def _check_top_count(layer: Layer, tops: Sequence[str], outs: Sequence[Tensor]) -> None:
        if len(outs) < len(tops):
            raise layer.error(f"produces {len(outs)} top(s) but the prototxt names {len(tops)}.")

    def _share_params(self) -> None:
        owners: dict[str, tuple[int, int]] = {}
        for li, layer in enumerate(self.engine_layers):
            for pi, spec in enumerate(layer.param.param):
                if not spec.name or pi >= len(layer.blobs):
                    continue
                if spec.name not in owners:
                    owners[spec.name] = (li, pi)
                    continue
                oli, opi = owners[spec.name]
                self._shared_slots |= {(oli, opi), (li, pi)}
                owner = self.engine_layers[oli].blobs[opi]
                mine = layer.blobs[pi]
                strict = spec.share_mode != caffe_pb2.ParamSpec.PERMISSIVE
                if (strict and owner.shape != mine.shape) or owner.numel() != mine.numel():
                    raise ModelFormatError(
                        f"Layer '{layer.name}' shares param '{spec.name}' with layer "
                        f"'{self.engine_layers[oli].name}' but their shapes differ: {tuple(mine.shape)} vs "
                        f"{tuple(owner.shape)}."
                    )
                layer.blobs[pi] = owner if owner.shape == mine.shape else owner.view(mine.shape)

    # -- running ---------------------------------------------------------------------------------------
    def layer_index(self, name: str) -> int:
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise UnknownLayerError(f"Net '{self.path or self.param.name}' has no layer '{name}'.") from None

    #: TEST phase: run through the optimised plan of :mod:`amct_caffe.engine.optimize` (BatchNorm/Scale
    #: folding, fused in-place ReLU, packed channels-last convolutions). Every blob keeps the value the
    #: layer-by-layer forward gives, up to float rounding; set False on a net (or the class) to run the
    #: layers exactly as written.
    optimize: bool = True

    @property
    def backend(self) -> str:
        """Who runs a TEST net's whole forwards: ``"engine"`` (default; see ``default_backend``),
        ``"onnxruntime"`` or ``"auto"`` (:mod:`amct_caffe.engine.onnx_backend`; every blob read still
        gives the engine's layer-by-layer value). Partial forwards, backward and TRAIN nets always run on
        the engine.

        Raises:
            ConfigError: (on assignment) an unknown backend.
        """
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value, f"Net '{self.path or self.param.name}': backend")

    @property
    def backend_stats(self) -> BackendStats:
        """What the ONNX Runtime backend did for this net (exports, forwards, fills, why not)."""
        return self._onnx.stats

    def run(self, start: int = 0, end: int | None = None, *, engine_only: bool = False) -> None:
        """Run layers ``start`` .. ``end`` (inclusive) on the current blob values (Caffe's ForwardFromTo).

        A whole TEST forward runs where :attr:`backend` says unless ``engine_only`` (e.g. when the caller
        reads intermediate blobs right after it)."""
        end = len(self.engine_layers) - 1 if end is None else end
        if start == 0 and _INPUT_OBSERVERS:
            self._tell_observers()
        whole = start == 0 and end == len(self.engine_layers) - 1
        if whole and self.phase == TEST and self._backend != ENGINE and not engine_only:
            self._onnx.run(self, self._data, self._backend)
            return
        self.run_engine(start, end)

    def run_engine(self, start: int, end: int) -> None:
        """Run layers ``start`` .. ``end`` (inclusive) on the engine (whatever :attr:`backend` says)."""
        data = self._data
        if self.phase == TEST and self.optimize:
            with torch.no_grad(), full_float32(self.device):
                self.inference_plan().run(data, start, end)
            return
        grad = torch.is_grad_enabled() and self.phase != TEST
        if grad:
            self._record(data, start, end)
            return
        with torch.no_grad(), full_float32(self.device):
            for i in range(start, end + 1):
                layer = self.engine_layers[i]
                outs = layer.forward([data[b] for b in self.layer_bottoms[i]])
                for name, value in zip(self.layer_tops[i], outs):
                    data[name] = value

    def _record(self, data: dict[str, Tensor], start: int, end: int) -> None:
        """Run layers ``start`` .. ``end`` with a graph, keeping each layer's bottom and top tensors for
        :meth:`backward`; a bottom that gets a diff but has no graph (a net input with ``force_backward``)
        becomes a leaf that records one.

        Each layer reads an alias (a view) of every bottom that has a graph, which only that layer reads:
        the gradient at the alias is the diff of that layer alone (Caffe's layer backward), while the
        gradient at the value itself would also collect every other path from the layer's tops to it (the
        other bottom of a residual Eltwise reaches it through the branch). The whole-net ``loss.backward()``
        of a solver is unaffected: a view passes its gradient on unchanged."""
        if len(self._tape) != len(self.engine_layers):
            self._tape = [None] * len(self.engine_layers)
        layout = self.train_layout()
        with torch.enable_grad(), full_float32(self.device):
            for i in range(start, end + 1):
                bottoms = []
                for j, name in enumerate(self.layer_bottoms[i]):
                    value = data[name]
                    leaf = not value.requires_grad and value.is_floating_point()
                    if self.backward_plan.bottom[i][j] and leaf:
                        value = data[name] = value.detach().requires_grad_(True)
                    bottoms.append(value)
                inputs = [b.view_as(b) if b.requires_grad else b for b in bottoms]
                outs = self.engine_layers[i].forward(layout.bottoms(i, inputs))
                tops = list(outs[:len(self.layer_tops[i])])
                for name, value in zip(self.layer_tops[i], tops):
                    data[name] = value
                self._tape[i] = Recorded(bottoms, tops, inputs)

    # -- backward --------------------------------------------------------------------------------------------
    def diff(self, name: str) -> Tensor:
        """Blob ``name``'s diff (Caffe's ``Blob::diff``): a host float32 tensor of the blob's shape, zeros
        until a backward pass or the caller writes it; a loss top's diff holds its loss weight, as Caffe
        seeds it.

        Raises:
            RuntimeEngineError: the net has no blob ``name``.
        """
        if name not in self._data:
            self.tensor(name)  # raises the error naming the net
        shape = tuple(self._data[name].shape)  # the shape only: no NCHW copy of a channels-last value
        value = self._diffs.get(name)
        if value is None or tuple(value.shape) != shape:
            value = self._diffs[name] = torch.zeros(shape, dtype=torch.float32)
            for (li, ti), weight in self.loss_weights.items():
                if self.layer_tops[li][ti] == name:
                    value.fill_(weight)
        return value

    def backward(self, start: int | None = None, end: int = 0) -> None:
        """Back-propagate layers ``start`` down to ``end`` (inclusive; Caffe's ``BackwardFromTo``).

        Each layer reads its tops' diffs and writes its bottoms' diffs (:meth:`diff`); a blob read by several
        layers gets the sum of their diffs (what Caffe's split layers compute), and a blob computed in place
        ends with the diff of its first value. Parameter diffs accumulate into the parameters' ``.grad``
        over calls, as Caffe's until ``ClearParamDiffs``. Which layers, bottoms and parameters take part
        follows Caffe (:mod:`amct_caffe.engine.backward_plan`); a deploy net without a loss layer computes
        nothing unless it sets ``force_backward: true``.

        The values are those of the last forward: a TRAIN net uses the graph that forward recorded; a TEST
        net, whose forward keeps no graph, re-runs its layers up to ``start`` with one, from the current
        values of the layers without bottoms (its inputs).

        Raises:
            RuntimeEngineError: the last forward kept no graph for these layers (forward first).
        """
        start = len(self.engine_layers) - 1 if start is None else start
        needed = [i for i in range(end, start + 1) if self.backward_plan.layer[i]]
        if not needed:
            return
        if self.phase == TEST:
            with self._params_with_grad():
                tape = self._test_tape(start)
                self._backprop(tape, start, end)
            return
        tape = self._tape
        if len(tape) != len(self.engine_layers) or any(tape[i] is None for i in needed):
            raise RuntimeEngineError(
                f"Net '{self.path or self.param.name}': backward needs a forward with gradients first "
                "(call forward() before backward())."
            )
        self._backprop(tape, start, end)

    @contextlib.contextmanager
    def _params_with_grad(self) -> Iterator[None]:
        """Let the parameters that take diffs record a graph for the block (a TEST net's do not by
        default)."""
        switched = []
        for layer, needs in zip(self.engine_layers, self.backward_plan.param):
            for blob, need in zip(layer.blobs, needs):
                if need and blob.is_leaf and not blob.requires_grad and blob.is_floating_point():
                    blob.requires_grad_(True)
                    switched.append(blob)
        try:
            yield
        finally:
            for blob in switched:
                blob.requires_grad_(False)

    def _test_tape(self, start: int) -> list[Recorded | None]:
        """Re-run a TEST net's layers ``0 .. start`` with a graph on a copy of its blobs; layers without
        bottoms (data, Input) keep their outputs, so data cursors do not move."""
        saved_tape, saved_data = self._tape, self._data
        data = dict(saved_data)
        self._tape = [None] * len(self.engine_layers)
        try:
            for i in range(start + 1):
                if self.layer_bottoms[i]:
                    self._record(data, i, i)
            return self._tape
        finally:
            self._tape, self._data = saved_tape, saved_data

    def _value_readers(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """``{(producer layer, top index): [(reader layer, bottom index), ...]}`` for every blob value."""
        writer: dict[str, tuple[int, int]] = {}
        readers: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, (bottoms, tops) in enumerate(zip(self.layer_bottoms, self.layer_tops)):
            for j, name in enumerate(bottoms):
                readers.setdefault(writer[name], []).append((i, j))
            for t, name in enumerate(tops):
                writer[name] = (i, t)
        return readers

    def _backprop(self, tape: Sequence[Recorded | None], start: int,
                  end: int) -> None:
        """Layer by layer, ``start`` down to ``end``, as Caffe's ``BackwardFromTo`` with its split layers: a
        value read by several layers keeps each reader's diff (``_reader_diffs``, as Caffe's split tops) and
        sums them into the blob's diff when the pass reaches the point right after the value's producer
        (where Caffe's split layer sits), so a pass that stops between the readers and the producer leaves
        the blob's diff as Caffe does."""
        grads: dict[int, Tensor] = {}  # id of a blob value (one version of a name) -> its diff
        plan = self.backward_plan
        readers = self._value_readers()
        # bottoms that read a value other bottoms read too (Caffe splits it)
        shared = {key for rs in readers.values() if len(rs) > 1 for key in rs}
        for i in range(start, end - 1, -1):
            entry = tape[i]
            if entry is None:
                continue
            bottoms, tops, inputs = entry
            if i < start:
                self._merge_reader_diffs(i, tops, readers, grads)
            if not plan.layer[i]:
                continue
            layer = self.engine_layers[i]
            outs, out_grads = [], []
            for name, top in zip(self.layer_tops[i], tops):
                if top.requires_grad:
                    outs.append(top)
                    out_grads.append(grads.get(id(top)))
                    if out_grads[-1] is None:
                        out_grads[-1] = self.diff(name).to(top.device).reshape(top.shape)
            wanted = [(j, b) for j, b in enumerate(bottoms) if plan.bottom[i][j] and b.requires_grad]
            # the gradient at the layer's own aliases of its bottoms: its diffs alone (see ``_record``)
            slots = [k for k, (blob, need) in enumerate(zip(layer.blobs, plan.param[i]))
                     if need and blob.requires_grad]
            params = [layer.blobs[k] for k in slots]
            if not outs or not (wanted or params):
                continue
            with full_float32(self.device):
                results: list[Tensor | None] = list(torch.autograd.grad(
                    outs, [inputs[j] for j, _ in wanted] + params, out_grads, retain_graph=True,
                    allow_unused=True))
                tied = [n for n, k in enumerate(slots) if (i, k) in self._shared_slots]
                if tied:
                    self._own_param_grads(entry, outs, out_grads, params, tied, results, len(wanted))
            for (j, bottom), g in zip(wanted, results[:len(wanted)]):
                g = torch.zeros_like(bottom) if g is None else g.detach()
                if (i, j) in shared:
                    self._reader_diffs[(i, j)] = g.cpu()
                    continue
                grads[id(bottom)] = g
                self._store_diff(self.layer_bottoms[i][j], g)
            for blob, g in zip(params, results[len(wanted):]):
                if g is not None:
                    # in the blob's (Caffe's) layout, as a whole-net backward leaves it: a channels-last
                    # convolution gives its weight gradient channels-last
                    g = g.detach().contiguous()
                    blob.grad = g if blob.grad is None else blob.grad + g

    @staticmethod
    def _own_param_grads(entry: Recorded, outs: Sequence[Tensor], out_grads: Sequence[Tensor | None],
                         params: Sequence[Tensor], shared: Sequence[int], results: list[Tensor | None],
                         offset: int) -> None:
        """Keep in ``results[offset + n]`` (the gradient of the layer's tops at its parameter ``params[n]``,
        ``n`` in ``shared``) only what flows through the layer's own use of the parameter.

        A parameter the layer shares with a layer before it also reaches its tops through its bottoms (two
        InnerProducts with one weight, stacked); autograd's gradient at the parameter counts both paths,
        Caffe's layer backward only the first. The path through the bottoms is the gradient at the bottom
        values of their own diffs (the gradient at the layer's aliases of them), which is subtracted."""
        bottoms, _, inputs = entry
        through = [(b, a) for b, a in zip(bottoms, inputs) if a is not b and a.requires_grad]
        if not through:
            return
        diffs = torch.autograd.grad(outs, [a for _, a in through], out_grads, retain_graph=True,
                                    allow_unused=True)
        reached = [(b, d) for (b, _), d in zip(through, diffs) if d is not None]
        if not reached:
            return
        indirect = torch.autograd.grad([b for b, _ in reached], [params[n] for n in shared],
                                       [d for _, d in reached], retain_graph=True, allow_unused=True)
        for n, g in zip(shared, indirect):
            total = results[offset + n]
            if g is not None and total is not None:
                results[offset + n] = total - g

    def _merge_reader_diffs(self, i: int, tops: Sequence[Tensor],
                            readers: Mapping[tuple[int, int], Sequence[tuple[int, int]]],
                            grads: dict[int, Tensor]) -> None:
        """Caffe's split layers after layer ``i``: each of its tops read by several bottoms gets the sum of
        their diffs (a reader's last diff, zeros before its first) when one of them takes diffs."""
        for t, top in enumerate(tops):
            rs = readers.get((i, t), [])
            if len(rs) < 2 or not any(self.backward_plan.bottom[r][jr] for r, jr in rs):
                continue
            total = torch.zeros(top.shape, dtype=torch.float32)
            for key in rs:
                part = self._reader_diffs.get(key)
                if part is not None and part.shape == total.shape:
                    total += part
            grads[id(top)] = total.to(top.device)
            self._store_diff(self.layer_tops[i][t], total)

    def _store_diff(self, name: str, value: Tensor) -> None:
        target = self.diff(name)
        target.copy_(value.detach().reshape(target.shape).cpu())

    def _tell_observers(self) -> None:
        inputs = {name: self._data[name] for name in self.inputs if name in self._data}
        for observer in list(_INPUT_OBSERVERS):
            observer(self, inputs)

    def loss(self) -> Tensor:
        """The weighted sum of the loss tops from the last run (Caffe's net loss)."""
        total = torch.zeros((), device=self.device)
        for (li, ti), weight in self.loss_weights.items():
            total = total + weight * self._data[self.layer_tops[li][ti]].sum()
        return total

    def train_layout(self) -> TrainLayout:
        """The layout in which a recording forward hands each layer its bottoms, decided on first use and
        when the layer list changed (see :class:`~amct_caffe.engine.optimize.TrainLayout`)."""
        layout = self._train_layout
        if layout is None or layout.signature != tuple(map(id, self.engine_layers)):
            shapes = {name: tuple(value.shape) for name, value in self._data.items()}
            layout = self._train_layout = TrainLayout(self.engine_layers, self.device, shapes)
        return layout

    def invalidate_caches(self) -> None:
        """Forget everything derived from the weights -- the optimised TEST plan's folded and packed
        parameters and the ONNX Runtime session -- so that the next forward rebuilds it from the blobs.

        Needed only after weight writes the net cannot see: through a torch ``.data`` alias of a blob, or
        ``blob.numpy()`` written by library code (:mod:`amct_caffe.engine.optimize`). Writes through
        ``net.params[...][i].data``, ``copy_from`` and in-place torch ops on the blob itself are seen.
        """
        if self._plan is not None:
            self._plan.invalidate()
        self._onnx.invalidate()

    def inference_plan(self, options: InferenceOptions | None = None) -> InferencePlan:
        """The optimised TEST-phase plan, built on first use, when the layer list changed, or with new
        ``options`` (which later calls keep)."""
        plan = self._plan
        if options is not None or plan is None or plan.signature != tuple(map(id, self.engine_layers)):
            options = options or (plan.options if plan is not None else None)
            plan = self._plan = build_plan(self.engine_layers, self.phase, self.device, options)
        return plan

    def tensor(self, name: str) -> Tensor:
        if self._onnx.pending(self._data, name):
            self._onnx.fill(self, self._data)  # the last forward ran in ONNX Runtime: the engine's values
        try:
            value = self._data[name]
        except KeyError:
            raise UnknownNameError(f"Net '{self.path or self.param.name}' has no blob '{name}'.") from None
        if is_channels_last(value) and not value.requires_grad:
            # the optimised forward's channels-last layout; Caffe blobs (and pycaffe arrays) are NCHW. A
            # recording forward's value stays the live tensor of the graph (same values and shape).
            value = contiguous_blob(self._data, name)
        return value

    def nchw_tensor(self, name: str) -> Tensor:
        """Blob ``name``'s value in Caffe's NCHW layout (C-contiguous), for numpy views such as pycaffe's
        ``blob.data``: a channels-last value is replaced by its NCHW copy, so writes through the view land
        in the blob later reads see; a recording forward's graph keeps the original.

        Raises:
            UnknownNameError: the net has no blob ``name``.
        """
        value = self.tensor(name)
        return contiguous_blob(self._data, name) if is_channels_last(value) else value

    def set_tensor(self, name: str, value: Tensor) -> None:
        if self._onnx.pending(self._data, name):
            self._onnx.fill(self, self._data)  # the other blobs keep the last forward's values
        if name in self.inputs:
            self.input_layer(name).set_input(name, value)
        self._data[name] = value

    def input_layer(self, blob: str) -> Input:
        for layer, tops in zip(self.engine_layers, self.layer_tops):
            if isinstance(layer, Input) and blob in tops:
                return layer
        raise RuntimeEngineError(f"'{blob}' is not an input blob of net '{self.path or self.param.name}'.")

    # -- weights ---------------------------------------------------------------------------------------
    def copy_from(
        self, weights: str | os.PathLike[str] | caffe_pb2.NetParameter, *, path: str | None = None
    ) -> None:
        """Copy blobs from a caffemodel into the layers of the same name (Caffe's CopyTrainedLayersFrom).

        Layers of the caffemodel that the net lacks are ignored; layers of the net absent from the
        caffemodel keep their filler values. Both are logged. Where several layers of the net share a name,
        every caffemodel layer of that name is copied into the first of them, as Caffe's linear search
        does; the later ones keep their filler values (a WARNING names them when they have blobs).
        Blobs only: the layers stay what the net was built with, so a deploy caffemodel's integer blobs need
        a net built with the integer variants (:func:`amct_caffe.emulation.loader.load_net`, or
        ``caffe.Net``).

        Args:
            weights: a caffemodel path or a parsed ``NetParameter``.
            path: the file to name in errors when ``weights`` is already parsed.

        Raises:
            WeightShapeError: a layer's blob count or a blob's shape differs from the net's, or a blob is
                stored as integers (a deploy model) for a layer that holds float blobs.
        """
        if isinstance(weights, caffe_pb2.NetParameter):
            source, path = weights, path or ""
        else:
            path = str(weights)
            source = load_caffemodel(path)
        by_name: dict[str, Layer] = {}
        for layer in self.engine_layers:
            by_name.setdefault(layer.name, layer)
        self._check_storage(source, by_name, path)
        copied: set[str] = set()
        for src in source.layer:
            target = by_name.get(src.name)
            if target is None:
                LOGGER.debug("Ignoring source layer %s (not in the net)", src.name)
                continue
            if not src.blobs:
                continue
            if len(src.blobs) != len(target.blobs):
                raise WeightShapeError(
                    f"Layer '{src.name}': the caffemodel '{path}' holds {len(src.blobs)} blob(s) but the "
                    f"net's layer has {len(target.blobs)}; the prototxt and the caffemodel do not belong "
                    "together (check bias_term and the layer type)."
                )
            for i, blob in enumerate(src.blobs):
                self._copy_blob(target, i, blob, path)
            target.blobs_loaded()
            copied.add(src.name)
        missing = [layer for layer in self.engine_layers if layer.blobs and layer.name not in copied]
        for layer in missing:
            if layer.type_name not in RETRAIN_TYPES:
                LOGGER.info("Layer '%s' not found in the caffemodel; it keeps its filler values.", layer.name)
        for layer in self.engine_layers:
            if layer.blobs and layer.name in copied and by_name[layer.name] is not layer:
                LOGGER.warning(
                    "Layer '%s' shares its name with an earlier layer, which got the caffemodel's weights of "
                    "that name (as in Caffe); this one keeps its filler values. Rename one of them.",
                    layer.name,
                )
        retrain = [layer.name for layer in missing if layer.type_name in RETRAIN_TYPES]
        if retrain:
            # a new retrain model has no clip values yet: expected, and not a problem
            log_once(LOGGER, logging.INFO, ("retrain clips", path, tuple(retrain)),
                     "Retrain layer(s) %s start from their parameters: IFMR sets their clip values on the "
                     "first forward (as expected for a model from create_quant_retrain_model).",
                     ", ".join(retrain))
        learnable = [layer.name for layer in self.engine_layers if layer.blobs]
        if learnable and not copied and any(src.blobs for src in source.layer):
            LOGGER.warning("No layer of caffemodel '%s' matches a layer of net '%s' by name; every layer "
                           "keeps its filler values (is it the caffemodel of another net?).", path,
                           self.path or self.param.name)

    @staticmethod
    def _check_storage(source: caffe_pb2.NetParameter, by_name: Mapping[str, Layer], path: str) -> None:
        """Refuse, before copying anything, a blob whose values do not fill its shape and integer blobs meant
        for a layer that holds float blobs."""
        for src in source.layer:
            target = by_name.get(src.name)
            if target is None:
                continue
            for index, blob in enumerate(src.blobs):
                check_blob(blob, file=path, layer=src.name, index=index)
            if target.accepts_integer_blobs:
                continue
            for index, blob in enumerate(src.blobs):
                kind = storage_kind(blob)
                if kind in INTEGER_STORAGE_KINDS:
                    where = f" in '{path}'" if path else ""
                    raise WeightShapeError(
                        f"Blob {index} of layer '{src.name}'{where} is stored as {kind}: the caffemodel is "
                        f"a deploy model, and the net's layer (type {target.type_name}) holds float blobs. "
                        "Load the deploy model with amct_caffe.emulation.loader.load_net (or caffe.Net), "
                        "which builds the integer emulation's layers."
                    )

    @staticmethod
    def _copy_blob(layer: Layer, index: int, blob: caffe_pb2.BlobProto, path: str) -> None:
        target = layer.blobs[index]
        shape = tuple(target.shape)
        if not shape_matches(blob, shape):
            raise WeightShapeError(
                f"Cannot copy blob {index} of layer '{layer.name}' from '{path}': shape mismatch. "
                f"Caffemodel shape {blob_shape(blob)}, net shape {shape}. Use the prototxt the caffemodel "
                "was trained with."
            )
        array = blob_to_array(blob, shape, file=path, layer=layer.name, index=index)
        if array.dtype == np.uint64:
            array = array.view(np.int64)  # same bits; torch < 2.3 has no uint64 (see _STORAGE_KIND)
        values = torch.from_numpy(array)
        with torch.no_grad():
            if values.dtype == target.dtype:
                target.copy_(values)
            else:
                layer.blobs[index] = values.to(target.device)

    def to_proto(self, write_diff: bool = False) -> caffe_pb2.NetParameter:
        """The net with its layer parameters and current blobs, as Caffe's ``Net::ToProto``."""
        # Caffe writes only the net's name and its layers (each with its phase-stamped parameter).
        out = caffe_pb2.NetParameter(name=self.param.name)
        for src, layer in zip(self.param.layer, self.engine_layers):
            lp = out.layer.add()
            lp.CopyFrom(src)
            del lp.blobs[:]
            for blob in layer.blobs:
                array = blob.detach().cpu().numpy()
                kind = _STORAGE_KIND.get(array.dtype, "float")
                if kind == "uint64":
                    array = array.view(np.uint64)
                proto = array_to_blob(array, lp.blobs.add(), kind=kind)
                if write_diff and blob.grad is not None:
                    proto.diff.extend(blob.grad.detach().cpu().numpy().reshape(-1).tolist())
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the net's weights as a binary caffemodel, atomically."""
        save_caffemodel(self.to_proto(), path)

    def blob_arrays(self) -> dict[str, np.ndarray]:
        """Every blob's current value as numpy (a copy), in blob order."""
        return {name: self.tensor(name).detach().cpu().numpy().copy() for name in self.blob_names}
