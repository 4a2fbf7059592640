"""Caffe's ``DataTransformer`` and the image reading the data layers need (Caffe's ``util/io.cpp``).

What Caffe does (``src/caffe/data_transformer.cpp``, ``Transform(const Datum&, Dtype*)`` and
``Transform(const cv::Mat&, Blob*)``, which compute the same thing), for one (C, H, W) image:

1. ``do_mirror = mirror && Rand(2)`` (drawn first, and only when ``mirror`` is set) -- in TEST as well
   as TRAIN: Caffe has no phase check on mirroring (only the crop offset depends on the phase), so a
   TEST net with ``mirror: true`` flips images at random;
2. with ``crop_size``: in TRAIN a random window, ``h_off = Rand(H - crop + 1)`` then
   ``w_off = Rand(W - crop + 1)``; in TEST the centre window ``((H - crop) / 2, (W - crop) / 2)``
   (integer division, so an odd margin puts the extra pixel on the bottom/right);
3. every output value is ``(x - mean) * scale`` in float, where ``mean`` is the ``mean_file`` image
   at the *source* pixel (the mean is cropped with the same window, before mirroring), or
   ``mean_value[c]`` (one value for all channels, or one per channel), or absent (``x * scale``);
4. with ``do_mirror`` the output column ``w`` is written at ``width - 1 - w``.

``mean_file`` and ``mean_value`` together are an error; ``force_color``/``force_gray`` only affect how an
*encoded* datum is decoded (Caffe logs an error and ignores them for raw datums).

Random numbers come from a numpy generator per transformer, not from Caffe's ``caffe_rng`` (Boost
mt19937), so random crops and mirrors are not the ones Caffe draws; the distribution is the same.

Images are decoded with Pillow instead of OpenCV. Caffe's images are BGR (``cv::imread``/``cv::imdecode``
give B, G, R channel order), so colour images are converted to BGR here; greyscale decoding and resizing
reproduce OpenCV's integer arithmetic (:func:`decode_image`, :func:`resize_linear`), which matched
OpenCV 4.14 bit for bit on PNG, JPEG and BMP files in our checks.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from amct_caffe.errors import AmctError, ModelFormatError, UnsupportedLayerError
from amct_caffe.model.blobs import blob_shape, blob_to_array
from amct_caffe.model.limits import data_file_problem, source_limit_bytes
from amct_caffe.proto import caffe_pb2

ErrorFactory = Callable[[str], Exception]

#: How an image is decoded, as OpenCV's imread/imdecode flags: ``-1`` (IMREAD_UNCHANGED, Caffe's
#: ``DecodeDatumToCVMatNative``), ``1`` (IMREAD_COLOR) or ``0`` (IMREAD_GRAYSCALE).
UNCHANGED, COLOR, GRAY = "unchanged", "color", "gray"


def _default_error(message: str) -> Exception:
    return ModelFormatError(message)


def pillow(what: str) -> ModuleType:
    """``PIL.Image``, or an UnsupportedLayerError saying ``what`` needs ``pip install pillow``."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise UnsupportedLayerError(
            f"{what} reads images with Pillow, which is not installed; run 'pip install pillow'."
        ) from None
    return Image


