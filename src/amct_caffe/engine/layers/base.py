"""The contract every engine layer follows (the registry of implementations is in ``registry.py``).

A layer is built from its ``LayerParameter``; ``setup`` sees the first bottoms (their real shapes, zero
values) and creates the learnable blobs with Caffe's shapes and fillers; ``forward`` maps bottom tensors to
top tensors with differentiable torch ops (training uses autograd, so a layer whose Caffe gradient differs
from the autograd one implements a ``torch.autograd.Function``).

Blobs are float32 tensors in Caffe's layout (e.g. Convolution weight ``[out, in/group, kh, kw]``,
Deconvolution weight ``[in, out/group, kh, kw]``, InnerProduct ``[out, in]``). The net loads caffemodel
blobs into them and shares them between layers (``param { name }``) by replacing list entries, so a layer
reads ``self.blobs[i]`` at forward time and never caches derived tensors across calls.

A net builds each layer with :meth:`Layer.create` (the options of the layer's variant, none for most
layers), then calls :meth:`Layer.link` with the layers that write its bottoms, then runs the shape pass
(``setup`` and ``forward`` on placeholder values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from amct_caffe.engine.fillers import fill
from amct_caffe.errors import ModelFormatError
from amct_caffe.proto import caffe_pb2

Tensor = torch.Tensor

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


class Layer:
    """One Caffe layer in the engine.

    Class attributes a subclass may set:
        type_name: the Caffe type string (set by ``registry.register``).
        origin: the Caffe fork a layer outside BVLC Caffe comes from (the models that use it).
        loss_layer: True for layers whose top is a loss (default ``loss_weight`` 1 for top 0, as Caffe).
        in_place_ok: False for layers that must not run with top == bottom (informational).
        exact_bottoms / min_bottoms / max_bottoms / exact_tops: counts checked at build time.
        accepts_integer_blobs: True for layers whose blobs a caffemodel stores in ``int8_data``/
            ``int32_data``/``uint64_data`` (the deploy model's integer layers); the net refuses such blobs
            for every other layer.
    """

    type_name: str = ""
    #: Which public models' Caffe fork a layer type outside BVLC Caffe comes from (its docstring names the
    #: source file it follows), for the README's layer list; empty for BVLC's and AMCT's layers.
    origin: str = ""
    loss_layer: bool = False
    exact_bottoms: int | None = None
    min_bottoms: int | None = None
    max_bottoms: int | None = None
    exact_tops: int | None = None
    min_tops: int | None = None
    accepts_integer_blobs: bool = False

    @classmethod
    def create(
        cls, param: caffe_pb2.LayerParameter, phase: int, device: torch.device, options: Mapping[str, object]
    ) -> Layer:
        """Build the layer with the options of its variant (see ``registry.LayerVariant``).

        A layer that takes options overrides this; the default takes none.

        Raises:
            ModelFormatError: ``options`` is not empty.
        """
        if options:
            raise ModelFormatError(
                f"Layer '{param.name}' (type {cls.type_name or param.type}): {cls.__name__} takes no "
                f"options, got {sorted(options)}."
            )
        return cls(param, phase, device)

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

    def link(self, producers: Sequence[Layer]) -> None:
        """Called by the net once every layer is built, before the shape pass: ``producers[i]`` is the layer
        that writes bottom ``i``. A layer that needs a neighbour's parameters takes them here; default:
        nothing."""

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

