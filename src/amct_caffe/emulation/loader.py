"""Loading a model into the engine, with the deploy model's integer layers where its caffemodel asks for them.

The engine's net only runs the layers it is told to build. This module decides which ones (the decision the
deploy model needs, see :mod:`amct_caffe.emulation.integer`):

1. read the prototxt and keep the layers of the phase (as the net will), and read the caffemodel once;
2. find the caffemodel layers whose blobs are stored in ``int8_data``/``int32_data``/``uint64_data``;
   none of them in the net: a float or fake-quant model, built with the float layers;
3. otherwise a deploy model: refuse a TRAIN-phase net; check that every integer blob belongs to a
   ``Quant -> L -> DeQuant`` pattern (L = Convolution/Deconvolution/InnerProduct with an ``int8_data``
   weight and, with ``bias_term``, an ``int32_data`` bias, or Pooling without blobs; the DeQuant with one
   ``uint64_data`` blob), that a Quant's codes are read only by quantized layers and that a quantized
   layer's output is read only by its DeQuant;
4. build the net with the :data:`~amct_caffe.emulation.integer.INTEGER` variant for the layers of those
   patterns (the Quant formula and the DeQuant blob shape as their options) and copy the blobs in.

:func:`load_net` does all of it; ``caffe.Net`` (a subclass of the engine's net) uses :func:`plan_net` for
steps 1-3 and builds itself with the plan.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from amct_caffe.emulation.integer import DEFAULT_QUANT_FORMULA, INTEGER, check_quant_formula
from amct_caffe.engine.layers import LayerVariant
from amct_caffe.engine.layers.base import TEST
from amct_caffe.engine.net import INTEGER_STORAGE_KINDS, Net, layer_name
from amct_caffe.errors import ModelFormatError, WeightShapeError
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import blob_shape, storage_kind
from amct_caffe.model.graph import producer_index, value_readers
from amct_caffe.model.io import load_caffemodel, load_prototxt
from amct_caffe.model.layer_types import DEQUANT, QUANT
from amct_caffe.model.phase import filter_net
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("emulation.loader")

ModelArg = str | os.PathLike[str] | caffe_pb2.NetParameter

#: The weighted layers the integer emulation runs between a Quant and its DeQuant, with their parameter.
_CUBE_PARAMS = {"Convolution": "convolution_param", "Deconvolution": "convolution_param",
                "InnerProduct": "inner_product_param"}
_POOLING = "Pooling"


@dataclass(frozen=True)
class NetPlan:
    """What :func:`plan_net` decided: the caffemodel (read once) and the variant of each integer layer.

    Attributes:
        weights: the parsed caffemodel, or None when there is none.
        weights_path: its file, for messages ("" when it was given parsed).
        variants: ``{layer name: variant}`` for the net; empty for a float or fake-quant model.
    """

    weights: caffe_pb2.NetParameter | None = None
    weights_path: str = ""
    variants: Mapping[str, LayerVariant] = field(default_factory=dict)

    @property
    def is_deploy(self) -> bool:
        """True when the net runs integer layers."""
        return bool(self.variants)

    def copy_weights(self, net: Net) -> None:
        """Copy the caffemodel's blobs into ``net`` (built with :attr:`variants`); nothing without one."""
        if self.weights is not None:
            net.copy_from(self.weights, path=self.weights_path)


def integer_layers_of(source: caffe_pb2.NetParameter) -> dict[str, list[str]]:
    """``{layer name: storage kinds of its blobs}`` for the caffemodel layers that hold integer blobs."""
    out: dict[str, list[str]] = {}
    for lp in source.layer:
        kinds = [storage_kind(b) for b in lp.blobs]
        if any(k in INTEGER_STORAGE_KINDS for k in kinds):
            out[lp.name] = kinds
    return out


