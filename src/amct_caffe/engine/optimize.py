"""A faster TEST-phase forward for the engine's nets, same blob values.

It works on what a net hands it -- its layer list, device and blob dictionary -- and knows nothing else of
the net (:meth:`amct_caffe.engine.net.Net.inference_plan` builds the plan, ``Net.run`` runs it).

Caffe runs a deploy net layer by layer: a Convolution, then an in-place BatchNorm (``use_global_stats``),
an in-place Scale and an in-place ReLU each sweep the whole activation again. When those layers are in
place (``top == bottom``), the intermediate values are never visible: after the forward the blob holds
only the last one. So the same blob values come out of

* **folding** the BatchNorm/Scale chain into the producer's weight and bias (``w' = w * a``,
  ``b' = b * a + c`` per output channel, where the chain computes ``y = x * a + c``),
* **fusing** the in-place ReLU (ReLU6) by applying it in place to the producer's fresh output,
* **collapsing** a chain that is *not* in place after its producer (e.g. MobileNet's
  ``conv -> BatchNorm(top: conv/bn) -> Scale(in place)``) into one ``x * a + c`` op: the producer's top
  keeps the raw value, which stays visible under its own name,
* on the CPU, running convolutions in channels-last layout with oneDNN weights packed once per fold
  (``torch.ops.mkldnn._convolution_pointwise``; checked once against ``F.conv2d`` and otherwise
  replaced by it). Blobs handed to users are made contiguous again by ``Net.tensor``.

Every blob therefore has the value the layer-by-layer forward gives, up to float rounding (the folded
arithmetic rounds differently). Folding happens only in TEST phase and only for chains of consecutive
layers directly after their producer, so no other layer can read a value the fold skips; a partial run
(``start``/``end`` inside a chain) runs those layers one by one.

The folded weights are a cache. They are recomputed when a source blob changes: a torch in-place op bumps
the tensor's ``_version``, ``copy_from``/weight sharing put another tensor object into ``layer.blobs``
(both are compared at every forward), and numpy writes through ``net.params[...][i].data`` (which share
memory with the blob on the CPU and bump nothing) are covered by :func:`note_param_array`: pycaffe reports
every array it hands out, the fold is redone at the next forward and, while any such array is alive, at
every forward. Writes that bypass all three (``blob.data.add_(...)`` on a torch ``.data`` alias, whose
version counter is separate, or ``blob.numpy()`` written by library code) are not seen: update blobs with
in-place ops on the tensor itself under ``torch.no_grad()`` (as ``torch.optim`` does), call
``net.invalidate_caches()`` after such writes (it drops an ONNX Runtime session too), or set
``net.optimize = False``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from amct_caffe.engine.layers.activation import ReLU, ReLU6
from amct_caffe.engine.layers.base import TEST, Layer
from amct_caffe.engine.layers.fork import ConvolutionDepthwise, DepthwiseConvolution
from amct_caffe.engine.layers.normalization import BatchNorm, Scale
from amct_caffe.engine.layers.structure import Concat, Eltwise, Softmax
from amct_caffe.engine.layers.vision import Convolution, InnerProduct, Pooling
from amct_caffe.log import get_logger
from amct_caffe.model.batchnorm import global_statistics

LOGGER = get_logger("engine.optimize")

Tensor = torch.Tensor
_CL = torch.channels_last

#: Layers whose forward gives the right values for channels-last bottoms (element-wise or layout-aware
#: torch ops only). Bottoms of every other layer are made contiguous first.
_CHANNELS_LAST_SAFE: tuple[type[Layer], ...] = (
    Convolution, Pooling, Eltwise, Concat, ReLU, ReLU6, BatchNorm, Scale, InnerProduct, Softmax,
)
#: Layers a recording (TRAIN) forward hands channels-last bottoms (see :class:`TrainLayout`).
_CONVERTS: tuple[type[Layer], ...] = (Convolution, ConvolutionDepthwise, DepthwiseConvolution)
#: Layers whose top is a new tensor (never a bottom, never a cached value), so an in-place ReLU on it is
#: safe; checked again at run time against the bottoms' storage.
_FRESH_TOP: tuple[type[Layer], ...] = (Eltwise, Pooling, Concat, InnerProduct)


# ------------------------------------------------------------------------------------------------------
# Arrays handed out by pycaffe
# ------------------------------------------------------------------------------------------------------
class _ArrayRegistry:
    """Which parameter storages pycaffe has handed out as numpy arrays, and whether any is still alive.

    ``epoch`` counts hand-outs; ``last[ptr]`` is the epoch of the latest hand-out of the storage at
    ``ptr``; ``live[ptr]`` holds weak references to the arrays (a numpy view keeps its base array alive,
    so a view of a handed-out array counts as alive too).
    """

    MAX_ENTRIES = 65536

    def __init__(self) -> None:
        self.epoch = 0
        self.reset_epoch = 0
        self.last: dict[int, int] = {}
        self.live: dict[int, list[weakref.ReferenceType[np.ndarray]]] = {}

    def note(self, tensor: Tensor, array: np.ndarray) -> None:
        self.epoch += 1
        if len(self.last) > self.MAX_ENTRIES:
            # Forget old entries; every fold older than now counts as stale once.
            self.last.clear()
            self.reset_epoch = self.epoch
        ptr = storage_ptr(tensor)
        self.last[ptr] = self.epoch
        try:
            ref = weakref.ref(array)
        except TypeError:  # pragma: no cover - ndarray supports weak references
            return
        refs = [r for r in self.live.get(ptr, ()) if r() is not None]
        refs.append(ref)
        self.live[ptr] = refs

    def alive(self, ptr: int) -> bool:
        refs = self.live.get(ptr)
        if not refs:
            return False
        refs = [r for r in refs if r() is not None]
        if refs:
            self.live[ptr] = refs
            return True
        del self.live[ptr]
        return False

    def touched_since(self, ptrs: Sequence[int], epoch: int) -> bool:
        if epoch < self.reset_epoch:
            return True
        last = self.last
        return any(last.get(p, -1) > epoch for p in ptrs)


_REGISTRY = _ArrayRegistry()


def storage_ptr(tensor: Tensor) -> int:
    """Address of the tensor's storage (the memory a numpy view of it writes to)."""
    return int(tensor.untyped_storage().data_ptr())


