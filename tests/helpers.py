"""Shared test helpers that are not references: building one engine layer, reading the files the code
writes (prototxts, records, caffemodels, DeQuant words), and the tolerances of the cross-checks against the
real Caffe."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers import layer_class
from amct_caffe.engine.layers.base import TEST, Layer
from amct_caffe.model.blobs import blob_to_array
from amct_caffe.model.io import load_caffemodel, load_prototxt, save_prototxt
from amct_caffe.proto import amct_pb2, caffe_pb2

CPU = torch.device("cpu")


def make_layer(text: str, *bottoms: np.ndarray, phase: int = TEST, n_tops: int = 1) -> Layer:
    """A set-up layer from a LayerParameter's text; unnamed bottoms become b0.., tops t0.. (``n_tops``)."""
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    lp.name = lp.name or "L"
    if not lp.bottom:
        lp.bottom.extend(f"b{i}" for i in range(len(bottoms)))
    if not lp.top:
        lp.top.extend(f"t{i}" for i in range(n_tops))
    layer = layer_class(lp.type)(lp, phase, CPU)
    layer.setup([torch.from_numpy(b) for b in bottoms])
    return layer


def parse_net(text: str) -> caffe_pb2.NetParameter:
    """A NetParameter from prototxt text."""
    return text_format.Merge(text, caffe_pb2.NetParameter())


def read_net(path: str | Path) -> caffe_pb2.NetParameter:
    """A NetParameter from a prototxt file."""
    return parse_net(Path(path).read_text())


def parse_record(text: str) -> dict[str, amct_pb2.SingleLayerRecord]:
    """A scale/offset record's text as ``{layer: record}``, parsed strictly (no field may repeat)."""
    msg = text_format.Parse(text, amct_pb2.ScaleOffsetRecord())
    return {entry.key: entry.value for entry in msg.record}


def read_record(path: str | Path) -> dict[str, amct_pb2.SingleLayerRecord]:
    """A scale/offset record file as ``{layer: record}``, parsed strictly (no field may repeat)."""
    return parse_record(Path(path).read_text())


def caffemodel_blobs(path: str | Path, keep_empty: bool = False) -> dict[str, list[np.ndarray]]:
    """``{layer: [blob arrays]}`` of a caffemodel, in file order; layers without blobs only with
    ``keep_empty``."""
    return {layer.name: [blob_to_array(b) for b in layer.blobs] for layer in load_caffemodel(str(path)).layer
            if layer.blobs or keep_empty}


def caffemodel_raw_blobs(path: str | Path) -> dict[str, list[caffe_pb2.BlobProto]]:
    """``{layer: [BlobProto]}`` of a caffemodel as stored (the deploy model's ``int8_data``, ``int32_data``
    and ``uint64_data`` included), layers with blobs only."""
    return {layer.name: list(layer.blobs) for layer in load_caffemodel(str(path)).layer if layer.blobs}


def low_words_as_float32(words: Iterable[int]) -> np.ndarray:
    """The float32 values whose bit patterns are the low 32 bits of ``uint64`` words (a DeQuant blob)."""
    return np.array([struct.unpack("<f", struct.pack("<I", w & 0xFFFFFFFF))[0] for w in words], np.float32)


def assert_close(ours: np.ndarray, ref: np.ndarray, name: str, rtol: float = 1e-4,
                 atol: float = 1e-5) -> None:
    """The cross-check tolerance against the real Caffe: 1e-4 relative with a 1e-5 absolute floor."""
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol, err_msg=name)


def assert_close_to_scale(ours: np.ndarray, ref: np.ndarray, name: str, rtol: float = 1e-4,
                          atol: float = 1e-5) -> None:
    """The same tolerance with the absolute floor scaled by the blob's magnitude: |d| <= rtol*|ref| +
    atol*max(1, max|ref|).

    Deep nets (ResNet-50, MobileNet-v2 with random weights) carry activations of magnitude 10-100, where
    float32 sums in a different order (GEMM vs. mkldnn) differ by ~1e-5 absolute; elements that cancel to
    near zero then exceed a fixed 1e-5 floor although the blob agrees to 1e-7 of its scale.
    """
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol * scale, err_msg=name)


def deploy_view(saved: str, deploy: caffe_pb2.NetParameter, out: str) -> None:
    """The saved model as AMCT's sample prepares it for ATC: the synthetic data layers back to the deploy
    net's Input layers, the training targets and losses dropped."""
    net = load_prototxt(saved)
    inputs = {layer.name: layer for layer in deploy.layer if layer.type == "Input"}
    kept = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        if layer.name in inputs:
            kept.layer.add().CopyFrom(inputs[layer.name])
        elif not (layer.name.endswith("_target") or layer.name.endswith("_loss")):
            kept.layer.add().CopyFrom(layer)
    save_prototxt(kept, out)


# -- a tiny float model, written without the code under test (bad-input corpus, loader fuzzing) -------------
#: Input 1x1x8x8 -> conv1 (4 filters 3x3, bias) -> ReLU in place -> ip1 (3 outputs, bias).
TINY_NET = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1" inner_product_param { num_output: 3 } }
"""

#: The blob shapes of TINY_NET's learnable layers, in Caffe's layouts.
TINY_BLOB_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "conv1": ((4, 1, 3, 3), (4,)),
    "ip1": ((3, 144), (3,)),
}


def blob_proto(shape: Iterable[int], values: Iterable[float] | None = None) -> caffe_pb2.BlobProto:
    """A BlobProto with ``shape`` and float ``values`` (default: 0.01 * index, as many as the shape holds)."""
    dims = [int(d) for d in shape]
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(dims)
    if values is None:
        values = (0.01 * i for i in range(int(np.prod(dims)) if dims else 1))
    blob.data.extend(float(v) for v in values)
    return blob


def tiny_caffemodel(blobs: dict[str, list[caffe_pb2.BlobProto]] | None = None,
                    types: dict[str, str] | None = None) -> bytes:
    """A serialized NetParameter holding ``blobs`` per layer (default: TINY_NET's blobs, values by
    :func:`blob_proto`); ``types`` gives each layer's type (default Convolution/InnerProduct by name)."""
    if blobs is None:
        blobs = {name: [blob_proto(s) for s in shapes] for name, shapes in TINY_BLOB_SHAPES.items()}
    types = types or {}
    net = caffe_pb2.NetParameter(name="tiny")
    for name, layer_blobs in blobs.items():
        default_type = "Convolution" if name.startswith("conv") else "InnerProduct"
        layer = net.layer.add(name=name, type=types.get(name, default_type))
        layer.blobs.extend(layer_blobs)
    return net.SerializeToString()
