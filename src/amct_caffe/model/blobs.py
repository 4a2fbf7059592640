"""BlobProto <-> numpy, for every storage field Caffe and AMCT use.

Caffe stores float blobs in ``data`` (or ``double_data``) with the shape in ``shape`` (or the legacy
num/channels/height/width fields of old caffemodels). AMCT deploy models add ``int8_data`` (raw bytes),
``int32_data`` and ``uint64_data``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amct_caffe.errors import WeightShapeError
from amct_caffe.model.limits import element_count, elements_problem
from amct_caffe.proto import caffe_pb2


def blob_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...]:
    """The blob's shape: the legacy 4-D (num, channels, height, width) if any of those is set, else
    ``shape.dim`` — which may be empty: Caffe writes a 0-axis blob (one value, e.g. Normalize's shared
    scale) with neither, and reads it back as shape ``()``, as Caffe's ``Blob::FromProto`` does."""
    if has_legacy_shape(blob):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(int(d) for d in blob.shape.dim)


def has_legacy_shape(blob: caffe_pb2.BlobProto) -> bool:
    """True when the blob uses the old num/channels/height/width fields (Caffe checks those first)."""
    return any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def shape_matches(blob: caffe_pb2.BlobProto, target: Sequence[int]) -> bool:
    """Caffe's ``Blob::ShapeEquals``: a legacy 4-D blob matches a target of <= 4 axes padded with 1s."""
    target = tuple(int(t) for t in target)
    if has_legacy_shape(blob):
        if len(target) > 4:
            return False
        padded = (1,) * (4 - len(target)) + target
        return padded == blob_shape(blob)
    return blob_shape(blob) == target


def storage_kind(blob: caffe_pb2.BlobProto) -> str:
    """Which field holds the values, in ATC's precedence: double, int8, int32, uint64, float."""
    if len(blob.double_data):
        return "double"
    if len(blob.int8_data):
        return "int8"
    if len(blob.int32_data):
        return "int32"
    if len(blob.uint64_data):
        return "uint64"
    return "float"


def stored_count(blob: caffe_pb2.BlobProto) -> int:
    """How many values the blob stores, in the field :func:`storage_kind` picks."""
    kind = storage_kind(blob)
    if kind == "double":
        return len(blob.double_data)
    if kind == "int8":
        return len(blob.int8_data)
    if kind == "int32":
        return len(blob.int32_data)
    if kind == "uint64":
        return len(blob.uint64_data)
    return len(blob.data)


def blob_place(file: str = "", layer: str = "", index: int | None = None) -> str:
    """How a message starts about a blob: ``Blob 1 of layer 'conv1' in 'lenet.caffemodel'`` (parts given)."""
    text = "Blob" if index is None else f"Blob {index}"
    if layer:
        text += f" of layer '{layer}'"
    if file:
        text += f" in '{file}'"
    return text


def check_blob(blob: caffe_pb2.BlobProto, *, file: str = "", layer: str = "",
               index: int | None = None) -> None:
    """The blob's shape is a valid Caffe shape and its stored values are exactly as many as the shape holds
    (Caffe's ``Blob::FromProto`` checks the same: ``CHECK_EQ(count_, proto.data_size())``).

    Raises:
        WeightShapeError: a negative axis, more elements than the per-blob limit, or a count mismatch; the
            message names the file, layer and blob index.
    """
    shape = blob_shape(blob)
    place = blob_place(file, layer, index)
    problem = elements_problem(shape)
    if problem is not None:
        raise WeightShapeError(f"{place} {problem}")
    want, have = element_count(shape), stored_count(blob)
    if want != have:
        raise WeightShapeError(
            f"{place} has shape {shape} ({want} values) but stores {have} "
            f"{storage_kind(blob)} values; the file is damaged or was not written by Caffe. Regenerate it "
            "(e.g. save the trained net again)."
        )


def blob_to_array(blob: caffe_pb2.BlobProto, shape: Sequence[int] | None = None, *, file: str = "",
                  layer: str = "", index: int | None = None) -> np.ndarray:
    """The blob's values as a numpy array of its storage dtype, reshaped to ``shape`` or its own shape.

    Args:
        blob: the stored blob.
        shape: the shape to give the values (one with as many elements as the blob's own); default the
            blob's own shape.
        file, layer, index: where the blob comes from, for error messages.

    Raises:
        WeightShapeError: the blob's shape and stored values disagree (see :func:`check_blob`), or ``shape``
            holds another number of elements.
    """
    check_blob(blob, file=file, layer=layer, index=index)
    kind = storage_kind(blob)
    if kind == "double":
        arr = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    elif kind == "int8":
        arr = np.frombuffer(blob.int8_data, dtype=np.int8).copy()
    elif kind == "int32":
        arr = np.asarray(blob.int32_data, dtype=np.int32)
    elif kind == "uint64":
        arr = np.asarray(blob.uint64_data, dtype=np.uint64)
    else:
        arr = np.asarray(blob.data, dtype=np.float32)
    target = tuple(int(d) for d in shape) if shape is not None else blob_shape(blob)
    if -1 not in target and element_count(target) != arr.size:
        raise WeightShapeError(
            f"{blob_place(file, layer, index)} holds {arr.size} values, which do not fill "
            f"shape {target}; use the prototxt the caffemodel was trained with."
        )
    return arr.reshape(target)


def array_to_blob(
    array: np.ndarray, blob: caffe_pb2.BlobProto | None = None, kind: str = "float"
) -> caffe_pb2.BlobProto:
    """Store ``array`` in ``blob`` (a new one if None) with ``shape`` set, in the field ``kind`` names.

    ``kind`` is ``"float"`` (``data``), ``"int8"`` (``int8_data`` bytes), ``"int32"`` or ``"uint64"``.
    """
    blob = caffe_pb2.BlobProto() if blob is None else blob
    blob.Clear()
    array = np.asarray(array)
    blob.shape.dim.extend(int(d) for d in array.shape)
    flat = array.reshape(-1)
    if kind == "float":
        blob.data.extend(flat.astype(np.float32, copy=False).tolist())
    elif kind == "int8":
        blob.int8_data = flat.astype(np.int8, copy=False).tobytes()
    elif kind == "int32":
        blob.int32_data.extend(flat.astype(np.int32, copy=False).tolist())
    elif kind == "uint64":
        blob.uint64_data.extend(flat.astype(np.uint64, copy=False).tolist())
    else:
        raise ValueError(f"unknown blob storage kind {kind!r}")
    return blob
