"""Tests of the scale/offset record file (docs/amct-reference.md §5): parsing, plain view, writing,
shape updates, validation.

Expected values are written by hand from the example of AMCT reference §5.2 (float fields are float32 in the
file, so the expected values are the float32 roundings of the decimal text).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe.errors import RecordError
from amct_caffe.proto import amct_pb2, caffe_pb2
from amct_caffe.quant.record import (
    LayerRecord,
    parse_record,
    read_record_proto,
    read_records,
    record_text,
    records_from_proto,
    update_layers,
    update_shapes,
    validate_layer,
    validate_records,
)
from tests.references.records import RECORD_EXAMPLE


def f32(v: float) -> float:
    return float(np.float32(v))


def test_spec_example_parses_to_the_expected_values(tmp_path: Path) -> None:
    path = tmp_path / "record.txt"
    path.write_text(RECORD_EXAMPLE)
    records = read_records(path)
    assert list(records) == ["conv1", "res2a_branch1"]
    conv1 = records["conv1"]
    assert conv1.scale_d == f32(0.0213)
    assert conv1.offset_d == -14
    assert conv1.scale_w == [f32(0.00448), f32(0.00043)]
    assert conv1.offset_w == [0, 0]
    assert conv1.shift_bit == []
    assert (conv1.channels, conv1.height, conv1.width) == (3, 224, 224)
    assert conv1.shape == (3, 224, 224)
    assert conv1.skip_fusion is False
    res = records["res2a_branch1"]
    assert res == LayerRecord(
        scale_d=f32(0.0933), offset_d=-128, scale_w=[f32(0.00017)], offset_w=[0], channels=64, height=56,
        width=56,
    )


def test_training_shape_record_text_is_accepted() -> None:
    shape_rec = caffe_pb2.RetrainShapeRecord()
    entry = shape_rec.record.add()
    entry.key = "conv2"
    entry.value.channels, entry.value.height, entry.value.width = 16, 28, 28
    text = text_format.MessageToString(shape_rec)
    records = records_from_proto(parse_record(text))
    assert records == {"conv2": LayerRecord(channels=16, height=28, width=28)}
    assert records["conv2"].scale_d is None and records["conv2"].shape == (16, 28, 28)


def test_round_trip_keeps_values_and_order(tmp_path: Path) -> None:
    path = tmp_path / "rec.txt"
    records = {
        "a": LayerRecord(scale_d=f32(1 / 3), offset_d=127, scale_w=[f32(0.1), f32(2.5e-7)], offset_w=[0, 0],
                         channels=3, height=1, width=1),
        "b": LayerRecord(scale_d=f32(0.0213), offset_d=-128, scale_w=[1.0], offset_w=[0], skip_fusion=True),
        "c": LayerRecord(shift_bit=[3, 4], channels=8, height=2, width=2),
    }
    path.write_text(record_text(records, order=["c", "a", "missing"]))
    back = read_records(path)
    assert list(back) == ["c", "a", "b"]
    assert back == records
    # writing the read-back records gives the same text
    assert record_text(back, ["c", "a"]) == path.read_text()
    assert 'key: "c"' in path.read_text().splitlines()[1]


def test_unset_fields_are_not_written() -> None:
    text = record_text({"x": LayerRecord(channels=1, height=2, width=3)})
    assert text == 'record {\n  key: "x"\n  value {\n    channels: 1\n    height: 2\n    width: 3\n  }\n}\n'


def test_duplicate_layers_merge_with_later_values_winning() -> None:
    text = """
    record { key: "c" value { scale_d: 0.5 offset_d: 1 scale_w: 0.25 offset_w: 0 } }
    record { key: "d" value { channels: 1 } }
    record { key: "c" value { offset_d: -7 channels: 4 height: 5 width: 6 } }
    """
    records = records_from_proto(parse_record(text))
    assert list(records) == ["c", "d"]
    assert records["c"] == LayerRecord(scale_d=0.5, offset_d=-7, scale_w=[0.25], offset_w=[0], channels=4,
                                       height=5, width=6)


# -- update_shapes ---------------------------------------------------------------------------------------
def test_update_shapes_updates_or_appends_and_keeps_other_fields(tmp_path: Path) -> None:
    path = tmp_path / "rec.txt"
    path.write_text(RECORD_EXAMPLE)
    update_shapes(path, {"res2a_branch1": (32, 7, 9), "fc": (2048, 1, 1)})
    records = read_records(path)
    assert list(records) == ["conv1", "res2a_branch1", "fc"]
    assert records["res2a_branch1"] == LayerRecord(
        scale_d=f32(0.0933), offset_d=-128, scale_w=[f32(0.00017)], offset_w=[0], channels=32, height=7,
        width=9,
    )
    assert records["conv1"].shape == (3, 224, 224) and records["conv1"].scale_d == f32(0.0213)
    assert records["fc"] == LayerRecord(channels=2048, height=1, width=1)


def test_update_shapes_creates_the_file_and_updates_every_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "new" / "rec.txt"
    update_shapes(path, {"a": (1, 2, 3)})
    assert read_records(path) == {"a": LayerRecord(channels=1, height=2, width=3)}
    path.write_text('record { key: "a" value { channels: 1 } } record { key: "a" value { scale_d: 2 } }')
    update_shapes(path, {"a": (5, 6, 7)})
    msg = read_record_proto(path)
    assert [(e.key, e.value.channels, e.value.height, e.value.width) for e in msg.record] == [
        ("a", 5, 6, 7), ("a", 5, 6, 7)
    ]
    assert msg.record[1].value.scale_d == 2.0


def test_update_shapes_from_many_threads_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rec.txt"
    names = [f"layer{i}" for i in range(24)]

    def work(i: int) -> None:
        update_shapes(path, {names[i]: (i + 1, 2, 3)})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = read_records(path)
    assert sorted(records) == sorted(names)
    assert all(records[f"layer{i}"].channels == i + 1 for i in range(len(names)))
    assert [p.name for p in tmp_path.iterdir()] == ["rec.txt"]  # no temporary files left behind


def test_update_shapes_on_a_malformed_file_raises_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "rec.txt"
    path.write_text("record { key: 'a' value { channels: 1 }")
    with pytest.raises(RecordError, match="rec.txt"):
        update_shapes(path, {"a": (1, 1, 1)})
    assert path.read_text() == "record { key: 'a' value { channels: 1 }"


# -- malformed input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("record { key: 'a' value { scale_d: 0.5 }", "parse"),  # unbalanced
        ("record { key: 'a' value { scale: 0.5 } }", "parse"),  # unknown field
        ("record { key: 'a' value { channels: -3 } }", "parse"),  # uint32
        ("record { value { scale_d: 0.5 } }", "no 'key'"),
        ("layer { name: 'conv1' }", "parse"),  # a prototxt, not a record
    ],
)
def test_malformed_text_raises_record_error_naming_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad_record.txt"
    path.write_text(text)
    with pytest.raises(RecordError, match=match) as info:
        read_records(path)
    assert "bad_record.txt" in str(info.value)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="does not exist"):
        read_records(tmp_path / "nope.txt")
    path = tmp_path / "bin.txt"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(RecordError, match="UTF-8"):
        read_records(path)


# -- validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rec", "cout", "match"),
    [
        (LayerRecord(scale_w=[0.5, 0.5], offset_w=[0, 1]), None, "offset_w"),
        (LayerRecord(scale_w=[0.5, 0.5], offset_w=[0]), None, "same length"),
        (LayerRecord(scale_w=[0.5, 0.5, 0.5], offset_w=[0, 0, 0]), 4, "1 .per tensor. or 4"),
        (LayerRecord(scale_w=[0.5, -0.5]), None, "scale_w"),
        (LayerRecord(scale_d=0.0), None, "scale_d"),
        (LayerRecord(scale_d=float("inf")), None, "scale_d"),
        (LayerRecord(scale_d=0.5, offset_d=128), None, "offset_d"),
        (LayerRecord(scale_d=0.5, offset_d=-129), None, "offset_d"),
    ],
)
def test_validation_errors_name_file_and_layer(rec: LayerRecord, cout: int | None, match: str) -> None:
    with pytest.raises(RecordError, match=match) as info:
        validate_layer("conv7", rec, "/x/record.txt", cout)
    assert "conv7" in str(info.value) and "/x/record.txt" in str(info.value)


def test_validation_accepts_good_records() -> None:
    validate_layer("c", LayerRecord(scale_d=0.5, offset_d=-128, scale_w=[0.1] * 4, offset_w=[0] * 4), "", 4)
    validate_layer("c", LayerRecord(scale_d=0.5, offset_d=127, scale_w=[0.1], offset_w=[0]), "", 4)
    validate_layer("c", LayerRecord(channels=3, height=4, width=5), "")  # a shape-only record
    with pytest.raises(RecordError, match="scale_d, offset_d, scale_w missing"):
        validate_records({"c": LayerRecord(channels=3)}, "r.txt", couts={"c": 4}, require_factors=True)


def test_invalid_file_content_is_reported_on_read(tmp_path: Path) -> None:
    path = tmp_path / "rec.txt"
    path.write_text('record { key: "fc" value { scale_d: 0.5 offset_d: 300 } }')
    with pytest.raises(RecordError, match="layer 'fc'"):
        read_records(path)
    assert read_records(path, validate=False)["fc"].offset_d == 300
    path.write_text('record { key: "conv" value { scale_w: 0.5 scale_w: 0.5 offset_w: 0 offset_w: 0 } }')
    with pytest.raises(RecordError, match="scale_w has 2 values"):
        read_records(path, couts={"conv": 3})


def test_written_text_parses_as_the_amct_schema() -> None:
    text = record_text({"c": LayerRecord(scale_d=0.25, offset_d=-3, scale_w=[0.5], offset_w=[0])})
    msg = text_format.Parse(text, amct_pb2.ScaleOffsetRecord())
    assert msg.record[0].key == "c"
    assert (msg.record[0].value.scale_d, msg.record[0].value.offset_d) == (0.25, -3)


def test_update_layers_writes_protobufs_text_format(tmp_path: Path) -> None:
    """The file is exactly text_format's rendering of the record after every update, also when only some
    entries changed since the previous write (their text is reused)."""
    path = tmp_path / "record.txt"
    update_layers(path, {f"conv{i}": LayerRecord(scale_w=[0.5 + i, 0.25], offset_w=[0, 0]) for i in range(4)})
    for i in (2, 0, 7):
        update_layers(path, {f"conv{i}": LayerRecord(scale_d=0.1 * (i + 1), offset_d=-3)})
        msg = amct_pb2.ScaleOffsetRecord()
        text = path.read_text()
        text_format.Parse(text, msg)
        assert text == text_format.MessageToString(msg)
    assert [e.key for e in msg.record] == ["conv0", "conv1", "conv2", "conv3", "conv7"]
