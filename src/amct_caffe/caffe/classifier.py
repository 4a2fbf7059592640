"""pycaffe's ``caffe.Classifier``: a TEST net that classifies (H, W, K) images, with pycaffe's ten-crop
oversampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from amct_caffe.caffe.io import Transformer, oversample, resize_image
from amct_caffe.caffe.pycaffe import TEST, Net


def configure_transformer(net: Net, mean: Any, input_scale: float | None, raw_scale: float | None,
                          channel_swap: Sequence[int] | None) -> Transformer:
    """The :class:`Transformer` of the net's first input: (H, W, K) -> (K, H, W) plus the given steps."""
    name = net.inputs[0]
    transformer = Transformer({name: net.blobs[name].data.shape})
    transformer.set_transpose(name, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(name, mean)
    if input_scale is not None:
        transformer.set_input_scale(name, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(name, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(name, channel_swap)
    return transformer


class Classifier(Net):
    """pycaffe's ``caffe.Classifier(model_file, pretrained_file, image_dims=None, mean=None,
    input_scale=None, raw_scale=None, channel_swap=None)``.

    Images are resized to ``image_dims`` (default: the input's size), cropped to the input's size (the ten
    crops of :func:`~amct_caffe.caffe.io.oversample`, or the centre), preprocessed by ``self.transformer``
    and classified; the ten crops' predictions are averaged.
    """

    def __init__(self, model_file: str, pretrained_file: str, image_dims: Sequence[int] | None = None,
                 mean: np.ndarray | None = None, input_scale: float | None = None,
                 raw_scale: float | None = None, channel_swap: Sequence[int] | None = None) -> None:
        super().__init__(model_file, pretrained_file, TEST)
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        given = image_dims is not None and len(image_dims) > 0
        self.image_dims = np.array(image_dims) if given else self.crop_dims

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class scores of (H, W, K) images: an (N, classes) array of the net's first output."""
        height, width = int(self.image_dims[0]), int(self.image_dims[1])
        images = np.zeros((len(inputs), height, width, inputs[0].shape[2]), dtype=np.float32)
        for index, image in enumerate(inputs):
            images[index] = resize_image(image, (height, width))
        if oversample:
            crops = _oversample(images, self.crop_dims)
        else:
            centre = np.array(self.image_dims) / 2.0
            half = self.crop_dims / 2.0
            box = (np.tile(centre, 2) + np.concatenate([-half, half])).astype(int)
            crops = images[:, box[0]:box[2], box[1]:box[3], :]
        name = self.inputs[0]
        count, height, width, channels = crops.shape
        caffe_in = np.zeros((count, channels, height, width), dtype=np.float32)
        for index, crop in enumerate(crops):
            caffe_in[index] = self.transformer.preprocess(name, crop)
        predictions = self.forward_all(**{name: caffe_in})[self.outputs[0]]  # type: ignore[arg-type]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions


_oversample = oversample  # ``predict``'s flag has the function's name, as in pycaffe
