"""Fidelity of post-training quantization on a real super-resolution net, and the opt-in bias correction.

FSRCNN (the sibling shared/models/fsrcnn, trained weights; x3 upscaling of the luma channel in [0, 1]) on
scikit-learn's two sample photos: the Y channel (ITU-R BT.601, ``16 + 65.481 R + 128.553 G + 24.966 B``
over 255, as MATLAB's ``rgb2ycbcr``), cropped to a multiple of 3 (HR) and averaged over 3x3 blocks (LR).
The net's ``3H - 2`` output lines up with the HR image shifted by 2 pixels (measured: the float PSNR peaks
there); PSNR is taken on that overlap with a 6-pixel border shaved, output clipped to [0, 1].

PTQ (IFMR activations + ARQ weights, calibrated on the two LR images) loses at most 0.5 dB. The bias
correction of ``save_model(..., refine="bias_correction")`` does not bring it to 0.2 dB on this net
(measured: china 0.063 -> 0.063 dB, flower 0.407 -> 0.434 dB: the loss is noise, not a mean shift); the
test keeps it within the same 0.5 dB.
Learned weight rounding (``refine="adaround"``) lowers the loss (measured: china 0.063 -> 0.040 dB,
flower 0.407 -> 0.320 dB) but not to 0.2 dB on flower: quantizing only the activations, with float weights,
already costs 0.280 dB there (docs/design.md, "Post-training refinement"), so the flower case of the 0.2 dB
target is a strict xfail. End-to-end learned codes and biases (``refine="end_to_end"``, the whole fake-quant
model in the loop) lower it further (measured: china 0.063 -> 0.021 dB, flower 0.407 -> 0.288 dB), still not
to 0.2 dB on flower (a strict xfail too); on a small net its saved codes and biases are checked against a
numpy forward of the fake-quant net. Cross-layer range equalization before it
(``refine=["equalization", "end_to_end"]``) removes most of the activation rounding noise that is left
(measured: china 0.010 dB, flower 0.153 dB; refined on china alone, flower still 0.157 dB), so the 0.2 dB
target holds on both photos and on the photo the refinement never saw.
The correction itself is checked on a small net: the structure is unchanged, the deploy bias is the
rounded corrected bias, and the corrected layer's mean output error on the calibration data is below half
its bias quantization step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import amct, caffe
from amct_caffe.errors import ConfigError
from tests.helpers import caffemodel_blobs, read_record
from tests.ptq_helpers import calibrated_graph
from tests.references import refine as refine_ref
from tests.references.nets import write_random_net
from tests.references.real_caffe import SHARED

FSRCNN = SHARED / "models" / "fsrcnn"
SCALE = 3
OFFSET = 2
SHAVE = 6
MAX_LOSS_DB = 0.5
#: the target of a post-training refinement beyond AMCT's algorithms
MAX_REFINED_LOSS_DB = 0.2


def psnr(ref: np.ndarray, x: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((np.asarray(ref, np.float64) - np.asarray(x, np.float64)) ** 2))
    return 10.0 * np.log10(1.0 / mse)


def luma(rgb: np.ndarray) -> np.ndarray:
    v = rgb.astype(np.float64) / 255.0
    return (16.0 + 65.481 * v[..., 0] + 128.553 * v[..., 1] + 24.966 * v[..., 2]) / 255.0


def hr_lr(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = luma(rgb)
    h, w = y.shape[0] // SCALE * SCALE, y.shape[1] // SCALE * SCALE
    hr = y[:h, :w]
    return hr, hr.reshape(h // SCALE, SCALE, w // SCALE, SCALE).mean(axis=(1, 3))


def super_resolve(model: str, weights: str, lr: np.ndarray) -> np.ndarray:
    net = caffe.Net(model, caffe.TEST, weights=weights)
    net.blobs["data"].reshape(1, 1, *lr.shape)
    net.reshape()
    return net.forward(data=lr[None, None].astype(np.float32))["deconv"][0, 0]


def sr_psnr(sr: np.ndarray, hr: np.ndarray) -> float:
    h, w = sr.shape
    ref = hr[OFFSET:OFFSET + h, OFFSET:OFFSET + w]
    h, w = ref.shape
    cut = (slice(SHAVE, h - SHAVE), slice(SHAVE, w - SHAVE))
    return psnr(ref[cut], np.clip(sr[:h, :w], 0.0, 1.0)[cut])


def run_ptq(proto: str, weights: str, folder: Path, data: list[dict[str, np.ndarray]],
            refine: str | list[str] | None = None) -> str:
    graph = calibrated_graph(proto, weights, folder, data)
    prefix = str(folder / "out" / "model")
    if refine is None:
        amct.save_model(graph, "Both", prefix)
    else:
        amct.save_model(graph, "Both", prefix, refine=refine, calibration_data=data)
    return prefix


@pytest.fixture(scope="module")
def fsrcnn_case():
    """FSRCNN's files, the two photos as ``{name: (HR, LR)}`` and the LR images as calibration batches."""
    if not FSRCNN.is_dir():
        pytest.skip("the sibling shared/models is not present")
    datasets = pytest.importorskip("sklearn.datasets", reason="the sample photos come from scikit-learn")
    photos = datasets.load_sample_images()
    images = {Path(name).stem: hr_lr(rgb) for name, rgb in zip(photos.filenames, photos.images)}
    proto, weights = str(FSRCNN / "FSRCNN_mat.prototxt"), str(FSRCNN / "snapshot_iter_2546000.caffemodel")
    data = [{"data": lr[None, None].astype(np.float32)} for _, lr in images.values()]
    return proto, weights, images, data


