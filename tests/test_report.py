"""The per-layer compare report (analysis.report): float vs fake-quant vs deploy.

The model pairs are produced here through the real QAT flow (create_quant_retrain_config ->
create_quant_retrain_model -> two TRAIN forwards of the retrain net -> net.save -> save_quant_retrain_model
'Both'), on a small net built here and on MTCNN's P-Net of the shared models. Every number of report.json is
checked against a direct computation: the three models run here with ``amct_caffe.caffe.Net`` and the
numpy metrics of tests/references (cosine / SNR, max abs error), and the saturation counted from the
record's scale_d/offset_d.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import amct, caffe
from amct_caffe.analysis import render
from amct_caffe.analysis import report as rep
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.errors import AmctError, ConfigError, RuntimeEngineError
from amct_caffe.model.io import load_prototxt, save_prototxt
from amct_caffe.proto import caffe_pb2
from tests.helpers import read_record
from tests.references.metrics import cosine, snr_db
from tests.references.quant import round_away
from tests.references.real_caffe import SHARED

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (pip install matplotlib)")

# data -> conv1 + BN + Scale + ReLU (all in place) -> AVE pool1 -> conv2 + ReLU (in place) -> fc -> prob,
# and a second head fc_b on conv2 (it shares fc's Quant layer). Quantized: conv1, pool1, conv2, fc, fc_b.
SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
layer { name: "fc_b" type: "InnerProduct" bottom: "conv2" top: "fc_b" inner_product_param { num_output: 3 } }
"""
SMALL_QUANTIZED = ["conv1", "pool1", "conv2", "fc", "fc_b"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------
# the real flow
# ---------------------------------------------------------------------------------------------------------
def qat_flow(folder: Path, model: str, weights: str, input_shape: tuple[int, ...],
             seed: int, extra_inputs: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """config -> retrain model -> two TRAIN forwards (IFMR clips) -> net.save -> save 'Both'."""
    folder.mkdir(parents=True, exist_ok=True)
    d = str(folder)
    amct.create_quant_retrain_config(f"{d}/config.json", model, weights)
    amct.create_quant_retrain_model(model, weights, f"{d}/config.json", f"{d}/retrain.prototxt",
                                    f"{d}/retrain.caffemodel", f"{d}/train_record.txt")
    net = caffe.Net(f"{d}/retrain.prototxt", f"{d}/retrain.caffemodel", caffe.TRAIN)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        net.forward(data=rng.standard_normal(input_shape).astype(np.float32), **(extra_inputs or {}))
    net.save(f"{d}/retrained.caffemodel")
    amct.save_quant_retrain_model(f"{d}/retrain.prototxt", f"{d}/retrained.caffemodel", "Both", f"{d}/out/m",
                                  f"{d}/record.txt")
    return {
        "float_model": model, "float_weights": weights,
        "fake_model": f"{d}/out/m_fake_quant_model.prototxt",
        "fake_weights": f"{d}/out/m_fake_quant_weights.caffemodel",
        "deploy_model": f"{d}/out/m_deploy_model.prototxt",
        "deploy_weights": f"{d}/out/m_deploy_weights.caffemodel",
        "record": f"{d}/record.txt",
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("small")
    (d / "float.prototxt").write_text(SMALL)
    net = Net(text_format.Merge(SMALL, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    randomize_params(net, 7)
    net.save(d / "float.caffemodel")
    return qat_flow(d / "qat", str(d / "float.prototxt"), str(d / "float.caffemodel"), (2, 3, 8, 8), 3)


@pytest.fixture(scope="module")
def pnet(tmp_path_factory) -> dict[str, str]:
    models = SHARED / "models" / "mtcnn_det1_pnet"
    if not models.is_dir():
        pytest.skip("the shared models folder is not present")
    d = tmp_path_factory.mktemp("pnet")
    return qat_flow(d, str(models / "det1.prototxt"), str(models / "det1.caffemodel"), (1, 3, 12, 12), 4)


def model_args(paths: dict[str, str], deploy: bool = True) -> list[str | None]:
    return [paths["float_model"], paths["float_weights"], paths["fake_model"], paths["fake_weights"],
            paths["deploy_model"] if deploy else None, paths["deploy_weights"] if deploy else None]


# ---------------------------------------------------------------------------------------------------------
# direct computations
# ---------------------------------------------------------------------------------------------------------
def run_direct(paths: dict[str, str], batches: list[np.ndarray], blobs: list[str],
               quant_bottoms: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{model: {blob: values of all batches concatenated on axis 0}} from amct_caffe.caffe.Net."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for which in ("float", "fake", "deploy"):
        net = caffe.Net(paths[f"{which}_model"], paths[f"{which}_weights"], caffe.TEST)
        names = list(dict.fromkeys(blobs + (quant_bottoms if which != "float" else [])))
        got: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for x in batches:
            net.forward(data=x)
            for n in names:
                got[n].append(net.blobs[n].data.astype(np.float64).copy())
        out[which] = {n: np.concatenate(v) for n, v in got.items()}
    return out


def quant_bottoms(fake_model: str) -> dict[str, str]:
    """{quantized layer: the blob its Quant layer reads} from the fake-quant prototxt (the layers reading a
    Quant's top; object_layer joins names with '-', which P-Net's names contain too)."""
    net = load_prototxt(fake_model)
    quant_input = {layer.top[0]: layer.bottom[0] for layer in net.layer if layer.type == "Quant"}
    return {layer.name: quant_input[layer.bottom[0]] for layer in net.layer
            if layer.type != "Quant" and layer.bottom and layer.bottom[0] in quant_input}


def clipped_count(x: np.ndarray, s_d: float, o_d: int) -> tuple[int, int]:
    codes = round_away(x / s_d) + o_d
    return int(np.sum(codes < -128)), int(np.sum(codes > 127))


def check_metrics(entry: dict, ref: np.ndarray, x: np.ndarray) -> None:
    assert entry["count"] == ref.size
    assert entry["cosine"] == pytest.approx(cosine(ref, x), rel=1e-9, abs=1e-9)
    assert entry["snr_db"] == pytest.approx(snr_db(ref, x), rel=1e-6)
    assert entry["max_abs"] == pytest.approx(float(np.max(np.abs(ref - x))), rel=1e-9, abs=1e-12)


def check_files(out: Path, data: dict) -> None:
    html = (out / "report.html").read_text()
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', html)
    images = [name for _, name in embedded]
    assert sorted(images) == sorted(data["plots"])
    for encoded, name in embedded:  # the page stands alone; the same PNGs are written beside it
        assert base64.b64decode(encoded) == (out / name).read_bytes(), name
    assert {"cosine.png", "snr.png", "saturation.png", "worst_1.png"} <= set(images)
    import matplotlib.image as mpimg

    for name in images:
        path = out / name
        raw = path.read_bytes()
        assert raw[:8] == PNG_SIGNATURE, name
        assert len(raw) > 1024, name
        pixels = mpimg.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert float(np.std(pixels)) > 0.01  # not a blank image


def check_report(paths: dict[str, str], data: dict, batches: list[np.ndarray], quantized: list[str],
                 metric_blobs: list[str], outputs: list[str]) -> None:
    """The JSON against direct numbers: metrics for ``metric_blobs`` (+ outputs), every saturation."""
    qb = quant_bottoms(paths["fake_model"])
    assert sorted(qb) == sorted(quantized)
    direct = run_direct(paths, batches, sorted(set(metric_blobs + outputs)), sorted(set(qb.values())))
    layers = {entry["layer"]: entry for entry in data["layers"]}
    assert list(layers) == quantized
    for name in metric_blobs:
        entry = layers[name]
        assert entry["blob"] == name
        f, q, d = direct["float"][name], direct["fake"][name], direct["deploy"][name]
        assert entry["shape"] == [batches[-1].shape[0], *f.shape[1:]]
        check_metrics(entry["float_vs_fake"], f, q)
        check_metrics(entry["float_vs_deploy"], f, d)
        assert entry["fake_vs_deploy"]["max_abs"] == pytest.approx(float(np.max(np.abs(q - d))), abs=1e-12)
        assert entry["float_vs_fake"]["cosine"] < 1.0  # quantization changed something
    out_entries = {entry["blob"]: entry for entry in data["outputs"]}
    assert sorted(out_entries) == sorted(outputs)
    for name in outputs:
        check_metrics(out_entries[name]["float_vs_fake"], direct["float"][name], direct["fake"][name])
        check_metrics(out_entries[name]["float_vs_deploy"], direct["float"][name], direct["deploy"][name])
    record = read_record(paths["record"])
    total_clipped = 0
    for name in quantized:
        sat = layers[name]["saturation"]
        rec = record[name]
        assert layers[name]["offset_d"] == rec.offset_d
        assert layers[name]["scale_d"] == pytest.approx(rec.scale_d, rel=1e-6)
        for which in ("fake", "deploy"):
            x = direct[which][qb[name]]
            low, high = clipped_count(x, float(rec.scale_d), int(rec.offset_d))
            assert (sat[which]["low_rate"] * x.size, sat[which]["high_rate"] * x.size) == \
                pytest.approx((low, high), abs=1e-6), (name, which)
            assert sat[which]["clipped"] == low + high and sat[which]["total"] == x.size
            assert sat[which]["rate"] == pytest.approx((low + high) / x.size)
            total_clipped += low + high
    assert total_clipped > 0  # the check above saw clipping happen


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------
def test_small_net_report_matches_direct_computation(small, tmp_path):
    rng = np.random.default_rng(11)
    x = (2.0 * rng.standard_normal((4, 3, 8, 8))).astype(np.float32)  # wider than the training data: clips
    out = tmp_path / "nested" / "report"
    result = rep.compare_report(*model_args(small), inputs={"data": x}, out_dir=out, batches=2,
                                progress=False)
    assert (out / "report.html").is_file() and (out / "report.json").is_file()
    data = json.loads((out / "report.json").read_text())
    assert data["inputs"] == "given" and data["batches"] == 2
    assert data["pairs"] == ["float_vs_fake", "float_vs_deploy", "fake_vs_deploy"]
    # conv1: the in-place Conv->BN->Scale->ReLU chain; pool1: AVE pooling; fc_b: an output sharing a Quant
    check_report(small, data, [x[:2], x[2:]], SMALL_QUANTIZED, ["conv1", "pool1", "fc_b"], ["fc_b", "prob"])
    check_files(out, data)
    assert [r.layer for r in result.layers] == SMALL_QUANTIZED
    # the fake-quant and deploy models agree to well below one output step (analysis.compare)
    for entry in data["layers"]:
        assert entry["fake_vs_deploy"]["max_lsb"] < 0.5
    table = render.format_table(result)
    assert all(name in table for name in SMALL_QUANTIZED + ["prob"])


def test_pnet_random_inputs_match_direct_computation(pnet, tmp_path):
    """inputs=None: ``batches`` standard-normal batches of the input shape from default_rng(seed)."""
    out = tmp_path / "r"
    rep.compare_report(*model_args(pnet), out_dir=out, batches=2, seed=5, progress=False)
    data = json.loads((out / "report.json").read_text())
    assert data["inputs"] == "random" and "not accuracy" in data["note"]
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(2)]
    check_report(pnet, data, batches, ["conv1", "conv2", "conv3", "conv4-1", "conv4-2"],
                 ["conv1", "conv3", "conv4-1"], ["conv4-2", "prob1"])
    check_files(out, data)
    conv42 = next(entry for entry in data["layers"] if entry["layer"] == "conv4-2")
    assert conv42["is_output"] is True


def test_threshold_names_the_expected_layers(small):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    qb = quant_bottoms(small["fake_model"])
    direct = run_direct(small, [x], SMALL_QUANTIZED, [])
    worst = {name: min(cosine(direct["float"][name], direct["fake"][name]),
                       cosine(direct["float"][name], direct["deploy"][name])) for name in qb}
    threshold = 0.99999
    expected = [name for name in SMALL_QUANTIZED if worst[name] < threshold]
    assert expected  # 8-bit quantization of this net is visible at five nines
    high = rep.compare_report(*model_args(small), inputs={"data": x}, threshold=threshold, progress=False)
    assert high.skip_candidates == expected
    table = render.format_table(high)
    assert "candidates to skip" in table and "retrain_enable" in table
    assert all(f"*{name}" in table for name in expected)
    assert rep.compare_report(*model_args(small), inputs={"data": x}, threshold=1.5,
                              progress=False).skip_candidates == SMALL_QUANTIZED
    low = rep.compare_report(*model_args(small), inputs={"data": x}, threshold=0.0, progress=False)
    assert low.skip_candidates == [] and "no layer below" in render.format_table(low)
    assert high.to_dict()["skip_hint"] and not low.to_dict()["skip_hint"]


def test_input_forms_and_no_deploy_model(small, tmp_path):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    split = rep.compare_report(*model_args(small), inputs={"data": x}, batches=2, progress=False)
    listed = rep.compare_report(*model_args(small), batches=7, progress=False,  # a list: one forward per dict
                                inputs=[{"data": x[:2]}, {"data": torch.from_numpy(x[2:])}])
    assert listed.batches == 2
    assert split.to_dict()["layers"] == listed.to_dict()["layers"]
    fake_only = rep.compare_report(*model_args(small, deploy=False), inputs={"data": x}, out_dir=tmp_path,
                                   progress=False)
    assert fake_only.pairs == ["float_vs_fake"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["layers"][0]["saturation"]) == {"fake"}
    assert "float_vs_deploy" not in data["layers"][0] and "deploy" not in data["models"]
    check_files(tmp_path, data)


def test_data_layers_mode(small, tmp_path):
    """Nets without Input blobs run their own data layers; batches that differ between nets are an error."""
    paths = dict(small)

    def with_dummy(key: str, filler: str) -> None:
        net = load_prototxt(small[key])
        layer = net.layer[0]
        assert layer.type == "Input"
        shape = list(layer.input_param.shape[0].dim)
        layer.ClearField("input_param")
        layer.type = "DummyData"
        text_format.Merge(f"dummy_data_param {{ shape {{ dim: {' dim: '.join(map(str, shape))} }} "
                          f"data_filler {{ {filler} }} }}", layer)
        path = tmp_path / f"{key}_{filler.split()[1]}.prototxt"
        save_prototxt(net, path)
        paths[key] = str(path)

    for key in ("float_model", "fake_model", "deploy_model"):
        with_dummy(key, 'type: "constant" value: 0.75')
    result = rep.compare_report(*model_args(paths), batches=2, progress=False)
    assert result.inputs == "data layers" and result.batches == 2
    x = np.full((2, 3, 8, 8), 0.75, np.float32)
    same = rep.compare_report(*model_args(small), inputs=[{"data": x}, {"data": x}], progress=False)
    assert result.to_dict()["layers"] == same.to_dict()["layers"]
    for key in ("float_model", "fake_model", "deploy_model"):
        with_dummy(key, 'type: "gaussian" std: 1')
    torch.manual_seed(0)
    with pytest.raises(RuntimeEngineError, match="different"):
        rep.compare_report(*model_args(paths), progress=False)


def test_errors(small, tmp_path, monkeypatch):
    args = model_args(small)
    x = {"data": np.zeros((2, 3, 8, 8), np.float32)}
    with pytest.raises(ConfigError, match="both deploy_model and deploy_weights"):
        rep.compare_report(*args[:5], None, inputs=x)
    with pytest.raises(ConfigError, match="threshold"):
        rep.compare_report(*args, inputs=x, threshold=float("nan"))
    with pytest.raises(ConfigError, match="batches"):
        rep.compare_report(*args, inputs=x, batches=0)
    with pytest.raises(ConfigError, match="at least"):
        rep.compare_report(*args, inputs=x, batches=3)
    with pytest.raises(RuntimeEngineError, match="data"):
        rep.compare_report(*args, inputs={"image": x["data"]}, progress=False)
    # matplotlib missing: a clear error before anything runs or is written
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        rep.compare_report(*args, inputs=x, out_dir=out)
    assert not out.exists()


def test_write_report_is_all_or_nothing(small, tmp_path, monkeypatch):
    x = {"data": np.zeros((2, 3, 8, 8), np.float32)}
    result = rep.compare_report(*model_args(small), inputs=x, progress=False)
    (tmp_path / "report.json").write_text("old")

    class FailingFiles(rep.AtomicFiles):
        """Fails while staging the third file (after report.json and report.html were staged)."""

        def write(self, path, data):
            if len(self._staged) == 2:
                raise OSError("disk full")
            super().write(path, data)

    monkeypatch.setattr(rep, "AtomicFiles", FailingFiles)
    with pytest.raises(AmctError, match="disk full"):
        rep.write_report(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "old"


# data -> conv1 -> ReLU into its own top -> conv2 -> fc -> Accuracy against the label input
RELU_ACC = """
name: "relu_acc"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "relu1" }
layer { name: "conv2" type: "Convolution" bottom: "relu1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }
"""


def test_lsb_follows_a_relu_and_accuracy_is_shown(tmp_path):
    (tmp_path / "float.prototxt").write_text(RELU_ACC)
    net = Net(text_format.Merge(RELU_ACC, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    randomize_params(net, 5)
    net.save(tmp_path / "float.caffemodel")
    paths = qat_flow(tmp_path / "qat", str(tmp_path / "float.prototxt"), str(tmp_path / "float.caffemodel"),
                     (4, 3, 8, 8), 2, {"label": np.array([0, 1, 2, 3], np.float32)})
    rng = np.random.default_rng(8)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 8).astype(np.float32)
    out = tmp_path / "report"
    result = rep.compare_report(*model_args(paths), inputs={"data": x, "label": labels}, out_dir=out,
                                batches=2, progress=False)
    # conv1's output reaches conv2's Quant through a ReLU that is not in place: its LSB is counted in
    # that Quant's steps (about one at most), not in the INT32 accumulator's (hundreds)
    conv1 = next(r for r in result.layers if r.layer == "conv1")
    assert conv1.metrics["fake_vs_deploy"] is not None
    assert conv1.metrics["fake_vs_deploy"].max_lsb <= 1.0 + 1e-6
    from amct_caffe.analysis.collect import load_report_nets

    nets = load_report_nets(*model_args(paths), device="cpu", quant_formula="caffe")
    conv2_scale_d = read_record(paths["record"])["conv2"].scale_d
    np.testing.assert_allclose(nets.steps["conv1"], conv2_scale_d, rtol=1e-6)
    # accuracy: the mean of the Accuracy top over the batches, computed here from each model's fc
    expected = {}
    for which in ("float", "fake", "deploy"):
        model = caffe.Net(paths[f"{which}_model"], paths[f"{which}_weights"], caffe.TEST)
        hits = []
        for part in (slice(0, 4), slice(4, 8)):
            model.forward(data=x[part], label=labels[part])
            predicted = np.argmax(model.blobs["fc"].data.reshape(4, -1), axis=1)
            hits.append(float(np.mean(predicted == labels[part])))
        expected[which] = float(np.mean(hits))
    assert result.accuracy["acc"] == pytest.approx(expected, abs=1e-6)
    data = json.loads((out / "report.json").read_text())
    assert data["accuracy"]["acc"] == pytest.approx(expected, abs=1e-6)
    assert "Accuracy top" in (out / "report.html").read_text()
