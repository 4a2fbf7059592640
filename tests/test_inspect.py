"""workflows.inspect: the rows `amct-caffe inspect` prints, on a small net with hand-computed shapes."""

from __future__ import annotations

from pathlib import Path

from amct_caffe.proto import caffe_pb2
from amct_caffe.workflows.inspect import inspect_net, param_summary, shape_text

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "twin" type: "Convolution" bottom: "data" bottom: "data" top: "t1" top: "t2"
        convolution_param { num_output: 2 kernel_size: 1 } }
"""


def _write(tmp_path: Path) -> str:
    path = tmp_path / "tiny.prototxt"
    path.write_text(NET)
    return str(path)


def test_inspect_shapes_params_and_qat(tmp_path: Path) -> None:
    summary = inspect_net(_write(tmp_path))
    by_name = {layer.name: layer for layer in summary.layers}
    assert [layer.name for layer in summary.layers] == ["data", "conv", "relu", "pool", "ip", "twin"]
    # (8 + 2*1 - 3) // 2 + 1 = 4
    assert by_name["conv"].tops[0].shape == (2, 4, 4, 4)
    assert by_name["pool"].tops[0].shape == (2, 4, 1, 1)
    assert by_name["ip"].tops[0].shape == (2, 5)
    assert by_name["conv"].params == "out 4; k 3; s 2; p 1; 4x3x3x3, 4 (112)"
    assert by_name["ip"].learnable == 5 * 4 + 5
    assert summary.learnable == 112 + 25 + (2 * 3 + 2)  # the two-bottom conv applies one weight set
    assert by_name["conv"].qat == "yes" and by_name["ip"].qat == "yes"
    assert by_name["relu"].qat == "no"
    assert by_name["twin"].qat.startswith("no: ")  # two bottoms: not quantized
    assert by_name["pool"].qat.startswith("no: global AVE")  # AMCT quantizes only windowed AVE pooling
    assert summary.quantizable == ("conv", "ip")
    assert summary.shapes_known and not summary.already_quantized and summary.phase == "TEST"


def test_inspect_without_building(tmp_path: Path) -> None:
    summary = inspect_net(_write(tmp_path), caffe_pb2.TRAIN, build=False)
    assert not summary.shapes_known and summary.learnable == 0 and summary.phase == "TRAIN"
    assert all(b.shape is None for layer in summary.layers for b in layer.bottoms + layer.tops)
    assert shape_text(None) == "" and shape_text(()) == "scalar" and shape_text((1, 2)) == "1x2"


def test_param_summary_of_pooling_and_dilation() -> None:
    lp = caffe_pb2.LayerParameter(name="p", type="Pooling")
    lp.pooling_param.pool = caffe_pb2.PoolingParameter.MAX
    lp.pooling_param.kernel_size = 3
    lp.pooling_param.stride = 2
    assert param_summary(lp, []) == "MAX k 3 s 2"
    conv = caffe_pb2.LayerParameter(name="c", type="Convolution")
    conv.convolution_param.num_output = 8
    conv.convolution_param.kernel_h, conv.convolution_param.kernel_w = 3, 1
    conv.convolution_param.dilation.append(2)
    conv.convolution_param.group = 2
    assert param_summary(conv, []) == "out 8; k 3x1; g 2; d 2"
