"""Layers that combine, split, reshape or reduce blobs: Eltwise, Concat, Slice, Split, Flatten, Reshape, Crop,
Tile, Reduction, ArgMax, Softmax and Silence.

Every layer follows BVLC Caffe (``src/caffe/layers/*_layer.cpp`` of caffe-master, the commit AMCT patches):
the same parameter defaults and legacy aliases, the same shape rules (checked like Caffe's ``CHECK``s in
``LayerSetUp``/``Reshape``, but raising a :class:`~amct_caffe.errors.ModelFormatError` naming the layer), and
the same tie-breaking where Caffe's result depends on it (Eltwise MAX, ArgMax).

Layers that Caffe implements by sharing memory (Split, Flatten, Reshape, a one-bottom Concat or a one-top
Slice) return views of their bottom, as Caffe's ``ShareData`` does; the others use torch's native ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from amct_caffe.engine.layers.base import Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.proto import caffe_pb2

EltwiseOp = caffe_pb2.EltwiseParameter
ReductionOp = caffe_pb2.ReductionParameter



def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    return int(math.prod(shape[start:end]))


# ------------------------------------------------------------------------------------------------------
@register("Eltwise")
class Eltwise(Layer):
    """Element-wise SUM (with optional per-bottom ``coeff``), PROD or MAX of two or more same-shape bottoms.

    SUM is accumulated in bottom order, ``coeff[0]*b0 + coeff[1]*b1 + ...`` (Caffe's ``axpy`` loop). MAX keeps
    Caffe's tie rule, which decides where the gradient goes: between bottoms 0 and 1 a tie goes to bottom 1
    (``a > b ? a : b``); a later bottom wins only when strictly greater than the running maximum. PROD's
    gradient is the product of the other bottoms (Caffe's default ``stable_prod_grad``), which autograd gives.
    """

    min_bottoms = 2
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.eltwise_param
        self.op = p.operation
        n = len(param.bottom)
        if len(p.coeff) not in (0, n):
            raise self.error(
                f"has {len(p.coeff)} coeff value(s) for {n} bottoms; Eltwise takes one coefficient per "
                "bottom blob (or none)."
            )
        if self.op == EltwiseOp.PROD and len(p.coeff):
            raise self.error("Eltwise takes coefficients only for SUM; remove coeff or use operation: SUM.")
        if self.op not in (EltwiseOp.SUM, EltwiseOp.PROD, EltwiseOp.MAX):
            raise self.error(f"unknown eltwise operation {self.op}; use SUM, PROD or MAX.")
        self.coeffs = [float(np.float32(c)) for c in p.coeff] if len(p.coeff) else [1.0] * n

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        first = _shape(bottoms[0])
        for i, b in enumerate(bottoms[1:], start=1):
            if _shape(b) != first:
                raise self.error(
                    f"bottom {i} '{self.param.bottom[i]}' has shape {list(_shape(b))} but bottom 0 has "
                    f"{list(first)}; Eltwise needs all bottoms of the same shape."
                )
        if self.op == EltwiseOp.SUM:
            top = bottoms[0] if self.coeffs[0] == 1.0 else bottoms[0] * self.coeffs[0]
            for b, c in zip(bottoms[1:], self.coeffs[1:], strict=True):
                top = top + b if c == 1.0 else top + b * c
            return [top]
        if self.op == EltwiseOp.PROD:
            top = bottoms[0] * bottoms[1]
            for b in bottoms[2:]:
                top = top * b
            return [top]
        a, b = bottoms[0], bottoms[1]
        top = torch.where(a > b, a, b)
        for b in bottoms[2:]:
            top = torch.where(b > top, b, top)
        return [top]


# ------------------------------------------------------------------------------------------------------
@register("Concat")
class Concat(Layer):
    """Concatenates bottoms along ``axis`` (default 1, negative counts from the end) or legacy ``concat_dim``.

    All bottoms need the same number of axes and the same size on every other axis. One bottom is passed
    through (Caffe shares its data).
    """

    min_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("sets both axis and concat_dim; specify only one (concat_dim is the legacy "
                             "name).")

    def _axis(self, num_axes: int) -> int:
        p = self.param.concat_param
        if p.HasField("concat_dim"):
            # Caffe casts the uint32 to int and requires 0 <= concat_dim < num_axes.
            dim = int(np.uint32(p.concat_dim).astype(np.int32))
            if not 0 <= dim < num_axes:
                raise self.error(f"concat_dim {p.concat_dim} is out of range for {num_axes}-D bottoms.")
            return dim
        return self.canonical_axis(p.axis, num_axes)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        ref = _shape(bottoms[0])
        axis = self._axis(len(ref))
        for i, b in enumerate(bottoms[1:], start=1):
            s = _shape(b)
            if len(s) != len(ref):
                raise self.error(
                    f"bottom {i} '{self.param.bottom[i]}' has {len(s)} axes but bottom 0 has {len(ref)}; all "
                    "inputs must have the same number of axes."
                )
            for j in range(len(ref)):
                if j != axis and s[j] != ref[j]:
                    raise self.error(
                        f"bottom {i} '{self.param.bottom[i]}' has shape {list(s)}, bottom 0 has {list(ref)}; "
                        f"all inputs must have the same shape except on the concat axis {axis}."
                    )
        if len(bottoms) == 1:
            return [bottoms[0]]
        return [torch.cat(list(bottoms), dim=axis)]


# ------------------------------------------------------------------------------------------------------
@register("Slice")
class Slice(Layer):
    """Splits a bottom along ``axis`` (default 1, or legacy ``slice_dim``) into the tops.

    With ``slice_point`` (strictly increasing, one fewer than the tops) the pieces are
    ``[0, p0), [p0, p1), ..., [p_last, dim)``; without, the axis is divided evenly between the tops, which
    needs the top count to divide it. The tops are views of the bottom.
    """

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("sets both axis and slice_dim; specify only one (slice_dim is the legacy name).")

    def _sizes(self, shape: tuple[int, ...]) -> tuple[int, list[int]]:
        p = self.param.slice_param
        if p.HasField("slice_dim"):
            axis = int(np.uint32(p.slice_dim).astype(np.int32))
            if not 0 <= axis < len(shape):
                raise self.error(f"slice_dim {p.slice_dim} is out of range for a {len(shape)}-D bottom.")
        else:
            axis = self.canonical_axis(p.axis, len(shape))
        dim = shape[axis]
        ntop = len(self.param.top)
        points = [int(v) for v in p.slice_point]
        if points:
            if len(points) != ntop - 1:
                raise self.error(
                    f"has {len(points)} slice_point value(s) for {ntop} tops; give exactly one fewer "
                    "slice_point than tops."
                )
            if ntop > dim:
                raise self.error(f"has {ntop} tops but the slice axis {axis} has only {dim} entries.")
            sizes, prev = [], 0
            for v in points:
                if v <= prev:
                    raise self.error(
                        f"slice_point {points} must be strictly increasing and greater than 0."
                    )
                sizes.append(v - prev)
                prev = v
            if prev > dim:
                raise self.error(
                    f"slice_point {prev} is beyond the size {dim} of slice axis {axis}; every slice_point "
                    "must lie within the axis."
                )
            sizes.append(dim - prev)
        else:
            if dim % ntop:
                raise self.error(
                    f"the number of top blobs ({ntop}) does not evenly divide the slice axis {axis} of size "
                    f"{dim}; give slice_point values or change the number of tops."
                )
            sizes = [dim // ntop] * ntop
        return axis, sizes

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        axis, sizes = self._sizes(_shape(bottoms[0]))
        if len(sizes) == 1:
            return [bottoms[0]]
        return list(torch.split(bottoms[0], sizes, dim=axis))


# ------------------------------------------------------------------------------------------------------
@register("Split")
class Split(Layer):
    """Copies its bottom to every top (Caffe shares the data; gradients from all tops are summed)."""

    exact_bottoms = 1
    min_tops = 1

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return [bottoms[0]] * len(self.param.top)


def _no_in_place(layer: Layer) -> None:
    if layer.param.top and layer.param.bottom and layer.param.top[0] == layer.param.bottom[0]:
        raise layer.error(
            f"{layer.type_name} layer does not allow in-place computation; give the top a name other than "
            f"'{layer.param.bottom[0]}'."
        )


# ------------------------------------------------------------------------------------------------------
@register("Flatten")
class Flatten(Layer):
    """Merges axes ``axis`` .. ``end_axis`` (defaults 1 and -1, both may be negative) into one (a view).

    Caffe rejects in-place Flatten (top named like its bottom), and so do we.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        _no_in_place(self)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        shape = _shape(bottoms[0])
        p = self.param.flatten_param
        start = self.canonical_axis(p.axis, len(shape))
        end = self.canonical_axis(p.end_axis, len(shape), "end_axis")
        if end + 1 < start:
            raise self.error(f"end_axis {p.end_axis} comes before axis {p.axis}; use end_axis >= axis - 1.")
        top = shape[:start] + (_count(shape, start, end + 1),) + shape[end + 1:]
        return [bottoms[0].reshape(top)]


# ------------------------------------------------------------------------------------------------------
@register("Reshape")
class Reshape(Layer):
    """Changes a blob's shape without touching its data (a view), with Caffe's exact rules.

    ``shape`` replaces the bottom axes ``[axis, axis + num_axes)`` (``axis`` default 0, a negative ``axis``
    counts from the end with -1 meaning "after the last axis"; ``num_axes`` default -1 means "to the end"). In
    ``shape``, 0 copies the bottom dimension at the same position *counted from* ``axis`` (so it refers to the
    bottom's axis ``axis + i``, which must exist), and a single -1 is inferred from the element count.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        _no_in_place(self)
        dims = [int(d) for d in param.reshape_param.shape.dim]
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(
                f"shape {dims} contains several -1 dims; at most a single -1 may be specified."
            )
        bad = [d for d in dims if d < -1]
        if bad:
            raise self.error(
                f"shape {dims} has a negative dim {bad[0]}; use positive sizes, 0 (copy) or -1 (infer)."
            )
        self.inferred_axis = inferred[0] if inferred else -1
        self.dims = dims
        self.constant_count = _count([d for d in dims if d > 0])

    def top_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The top shape for a bottom of ``shape`` (Caffe's ``ReshapeLayer::Reshape``)."""
        p = self.param.reshape_param
        n = len(shape)
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"axis {p.axis} is out of range for a {n}-D bottom blob.")
        if p.num_axes < -1:
            raise self.error(f"num_axes {p.num_axes} is invalid; it must be >= 0, or -1 for all axes.")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(
                f"axis + num_axes = {end} is out of range for a {n}-D bottom blob; reduce num_axes."
            )
        top = list(shape[:start]) + list(self.dims) + list(shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(
                    f"shape contains a 0 at position {i}, but there is no bottom axis {start + i} to copy "
                    f"(bottom shape {list(shape)})."
                )
            top[start + i] = shape[start + i]
        total = _count(shape)
        if self.inferred_axis >= 0:
            explicit = self.constant_count * _count(shape, 0, start) * _count(shape, end)
            for i in self.copy_axes:
                explicit *= top[start + i]
            if explicit == 0 or total % explicit:
                raise self.error(
                    f"bottom count ({total}) must be divisible by the product of the specified dimensions "
                    f"({explicit}) to infer the -1 dim (bottom shape {list(shape)}, shape {self.dims})."
                )
            top[start + self.inferred_axis] = total // explicit
        if _count(top) != total:
            raise self.error(
                f"output count {_count(top)} (shape {top}) must match input count {total} "
                f"(bottom shape {list(shape)})."
            )
        return tuple(top)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return [bottoms[0].reshape(self.top_shape(_shape(bottoms[0])))]


# ------------------------------------------------------------------------------------------------------
@register("Crop")
class Crop(Layer):
    """Crops bottom 0 to bottom 1's shape on every axis from ``axis`` (default 2) on.

    ``offset`` gives the start of the crop: none means 0, one value applies to every cropped axis, otherwise
    one value per cropped axis. Bottom 1 only supplies a shape (it receives no gradient).
    """

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        p = self.param.crop_param
        n = len(_shape(bottoms[0]))
        start = self.canonical_axis(p.axis, n)
        if len(p.offset) > 1 and start + len(p.offset) != n:
            raise self.error(
                f"gives {len(p.offset)} offsets for {n - start} cropped axes (axis {start} to {n - 1}); give "
                "one offset for all axes or exactly one per cropped axis."
            )

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        p = self.param.crop_param
        src, ref = _shape(bottoms[0]), _shape(bottoms[1])
        n = len(src)
        start = self.canonical_axis(p.axis, n)
        if len(p.offset) > 1 and start + len(p.offset) != n:
            raise self.error(f"gives {len(p.offset)} offsets but bottom 0 has {n - start} axes to crop.")
        if len(ref) < n:
            raise self.error(
                f"bottom 1 '{self.param.bottom[1]}' has {len(ref)} axes but bottom 0 has {n}; the reference "
                "blob needs at least as many axes."
            )
        index: list[slice] = []
        for i in range(n):
            if i < start:
                index.append(slice(None))
                continue
            off = int(p.offset[0]) if len(p.offset) == 1 else int(p.offset[i - start]) if p.offset else 0
            if src[i] - off < ref[i]:
                raise self.error(
                    f"the crop for axis {i} is out of bounds: size {ref[i]} at offset {off} does not fit in "
                    f"bottom 0's size {src[i]}."
                )
            index.append(slice(off, off + ref[i]))
        return [bottoms[0][tuple(index)]]


# ------------------------------------------------------------------------------------------------------
@register("Tile")
class Tile(Layer):
    """Repeats the bottom ``tiles`` times along ``axis`` (default 1): the block of axes ``axis..`` repeats."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.tile_param
        if not p.HasField("tiles"):
            raise self.error("needs tile_param { tiles: N }; the number of tiles must be specified.")
        if p.tiles <= 0:
            raise self.error(f"tiles is {p.tiles}; the number of tiles must be positive.")

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        p = self.param.tile_param
        shape = _shape(bottoms[0])
        axis = self.canonical_axis(p.axis, len(shape))
        reps = [1] * len(shape)
        reps[axis] = int(p.tiles)
        return [bottoms[0].repeat(*reps)]


# ------------------------------------------------------------------------------------------------------
@register("Reduction")
class Reduction(Layer):
    """Reduces all axes from ``axis`` (default 0) on with SUM, ASUM, SUMSQ or MEAN, then scales by ``coeff``.

    The top shape is ``bottom.shape[:axis]`` (a 0-axis scalar for axis 0). As in Caffe, MEAN is the SUM
    scaled by ``coeff / count`` (computed in float32) and the scaling is skipped when the factor is 1.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        op = param.reduction_param.operation
        if op not in (ReductionOp.SUM, ReductionOp.ASUM, ReductionOp.SUMSQ, ReductionOp.MEAN):
            raise self.error(f"unknown reduction operation {op}; use SUM, ASUM, SUMSQ or MEAN.")

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        p = self.param.reduction_param
        x = bottoms[0]
        shape = _shape(x)
        axis = self.canonical_axis(p.axis, len(shape))
        num, dim = _count(shape, 0, axis), _count(shape, axis)
        flat = x.reshape(num, dim)
        if p.operation == ReductionOp.ASUM:
            top = flat.abs().sum(dim=1)
        elif p.operation == ReductionOp.SUMSQ:
            top = (flat * flat).sum(dim=1)
        else:
            top = flat.sum(dim=1)
        coeff = np.float32(p.coeff)
        if p.operation == ReductionOp.MEAN:
            coeff = np.float32(coeff / np.float32(dim))
        if coeff != np.float32(1):
            top = top * float(coeff)
        return [top.reshape(shape[:axis])]


# ------------------------------------------------------------------------------------------------------
@register("ArgMax")
class ArgMax(Layer):
    """The indices (or values) of the ``top_k`` largest entries, as Caffe's ArgMaxLayer.

    Without ``axis`` each sample (everything after axis 0) is searched and the top has
    ``max(3, bottom axes)`` axes of shape ``[N, 1, top_k, 1, ...]``; with ``out_max_val`` it is
    ``[N, 2, top_k, 1, ...]`` holding the indices and then the values. With ``axis`` the top is the bottom
    shape with that axis replaced by ``top_k``, holding values instead of indices when ``out_max_val``.

    Caffe sorts ``(value, index)`` pairs with ``std::greater``, so among equal values the *higher* index
    comes first; we keep that order. Indices are written as float32. Caffe has no backward for ArgMax, so
    the top carries no gradient.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        if param.argmax_param.top_k < 1:
            raise self.error("top_k must not be less than 1.")

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        self._check(_shape(bottoms[0]))

    def _check(self, shape: tuple[int, ...]) -> int | None:
        p = self.param.argmax_param
        if p.HasField("axis"):
            axis = self.canonical_axis(p.axis, len(shape))
            if p.top_k > shape[axis]:
                raise self.error(
                    f"top_k {p.top_k} is larger than the size {shape[axis]} of axis {axis}; it must be less "
                    "than or equal to the dimension of the axis."
                )
            return axis
        if len(shape) < 1 or p.top_k > _count(shape, 1):
            raise self.error(
                f"top_k {p.top_k} is larger than the {_count(shape, 1)} values per sample of the bottom "
                f"{list(shape)}; it must be at most the size of the flattened sample."
            )
        return None

    @staticmethod
    def _top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Values and indices of the k largest along the last axis, ties to the higher index (Caffe order)."""
        dim = x.shape[-1]
        flipped = x.flip(-1)
        if k == 1:
            # argmax returns the first maximal entry; on the flipped axis that is the highest index.
            idx = torch.argmax(flipped, dim=-1, keepdim=True)
        else:
            idx = torch.sort(flipped, dim=-1, descending=True, stable=True).indices[..., :k]
        values = torch.gather(flipped, -1, idx)
        return values, (dim - 1) - idx

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        p = self.param.argmax_param
        x = bottoms[0].detach()
        shape = _shape(x)
        axis = self._check(shape)
        k = int(p.top_k)
        if axis is not None:
            moved = x.movedim(axis, -1)
            values, idx = self._top_k(moved, k)
            out = values if p.out_max_val else idx.to(torch.float32)
            return [out.movedim(-1, axis).contiguous()]
        n = shape[0]
        values, idx = self._top_k(x.reshape(n, -1), k)
        parts = [idx.to(torch.float32)] + ([values] if p.out_max_val else [])
        out = torch.stack(parts, dim=1)  # [N, 1 or 2, k]
        top_shape = [n, len(parts), k] + [1] * max(0, len(shape) - 3)
        return [out.reshape(top_shape)]


# ------------------------------------------------------------------------------------------------------
@register("Softmax")
class Softmax(Layer):
    """Softmax over ``axis`` (default 1, negative counts from the end), max-subtracted as Caffe does."""

    exact_bottoms = 1
    exact_tops = 1

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        axis = self.canonical_axis(self.param.softmax_param.axis, x.dim())
        return [torch.softmax(x, dim=axis)]


# ------------------------------------------------------------------------------------------------------
@register("Silence")
class Silence(Layer):
    """Consumes its bottoms so they are not net outputs; it has no tops and passes no gradient."""

    min_bottoms = 1
    exact_tops = 0

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return []
