"""Pieces of the analysis's collection (analysis.collect) that need no quantized model: the walk to the
Quant after a DeQuant, a Quant's factors, and how the report's inputs become batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.analysis import collect
from amct_caffe.engine.net import Net
from amct_caffe.errors import ConfigError
from amct_caffe.proto import caffe_pb2


def layer(name: str, type_: str, bottom: str, top: str) -> caffe_pb2.LayerParameter:
    return caffe_pb2.LayerParameter(name=name, type=type_, bottom=[bottom], top=[top])


def test_readers_follow_in_place_layers_until_the_value_is_overwritten():
    params = [
        layer("dq", "DeQuant", "acc", "a"),
        layer("relu", "ReLU", "a", "a"),       # in place: the readers of its value count
        layer("pool", "Pooling", "a", "p"),
        layer("bn", "BatchNorm", "a", "a"),    # in place again
        layer("quant", "Quant", "a", "q"),
        layer("conv", "Convolution", "x", "a"),  # writes 'a' without reading it: a new value
        layer("quant2", "Quant", "a", "q2"),
    ]
    assert collect._readers_through_in_place(params, 0, "a") == [1, 2, 3, 4]
    assert collect._readers_through_in_place(params, 5, "a") == [6]
    assert collect._readers_through_in_place(params, 6, "q2") == []


def test_quant_factors_as_the_layer_reads_them():
    param = caffe_pb2.LayerParameter(name="q", type="Quant")
    param.quant_param.scale = 1.0 / 0.0117
    param.quant_param.offset = b"\xf9"  # the byte 249 as two's complement
    s_d, o_d = collect.quant_factors(param)
    assert s_d == 1.0 / float(np.float32(1.0 / 0.0117)) and o_d == -7
    no_offset = caffe_pb2.LayerParameter(type="Quant", quant_param={"scale": 4.0})
    assert collect.quant_factors(no_offset) == (0.25, 0)


NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }
"""


@pytest.fixture()
def net() -> Net:
    return Net(text_format.Merge(NET, caffe_pb2.NetParameter()), caffe_pb2.TEST)


def test_input_plan_forms(net):
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    plan = collect.input_plan({"data": x}, net, 2, 0)
    assert (plan.mode, plan.count) == ("given", 2) and plan.batches is not None
    first, second = list(plan.batches)
    np.testing.assert_array_equal(first["data"], x[:3])  # axis 0 split as evenly as possible: 3 + 2
    np.testing.assert_array_equal(second["data"], x[3:])
    listed = collect.input_plan([{"data": x[:1]}, {"data": torch.zeros(4, 3)}, {"data": x}], net, 1, 0)
    assert (listed.mode, listed.count) == ("given", 3)
    random = collect.input_plan(None, net, 3, 9)
    assert (random.mode, random.count) == ("random", 3) and random.batches is not None
    rng = np.random.default_rng(9)
    for batch in random.batches:
        np.testing.assert_array_equal(batch["data"], rng.standard_normal((2, 3)).astype(np.float32))
    with pytest.raises(ConfigError, match="at least"):
        collect.input_plan({"data": x}, net, 6, 0)
    with pytest.raises(ConfigError, match="non-empty list"):
        collect.input_plan([], net, 1, 0)
