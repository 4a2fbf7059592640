"""Small test nets built in code, and the numpy forward of the digits demo net.

The net builders make test inputs (prototxts, caffemodels of random weights, an engine net with one IFMR
layer); they use the proto classes and the engine (shape inference, the random filler, saving). Expected
values come from :func:`digits_scores`, which is written with :mod:`tests.references.layers` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format

from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.proto import caffe_pb2
from tests.references import layers

#: Real nets of the shared models folder: (deploy prototxt, caffemodel or None for random weights, batch,
#: input height/width or None to keep the prototxt's).
REAL_NETS: dict[str, tuple[str, str | None, int, tuple[int, int] | None]] = {
    "mtcnn_det1": ("mtcnn_det1_pnet/det1.prototxt", "mtcnn_det1_pnet/det1.caffemodel", 2, None),
    "mtcnn_det2": ("mtcnn_det2_rnet/det2.prototxt", "mtcnn_det2_rnet/det2.caffemodel", 2, None),
    "mtcnn_det3": ("mtcnn_det3_onet/det3.prototxt", "mtcnn_det3_onet/det3.caffemodel", 2, None),
    "resnet50_stem": ("resnet50_stem_test/test.prototxt", "resnet50_stem_test/test.caffemodel", 2, None),
    "fsrcnn": ("fsrcnn/FSRCNN_mat.prototxt", "fsrcnn/snapshot_iter_2546000.caffemodel", 2, None),
    "lenet_mnist": ("lenet_mnist/mnist_deploy.prototxt", "lenet_mnist/lenet_iter_10000.caffemodel", 2, None),
    # random weights; 112x112 (its pool6 is global) keeps IFMR over 54 inputs to about a second
    "mobilenet_v2": ("mobilenet_v2/mobilenet_v2_deploy.prototxt", None, 1, (112, 112)),
}


#: The post-training quantization tests' net: conv1 (+ BatchNorm + Scale in place, ReLU) -> AVE pool1 ->
#: conv2a / conv2b (one input, two readers) -> Eltwise -> ip1 (+ BatchNorm + Scale, not in place) -> Softmax.
#: Quantizable: conv1, pool1, conv2a, conv2b, ip1 (:data:`PTQ_QUANTIZED`); the IFMR groups: data -> conv1,
#: conv1 -> pool1, pool1 -> conv2a + conv2b, sum -> ip1.
PTQ_NET = """
name: "ptqnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "conv2a" type: "Convolution" bottom: "pool1" top: "conv2a"
        convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "conv2b" type: "Convolution" bottom: "pool1" top: "conv2b"
        convolution_param { num_output: 3 kernel_size: 1 bias_term: false } }
layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }
layer { name: "ip1" type: "InnerProduct" bottom: "sum" top: "ip1" inner_product_param { num_output: 5 } }
layer { name: "bn_ip" type: "BatchNorm" bottom: "ip1" top: "bn_ip" }
layer { name: "scale_ip" type: "Scale" bottom: "bn_ip" top: "scale_ip" scale_param { bias_term: true } }
layer { name: "prob" type: "Softmax" bottom: "scale_ip" top: "prob" }
"""
PTQ_QUANTIZED = ["conv1", "pool1", "conv2a", "conv2b", "ip1"]


def write_random_net(folder: Path, text: str = PTQ_NET, name: str = "model",
                     seed: int = 0) -> tuple[str, str]:
    """``folder/name.prototxt`` holding ``text`` and ``folder/name.caffemodel`` with random (plausible)
    weights for it, drawn with ``seed``; returns their paths."""
    proto = folder / f"{name}.prototxt"
    proto.write_text(text)
    net = Net(str(proto))
    randomize_params(net, seed)
    caffemodel = folder / f"{name}.caffemodel"
    net.save(caffemodel)
    return str(proto), str(caffemodel)


def one_ifmr_net(batch_num: int, with_offset: bool = True, bottoms: int = 1, record: str = "",
                 percentiles: tuple[float, float] = (0.999999, 0.999999)) -> Net:
    """An engine net of a (4, 2, 3) Input ``data`` read by one IFMR layer ``cal`` (AMCT's default search
    range) listing ``data`` ``bottoms`` times, for the object layers ``c0``, ``c1``...; ``record`` is its
    record file (none if empty)."""
    objects = " ".join(f'object_layer: "c{i}"' for i in range(bottoms))
    text = (
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 2 dim: 3 } } }\n'
        'layer { name: "cal" type: "IFMR" ' + 'bottom: "data" ' * bottoms
        + f"ifmr_param {{ batch_num: {batch_num} with_offset: {str(with_offset).lower()} "
        f"search_range_start: 0.7 search_range_end: 1.3 search_step: 0.01 max_percentile: {percentiles[0]} "
        f"min_percentile: {percentiles[1]} {objects} "
        + (f'record_file_path: "{record}" ' if record else "") + "} }\n"
    )
    return Net(text_format.Merge(text, caffe_pb2.NetParameter()))


def quantizable(layer: caffe_pb2.LayerParameter) -> bool:
    """AMCT's QAT rule for which layers are quantized, written out independently of the passes:
    Convolution; InnerProduct on axis 1 without transpose; Deconvolution with group 1 and no dilation;
    AVE Pooling that is not global."""
    if layer.type == "Convolution":
        return True
    if layer.type == "InnerProduct":
        p = layer.inner_product_param
        return p.axis == 1 and not p.transpose
    if layer.type == "Deconvolution":
        c = layer.convolution_param
        return c.group == 1 and all(d == 1 for d in c.dilation)
    if layer.type == "Pooling":
        pool = layer.pooling_param
        return pool.pool == caffe_pb2.PoolingParameter.AVE and not pool.global_pooling
    return False


def expected_quantized_inputs(net: caffe_pb2.NetParameter) -> int:
    """How many distinct input values feed quantizable layers (one ActivationQAT each): a blob name gets a
    new value whenever a layer writes it (in-place layers included)."""
    version: dict[str, int] = {}
    inputs: set[tuple[str, int]] = set()
    for layer in net.layer:
        if quantizable(layer):
            inputs.add((layer.bottom[0], version.get(layer.bottom[0], 0)))
        for top in layer.top:
            version[top] = version.get(top, 0) + 1
    return len(inputs)


def synthetic_training_net(deploy: caffe_pb2.NetParameter, batch: int,
                           size: tuple[int, int] | None) -> caffe_pb2.NetParameter:
    """The deploy net as a tiny training net: each Input becomes a DummyData of gaussian values, a final
    Softmax is dropped (its saturated output would give no gradient), and every output gets an
    EuclideanLoss against a DummyData target of its shape."""
    src = caffe_pb2.NetParameter()
    src.CopyFrom(deploy)
    for layer in src.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
                if size is not None:
                    shape.dim[2:] = size
    consumed = {bottom for layer in src.layer for bottom in layer.bottom}
    kept = [layer for layer in src.layer if not (layer.type == "Softmax" and not set(layer.top) & consumed)]
    del src.layer[:]
    src.layer.extend(kept)
    probe = Net(src, caffe_pb2.TEST)
    out = caffe_pb2.NetParameter(name=src.name)
    for layer in src.layer:
        if layer.type != "Input":
            out.layer.add().CopyFrom(layer)
            continue
        data = out.layer.add(name=layer.name, type="DummyData", top=layer.top)
        for shape in layer.input_param.shape:
            data.dummy_data_param.shape.add().CopyFrom(shape)
        data.dummy_data_param.data_filler.add(type="gaussian", std=1.0)
    for name in probe.outputs:
        target = out.layer.add(name=f"{name}_target", type="DummyData", top=[f"{name}_target"])
        target.dummy_data_param.shape.add(dim=list(probe.tensor(name).shape))
        target.dummy_data_param.data_filler.add(type="gaussian", std=1.0)
        out.layer.add(name=f"{name}_loss", type="EuclideanLoss", bottom=[name, f"{name}_target"],
                      top=[f"{name}_loss"])
    return out


def digits_scores(blobs: dict[str, list[np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The digits demo net conv1-relu-maxpool-conv2-relu-avepool-ip1-relu-ip2 in float64: the class scores
    before Softmax. Both convolutions are 3x3 with pad 1; both poolings 2x2 with stride 2."""
    h = np.asarray(x, np.float64)
    h = layers.pool2d(np.maximum(layers.conv2d(h, *blobs["conv1"], pad=1), 0.0), "MAX", 2, 2)
    h = layers.pool2d(np.maximum(layers.conv2d(h, *blobs["conv2"], pad=1), 0.0), "AVE", 2, 2,
                      ave_dtype=np.float64)
    h = np.maximum(layers.inner_product(h, *blobs["ip1"]), 0.0)
    return layers.inner_product(h, *blobs["ip2"])