def plan_net(
    model: ModelArg,
    weights: ModelArg | None = None,
    phase: int = TEST,
    *,
    quant_formula: str | None = None,
    require_deploy: bool = False,
    level: int = 0,
    stages: Iterable[str] = (),
) -> NetPlan:
    """Read the caffemodel and choose the layers to build as integer layers (steps 1-3 of the module doc).

    Args:
        model: the prototxt (path or ``NetParameter``).
        weights: the caffemodel (path or ``NetParameter``), or None.
        phase, level, stages: the NetState the net will be built with.
        quant_formula: the integer ``Quant`` formula, ``"caffe"`` (default) or ``"ascend"``; used only
            when the caffemodel is a deploy model.
        require_deploy: refuse a caffemodel that is not a deploy model of this net.

    Raises:
        ConfigError: an unknown ``quant_formula``.
        ModelFormatError: ``require_deploy`` and the caffemodel holds no integer blobs for the net's layers.
        WeightShapeError: a deploy model in TRAIN phase, or integer blobs outside the pattern (the message
            says which layer and why).
    """
    formula = check_quant_formula(quant_formula if quant_formula is not None else DEFAULT_QUANT_FORMULA)
    if weights is None:
        if require_deploy:
            raise ModelFormatError("No caffemodel given: a deploy model needs its deploy caffemodel.")
        return NetPlan()
    if isinstance(weights, caffe_pb2.NetParameter):
        source, path = weights, ""
    else:
        path = os.fspath(weights)
        source = load_caffemodel(path)
    layers = _net_layers(model, phase, level, stages)
    names = {lp.name for lp in layers}
    present = {name: kinds for name, kinds in integer_layers_of(source).items() if name in names}
    if not present:
        if require_deploy:
            shown = path or source.name
            raise ModelFormatError(
                f"'{shown}' holds no int8_data/int32_data/uint64_data blobs for the net's layers: it is not "
                "a deploy caffemodel of this model (load float and fake-quant models without require_deploy)."
            )
        return NetPlan(source, path)
    if phase != TEST:
        name = next(iter(present))
        raise _fail(
            path, name,
            f"stores {present[name]} blobs: a deploy model runs only in the integer emulation, which is "
            "inference only. Build the net in TEST phase (the float/fake-quant model is the one to train)."
        )
    variants = _integer_variants(layers, source, present, path, formula)
    LOGGER.debug("Deploy model '%s': %d integer layers.", path or source.name, len(variants))
    return NetPlan(source, path, variants)


def load_net(
    model: ModelArg,
    weights: ModelArg | None = None,
    phase: int = TEST,
    *,
    quant_formula: str | None = None,
    require_deploy: bool = False,
    device: torch.device | str | None = None,
    level: int = 0,
    stages: Iterable[str] = (),
) -> Net:
    """The model as an engine net with its weights; a deploy model runs the integer emulation.

    Args:
        model, weights, phase, level, stages, quant_formula, require_deploy: as for :func:`plan_net`.
        device: torch device; default: the global mode.

    Returns:
        The engine :class:`~amct_caffe.engine.net.Net`, built with the integer layers a deploy caffemodel
        needs (none for a float or fake-quant one) and its blobs copied in.

    Raises:
        ConfigError, ModelFormatError, WeightShapeError: see :func:`plan_net` and the net.
    """
    stages = tuple(stages)
    plan = plan_net(model, weights, phase, quant_formula=quant_formula, require_deploy=require_deploy,
                    level=level, stages=stages)
    net = Net(model, phase, device=device, level=level, stages=stages, variants=plan.variants)
    plan.copy_weights(net)
    return net


# ---------------------------------------------------------------------------------------------------
# the deploy pattern
# ---------------------------------------------------------------------------------------------------
def _net_layers(
    model: ModelArg, phase: int, level: int, stages: Iterable[str]
) -> list[caffe_pb2.LayerParameter]:
    """The layers the net will have, named as the net names them."""
    if isinstance(model, caffe_pb2.NetParameter):
        source, path = model, ""
    else:
        path = os.fspath(model)
        source = load_prototxt(path)
    layers = list(filter_net(source, phase, level, list(stages), path).layer)
    for index, lp in enumerate(layers):
        lp.name = layer_name(lp, index)
    return layers


def _fail(path: str, layer: str, message: str) -> WeightShapeError:
    where = f" of '{path}'" if path else ""
    return WeightShapeError(f"Deploy model{where}, layer '{layer}': {message}")