def note_param_array(tensor: Tensor, array: np.ndarray) -> None:
    """Record that ``array`` (a numpy view of the learnable blob ``tensor``) was handed to a user.

    pycaffe's ``ParamBlob.data`` calls this: numpy writes bump no torch version counter, so folded
    weights built from ``tensor`` are rebuilt at the next forward, and at every forward while ``array``
    (or a view of it) is alive.
    """
    if tensor.device.type == "cpu":
        _REGISTRY.note(tensor, array)


def param_array_epoch() -> int:
    """How many parameter arrays pycaffe has handed out so far (grows with every hand-out)."""
    return _REGISTRY.epoch


def param_array_alive(tensor: Tensor) -> bool:
    """Whether a numpy array of ``tensor``'s storage that pycaffe handed out (or a view of it) is alive:
    writes through it bump no version counter, so the blob may change at any time."""
    return _REGISTRY.alive(storage_ptr(tensor))


def param_array_since(tensor: Tensor, epoch: int) -> bool:
    """Whether pycaffe handed out an array of ``tensor``'s storage after hand-out number ``epoch``."""
    return _REGISTRY.touched_since([storage_ptr(tensor)], epoch)


def blob_version(t: Tensor) -> int:
    """The tensor's version counter (bumped by in-place torch ops); -1 for inference tensors, which keep
    none (callers treat them as changed every time)."""
    return _version(t)


def _version(t: Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter: treat as changed every time
        return -1


# ------------------------------------------------------------------------------------------------------
# Options and affine chains
# ------------------------------------------------------------------------------------------------------
@dataclass
class InferenceOptions:
    """What the optimised TEST forward may do (all on by default; the benchmark switches them).

    Attributes:
        fold: fold/collapse BatchNorm+Scale chains and fuse in-place ReLUs.
        channels_last: run CPU convolutions on channels-last activations.
        prepack: use oneDNN convolutions with weights packed once per fold (CPU, needs ``channels_last``).
    """

    fold: bool = True
    channels_last: bool = True
    prepack: bool = True


def _mkldnn_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
    )


