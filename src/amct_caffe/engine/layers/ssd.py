"""The Caffe-SSD layers (weiliu89/caffe, branch ssd): Permute, Normalize, PriorBox and DetectionOutput.

They follow the CPU code of Caffe-SSD (``src/caffe/layers/{permute,normalize,prior_box,detection_output}
_layer.cpp`` and ``src/caffe/util/bbox_util.cpp``), quirks included:

- PriorBox truncates ``min_size``/``max_size`` to integers (``int min_size_ = min_sizes_[s]``), so a
  ``min_size: 60.5`` gives 60-pixel boxes; the aspect-ratio boxes are built from ``min_size`` only.
- Normalize's scale blob is 0-dimensional (one value, shape ``[]``) when ``channel_shared``.
- DetectionOutput always runs NMS (``nms_param`` absent means threshold 0.3, no top_k), compares overlaps
  with ``<=`` against an adaptive threshold (``eta``), keeps scores strictly above
  ``confidence_threshold``, and writes one ``[i, -1, -1, -1, -1, -1, -1]`` row per image when nothing is
  detected in the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.proto import caffe_pb2

_CodeType = caffe_pb2.PriorBoxParameter
_FLT_MAX = float(np.finfo(np.float32).max)
_NMS_BLOCK = 256  # NMS candidates whose pairwise overlaps are computed at once


def _legacy_dim(t: Tensor, axis: int) -> int:
    """Caffe's ``Blob::LegacyShape``: num/channels/height/width, 1 for axes the blob does not have."""
    return int(t.shape[axis]) if axis < t.dim() else 1


