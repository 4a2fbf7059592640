# ruff: noqa: E501  (prototxt text and pycaffe calls kept on one line, as a user writes them)
"""pycaffe script: a net written with caffe.NetSpec, L and P; writes OUT/netspec.prototxt and
OUT/to_proto.prototxt (the text of to_proto())."""

import os
import sys

import caffe
from caffe import layers as L
from caffe import params as P

OUT = sys.argv[1]

n = caffe.NetSpec()
n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64, ntop=2,
                         transform_param=dict(scale=1. / 255), include=dict(phase=caffe.TRAIN))
n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"),
                        param=[dict(lr_mult=1), dict(lr_mult=2)])
n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
n.relu1 = L.ReLU(n.pool1, in_place=True)
n.ip1 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="gaussian", std=0.01),
                       bias_filler=dict(type="constant", value=0.1))
n.drop = L.Dropout(n.ip1, dropout_ratio=0.5, in_place=True)
n.accuracy = L.Accuracy(n.ip1, n.label, include={"phase": caffe.TEST})
n.loss = L.SoftmaxWithLoss(n.ip1, n.label, loss_weight=1)
n.silence = L.Silence(n.label, ntop=0)
with open(os.path.join(OUT, "netspec.prototxt"), "w") as f:
    f.write(str(n.to_proto()))

# tops without NetSpec names get automatic names
x = L.Input(shape=dict(dim=[1, 3, 8, 8]))
y = L.Convolution(L.ReLU(x), num_output=4, kernel_size=3, pad=[1])
z = L.Eltwise(y, L.Convolution(x, num_output=4, kernel_size=1), operation=P.Eltwise.SUM)
with open(os.path.join(OUT, "to_proto.prototxt"), "w") as f:
    f.write(str(caffe.to_proto(z)))