def _affine_of(layer: Layer) -> tuple[Tensor, Tensor]:
    """``(a, c)`` in float64 such that the layer computes ``x * a + c`` per channel (axis 1).

    BatchNorm with global statistics: ``s = factor == 0 ? 0 : 1 / factor``, ``mean = mean_sum * s``,
    ``var = var_sum * s``, ``y = (x - mean) / sqrt(var + eps)`` (its float32 rounding of ``s``, mean and
    var is kept, so only the last operations round differently). Scale: ``y = x * gamma (+ beta)``.
    """
    if isinstance(layer, BatchNorm):
        mean, var = global_statistics(*(b.detach() for b in layer.blobs))
        mean, var = mean.double(), var.double()
        std = torch.sqrt(var + layer.eps)
        a = 1.0 / std
        return a, -mean * a
    assert isinstance(layer, Scale)
    gamma = layer.blobs[0].detach().double()
    beta = layer.blobs[1].detach().double() if layer.bias_term else torch.zeros_like(gamma)
    return gamma, beta


def _chain_affine(chain: Sequence[Layer]) -> tuple[Tensor, Tensor]:
    a, c = _affine_of(chain[0])
    for layer in chain[1:]:
        a2, c2 = _affine_of(layer)
        a, c = a * a2, c * a2 + c2
    return a, c


def _is_affine(layer: Layer, channels: int | None) -> bool:
    """BatchNorm with global statistics, or one-bottom Scale with a per-channel (axis 1) blob."""
    if type(layer) is BatchNorm:
        return layer.use_global_stats and len(layer.blobs) == 3 and (
            channels is None or layer.channels == channels
        )
    if type(layer) is Scale:
        if len(layer.param.bottom) != 1 or not layer.blobs:
            return False
        shape = tuple(layer.blobs[0].shape)
        if len(shape) != 1 or (channels is not None and shape[0] != channels):
            return False
        return not layer.bias_term or tuple(layer.blobs[-1].shape) == shape
    return False


def _scale_axis_ok(layer: Layer, ndim: int) -> bool:
    return type(layer) is not Scale or int(layer.param.scale_param.axis) % ndim == 1


def _relu_of(layer: Layer) -> Callable[[Tensor], Tensor] | None:
    """An in-place version of an exact ReLU/ReLU6 layer's function."""
    if type(layer) is ReLU:
        slope = float(layer.negative_slope)
        if slope == 0.0:
            return torch.relu_
        return lambda t: F.leaky_relu_(t, slope)
    if type(layer) is ReLU6:
        return lambda t: F.hardtanh_(t, 0.0, 6.0)
    return None


# ------------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------------
class _Step:
    """Layers ``first .. last`` (consecutive) run as one unit; ``run`` writes the same blobs they would."""

    first: int
    last: int

    def run(self, plan: InferencePlan, data: dict[str, Tensor]) -> None:
        raise NotImplementedError


class _LayerStep(_Step):
    """One layer run as written, optionally with the following in-place ReLU applied to its fresh top."""

    def __init__(self, index: int, layer: Layer, bottoms: list[str], tops: list[str],
                 relu: Callable[[Tensor], Tensor] | None = None, relu_index: int | None = None) -> None:
        self.first = index
        self.last = relu_index if relu_index is not None else index
        self.layer, self.bottoms, self.tops = layer, bottoms, tops
        self.relu, self.relu_index = relu, relu_index

    def run(self, plan: InferencePlan, data: dict[str, Tensor]) -> None:
        if self.relu is None:
            plan.forward_layer(self.first, data)
            return
        ptrs = [storage_ptr(data[b]) for b in self.bottoms]
        top = plan.forward_layer(self.first, data)[0]
        if storage_ptr(top) not in ptrs and top.dtype.is_floating_point:
            data[self.tops[0]] = self.relu(top)
        else:
            plan.forward_layer(self.relu_index, data)  # type: ignore[arg-type]


