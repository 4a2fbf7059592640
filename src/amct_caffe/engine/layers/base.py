"""The contract every engine layer follows, and the registry keyed by Caffe type string.

A layer is built from its ``LayerParameter``; ``setup`` sees the first bottoms (their real shapes, zero
values) and creates the learnable blobs with Caffe's shapes and fillers; ``forward`` maps bottom tensors to
top tensors with differentiable torch ops (training uses autograd, so a layer whose Caffe gradient differs
from the autograd one implements a ``torch.autograd.Function``).

Blobs are float32 tensors in Caffe's layout (e.g. Convolution weight ``[out, in/group, kh, kw]``,
Deconvolution weight ``[in, out/group, kh, kw]``, InnerProduct ``[out, in]``). The net loads caffemodel
blobs into them and shares them between layers (``param { name }``) by replacing list entries, so a layer
reads ``self.blobs[i]`` at forward time and never caches derived tensors across calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from amct_caffe.errors import ModelFormatError, UnsupportedLayerError
from amct_caffe.proto import caffe_pb2

Tensor = torch.Tensor

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


class Layer:
    """One Caffe layer in the engine.

    Class attributes a subclass may set:
        type_name: the Caffe type string (set by :func:`register`).
        loss_layer: True for layers whose top is a loss (default ``loss_weight`` 1 for top 0, as Caffe).
        in_place_ok: False for layers that must not run with top == bottom (informational).
        exact_bottoms / min_bottoms / max_bottoms / exact_tops: counts checked at build time.
    """

    type_name: str = ""
    loss_layer: bool = False
    exact_bottoms: int | None = None
    min_bottoms: int | None = None
    max_bottoms: int | None = None
    exact_tops: int | None = None
    min_tops: int | None = None

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        self.param = param
        self.name = param.name
        self.phase = phase
        self.device = device
        self.blobs: list[Tensor] = []
        #: True while the net runs a shape pass (construction, ``net.reshape()``) on placeholder values:
        #: layers with side effects (BatchNorm statistics, Dropout masks, IFMR initialisation, record
        #: writes) skip them then.
        self.reshaping = False
        self._check_counts()

    # -- overridables ----------------------------------------------------------------------------
    def setup(self, bottoms: Sequence[Tensor]) -> None:
        """Create ``self.blobs`` from the first bottoms' shapes; default: a layer without blobs."""

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def blobs_loaded(self) -> None:
        """Called by the net after it copied this layer's blobs from a caffemodel; default: nothing."""

    def blobs_shared(self, source: Layer) -> None:
        """Called after this layer's blobs became ``source``'s tensors (Caffe's ``ShareTrainedLayersWith``,
        a solver's test net): a layer keeping state that belongs with its blobs shares ``source``'s;
        default: nothing."""

    def blob_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``self.blobs`` as Caffe reports them."""
        return [tuple(b.shape) for b in self.blobs]

    # -- helpers for subclasses ----------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return self.phase == TRAIN

    def error(self, message: str) -> ModelFormatError:
        """A ModelFormatError that names this layer and its type."""
        return ModelFormatError(f"Layer '{self.name}' (type {self.type_name}): {message}")

    def canonical_axis(self, axis: int, num_axes: int, what: str = "axis") -> int:
        """Caffe's ``Blob::CanonicalAxisIndex``: ``axis`` in ``[-num_axes, num_axes)``, negatives counted
        from the end; out of range is an error naming this layer."""
        if not -num_axes <= axis < num_axes:
            raise self.error(
                f"{what} {axis} is out of range for a {num_axes}-D bottom blob; use a value in "
                f"[{-num_axes}, {num_axes - 1}]."
            )
        return axis + num_axes if axis < 0 else axis

    def new_blob(self, shape: Sequence[int], filler: caffe_pb2.FillerParameter | None = None) -> Tensor:
        """A float32 blob of ``shape`` on this layer's device, filled by ``filler`` (default: constant 0)."""
        from amct_caffe.engine.fillers import fill

        blob = torch.empty(tuple(int(s) for s in shape), dtype=torch.float32)
        fill(blob, filler if filler is not None else caffe_pb2.FillerParameter())
        return blob.to(self.device)

    def _check_counts(self) -> None:
        nb, nt = len(self.param.bottom), len(self.param.top)
        if self.exact_bottoms is not None and nb != self.exact_bottoms:
            raise self.error(f"needs exactly {self.exact_bottoms} bottom(s), has {nb}.")
        if self.min_bottoms is not None and nb < self.min_bottoms:
            raise self.error(f"needs at least {self.min_bottoms} bottom(s), has {nb}.")
        if self.max_bottoms is not None and nb > self.max_bottoms:
            raise self.error(f"takes at most {self.max_bottoms} bottom(s), has {nb}.")
        if self.exact_tops is not None and nt != self.exact_tops:
            raise self.error(f"needs exactly {self.exact_tops} top(s), has {nt}.")
        if self.min_tops is not None and nt < self.min_tops:
            raise self.error(f"needs at least {self.min_tops} top(s), has {nt}.")
        # Caffe's Layer::SetLossWeights: loss_weight is absent or given once per top (for every layer type).
        # Unlike BVLC, a SoftmaxWithLoss with its optional probability top and no loss_weight is accepted
        # (weights 1 and 0): BVLC cannot set that layer up at all (its issue #2968).
        nw = len(self.param.loss_weight)
        if nw and nw != nt:
            raise self.error(
                f"has {nt} top(s) but {nw} loss_weight values; a loss_weight must be unspecified or "
                "specified once per top blob."
            )


_REGISTRY: dict[str, type[Layer]] = {}


def register(*type_names: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: register a layer implementation under one or more Caffe type strings."""

    def wrap(cls: type[Layer]) -> type[Layer]:
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise RuntimeError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        if not cls.type_name:
            cls.type_name = type_names[0]
        return cls

    return wrap


def layer_class(type_name: str, layer_name: str = "", path: str = "") -> type[Layer]:
    """The implementation registered for a Caffe type, or an UnsupportedLayerError naming the layer."""
    _load_all()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        where = f" in '{path}'" if path else ""
        raise UnsupportedLayerError(
            f"Layer '{layer_name}'{where} has type '{type_name}', which the amct-caffe engine does not "
            f"implement. Supported types: {', '.join(sorted(_REGISTRY))}."
        ) from None


def supported_types() -> list[str]:
    """Every Caffe type string the engine implements, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def _load_all() -> None:
    # Importing the package registers every layer module (see layers/__init__.py).
    import amct_caffe.engine.layers  # noqa: F401
