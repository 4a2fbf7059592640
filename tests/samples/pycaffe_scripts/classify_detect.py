# ruff: noqa: E501  (prototxt text and pycaffe calls kept on one line, as a user writes them)
"""pycaffe script: caffe.Classifier and caffe.Detector on a small net; writes OUT/out.npz."""

import os
import sys

import caffe
import numpy as np
from PIL import Image

OUT = sys.argv[1]
NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
model = os.path.join(OUT, "small.prototxt")
weights = os.path.join(OUT, "small.caffemodel")
with open(model, "w") as f:
    f.write(NET)
caffe.set_mode_cpu()
net = caffe.Net(model, caffe.TEST)
rng = np.random.RandomState(0)
for blobs in net.params.values():
    for b in blobs:
        b.data[...] = rng.randn(*b.data.shape) * 0.2
net.save(weights)

images = [rng.rand(13, 11, 3).astype(np.float32) for _ in range(3)]
result = {}
clf = caffe.Classifier(model, weights, image_dims=(12, 12), mean=np.array([0.4, 0.5, 0.6]), raw_scale=2.0,
                       channel_swap=(2, 1, 0), input_scale=1.5)
result["classifier/oversample"] = clf.predict(images)
result["classifier/centre"] = clf.predict(images, oversample=False)
result["classifier/default_dims"] = caffe.Classifier(model, weights).predict(images[:1], oversample=False)

# every window needs a resize: pycaffe's Transformer preprocesses a float32 crop of the input's size in
# place, changing the image under the windows that overlap it (ours never writes into its argument)
Image.fromarray((images[0] * 255).astype(np.uint8)).save(os.path.join(OUT, "a.png"))
det = caffe.Detector(model, weights, mean=np.array([0.4, 0.5, 0.6]), raw_scale=1.0)
found = det.detect_windows([(os.path.join(OUT, "a.png"), [np.array([0, 0, 9, 9]), np.array([2, 1, 12, 10]), np.array([4, 3, 12, 11])])])
result["detector/predictions"] = np.array([d["prediction"] for d in found])
result["detector/windows"] = np.array([d["window"] for d in found])
np.savez(os.path.join(OUT, "out.npz"), **result)
