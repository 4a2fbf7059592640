"""The graph IR: producers/consumers across in-place layers, edits."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from amct_caffe.errors import ModelFormatError
from amct_caffe.model.graph import Graph
from amct_caffe.proto import caffe_pb2

NET = """
name: "g"
layer { name: "data" type: "Input" top: "data" }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv1" top: "conv3" }
layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "conv3" top: "sum" }
"""


def make_graph() -> Graph:
    return Graph(text_format.Merge(NET, caffe_pb2.NetParameter()))


def names(layers):
    return [x.name if not isinstance(x, tuple) else (x[0].name, x[1]) for x in layers]


def test_producers_follow_in_place_rewrites():
    g = make_graph()
    assert g.producer("bn1").name == "conv1"
    assert g.producer("scale1").name == "bn1"
    assert g.producer("conv2").name == "relu1"
    assert g.producer("sum", 1).name == "conv3"
    assert g.producer("conv1").name == "data"


def test_consumers_of_each_value():
    g = make_graph()
    assert names(g.consumers("conv1")) == [("bn1", 0)]
    assert names(g.consumers("bn1")) == [("scale1", 0)]
    assert names(g.consumers("scale1")) == [("relu1", 0)]
    assert names(g.consumers("relu1")) == [("conv2", 0), ("conv3", 0)]


def test_remove_in_place_layer_keeps_wiring():
    g = make_graph()
    g.remove_layer("bn1")
    assert g.producer("scale1").name == "conv1"
    assert names(g.consumers("conv1")) == [("scale1", 0)]
    assert names(g.consumers("scale1")) == [("relu1", 0)]


def test_remove_layer_reconnects_readers():
    g = make_graph()
    g.remove_layer("conv2")
    assert list(g.layer("sum").bottom) == ["conv1", "conv3"]
    assert g.producer("sum", 0).name == "relu1"


def test_insert_and_rename():
    g = make_graph()
    quant = caffe_pb2.LayerParameter(name="q", type="Quant", bottom=["conv1"], top=["q"])
    g.insert_before("conv2", quant)
    g.replace_bottom("conv2", "conv1", "q")
    assert [x.name for x in g][5:7] == ["q", "conv2"]
    assert g.producer("conv2").name == "q"
    assert g.producer("conv3").name == "relu1"
    g.rename_top("conv2", "conv2", "conv2_in")
    assert list(g.layer("sum").bottom) == ["conv2_in", "conv3"]
    with pytest.raises(ModelFormatError, match="already has a layer named 'q'"):
        g.insert_after("conv2", quant)


def test_duplicate_layer_names_rejected():
    with pytest.raises(ModelFormatError, match="two layers named 'x'"):
        Graph(text_format.Merge('layer { name: "x" } layer { name: "x" }', caffe_pb2.NetParameter()))
