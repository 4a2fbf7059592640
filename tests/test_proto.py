"""Tests of the protobuf schemas in ``src/amct_caffe/proto``.

The field numbers are checked against sources that do not depend on our own descriptor:
real caffemodels / prototxts written by other people (the sibling ``shared/models``), the real reference
Caffe's generated module (``AMCT_REF_CAFFE_PYTHON``, optional), and hand-decoded wire bytes compared with the
numbers written down in docs/amct-reference.md (§3.2 and §5.1).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

try:
    from amct_caffe.proto import amct_pb2, caffe_pb2
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from amct_caffe.proto import amct_pb2, caffe_pb2

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "src" / "amct_caffe" / "proto"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"

CAFFEMODELS = sorted(MODELS.glob("*/*.caffemodel")) if MODELS.is_dir() else []
PROTOTXTS = sorted(MODELS.glob("*/*.prototxt")) if MODELS.is_dir() else []

# Caffemodels written by BVLC Caffe or a fork that adds nothing at the net/layer/blob level. (The
# MTCNN ones carry fork-only fields inside loss_param/softmax_param; those are not checked here.)
BVLC_FORMAT_CAFFEMODELS = {
    "lenet_iter_10000.caffemodel",
    "det1.caffemodel",
    "det2.caffemodel",
    "det3.caffemodel",
    "snapshot_iter_2546000.caffemodel",
    "test.caffemodel",
}

needs_models = pytest.mark.skipif(not MODELS.is_dir(), reason=f"{MODELS} not found")


# ---------------------------------------------------------------------------------------------
# A tiny protobuf wire-format decoder, so that numbers are checked without our descriptor.

WT_VARINT, WT_I64, WT_LEN, WT_I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def wire_fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, payload) for each top-level field of a serialized message."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        payload: int | bytes
        if wire_type == WT_VARINT:
            payload, pos = _varint(buf, pos)
        elif wire_type == WT_I64:
            payload, pos = buf[pos : pos + 8], pos + 8
        elif wire_type == WT_I32:
            payload, pos = buf[pos : pos + 4], pos + 4
        elif wire_type == WT_LEN:
            length, pos = _varint(buf, pos)
            payload, pos = buf[pos : pos + length], pos + length
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        out.append((number, wire_type, payload))
    return out


def field_map(buf: int | bytes) -> dict[int, list[tuple[int, int | bytes]]]:
    assert isinstance(buf, bytes), "expected a length-delimited payload"
    fields: dict[int, list[tuple[int, int | bytes]]] = {}
    for number, wire_type, payload in wire_fields(buf):
        fields.setdefault(number, []).append((wire_type, payload))
    return fields


def as_float(payload: int | bytes) -> float:
    assert isinstance(payload, bytes) and len(payload) == 4
    return struct.unpack("<f", payload)[0]


def repeated_floats(entries: list[tuple[int, int | bytes]]) -> list[float]:
    """Values of a repeated float field, packed or not."""
    values: list[float] = []
    for wire_type, payload in entries:
        assert isinstance(payload, bytes)
        if wire_type == WT_LEN:
            values.extend(struct.unpack(f"<{len(payload) // 4}f", payload))
        else:
            assert wire_type == WT_I32
            values.append(as_float(payload))
    return values


def packed_varints(payload: int | bytes) -> list[int]:
    assert isinstance(payload, bytes)
    values, pos = [], 0
    while pos < len(payload):
        value, pos = _varint(payload, pos)
        values.append(value)
    return values


def unknown_field_numbers(message) -> list[int]:
    """Numbers of the unknown fields directly in `message` (not in its sub-messages)."""
    try:
        from google.protobuf import unknown_fields
    except ImportError:  # protobuf < 4.22
        return [f.field_number for f in message.UnknownFields()]
    return [f.field_number for f in unknown_fields.UnknownFieldSet(message)]


# ---------------------------------------------------------------------------------------------
# (a) real caffemodels


@needs_models
@pytest.mark.parametrize("path", CAFFEMODELS, ids=lambda p: p.name)
def test_real_caffemodel_parses(path: Path) -> None:
    net = caffe_pb2.NetParameter()
    net.ParseFromString(path.read_bytes())
    layers = list(net.layer) + list(net.layers)
    assert layers, "no layers parsed"
    n_blobs = 0
    for layer in layers:
        for blob in layer.blobs:
            n_blobs += 1
            # data (5) and shape (7) decoded consistently: element count = product of the dims.
            legacy = [blob.num, blob.channels, blob.height, blob.width]
            dims = list(blob.shape.dim) or [d for d in legacy if d]
            assert len(blob.data) + len(blob.double_data) == math.prod(dims), (layer.name, dims)
            assert unknown_field_numbers(blob) == [], (layer.name, "BlobProto")
    assert n_blobs > 0
    if path.name in BVLC_FORMAT_CAFFEMODELS:
        assert unknown_field_numbers(net) == []
        for layer in layers:
            assert unknown_field_numbers(layer) == [], (layer.name, layer.type)


@needs_models
def test_lenet_caffemodel_contents() -> None:
    """BVLC's LeNet: known layer types and weight shapes."""
    net = caffe_pb2.NetParameter()
    net.ParseFromString((MODELS / "lenet_mnist" / "lenet_iter_10000.caffemodel").read_bytes())
    by_name = {layer.name: layer for layer in net.layer}
    assert by_name["conv1"].type == "Convolution"
    assert list(by_name["conv1"].blobs[0].shape.dim) == [20, 1, 5, 5]
    assert list(by_name["conv2"].blobs[0].shape.dim) == [50, 20, 5, 5]
    assert list(by_name["ip1"].blobs[0].shape.dim) == [500, 800]
    assert list(by_name["ip2"].blobs[0].shape.dim) == [10, 500]
    assert by_name["conv1"].convolution_param.num_output == 20
    assert by_name["pool1"].pooling_param.pool == caffe_pb2.PoolingParameter.MAX


