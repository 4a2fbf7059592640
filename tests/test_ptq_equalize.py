"""Cross-layer range equalization (``save_model(..., refine="equalization")`` and its combinations).

The pass is checked by hand (the scales, the pattern, the rescaled weights) and against the float model
(equalizing must not change it). The flow is checked on a small net whose first layer has output channels of
very different ranges -- a balanced net with channels shrunk by hand and the next layer compensating, so
the float function is that of the balanced net: plain PTQ crushes the narrow channels onto few codes,
equalization gives them back the grid. The new activation factors are checked against the brute-force IFMR
reference on the rescaled float values (``k_c`` times the float model's own values).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amct_caffe import amct, caffe
from amct_caffe.errors import ConfigError
from amct_caffe.model.graph import Graph
from amct_caffe.passes.equalize import (
    EqualizationPair,
    equalization_pairs,
    equalize_weights,
    equalizing_scales,
)
from amct_caffe.quant.numerics import QuantDataError
from tests.helpers import caffemodel_blobs, parse_net
from tests.ptq_helpers import calibrated_graph
from tests.references.ifmr import ifmr_exact
from tests.references.nets import write_random_net

NET = """
name: "eq"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "relu2" }
layer { name: "ip" type: "InnerProduct" bottom: "relu2" top: "ip" inner_product_param { num_output: 5 } }
"""
#: conv1's output channels are multiplied by these (conv2's inputs divided), so the float net is unchanged
SHRINK = np.array([1.0, 0.02, 0.05, 1.0, 0.1, 0.03], np.float32)


# -- the pass by hand ----------------------------------------------------------------------------------------
def test_scales_grow_each_channel_until_it_meets_the_tensor_range():
    low = np.array([-1.0, 0.0, -0.5, 0.0, -0.25])
    high = np.array([4.0, 2.0, 0.5, 0.0, 0.0])
    # tensor range [-1, 4]: ch0 already touches both ends; ch1 has no negative side (4/2); ch2 is bound by
    # its negative side (-1/-0.5 = 2 < 4/0.5 = 8); ch3 is always zero; ch4 is bound by its negative side
    np.testing.assert_array_equal(equalizing_scales(low, high), [1.0, 2.0, 2.0, 1.0, 4.0])
    np.testing.assert_array_equal(equalizing_scales(np.zeros(2), np.array([1000.0, 0.1])), [1.0, 1024.0])
    capped = equalizing_scales(np.zeros(2), np.array([8.0, 1.0]), max_scale=4.0)
    np.testing.assert_array_equal(capped, [1.0, 4.0])


PATTERNS = """
name: "patterns"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "a_relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "Convolution" bottom: "a" top: "b"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b_sig" type: "Sigmoid" bottom: "b" top: "b" }
layer { name: "c" type: "Convolution" bottom: "b" top: "c"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "c_prelu" type: "PReLU" bottom: "c" top: "c_p" }
layer { name: "c_relu" type: "ReLU" bottom: "c_p" top: "c_r" }
layer { name: "d" type: "Deconvolution" bottom: "c_r" top: "d"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
layer { name: "e" type: "Convolution" bottom: "d" top: "e"
        convolution_param { num_output: 4 kernel_size: 1 group: 2 } }
layer { name: "f" type: "Convolution" bottom: "e" top: "f"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "f_relu" type: "ReLU" bottom: "f" top: "f" }
layer { name: "f_pool" type: "Pooling" bottom: "f" top: "f_p"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "f_ave" type: "Pooling" bottom: "f_p" top: "f_a" pooling_param { pool: AVE kernel_size: 1 } }
layer { name: "f_m" type: "Convolution" bottom: "f_a" top: "f_m"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "f_relu2" type: "ReLU" bottom: "f_m" top: "f_m" }
layer { name: "f_pool2" type: "Pooling" bottom: "f_m" top: "f_m2" pooling_param { pool: MAX kernel_size: 1 } }
layer { name: "f_n" type: "Convolution" bottom: "f_m2" top: "f_n"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "g1" type: "Convolution" bottom: "f" top: "g1"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "g2" type: "Convolution" bottom: "f" top: "g2"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "h" type: "Concat" bottom: "g1" bottom: "g2" top: "h" }
layer { name: "i" type: "InnerProduct" bottom: "h" top: "i" inner_product_param { num_output: 3 } }
layer { name: "i_relu" type: "ReLU" bottom: "i" top: "i" }
layer { name: "j" type: "InnerProduct" bottom: "i" top: "j" inner_product_param { num_output: 2 } }
layer { name: "k" type: "InnerProduct" bottom: "j" top: "k" inner_product_param { num_output: 2 } }
"""


def test_pairs_need_a_weighted_producer_homogeneous_layers_and_one_reader(tmp_path):
    proto, weights = write_random_net(tmp_path, PATTERNS)
    net = parse_net(Path(proto).read_text())
    blobs = caffemodel_blobs(weights)
    quantized = {"a", "b", "c", "d", "e", "f", "f_m", "f_n", "g1", "g2", "i", "j", "k"}
    pairs = equalization_pairs(Graph(net), blobs, quantized)
    # a: reads the net input. b <- a through ReLU. c <- b through Sigmoid: no. d <- c through PReLU + ReLU
    # (not in place). e <- d directly, a grouped reader. f <- e (a grouped producer's outputs are still its
    # weight rows). f_m <- AVE Pooling: no. f_n <- f_m through ReLU and MAX Pooling. g1, g2: f's value has
    # three readers. i <- Concat: no producer with weights. j <- i through ReLU (in place). k <- j directly.
    assert pairs == [
        EqualizationPair("a", "b", "a", 4, ("a",)),
        EqualizationPair("c", "d", "c_r", 4, ("c", "c_p", "c_r")),
        EqualizationPair("d", "e", "d", 4, ("d",)),
        EqualizationPair("e", "f", "e", 4, ("e",)),
        EqualizationPair("f_m", "f_n", "f_m2", 2, ("f_m", "f_m2")),
        EqualizationPair("i", "j", "i", 3, ("i",)),
        EqualizationPair("j", "k", "j", 2, ("j",)),
    ]
    # a reader that is not quantized is no pair; a producer quantized per tensor is none either
    assert [p.consumer for p in equalization_pairs(Graph(net), blobs, {"b", "f"})] == ["b", "f"]
    per_tensor = equalization_pairs(Graph(net), blobs, quantized, {"a", "i"})
    assert [p.consumer for p in per_tensor] == ["d", "e", "f", "f_n", "k"]


def _forward(proto: str, weights: str, x: np.ndarray, top: str) -> np.ndarray:
    net = caffe.Net(proto, caffe.TEST, weights=weights)
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.forward(data=x)
    return net.blobs[top].data.copy()


def _saved(proto: str, weights: str, blobs: dict[str, list[np.ndarray]], path: Path) -> str:
    """A caffemodel of ``proto`` holding ``blobs`` (the other layers' weights from ``weights``)."""
    engine = caffe.Net(proto, caffe.TEST, weights=weights)
    for name, values in blobs.items():
        for i, value in enumerate(values):
            engine.params[name][i].data[...] = value.reshape(engine.params[name][i].data.shape)
    engine.save(path)
    return str(path)


def test_equalized_weights_by_hand_and_the_float_model_unchanged(tmp_path):
    proto, weights = write_random_net(tmp_path, NET, seed=4)
    net = parse_net(Path(proto).read_text())
    before = caffemodel_blobs(weights)
    graph = Graph(net)
    pairs = equalization_pairs(graph, before, {"conv1", "conv2", "ip"})
    assert [(p.producer, p.consumer) for p in pairs] == [("conv1", "conv2"), ("conv2", "ip")]
    rng = np.random.default_rng(0)
    scales = {"conv2": rng.uniform(1.0, 50.0, 6), "ip": rng.uniform(1.0, 50.0, 4)}
    after = equalize_weights(graph, before, pairs, scales)
    k1, k2 = scales["conv2"], scales["ip"]
    np.testing.assert_allclose(after["conv1"][0], before["conv1"][0] * k1[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(after["conv1"][1], before["conv1"][1] * k1, rtol=1e-6)
    conv2 = before["conv2"][0] * k2[:, None, None, None] / k1[None, :, None, None]
    np.testing.assert_allclose(after["conv2"][0], conv2, rtol=1e-6)
    np.testing.assert_allclose(after["conv2"][1], before["conv2"][1] * k2, rtol=1e-6)
    ip_in = np.repeat(1.0 / k2, 8 * 8)  # the InnerProduct reads 4 channels x 64 positions
    np.testing.assert_allclose(after["ip"][0], before["ip"][0] * ip_in[None, :], rtol=1e-6)
    np.testing.assert_array_equal(after["ip"][1], before["ip"][1])
    np.testing.assert_array_equal(after["prelu1"][0], before["prelu1"][0])

    equalized = _saved(proto, weights, after, tmp_path / "equalized.caffemodel")
    x = rng.uniform(-1.0, 1.0, (4, 3, 8, 8)).astype(np.float32)
    ref = _forward(proto, weights, x, "ip")
    np.testing.assert_allclose(_forward(proto, equalized, x, "ip"), ref, rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())


def test_every_pattern_keeps_the_float_model(tmp_path):
    # Deconvolution producer, grouped reader, PReLU + ReLU not in place, ReLU + MAX Pooling, InnerProducts
    proto, weights = write_random_net(tmp_path, PATTERNS, seed=5)
    graph = Graph(parse_net(Path(proto).read_text()))
    before = caffemodel_blobs(weights)
    pairs = equalization_pairs(graph, before, {"b", "d", "e", "f", "f_n", "j", "k"})
    assert len(pairs) == 7
    rng = np.random.default_rng(1)
    scales = {p.consumer: rng.uniform(1.0, 30.0, p.channels) for p in pairs}
    after = equalize_weights(graph, before, pairs, scales)
    k = scales["e"]  # e reads d's 4 channels in 2 groups of 2: row o reads channels 2 * (o // 2) + j
    expected = np.stack([before["e"][0][o] / k[2 * (o // 2):2 * (o // 2) + 2, None, None] for o in range(4)])
    np.testing.assert_allclose(after["e"][0] / scales["f"][:, None, None, None], expected, rtol=1e-6)
    equalized = _saved(proto, weights, after, tmp_path / "equalized.caffemodel")
    x = rng.uniform(-1.0, 1.0, (1, 4, 6, 6)).astype(np.float32)
    for top in ("k", "f_n"):
        ref = _forward(proto, weights, x, top)
        np.testing.assert_allclose(_forward(proto, equalized, x, top), ref, rtol=1e-4,
                                   atol=1e-5 * np.abs(ref).max())


# -- the flow on an unbalanced net ---------------------------------------------------------------------------
def _unbalanced_net(folder: Path) -> tuple[str, str]:
    proto, weights = write_random_net(folder, NET, seed=7)
    net = caffe.Net(proto, caffe.TEST, weights=weights)
    net.params["conv1"][0].data[...] *= SHRINK[:, None, None, None]
    net.params["conv1"][1].data[...] *= SHRINK
    net.params["conv2"][0].data[...] /= SHRINK[None, :, None, None]
    unbalanced = str(folder / "unbalanced.caffemodel")
    net.save(unbalanced)
    return proto, unbalanced


def _save(proto: str, weights: str, folder: Path, data: list[dict[str, np.ndarray]], refine=None) -> str:
    graph = calibrated_graph(proto, weights, folder, data)
    record = folder / "record.txt"
    prefix = str(folder / "out" / "model")
    amct.save_model(graph, "Both", prefix + "_plain")
    record_bytes = Path(record).read_bytes()
    if refine is not None:
        amct.save_model(graph, "Both", prefix, refine=refine, calibration_data=data)
        assert Path(record).read_bytes() == record_bytes  # the record keeps the calibration's factors
        amct.save_model(graph, "Both", prefix + "_plain_again")
    return prefix


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unbalanced")
    proto, weights = _unbalanced_net(folder)
    rng = np.random.default_rng(11)
    data = [{"data": rng.uniform(-1.0, 1.0, (4, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    prefix = _save(proto, weights, folder / "eq", data, "equalization")
    return proto, weights, data, prefix


def _layout(path: str) -> list[tuple]:
    """The layers' names, types, bottoms and tops (the Quant layers' factors left out)."""
    net = parse_net(Path(path).read_text())
    return [(layer.name, layer.type, list(layer.bottom), list(layer.top)) for layer in net.layer]


def test_equalization_keeps_the_structure_and_lists_the_pairs(unbalanced):
    *_, prefix = unbalanced
    for suffix in ("_fake_quant_model.prototxt", "_deploy_model.prototxt"):
        assert _layout(prefix + suffix) == _layout(prefix + "_plain" + suffix), suffix
    info = json.loads(Path(prefix + "_quant.json").read_text())
    pairs = info["equalizations"]
    assert [(p["producer"], p["consumer"], p["blob"], p["blobs"]) for p in pairs] == [
        ("conv1", "conv2", "conv1", ["conv1"]), ("conv2", "ip", "relu2", ["conv2", "relu2"])]
    k1 = np.array(pairs[0]["scales"])
    assert np.all(k1 >= 1.0) and k1.max() > 10.0, k1  # the shrunk channels grow back
    assert "equalizations" not in json.loads(Path(prefix + "_plain_quant.json").read_text())


def test_a_plain_save_after_an_equalized_one_is_the_plain_save(unbalanced):
    *_, prefix = unbalanced
    for suffix in ("_fake_quant_weights.caffemodel", "_deploy_weights.caffemodel", "_quant.json"):
        again, plain = Path(prefix + "_plain_again" + suffix), Path(prefix + "_plain" + suffix)
        assert again.read_bytes() == plain.read_bytes(), suffix


def _quant_factors(prefix: str) -> dict[str, tuple[float, int]]:
    net = parse_net(Path(prefix + "_fake_quant_model.prototxt").read_text())
    return {layer.bottom[0]: (1.0 / float(np.float32(layer.quant_param.scale)),
                              int(np.frombuffer(layer.quant_param.offset[:1], np.int8)[0]))
            for layer in net.layer if layer.type == "Quant"}


def test_the_rescaled_input_is_calibrated_again_by_ifmr(unbalanced):
    proto, weights, data, prefix = unbalanced
    k1 = np.array(json.loads(Path(prefix + "_quant.json").read_text())["equalizations"][0]["scales"])
    x = [_forward(proto, weights, batch["data"], "conv1") for batch in data]  # after the in-place PReLU
    rescaled = [torch.from_numpy((v.astype(np.float64) * k1[None, :, None, None]).astype(np.float32))
                for v in x]
    s, o, _ = ifmr_exact(rescaled)
    scale_d, offset_d = _quant_factors(prefix)["conv1"]
    assert scale_d == pytest.approx(float(s), rel=1e-5)
    assert offset_d == int(o)
    plain_scale, _ = _quant_factors(prefix + "_plain")["conv1"]
    assert scale_d == pytest.approx(plain_scale, rel=0.05)  # the tensor's range stays what it was


def test_equalization_gives_the_narrow_channels_their_precision_back(unbalanced):
    proto, weights, data, prefix = unbalanced
    rng = np.random.default_rng(12)
    held_out = rng.uniform(-1.0, 1.0, (4, 3, 8, 8)).astype(np.float32)
    errors = {}
    for x_name, x in (("calibration", data[0]["data"]), ("held out", held_out)):
        ref = _forward(proto, weights, x, "ip").astype(np.float64)
        for key, p in (("plain", prefix + "_plain"), ("equalized", prefix)):
            fake = _forward(p + "_fake_quant_model.prototxt", p + "_fake_quant_weights.caffemodel", x, "ip")
            deploy = _forward(p + "_deploy_model.prototxt", p + "_deploy_weights.caffemodel", x, "ip")
            errors[x_name, key] = float(np.sqrt(np.mean((fake - ref) ** 2)))
            # deploy and fake-quant agree (the deploy model holds the same equalized factors)
            np.testing.assert_allclose(deploy, fake, atol=1e-5 * np.abs(ref).max())
        # measured: RMSE 0.086 -> 0.0095 on the calibration batch, 0.098 -> 0.0126 held out
        assert errors[x_name, "equalized"] < 0.25 * errors[x_name, "plain"], errors


def test_equalization_with_a_weight_refinement_after_it(unbalanced, tmp_path):
    proto, weights, data, _ = unbalanced
    prefix = _save(proto, weights, tmp_path, data, ["end_to_end", "equalization"])  # any order
    assert "equalizations" in json.loads(Path(prefix + "_quant.json").read_text())
    x = data[0]["data"]
    ref = _forward(proto, weights, x, "ip").astype(np.float64)
    err = {p: float(np.sqrt(np.mean((_forward(p + "_fake_quant_model.prototxt",
                                               p + "_fake_quant_weights.caffemodel", x, "ip") - ref) ** 2)))
           for p in (prefix, prefix + "_plain")}
    assert err[prefix] < 0.1 * err[prefix + "_plain"], err  # measured: 0.086 -> 0.0032


def test_no_pair_saves_the_plain_models(tmp_path):
    text = """
name: "flat"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "sig" type: "Sigmoid" bottom: "conv" top: "sig" }
layer { name: "ip" type: "InnerProduct" bottom: "sig" top: "ip" inner_product_param { num_output: 3 } }
"""
    proto, weights = write_random_net(tmp_path, text, seed=2)
    data = [{"data": np.random.default_rng(3).uniform(-1, 1, (2, 3, 6, 6)).astype(np.float32)}]
    prefix = _save(proto, weights, tmp_path / "q", data, "equalization")
    for suffix in ("_fake_quant_weights.caffemodel", "_deploy_weights.caffemodel", "_quant.json"):
        assert Path(prefix + suffix).read_bytes() == Path(prefix + "_plain" + suffix).read_bytes(), suffix


def test_calibration_data_with_nan_is_a_named_error_and_writes_nothing(unbalanced, tmp_path):
    proto, weights, data, _ = unbalanced
    graph = calibrated_graph(proto, weights, tmp_path / "q", data)
    bad = [{"data": batch["data"].copy()} for batch in data]
    bad[1]["data"][0, 0, 0, 0] = np.nan
    with pytest.raises(QuantDataError, match=r"calibration_data gives inf or NaN.*\['conv2', 'ip'\]"):
        amct.save_model(graph, "Both", str(tmp_path / "out" / "m"), refine="equalization",
                        calibration_data=bad)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("refine, message", [
    (["adaround", "end_to_end"], "at most one of"),
    (["equalization", "equalization"], "refine must be None"),
    ("equalize", "refine must be None"),
    ({"equalization"}, "refine must be None"),
    ([], "refine must be None"),
])
def test_bad_refine_lists_are_refused_before_anything_is_written(unbalanced, tmp_path, refine, message):
    proto, weights, data, _ = unbalanced
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, proto, weights)
    graph = amct.init(config, proto, weights, record)
    with pytest.raises(ConfigError, match=message):
        amct.save_model(graph, "Both", str(tmp_path / "out" / "m"), refine=refine, calibration_data=data)
    with pytest.raises(ConfigError, match="calibration_data"):
        amct.save_model(graph, "Both", str(tmp_path / "out" / "m"), refine=["equalization"])
    assert not (tmp_path / "out").exists()


# -- the report on equalized models -------------------------------------------------------------------------
def _cosines(result) -> dict[str, float]:
    return {layer.blob: layer.metrics["float_vs_fake"].cosine for layer in result.layers}


def test_the_report_divides_the_equalization_out_of_the_float_reference(unbalanced):
    proto, weights, data, prefix = unbalanced
    from amct_caffe.analysis.collect import read_equalizations
    from amct_caffe.analysis.report import compare_report

    files = (prefix + "_fake_quant_model.prototxt", prefix + "_fake_quant_weights.caffemodel",
             prefix + "_deploy_model.prototxt", prefix + "_deploy_weights.caffemodel")
    scales = read_equalizations(prefix + "_quant.json")
    assert sorted(scales) == ["conv1", "conv2", "relu2"]
    inputs = {"data": data[0]["data"]}
    raw = _cosines(compare_report(proto, weights, *files, inputs=inputs, progress=False))
    fixed = _cosines(compare_report(proto, weights, *files, inputs=inputs, progress=False,
                                    equalizations=scales))
    # conv1's channels carry k_c up to ~45 in the saved models: compared as they are, they disagree
    assert raw["conv1"] < 0.9 < 0.999 < fixed["conv1"], (raw, fixed)
    assert fixed["ip"] == pytest.approx(raw["ip"])  # the output is not rescaled


def test_compare_command_finds_the_quant_info_beside_the_fake_quant_model(unbalanced, tmp_path, capsys):
    proto, weights, data, prefix = unbalanced
    from amct_caffe import cli

    np.save(tmp_path / "x.npy", data[0]["data"])
    args = ["compare", "--float-model", proto, "--float-weights", weights,
            "--fake-model", prefix + "_fake_quant_model.prototxt",
            "--fake-weights", prefix + "_fake_quant_weights.caffemodel",
            "--input", f"data={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "report")]
    assert cli.main(args) == 0
    assert "3 blob(s) scaled per channel" in capsys.readouterr().out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    conv1 = next(layer for layer in report["layers"] if layer["blob"] == "conv1")
    assert conv1["float_vs_fake"]["cosine"] > 0.999, conv1
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert cli.main([*args, "--quant-info", str(tmp_path / "bad.json")]) != 0
    assert "cannot be read" in capsys.readouterr().err
