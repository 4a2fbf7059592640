# ruff: noqa: E501  (prototxt text and pycaffe calls kept on one line, as a user writes them)
"""pycaffe script: caffe.io images, resize, oversample and Transformer; writes OUT/out.npz."""

import os
import sys

import caffe
import numpy as np
from PIL import Image

OUT = sys.argv[1]
rng = np.random.RandomState(0)
result = {}
rgb = (rng.rand(20, 28, 3) * 255).astype(np.uint8)
grey = (rng.rand(12, 9) * 255).astype(np.uint8)
rgba = (rng.rand(10, 10, 4) * 255).astype(np.uint8)
Image.fromarray(rgb).save(os.path.join(OUT, "rgb.png"))
Image.fromarray(grey).save(os.path.join(OUT, "grey.png"))
Image.fromarray(rgba).save(os.path.join(OUT, "rgba.png"))
for name in ("rgb", "grey", "rgba"):
    for color in (True, False):
        result[f"load/{name}/{color}"] = caffe.io.load_image(os.path.join(OUT, name + ".png"), color=color)

image = caffe.io.load_image(os.path.join(OUT, "rgb.png"))
for dims in ((40, 56), (10, 14), (7, 30), (20, 28)):
    result[f"resize/rgb/{dims}"] = caffe.io.resize_image(image, dims)
result["resize/grey"] = caffe.io.resize_image(caffe.io.load_image(os.path.join(OUT, "grey.png"), False), (5, 4))
result["resize/nearest"] = caffe.io.resize_image(image, (31, 13), interp_order=0)
result["resize/flat"] = caffe.io.resize_image(np.full((4, 4, 3), 0.25, np.float32), (6, 6))
result["resize/four"] = caffe.io.resize_image(rng.rand(6, 8, 4).astype(np.float32), (9, 5))
result["oversample"] = caffe.io.oversample([image, image[::-1]], (15, 21))

t = caffe.io.Transformer({"data": (1, 3, 16, 16)})
t.set_transpose("data", (2, 0, 1))
t.set_channel_swap("data", (2, 1, 0))
t.set_raw_scale("data", 255)
t.set_mean("data", np.array([104.0, 117.0, 123.0]))
t.set_input_scale("data", 0.017)
pre = t.preprocess("data", image)
result["transformer/pre"] = pre
result["transformer/de"] = t.deprocess("data", pre)
t2 = caffe.io.Transformer({"data": (1, 3, 16, 16)})
t2.set_transpose("data", (2, 0, 1))
t2.set_mean("data", rng.rand(3, 20, 20).astype(np.float32) * 100)  # resized to 16x16
result["transformer/image_mean"] = t2.mean["data"]
result["transformer/pre2"] = t2.preprocess("data", image)
np.savez(os.path.join(OUT, "out.npz"), **result)