class _Fold:
    """The cached folded parameters of one producer step, valid for the source tensors it was built from."""

    __slots__ = ("tensors", "versions", "ptrs", "epoch", "seen", "watch", "weight", "bias", "packed",
                 "scale", "shift")

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self.tensors = tensors
        self.versions = tuple(_version(t) for t in tensors)
        self.ptrs = [storage_ptr(t) for t in tensors]
        self.epoch = self.seen = _REGISTRY.epoch
        self.watch = any(_REGISTRY.alive(p) for p in self.ptrs)
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.scale: Tensor | None = None
        self.shift: Tensor | None = None
        self.packed: dict[tuple[int, ...], object] = {}

    def valid_for(self, tensors: tuple[Tensor, ...]) -> bool:
        for t, mine, v in zip(tensors, self.tensors, self.versions):
            if t is not mine or v < 0 or _version(t) != v:
                return False
        reg = _REGISTRY
        if self.watch:
            return False
        if reg.epoch != self.seen:
            if reg.touched_since(self.ptrs, self.epoch):
                return False
            self.seen = reg.epoch
        return True


class _Cached(_Step):
    """A step whose parameters are derived from layer blobs and cached until those blobs change."""

    sources: list[tuple[Layer, int]]
    fold: _Fold | None = None

    def _tensors(self) -> tuple[Tensor, ...]:
        return tuple(layer.blobs[i] for layer, i in self.sources)

    def _current(self) -> _Fold:
        tensors = self._tensors()
        fold = self.fold
        if fold is None or not fold.valid_for(tensors):
            fold = _Fold(tensors)
            with torch.no_grad():
                self._build(fold)
            self.fold = fold
        return fold

    def _build(self, fold: _Fold) -> None:
        raise NotImplementedError


