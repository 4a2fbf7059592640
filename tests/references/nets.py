"""Small test nets built in code, and the numpy forward of the digits demo net.

The net builders make test inputs (prototxts); they use the proto classes and, for the output shapes of a
synthetic training net, the engine's shape inference. Expected values come from :func:`digits_scores`,
which is written with :mod:`tests.references.layers` only.
"""

from __future__ import annotations

import numpy as np

from amct_caffe.engine.net import Net
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