def psnr_rows(images: dict[str, tuple[np.ndarray, np.ndarray]],
              prefixes: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per photo, the PSNR of each saved model pair: ``key`` (fake-quant) and ``key_deploy``."""
    rows: dict[str, dict[str, float]] = {}
    for name, (hr, lr) in images.items():
        row = rows.setdefault(name, {})
        for key, prefix in prefixes.items():
            row[key] = sr_psnr(super_resolve(prefix + "_fake_quant_model.prototxt",
                                             prefix + "_fake_quant_weights.caffemodel", lr), hr)
            row[key + "_deploy"] = sr_psnr(super_resolve(prefix + "_deploy_model.prototxt",
                                                         prefix + "_deploy_weights.caffemodel", lr), hr)
    return rows


def refined_rows(case, base_rows: dict[str, dict[str, float]], folder: Path, refine: str,
                 key: str) -> dict[str, dict[str, float]]:
    """``base_rows`` plus the PSNR of the models saved with ``refine`` (under ``key``)."""
    proto, weights, images, data = case
    rows = psnr_rows(images, {key: run_ptq(proto, weights, folder, data, refine)})
    return {name: {**base_rows[name], **row} for name, row in rows.items()}


@pytest.fixture(scope="module")
def fsrcnn_psnr(fsrcnn_case, tmp_path_factory):
    proto, weights, images, data = fsrcnn_case
    prefixes = {}
    for refine in (None, "bias_correction"):
        key = refine or "ptq"
        prefixes[key] = run_ptq(proto, weights, tmp_path_factory.mktemp(key), data, refine)
    results = psnr_rows(images, prefixes)
    for name, (hr, lr) in images.items():
        results[name]["float"] = sr_psnr(super_resolve(proto, weights, lr), hr)
    return results


def test_fsrcnn_float_beats_pixel_repetition(fsrcnn_psnr):
    # the preprocessing and alignment are right: the float net is a real super-resolution of these images
    assert fsrcnn_psnr["china"]["float"] > 22.5 and fsrcnn_psnr["flower"]["float"] > 32.5, fsrcnn_psnr


@pytest.mark.parametrize("image", ["china", "flower"])
def test_fsrcnn_ptq_loses_at_most_half_a_db(fsrcnn_psnr, image):
    row = fsrcnn_psnr[image]
    assert row["float"] - row["ptq"] <= MAX_LOSS_DB, row
    assert abs(row["ptq_deploy"] - row["ptq"]) <= 0.01, row


@pytest.mark.parametrize("image", ["china", "flower"])
def test_fsrcnn_bias_correction_stays_within_half_a_db(fsrcnn_psnr, image):
    row = fsrcnn_psnr[image]
    assert row["float"] - row["bias_correction"] <= MAX_LOSS_DB, row
    assert abs(row["bias_correction_deploy"] - row["bias_correction"]) <= 0.01, row


@pytest.fixture(scope="module")
def fsrcnn_adaround(fsrcnn_case, fsrcnn_psnr, tmp_path_factory):
    return refined_rows(fsrcnn_case, fsrcnn_psnr, tmp_path_factory.mktemp("adaround"), "adaround", "adaround")


@pytest.mark.slow
@pytest.mark.parametrize("image", ["china", "flower"])
def test_fsrcnn_adaround_loses_less_than_ptq(fsrcnn_adaround, image):
    # measured: china 0.063 -> 0.040 dB, flower 0.407 -> 0.320 dB
    row = fsrcnn_adaround[image]
    assert row["float"] - row["adaround"] < row["float"] - row["ptq"], row
    assert abs(row["adaround_deploy"] - row["adaround"]) <= 0.01, row


@pytest.mark.slow
@pytest.mark.parametrize("image", [
    "china",
    pytest.param("flower", marks=pytest.mark.xfail(
        strict=True, reason="measured 0.320 dB: the activation rounding alone (float weights) costs 0.280 dB "
        "on this image, which no choice of weight codes layer by layer removes (docs/design.md)")),
])
def test_fsrcnn_adaround_loses_at_most_a_fifth_of_a_db(fsrcnn_adaround, image):
    row = fsrcnn_adaround[image]
    assert row["float"] - row["adaround"] <= MAX_REFINED_LOSS_DB, row


@pytest.fixture(scope="module")
def fsrcnn_end_to_end(fsrcnn_case, fsrcnn_psnr, tmp_path_factory):
    return refined_rows(fsrcnn_case, fsrcnn_psnr, tmp_path_factory.mktemp("end_to_end"), "end_to_end", "e2e")


@pytest.mark.slow
@pytest.mark.parametrize("image", ["china", "flower"])
def test_fsrcnn_end_to_end_loses_less_than_ptq_and_deploy_agrees(fsrcnn_end_to_end, image):
    # measured: see the module docstring
    row = fsrcnn_end_to_end[image]
    assert row["float"] - row["e2e"] < row["float"] - row["ptq"], row
    assert abs(row["e2e_deploy"] - row["e2e"]) <= 0.01, row


@pytest.mark.slow
@pytest.mark.parametrize("image", [
    "china",
    pytest.param("flower", marks=pytest.mark.xfail(
        strict=True, reason="measured 0.288 dB: what is left is the rounding noise of the 8-bit activations "
        "(the Deconvolution's input alone about 0.1 dB), which the weight codes and biases only partly "
        "compensate (docs/design.md)")),
])
def test_fsrcnn_end_to_end_loses_at_most_a_fifth_of_a_db(fsrcnn_end_to_end, image):
    row = fsrcnn_end_to_end[image]
    assert row["float"] - row["e2e"] <= MAX_REFINED_LOSS_DB, row


def _equalized_rows(case, base_rows, folder: Path, calibration: list[str]) -> dict[str, dict[str, float]]:
    """``base_rows`` plus the models saved with equalization and end-to-end refinement, both refined (and
    calibrated) on the photos ``calibration`` only."""
    proto, weights, images, data = case
    chosen = [batch for name, batch in zip(images, data) if name in calibration]
    prefix = run_ptq(proto, weights, folder, chosen, ["equalization", "end_to_end"])
    rows = psnr_rows(images, {"eq": prefix})
    return {name: {**base_rows[name], **row} for name, row in rows.items()}


@pytest.fixture(scope="module")
def fsrcnn_equalized(fsrcnn_case, fsrcnn_psnr, tmp_path_factory):
    folder = tmp_path_factory.mktemp("equalized")
    return _equalized_rows(fsrcnn_case, fsrcnn_psnr, folder, ["china", "flower"])


@pytest.mark.slow
@pytest.mark.parametrize("image", ["china", "flower"])
def test_fsrcnn_equalized_end_to_end_loses_at_most_a_fifth_of_a_db(fsrcnn_equalized, image):
    # measured: china 0.010 dB, flower 0.153 dB
    row = fsrcnn_equalized[image]
    assert row["float"] - row["eq"] <= MAX_REFINED_LOSS_DB, row
    assert abs(row["eq_deploy"] - row["eq"]) <= 0.01, row


@pytest.mark.slow
def test_fsrcnn_equalized_end_to_end_holds_on_a_photo_it_never_saw(fsrcnn_case, fsrcnn_psnr, tmp_path):
    # calibrated, equalized and refined on china only; measured on flower: 0.157 dB
    row = _equalized_rows(fsrcnn_case, fsrcnn_psnr, tmp_path, ["china"])["flower"]
    assert row["float"] - row["eq"] <= MAX_REFINED_LOSS_DB, row
    assert abs(row["eq_deploy"] - row["eq"]) <= 0.01, row


# -- the bias correction on a small net ----------------------------------------------------------------------
TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 3 kernel_size: 3 bias_term: false } }
layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip" inner_product_param { num_output: 5 } }
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    proto, weights = write_random_net(folder, TINY, seed=3)
    rng = np.random.default_rng(5)
    data = [{"data": rng.uniform(-1.0, 1.0, (4, 3, 6, 6)).astype(np.float32)} for _ in range(2)]
    plain = run_ptq(proto, weights, folder / "plain", data)
    refined = run_ptq(proto, weights, folder / "refined", data, "bias_correction")
    return proto, weights, data, plain, refined, folder


def test_bias_correction_keeps_the_structure(tiny):
    *_, plain, refined, _ = tiny
    for suffix in ("_fake_quant_model.prototxt", "_deploy_model.prototxt", "_quant.json"):
        assert Path(refined + suffix).read_text() == Path(plain + suffix).read_text(), suffix
    a, b = caffemodel_blobs(plain + "_deploy_weights.caffemodel"), caffemodel_blobs(
        refined + "_deploy_weights.caffemodel")
    assert {k: [v.shape for v in vs] for k, vs in a.items()} == \
        {k: [v.shape for v in vs] for k, vs in b.items()}
    for name in ("conv1", "conv2", "ip"):
        np.testing.assert_array_equal(a[name][0], b[name][0])  # same INT8 weights
    assert len(b["conv2"]) == 1  # bias_term: false stays without a bias
    assert not np.array_equal(a["ip"][1], b["ip"][1])


def test_bias_correction_deploy_bias_is_the_rounded_fake_bias(tiny):
    *_, refined, folder = tiny
    record = read_record(folder / "refined" / "record.txt")
    fake = caffemodel_blobs(refined + "_fake_quant_weights.caffemodel")
    deploy = caffemodel_blobs(refined + "_deploy_weights.caffemodel")
    for name in ("conv1", "ip"):
        step = np.float64(record[name].scale_d) * np.asarray(record[name].scale_w, np.float64)
        codes = deploy[name][1].astype(np.float64)
        assert np.all(codes == np.round(codes))
        np.testing.assert_allclose(fake[name][1], codes * step, rtol=1e-6, atol=1e-12)


def test_bias_correction_removes_the_mean_error_of_the_last_layer(tiny):
    proto, weights, data, plain, refined, folder = tiny
    x = np.concatenate([batch["data"] for batch in data])
    float_net = caffe.Net(proto, caffe.TEST, weights=weights)
    float_net.blobs["data"].reshape(*x.shape)
    float_net.reshape()
    ref = float_net.forward(data=x)["ip"].astype(np.float64)
    record = read_record(folder / "refined" / "record.txt")
    half_step = 0.5 * np.float64(record["ip"].scale_d) * np.asarray(record["ip"].scale_w, np.float64)
    errors = {}
    for key, prefix in (("plain", plain), ("refined", refined)):
        net = caffe.Net(prefix + "_fake_quant_model.prototxt", caffe.TEST,
                        weights=prefix + "_fake_quant_weights.caffemodel")
        net.blobs["data"].reshape(*x.shape)
        net.reshape()
        errors[key] = np.mean(ref - net.forward(data=x)["ip"].astype(np.float64), axis=0)
    assert np.all(np.abs(errors["refined"]) <= half_step * (1 + 1e-4) + 1e-6), (errors, half_step)
    assert np.abs(errors["refined"]).sum() < np.abs(errors["plain"]).sum(), errors
    info = json.loads(Path(refined + "_quant.json").read_text())
    assert [e["layer"] for e in info["quantized_layers"]] == ["conv1", "conv2", "ip"]


def test_refine_needs_calibration_data_and_a_known_name(tiny, tmp_path):
    proto, weights, data, *_ = tiny
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, proto, weights)
    graph = amct.init(config, proto, weights, record)
    with pytest.raises(ConfigError, match="calibration_data"):
        amct.save_model(graph, "Both", str(tmp_path / "m"), refine="bias_correction")
    with pytest.raises(ConfigError, match="refine must be None"):
        amct.save_model(graph, "Both", str(tmp_path / "m"), refine="ada_round", calibration_data=data)
    with pytest.raises(ConfigError, match="calibration_data"):
        amct.save_model(graph, "Both", str(tmp_path / "m"), refine="adaround")
    with pytest.raises(ConfigError, match="calibration_data"):
        amct.save_model(graph, "Both", str(tmp_path / "m"), refine="end_to_end")


# -- learned rounding on the small net ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_rounded(tiny):
    proto, weights, data, plain, _, folder = tiny
    return run_ptq(proto, weights, folder / "rounded", data, "adaround")


def test_adaround_keeps_the_structure_scales_and_biases(tiny, tiny_rounded):
    *_, plain, _, _ = tiny
    for suffix in ("_fake_quant_model.prototxt", "_deploy_model.prototxt", "_quant.json"):
        assert Path(tiny_rounded + suffix).read_text() == Path(plain + suffix).read_text(), suffix
    a, b = caffemodel_blobs(plain + "_deploy_weights.caffemodel"), caffemodel_blobs(
        tiny_rounded + "_deploy_weights.caffemodel")
    assert list(a) == list(b)
    for name in a:
        assert [v.shape for v in a[name]] == [v.shape for v in b[name]], name
        for i in range(1, len(a[name])):  # biases, DeQuant's deq_scale words: unchanged
            np.testing.assert_array_equal(a[name][i], b[name][i])


def test_adaround_codes_are_floor_or_ceil_on_the_arq_grid(tiny, tiny_rounded):
    _, weights, _, _, _, folder = tiny
    record = read_record(folder / "rounded" / "record.txt")
    float_blobs = caffemodel_blobs(weights)
    deploy = caffemodel_blobs(tiny_rounded + "_deploy_weights.caffemodel")
    fake = caffemodel_blobs(tiny_rounded + "_fake_quant_weights.caffemodel")
    changed = 0
    for name in ("conv1", "conv2", "ip"):
        w = float_blobs[name][0].astype(np.float64)
        s_w = np.asarray(record[name].scale_w, np.float64).reshape([-1] + [1] * (w.ndim - 1))
        codes = deploy[name][0].astype(np.float64)
        ratio = w / s_w
        assert np.all((codes == np.floor(ratio)) | (codes == np.ceil(ratio))), name
        assert codes.min() >= -128 and codes.max() <= 127
        np.testing.assert_allclose(fake[name][0], codes * s_w, rtol=1e-6, atol=0)
        nearest = np.where(np.abs(ratio - np.trunc(ratio)) >= 0.5, np.trunc(ratio) + np.sign(ratio),
                           np.trunc(ratio))
        changed += int(np.sum(codes != nearest))
    assert changed > 0  # the rounding was learned, not ARQ's nearest everywhere


def test_adaround_lowers_the_last_layer_output_error(tiny, tiny_rounded):
    # numpy: the InnerProduct on its fake-quantized input, with the learned and with ARQ's nearest codes,
    # against the float model's output of that layer
    proto, weights, data, _, _, folder = tiny
    x = np.concatenate([batch["data"] for batch in data])
    float_net = caffe.Net(proto, caffe.TEST, weights=weights)
    float_net.blobs["data"].reshape(*x.shape)
    float_net.reshape()
    ref = float_net.forward(data=x)["ip"].astype(np.float64)
    fake = caffe.Net(tiny_rounded + "_fake_quant_model.prototxt", caffe.TEST,
                     weights=tiny_rounded + "_fake_quant_weights.caffemodel")
    fake.blobs["data"].reshape(*x.shape)
    fake.reshape()
    fake.forward(data=x)
    x_q = np.asarray(fake.blobs["ip_quant_layer"].data, np.float64).reshape(len(x), -1)
    record = read_record(folder / "rounded" / "record.txt")
    s_w = np.asarray(record["ip"].scale_w, np.float64)[:, None]
    w = caffemodel_blobs(weights)["ip"][0].astype(np.float64)
    bias = caffemodel_blobs(tiny_rounded + "_fake_quant_weights.caffemodel")["ip"][1].astype(np.float64)
    learned = caffemodel_blobs(tiny_rounded + "_deploy_weights.caffemodel")["ip"][0].astype(np.float64)
    ratio = w / s_w
    nearest = np.clip(np.where(np.abs(ratio - np.trunc(ratio)) >= 0.5, np.trunc(ratio) + np.sign(ratio),
                               np.trunc(ratio)), -128, 127)
    errors = {key: float(np.mean((x_q @ (codes * s_w).T + bias - ref) ** 2))
              for key, codes in (("nearest", nearest), ("learned", learned))}
    assert errors["learned"] <= errors["nearest"] * (1 + 1e-6), errors


# -- end-to-end learned codes on the small net --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_e2e(tiny):
    proto, weights, data, plain, _, folder = tiny
    return run_ptq(proto, weights, folder / "e2e", data, "end_to_end")


def _record_factors(folder: Path) -> dict[str, tuple[float, int]]:
    record = read_record(folder / "record.txt")
    return {name: (float(rec.scale_d), int(rec.offset_d)) for name, rec in record.items()}


def test_end_to_end_keeps_the_structure_scales_and_dequant_words(tiny, tiny_e2e):
    *_, plain, _, _ = tiny
    for suffix in ("_fake_quant_model.prototxt", "_deploy_model.prototxt", "_quant.json"):
        assert Path(tiny_e2e + suffix).read_text() == Path(plain + suffix).read_text(), suffix
    a, b = caffemodel_blobs(plain + "_deploy_weights.caffemodel"), caffemodel_blobs(
        tiny_e2e + "_deploy_weights.caffemodel")
    assert list(a) == list(b)
    for name in a:
        assert [(v.shape, v.dtype) for v in a[name]] == [(v.shape, v.dtype) for v in b[name]], name
        if name not in ("conv1", "conv2", "ip"):  # Quant/DeQuant: the same factors, deq_scale words
            for x, y in zip(a[name], b[name]):
                np.testing.assert_array_equal(x, y)
    assert len(b["conv2"]) == 1  # bias_term: false stays without a bias


def test_end_to_end_codes_and_biases_are_on_the_record_grids(tiny, tiny_e2e):
    *_, folder = tiny
    record = read_record(folder / "e2e" / "record.txt")
    fake = caffemodel_blobs(tiny_e2e + "_fake_quant_weights.caffemodel")
    deploy = caffemodel_blobs(tiny_e2e + "_deploy_weights.caffemodel")
    for name in ("conv1", "conv2", "ip"):
        w = deploy[name][0]
        s_w = np.asarray(record[name].scale_w, np.float64).reshape([-1] + [1] * (w.ndim - 1))
        assert w.min() >= -128 and w.max() <= 127
        np.testing.assert_allclose(fake[name][0], w.astype(np.float64) * s_w, rtol=1e-6, atol=0)
    for name in ("conv1", "ip"):
        step = np.float64(record[name].scale_d) * np.asarray(record[name].scale_w, np.float64)
        codes = deploy[name][1].astype(np.float64)
        np.testing.assert_allclose(fake[name][1], codes * step, rtol=1e-6, atol=1e-12)


def test_end_to_end_lowers_the_output_error_of_the_fake_quant_model(tiny, tiny_e2e):
    # numpy: the small net fake-quantized with the record's factors, with the saved codes and biases of the
    # plain and the refined deploy model, against the float model
    proto, weights, data, plain, _, folder = tiny
    x = np.concatenate([batch["data"] for batch in data]).astype(np.float64)
    factors = _record_factors(folder / "e2e")
    assert factors == _record_factors(folder / "plain")
    ref = refine_ref.tiny_forward(x, caffemodel_blobs(weights))
    record = read_record(folder / "e2e" / "record.txt")
    errors = {}
    for key, prefix in (("plain", plain), ("refined", tiny_e2e)):
        deploy = caffemodel_blobs(prefix + "_deploy_weights.caffemodel")
        blobs = {}
        for name in ("conv1", "conv2", "ip"):
            w = deploy[name][0].astype(np.float64)
            s_w = np.asarray(record[name].scale_w, np.float64)
            blobs[name] = [w * s_w.reshape([-1] + [1] * (w.ndim - 1))]
            if len(deploy[name]) > 1:
                blobs[name].append(deploy[name][1] * np.float64(record[name].scale_d) * s_w)
        errors[key] = float(np.mean((refine_ref.tiny_forward(x, blobs, factors) - ref) ** 2))
        # the engine's fake-quant model computes the same
        net = caffe.Net(prefix + "_fake_quant_model.prototxt", caffe.TEST,
                        weights=prefix + "_fake_quant_weights.caffemodel")
        net.blobs["data"].reshape(*x.shape)
        net.reshape()
        out = net.forward(data=x.astype(np.float32))["ip"]
        np.testing.assert_allclose(out, refine_ref.tiny_forward(x, blobs, factors), rtol=1e-4, atol=1e-4)
    assert errors["refined"] < 0.9 * errors["plain"], errors


def test_end_to_end_is_deterministic(tiny, tiny_e2e):
    proto, weights, data, _, _, folder = tiny
    again = run_ptq(proto, weights, folder / "e2e_again", data, "end_to_end")
    for suffix in ("_fake_quant_weights.caffemodel", "_deploy_weights.caffemodel"):
        assert Path(again + suffix).read_bytes() == Path(tiny_e2e + suffix).read_bytes(), suffix