class _ProducerStep(_Cached):
    """Convolution or InnerProduct + consecutive in-place affine layers (folded) + optional in-place ReLU."""

    def __init__(self, index: int, layer: Layer, bottom: str, top: str, chain: list[Layer], last: int,
                 relu: Callable[[Tensor], Tensor] | None, relu_is_plain: bool) -> None:
        self.first, self.last = index, last
        # a Convolution or an InnerProduct: their geometry attributes are read below
        self.layer: Any = layer
        self.bottom, self.top, self.chain = bottom, top, chain
        self.relu, self.relu_is_plain = relu, relu_is_plain
        self.conv = type(layer) is Convolution
        self.sources = [(lay, i) for lay in [layer, *chain] for i in range(len(lay.blobs))]
        self.checked: torch.Size | None = None
        self.pack_ok: bool | None = None  # None: not yet checked against F.conv2d

    def _build(self, fold: _Fold) -> None:
        layer = self.layer
        weight = layer.blobs[0].detach()
        bias = layer.blobs[1].detach() if layer.bias_term else None
        if self.conv:
            if self.chain:
                a, c = _chain_affine(self.chain)
                weight = weight * a.to(weight.dtype).view(-1, 1, 1, 1)
                bias = c if bias is None else bias.double() * a + c
        else:
            if layer.transpose:
                weight = weight.t()
            if self.chain:
                a, c = _chain_affine(self.chain)
                weight = weight * a.to(weight.dtype).view(-1, 1)
                bias = c if bias is None else bias.double() * a + c
        fold.weight = weight.contiguous()
        fold.bias = bias.to(torch.float32).contiguous() if bias is not None else None

    def _dense(self, fold: _Fold) -> Tensor:
        """The folded weight as a dense tensor (rebuilt if it was dropped after packing)."""
        if fold.weight is None:
            with torch.no_grad():
                self._build(fold)
        assert fold.weight is not None
        return fold.weight

    def run(self, plan: InferencePlan, data: dict[str, Tensor]) -> None:
        x = data[self.bottom]
        layer = self.layer
        if x.shape != self.checked:
            if self.conv:
                layer._check_bottoms([x])
            elif x.dim() <= layer.axis or int(np.prod(x.shape[layer.axis:])) != layer.k:
                plan.run_layers(self.first, self.last, data)  # the layer raises its own error
                return
            self.checked = x.shape
        fold = self._current()
        if self.conv:
            y = self._conv(plan, fold, x)
        else:
            y = F.linear(x.flatten(layer.axis), self._dense(fold), fold.bias)
            if self.relu is not None:
                y = self.relu(y)
        data[self.top] = y

    def _conv(self, plan: InferencePlan, fold: _Fold, x: Tensor) -> Tensor:
        layer = self.layer
        opts = plan.options
        if plan.cpu and opts.channels_last and x.dim() == 4:
            if not x.is_contiguous(memory_format=_CL):
                x = x.contiguous(memory_format=_CL)
            if opts.prepack and plan.mkldnn and self.pack_ok is not False and x.dtype == torch.float32:
                y = self._packed(fold, x)
                if y is not None:
                    return y
        y = F.conv2d(x, self._dense(fold), fold.bias, layer.stride, layer.pad, layer.dilation,
                     layer.group)
        return self.relu(y) if self.relu is not None else y

    def _packed(self, fold: _Fold, x: Tensor) -> Tensor | None:
        layer = self.layer
        pad, stride, dil = list(layer.pad), list(layer.stride), list(layer.dilation)
        key = tuple(x.shape)
        packed = fold.packed.get(key)
        try:
            if packed is None:
                if len(fold.packed) >= 4:
                    fold.packed.clear()
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]  # stub lacks input_size
                    self._dense(fold).to_mkldnn(), pad, stride, dil, layer.group, list(key)
                )
                fold.packed[key] = packed
            attr = "relu" if self.relu_is_plain else "none"
            y = torch.ops.mkldnn._convolution_pointwise(
                x, packed, fold.bias, pad, stride, dil, layer.group, attr, [], ""
            )
        except (RuntimeError, TypeError) as exc:
            LOGGER.debug("Layer '%s': packed oneDNN convolution unavailable (%s); using F.conv2d.",
                         layer.name, exc)
            self.pack_ok = False
            return None
        if self.relu is not None and not self.relu_is_plain:
            y = self.relu(y)
        if self.pack_ok is None:
            expected = F.conv2d(x, self._dense(fold), fold.bias, layer.stride, layer.pad,
                                layer.dilation, layer.group)
            if self.relu is not None:
                expected = self.relu(expected)
            if expected.shape != y.shape:
                self.pack_ok = False
            elif expected.numel() == 0:
                self.pack_ok = True
            else:
                tol = 1e-4 * max(float(expected.abs().max()), 1.0)
                self.pack_ok = float((expected - y).abs().max()) <= tol
            if not self.pack_ok:
                LOGGER.warning("Layer '%s': packed oneDNN convolution disagrees with F.conv2d; "
                               "using F.conv2d.", layer.name)
                return expected
        if self.pack_ok and self.chain:
            fold.weight = None  # the packed copy serves; the dense one is rebuilt if ever needed again
        return y


class _AffineStep(_Cached):
    """Consecutive BatchNorm/Scale layers whose first may write a new top, as one ``x * a + c`` op."""

    def __init__(self, first: int, chain: list[Layer], bottom: str, top: str, last: int,
                 relu: Callable[[Tensor], Tensor] | None) -> None:
        self.first, self.last = first, last
        self.chain, self.bottom, self.top, self.relu = chain, bottom, top, relu
        self.channels = int(chain[0].blobs[0].shape[0])
        self.sources = [(lay, i) for lay in chain for i in range(len(lay.blobs))]

    def _build(self, fold: _Fold) -> None:
        a, c = _chain_affine(self.chain)
        fold.scale = a.to(torch.float32)
        fold.shift = c.to(torch.float32)

    def run(self, plan: InferencePlan, data: dict[str, Tensor]) -> None:
        x = data[self.bottom]
        ndim = x.dim()
        if ndim < 2 or x.shape[1] != self.channels or not all(_scale_axis_ok(c, ndim) for c in self.chain):
            plan.run_layers(self.first, self.last, data)  # the layers raise their own errors
            return
        fold = self._current()
        view = (1, self.channels) + (1,) * (x.dim() - 2)
        assert fold.scale is not None and fold.shift is not None
        y = torch.addcmul(fold.shift.view(view).to(x.dtype), x, fold.scale.view(view).to(x.dtype))
        data[self.top] = self.relu(y) if self.relu is not None else y


