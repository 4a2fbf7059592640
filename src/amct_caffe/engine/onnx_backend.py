"""An optional ONNX Runtime backend for whole-net TEST forwards, with every blob keeping its engine value.

A TEST-phase net whose ``backend`` is ``"onnxruntime"`` (or ``"auto"``, see below) runs a whole forward
(``Net.run()`` from the first layer to the last) in an ONNX Runtime ``InferenceSession``:

* **Export.** The net's own layers are traced: a wrapper module runs the engine's TEST plan
  (:mod:`amct_caffe.engine.optimize`: BatchNorm/Scale folded, ReLU fused, plain ``F.conv2d`` -- no
  channels-last or oneDNN packing, which do not export) and ``torch.onnx.export`` records it, so each
  layer's semantics stay in its engine class. Layers without bottoms (``Input``, data layers) run on the
  engine at every forward and feed the session. After export, ``Add``/``Mul`` nodes whose constant operand
  comes first are written with it second (same value), so ONNX Runtime fuses them into the convolution
  before them (measured: MobileNet-v2 runs 1.7x faster with the swap, as fast as the same net written in
  ``torch.nn``).
* **Check.** The first run of a new session is compared with the engine's values for the same inputs (the
  wrapper's own outputs); a difference above ``1e-4`` of the output's largest value (the tolerance of the
  engine's own checks against Caffe) keeps the net on the engine.
* **Tail and fallback, never an error.** The first layer outside :data:`EXPORTABLE` (data-dependent
  Python such as SSD's DetectionOutput, Accuracy, Python and custom layers, IFMR and the QAT layers,
  variants such as the integer emulation) and every later one run on the engine after the session, from
  the blobs the session computed. Where that leaves nothing to export, or on an export or session error,
  a CUDA net without ONNX Runtime's CUDA provider, or a failed check, the whole net runs on the engine and
  the reason is logged once.
* **Re-export** when the input shapes change or a learnable blob changes: torch's version counter, another
  tensor put into ``layer.blobs``, and the numpy arrays pycaffe hands out (``net.params[...][i].data``,
  reported to :mod:`amct_caffe.engine.optimize`): an array handed out after the export counts as a change;
  one alive at export time is compared by value at every forward (a copy of its blob is kept).
* **Blobs.** Only the net's outputs (and what the tail reads) come from the session. The other blobs are
  marked pending; the first read of one (``Net.tensor``, hence pycaffe's ``blob.data``) runs the engine's
  forward of the exported layers on the inputs the session saw (kept as a copy) and fills every blob with
  its layer-by-layer value. That read thus costs one engine forward (counted in
  :attr:`BackendStats.fills`).

``"auto"`` switches a net to the session only where it pays: after whole forwards with the same input
shapes and weights, no intermediate blob read between them, and an engine time at least the estimated
export time (:data:`AUTO_EXPORT_SECONDS_PER_LAYER` per layer; rent-or-buy: at most twice the better
choice's cost); it keeps the session only if its measured forward is faster than the engine's, and goes
back to the engine once a caller reads an intermediate blob after a session forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import io
import itertools
import logging
import operator
import os
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from amct_caffe.engine.layers import activation, fork, normalization, quant, ssd, structure, vision
from amct_caffe.engine.layers.base import TEST, Layer
from amct_caffe.engine.optimize import (
    InferenceOptions,
    blob_version,
    build_plan,
    param_array_alive,
    param_array_epoch,
    param_array_since,
)
from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger, log_once

LOGGER = get_logger("engine.onnx_backend")

Tensor = torch.Tensor

_VERSION = operator.attrgetter("_version")

#: The environment variable that chooses every new net's backend (default ``engine``).
BACKEND_ENV = "AMCT_CAFFE_BACKEND"
ENGINE = "engine"
ONNXRUNTIME = "onnxruntime"
AUTO = "auto"
BACKENDS = (ENGINE, ONNXRUNTIME, AUTO)

#: ``auto``'s estimate of the export time (trace, ONNX, session, check) per layer, in seconds: measured
#: 2-25 ms per layer for ResNet-50 (229 layers) and MobileNet-v2 (209) at batch 1 and 8 on a 2-core
#: machine under load 7-12 (docs/design.md).
AUTO_EXPORT_SECONDS_PER_LAYER = 0.02

#: A session output may differ from the engine's by this fraction of the output's largest value.
CHECK_TOLERANCE = 1e-4

#: Layer classes whose TEST forward traces faithfully (torch ops only; Python decisions depend on shapes
#: and parameters, never on values). Exact classes: a subclass or variant (the integer emulation) is not
#: covered.
EXPORTABLE: frozenset[type[Layer]] = frozenset({
    vision.Convolution, vision.Deconvolution, vision.InnerProduct, vision.Pooling,
    fork.ConvolutionDepthwise, fork.DepthwiseConvolution, fork.ShuffleChannel, fork.Axpy, fork.Upsample,
    fork.Interp,
    activation.ReLU, activation.ReLU6, activation.PReLU, activation.ELU, activation.Sigmoid, activation.TanH,
    activation.AbsVal, activation.BNLL, activation.Power, activation.Exp, activation.Log,
    activation.Clip, activation.Swish, activation.Dropout,
    normalization.BatchNorm, normalization.Scale, normalization.Bias, normalization.LRN,
    structure.Eltwise, structure.Concat, structure.Slice, structure.Split, structure.Flatten,
    structure.Reshape, structure.Softmax, structure.Crop,
    ssd.Permute, ssd.Normalize,
    ssd.PriorBox,  # its values depend on the shapes only: a constant of the export
    # the fake-quant model's layers (their double-precision arithmetic exports as it is; DeQuant's choice
    # between identity and shift-N depends on its blobs, which a weight change re-exports)
    quant.Quant, quant.DeQuant, quant.AntiQuant,
})


def check_backend(value: str, where: str = "backend") -> str:
    """``value`` if it names a backend, else a :class:`ConfigError` naming ``where`` and the choices."""
    if value not in BACKENDS:
        raise ConfigError(f"{where} is '{value}'; choose one of {', '.join(BACKENDS)}.")
    return value


#: The innermost :func:`use_backend` choice (None: none, the environment decides).
_CHOICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("amct_caffe_backend", default=None)


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Within the block, nets built by any code (the AMCT API calls and the command line's flows included)
    start with ``backend``; ``None`` leaves it to ``$AMCT_CAFFE_BACKEND``.

    Raises:
        ConfigError: ``backend`` names no backend.
    """
    token = _CHOICE.set(None if backend is None else check_backend(backend))
    try:
        yield
    finally:
        _CHOICE.reset(token)


