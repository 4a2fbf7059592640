"""The layer registry (engine/layers/registry.py): types, variants with fallback, duplicates, and the net's
per-layer variant choice."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from google.protobuf import text_format

from amct_caffe.emulation.integer import IntegerPooling, IntegerQuant
from amct_caffe.engine.layers import LayerVariant, layer_class, register, registry, supported_types
from amct_caffe.engine.layers.activation import ReLU
from amct_caffe.engine.layers.base import TEST, Layer, Tensor
from amct_caffe.engine.layers.quant import Quant
from amct_caffe.engine.net import Net
from amct_caffe.errors import ConfigError, ModelFormatError, UnsupportedLayerError
from amct_caffe.proto import caffe_pb2

SMALL = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }
layer { name: "pool" type: "Pooling" bottom: "r" top: "p"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
"""


def small() -> caffe_pb2.NetParameter:
    return text_format.Merge(SMALL, caffe_pb2.NetParameter())


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test stay out of the real registry."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_types_and_variants_resolve():
    assert layer_class("ReLU") is ReLU
    assert layer_class("Quant") is Quant
    assert layer_class("Quant", variant="integer") is IntegerQuant
    # a type without the variant builds its default implementation
    assert layer_class("ReLU", variant="integer") is ReLU
    assert "Quant" in supported_types() and supported_types() == sorted(set(supported_types()))


def test_unknown_type_names_the_layer_and_file():
    with pytest.raises(UnsupportedLayerError, match=r"Layer 'x' in 'm.prototxt' has type 'Nope'.*ReLU"):
        layer_class("Nope", "x", "m.prototxt")


def test_registering_a_type_and_variant_twice_is_an_error(scratch_registry):
    @register("RegistryTestType", variant="extra")
    class First(Layer):
        pass

    with pytest.raises(RuntimeError, match=r"'RegistryTestType' \(variant 'extra'\) registered twice"):
        @register("RegistryTestType", variant="extra")
        class Second(Layer):
            pass

    with pytest.raises(RuntimeError, match=r"'ReLU' \(variant 'default'\) registered twice"):
        @register("ReLU")
        class OtherReLU(Layer):
            pass

    # nothing of a refused registration is kept (all names are checked before any is registered)
    with pytest.raises(RuntimeError):
        @register("RegistryTestOther", "ReLU")
        class Both(Layer):
            pass

    assert layer_class("RegistryTestType", variant="extra") is First
    assert layer_class("ReLU") is ReLU
    with pytest.raises(UnsupportedLayerError):
        layer_class("RegistryTestOther")


def test_net_builds_the_variant_each_layer_is_given(scratch_registry):
    @register("ReLU", variant="counting")
    class CountingReLU(ReLU):
        def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
            return [bottoms[0] + 1]

    net = Net(small(), TEST, variants={"relu": "counting"})
    assert type(net.engine_layers[1]) is CountingReLU and type(net.engine_layers[2]) is layer_class("Pooling")
    net.run()
    assert float(net.tensor("p").min()) == 1.0  # zeros + 1: the variant ran
    # "integer" Pooling exists, but it needs an integer Quant before it: the net links it and says so
    assert layer_class("Pooling", variant="integer") is IntegerPooling
    with pytest.raises(ModelFormatError, match=r"'pool'.*written by layer 'relu'.*integer Quant"):
        Net(small(), TEST, variants={"pool": "integer"})


def test_net_refuses_variants_for_missing_layers_and_options_nobody_takes():
    with pytest.raises(ConfigError, match=r"variants are given for layers \['relu2'\]"):
        Net(small(), TEST, variants={"relu2": "integer"})
    with pytest.raises(ModelFormatError, match=r"'relu'.*ReLU takes no options, got \['slope'\]"):
        Net(small(), TEST, variants={"relu": LayerVariant(options={"slope": 0.1})})


class _Recorder(Layer):
    """Records what the net hands it at link time."""

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device) -> None:
        super().__init__(param, phase, device)
        self.producers: list[str] = []

    def link(self, producers: Sequence[Layer]) -> None:
        self.producers = [p.name for p in producers]

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return [bottoms[0] * 1 for _ in self.param.top]


def test_link_hands_each_layer_the_writers_of_its_bottoms(scratch_registry):
    register("Eltwise", variant="recording")(_Recorder)
    text = SMALL + """
    layer { name: "relu_in_place" type: "ReLU" bottom: "r" top: "r" }
    layer { name: "sum" type: "Eltwise" bottom: "r" bottom: "data" top: "s" }
    """
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), TEST, variants={"sum": "recording"})
    # the in-place ReLU is the last writer of "r" before "sum"
    assert net.engine_layers[-1].producers == ["relu_in_place", "data"]
