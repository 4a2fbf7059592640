"""Post-training quantization end to end on the digits LeNet (scikit-learn's 8x8 digits, amct_caffe.demo):
float training -> create_quant_config -> init -> quantize_model -> 4 calibration batches of training images
through ``caffe.Net`` -> save_model('Both'). The fake-quant model keeps the float test accuracy within half a
point, and the deploy model (run through caffe.Net: the integer emulation) agrees with it on the top-1 class
of at least 99.5% of the test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import amct, caffe
from tests.helpers import read_record

FLOAT_ITERATIONS = 600
CALIBRATION_BATCHES = 4
BATCH = 64
HALF_POINT = 0.005 + 1e-9


def _digits():
    pytest.importorskip("sklearn", reason="the digits data comes from scikit-learn (pip install "
                                          "scikit-learn)")
    pytest.importorskip("h5py", reason="the digits nets read HDF5 data (pip install h5py)")
    from amct_caffe.demo import digits

    return digits


def top1(model: str, weights: str, x: np.ndarray) -> np.ndarray:
    """The arg-max class of every image, in the engine's TEST phase (pycaffe facade)."""
    net = caffe.Net(model, caffe.TEST, weights=weights)
    net.blobs["data"].reshape(len(x), *x.shape[1:])
    return net.forward(data=x)["prob"].reshape(len(x), -1).argmax(axis=1)


@pytest.fixture(scope="module")
def ptq_digits(tmp_path_factory):
    digits = _digits()
    folder = tmp_path_factory.mktemp("digits_ptq")
    digits.prepare(folder, seed=0)
    float_weights = digits.train_float(folder, iterations=FLOAT_ITERATIONS, seed=0)
    model = digits.deploy_prototxt()
    config, record = str(folder / "config.json"), str(folder / "record.txt")
    amct.create_quant_config(config, model, float_weights, batch_num=CALIBRATION_BATCHES)
    graph = amct.init(config, model, float_weights, record)
    cal_model, cal_weights = str(folder / "calibration.prototxt"), str(folder / "calibration.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    x_train, _ = digits.load_split("train", seed=0)
    net = caffe.Net(cal_model, caffe.TEST, weights=cal_weights)
    net.blobs["data"].reshape(BATCH, *digits.IMAGE_SHAPE)
    for i in range(CALIBRATION_BATCHES):
        net.forward(data=x_train[i * BATCH:(i + 1) * BATCH])
    save_path = str(folder / "results" / "lenet")
    amct.save_model(graph, "Both", save_path)
    return digits, folder, model, float_weights, save_path, record


def test_fake_quant_accuracy_within_half_a_point(ptq_digits):
    digits, _, model, float_weights, save_path, _ = ptq_digits
    float_accuracy = digits.evaluate(model, float_weights)
    fake_accuracy = digits.evaluate(save_path + "_fake_quant_model.prototxt",
                                    save_path + "_fake_quant_weights.caffemodel")
    assert float_accuracy > 0.9
    assert abs(fake_accuracy - float_accuracy) <= HALF_POINT, (float_accuracy, fake_accuracy)


def test_deploy_agrees_with_fake_quant_on_top1(ptq_digits):
    digits, _, _, _, save_path, _ = ptq_digits
    x, y = digits.load_split("test", seed=0)
    fake = top1(save_path + "_fake_quant_model.prototxt", save_path + "_fake_quant_weights.caffemodel", x)
    deploy = top1(save_path + "_deploy_model.prototxt", save_path + "_deploy_weights.caffemodel", x)
    agreement = float(np.mean(fake == deploy))
    assert agreement >= 0.995, agreement
    assert float(np.mean(deploy == y)) > 0.9


def test_record_and_quant_info(ptq_digits):
    _, _, _, _, save_path, record_file = ptq_digits
    record = read_record(record_file)
    assert list(record) == ["conv1", "conv2", "pool2", "ip1", "ip2"]
    for rec in record.values():
        assert rec.HasField("scale_d") and rec.scale_d > 0 and -128 <= rec.offset_d <= 127
    # inputs after a ReLU (conv2 reads a MAX pooling of a ReLU, pool2 and ip2 a ReLU) never go below 0
    assert [record[n].offset_d for n in ("conv2", "pool2", "ip2")] == [-128, -128, -128]
    assert (record["conv1"].channels, record["conv1"].height, record["conv1"].width) == (1, 8, 8)
    info = json.loads(Path(save_path + "_quant.json").read_text())
    assert [entry["layer"] for entry in info["quantized_layers"]] == list(record)
    assert info["fusions"] == []
