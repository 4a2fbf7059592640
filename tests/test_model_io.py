"""Prototxt/caffemodel I/O: parsing errors, size limit, atomic writes, phase filtering."""

from __future__ import annotations

import os

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import ModelFormatError
from amct_caffe.model.blobs import array_to_blob, blob_shape, blob_to_array, shape_matches
from amct_caffe.model.io import AtomicFiles, atomic_write, load_caffemodel, load_prototxt, save_caffemodel
from amct_caffe.model.phase import filter_net
from amct_caffe.proto import caffe_pb2

NET_WITH_UNKNOWN_FIELD = """
name: "bad"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
layer {
  name: "conv_typo"
  type: "Convolution"
  bottom: "data"
  top: "c"
  convolution_param { num_outputs: 4 }
}
"""


def test_unknown_field_names_file_and_layer(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text(NET_WITH_UNKNOWN_FIELD)
    with pytest.raises(ModelFormatError) as info:
        load_prototxt(path)
    message = str(info.value)
    assert "bad.prototxt" in message
    assert "conv_typo" in message
    assert "num_outputs" in message


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_prototxt(tmp_path / "nope.prototxt")
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_caffemodel(tmp_path / "nope.caffemodel")


def test_garbage_caffemodel_is_rejected(tmp_path):
    path = tmp_path / "x.caffemodel"
    path.write_bytes(b"\xff\xfe\x00garbage\x01\x02")
    with pytest.raises(ModelFormatError, match="x.caffemodel"):
        load_caffemodel(path)


def test_caffemodel_size_limit(tmp_path, monkeypatch):
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="ip", type="InnerProduct")
    array_to_blob(np.zeros((600, 1000), np.float32), layer.blobs.add())
    path = tmp_path / "big.caffemodel"
    save_caffemodel(net, path)
    monkeypatch.setenv("AMCT_CAFFEMODEL_LIMIT_MB", "1")
    with pytest.raises(ModelFormatError, match="AMCT_CAFFEMODEL_LIMIT_MB"):
        load_caffemodel(path)


def test_caffemodel_round_trip_keeps_values(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    net = caffe_pb2.NetParameter(name="n")
    layer = net.layer.add(name="conv", type="Convolution")
    array_to_blob(w, layer.blobs.add())
    path = tmp_path / "w.caffemodel"
    save_caffemodel(net, path)
    back = load_caffemodel(path)
    assert back == net
    np.testing.assert_array_equal(blob_to_array(back.layer[0].blobs[0]), w)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    with pytest.raises(RuntimeError), AtomicFiles() as files:
        files.write(target, b"new")
        files.write(tmp_path / "second.bin", b"2")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert not (tmp_path / "second.bin").exists()
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]  # no temporary files left behind


def test_atomic_write_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "f.txt"
    atomic_write(target, b"hello")
    assert target.read_bytes() == b"hello"


def test_atomic_write_gives_ordinary_file_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.bin"
        atomic_write(fresh, b"x")
        assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write(kept, b"new")
        assert kept.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    finally:
        os.umask(umask)


def test_legacy_blob_shape_matching():
    blob = caffe_pb2.BlobProto(num=1, channels=1, height=500, width=800)
    assert blob_shape(blob) == (1, 1, 500, 800)
    assert shape_matches(blob, (500, 800))
    assert not shape_matches(blob, (800, 500))
    modern = caffe_pb2.BlobProto()
    modern.shape.dim.extend([500, 800])
    assert shape_matches(modern, (500, 800))
    assert not shape_matches(modern, (1, 1, 500, 800))


def test_integer_blob_fields_round_trip():
    q = np.array([[-128, 127], [0, -1]], dtype=np.int8)
    blob = array_to_blob(q, kind="int8")
    assert blob.int8_data == bytes([0x80, 0x7F, 0x00, 0xFF])
    np.testing.assert_array_equal(blob_to_array(blob), q)
    b32 = array_to_blob(np.array([-(2**31), 2**31 - 1], dtype=np.int32), kind="int32")
    assert list(b32.int32_data) == [-(2**31), 2**31 - 1]
    b64 = array_to_blob(np.array([2**63 + 5], dtype=np.uint64), kind="uint64")
    assert list(b64.uint64_data) == [2**63 + 5]


PHASED = """
name: "phased"
layer { name: "a" type: "Input" top: "a" include { phase: TRAIN } }
layer { name: "b" type: "Input" top: "a" include { phase: TEST } }
layer { name: "c" type: "ReLU" bottom: "a" top: "a" exclude { phase: TEST } }
layer { name: "d" type: "ReLU" bottom: "a" top: "a" include { phase: TEST stage: "deploy" } }
layer { name: "e" type: "ReLU" bottom: "a" top: "a" include { min_level: 2 } }
layer { name: "f" type: "ReLU" bottom: "a" top: "a" include { not_stage: "deploy" } }
layer { name: "g" type: "ReLU" bottom: "a" top: "a" }
"""


@pytest.mark.parametrize(
    ("phase", "level", "stages", "expected"),
    [
        (caffe_pb2.TRAIN, 0, [], ["a", "c", "f", "g"]),
        (caffe_pb2.TEST, 0, [], ["b", "f", "g"]),
        (caffe_pb2.TEST, 0, ["deploy"], ["b", "d", "g"]),
        (caffe_pb2.TEST, 3, [], ["b", "e", "f", "g"]),
    ],
)
def test_phase_rules(phase, level, stages, expected):
    net = text_format.Merge(PHASED, caffe_pb2.NetParameter())
    kept = filter_net(net, phase, level, stages)
    assert [layer.name for layer in kept.layer] == expected
    assert kept.state.phase == phase


def test_include_and_exclude_together_is_an_error():
    net = text_format.Merge(
        'layer { name: "x" type: "ReLU" include { phase: TRAIN } exclude { phase: TEST } }',
        caffe_pb2.NetParameter(),
    )
    with pytest.raises(ModelFormatError, match="'x'"):
        filter_net(net, caffe_pb2.TEST)
