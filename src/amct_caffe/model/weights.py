"""A net's weights as plain numpy arrays: ``{layer name: [blob 0, blob 1, ...]}``, to and from a caffemodel.

Passes that change weights (BatchNorm folding, retrain-layer insertion, the saved quantized models) edit this
mapping rather than ``BlobProto`` messages. The arrays are float32 in Caffe's layouts (Convolution weight
``[out, in/group, kh, kw]``, Deconvolution ``[in, out/group, kh, kw]``, InnerProduct ``[out, in]``, biases
and BatchNorm/Scale parameters ``[C]``, the BatchNorm factor ``[1]``).

Old caffemodels store blobs with the legacy 4-D ``num/channels/height/width`` fields (a bias as
``1 x 1 x 1 x C``); Caffe's ``Blob::ShapeEquals`` accepts them for any target of at most 4 axes padded with
leading 1s. :func:`weights_from_net` gives the blobs of the layer types whose blob ranks are fixed
(convolutions, InnerProduct, BatchNorm, Scale, Bias, PReLU) their real Caffe shapes, so that a pass can
rely on them; other legacy blobs keep their 4-D shape, and :func:`weights_to_net` writes such a blob back
with the legacy fields (given the original caffemodel), so that Caffe still loads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from amct_caffe.errors import ModelFormatError
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import blob_to_array, has_legacy_shape, storage_kind
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("model.weights")

#: Layer name -> its blobs (float32 arrays in Caffe's layout), in the order of the layer's ``blobs``.
Weights = dict[str, list[np.ndarray]]

#: The rank of each blob (by index) of the layer types whose blob ranks do not depend on the net; ``None``
#: keeps the stored shape (a convolution filter has one axis per spatial axis plus two).
_BLOB_RANKS: dict[str, tuple[int | None, ...]] = {
    "Convolution": (None, 1),
    "Deconvolution": (None, 1),
    "InnerProduct": (2, 1),
    "BatchNorm": (1, 1, 1),
    "Scale": (1, 1),
    "Bias": (1,),
    "PReLU": (1,),
}


def _normalised_shape(layer_type: str, index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A legacy 4-D shape with its leading 1-axes dropped down to the blob's real rank, where known."""
    ranks = _BLOB_RANKS.get(layer_type, ())
    rank = ranks[index] if index < len(ranks) else None
    if rank is None or len(shape) <= rank:
        return shape
    lead = shape[: len(shape) - rank]
    if any(d != 1 for d in lead):
        return shape
    return shape[len(shape) - rank:]


def weights_from_net(net: caffe_pb2.NetParameter, path: str = "") -> Weights:
    """The float blobs of every layer of a caffemodel, by layer name (layers without blobs are left out).

    A name that appears twice takes the later layer's blobs, as Caffe's ``CopyTrainedLayersFrom`` copies
    them in file order. ``double_data`` blobs become float32, as Caffe reads them into float nets.

    Raises:
        ModelFormatError: a blob holds integer data (a deploy caffemodel, which cannot be retrained).
    """
    weights: Weights = {}
    for layer in net.layer:
        if not layer.blobs:
            continue
        arrays = []
        for i, blob in enumerate(layer.blobs):
            kind = storage_kind(blob)
            if kind not in ("float", "double"):
                raise ModelFormatError(
                    f"Blob {i} of layer '{layer.name}' in caffemodel '{path or net.name}' is stored as "
                    f"{kind} data (an AMCT deploy model); give the float caffemodel the model was trained to."
                )
            array = blob_to_array(blob, file=path, layer=layer.name, index=i).astype(np.float32, copy=False)
            if has_legacy_shape(blob):
                array = array.reshape(_normalised_shape(layer.type, i, array.shape))
            arrays.append(array)
        if layer.name in weights:
            LOGGER.debug("Caffemodel '%s' holds layer '%s' twice; the later blobs are used.", path,
                         layer.name)
        weights[layer.name] = arrays
    return weights


def weights_to_net(
    weights: Mapping[str, Sequence[np.ndarray]],
    model: caffe_pb2.NetParameter,
    like: caffe_pb2.NetParameter | None = None,
) -> caffe_pb2.NetParameter:
    """A caffemodel holding ``weights`` for the layers of ``model`` (its prototxt), in the model's order.

    Each written layer is a copy of the model's layer (as Caffe's ``Net::ToProto`` writes the layer
    parameters) with the blobs of ``weights``; layers without weights and names the model lacks are left out
    (Caffe's copy by name skips them). A name used twice in the model (one layer per phase) is written once.
    A blob whose layer in ``like`` (the caffemodel the weights came from) stored it with the legacy 4-D
    fields, in the same shape, is written that way again.
    """
    legacy: dict[tuple[str, int], tuple[int, ...]] = {}
    if like is not None:
        for layer in like.layer:
            for i, blob in enumerate(layer.blobs):
                if has_legacy_shape(blob):
                    legacy[(layer.name, i)] = (blob.num, blob.channels, blob.height, blob.width)
    out = caffe_pb2.NetParameter(name=model.name)
    written: set[str] = set()
    for layer in model.layer:
        arrays = weights.get(layer.name)
        if not arrays or layer.name in written:
            continue
        written.add(layer.name)
        lp = out.layer.add()
        lp.CopyFrom(layer)
        del lp.blobs[:]
        for i, array in enumerate(arrays):
            array = np.asarray(array, dtype=np.float32)
            blob = _float_blob(array, lp.blobs.add())
            old = legacy.get((layer.name, i))
            if old is not None and tuple(array.shape) == old:
                blob.ClearField("shape")
                blob.num, blob.channels, blob.height, blob.width = old
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


#: Wire key of ``BlobProto.data`` (field 5, length-delimited: it is ``[packed = true]``).
_DATA_KEY = bytes([5 << 3 | 2])


def _float_blob(array: np.ndarray, blob: caffe_pb2.BlobProto) -> caffe_pb2.BlobProto:
    """Store a float32 array in ``blob`` (``shape`` and ``data``), as ``model.blobs.array_to_blob`` does.

    The packed ``data`` field is handed to protobuf as its wire bytes, which is several times faster than
    extending the repeated field value by value (a ResNet-50 holds 25 million weights).
    """
    blob.Clear()
    blob.shape.dim.extend(int(d) for d in array.shape)
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    if raw:
        blob.MergeFromString(_DATA_KEY + _varint(len(raw)) + raw)
    return blob