def default_backend() -> str:
    """The backend a net built now starts with: the innermost :func:`use_backend` choice, else
    ``$AMCT_CAFFE_BACKEND``, else ``engine``.

    Raises:
        ConfigError: the variable names no backend.
    """
    choice = _CHOICE.get()
    if choice is not None:
        return choice
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    return check_backend(value, f"${BACKEND_ENV}") if value else ENGINE


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (the ``ort`` extra) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


class WholeNet(Protocol):
    """What the backend needs of a net (``amct_caffe.engine.net.Net`` provides it)."""

    engine_layers: list[Layer]
    layer_bottoms: list[list[str]]
    layer_tops: list[list[str]]
    outputs: list[str]
    device: torch.device
    optimize: bool

    def run_engine(self, start: int, end: int) -> None:
        """Run layers ``start .. end`` on the engine."""


@dataclass
class BackendStats:
    """What one net's backend did (for tests, logs and the benchmark).

    Attributes:
        exports: sessions built (each a trace and an ONNX Runtime session).
        export_seconds: the time of the last export, session creation and check included.
        session_forwards: whole forwards run by ONNX Runtime.
        engine_forwards: whole forwards run by the engine while the backend was asked for.
        fills: engine forwards run because a pending blob was read after a session forward.
        reason: why the net last stayed on the engine ("" when it did not).
    """

    exports: int = 0
    export_seconds: float = 0.0
    session_forwards: int = 0
    engine_forwards: int = 0
    fills: int = 0
    reason: str = ""


