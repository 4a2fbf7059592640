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

import numpy as np
import torch

from amct_caffe.engine.device import current_device, full_float32
from amct_caffe.engine.layers import LayerVariant, layer_class
from amct_caffe.engine.layers.base import TEST, Layer
from amct_caffe.engine.layers.data import Input
from amct_caffe.engine.optimize import InferenceOptions, InferencePlan, build_plan, contiguous_blob
from amct_caffe.errors import ConfigError, ModelFormatError, RuntimeEngineError, WeightShapeError
from amct_caffe.log import get_logger, log_once
from amct_caffe.model.blobs import array_to_blob, blob_shape, blob_to_array, shape_matches, storage_kind
from amct_caffe.model.io import load_caffemodel, load_prototxt, save_caffemodel
from amct_caffe.model.layer_types import RETRAIN_TYPES
from amct_caffe.model.phase import filter_net
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

    Raises:
        ModelFormatError: the net is malformed (unknown bottom, bad layer parameters).
        ConfigError: ``variants`` names a layer the net does not have.
        UnsupportedLayerError: a layer type the engine does not implement.
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
        self._set_up = False
        self._plan: InferencePlan | None = None
        self._build()
        self._link()
        self.inputs: list[str] = self._input_blobs()
        self.outputs: list[str] = self._output_blobs()
        self.reshape()
        self._share_params()
        if weights is not None:
            self.copy_from(weights)

    # -- construction --------------------------------------------------------------------------------
    def _build(self) -> None:
        available: set[str] = set()
        seen_names: set[str] = set()
        for index, lp in enumerate(self.param.layer):
            lp.name = layer_name(lp, index)
            if lp.name in seen_names:
                raise ModelFormatError(
                    f"Net '{self.path or self.param.name}' has two layers named '{lp.name}'; "
                    "layer names must be unique (Caffe matches weights by name)."
                )
            seen_names.add(lp.name)
            for i, bottom in enumerate(lp.bottom):
                if bottom not in available:
                    raise ModelFormatError(
                        f"Layer '{lp.name}' in '{self.path or self.param.name}' reads bottom {i} '{bottom}', "
                        "which no earlier layer produces; check the layer order and blob names."
                    )
            variant = self._variants.get(lp.name, LayerVariant())
            cls = layer_class(lp.type, lp.name, self.path, variant.name)
            layer = cls.create(lp, self.phase, self.device, variant.options)
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
        unknown = sorted(set(self._variants) - seen_names)
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
        try:
            with torch.no_grad():
                for layer, bottoms, tops in zip(self.engine_layers, self.layer_bottoms, self.layer_tops):
                    # placeholder values: layers skip their side effects (statistics, data cursors, IFMR)
                    layer.reshaping = True
                    inputs = [data[b] for b in bottoms]
                    if not set_up:
                        layer.setup(inputs)
                    outs = layer.forward(inputs)
                    self._check_top_count(layer, tops, outs)
                    for name, value in zip(tops, outs):
                        data[name] = value
        finally:
            for layer in self.engine_layers:
                layer.reshaping = False
        self._data = data
        self._set_up = True

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
            raise RuntimeEngineError(f"Net '{self.path or self.param.name}' has no layer '{name}'.") from None

    #: TEST phase: run through the optimised plan of :mod:`amct_caffe.engine.optimize` (BatchNorm/Scale
    #: folding, fused in-place ReLU, packed channels-last convolutions). Every blob keeps the value the
    #: layer-by-layer forward gives, up to float rounding; set False on a net (or the class) to run the
    #: layers exactly as written.
    optimize: bool = True

    def run(self, start: int = 0, end: int | None = None) -> None:
        """Run layers ``start`` .. ``end`` (inclusive) on the current blob values (Caffe's ForwardFromTo)."""
        end = len(self.engine_layers) - 1 if end is None else end
        data = self._data
        if start == 0 and _INPUT_OBSERVERS:
            self._tell_observers()
        if self.phase == TEST and self.optimize:
            with torch.no_grad(), full_float32(self.device):
                self.inference_plan().run(data, start, end)
            return
        grad = torch.is_grad_enabled() and self.phase != TEST
        context = torch.enable_grad() if grad else torch.no_grad()
        with context, full_float32(self.device):
            for i in range(start, end + 1):
                layer = self.engine_layers[i]
                outs = layer.forward([data[b] for b in self.layer_bottoms[i]])
                for name, value in zip(self.layer_tops[i], outs):
                    data[name] = value

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

    def inference_plan(self, options: InferenceOptions | None = None) -> InferencePlan:
        """The optimised TEST-phase plan, built on first use, when the layer list changed, or with new
        ``options`` (which later calls keep)."""
        plan = self._plan
        if options is not None or plan is None or plan.signature != tuple(map(id, self.engine_layers)):
            options = options or (plan.options if plan is not None else None)
            plan = self._plan = build_plan(self.engine_layers, self.phase, self.device, options)
        return plan

    def tensor(self, name: str) -> Tensor:
        try:
            value = self._data[name]
        except KeyError:
            raise RuntimeEngineError(f"Net '{self.path or self.param.name}' has no blob '{name}'.") from None
        if value.dim() == 4 and not value.is_contiguous() and \
                value.is_contiguous(memory_format=torch.channels_last):
            # the optimised forward's channels-last layout; Caffe blobs (and pycaffe arrays) are NCHW
            value = contiguous_blob(self._data, name)
        return value

    def set_tensor(self, name: str, value: Tensor) -> None:
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
        caffemodel keep their filler values. Both are logged. Blobs only: the layers stay what the net was
        built with, so a deploy caffemodel's integer blobs need a net built with the integer variants
        (:func:`amct_caffe.emulation.loader.load_net`, or ``caffe.Net``).

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
        by_name = {layer.name: layer for layer in self.engine_layers}
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
        retrain = [layer.name for layer in missing if layer.type_name in RETRAIN_TYPES]
        if retrain:
            # a new retrain model has no clip values yet: expected, and not a problem
            log_once(LOGGER, logging.INFO, ("retrain clips", path, tuple(retrain)),
                     "Retrain layer(s) %s start from their parameters: IFMR sets their clip values on the "
                     "first forward (as expected for a model from create_quant_retrain_model).",
                     ", ".join(retrain))

    @staticmethod
    def _check_storage(source: caffe_pb2.NetParameter, by_name: Mapping[str, Layer], path: str) -> None:
        """Refuse, before copying anything, integer blobs meant for a layer that holds float blobs."""
        for src in source.layer:
            target = by_name.get(src.name)
            if target is None or target.accepts_integer_blobs:
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
        array = blob_to_array(blob, shape)
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
        return {name: self._data[name].detach().cpu().numpy().copy() for name in self.blob_names}