def _integer_variants(
    layers: Sequence[caffe_pb2.LayerParameter],
    source: caffe_pb2.NetParameter,
    present: Mapping[str, list[str]],
    path: str,
    formula: str,
) -> dict[str, LayerVariant]:
    """The integer variant of every layer of a ``Quant -> L -> DeQuant`` pattern, after checking them all."""
    by_src = {lp.name: lp for lp in source.layer}
    quants: set[int] = set()
    cubes: set[int] = set()
    dequants: dict[int, tuple[int, ...]] = {}
    for di, lp in enumerate(layers):
        if lp.type != DEQUANT or present.get(lp.name) != ["uint64"]:
            continue
        d_shape = blob_shape(by_src[lp.name].blobs[0])
        li = producer_index(layers, di, lp.bottom[0])
        if li is None:
            raise _fail(path, lp.name, "DeQuant has no producer of its bottom.")
        cube = layers[li]
        qi = producer_index(layers, li, cube.bottom[0]) if len(cube.bottom) == 1 else None
        _check_pattern(layers, path, lp, cube, qi, present, by_src)
        assert qi is not None
        if len(d_shape) != 1:
            raise _fail(path, lp.name,
                        f"the DeQuant blob has shape {d_shape}; it must be [C] (per channel) or [1].")
        quants.add(qi)
        cubes.add(li)
        dequants[di] = d_shape
    handled = {layers[i].name for i in (*cubes, *dequants)}
    for name, kinds in present.items():
        if name not in handled:
            lp = next(lp for lp in layers if lp.name == name)
            raise _fail(
                path, name,
                f"stores {kinds} blobs but is not part of a Quant -> (Convolution | Deconvolution | "
                "InnerProduct | Pooling) -> DeQuant pattern with a uint64_data DeQuant blob (layer type "
                f"{lp.type}); the integer emulation cannot run it. Integer blobs belong only to "
                "such layers."
            )
    integer = quants | cubes | set(dequants)
    for qi in sorted(quants):
        for ri in value_readers(layers, qi, layers[qi].top[0]):
            if ri not in integer:
                raise _fail(
                    path, layers[ri].name,
                    f"reads the INT8 codes of Quant layer '{layers[qi].name}' but is a float layer "
                    f"(type {layers[ri].type}); in a deploy model a Quant feeds only quantized layers."
                )
    for li in sorted(cubes):
        readers = value_readers(layers, li, layers[li].top[0])
        if len(readers) != 1 or readers[0] not in dequants:
            raise _fail(
                path, layers[li].name,
                "its INT32 output must be read by exactly one layer, its DeQuant "
                f"(readers: {[layers[r].name for r in readers]})."
            )
    variants = {layers[i].name: LayerVariant(INTEGER, {"formula": formula}) for i in quants}
    variants.update({layers[i].name: LayerVariant(INTEGER) for i in cubes})
    variants.update({layers[i].name: LayerVariant(INTEGER, {"blob_shape": shape})
                     for i, shape in dequants.items()})
    return variants


def _check_pattern(
    layers: Sequence[caffe_pb2.LayerParameter],
    path: str,
    dequant: caffe_pb2.LayerParameter,
    cube: caffe_pb2.LayerParameter,
    qi: int | None,
    present: Mapping[str, list[str]],
    by_src: Mapping[str, caffe_pb2.LayerParameter],
) -> None:
    """Validate ``Quant -> cube -> dequant`` for the integer emulation, with an error saying what is wrong."""
    if cube.type == _POOLING:
        if cube.name in present:
            raise _fail(path, cube.name, "a Pooling layer has no blobs, but the caffemodel gives it some.")
    elif cube.type in _CUBE_PARAMS:
        if len(cube.bottom) != 1 or len(cube.top) != 1:
            raise _fail(
                path, cube.name,
                f"has {len(cube.bottom)} bottoms and {len(cube.top)} tops; the integer emulation "
                "supports one of each."
            )
        src = by_src.get(cube.name)
        kinds = [storage_kind(b) for b in src.blobs] if src is not None else []
        bias_term = getattr(cube, _CUBE_PARAMS[cube.type]).bias_term
        want = ["int8", "int32"] if bias_term else ["int8"]
        if kinds != want:
            raise _fail(
                path, cube.name,
                f"the caffemodel stores its blobs as {kinds or 'nothing'}; a quantized {cube.type} "
                f"before DeQuant '{dequant.name}' needs {want} (weight in int8_data, bias in int32_data)."
            )
    else:
        raise _fail(
            path, dequant.name,
            f"the DeQuant reads the output of '{cube.name}' (type {cube.type}); the integer emulation "
            "supports Convolution, Deconvolution, InnerProduct and Pooling between Quant and DeQuant."
        )
    if qi is None or layers[qi].type != QUANT:
        who = layers[qi].name if qi is not None else "nothing"
        raise _fail(
            path, cube.name,
            f"its bottom is produced by '{who}', not by a Quant layer; a quantized layer of a deploy model "
            "reads the INT8 codes of a Quant layer."
        )