# ------------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------------
class InferencePlan:
    """How a TEST-phase net runs: a list of steps covering its layers in order.

    Build it with :func:`build_plan`; :meth:`run` executes layers ``start .. end`` like
    ``Net.run`` does (steps cut by ``start``/``end`` run layer by layer).

    Args:
        layers: the net's layers in order (each reads and writes the blobs its ``LayerParameter`` names).
        device: the device the net runs on.
        options: what the plan may do.
    """

    def __init__(self, layers: Sequence[Layer], device: torch.device, options: InferenceOptions) -> None:
        self.options = options
        self.cpu = device.type == "cpu"
        self.mkldnn = self.cpu and _mkldnn_available()
        self.layers = list(layers)
        #: the identity of the layers the plan was built for (a net rebuilds its plan when they change)
        self.signature = tuple(map(id, self.layers))
        # each layer's blob names, from its LayerParameter (what the net was built from)
        self.bottoms = [list(layer.param.bottom) for layer in self.layers]
        self.tops = [list(layer.param.top) for layer in self.layers]
        self.safe = [isinstance(layer, _CHANNELS_LAST_SAFE) for layer in self.layers]
        self.steps: list[_Step | None] = [None] * len(self.layers)
        self._build()

    # -- construction --------------------------------------------------------------------------------
    def _in_place(self, j: int, name: str) -> bool:
        return self.bottoms[j] == [name] and self.tops[j] == [name]

    def _relu_after(self, j: int, name: str) -> tuple[Callable[[Tensor], Tensor] | None, bool]:
        if j < len(self.layers) and self._in_place(j, name):
            fn = _relu_of(self.layers[j])
            if fn is not None:
                relu_layer = self.layers[j]
                plain = type(relu_layer) is ReLU and float(relu_layer.negative_slope) == 0.0
                return fn, plain
        return None, False

    def _affine_run(self, j: int, name: str, channels: int, ndim: int | None = None) -> list[Layer]:
        """The in-place affine layers on ``name`` from layer ``j`` on (``ndim``: the blob's axes if known)."""
        chain: list[Layer] = []
        while j < len(self.layers) and self._in_place(j, name) and _is_affine(self.layers[j], channels) \
                and (ndim is None or _scale_axis_ok(self.layers[j], ndim)):
            chain.append(self.layers[j])
            j += 1
        return chain

    def _build(self) -> None:
        n = len(self.layers)
        fold = self.options.fold
        i = 0
        while i < n:
            layer = self.layers[i]
            step = self._producer(i) if fold else None
            if step is None and fold:
                step = self._affine(i)
            if step is None and fold and type(layer) in _FRESH_TOP and len(self.tops[i]) == 1:
                relu, _ = self._relu_after(i + 1, self.tops[i][0])
                if relu is not None:
                    step = _LayerStep(i, layer, self.bottoms[i], self.tops[i], relu, i + 1)
            if step is None and type(layer) is Convolution and len(self.bottoms[i]) == 1 \
                    and len(self.tops[i]) == 1:
                step = _ProducerStep(i, layer, self.bottoms[i][0], self.tops[i][0], [], i, None, False)
            if step is None:
                step = _LayerStep(i, layer, self.bottoms[i], self.tops[i])
            self.steps[i] = step
            i = step.last + 1

    def _producer(self, i: int) -> _Step | None:
        layer = self.layers[i]
        if len(self.bottoms[i]) != 1 or len(self.tops[i]) != 1:
            return None
        top = self.tops[i][0]
        if type(layer) is Convolution:
            ndim = 4
        elif type(layer) is InnerProduct and int(layer.axis) == 1:
            ndim = 2
        else:
            return None
        chain = self._affine_run(i + 1, top, int(layer.num_output), ndim)
        j = i + 1 + len(chain)
        relu, plain = self._relu_after(j, top)
        if not chain and (relu is None or type(layer) is InnerProduct):
            return None  # nothing to fold: a plain step (or the conv-only step) is enough
        last = j if relu is not None else j - 1
        return _ProducerStep(i, layer, self.bottoms[i][0], top, chain, last, relu, plain)

    def _affine(self, i: int) -> _Step | None:
        layer = self.layers[i]
        if len(self.bottoms[i]) != 1 or len(self.tops[i]) != 1 or not _is_affine(layer, None):
            return None
        bottom, top = self.bottoms[i][0], self.tops[i][0]
        channels = int(layer.blobs[0].shape[0])
        chain = [layer, *self._affine_run(i + 1, top, channels)]
        j = i + len(chain)
        relu, _ = self._relu_after(j, top)
        last = j if relu is not None else j - 1
        return _AffineStep(i, chain, bottom, top, last, relu)

    def invalidate(self) -> None:
        """Drop every folded/packed parameter; the next forward rebuilds them from the layer blobs.

        Needed only after writes the plan cannot see (see the module docstring), e.g. an update through
        a torch ``.data`` alias of a blob.
        """
        for step in self.steps:
            if isinstance(step, _Cached):
                step.fold = None

    def fused_groups(self) -> list[list[str]]:
        """Names of the layers each multi-layer step runs as one unit (what was folded or fused)."""
        return [
            [self.layers[k].name for k in range(step.first, step.last + 1)]
            for step in self.steps
            if step is not None and step.last > step.first
        ]

    # -- running ---------------------------------------------------------------------------------------
    def forward_layer(self, i: int, data: dict[str, Tensor]) -> list[Tensor]:
        """Run layer ``i`` as written, store its tops, and return them."""
        layer = self.layers[i]
        names = self.bottoms[i]
        bottoms = [data[b] for b in names]
        if not self.safe[i]:
            for k, b in enumerate(bottoms):
                if b.dim() == 4 and not b.is_contiguous() and b.is_contiguous(memory_format=_CL):
                    bottoms[k] = contiguous_blob(data, names[k])
        outs = layer.forward(bottoms)
        tops = self.tops[i]
        if len(outs) < len(tops):
            raise layer.error(f"produces {len(outs)} top(s) but the prototxt names {len(tops)}.")
        for name, value in zip(tops, outs):
            data[name] = value
        return outs

    def run_layers(self, start: int, end: int, data: dict[str, Tensor]) -> None:
        for i in range(start, end + 1):
            self.forward_layer(i, data)

    def run(self, data: dict[str, Tensor], start: int, end: int) -> None:
        """Run layers ``start .. end`` (inclusive) on ``data``, fused wherever a whole step is inside."""
        steps = self.steps
        i = start
        while i <= end:
            step = steps[i]
            if step is not None and step.last <= end:
                step.run(self, data)
                i = step.last + 1
            else:
                self.forward_layer(i, data)
                i += 1


