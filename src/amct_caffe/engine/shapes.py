"""Blob shapes of a net by running the engine's shape pass, as the record file needs them.

AMCT has no whole-net shape inference and records each quantized layer's input (channels, height, width);
the engine's shape pass gives every blob's shape, so the workflows ask it here (the record's view of a
shape, ``legacy_chw``, lives with the record in ``quant.record``).
"""

from __future__ import annotations

from amct_caffe.engine.net import Net
from amct_caffe.errors import AmctError, BlobSizeError, ConfigError
from amct_caffe.proto import caffe_pb2

__all__ = ["batch_one", "shape_net"]

#: Data-layer parameters whose ``batch_size`` sets the batch of their tops.
_BATCH_SIZE_PARAMS = ("data_param", "image_data_param", "memory_data_param", "hdf5_data_param",
                      "window_data_param")


def batch_one(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """A copy of ``net`` whose input and data layers produce batches of 1 (shapes past axis 0 unchanged)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if shape.dim:
                    shape.dim[0] = 1
        elif layer.type == "DummyData":
            p = layer.dummy_data_param
            for shape in p.shape:
                if shape.dim:
                    shape.dim[0] = 1
            if len(p.num):
                p.num[:] = [1] * len(p.num)
        for field in _BATCH_SIZE_PARAMS:
            if layer.HasField(field) and getattr(layer, field).HasField("batch_size"):
                getattr(layer, field).batch_size = 1
    return out


def shape_net(
    net: caffe_pb2.NetParameter, phase: int = caffe_pb2.TEST
) -> tuple[Net | None, Exception | None]:
    """The net built in the engine for its shapes, with batch 1 when the net allows it, else its own batch.

    Returns ``(net, None)``, or ``(None, the last error)`` when the net cannot be built (e.g. data layers
    whose sources are missing) — callers fall back to other sources of shapes and say so.

    Raises:
        BlobSizeError: a blob of the net exceeds the element limits (no fallback would help).
        ConfigError: a limit's environment variable is not a positive whole number.
    """
    problem: Exception | None = None
    for candidate in (batch_one(net), net):
        try:
            return Net(candidate, phase), None
        except (BlobSizeError, ConfigError):
            raise  # the net asks for more memory than allowed (or a limit is mis-set): no fallback helps
        except (AmctError, RuntimeError, OSError, ValueError) as exc:
            problem = exc
    return None, problem
