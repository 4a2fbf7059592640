"""Insert AMCT's ``IFMR`` calibration layers in front of the quantized inputs (``quantize_model``; AMCT
reference §1.2).

For each input value ``x`` read by layers the PTQ config enables (Convolution, Deconvolution, InnerProduct,
AVE Pooling) and each distinct ``activation_quant_params`` among those readers: one ``IFMR`` layer named
``<first reader>_ifmr_layer``, placed just before that reader, whose bottoms are ``x`` once per reader (AMCT's
C++ layer pairs bottom ``i`` with ``object_layer[i]``) and which has no top::

    layer { name: "conv1_ifmr_layer" type: "IFMR" bottom: "data"
            ifmr_param { batch_num: 2 with_offset: true search_range_start: 0.7 search_range_end: 1.3
                         search_step: 0.01 max_percentile: 0.999999 min_percentile: 0.999999
                         object_layer: "conv1" record_file_path: "/abs/record.txt" } }

The layer reads ``x`` at the position of the first reader, so it sees the value every reader sees (readers
are grouped by the value they read, ``quant_insert.readers_by_value``). Nothing else of the net changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from amct_caffe.errors import ConfigError, ModelFormatError
from amct_caffe.model.graph import Graph
from amct_caffe.model.layer_types import IFMR
from amct_caffe.passes.quant_insert import readers_by_value
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.ptq_config import IfmrParams, LayerQuantConfig

IFMR_SUFFIX = "_ifmr_layer"


def ifmr_layer_name(first_reader: str) -> str:
    """Name of the ``IFMR`` layer in front of ``first_reader`` (and the readers sharing its input)."""
    return first_reader + IFMR_SUFFIX


@dataclass(frozen=True)
class CalibrationGroup:
    """The quantized layers that read one value with the same IFMR settings, and their ``IFMR`` layer.

    Attributes:
        bottom: the blob the layers read.
        layers: the layers, in file order (``ifmr_param.object_layer``).
        ifmr: their IFMR settings.
    """

    bottom: str
    layers: tuple[str, ...]
    ifmr: IfmrParams

    @property
    def name(self) -> str:
        return ifmr_layer_name(self.layers[0])


def plan_calibration_groups(graph: Graph, config: Mapping[str, LayerQuantConfig]) -> list[CalibrationGroup]:
    """The ``IFMR`` layers for the enabled layers of ``config`` (a PTQ config's ``layers``), in file order.

    Raises:
        ConfigError: an enabled layer is missing from ``graph`` or does not read one bottom and write one
            other top.
    """
    enabled = [name for name, layer in config.items() if layer.quant_enable]
    for name in enabled:
        if name not in graph:
            raise ConfigError(f"The PTQ config enables layer '{name}', which model '{graph.path}' does not "
                              "have; create the config for this model with create_quant_config.")
        layer = graph.layer(name)
        if len(layer.bottom) != 1 or len(layer.top) != 1 or layer.top[0] == layer.bottom[0]:
            raise ConfigError(f"Layer '{name}' of model '{graph.path}' must read one bottom and write one "
                              "other top to be quantized; set quant_enable to false for it in the PTQ "
                              "config.")
    groups = []
    for blob, readers in readers_by_value(graph, enabled):
        by_params: dict[IfmrParams, list[str]] = {}
        for name in readers:
            by_params.setdefault(config[name].ifmr, []).append(name)
        groups += [CalibrationGroup(blob, tuple(names), params) for params, names in by_params.items()]
    order = {layer.name: i for i, layer in enumerate(graph)}
    return sorted(groups, key=lambda g: order[g.layers[0]])


def ifmr_layer(group: CalibrationGroup, batch_num: int, with_offset: bool,
               record_file: str) -> caffe_pb2.LayerParameter:
    """The group's ``IFMR`` layer (module docstring)."""
    layer = caffe_pb2.LayerParameter(name=group.name, type=IFMR)
    layer.bottom.extend([group.bottom] * len(group.layers))
    p = layer.ifmr_param
    p.batch_num = batch_num
    p.with_offset = with_offset
    p.search_range_start = group.ifmr.search_range_start
    p.search_range_end = group.ifmr.search_range_end
    p.search_step = group.ifmr.search_step
    p.max_percentile = group.ifmr.max_percentile
    p.min_percentile = group.ifmr.min_percentile
    p.object_layer.extend(group.layers)
    p.record_file_path = record_file
    return layer


def insert_calibration_layers(graph: Graph, groups: Sequence[CalibrationGroup], batch_num: int,
                              with_offset: bool, record_file: str) -> None:
    """Insert the ``IFMR`` layers of ``groups`` into ``graph``, each just before its first layer.

    Raises:
        ModelFormatError: an inserted name is already a layer or blob name of the net.
    """
    used = {layer.name for layer in graph}
    used |= {b for layer in graph for b in list(layer.bottom) + list(layer.top)}
    names = [group.name for group in groups]
    for name in names:
        if name in used or names.count(name) > 1:
            raise ModelFormatError(f"Model '{graph.path}' already uses the name '{name}', which the "
                                   "inserted IFMR calibration layer needs; rename that layer or blob.")
    for group in groups:
        graph.insert_before(group.layers[0], ifmr_layer(group, batch_num, with_offset, record_file))