class _Layout:
    """The net's layers in three parts: up to the first layer that does not export (the cut), the sources
    (no bottoms; run on the engine, they feed the session) and the exported layers (``segments``); from the
    cut on, the tail, run on the engine after the session from the blobs the session computed."""

    def __init__(self, net: WholeNet) -> None:
        layers = net.engine_layers
        bottoms, tops = net.layer_bottoms, net.layer_tops
        n = len(layers)
        self.layers = list(layers)
        self.signature = tuple(map(id, layers))
        self.cut = next((i for i, layer in enumerate(layers)
                         if bottoms[i] and type(layer) not in EXPORTABLE), n)
        #: the first layer that does not export (the tail's first), if any
        self.blocker = layers[self.cut] if self.cut < n else None
        head = range(self.cut)
        self.sources = [i for i in head if not bottoms[i]]
        source_set = set(self.sources)
        self.segments: list[tuple[int, int]] = []  # maximal runs of exported layers, in order
        written: set[str] = set()
        #: a source's top that an earlier exported layer writes too (the traced module would confuse them)
        self.clash = ""
        for i in head:
            if i in source_set:
                self.clash = self.clash or next(iter(written & set(tops[i])), "")
                continue
            written.update(tops[i])
            if self.segments and self.segments[-1][1] == i - 1:
                self.segments[-1] = (self.segments[-1][0], i)
            else:
                self.segments.append((i, i))
        source_tops = {t for i in self.sources for t in tops[i]}
        read = {b for i in head if i not in source_set for b in bottoms[i]}
        self.inputs = sorted(source_tops & read)
        last_writer: dict[str, int] = {}
        for i in head:
            for t in tops[i]:
                last_writer[t] = i
        from_session = {name for name, i in last_writer.items() if i not in source_set}
        tail_reads = {b for i in range(self.cut, n) for b in bottoms[i]}
        #: blobs the tail computes: fresh after every forward
        self.tail_writes = {t for i in range(self.cut, n) for t in tops[i]}
        finals = set(net.outputs) - self.tail_writes
        #: the session's outputs: what the tail reads and the net's outputs the exported layers compute
        self.outputs = sorted(from_session & (tail_reads | finals))
        #: blobs whose value after a session forward is older than it
        self.pending = from_session - set(self.outputs) - self.tail_writes


def _copy(value: Tensor) -> Tensor:
    """A copy of an input blob. On the CPU through numpy: a torch copy runs on OpenMP threads, which then
    spin for a while and take the cores from ONNX Runtime's threads during the session run."""
    value = value.detach()
    if value.device.type != "cpu":
        return value.clone()
    return torch.from_numpy(np.array(value.numpy(), copy=True))


