"""pycaffe's ``caffe.io``: array <-> protobuf helpers, images, and the ``Transformer`` that prepares them.

Images follow pycaffe: :func:`load_image` gives an (H, W, K) float32 array in [0, 1] (RGB, K = 3, or
intensity, K = 1); :func:`resize_image` and :class:`Transformer` work on (H, W, K) arrays;
:func:`oversample` takes the ten crops of pycaffe's classifier.

Image libraries (the optional extra ``amct-caffe[pycaffe]``): Pillow reads images (pycaffe uses
scikit-image; both decode the same pixels, and the grey conversion uses scikit-image's weights); SciPy
resizes. With SciPy, :func:`resize_image` computes what pycaffe's scikit-image resize computes
(anti-aliased when shrinking); without it, a plain numpy interpolation with the same pixel alignment is used,
which equals it when enlarging and differs when shrinking (no anti-aliasing).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from amct_caffe.errors import ConfigError, RuntimeEngineError
from amct_caffe.model.blobs import array_to_blob, blob_shape, blob_to_array
from amct_caffe.proto import caffe_pb2

#: scikit-image's ``rgb2gray`` weights (ITU-R BT.709), which pycaffe's ``load_image(color=False)`` applies
_GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The blob's values (or diff) as a float32 array of its shape."""
    if return_diff:
        return np.asarray(blob.diff, dtype=np.float32).reshape(blob_shape(blob))
    return blob_to_array(blob)


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """A BlobProto holding ``arr`` (float32) and optionally ``diff``."""
    blob = array_to_blob(np.asarray(arr, dtype=np.float32))
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).reshape(-1).tolist())
    return blob


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A Datum from a C x H x W array: uint8 arrays go to ``data`` bytes, others to ``float_data``."""
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape: a datum holds a 3-D array (channels, height, width).")
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).reshape(-1).tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The datum's C x H x W array (uint8 from ``data``, float32 from ``float_data``)."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def arraylist_to_blobprotovector_str(arraylist: Sequence[np.ndarray]) -> bytes:
    """A serialized ``BlobProtoVector`` of the arrays (pycaffe's helper of the same name)."""
    vec = caffe_pb2.BlobProtoVector()
    for arr in arraylist:
        vec.blobs.add().CopyFrom(array_to_blobproto(arr))
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list[np.ndarray]:
    """The arrays of a serialized ``BlobProtoVector``."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(blob) for blob in vec.blobs]


# -- images --------------------------------------------------------------------------------------------------
def load_image(filename: str | os.PathLike[str], color: bool = True) -> np.ndarray:
    """Load an image as pycaffe does: (H, W, 3) RGB, or (H, W, 1) intensity with ``color=False``, float32
    in [0, 1]; an alpha channel is dropped (with ``color=False`` the image is first composited on white).

    Raises:
        RuntimeEngineError: Pillow is not installed, or the file is missing or not an image.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise RuntimeEngineError("caffe.io.load_image needs Pillow: pip install 'amct-caffe[pycaffe]' "
                                 "(or pip install pillow).") from None
    try:
        with Image.open(filename) as img:
            img.load()
            pixels = _image_array(img)
    except FileNotFoundError:
        raise RuntimeEngineError(f"caffe.io.load_image: no such file '{filename}'.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise RuntimeEngineError(f"caffe.io.load_image: cannot read '{filename}' as an image ({exc}).") \
            from None
    if not color and pixels.ndim == 3:
        if pixels.shape[2] == 4:
            alpha = pixels[:, :, 3:4]
            pixels = pixels[:, :, :3] * alpha + (1.0 - alpha)
        pixels = pixels[:, :, :3] @ _GREY_WEIGHTS
    image = pixels.astype(np.float32)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
        if color:
            image = np.tile(image, (1, 1, 3))
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return image


def _image_array(img: Any) -> np.ndarray:
    """The image's pixels as float64 in [0, 1]: grey (H, W), RGB or RGBA (H, W, 3|4)."""
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.float64) / 65535.0
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"), dtype=np.float64) / 255.0
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an (H, W, K) image to ``new_dims`` (height, width) as pycaffe: images with 1 or 3 channels are
    scaled to [0, 1], resized with pixel-area alignment (anti-aliased when shrinking) and scaled back; others
    are zoomed channel-wise. ``interp_order``: 0 nearest, 1 bilinear (SciPy allows up to 5).

    Returns:
        The (new_dims[0], new_dims[1], K) float32 image.
    """
    new_dims = (int(new_dims[0]), int(new_dims[1]))
    if im.shape[-1] in (1, 3):
        lo, hi = float(im.min()), float(im.max())
        if hi <= lo:
            return np.full((*new_dims, im.shape[-1]), lo, dtype=np.float32)
        standard = (im - lo) / (hi - lo)
        resized = _area_aligned_resize(standard, new_dims, interp_order) * (hi - lo) + lo
    else:
        resized = _zoom_channels(im, new_dims, interp_order)
    return resized.astype(np.float32)


def _area_aligned_resize(im: np.ndarray, new_dims: tuple[int, int], order: int) -> np.ndarray:
    """scikit-image's ``resize(..., mode='constant')`` of an (H, W, K) array (SciPy), else the numpy
    fallback."""
    out_shape = (*new_dims, im.shape[2])
    factors = np.divide(im.shape, out_shape)
    try:
        from scipy import ndimage  # type: ignore[import-untyped]
    except ImportError:
        return _numpy_resize(im, new_dims, order)
    filtered = im
    if any(o < i for o, i in zip(out_shape, im.shape)):  # scikit-image smooths float images, any order
        filtered = ndimage.gaussian_filter(im, np.maximum(0, (factors - 1) / 2), cval=0, mode="grid-constant")
    out = ndimage.zoom(filtered, 1 / factors, order=order, mode="grid-constant", cval=0, grid_mode=True)
    return np.clip(out, im.min(), im.max())


def _numpy_resize(im: np.ndarray, new_dims: tuple[int, int], order: int) -> np.ndarray:
    """Interpolate with pixel-area alignment (an output pixel's centre maps to the input's), zeros beyond the
    border and the result clipped to the input's range, as scikit-image's ``mode='constant'``; no
    anti-aliasing. ``order`` 0 picks the nearest pixel, anything else is bilinear."""
    rows = (np.arange(new_dims[0]) + 0.5) * im.shape[0] / new_dims[0] - 0.5
    cols = (np.arange(new_dims[1]) + 0.5) * im.shape[1] / new_dims[1] - 0.5
    if order == 0:
        r = np.clip(np.floor(rows + 0.5).astype(int), 0, im.shape[0] - 1)
        c = np.clip(np.floor(cols + 0.5).astype(int), 0, im.shape[1] - 1)
        return im[r][:, c]
    padded = np.pad(im, ((1, 1), (1, 1), (0, 0)))
    rows, cols = rows + 1, cols + 1
    r0 = np.clip(np.floor(rows).astype(int), 0, padded.shape[0] - 2)
    c0 = np.clip(np.floor(cols).astype(int), 0, padded.shape[1] - 2)
    fr = np.clip(rows - r0, 0, 1)[:, None, None]
    fc = np.clip(cols - c0, 0, 1)[None, :, None]
    top = padded[r0][:, c0] * (1 - fc) + padded[r0][:, c0 + 1] * fc
    bottom = padded[r0 + 1][:, c0] * (1 - fc) + padded[r0 + 1][:, c0 + 1] * fc
    return np.clip(top * (1 - fr) + bottom * fr, im.min(), im.max())


def _zoom_channels(im: np.ndarray, new_dims: tuple[int, int], order: int) -> np.ndarray:
    """pycaffe's resize of images whose channel count is not 1 or 3: SciPy's plain ``zoom`` per channel."""
    scale = (new_dims[0] / im.shape[0], new_dims[1] / im.shape[1], 1.0)
    try:
        from scipy import ndimage
    except ImportError:
        return _numpy_resize(im, new_dims, order)
    return ndimage.zoom(im, scale, order=order)


def oversample(images: Sequence[np.ndarray] | np.ndarray,
               crop_dims: Sequence[int] | np.ndarray) -> np.ndarray:
    """pycaffe's ten crops of each (H, W, K) image: the four corners and the centre, then the same five
    mirrored left-right.

    Returns:
        A (10 * len(images), crop height, crop width, K) float32 array.
    """
    height, width, channels = images[0].shape
    ch, cw = int(crop_dims[0]), int(crop_dims[1])
    corners = [(top, left) for top in (0, height - ch) for left in (0, width - cw)]
    # pycaffe places the centre crop at int(centre - crop / 2) of the float centre
    centre = (int(height / 2.0 - ch / 2.0), int(width / 2.0 - cw / 2.0))
    windows = [*corners, centre]
    crops = np.empty((10 * len(images), ch, cw, channels), dtype=np.float32)
    index = 0
    for im in images:
        for top, left in windows:
            crops[index] = im[top:top + ch, left:left + cw, :]
            index += 1
        crops[index:index + 5] = crops[index - 5:index, :, ::-1, :]
        index += 5
    return crops


class Transformer:
    """pycaffe's ``caffe.io.Transformer``: turns (H, W, K) images into a net's (K, H, W) input and back.

    :meth:`preprocess` converts to float32, resizes to the input's spatial size, then applies, in this order,
    the transpose, the channel swap, the raw scale, the mean subtraction and the input scale set for the
    input; :meth:`deprocess` undoes them. Unlike pycaffe's, ``preprocess`` never writes into the array it
    is given (pycaffe's subtracts the mean in place from a float32 image that needs no resize, so windows
    of one image that overlap see each other's preprocessing).

    Args:
        inputs: ``{input blob name: its shape (N, K, H, W)}``, e.g.
            ``{'data': net.blobs['data'].data.shape}``.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]) -> None:
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, tuple[int, ...]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise ConfigError(f"Transformer: '{in_}' is not one of the net inputs: {sorted(self.inputs)}.")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """An (H', W', K) image as input ``in_``'s (K, H, W) float32 array (see the class docstring)."""
        self._check_input(in_)
        caffe_in = np.array(data, dtype=np.float32)  # a copy: the steps below work in place, as pycaffe's
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            caffe_in *= self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in -= self.mean[in_]
        if in_ in self.input_scale:
            caffe_in *= self.input_scale[in_]
        return caffe_in

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """Undo :meth:`preprocess` on a (K, H, W) array (squeezed first, as pycaffe); no resize back."""
        self._check_input(in_)
        image = np.array(data).squeeze()
        if in_ in self.input_scale:
            image /= self.input_scale[in_]
        if in_ in self.mean:
            image += self.mean[in_]
        if in_ in self.raw_scale:
            image /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            image = image[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            image = image.transpose(np.argsort(self.transpose[in_]))
        return image

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """The axis order to transpose the image to, e.g. ``(2, 0, 1)`` for (H, W, K) -> (K, H, W).

        Raises:
            ConfigError: ``order`` does not have one entry per image axis.
        """
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ConfigError(f"Transformer.set_transpose('{in_}', {tuple(order)}): the order needs "
                              f"{len(self.inputs[in_]) - 1} axes, as the input has.")
        self.transpose[in_] = tuple(int(o) for o in order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """The channel order, applied after the transpose: ``(2, 1, 0)`` turns RGB into BGR.

        Raises:
            ConfigError: ``order`` does not have one entry per input channel.
        """
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise ConfigError(f"Transformer.set_channel_swap('{in_}', {tuple(order)}): the input has "
                              f"{self.inputs[in_][1]} channels.")
        self.channel_swap[in_] = tuple(int(o) for o in order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Multiply the image by ``scale`` before the mean is subtracted (255 for nets trained on
        [0, 255])."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """The mean to subtract: one value per channel (K,), or a (K, H, W) image (resized to the input's
        size).

        Raises:
            ConfigError: a per-channel mean with another channel count, or a mean that is neither 1-D nor
                (K, H, W) / (H, W).
        """
        self._check_input(in_)
        mean = np.asarray(mean)
        shape = self.inputs[in_]
        if mean.ndim == 1:
            if mean.shape[0] != shape[1]:
                raise ConfigError(f"Transformer.set_mean('{in_}'): the mean has {mean.shape[0]} channels, "
                                  f"the input {shape[1]}.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            dims = mean.shape if mean.ndim != 2 else (1, *mean.shape)
            if len(dims) != 3:
                raise ConfigError(f"Transformer.set_mean('{in_}'): a mean of shape {mean.shape} is neither "
                                  "per channel (K,) nor an image (K, H, W).")
            mean = mean.reshape(dims)
            if dims != shape[1:]:
                lo, hi = mean.min(), mean.max()
                normal = (mean - lo) / (hi - lo)
                resized = resize_image(normal.transpose((1, 2, 0)), shape[2:]).transpose((2, 0, 1))
                mean = resized * (hi - lo) + lo
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Multiply the input by ``scale`` after the mean is subtracted."""
        self._check_input(in_)
        self.input_scale[in_] = scale
