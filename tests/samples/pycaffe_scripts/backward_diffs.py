# ruff: noqa: E501  (prototxt text and pycaffe calls kept on one line, as a user writes them)
"""pycaffe script: blob and parameter diffs after net.backward() (run by tests/test_pycaffe_parity.py under
the real pycaffe and under `amct-caffe exec`). Writes OUT/out.npz."""

import os
import sys

import caffe
import numpy as np

OUT = sys.argv[1]

BODY = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1" inner_product_param { num_output: 5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "conv1" top: "ip2" inner_product_param { num_output: 5 } }
layer { name: "sum" type: "Eltwise" bottom: "ip1" bottom: "ip2" top: "sum" }
"""
DEPLOY = ('name: "t" %s\nlayer { name: "data" type: "Input" top: "data" '
          'input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }\n' + BODY +
          'layer { name: "prob" type: "Softmax" bottom: "sum" top: "prob" }\n')
TRAIN = ('name: "t"\nlayer { name: "data" type: "Input" top: "data" top: "label" '
         'input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { dim: 2 } } }\n' + BODY +
         'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "sum" bottom: "label" top: "loss" '
         'loss_weight: 2 }\n')

result = {}


def write(name, text):
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def fill(net, seed):
    rng = np.random.RandomState(seed)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.randn(*b.data.shape) * 0.3
    net.blobs["data"].data[...] = rng.randn(*net.blobs["data"].data.shape)
    return rng


def keep(prefix, net, returned):
    for name, value in returned.items():
        result[f"{prefix}/returned/{name}"] = np.array(value)
    for name, blob in net.blobs.items():
        if "_split_" not in name:
            result[f"{prefix}/diff/{name}"] = np.array(blob.diff)
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            result[f"{prefix}/pdiff/{name}/{i}"] = np.array(b.diff)


caffe.set_mode_cpu()
# 1. force_backward, top diff given as an argument: every blob and param diff, the input's too
net = caffe.Net(write("force.prototxt", DEPLOY % "force_backward: true"), caffe.TEST)
rng = fill(net, 0)
net.forward()
keep("force", net, net.backward(prob=rng.randn(2, 5).astype(np.float32)))
# 2. the same net, top diff written into the blob, backward from 'ip1' down to 'pool1' only
net.blobs["ip1"].diff[...] = rng.randn(2, 5)
keep("partial", net, net.backward(start="ip1", end="pool1", diffs=["conv1"]))
# 2b. then from pool1 down to conv1: conv1's two readers' diffs (pool1's new one, ip2's from pass 1) merge
keep("partial2", net, net.backward(start="pool1", end="conv1"))
# 3. no force_backward and no loss: Caffe computes no diffs at all
net = caffe.Net(write("deploy.prototxt", DEPLOY % ""), caffe.TEST)
rng = fill(net, 1)
net.forward()
net.blobs["prob"].diff[...] = 1.0
keep("noforce", net, net.backward())
# 4. a loss (weight 2) in TRAIN: the loss top's diff seeds backward; labels get no diff
net = caffe.Net(write("train.prototxt", TRAIN), caffe.TRAIN)
rng = fill(net, 2)
net.blobs["label"].data[...] = [1, 3]
net.forward()
keep("train", net, net.backward())
result["train/loss_diff"] = np.array(net.blobs["loss"].diff)
# blob bookkeeping (names, without Caffe's split blobs)
names = [n for n in net._blob_names if "_split_" not in n]
result["names/blobs"] = np.array(names)
result["names/inputs"] = np.array([net._blob_names[i] for i in net._inputs])
result["names/outputs"] = np.array([net._blob_names[i] for i in net._outputs])
np.savez(os.path.join(OUT, "out.npz"), **result)