# -- image decoding -------------------------------------------------------------------------------------
def decode_image(data: bytes | str | os.PathLike[str], mode: str = UNCHANGED, *, what: str = "Image decoding",
                 error: ErrorFactory = _default_error) -> np.ndarray:
    """Decode an image file (path) or encoded bytes to an (H, W, C) uint8 array in OpenCV's channel order.

    ``mode`` follows OpenCV's flags: ``COLOR`` gives 3 channels B, G, R (grey images replicated, alpha
    dropped without compositing, as ``cv::IMREAD_COLOR``); ``GRAY`` gives 1 channel with OpenCV's
    per-format conversion (see :func:`_gray`); ``UNCHANGED``
    keeps the file's channels (grey: 1, colour: BGR, with alpha or a transparent palette: BGRA), as
    ``cv::IMREAD_UNCHANGED``. 16-bit and float images are refused, as Caffe's transformer requires 8 bit.
    EXIF orientation is applied for ``COLOR``/``GRAY`` and not for ``UNCHANGED``, as OpenCV >= 3.1 does.
    """
    Image = pillow(what)
    from PIL import ImageOps, UnidentifiedImageError

    source = data if isinstance(data, (str, os.PathLike)) else io.BytesIO(data)
    label = str(data) if isinstance(data, (str, os.PathLike)) else "encoded datum"
    try:
        with Image.open(source) as img:
            fmt = img.format
            if mode == GRAY and fmt == "JPEG":
                img.draft("L", img.size)  # libjpeg's own greyscale output, as OpenCV asks libjpeg for
            img.load()
            if mode != UNCHANGED:
                img = ImageOps.exif_transpose(img)
            return _to_opencv_array(img, mode, fmt, label, error)
    except AmctError:
        raise  # _to_opencv_array's own message (an AmctError may also be a ValueError)
    except FileNotFoundError:
        raise error(f"cannot open image '{label}': no such file (paths are relative to the working "
                    f"directory '{os.getcwd()}').") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise error(f"cannot decode image '{label}': {exc}.") from None