# ---------------------------------------------------------------------------------------------------
@register("Permute")
class Permute(Layer):
    """Reorders the axes of its bottom (``permute_param.order``).

    Caffe-SSD appends the axes the order leaves out, in their original order (``order: 0 order: 2`` on a
    4-D blob is ``[0, 2, 1, 3]``). An order equal to the identity shares the bottom unchanged.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        #: The full axis order (the given axes, then the others in order) and whether it is the identity,
        #: set by :meth:`setup` for the bottom's rank.
        self.order: tuple[int, ...] = ()
        self.identity = False

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        num_axes = bottoms[0].dim()
        orders: list[int] = []
        for order in self.param.permute_param.order:
            if order >= num_axes:
                raise self.error(
                    f"permute_param.order {order} is out of range for a {num_axes}-axis bottom; "
                    f"use axes 0..{num_axes - 1}."
                )
            if order in orders:
                raise self.error(f"permute_param.order repeats axis {order}; give each axis at most once.")
            orders.append(int(order))
        orders += [i for i in range(num_axes) if i not in orders]
        self.order = tuple(orders)
        self.identity = self.order == tuple(range(num_axes))

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if x.dim() != len(self.order):
            raise self.error(
                f"was set up for a {len(self.order)}-axis bottom but got shape {tuple(x.shape)}; "
                "Permute cannot change its number of axes after setup."
            )
        if self.identity:
            return [x]
        return [x.permute(self.order).contiguous()]


# ---------------------------------------------------------------------------------------------------
@register("Normalize")
class Normalize(Layer):
    """L2 normalisation with a learned scale (ParseNet / SSD's ``conv4_3_norm``).

    Per sample, Caffe-SSD computes ``norm = sqrt(sum(x^2) + eps)`` over the whole sample
    (``across_spatial``) or over the channels at each spatial position, then ``y = x / norm * scale``;
    ``scale`` is one value (blob shape ``[]``) when ``channel_shared``, else one per channel (``[C]``).
    The backward is Caffe-SSD's hand-written one (:class:`_NormalizeFn`), which is not the true gradient
    when the scale differs between channels.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.norm_param
        self.across_spatial = bool(p.across_spatial)
        self.channel_shared = bool(p.channel_shared)
        self.eps = float(p.eps)
        #: The bottom's channel count (axis 1), set by :meth:`setup`.
        self.channels: int | None = None

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        x = bottoms[0]
        if not 2 <= x.dim() <= 4:
            raise self.error(
                f"needs a bottom with 2 to 4 axes (N, C[, H[, W]]), got shape {tuple(x.shape)}."
            )
        p = self.param.norm_param
        channels = int(x.shape[1])
        self.channels = channels
        if p.HasField("scale_filler"):
            filler = p.scale_filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        shape: tuple[int, ...] = () if self.channel_shared else (channels,)
        self.blobs = [self.new_blob(shape, filler)]

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        channels = self.channels
        if channels is None or x.dim() < 2 or int(x.shape[1]) != channels:
            raise self.error(
                f"was set up for {channels} channels but got a bottom of shape {tuple(x.shape)}."
            )
        scale = self.blobs[0]
        expected = 1 if self.channel_shared else channels
        if scale.numel() != expected:
            raise self.error(
                f"scale blob has {scale.numel()} value(s) but channel_shared={self.channel_shared} needs "
                f"{expected}; the caffemodel does not match the prototxt's norm_param."
            )
        n = int(x.shape[0])
        y = _NormalizeFn.apply(x.reshape(n, channels, -1), scale, self.across_spatial, self.eps)
        return [y.reshape(x.shape)]


class _NormalizeFn(torch.autograd.Function):
    """Normalize on ``x [N, C, S]`` with Caffe-SSD's backward.

    Caffe-SSD's ``Backward_cpu`` computes ``dx = scale_c * (dy - x * sum(x * dy) / norm^2) / norm`` (sums
    over the sample, or over the channels at each position) and ``dscale = sum(y * dy) / scale``. With a
    per-channel scale the true gradient has ``sum(scale * x * dy)`` inside instead; Caffe's formula is kept
    so that training matches Caffe-SSD (SSD's ``conv4_3_norm`` uses a per-channel scale).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, across_spatial: bool, eps: float) -> Tensor:
        dims = (1, 2) if across_spatial else (1,)
        norm = torch.sqrt((x * x).sum(dim=dims, keepdim=True) + eps)
        s = scale.reshape(()) if scale.numel() == 1 and scale.dim() <= 1 else scale.reshape(1, -1, 1)
        y = x / norm * s
        ctx.dims = dims
        ctx.scale_shape = scale.shape
        ctx.save_for_backward(x, s, norm, y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, s, norm, y = ctx.saved_tensors
        dx = dscale = None
        if ctx.needs_input_grad[0]:
            a = (x * dy).sum(dim=ctx.dims, keepdim=True)
            dx = (dy - x * a / (norm * norm)) / norm * s
        if ctx.needs_input_grad[1]:
            yd = y * dy
            total = yd.sum() if s.dim() == 0 else yd.sum(dim=(0, 2))
            dscale = (total / s.reshape(-1) if s.dim() else total / s).reshape(ctx.scale_shape)
        return dx, dscale, None, None


# ---------------------------------------------------------------------------------------------------
@register("PriorBox")
class PriorBox(Layer):
    """Generates SSD's default boxes for one feature map (bottom 0) of an image (bottom 1).

    Top ``[1, 2, H*W*num_priors*4]``: channel 0 holds ``(xmin, ymin, xmax, ymax)`` per prior, normalised
    by the image size, for each cell in row-major order and, per cell, for each ``min_size``: the square
    ``min_size`` box, then (with ``max_size``) the ``sqrt(min_size*max_size)`` box, then one box per
    aspect ratio other than 1 (``min_size*sqrt(ar)`` wide, ``min_size/sqrt(ar)`` high). The ratio list
    starts with 1, adds each given ratio not already present (within 1e-6) and, with ``flip``, its
    inverse. Channel 1 holds the variances (one value for all four coordinates, or four). The values
    depend only on the shapes, so the last result is cached.
    """

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.prior_box_param
        if len(p.min_size) == 0:
            raise self.error("prior_box_param needs at least one min_size.")
        self.min_sizes = [float(s) for s in p.min_size]
        if any(s <= 0 for s in self.min_sizes):
            raise self.error(f"min_size must be positive, got {self.min_sizes}.")
        ratios = [1.0]
        for ar in p.aspect_ratio:
            ar = float(ar)
            if any(abs(ar - r) < 1e-6 for r in ratios):
                continue
            ratios.append(ar)
            if p.flip:
                ratios.append(1.0 / ar)
        self.aspect_ratios = ratios
        self.max_sizes = [float(s) for s in p.max_size]
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error(
                    f"gives {len(self.max_sizes)} max_size for {len(self.min_sizes)} min_size; give one "
                    "max_size per min_size or none."
                )
            for lo, hi in zip(self.min_sizes, self.max_sizes, strict=True):
                if not hi > lo:
                    raise self.error(f"max_size {hi} must be greater than its min_size {lo}.")
        self.clip = bool(p.clip)
        if len(p.variance) > 1:
            if len(p.variance) != 4:
                raise self.error(f"gives {len(p.variance)} variance values; give exactly 1 or 4.")
            self.variance = [float(v) for v in p.variance]
        elif len(p.variance) == 1:
            self.variance = [float(p.variance[0])]
        else:
            self.variance = [0.1]
        if any(not v > 0 for v in self.variance):
            raise self.error(f"variance values must be positive, got {self.variance}.")
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.error("give either img_size or img_h/img_w, not both.")
            self.img_h, self.img_w = int(p.img_h), int(p.img_w)
            if self.img_h <= 0 or self.img_w <= 0:
                raise self.error("img_h and img_w must both be set and larger than 0.")
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise self.error("img_size must be larger than 0.")
            self.img_h = self.img_w = int(p.img_size)
        else:
            self.img_h = self.img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.error("give either step or step_h/step_w, not both.")
            self.step_h, self.step_w = float(p.step_h), float(p.step_w)
            if not (self.step_h > 0 and self.step_w > 0):
                raise self.error("step_h and step_w must both be set and larger than 0.")
        elif p.HasField("step"):
            if not p.step > 0:
                raise self.error("step must be larger than 0.")
            self.step_h = self.step_w = float(p.step)
        else:
            self.step_h = self.step_w = 0.0
        self.offset = float(p.offset)
        self.box_sizes = self._box_sizes()
        self.num_priors = len(self.box_sizes)
        self._cache: tuple[tuple[int, ...], Tensor] | None = None

    def _box_sizes(self) -> list[tuple[float, float]]:
        """(width, height) of each prior of a cell, as the float32 values Caffe-SSD computes."""
        f32 = np.float32
        sizes: list[tuple[float, float]] = []
        for s, raw_min in enumerate(self.min_sizes):
            min_size = int(raw_min)  # Caffe-SSD: `int min_size_ = min_sizes_[s];`
            sizes.append((float(f32(min_size)), float(f32(min_size))))
            if self.max_sizes:
                max_size = int(self.max_sizes[s])
                side = float(f32(math.sqrt(min_size * max_size)))
                sizes.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                root = math.sqrt(float(f32(ar)))
                sizes.append((float(f32(min_size * root)), float(f32(min_size / root))))
        return sizes

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        layer_h, layer_w = _legacy_dim(bottoms[0], 2), _legacy_dim(bottoms[0], 3)
        if self.img_h == 0 or self.img_w == 0:
            img_h, img_w = _legacy_dim(bottoms[1], 2), _legacy_dim(bottoms[1], 3)
        else:
            img_h, img_w = self.img_h, self.img_w
        key = (layer_h, layer_w, img_h, img_w)
        if self._cache is not None and self._cache[0] == key:
            return [self._cache[1]]
        if layer_h * layer_w * self.num_priors == 0:
            raise self.error(f"feature map bottom has an empty spatial size {layer_h}x{layer_w}.")
        top = torch.from_numpy(self._priors(layer_h, layer_w, img_h, img_w)).to(self.device)
        self._cache = (key, top)
        return [top]

    def _priors(self, layer_h: int, layer_w: int, img_h: int, img_w: int) -> np.ndarray:
        f32 = np.float32
        if self.step_h == 0 or self.step_w == 0:
            step_w, step_h = f32(f32(img_w) / f32(layer_w)), f32(f32(img_h) / f32(layer_h))
        else:
            step_w, step_h = f32(self.step_w), f32(self.step_h)
        offset = f32(self.offset)
        # float32 centres as Caffe (`float center_x = (w + offset_) * step_w`), the rest in double
        cx = ((np.arange(layer_w, dtype=f32) + offset) * step_w).astype(np.float64)
        cy = ((np.arange(layer_h, dtype=f32) + offset) * step_h).astype(np.float64)
        half_w = np.array([w for w, _ in self.box_sizes], dtype=np.float64) / 2.0
        half_h = np.array([h for _, h in self.box_sizes], dtype=np.float64) / 2.0
        cx = np.broadcast_to(cx[None, :, None], (layer_h, layer_w, 1))
        cy = np.broadcast_to(cy[:, None, None], (layer_h, layer_w, 1))
        boxes = np.stack(
            [(cx - half_w) / img_w, (cy - half_h) / img_h, (cx + half_w) / img_w, (cy + half_h) / img_h],
            axis=-1,
        ).astype(f32)
        if self.clip:
            boxes = np.clip(boxes, f32(0.0), f32(1.0))
        variances = np.broadcast_to(np.asarray(self.variance, dtype=f32), boxes.shape)
        return np.stack([boxes.reshape(-1), variances.reshape(-1)])[None].copy()


# ---------------------------------------------------------------------------------------------------
@register("DetectionOutput", "SSDDetectionOutput")
class DetectionOutput(Layer):
    """SSD's detection head: decode, per-class NMS and top-k (Caffe-SSD's ``Forward_cpu``). ATC's Caffe
    parser knows it as ``SSDDetectionOutput`` (the type an ATC-ready prototxt carries), read the same way.

    Bottoms: ``loc [N, num_priors*4*num_loc_classes]`` (per prior, per loc class, 4 values), ``conf
    [N, num_priors*num_classes]`` (probabilities, per prior then class), ``prior [1, 2, num_priors*4]``
    (PriorBox's boxes then variances); an optional 4th bottom (Caffe's visualisation image) is ignored.
    Top ``[1, 1, num_det, 7]``, rows ``(image, label, score, xmin, ymin, xmax, ymax)`` grouped by image,
    then label ascending, then score descending. For each image and non-background class Caffe keeps
    scores ``> confidence_threshold``, sorts them (stable), truncates to ``nms_param.top_k`` and runs greedy
    NMS: a box is kept when its Jaccard overlap (normalised boxes, no +1) with every kept box is
    ``<=`` the adaptive threshold, which is multiplied by ``eta`` after each kept box while above 0.5.
    ``keep_top_k`` then keeps the best boxes of the image over all classes. When the whole batch has no
    detection the top is ``[1, 1, N, 7]`` with row ``i = [i, -1, -1, -1, -1, -1, -1]``. Decoded boxes are
    not clipped. ``save_output_param`` and ``visualize`` (file output for evaluation) are not supported
    and are ignored. Not differentiable (Caffe has no backward for it).
    """

    min_bottoms = 3
    max_bottoms = 4
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param needs num_classes.")
        self.num_classes = int(p.num_classes)
        self.share_location = bool(p.share_location)
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        if self.share_location and self.background_label_id == -1:
            # DecodeBBoxesAll skips the shared label -1 when it equals the background id, and Forward
            # then aborts with "Could not find location predictions for label -1".
            raise self.error(
                "share_location with background_label_id -1 is rejected by Caffe-SSD (it finds no decoded "
                "boxes); use a background_label_id >= 0 or share_location: false."
            )
        self.code_type = int(p.code_type)
        if self.code_type not in (_CodeType.CORNER, _CodeType.CENTER_SIZE, _CodeType.CORNER_SIZE):
            raise self.error(f"unknown code_type {self.code_type}; use CORNER, CENTER_SIZE or CORNER_SIZE.")
        self.variance_encoded_in_target = bool(p.variance_encoded_in_target)
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = (
            float(p.confidence_threshold) if p.HasField("confidence_threshold") else -_FLT_MAX
        )
        nms = p.nms_param
        self.nms_threshold = float(nms.nms_threshold)
        if self.nms_threshold < 0:
            raise self.error(f"nms_param.nms_threshold must be non negative, got {self.nms_threshold}.")
        self.eta = float(nms.eta)
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta}.")
        self.top_k = int(nms.top_k) if nms.HasField("top_k") else -1

    def _check_shapes(self, loc: Tensor, conf: Tensor, prior: Tensor) -> int:
        if _legacy_dim(loc, 0) != _legacy_dim(conf, 0):
            raise self.error(
                f"loc and conf bottoms have different batch sizes: {tuple(loc.shape)} vs {tuple(conf.shape)}."
            )
        num_priors = _legacy_dim(prior, 2) // 4
        if num_priors * self.num_loc_classes * 4 != _legacy_dim(loc, 1):
            raise self.error(
                f"loc bottom has {_legacy_dim(loc, 1)} channels but {num_priors} priors x "
                f"{self.num_loc_classes} loc class(es) x 4 = {num_priors * self.num_loc_classes * 4} are "
                "needed; the number of priors must match the number of location predictions."
            )
        if num_priors * self.num_classes != _legacy_dim(conf, 1):
            raise self.error(
                f"conf bottom has {_legacy_dim(conf, 1)} channels but {num_priors} priors x "
                f"{self.num_classes} classes = {num_priors * self.num_classes} are needed."
            )
        n = _legacy_dim(loc, 0)
        loc_ok = loc.numel() == n * num_priors * self.num_loc_classes * 4
        if not loc_ok or conf.numel() != n * num_priors * self.num_classes:
            raise self.error("loc/conf bottoms must hold exactly N x channels values (no extra axes).")
        if prior.numel() < 2 * num_priors * 4:
            raise self.error(
                f"prior bottom {tuple(prior.shape)} must hold the boxes and the variances (2 x "
                f"{num_priors * 4} values), as PriorBox writes them."
            )
        return num_priors

    def _decode(self, loc: np.ndarray, priors: np.ndarray, variances: np.ndarray) -> np.ndarray:
        """DecodeBBox (float32) for every image, loc class and prior.

        ``loc`` is ``[4, N, L, P]`` (coordinate first); returns ``[5, N, L, P]``: xmin, ymin, xmax, ymax and
        the box size Caffe stores with each decoded box (0 for an inverted box).
        """
        l0, l1, l2, l3 = loc
        pxmin, pymin, pxmax, pymax = priors
        if self.variance_encoded_in_target:
            v0 = v1 = v2 = v3 = np.float32(1.0)
        else:
            v0, v1, v2, v3 = variances
        # Caffe-SSD CHECKs prior width/height > 0 for CENTER_SIZE/CORNER_SIZE at forward time; the engine
        # also runs forward on all-zero inputs while building the net, so such priors decode to empty boxes.
        pw, ph = pxmax - pxmin, pymax - pymin
        with np.errstate(over="ignore", invalid="ignore"):
            if self.code_type == _CodeType.CORNER:
                xmin, ymin = pxmin + v0 * l0, pymin + v1 * l1
                xmax, ymax = pxmax + v2 * l2, pymax + v3 * l3
            elif self.code_type == _CodeType.CENTER_SIZE:
                pcx, pcy = (pxmin + pxmax) / np.float32(2), (pymin + pymax) / np.float32(2)
                cx, cy = v0 * l0 * pw + pcx, v1 * l1 * ph + pcy
                w, h = np.exp(v2 * l2) * pw, np.exp(v3 * l3) * ph
                half_w, half_h = w / np.float32(2), h / np.float32(2)
                xmin, ymin, xmax, ymax = cx - half_w, cy - half_h, cx + half_w, cy + half_h
            else:  # CORNER_SIZE
                xmin, ymin = pxmin + v0 * l0 * pw, pymin + v1 * l1 * ph
                xmax, ymax = pxmax + v2 * l2 * pw, pymax + v3 * l3 * ph
            invalid = (xmax < xmin) | (ymax < ymin)
            sizes = np.where(invalid, np.float32(0.0), (xmax - xmin) * (ymax - ymin))
        return np.stack([xmin, ymin, xmax, ymax, sizes]).astype(np.float32, copy=False)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        loc, conf, prior = bottoms[0], bottoms[1], bottoms[2]
        num_priors = self._check_shapes(loc, conf, prior)
        n = _legacy_dim(loc, 0)
        # Selection is sequential and data dependent, so it runs on the CPU in numpy (as Caffe-SSD does).
        flat_prior = prior.detach().reshape(-1).float().cpu().numpy()
        priors = flat_prior[: num_priors * 4].reshape(num_priors, 4).T
        variances = flat_prior[num_priors * 4 : num_priors * 8].reshape(num_priors, 4).T
        loc_np = loc.detach().float().cpu().numpy().reshape(n, num_priors, self.num_loc_classes, 4)
        decoded = self._decode(np.moveaxis(loc_np, (3, 1), (0, 3)), priors, variances)
        scores_all = conf.detach().float().cpu().numpy().reshape(n, num_priors, self.num_classes)
        rows: list[np.ndarray] = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(n):
                per_class: dict[int, np.ndarray] = {}
                for c in range(self.num_classes):
                    if c == self.background_label_id:
                        continue
                    lc = 0 if self.share_location else c
                    per_class[c] = self._nms(decoded[:, i, lc], scores_all[i, :, c])
                num_det = sum(len(v) for v in per_class.values())
                if -1 < self.keep_top_k < num_det:
                    per_class = self._keep_top_k(per_class, scores_all[i])
                for c in sorted(per_class):
                    kept = per_class[c]
                    if kept.size == 0:
                        continue
                    lc = 0 if self.share_location else c
                    block = np.empty((kept.size, 7), dtype=np.float32)
                    block[:, 0] = i
                    block[:, 1] = c
                    block[:, 2] = scores_all[i, kept, c]
                    block[:, 3:] = decoded[:4, i, lc][:, kept].T
                    rows.append(block)
        if not rows:
            out = np.full((n, 7), -1.0, dtype=np.float32)
            out[:, 0] = np.arange(n, dtype=np.float32)
        else:
            out = np.concatenate(rows)
        return [torch.from_numpy(out).reshape(1, 1, -1, 7).to(self.device)]

    def _keep_top_k(self, per_class: dict[int, np.ndarray], scores: np.ndarray) -> dict[int, np.ndarray]:
        """The ``keep_top_k`` best detections of one image over all classes, grouped by class again."""
        labels = np.concatenate([np.full(len(v), c) for c, v in per_class.items()])
        indices = np.concatenate(list(per_class.values()))
        best = np.argsort(-scores[indices, labels], kind="stable")[: self.keep_top_k]
        # Caffe's std::sort leaves the order of equal scores unspecified; this keeps label order for ties
        return {int(c): indices[best[labels[best] == c]] for c in np.unique(labels[best])}

    def _nms(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Caffe-SSD's ApplyNMSFast on one class: indices of the kept priors, best score first.

        ``boxes`` is ``[5, P]`` (xmin, ymin, xmax, ymax, size).
        """
        candidates = np.flatnonzero(scores > np.float32(self.confidence_threshold))
        if candidates.size == 0:
            return candidates
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        if self.top_k > -1:
            order = order[: self.top_k]
        if order.size == 0:
            return order
        b = boxes[:, order]
        threshold = np.float32(self.nms_threshold)
        if self.eta < 1:
            return order[self._nms_adaptive(b, threshold)]
        # With a fixed threshold, dropping every remaining box that overlaps a kept one is the same as
        # Caffe's test of each candidate against all kept boxes. Candidates go in blocks: greedy within
        # the block on its pairwise matrix, then the block's kept boxes filter all later candidates.
        kept: list[np.ndarray] = []
        remaining = np.arange(order.size)
        rest = b
        while remaining.size:
            block = rest[:, :_NMS_BLOCK]
            within = _overlap_within(block[:, :, None], block[:, None, :], threshold)
            alive = np.ones(block.shape[1], dtype=bool)
            local: list[int] = []
            for k in range(block.shape[1]):
                if alive[k]:
                    local.append(k)
                    alive &= within[k]
            kept.append(remaining[local])
            remaining, rest = remaining[_NMS_BLOCK:], rest[:, _NMS_BLOCK:]
            if remaining.size:
                winners = block[:, local]
                mask = _overlap_within(winners[:, :, None], rest[:, None, :], threshold).all(axis=0)
                remaining, rest = remaining[mask], rest[:, mask]
        return order[np.concatenate(kept)]

    def _nms_adaptive(self, b: np.ndarray, threshold: np.float32) -> list[int]:
        # Each candidate is tested against the kept boxes with the threshold current at its turn.
        eta = np.float32(self.eta)
        kept: list[int] = []
        for k in range(b.shape[1]):
            if kept and not bool(np.all(_overlap_within(b[:, k], b[:, kept], threshold))):
                continue
            kept.append(k)
            if threshold > 0.5:
                threshold = np.float32(threshold * eta)
        return kept


def _overlap_within(box: np.ndarray, others: np.ndarray, threshold: np.float32) -> np.ndarray:
    """For each of ``others [5, K]``: is Caffe-SSD's JaccardOverlap with ``box [5]`` ``<= threshold``?

    Rows are xmin, ymin, xmax, ymax and the size stored at decoding; normalised boxes, no +1. Boxes that
    do not intersect with a positive width and height overlap 0 (this covers Caffe's separate
    disjointness test), which is within any threshold >= 0. Broadcasts (``box [5, K, 1]`` with
    ``others [5, 1, K]`` gives the pairwise matrix).
    """
    iw = np.minimum(others[2], box[2]) - np.maximum(others[0], box[0])
    ih = np.minimum(others[3], box[3]) - np.maximum(others[1], box[1])
    inter = iw * ih
    within = inter / (box[4] + others[4] - inter) <= threshold
    return within | (iw <= 0) | (ih <= 0)