def contiguous_blob(data: dict[str, Tensor], name: str) -> Tensor:
    """Make blob ``name`` contiguous (NCHW) in ``data``, for every blob name that holds the same tensor.

    Channels-last tensors from the optimised forward are converted before they reach a layer that may
    assume the standard layout, and before pycaffe hands them out as numpy arrays (Caffe blobs are
    C-contiguous).
    """
    t = data[name]
    if t.is_contiguous():
        return t
    c = t.contiguous()
    for key, value in data.items():
        if value is t:
            data[key] = c
    return c


def is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor in channels-last layout that is not also NCHW-contiguous."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=_CL)


class TrainLayout:
    """The memory layout in which a recording (TRAIN) forward hands each layer its bottoms.

    On the CPU with oneDNN, convolutions forward and backward run faster on channels-last activations
    (oneDNN's native layout; NCHW ones are reordered on every call). So a plain Convolution may get its 4-D
    bottoms in channels-last layout (a copy where an NCHW value enters; autograd carries the gradient back),
    its top is then channels-last, and the layers of ``_CHANNELS_LAST_SAFE`` -- element-wise or
    layout-aware torch ops -- pass that layout on. Every other layer (exact types only: a subclass, a
    Python or a QAT layer may read its bottoms' memory) gets NCHW-contiguous bottoms, as does every reader
    of a blob outside the net (``Net.tensor``). Values are the same in either layout; only float rounding
    of the convolution's summation order may differ.

    A convolution converts an NCHW bottom only when the values its top flows into through layout-keeping
    layers reach no other layer with spatial extent (H * W > 1, from the blob shapes of the net's last
    shape pass): there the value would be converted back, forward and backward, which costs more than the
    faster convolution gains (a QAT net's activation quantizers before every convolution). A bottom that
    already is channels-last passes through.

    Args:
        layers: the net's layers in order (their ``LayerParameter`` names bottoms and tops).
        device: the device the net runs on; off the CPU every bottom is handed over as it is.
        shapes: the current shape of every blob name.
    """

    def __init__(self, layers: Sequence[Layer], device: torch.device,
                 shapes: Mapping[str, tuple[int, ...]]) -> None:
        enabled = device.type == "cpu" and _mkldnn_available()
        #: the identity of the layers the layout was decided for (a net redecides when they change)
        self.signature = tuple(map(id, layers))
        self.keep = [not enabled or type(layer) in _CHANNELS_LAST_SAFE for layer in layers]
        self.convert = [False] * len(layers)
        if enabled:
            readers = _value_readers(layers)
            for i, layer in enumerate(layers):
                if type(layer) in _CONVERTS:
                    self.convert[i] = not self._reaches_nchw_reader(i, layers, readers, shapes)

    @staticmethod
    def _reaches_nchw_reader(i: int, layers: Sequence[Layer],
                             readers: Mapping[tuple[int, int], list[int]],
                             shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether layer ``i``'s tops flow, through layout-keeping layers, into a layer that takes NCHW
        bottoms with spatial extent."""
        pending = [(i, t) for t in range(len(layers[i].param.top))]
        seen: set[tuple[int, int]] = set()
        while pending:
            key = pending.pop()
            if key in seen:
                continue
            seen.add(key)
            shape = shapes.get(layers[key[0]].param.top[key[1]], ())
            for r in readers.get(key, []):
                kind = type(layers[r])
                if kind in _CONVERTS:
                    continue
                if kind in _CHANNELS_LAST_SAFE:
                    pending.extend((r, t) for t in range(len(layers[r].param.top)))
                elif len(shape) == 4 and shape[2] * shape[3] > 1:
                    return True
        return False

    def bottoms(self, i: int, values: list[Tensor]) -> list[Tensor]:
        """Layer ``i``'s bottoms ``values`` in the layout that layer takes (differentiable conversions)."""
        if self.convert[i]:
            return [x.contiguous(memory_format=_CL) if x.dim() == 4 and x.is_floating_point() else x
                    for x in values]
        if self.keep[i]:
            return values
        return [x.contiguous() if is_channels_last(x) else x for x in values]


def _value_readers(layers: Sequence[Layer]) -> dict[tuple[int, int], list[int]]:
    """``{(producer layer, top index): [reader layer, ...]}`` for every blob value, by the layers' names."""
    writer: dict[str, tuple[int, int]] = {}
    readers: dict[tuple[int, int], list[int]] = {}
    for i, layer in enumerate(layers):
        for name in layer.param.bottom:
            if name in writer:
                readers.setdefault(writer[name], []).append(i)
        for t, name in enumerate(layer.param.top):
            writer[name] = (i, t)
    return readers


def build_plan(
    layers: Sequence[Layer], phase: int, device: torch.device, options: InferenceOptions | None = None
) -> InferencePlan:
    """The optimised plan of a TEST-phase net's ``layers`` on ``device`` (see the module docstring).

    Raises:
        ValueError: ``phase`` is not TEST (the folds assume fixed BatchNorm statistics and no gradients).
    """
    if phase != TEST:
        raise ValueError("the optimised forward is for TEST-phase nets only")
    return InferencePlan(layers, device, options or InferenceOptions())