class _Weights:
    """The learnable blobs a session was exported with, and whether they changed since."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = tuple(tensors)
        self.versions = tuple(blob_version(t) for t in self.tensors)
        self.epoch = param_array_epoch()
        # blobs a live numpy array can write at any time: compared by value
        self.copies = {k: t.detach().clone() for k, t in enumerate(self.tensors)
                       if t.device.type == "cpu" and param_array_alive(t)}

    def unchanged(self, tensors: Sequence[Tensor]) -> bool:
        if len(tensors) != len(self.tensors):
            return False
        try:  # once per forward over every blob: the version counters read directly
            versions = tuple(map(_VERSION, tensors))
        except RuntimeError:  # an inference tensor keeps no version: treat it as changed
            return False
        if versions != self.versions or list(map(id, tensors)) != list(map(id, self.tensors)):
            return False
        for k, copy in self.copies.items():
            if not torch.equal(copy, self.tensors[k]):
                return False
        epoch = param_array_epoch()
        if epoch == self.epoch:
            return True
        if any(k not in self.copies and param_array_since(t, self.epoch) for k, t in enumerate(self.tensors)):
            return False
        self.epoch = epoch  # hand-outs so far were of other blobs: look only at later ones from now on
        return True


class _Traced(torch.nn.Module):
    """The net's non-source layers as a module: inputs in ``layout.inputs`` order, outputs in
    ``layout.outputs`` order."""

    def __init__(self, net: WholeNet, layout: _Layout) -> None:
        super().__init__()
        options = InferenceOptions(fold=net.optimize, channels_last=False, prepack=False)
        self.plan = build_plan(net.engine_layers, TEST, net.device, options)
        self.layout = layout

    def forward(self, *values: Tensor) -> tuple[Tensor, ...]:
        data = dict(zip(self.layout.inputs, values))
        for start, end in self.layout.segments:
            self.plan.run(data, start, end)
        return tuple(data[name] for name in self.layout.outputs)


class _Session:
    """One exported net: its ONNX Runtime session and what it is valid for."""

    def __init__(self, session: Any, mode: str, key: tuple[Any, ...], weights: _Weights,
                 seconds: float) -> None:
        self.session = session
        self.mode = mode
        self.key = key
        self.weights = weights
        self.seconds = seconds
        self.feed_names = [i.name for i in session.get_inputs()]


class OrtBackend:
    """One net's ONNX Runtime state: the session, the pending blobs of the last session forward, and what
    ``auto`` has measured.

    Args:
        label: the net's name in logs.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.stats = BackendStats()
        self._layout: _Layout | None = None
        self._session: _Session | None = None
        #: (layer signature, input key) pairs that must stay on the engine, with the reason
        self._refused: dict[tuple[Any, ...], str] = {}
        # the blob dictionary and inputs of the last session forward, while its blobs are pending
        self._pending_data: dict[str, Tensor] | None = None
        self._snapshot: dict[str, Tensor] = {}
        # auto: the engine's whole-forward times since the last intermediate read, for one input key
        self._auto_key: tuple[Any, ...] | None = None
        self._engine_times: list[float] = []
        self._auto_weights: _Weights | None = None
        self._read_since_forward = False

    # -- the whole forward ---------------------------------------------------------------------------
    def run(self, net: WholeNet, data: dict[str, Tensor], mode: str) -> None:
        """Run a whole TEST forward of ``net`` on ``data``: in the session where ``mode`` and the net allow
        it, else on the engine."""
        self._pending_data = None
        layout = self._layout_of(net)
        reason = self._unexportable(layout)
        if reason:
            self._refuse(None, reason, quiet=mode == AUTO)
            net.run_engine(0, len(net.engine_layers) - 1)
            return
        for i in layout.sources:
            net.run_engine(i, i)
        key = self._key(net, layout, data)
        session = None
        if (layout.signature, key) not in self._refused and self._wanted(net, key, mode):
            session = self._session_for(net, layout, data, key, mode)
        if session is None:
            self._engine_rest(net, layout, mode, key)
        else:
            self._session_forward(net, layout, session, data)
        if layout.cut < len(net.engine_layers):
            net.run_engine(layout.cut, len(net.engine_layers) - 1)

    def _unexportable(self, layout: _Layout) -> str:
        """Why no layer of the net can run in a session ("" when some can)."""
        blocker = layout.blocker
        if not layout.segments and blocker is not None:
            return f"layer '{blocker.name}' (type {blocker.type_name}) is not exported to ONNX"
        if not layout.segments:
            return "the net has no layer with bottoms"
        if layout.clash:
            return f"blob '{layout.clash}' of a layer without bottoms is also written by an earlier layer"
        if blocker is not None:
            log_once(LOGGER, logging.INFO, ("onnx backend tail", self.label, blocker.name),
                     "Net '%s': layers from '%s' (type %s, not exported to ONNX) on run on the engine after "
                     "the ONNX Runtime session.", self.label, blocker.name, blocker.type_name)
        return ""

    def _engine_rest(self, net: WholeNet, layout: _Layout, mode: str, key: tuple[Any, ...]) -> None:
        start = time.perf_counter()
        for a, b in layout.segments:
            net.run_engine(a, b)
        self.stats.engine_forwards += 1
        if mode == AUTO:
            weights = self._weights_of(net)
            if key != self._auto_key or self._read_since_forward or self._auto_weights is None \
                    or not self._auto_weights.unchanged(weights):
                self._auto_key, self._engine_times, self._auto_weights = key, [], _Weights(weights)
            self._engine_times.append(time.perf_counter() - start)
            self._read_since_forward = False

    def _wanted(self, net: WholeNet, key: tuple[Any, ...], mode: str) -> bool:
        if mode == ONNXRUNTIME:
            return True
        session = self._session
        if session is not None:
            if session.key == key and session.weights.unchanged(self._weights_of(net)):
                return True
            self._drop("the input shapes or the weights changed")  # auto pays for an export again
        if key != self._auto_key or self._read_since_forward or self._auto_weights is None \
                or not self._auto_weights.unchanged(self._weights_of(net)):
            return False
        estimate = AUTO_EXPORT_SECONDS_PER_LAYER * len(net.engine_layers)
        return sum(self._engine_times) >= estimate

    def _session_forward(self, net: WholeNet, layout: _Layout, session: _Session,
                         data: dict[str, Tensor]) -> None:
        self._snapshot = {name: _copy(data[name]) for name in layout.inputs}
        outs = self._ort_run(session, layout, data)
        for name, value in zip(layout.outputs, outs):
            data[name] = torch.from_numpy(value).to(net.device)
        self._pending_data = data
        self.stats.session_forwards += 1

    @staticmethod
    def _ort_run(session: _Session, layout: _Layout, data: dict[str, Tensor]) -> list[np.ndarray]:
        feeds = {f"in{k}": data[name].detach().cpu().numpy() for k, name in enumerate(layout.inputs)}
        result: list[np.ndarray] = session.session.run(None, {n: feeds[n] for n in session.feed_names})
        return result

    # -- pending blobs ---------------------------------------------------------------------------------
    def pending(self, data: dict[str, Tensor], name: str) -> bool:
        """Whether ``name`` in ``data`` still holds a value older than the last (session) forward."""
        layout = self._layout
        if layout is not None and name in layout.pending:
            self._read_since_forward = True
            return self._pending_data is data
        return False

    def fill(self, net: WholeNet, data: dict[str, Tensor]) -> None:
        """Give every blob the engine's value for the last session forward's inputs (one engine forward
        of the exported layers; the tail's blobs are already the engine's)."""
        layout = self._layout
        self._pending_data = None
        if layout is None:
            return
        tail = {name: data[name] for name in layout.tail_writes if name in data}
        for name, value in self._snapshot.items():
            data[name] = value
        for a, b in layout.segments:
            net.run_engine(a, b)
        data.update(tail)  # a tail layer in place on a blob of the exported layers keeps its value
        self.stats.fills += 1
        if self._session is not None and self._session.mode == AUTO:
            self._drop("intermediate blobs are read after forwards")

    # -- sessions ----------------------------------------------------------------------------------------
    def _layout_of(self, net: WholeNet) -> _Layout:
        layout = self._layout
        # a list compares its items by identity first (layers define no equality): a cheap C loop
        if layout is None or layout.layers != net.engine_layers:
            layout = self._layout = _Layout(net)
            self._session = None
        return layout

    @staticmethod
    def _key(net: WholeNet, layout: _Layout, data: dict[str, Tensor]) -> tuple[Any, ...]:
        shapes = tuple((tuple(data[n].shape), str(data[n].dtype)) for n in layout.inputs)
        return (str(net.device), bool(net.optimize), torch.get_num_threads(), shapes)

    @staticmethod
    def _weights_of(net: WholeNet) -> list[Tensor]:
        return list(itertools.chain.from_iterable(layer.blobs for layer in net.engine_layers))

    def _session_for(self, net: WholeNet, layout: _Layout, data: dict[str, Tensor], key: tuple[Any, ...],
                     mode: str) -> _Session | None:
        session = self._session
        weights = self._weights_of(net)
        if session is not None and session.key == key and session.weights.unchanged(weights):
            return session
        self._session = None
        start = time.perf_counter()  # the first export's cost includes importing the exporter
        if not onnxruntime_available():
            self._refuse(None, "onnxruntime and onnx are not installed (pip install amct-caffe[ort])",
                         quiet=mode == AUTO)
            return None
        providers = self._providers(net.device)
        if providers is None:
            self._refuse((layout.signature, key), f"ONNX Runtime has no provider for device {net.device}",
                         quiet=mode == AUTO)
            return None
        try:
            session = self._export(net, layout, data, key, providers, weights, mode, start)
        except Exception as exc:  # noqa: BLE001 - any export or session failure leaves the net on the engine
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._refuse((layout.signature, key), f"the export failed ({reason})", quiet=mode == AUTO)
            return None
        self._session = session
        return session

    @staticmethod
    def _providers(device: torch.device) -> list[str] | None:
        import onnxruntime

        if device.type == "cpu":
            return ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return None

    def _export(self, net: WholeNet, layout: _Layout, data: dict[str, Tensor], key: tuple[Any, ...],
                providers: list[str], weights: list[Tensor], mode: str, start: float) -> _Session | None:
        import onnx
        import onnxruntime

        _register_symbolics()
        module = _Traced(net, layout)
        inputs = tuple(data[name].detach() for name in layout.inputs)
        buffer = io.BytesIO()
        with torch.no_grad():
            expected = [t.detach().cpu().float().numpy().copy() for t in module(*inputs)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on Python ints taken from shapes
                torch.onnx.export(module, inputs, buffer,  # type: ignore[arg-type]  # a file object works
                                  input_names=[f"in{k}" for k in range(len(inputs))],
                                  output_names=[f"out{k}" for k in range(len(layout.outputs))],
                                  dynamo=False, do_constant_folding=False)
        model = onnx.load_from_string(buffer.getvalue())
        constants_second(model)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        ort_session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=providers)
        session = _Session(ort_session, mode, key, _Weights(weights), 0.0)
        got = self._ort_run(session, layout, data)
        worst = _worst_difference(expected, got)
        session.seconds = time.perf_counter() - start
        self.stats.exports += 1
        self.stats.export_seconds = session.seconds
        if worst > CHECK_TOLERANCE:
            self._refuse((layout.signature, key), f"ONNX Runtime's outputs differ from the engine's by "
                         f"{worst:.2g} of their largest value", quiet=False)
            return None
        if mode == AUTO and not self._faster(session, layout, data):
            return None
        LOGGER.info("Net '%s': whole TEST forwards run in ONNX Runtime (%s); export took %.2f s.",
                    self.label, providers[0], session.seconds)
        return session

    def _faster(self, session: _Session, layout: _Layout, data: dict[str, Tensor]) -> bool:
        """``auto``: whether a session forward beats the engine's (median of its recent forwards)."""
        times = []
        for _ in range(2):
            start = time.perf_counter()
            self._ort_run(session, layout, data)
            times.append(time.perf_counter() - start)
        engine = statistics.median(self._engine_times[-5:]) if self._engine_times else float("inf")
        if min(times) < engine:
            return True
        self._refuse((layout.signature, session.key), f"the engine is as fast ({engine * 1e3:.1f} ms per "
                     f"forward, ONNX Runtime {min(times) * 1e3:.1f} ms)", quiet=True)
        return False

    def _refuse(self, where: tuple[Any, ...] | None, reason: str, *, quiet: bool) -> None:
        if not reason:
            return
        self.stats.reason = reason
        if where is not None:
            self._refused[where] = reason
        log_once(LOGGER, logging.INFO if quiet else logging.WARNING, ("onnx backend", self.label, reason),
                 "Net '%s' runs its TEST forwards on the engine: %s.", self.label, reason)

    def invalidate(self) -> None:
        """Drop the session (weights changed where its check cannot see); the next forward exports
        again."""
        if self._session is not None:
            self._drop("the caller invalidated the weights")

    def _drop(self, reason: str) -> None:
        self._session = None
        self._engine_times = []
        self.stats.reason = reason
        LOGGER.debug("Net '%s' goes back to the engine: %s.", self.label, reason)


