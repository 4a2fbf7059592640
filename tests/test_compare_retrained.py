"""``compare`` after QAT: the retrained float weights as the reference, the per-layer sensitivity, and models
that do not belong together.

Training is stood in for by changing the float shadow weights of conv2 and fc in the retrained caffemodel
(what an optimizer does); the expected values come from the original float prototxt run with those weights
put in by hand, and from ``save_quant_retrain_model`` with a QAT config that enables one layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe import amct, caffe
from amct_caffe.analysis import report as rep
from amct_caffe.cli import main
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.errors import ModelMismatchError
from amct_caffe.proto import caffe_pb2
from amct_caffe.workflows.compare import layer_sensitivity
from tests.references.metrics import cosine

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" inner_product_param { num_output: 5 } }
"""
CHANGED = ("conv2", "fc")


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("retrained")
    (d / "float.prototxt").write_text(NET)
    net = Net(text_format.Merge(NET, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    randomize_params(net, 3)
    net.save(d / "float.caffemodel")
    model, weights, config = str(d / "float.prototxt"), str(d / "float.caffemodel"), str(d / "config.json")
    amct.create_quant_retrain_config(config, model, weights)
    amct.create_quant_retrain_model(model, weights, config, str(d / "retrain.prototxt"),
                                    str(d / "retrain.caffemodel"), str(d / "train_record.txt"))
    train = caffe.Net(str(d / "retrain.prototxt"), str(d / "retrain.caffemodel"), caffe.TRAIN)
    rng = np.random.default_rng(0)
    train.forward(data=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    shadows = {}
    for name in CHANGED:  # "training": the float shadow weight (blob 1 of the WeightQAT) moves
        shadow = train.params[f"{name}_wts_retrain"][1].data
        shadow[...] = shadow + 0.8 * rng.standard_normal(shadow.shape) * np.abs(shadow).mean()
        shadows[name] = shadow.copy()
    train.save(str(d / "retrained.caffemodel"))
    amct.save_quant_retrain_model(str(d / "retrain.prototxt"), str(d / "retrained.caffemodel"), "Both",
                                  str(d / "out" / "m"), str(d / "record.txt"))
    return {"dir": d, "shadows": shadows, "inputs": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}


def float_with_shadows(d: Path, shadows: dict[str, np.ndarray]) -> caffe.Net:
    net = caffe.Net(str(d / "float.prototxt"), str(d / "float.caffemodel"), caffe.TEST)
    for name, shadow in shadows.items():
        net.params[name][0].data[...] = shadow
    return net


def test_retrained_float_is_the_reference(retrained: dict, tmp_path: Path) -> None:
    d, x = retrained["dir"], retrained["inputs"]
    np.save(tmp_path / "x.npy", x)
    common = ["--fake-model", str(d / "out" / "m_fake_quant_model.prototxt"),
              "--fake-weights", str(d / "out" / "m_fake_quant_weights.caffemodel"),
              "--input", f"data={tmp_path / 'x.npy'}"]
    assert main(["compare", "--float-model", str(d / "float.prototxt"), "--float-weights",
                 str(d / "float.caffemodel"), *common, "--output", str(tmp_path / "orig")]) == 0
    assert main(["compare", "--retrain-model", str(d / "retrain.prototxt"), "--retrain-weights",
                 str(d / "retrained.caffemodel"), *common, "--output", str(tmp_path / "retr")]) == 0
    orig = json.loads((tmp_path / "orig" / "report.json").read_text())
    retr = json.loads((tmp_path / "retr" / "report.json").read_text())
    # expected: the float prototxt with the trained shadow weights vs the fake-quant model, computed here
    reference = float_with_shadows(d, retrained["shadows"])
    fake = caffe.Net(str(d / "out" / "m_fake_quant_model.prototxt"),
                     str(d / "out" / "m_fake_quant_weights.caffemodel"), caffe.TEST)
    for model in (reference, fake):
        model.blobs["data"].reshape(*x.shape)
        model.reshape()
        model.forward(data=x)
    for entry in retr["layers"]:
        blob = entry["blob"]
        assert entry["float_vs_fake"]["cosine"] == pytest.approx(
            cosine(reference.blobs[blob].data, fake.blobs[blob].data), abs=1e-5), blob
    by_layer = {e["layer"]: e for e in orig["layers"]}
    # against the original weights, the layers training changed look badly quantized; against the
    # retrained weights they do not
    for name in CHANGED:
        assert by_layer[name]["float_vs_fake"]["cosine"] < 0.99
    assert retr["skip_candidates"] == []


def test_sensitivity_equals_one_layer_saves(retrained: dict, tmp_path: Path) -> None:
    d, x = retrained["dir"], retrained["inputs"]
    ranking = layer_sensitivity(d / "retrain.prototxt", d / "retrained.caffemodel", {"data": x}, batches=2)
    assert sorted(s.name for s in ranking) == ["conv1", "conv2", "fc", "pool1"]
    assert [s.cosine for s in ranking] == sorted(s.cosine for s in ranking)
    reference = float_with_shadows(d, retrained["shadows"])
    config = json.loads((d / "config.json").read_text())
    for s in ranking:
        one = {k: (dict(v, retrain_enable=(k == s.name)) if isinstance(v, dict) else v)
               for k, v in config.items()}
        (tmp_path / f"{s.name}.json").write_text(json.dumps(one))
        prefix = tmp_path / s.name / "m"
        amct.save_quant_retrain_model(str(d / "retrain.prototxt"), str(d / "retrained.caffemodel"),
                                      "Fakequant", str(prefix), str(tmp_path / f"{s.name}_record.txt"),
                                      str(tmp_path / f"{s.name}.json"))
        alone = caffe.Net(f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel",
                          caffe.TEST)
        ref_out, got_out = [], []
        for part in (x[:2], x[2:]):
            reference.forward(data=part)
            alone.forward(data=part)
            ref_out.append(np.array(reference.blobs["fc"].data))
            got_out.append(np.array(alone.blobs["fc"].data))
        assert s.cosine == pytest.approx(cosine(np.concatenate(ref_out), np.concatenate(got_out)), abs=1e-5)
    out = tmp_path / "cli"
    assert main(["compare", "--retrain-model", str(d / "retrain.prototxt"), "--retrain-weights",
                 str(d / "retrained.caffemodel"), "--sensitivity", "--output", str(out)]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert [entry["layer"] for entry in data["layers"]] and data["sensitivity"] == "CosineSimilarity"


def test_mismatched_models_fail(retrained: dict, tmp_path: Path) -> None:
    d = retrained["dir"]
    other = tmp_path / "other.prototxt"
    other.write_text(NET.replace('top: "fc"', 'top: "logits"').replace('"fc" type', '"logits" type'))
    net = Net(str(other), caffe_pb2.TEST)
    net.save(tmp_path / "other.caffemodel")
    fake = [str(d / "out" / "m_fake_quant_model.prototxt"),
            str(d / "out" / "m_fake_quant_weights.caffemodel")]
    with pytest.raises(ModelMismatchError, match="no blob"):
        rep.compare_report(str(other), str(tmp_path / "other.caffemodel"), *fake, progress=False)
    # a float model given as the fake-quant one: nothing quantized
    with pytest.raises(ModelMismatchError, match="no DeQuant"):
        rep.compare_report(str(d / "float.prototxt"), str(d / "float.caffemodel"), str(d / "float.prototxt"),
                           str(d / "float.caffemodel"), progress=False)
    code = main(["compare", "--float-model", str(other), "--float-weights",
                 str(tmp_path / "other.caffemodel"), "--fake-model", fake[0], "--fake-weights", fake[1],
                 "--output", str(tmp_path / "r")])
    assert code == 1
    assert not (tmp_path / "r" / "report.html").exists()
    # usage errors: no float reference, or two
    assert main(["compare", "--fake-model", fake[0], "--fake-weights", fake[1], "--output", "o"]) == 1
    assert main(["compare", "--float-model", "a", "--float-weights", "b", "--retrain-model", "c",
                 "--retrain-weights", "d", "--fake-model", fake[0], "--fake-weights", fake[1],
                 "--output", "o"]) == 1