def _to_opencv_array(img: Any, mode: str, fmt: str | None, label: str, error: ErrorFactory) -> np.ndarray:
    if img.mode.startswith("I;16") and mode != UNCHANGED:
        from PIL import Image

        # 16-bit grey read as 8 bit: libpng's strip_16 (OpenCV) keeps the high byte
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8), "L")
    if mode == COLOR:
        arr = np.asarray(img.convert("RGB"))[:, :, ::-1]
    elif mode == GRAY:
        arr = _gray(img, fmt)[:, :, None]
    else:
        m = img.mode
        if m in ("1", "L"):
            arr = np.asarray(img.convert("L"))[:, :, None]
        elif m in ("RGBA", "LA", "PA") or (m == "P" and "transparency" in img.info):
            arr = np.asarray(img.convert("RGBA"))[:, :, [2, 1, 0, 3]]
        elif m in ("RGB", "P", "YCbCr", "CMYK", "HSV", "LAB", "RGBX"):
            arr = np.asarray(img.convert("RGB"))[:, :, ::-1]
        else:
            raise error(f"image '{label}' has pixel mode {m} (16-bit or float); Caffe's DataTransformer "
                        "takes 8-bit images only. Convert it to 8 bit, or set force_color/force_gray.")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _gray(img: Any, fmt: str | None) -> np.ndarray:
    """Grey levels as OpenCV's IMREAD_GRAYSCALE gives them for the file's format.

    Grey files are taken as they are; a JPEG is decoded by libjpeg in greyscale (see ``draft`` above);
    a colour PNG goes through libpng's ``png_set_rgb_to_gray(1, 0.299, 0.587)``, i.e.
    ``(9797 R + 19234 G + 3737 B) >> 15`` truncated; other colour files through ``cv::cvtColor``'s
    ``(4899 R + 9617 G + 1868 B + 8192) >> 14``. Alpha is dropped first, without compositing.
    """
    if img.mode in ("L", "1", "LA"):
        return np.asarray(img.convert("L"))
    rgb = np.asarray(img.convert("RGB")).astype(np.uint32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if fmt == "PNG":
        return ((r * 9797 + g * 19234 + b * 3737) >> 15).astype(np.uint8)
    return ((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14).astype(np.uint8)


def resize_linear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image as OpenCV's ``cv::resize(..., INTER_LINEAR)`` does for 8 bit.

    OpenCV maps output pixel ``d`` to source ``f = (d + 0.5) * scale - 0.5`` (``scale = 1 / (out/in)``,
    computed in double and rounded to float), takes ``floor(f)`` and ``f - floor(f)``, and quantizes the
    two weights to 11-bit fixed point (``rint(w * 2048)``). Horizontally, a source column left of 0 or
    at/after the last one uses weights (2048, 0) at the clamped column; vertically the two rows are
    clamped and the weights kept. The horizontal pass is exact in int32; the vertical pass rounds as
    OpenCV's SIMD kernel does: ``((r0 >> 4) * b0 >> 16) + ((r1 >> 4) * b1 >> 16) + 2 >> 2``. An exact 2x
    downscale in both directions becomes INTER_AREA (``(a + b + c + d + 2) >> 2``), as in OpenCV.

    This matched ``cv2.resize`` of OpenCV 4.14 bit for bit on every size checked (shrinking, enlarging,
    1/3/4 channels); other OpenCV builds (without SIMD, where a scalar tail rounds as
    ``(r0 * b0 + r1 * b1 + 2^21) >> 22``) can differ by one grey level at some pixels. Pillow's own
    bilinear resize is not used: it is an antialiasing filter when shrinking and differs far more.
    """
    src_h, src_w = img.shape[:2]
    if (src_h, src_w) == (height, width):
        return img.copy()
    inv_x, inv_y = width / src_w, height / src_h
    scale_x, scale_y = 1.0 / inv_x, 1.0 / inv_y
    if _area_fast_2x(scale_x) and _area_fast_2x(scale_y):
        s = img[: height * 2, : width * 2].astype(np.int32)
        total = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
        return ((total + 2) >> 2).astype(np.uint8)

    # horizontal taps and weights
    f = ((np.arange(width, dtype=np.float64) + 0.5) * scale_x - 0.5).astype(np.float32)
    sx = np.floor(f).astype(np.int64)
    fx = (f - sx.astype(np.float32)).astype(np.float32)
    clamp = (sx < 0) | (sx >= src_w - 1)
    fx[clamp] = 0.0
    sx = np.clip(sx, 0, src_w - 1)
    ax0 = np.rint((np.float32(1.0) - fx) * np.float32(2048)).astype(np.int32)
    ax1 = np.rint(fx * np.float32(2048)).astype(np.int32)
    sx1 = np.minimum(sx + 1, src_w - 1)
    # vertical taps and weights
    g = ((np.arange(height, dtype=np.float64) + 0.5) * scale_y - 0.5).astype(np.float32)
    sy = np.floor(g).astype(np.int64)
    fy = (g - sy.astype(np.float32)).astype(np.float32)
    by0 = np.rint((np.float32(1.0) - fy) * np.float32(2048)).astype(np.int32)
    by1 = np.rint(fy * np.float32(2048)).astype(np.int32)
    sy0 = np.clip(sy, 0, src_h - 1)
    sy1 = np.clip(sy + 1, 0, src_h - 1)

    src = img.astype(np.int32)
    rows = src[:, sx, :] * ax0[None, :, None] + src[:, sx1, :] * ax1[None, :, None]  # (H_src, W, C)
    r0 = rows[sy0] >> 4
    r1 = rows[sy1] >> 4
    out = ((r0 * by0[:, None, None]) >> 16) + ((r1 * by1[:, None, None]) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def _area_fast_2x(scale: float) -> bool:
    return abs(scale - round(scale)) < np.finfo(np.float64).eps and round(scale) == 2


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (C, H, W), contiguous."""
    return np.ascontiguousarray(img.transpose(2, 0, 1))


# -- the transformer ------------------------------------------------------------------------------------
class DataTransformer:
    """Caffe's ``DataTransformer`` for (C, H, W) images and ``Datum`` records.

    Args:
        param: the layer's ``transform_param``.
        phase: ``caffe_pb2.TRAIN`` (random crop offsets) or ``caffe_pb2.TEST`` (centre crop); ``mirror``
            flips at random in both phases, as in Caffe.
        rng: numpy generator for the random draws.
        error: builds the exception for a bad parameter or input (a layer passes its ``error``).
        what: names the user of the transformer in "install this package" messages.

    The ``mean_file`` (a binary ``BlobProto``, path relative to the working directory as Caffe opens it)
    is read here, as Caffe's constructor does.
    """

    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int, *,
                 rng: np.random.Generator | None = None, error: ErrorFactory = _default_error,
                 what: str = "DataTransformer") -> None:
        self.param = param
        self.phase = phase
        self.rng = rng if rng is not None else np.random.default_rng()
        self.error = error
        self.what = what
        self.crop_size = int(param.crop_size)
        self.scale = np.float32(param.scale)
        self.mirror = bool(param.mirror)
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32)
        self.mean: np.ndarray | None = None
        self.mean_legacy_chw: tuple[int, int, int] = (0, 0, 0)
        if param.HasField("mean_file"):
            if len(self.mean_values):
                raise error("transform_param sets both mean_file and mean_value; give only one of them.")
            self._load_mean(param.mean_file)

    def _load_mean(self, path: str) -> None:
        limit = source_limit_bytes()
        problem = data_file_problem(path, limit)
        if problem is not None:
            raise self.error(f"transform_param.mean_file '{path}' {problem}")
        try:
            with open(path, "rb") as fh:
                raw = fh.read(limit)
        except OSError as exc:
            raise self.error(f"cannot read transform_param.mean_file '{path}' (relative to the working "
                             f"directory '{os.getcwd()}'): {exc.strerror or exc}.") from None
        blob = caffe_pb2.BlobProto()
        try:
            blob.ParseFromString(raw)
        except Exception:  # protobuf's DecodeError
            raise self.error(f"mean_file '{path}' is not a binary BlobProto (a .binaryproto file).") from None
        shape = blob_shape(blob)
        values = blob_to_array(blob, (-1,), file=path).astype(np.float32, copy=False)
        if int(np.prod(shape)) != values.size or values.size == 0:
            raise self.error(f"mean_file '{path}' holds {values.size} values for shape {shape}.")
        # Caffe compares the mean's channels()/height()/width(), i.e. its axes 1, 2, 3 (LegacyShape:
        # missing axes count as 1), and then reads the first C*H*W values.
        legacy = tuple(int(shape[i]) if i < len(shape) else 1 for i in (1, 2, 3))
        self.mean_legacy_chw = (legacy[0], legacy[1], legacy[2])
        self.mean = values

    # -- shapes -------------------------------------------------------------------------------------------
    def infer_shape(self, chw: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) an input of shape ``chw`` becomes (Caffe's ``InferBlobShape`` without the batch)."""
        c, h, w = (int(v) for v in chw)
        crop = self.crop_size
        if c <= 0:
            raise self.error(f"an input image has {c} channels.")
        if h < crop or w < crop:
            raise self.error(f"crop_size {crop} is larger than an input image ({h} x {w}); lower crop_size "
                             "or use larger images.")
        return (c, crop, crop) if crop else (c, h, w)

    # -- datums -------------------------------------------------------------------------------------------
    def datum_array(self, datum: caffe_pb2.Datum) -> np.ndarray:
        """The (C, H, W) pixels of a datum: uint8 ``data``, ``float_data``, or an encoded image decoded
        as Caffe does (``force_color``/``force_gray`` decode in colour/grey, else the image's own channels).
        """
        if datum.encoded:
            p = self.param
            if p.force_color and p.force_gray:
                raise self.error("transform_param sets both force_color and force_gray; set at most one.")
            mode = COLOR if p.force_color else GRAY if p.force_gray else UNCHANGED
            return hwc_to_chw(decode_image(bytes(datum.data), mode, what=self.what, error=self.error))
        c, h, w = int(datum.channels), int(datum.height), int(datum.width)
        count = c * h * w
        if c <= 0 or h <= 0 or w <= 0:
            raise self.error(f"a Datum has shape channels={c}, height={h}, width={w}; all must be positive.")
        if datum.data:
            if len(datum.data) != count:
                raise self.error(f"a Datum holds {len(datum.data)} bytes of data for {c}x{h}x{w} = {count}.")
            return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
        if len(datum.float_data) != count:
            raise self.error(f"a Datum holds {len(datum.float_data)} float_data values for "
                             f"{c}x{h}x{w} = {count} (and no uint8 data).")
        return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)

    def transform_datum(self, datum: caffe_pb2.Datum) -> np.ndarray:
        """``Transform(datum)``: the datum's pixels transformed to float32 (C, h, w)."""
        return self.transform(self.datum_array(datum))

    # -- images -------------------------------------------------------------------------------------------
    def transform(self, image: np.ndarray) -> np.ndarray:
        """Transform one (C, H, W) image (uint8 or float) to float32 (C, h, w)."""
        return self.transform_batch(np.asarray(image)[None])[0]

    def transform_items(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """Transform a batch of (C, H, W) inputs; the batch shape follows the first item, as Caffe
        reshapes each batch after its first datum/image."""
        first = items[0].shape
        if all(x.shape == first for x in items):
            return self.transform_batch(np.stack(items))
        expected = self.infer_shape(first)
        out = np.empty((len(items), *expected), dtype=np.float32)
        for i, x in enumerate(items):
            y = self.transform(x)
            if y.shape != expected:
                raise self.error(
                    f"the inputs of one batch differ in shape ({first[1:]} then {x.shape[1:]}, channels "
                    f"{first[0]} then {x.shape[0]}); Caffe needs equal shapes within a batch. Resize the "
                    "inputs (ImageData: new_height/new_width) or set transform_param.crop_size."
                )
            out[i] = y
        return out

    def transform_batch(self, images: np.ndarray) -> np.ndarray:
        """Transform (N, C, H, W) images of one shape; each image draws its own mirror and crop."""
        images = np.asarray(images)
        n, c, h, w = images.shape
        oc, oh, ow = self.infer_shape((c, h, w))
        mean_values = self._mean_values(c)
        mean = self._mean_image(c, h, w)
        crop = self.crop_size
        # Caffe draws a mirror in both phases (``mirror && Rand(2)``; its InitRand seeds an RNG when
        # ``mirror || (TRAIN && crop_size)``), a random crop offset only in TRAIN.
        random_crop = bool(crop) and self.phase == caffe_pb2.TRAIN
        if not (self.mirror or random_crop):
            # deterministic: one vectorized op for the whole batch
            h_off, w_off = ((h - crop) // 2, (w - crop) // 2) if crop else (0, 0)
            x = images[:, :, h_off:h_off + oh, w_off:w_off + ow].astype(np.float32)
            if mean is not None:
                m = mean[:, h_off:h_off + oh, w_off:w_off + ow]
                return np.ascontiguousarray((x - m) * self.scale)
            if mean_values is not None:
                return np.ascontiguousarray((x - mean_values[:, None, None]) * self.scale)
            return np.ascontiguousarray(x * self.scale)
        out = np.empty((n, oc, oh, ow), dtype=np.float32)
        for i in range(n):
            do_mirror = bool(self.mirror and self.rng.integers(2))
            h_off = w_off = 0
            if random_crop:
                h_off = int(self.rng.integers(h - crop + 1))
                w_off = int(self.rng.integers(w - crop + 1))
            elif crop:
                h_off, w_off = (h - crop) // 2, (w - crop) // 2
            x = images[i, :, h_off:h_off + oh, w_off:w_off + ow].astype(np.float32)
            if mean is not None:
                y = (x - mean[:, h_off:h_off + oh, w_off:w_off + ow]) * self.scale
            elif mean_values is not None:
                y = (x - mean_values[:, None, None]) * self.scale
            else:
                y = x * self.scale
            out[i] = y[:, :, ::-1] if do_mirror else y
        return out

    def _mean_values(self, channels: int) -> np.ndarray | None:
        mv = self.mean_values
        if not len(mv):
            return None
        if len(mv) == 1:
            return np.repeat(mv, channels)
        if len(mv) != channels:
            raise self.error(f"transform_param has {len(mv)} mean_value entries for images with {channels} "
                             "channels; give either 1 mean_value or as many as channels.")
        return mv

    def _mean_image(self, c: int, h: int, w: int) -> np.ndarray | None:
        if self.mean is None:
            return None
        if self.mean_legacy_chw != (c, h, w):
            raise self.error(f"mean_file '{self.param.mean_file}' has (channels, height, width) "
                             f"{self.mean_legacy_chw} but the input images are {(c, h, w)}; Caffe needs them "
                             "equal (the mean is cropped with the image). Recompute the mean at this size.")
        return self.mean[: c * h * w].reshape(c, h, w)