def _trunc_symbolic(g: Any, x: Any) -> Any:
    """``aten::trunc`` (``round_away`` of the quantization layers), which torch's ONNX exporter lacks, as
    ``Sign(x) * Floor(Abs(x))``: exact for every float."""
    return g.op("Mul", g.op("Sign", x), g.op("Floor", g.op("Abs", x)))


def _register_symbolics() -> None:
    """Teach torch's exporter the ops it lacks (idempotent: a registration replaces the previous one)."""
    torch.onnx.register_custom_op_symbolic("aten::trunc", _trunc_symbolic, 9)


def _worst_difference(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """The largest ``|got - expected|`` over the outputs, each relative to its largest ``|expected|``
    (at least 1); infinite where shapes differ or a value is not finite in one only."""
    worst = 0.0
    for e, g in zip(expected, got):
        g = np.asarray(g, dtype=np.float32)
        if e.shape != g.shape or not np.array_equal(np.isfinite(e), np.isfinite(g)):
            return float("inf")
        if e.size == 0:
            continue
        finite = np.isfinite(e)
        scale = max(float(np.abs(e[finite]).max(initial=0.0)), 1.0)
        worst = max(worst, float(np.abs(e[finite] - g[finite]).max(initial=0.0)) / scale)
    return worst


def constants_second(model: Any) -> int:
    """Write the operands of ``Add``/``Mul`` nodes whose first operand is a constant (and second is not)
    the other way round, in place; returns how many. Same values (both are commutative, with
    broadcasting); ONNX Runtime fuses a constant ``Add``/``Mul`` into the convolution before it only in
    this order."""
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    constants.update(i.name for i in model.graph.initializer)
    swapped = 0
    for node in model.graph.node:
        if node.op_type in ("Add", "Mul") and len(node.input) == 2 and node.input[0] in constants \
                and node.input[1] not in constants:
            first, second = node.input[0], node.input[1]
            node.input[0], node.input[1] = second, first
            swapped += 1
    return swapped
