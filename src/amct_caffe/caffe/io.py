"""pycaffe's ``caffe.io`` array <-> protobuf helpers (the parts that need no image library)."""

from __future__ import annotations

import numpy as np

from amct_caffe.model.blobs import array_to_blob, blob_shape, blob_to_array
from amct_caffe.proto import caffe_pb2


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