# ---------------------------------------------------------------------------------------------
# (b) real prototxts


@needs_models
@pytest.mark.parametrize("path", PROTOTXTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_prototxt_parses(path: Path) -> None:
    net = caffe_pb2.NetParameter()
    text_format.Merge(path.read_text(encoding="utf-8"), net)
    assert len(net.layer) + len(net.layers) > 0


@needs_models
def test_v1_prototxt_uses_v1_layers() -> None:
    net = caffe_pb2.NetParameter()
    text_format.Merge((MODELS / "lenet_mnist" / "lenet_v1format.prototxt").read_text(), net)
    assert not net.layer and net.layers
    assert any(lay.type == caffe_pb2.V1LayerParameter.CONVOLUTION for lay in net.layers)


@needs_models
def test_ssd_prototxt_params() -> None:
    net = caffe_pb2.NetParameter()
    text_format.Merge((MODELS / "mobilenet_ssd" / "MobileNetSSD_deploy.prototxt").read_text(), net)
    det = next(lay for lay in net.layer if lay.type == "DetectionOutput").detection_output_param
    assert det.num_classes == 21
    assert det.nms_param.nms_threshold == pytest.approx(0.45)
    assert det.nms_param.top_k == 100
    assert det.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE
    assert det.keep_top_k == 100
    prior = next(lay for lay in net.layer if lay.type == "PriorBox").prior_box_param
    assert list(prior.variance) == pytest.approx([0.1, 0.1, 0.2, 0.2])
    perm = next(lay for lay in net.layer if lay.type == "Permute").permute_param
    assert list(perm.order) == [0, 2, 3, 1]


# ---------------------------------------------------------------------------------------------
# (c) comparison with the real reference Caffe's generated module


def _dump_descriptor(file_descriptor) -> dict:
    """message path -> {"fields": name -> [number, type, label, type name, default], "enums": ...}.

    Runs both here and, via inspect.getsource, in the reference Caffe's python, so it must stay
    self-contained and work with old and new protobuf releases.
    """

    def label(field) -> str:
        if hasattr(field, "is_repeated"):
            if field.is_repeated:
                return "repeated"
            return "required" if field.is_required else "optional"
        return {1: "optional", 2: "required", 3: "repeated"}[field.label]

    def default(field):
        if not field.has_default_value:
            return None
        value = field.default_value
        return value.decode("latin-1") if isinstance(value, bytes) else value

    out = {}

    def walk(message, prefix):
        path = prefix + message.name
        fields = {}
        for field in message.fields:
            ref = field.message_type or field.enum_type
            fields[field.name] = [
                field.number,
                field.type,
                label(field),
                ref.name if ref else None,
                default(field),
            ]
        enums = {e.name: {v.name: v.number for v in e.values} for e in message.enum_types}
        out[path] = {"fields": fields, "enums": enums}
        for nested in message.nested_types:
            if not nested.GetOptions().map_entry:
                walk(nested, path + ".")

    for message in file_descriptor.message_types_by_name.values():
        walk(message, "")
    out["<file>"] = {
        "fields": {},
        "enums": {
            e.name: {v.name: v.number for v in e.values} for e in file_descriptor.enum_types_by_name.values()
        },
    }
    return out


_REF_MAIN = """
import importlib.util, json, pathlib
spec = importlib.util.find_spec("caffe")
path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "proto" / "caffe_pb2.py"
if path.is_file():  # load the generated module alone, without importing pycaffe
    mspec = importlib.util.spec_from_file_location("ref_caffe_pb2", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
else:
    from caffe.proto import caffe_pb2 as module
print(json.dumps(_dump_descriptor(module.DESCRIPTOR)))
"""

# Documented differences between stock BVLC (which we follow) and the reference fork:
# same number, different field.
NUMBER_CLASH_ALLOWED = {
    ("PoolingParameter", 13),  # stock: enum round_mode; fork: bool ceil_mode
    ("SolverParameter", 41),  # stock: layer_wise_reduce; fork: eval_type
    ("SolverParameter", 42),  # stock: weights; fork: ap_version
    ("DetectionOutputParameter", 12),  # Caffe-SSD: save_file; fork: repeated float thresholds
    ("UpsampleParameter", 2),  # ATC: stride; fork: dims_num (docs/fork-layers.md)
    # ATC's region-layer numbers (docs/decisions.md row 17); the fork keeps the SSD fork's fields there
    ("LayerParameter", 201),  # ATC: proposal_param; fork (SSD): multibox_loss_param
    ("LayerParameter", 207),  # ATC: psroi_pooling_param; fork (SSD): video_data_param
    ("ProposalParameter", 8),  # ATC: iou_threshold; fork: nms_thresh (same meaning and default)
}
# same field, different number
NUMBER_DIFF_ALLOWED = {
    ("DetectionOutputParameter", "save_file"),  # Caffe-SSD 12; fork 13
    # fork-layer parameters: ATC's or PSPNet's number here, the fork's own there (docs/fork-layers.md)
    ("LayerParameter", "bn_param"),  # PSPNet 152; fork 1111
    ("LayerParameter", "upsample_param"),  # ATC 160; fork 500
    ("PoolingParameter", "ceil_mode"),  # ours 300000 (BVLC's round_mode keeps 13); fork 13
    ("LayerParameter", "proposal_param"),  # ATC 201; fork 1000
    ("LayerParameter", "psroi_pooling_param"),  # ATC 207; fork 149
}
# same field, different type or label: the region messages follow ATC's caffe.proto (row 17), whose
# `required` PSROIPooling fields are optional here and whose Proposal sizes are float/int32 (fork: uint32)
TYPE_DIFF_ALLOWED = {
    ("UpsampleParameter", "scale"),  # ATC: float (also a value factor there); darknet fork: int32
    ("PSROIPoolingParameter", "spatial_scale"),
    ("PSROIPoolingParameter", "output_dim"),
    ("PSROIPoolingParameter", "group_size"),
    ("ProposalParameter", "feat_stride"),
    ("ProposalParameter", "base_size"),
    ("ProposalParameter", "min_size"),
    ("ProposalParameter", "pre_nms_topn"),
    ("ProposalParameter", "post_nms_topn"),
}
# same field, different default
DEFAULT_DIFF_ALLOWED = {
    ("ConvolutionParameter", "stride_h"),  # stock: none; fork: 1
    ("ConvolutionParameter", "stride_w"),
    ("PriorBoxParameter", "clip"),  # Caffe-SSD: false; fork: true
    ("ProposalParameter", "pre_nms_topn"),  # ATC: 3000; fork: 6000
    ("ProposalParameter", "post_nms_topn"),  # ATC: 304; fork: 300
}


@pytest.mark.reference
def test_matches_reference_caffe_descriptor(reference_caffe: str) -> None:
    ref_python = reference_caffe
    source = inspect.getsource(_dump_descriptor) + _REF_MAIN
    env = dict(os.environ, GLOG_minloglevel="2")
    proc = subprocess.run(
        [ref_python, "-c", source], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout)
    ours = json.loads(json.dumps(_dump_descriptor(caffe_pb2.DESCRIPTOR)))

    common = sorted(set(ref) & set(ours))
    assert len(common) >= 60, f"only {len(common)} messages in common: the comparison would be vacuous"
    problems = []
    for msg in common:
        ref_fields, our_fields = ref[msg]["fields"], ours[msg]["fields"]
        for name in sorted(set(ref_fields) & set(our_fields)):
            r_num, r_type, r_label, r_ref, r_def = ref_fields[name]
            o_num, o_type, o_label, o_ref, o_def = our_fields[name]
            if r_num != o_num and (msg, name) not in NUMBER_DIFF_ALLOWED:
                problems.append(f"{msg}.{name}: number {o_num}, reference {r_num}")
            if (r_type, r_label, r_ref) != (o_type, o_label, o_ref) and (msg, name) not in TYPE_DIFF_ALLOWED:
                problems.append(
                    f"{msg}.{name}: {o_label} type {o_type}/{o_ref}, ref {r_label} {r_type}/{r_ref}"
                )
            if r_def != o_def and (msg, name) not in DEFAULT_DIFF_ALLOWED:
                problems.append(f"{msg}.{name}: default {o_def!r}, reference {r_def!r}")
        ref_by_num = {v[0]: k for k, v in ref_fields.items()}
        for name, spec in our_fields.items():
            other = ref_by_num.get(spec[0])
            if other is not None and other != name and (msg, spec[0]) not in NUMBER_CLASH_ALLOWED:
                problems.append(f"{msg}: number {spec[0]} is {name} here, {other} in the reference")
        for enum in set(ref[msg]["enums"]) & set(ours[msg]["enums"]):
            r_vals, o_vals = ref[msg]["enums"][enum], ours[msg]["enums"][enum]
            for value in set(r_vals) & set(o_vals):
                if r_vals[value] != o_vals[value]:
                    problems.append(f"{msg}.{enum}.{value}: {o_vals[value]}, reference {r_vals[value]}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# (d) AMCT extensions: numbers checked on the wire against AMCT reference §3.2 / §5.1


def test_blobproto_amct_fields_on_the_wire() -> None:
    # int8_data = 10, bytes: tag (10 << 3) | 2 = 0x52
    assert caffe_pb2.BlobProto(int8_data=b"\x01\xff").SerializeToString() == b"\x52\x02\x01\xff"
    # int32_data = 11, packed: tag 0x5a; -2 is a 10-byte two's-complement varint
    assert caffe_pb2.BlobProto(int32_data=[1, -2]).SerializeToString() == (
        b"\x5a\x0b\x01\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    )
    # uint64_data = 12, packed: tag 0x62
    big = (1 << 40) | 0x3F80_0000  # needs a 6-byte varint
    encoded = caffe_pb2.BlobProto(uint64_data=[big, 7]).SerializeToString()
    assert encoded[0] == 0x62
    ((number, wire_type, payload),) = wire_fields(encoded)
    assert (number, wire_type) == (12, WT_LEN)
    assert packed_varints(payload) == [big, 7]
    # The standard fields keep BVLC's numbers: shape 7, data 5 (packed float).
    blob = caffe_pb2.BlobProto(data=[1.5])
    blob.shape.dim.append(1)
    fields = field_map(blob.SerializeToString())
    assert set(fields) == {5, 7}
    assert fields[5] == [(WT_LEN, struct.pack("<f", 1.5))]


def test_blobproto_amct_roundtrip() -> None:
    blob = caffe_pb2.BlobProto(int8_data=bytes([0, 127, 128, 255]), int32_data=[-(2**31), 2**31 - 1])
    blob.uint64_data.extend([0, 2**64 - 1])
    blob.shape.dim.extend([2, 2])
    again = caffe_pb2.BlobProto.FromString(blob.SerializeToString())
    assert again == blob
    assert again.int8_data == bytes([0, 127, 128, 255])
    assert list(again.int32_data) == [-(2**31), 2**31 - 1]
    assert list(again.uint64_data) == [0, 2**64 - 1]


def _amct_layer() -> caffe_pb2.LayerParameter:
    """A LayerParameter with every AMCT parameter message set (all their fields, bar LSTM)."""
    p = caffe_pb2
    layer = p.LayerParameter()
    layer.quant_param.CopyFrom(
        p.QuantParameter(with_offset=True, scale=0.5, offset=b"\xf2", object_layer="conv1")
    )
    layer.dequant_param.CopyFrom(
        p.DeQuantParameter(
            channel_wise=True,
            need_calibration=True,
            batch_num=2,
            object_layer="c1",
            layer_type="Conv",
            deqscale=[0.25, 0.5],
            shift_bit=[0.0],
            offset=[0.0],
        )
    )
    layer.ifmr_param.CopyFrom(
        p.IFMRParameter(
            batch_num=4,
            with_offset=True,
            search_range_start=0.7,
            search_range_end=1.3,
            search_step=0.01,
            max_percentile=0.999,
            min_percentile=0.998,
            object_layer=["a", "b"],
            record_file_path="rec.txt",
        )
    )
    layer.lstm_quant_param.w_h_quant_param.scale = 2.0
    layer.search_n_param.CopyFrom(
        p.SearchNParameter(
            batch_num=1, layer_name=["conv1"], layer_type=["Convolution"], record_file_path="r"
        )
    )
    layer.retrain_data_quant_param.CopyFrom(
        p.RetrainDataQuantParameter(
            clip_max=6.0,
            clip_min=-6.0,
            ifmr_init=True,
            with_offset=False,
            fixed_min=True,
            object_layer="conv1-conv2",
            record_file_path="rec.txt",
        )
    )
    layer.retrain_weight_quant_param.CopyFrom(
        p.RetrainWeightQuantParameter(
            cout=64, cin=3, h=7, w=7, channel_wise=False, layer_type="Convolution", with_offset=True
        )
    )
    return layer


# AMCT reference §3.2: parameter field number -> {inner field number: wire type}.
AMCT_LAYER_SPEC = {
    208: {1: WT_VARINT, 2: WT_I32, 3: WT_LEN, 4: WT_LEN},  # QuantParameter
    200000: {
        1: WT_VARINT,
        10: WT_VARINT,
        11: WT_VARINT,
        12: WT_LEN,
        13: WT_LEN,
        20: None,
        21: None,
        22: None,
    },
    200001: {
        1: WT_VARINT,
        2: WT_VARINT,
        3: WT_I32,
        4: WT_I32,
        5: WT_I32,
        6: WT_I32,
        7: WT_I32,
        8: WT_LEN,
        9: WT_LEN,
    },
    200002: {3: WT_LEN},  # LSTMQuantParameter.w_h_quant_param (our definition)
    200003: {1: WT_VARINT, 2: WT_LEN, 3: WT_LEN, 4: WT_LEN},  # SearchNParameter
    200004: {1: WT_I32, 2: WT_I32, 3: WT_VARINT, 4: WT_VARINT, 5: WT_VARINT, 6: WT_LEN, 7: WT_LEN},
    200005: {1: WT_VARINT, 2: WT_VARINT, 3: WT_VARINT, 4: WT_VARINT, 5: WT_VARINT, 6: WT_LEN, 7: WT_VARINT},
}


def test_amct_layer_params_on_the_wire() -> None:
    encoded = _amct_layer().SerializeToString()
    # quant_param = 208: tag (208 << 3) | 2 = 1666 -> varint 0x82 0x0d; it sorts first.
    assert encoded[:2] == b"\x82\x0d"
    top = field_map(encoded)
    assert set(top) == set(AMCT_LAYER_SPEC)
    for number, inner_spec in AMCT_LAYER_SPEC.items():
        ((wire_type, payload),) = top[number]
        assert wire_type == WT_LEN
        assert isinstance(payload, bytes)
        inner = field_map(payload)
        assert set(inner) == set(inner_spec), number
        for inner_number, expected in inner_spec.items():
            if expected is not None:
                assert {wt for wt, _ in inner[inner_number]} == {expected}, (number, inner_number)

    quant = field_map(top[208][0][1])
    assert as_float(quant[2][0][1]) == 0.5 and quant[3][0][1] == b"\xf2" and quant[4][0][1] == b"conv1"
    deq = field_map(top[200000][0][1])
    assert repeated_floats(deq[20]) == [0.25, 0.5]
    assert deq[12][0][1] == b"c1" and deq[13][0][1] == b"Conv"
    ifmr = field_map(top[200001][0][1])
    assert [as_float(ifmr[n][0][1]) for n in (3, 4)] == pytest.approx([0.7, 1.3])
    assert [p for _, p in ifmr[8]] == [b"a", b"b"]
    act = field_map(top[200004][0][1])
    assert (as_float(act[1][0][1]), as_float(act[2][0][1])) == (6.0, -6.0)
    assert act[6][0][1] == b"conv1-conv2"
    wts = field_map(top[200005][0][1])
    assert [wts[n][0][1] for n in (1, 2, 3, 4, 5, 7)] == [64, 3, 7, 7, 0, 1]
    assert wts[6][0][1] == b"Convolution"


def test_amct_layer_params_roundtrip_and_defaults() -> None:
    layer = _amct_layer()
    again = caffe_pb2.LayerParameter.FromString(layer.SerializeToString())
    assert again == layer
    assert text_format.Parse(text_format.MessageToString(layer), caffe_pb2.LayerParameter()) == layer
    # Defaults of AMCT reference §3.2.
    data = caffe_pb2.RetrainDataQuantParameter()
    assert (data.clip_max, data.clip_min, data.ifmr_init, data.with_offset, data.fixed_min) == (
        3.0,
        0.0,
        False,
        True,
        False,
    )
    weight = caffe_pb2.RetrainWeightQuantParameter()
    assert (weight.cout, weight.cin, weight.h, weight.w) == (3, 3, 3, 3)
    assert weight.channel_wise is True and weight.with_offset is False
    # Stock BVLC pooling rounding enum.
    assert caffe_pb2.PoolingParameter().round_mode == caffe_pb2.PoolingParameter.CEIL
    assert caffe_pb2.PoolingParameter.FLOOR == 1


def test_retrain_shape_record_on_the_wire_and_text_compatible() -> None:
    shape = caffe_pb2.RetrainShapeRecord()
    entry = shape.record.add(key="conv1")
    entry.value.channels, entry.value.height, entry.value.width = 3, 224, 225
    ((number, wire_type, payload),) = wire_fields(shape.SerializeToString())
    assert (number, wire_type) == (1, WT_LEN)
    inner = field_map(payload)
    assert inner[1] == [(WT_LEN, b"conv1")]
    dims = field_map(inner[2][0][1])
    assert {n: v[0][1] for n, v in dims.items()} == {1: 3, 2: 224, 3: 225}
    # Text-compatible with the final record: the same text parses as amct.ScaleOffsetRecord.
    record = text_format.Parse(text_format.MessageToString(shape), amct_pb2.ScaleOffsetRecord())
    assert record.record[0].key == "conv1"
    assert (record.record[0].value.channels, record.record[0].value.height) == (3, 224)


# ---------------------------------------------------------------------------------------------
# amct.proto: record file and configs


def test_record_schema_on_the_wire() -> None:
    record = amct_pb2.ScaleOffsetRecord()
    value = record.record.add(key="conv1").value
    value.scale_d, value.offset_d = 0.5, -14
    value.scale_w.extend([0.25, 0.125])
    value.offset_w.extend([0, 0])
    value.shift_bit.append(3)
    value.channels, value.height, value.width, value.skip_fusion = 3, 224, 224, True
    ((number, _, payload),) = wire_fields(record.SerializeToString())
    assert number == 1
    entry = field_map(payload)
    assert entry[1] == [(WT_LEN, b"conv1")]
    fields = field_map(entry[2][0][1])
    assert set(fields) == set(range(1, 10))  # SingleLayerRecord fields 1..9 (AMCT reference §5.1)
    assert as_float(fields[1][0][1]) == 0.5
    assert fields[2][0][1] == 2**64 - 14  # int32 -14 as a 64-bit two's-complement varint
    assert repeated_floats(fields[3]) == [0.25, 0.125]
    assert [fields[n][0][1] for n in (6, 7, 8, 9)] == [3, 224, 224, 1]
    assert amct_pb2.SingleLayerRecord().skip_fusion is False


# the record example of AMCT reference §5.2
from tests.references.records import RECORD_EXAMPLE as RECORD_TEXT  # noqa: E402


def test_record_text_example_parses() -> None:
    record = text_format.Parse(RECORD_TEXT, amct_pb2.ScaleOffsetRecord())
    assert [e.key for e in record.record] == ["conv1", "res2a_branch1"]
    first = record.record[0].value
    assert first.offset_d == -14 and list(first.scale_w) == pytest.approx([0.00448, 0.00043])
    assert record.record[1].value.offset_d == -128


QAT_CFG = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: -6.0 } } }
retrain_weight_quant_config { arq_retrain { channel_wise: true } }
skip_layers: "conv1"
override_layer_configs {
  layer_name: "fc1000"
  retrain_data_quant_config { ulq_quantize { fixed_min: true } }
  retrain_weight_quant_config { arq_retrain { channel_wise: false } }
}
override_layer_types {
  layer_type: "InnerProduct"
  retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
  retrain_weight_quant_config { arq_retrain { } }
}
quant_skip_layers: "fc2"
"""


def test_qat_cfg_example_parses() -> None:
    cfg = text_format.Parse(QAT_CFG, amct_pb2.AMCTRetrainConfig())
    assert cfg.batch_num == 2
    clip = cfg.retrain_data_quant_config.ulq_quantize.clip_max_min
    assert (clip.clip_max, clip.clip_min) == (6.0, -6.0)
    assert cfg.retrain_weight_quant_config.arq_retrain.channel_wise is True
    assert list(cfg.skip_layers) == ["conv1"] and list(cfg.quant_skip_layers) == ["fc2"]
    override = cfg.override_layer_configs[0]
    assert override.layer_name == "fc1000"
    assert override.retrain_data_quant_config.ulq_quantize.fixed_min is True
    assert override.retrain_weight_quant_config.arq_retrain.channel_wise is False
    assert cfg.override_layer_types[0].layer_type == "InnerProduct"


def test_qat_cfg_required_fields_reported() -> None:
    # Text parsing accepts a missing required field; IsInitialized() is what reports it.
    cfg = text_format.Parse(
        "retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 1.0 } } }",
        amct_pb2.AMCTRetrainConfig(),
    )
    assert not cfg.IsInitialized()
    assert cfg.FindInitializationErrors() == ["retrain_data_quant_config.ulq_quantize.clip_max_min.clip_min"]


PTQ_CFG = """
batch_num: 2
activation_offset: true
skip_layers: "conv1"
do_fusion: true
skip_fusion_layers: "bn_conv1"
common_config {
  arq_quantize { channel_wise: true }
  ifmr_quantize {
    search_range_start: 0.7
    search_range_end: 1.3
    search_step: 0.01
    max_percentile: 0.999999
    min_percentile: 0.999999
  }
}
override_layer_types {
  layer_type: "Pooling"
  calibration_config { arq_quantize { channel_wise: false } ifmr_quantize { search_step: 0.02 } }
}
override_layer_configs {
  layer_name: "fc1000"
  calibration_config { nuq_quantize { num_steps: 16 } }
}
"""


def test_ptq_cfg_example_parses() -> None:
    cfg = text_format.Parse(PTQ_CFG, amct_pb2.AMCTConfig())
    assert (cfg.batch_num, cfg.activation_offset, cfg.do_fusion) == (2, True, True)
    assert list(cfg.skip_fusion_layers) == ["bn_conv1"]
    ifmr = cfg.common_config.ifmr_quantize
    assert (ifmr.search_range_start, ifmr.search_range_end) == pytest.approx((0.7, 1.3))
    assert cfg.override_layer_types[0].calibration_config.arq_quantize.channel_wise is False
    assert cfg.override_layer_configs[0].calibration_config.WhichOneof("weight_config") == "nuq_quantize"
    defaults = amct_pb2.AMCTConfig()
    assert (defaults.batch_num, defaults.activation_offset, defaults.do_fusion) == (1, True, True)
    assert amct_pb2.IFMRQuantize().max_percentile == pytest.approx(0.999999)


# ---------------------------------------------------------------------------------------------
# Generated modules


def test_descriptor_files_and_packages() -> None:
    assert (caffe_pb2.DESCRIPTOR.name, caffe_pb2.DESCRIPTOR.package) == ("caffe.proto", "caffe")
    assert (amct_pb2.DESCRIPTOR.name, amct_pb2.DESCRIPTOR.package) == ("amct.proto", "amct")
    assert list(amct_pb2.DESCRIPTOR.dependencies) == []
    assert caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["quant_param"].number == 208


def _embedded_descriptor(module_text: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated *_pb2.py module registers (its AddSerializedFile argument)."""
    for node in ast.walk(ast.parse(module_text)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile":
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError("no AddSerializedFile call in the generated module")


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    """caffe_pb2.py / amct_pb2.py match the .proto files (rerun scripts/gen_proto.py if not)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp_path}",
            "caffe.proto",
            "amct.proto",
        ],
        cwd=PROTO_DIR,
        check=True,
    )
    for module in (caffe_pb2, amct_pb2):
        fresh = _embedded_descriptor((tmp_path / Path(module.__file__).name).read_text(encoding="utf-8"))
        embedded = _embedded_descriptor(Path(module.__file__).read_text(encoding="utf-8"))
        assert embedded == fresh, f"{fresh.name} changed: run scripts/gen_proto.py"


def _stub_outline(stub_text: str) -> dict[str, list[str]]:
    """What a generated ``*_pb2.pyi`` declares: ``{class path: annotated names and methods}``."""
    outline: dict[str, list[str]] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                path = f"{prefix}{node.name}"
                fields = [n.target.id for n in node.body
                          if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
                methods = [n.name for n in node.body if isinstance(n, ast.FunctionDef)]
                outline[path] = sorted(fields + methods)
                visit(node.body, f"{path}.")

    visit(ast.parse(stub_text).body, "")
    return outline


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_type_stubs_are_up_to_date(tmp_path: Path) -> None:
    """caffe_pb2.pyi / amct_pb2.pyi declare what protoc generates now (rerun scripts/gen_proto.py if not)."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--pyi_out={tmp_path}", "caffe.proto",
         "amct.proto"],
        cwd=PROTO_DIR,
        check=True,
    )
    for stub in ("caffe_pb2.pyi", "amct_pb2.pyi"):
        fresh = _stub_outline((tmp_path / stub).read_text(encoding="utf-8"))
        committed = _stub_outline((PROTO_DIR / stub).read_text(encoding="utf-8"))
        assert committed == fresh, f"{stub} is out of date: run scripts/gen_proto.py"
        assert fresh, f"{stub}: protoc declared no messages"


def test_loads_beside_a_real_pycaffe(reference_caffe):
    """Our schema lives in a private descriptor pool: a real pycaffe can be imported beside it."""
    src = Path(__file__).resolve().parents[1] / "src"
    code = (
        "import sys; import caffe; from caffe.proto import caffe_pb2 as ref\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        "from amct_caffe.proto import caffe_pb2 as ours\n"
        "n = ours.NetParameter(name='x'); n.layer.add(name='a', type='ReLU')\n"
        "r = ref.NetParameter.FromString(n.SerializeToString())\n"
        "assert r.layer[0].type == 'ReLU', r\n"
        "print('ok')\n"
    )
    proc = subprocess.run([reference_caffe, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GLOG_minloglevel": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
