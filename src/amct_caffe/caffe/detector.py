"""pycaffe's ``caffe.Detector``: classify windows of images (R-CNN style), with optional context padding."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from amct_caffe.caffe.classifier import configure_transformer
from amct_caffe.caffe.io import load_image, resize_image
from amct_caffe.caffe.pycaffe import TEST, Net
from amct_caffe.errors import NotImplementedFeatureError


class Detector(Net):
    """pycaffe's ``caffe.Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``.

    Windows are ``(ymin, xmin, ymax, xmax)`` in pixels. With ``context_pad`` a window is enlarged so that the
    net sees that many pixels of context around it; parts outside the image take the mean.
    """

    def __init__(self, model_file: str, pretrained_file: str, mean: np.ndarray | None = None,
                 input_scale: float | None = None, raw_scale: float | None = None,
                 channel_swap: Sequence[int] | None = None, context_pad: int | None = None) -> None:
        super().__init__(model_file, pretrained_file, TEST)
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.zeros(3, dtype=int)
        self.context_pad: int | None = None
        self.crop_mean: np.ndarray = np.zeros(0, dtype=np.float32)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows: Sequence[tuple[str | os.PathLike[str], Sequence[Any]]]
                       ) -> list[dict[str, Any]]:
        """Classify every window of every image file.

        Args:
            images_windows: ``[(image file, [window, ...]), ...]``.

        Returns:
            One ``{'window', 'prediction', 'filename'}`` dict per window, in input order.
        """
        crops: list[np.ndarray] = []
        for filename, windows in images_windows:
            image = load_image(filename).astype(np.float32)
            crops.extend(self.crop(image, np.asarray(window)) for window in windows)
        name = self.inputs[0]
        shape = (len(crops), crops[0].shape[2], *self.blobs[name].data.shape[2:])
        caffe_in = np.zeros(shape, dtype=np.float32)
        for index, crop in enumerate(crops):
            caffe_in[index] = self.transformer.preprocess(name, crop)
        predictions = self.forward_all(**{name: caffe_in})[self.outputs[0]]  # type: ignore[arg-type]
        detections = []
        index = 0
        for filename, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[index], "filename": filename})
                index += 1
        return detections

    def detect_selective_search(self, image_fnames: Sequence[str]) -> list[dict[str, Any]]:
        """pycaffe's selective-search proposals need the MATLAB ``selective_search_ijcv_with_python`` package;
        amct-caffe does not provide it.

        Raises:
            NotImplementedFeatureError: always; compute windows elsewhere and call :meth:`detect_windows`.
        """
        raise NotImplementedFeatureError(
            "Detector.detect_selective_search needs the MATLAB selective-search package, which amct-caffe "
            "does not provide; compute the windows elsewhere and call detect_windows([(image, windows)])."
        )

    def crop(self, im: np.ndarray, window: np.ndarray) -> np.ndarray:
        """The (H, W, K) crop of ``window``, enlarged by the context padding when one is configured."""
        crop = im[int(window[0]):int(window[2]), int(window[1]):int(window[3])]
        if not self.context_pad:
            return crop
        crop_size = self.blobs[self.inputs[0]].width  # the input is square, as pycaffe assumes
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.0
        half_w = (window[3] - window[1] + 1) / 2.0
        centre = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(centre, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = round(max(0, -box[0]) * scale_h)  # how far the box reaches outside the image
        pad_x = round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        crop_h = min(round((box[2] - box[0] + 1) * scale_h), crop_size - pad_y)
        crop_w = min(round((box[3] - box[1] + 1) * scale_w), crop_size - pad_x)
        context = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
        padded = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        padded[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = resize_image(context, (crop_h, crop_w))
        return padded

    def configure_crop(self, context_pad: int | None) -> None:
        """Set the context padding and the crop's (H, W, K) size and fill value (the mean in image space)."""
        name = self.inputs[0]
        order = list(self.transformer.transpose[name])
        inverse = [order[t] for t in order]
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[inverse]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = mean.copy().transpose(inverse)
        swap = self.transformer.channel_swap.get(name)
        if swap is not None:
            crop_mean = crop_mean[:, :, [list(swap).index(i) for i in range(crop_mean.shape[2])]]
        raw_scale = self.transformer.raw_scale.get(name)
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean
