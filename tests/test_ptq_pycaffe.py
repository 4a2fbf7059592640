"""The IFMR calibration layer for a STOCK pycaffe (amct_caffe.caffe.python_calibration) and the rewrite of
the calibration model: the numpy IFMR is the twin of the engine's torch IFMR (equal results), the record
text is updated field by field, and the rewritten calibration model run in the REAL reference Caffe writes
the same record as the engine."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.caffe.python_calibration import (
    ifmr_numpy,
    parse_record_text,
    standalone_ifmr,
    update_record_text,
)
from amct_caffe.caffe.python_layers import StandaloneBlob
from amct_caffe.caffe.rewrite import PYCAFFE_CALIBRATION_MODULE, rewrite_fake_quant_for_pycaffe
from amct_caffe.proto import amct_pb2
from amct_caffe.quant.ifmr import ifmr_gathered
from amct_caffe.quant.record import LayerRecord, read_records, record_text
from tests.helpers import read_net, read_record
from tests.ptq_helpers import PtqFlow, calibration_batches
from tests.references import quant
from tests.references.nets import one_ifmr_net
from tests.references.real_caffe import REPO

SRC = REPO / "src"


@pytest.mark.parametrize("with_offset, percentiles, search", [
    (True, (0.999999, 0.999999), (0.7, 1.3, 0.01)),
    (False, (0.999999, 0.999999), (0.7, 1.3, 0.01)),
    (True, (0.9, 0.95), (0.5, 1.5, 0.05)),
    (False, (0.99, 0.6), (0.8, 1.2, 0.02)),
])
def test_numpy_ifmr_is_the_torch_ifmrs_twin(with_offset, percentiles, search):
    rng = np.random.default_rng(21)
    for trial in range(6):
        chunks = [(rng.standard_normal(rng.integers(50, 400)) * rng.uniform(0.1, 4) + rng.uniform(-1, 1))
                  .astype(np.float32) for _ in range(3)]
        if trial == 0:
            chunks.append(np.maximum(chunks[0], 0))  # a one-sided chunk
        args = (*percentiles, *search, with_offset)
        s_t, o_t = ifmr_gathered([torch.from_numpy(c) for c in chunks], *args)
        s_n, o_n = ifmr_numpy(chunks, *args)
        assert (np.float32(s_n), o_n) == (np.float32(s_t.item()), int(o_t.item()))
    # and both are IFMR over the concatenation (the tests' own numpy reference)
    ref = quant.ifmr(np.concatenate(chunks), with_offset, max_percentile=percentiles[0],
                     min_percentile=percentiles[1], start=search[0], end=search[1], step=search[2])
    assert (np.float32(s_n), o_n) == (ref.s, ref.o)


def test_record_text_update_keeps_other_fields(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text(record_text({"conv1": LayerRecord(scale_w=[0.5, 0.25], offset_w=[0, 0], skip_fusion=True),
                                 "fc": LayerRecord(scale_w=[0.125], offset_w=[0])}))
    update_record_text(str(path), {"conv1": {"scale_d": 0.1, "offset_d": -3, "channels": 3, "height": 8,
                                             "width": 8},
                                   "new": {"scale_d": 0.5, "offset_d": 0}})
    records = read_records(path)
    assert records["conv1"].scale_w == [0.5, 0.25] and records["conv1"].skip_fusion
    assert records["conv1"].scale_d == pytest.approx(0.1) and records["conv1"].offset_d == -3
    assert records["conv1"].shape == (3, 8, 8)
    assert records["fc"].scale_w == [0.125] and records["fc"].scale_d is None
    assert records["new"].scale_d == 0.5 and list(records) == ["conv1", "fc", "new"]
    # the text is what protobuf writes (field-number order, float32 values)
    msg = text_format.Merge(path.read_text(), amct_pb2.ScaleOffsetRecord())
    assert path.read_text() == text_format.MessageToString(msg)
    text = 'record: { value { scale_d: 1 } key: "a" } # note\n'
    assert parse_record_text(text) == [("a", [("scale_d", "1")])]
    with pytest.raises(ValueError):
        parse_record_text("record { key: ")


def test_standalone_layer_writes_what_the_engine_layer_writes(tmp_path):
    """One calibration, two implementations: the engine's IFMR layer and the pycaffe one, same data."""
    record_engine, record_py = tmp_path / "engine.txt", tmp_path / "py.txt"
    net = one_ifmr_net(3, bottoms=2, record=str(record_engine))
    params = {"batch_num": 3, "with_offset": True, "search_range_start": 0.7, "search_range_end": 1.3,
              "search_step": 0.01, "max_percentile": 0.999999, "min_percentile": 0.999999,
              "object_layer": ["c0", "c1"], "record_file_path": str(record_py), "distinct": [0]}
    layer = standalone_ifmr(json.dumps(params))
    rng = np.random.default_rng(2)
    data = [(rng.standard_normal((4, 2, 3)) * (i + 1)).astype(np.float32) for i in range(4)]
    blobs = [StandaloneBlob.from_array(np.zeros((4, 2, 3))), StandaloneBlob.from_array(np.zeros((4, 2, 3)))]
    layer.setup(blobs, [])
    for x in data:
        net.set_tensor("data", torch.from_numpy(x))
        net.run()
        for blob in blobs:
            blob.data[...] = x
        layer.reshape(blobs, [])
        layer.forward(blobs, [])
    assert layer.gathered == [] and layer.batches_gathered == 3
    assert read_record(record_py) == read_record(record_engine)
    assert set(read_record(record_py)) == {"c0", "c1"}
    with pytest.raises(ValueError, match="batch_num"):
        standalone_ifmr(json.dumps({**params, "batch_num": 0})).setup(blobs, [])
    with pytest.raises(ValueError, match="no top"):
        standalone_ifmr(json.dumps(params)).setup(blobs, [StandaloneBlob(1)])


def _calibration_model(tmp_path: Path) -> PtqFlow:
    flow = PtqFlow(tmp_path, batch_num=3)
    flow.quantize()
    return flow


def test_rewrite_the_calibration_model(tmp_path):
    flow = _calibration_model(tmp_path)
    out = tmp_path / "calibration_pycaffe.prototxt"
    counts = rewrite_fake_quant_for_pycaffe(flow.cal_model, out)
    assert counts == {"Quant": 0, "DeQuant": 0, "AntiQuant": 0, "IFMR": 4}
    layers = {layer.name: layer for layer in read_net(out).layer}
    shared = layers["conv2a_ifmr_layer"]
    assert shared.type == "Python" and not shared.HasField("ifmr_param")
    assert shared.python_param.module == PYCAFFE_CALIBRATION_MODULE and shared.python_param.layer == "IFMR"
    assert list(shared.bottom) == ["pool1", "pool1"] and not shared.top
    params = json.loads(shared.python_param.param_str)
    assert params == {"batch_num": 3, "with_offset": True, "search_range_start": pytest.approx(0.7),
                      "search_range_end": pytest.approx(1.3), "search_step": pytest.approx(0.01),
                      "max_percentile": pytest.approx(0.999999), "min_percentile": pytest.approx(0.999999),
                      "object_layer": ["conv2a", "conv2b"], "record_file_path": os.path.abspath(flow.record),
                      "distinct": [0]}


RUN_BATCHES = textwrap.dedent("""
    import sys
    import numpy as np
    import caffe
    caffe.set_mode_cpu()
    model, weights, data, out = sys.argv[1:5]
    net = caffe.Net(model, weights, caffe.TEST)
    seen = {name: [] for name in ("data", "conv1", "pool1", "sum")}
    for x in np.load(data):
        net.blobs["data"].data[...] = x
        net.forward()
        for name in seen:
            seen[name].append(np.array(net.blobs[name].data))
    np.savez(out, **{name: np.stack(values) for name, values in seen.items()})
""")


@pytest.mark.reference
def test_rewritten_calibration_model_in_reference_caffe(tmp_path, reference_caffe):
    """The real Caffe runs the rewritten calibration model for 3 batches: its record holds, for every layer,
    IFMR over the values that Caffe's net fed the layer in all 3 batches (numpy reference), and equals the
    engine's record where the values are the same (the net input; downstream the two Caffes' convolutions
    round differently in the last bit)."""
    flow = _calibration_model(tmp_path)
    weights_only = read_record(flow.record)
    flow.calibrate(calibration_batches())
    engine_record = read_record(flow.record)
    # back to the record quantize_model wrote, then calibrate in the reference Caffe
    Path(flow.record).write_text(text_format.MessageToString(amct_pb2.ScaleOffsetRecord(
        record=[amct_pb2.ScaleOffsetRecord.MapFiledEntry(key=k, value=v) for k, v in weights_only.items()])))
    rewritten = tmp_path / "calibration_pycaffe.prototxt"
    rewrite_fake_quant_for_pycaffe(flow.cal_model, rewritten)
    np.save(tmp_path / "batches.npy", np.stack(calibration_batches()))
    script = tmp_path / "run_batches.py"
    script.write_text(RUN_BATCHES)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([reference_caffe, str(script), str(rewritten), flow.cal_weights,
                           str(tmp_path / "batches.npy"), str(tmp_path / "seen.npz")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = np.load(tmp_path / "seen.npz")
    reference_record = read_record(flow.record)
    assert set(reference_record) == set(engine_record)
    inputs = {"conv1": "data", "pool1": "conv1", "conv2a": "pool1", "conv2b": "pool1", "ip1": "sum"}
    for name, rec in engine_record.items():
        ref = reference_record[name]
        expected = quant.ifmr(seen[inputs[name]].ravel())
        assert expected.gap > 1e-9
        assert (np.float32(ref.scale_d), ref.offset_d) == (expected.s, expected.o), name
        np.testing.assert_allclose(ref.scale_d, rec.scale_d, rtol=1e-5, err_msg=name)
        assert ref.offset_d == rec.offset_d, name
        assert (ref.channels, ref.height, ref.width) == (rec.channels, rec.height, rec.width), name
        assert list(ref.scale_w) == list(rec.scale_w), name
    assert reference_record["conv1"] == engine_record["conv1"]
