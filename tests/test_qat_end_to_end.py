"""End-to-end QAT: float training, retrain model, retraining with the engine's solver, saved models.

* digits (scikit-learn's bundled 8x8 images, ``amct_caffe.demo.digits``): the float net is checked against the
  numpy forward of tests/references/nets.py; after ``create_quant_retrain_config`` ->
  ``create_quant_retrain_model`` -> a short retraining (``caffe.SGDSolver``, ``solver.net.copy_from``,
  ``solver.solve()``), the retrain model and the saved fake-quant model stay within one point of the float
  test accuracy;
* AMCT's ResNet-50 retrain sample flow, as a real script (``tests/samples/retrain_sample.py``), run in a
  subprocess on the digits net;
* real nets of the shared models with random data: the retrain model of a synthetic training prototxt
  trains for 3 iterations and its snapshot holds the learned clip bounds of every ``ActivationQAT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe import amct, caffe
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.model.io import load_caffemodel, load_prototxt, prototxt_text
from amct_caffe.proto import caffe_pb2
from tests.helpers import caffemodel_blobs
from tests.references.nets import (
    REAL_NETS,
    digits_scores,
    expected_quantized_inputs,
    synthetic_training_net,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parent / "samples" / "retrain_sample.py"
FLOAT_ITERATIONS = 600
RETRAIN_ITERATIONS = 100
#: The five layers of the digits net that QAT quantizes (docs/amct-reference.md §2.1): two convolutions, the
#: AVE pooling and the two inner products (MAX pooling, ReLU and Softmax stay float).
DIGITS_QUANTIZED = ["conv1", "conv2", "pool2", "ip1", "ip2"]
ONE_POINT = 0.01 + 1e-9


def _digits():
    pytest.importorskip("sklearn", reason="the digits data comes from scikit-learn (pip install "
                        "scikit-learn)")
    pytest.importorskip("h5py", reason="the digits nets read HDF5 data (pip install h5py)")
    from amct_caffe.demo import digits

    return digits


# -- fixtures ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FloatDigits:
    folder: Path
    files: object  # digits.DigitsFiles
    caffemodel: str
    accuracy: float  # test accuracy by the numpy forward


@dataclass(frozen=True)
class RetrainedDigits:
    folder: Path
    config: str
    model: str
    weights: str
    record: str
    snapshot: str
    solver_accuracy: float


@pytest.fixture(scope="module")
def float_digits(tmp_path_factory) -> FloatDigits:
    """The float digits net trained by the engine's solver (seed 0), with its numpy-computed accuracy."""
    digits = _digits()
    folder = tmp_path_factory.mktemp("digits_float")
    files = digits.prepare(folder, seed=0)
    caffemodel = digits.train_float(folder, iterations=FLOAT_ITERATIONS, seed=0)
    x, y = digits.load_split("test", seed=0)
    scores = digits_scores(caffemodel_blobs(caffemodel), x)
    accuracy = float(np.mean(scores.argmax(axis=1) == y.astype(np.int64)))
    return FloatDigits(folder, files, caffemodel, accuracy)


@pytest.fixture(scope="module")
def retrained_digits(float_digits, tmp_path_factory) -> RetrainedDigits:
    """create_quant_retrain_config -> create_quant_retrain_model -> 100 iterations of caffe.SGDSolver."""
    digits = _digits()
    folder = tmp_path_factory.mktemp("digits_qat")
    model = float_digits.files.train_test_prototxt
    config = str(folder / "config.json")
    amct.create_quant_retrain_config(config, model, float_digits.caffemodel)
    modified_model, modified_weights = str(folder / "retrain.prototxt"), str(folder / "retrain.caffemodel")
    record = str(folder / "record.txt")
    amct.create_quant_retrain_model(model, float_digits.caffemodel, config, modified_model, modified_weights,
                                    record)
    # AMCT's advice: about 1/100 of the float learning rate (0.05)
    param = digits.solver_param(modified_model, RETRAIN_ITERATIONS, seed=0, base_lr=5e-4,
                                snapshot_prefix=str(folder / "retrain"))
    solver_file = folder / "retrain_solver.prototxt"
    solver_file.write_text(text_format.MessageToString(param))
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(modified_weights)
    solver.solve()
    snapshot = folder / f"retrain_iter_{RETRAIN_ITERATIONS}.caffemodel"
    solver_accuracy = dict(solver.test_results[0])["accuracy"]
    return RetrainedDigits(folder, config, modified_model, modified_weights, record, str(snapshot),
                           solver_accuracy)


# -- digits ------------------------------------------------------------------------------------------------
def test_digits_data_split():
    digits = _digits()
    from sklearn.datasets import load_digits

    raw = load_digits()
    x_train, y_train = digits.load_split("train")
    x_test, y_test = digits.load_split("test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == np.float32 and y_test.dtype == np.float32
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    # every image once, with its label: the split is a partition of the 1797 images scaled by 1/16
    pairs = sorted((tuple(img.ravel()), label) for img, label in zip(raw.images / 16.0, raw.target))
    ours = sorted((tuple(img.ravel().astype(np.float64)), int(label))
                  for img, label in zip(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])))
    assert ours == pairs
    # stratified: each class is in the test split in proportion (360 of 1797), up to rounding
    for c in range(10):
        share = np.sum(raw.target == c) * 360 / 1797
        assert abs(np.sum(y_test == c) - share) <= 1.0
    again = digits.load_split("test")
    assert np.array_equal(again[0], x_test) and np.array_equal(again[1], y_test)
    assert not np.array_equal(digits.load_split("test", seed=1)[1], y_test)


def test_digits_hdf5_files(tmp_path):
    digits = _digits()
    import h5py

    files = digits.prepare(tmp_path, seed=0)
    for split, h5, listing in (("train", files.train_h5, files.train_list), ("test", files.test_h5,
                                                                           files.test_list)):
        assert Path(listing).read_text().split() == [h5]
        x, y = digits.load_split(split)
        with h5py.File(h5, "r") as handle:
            assert np.array_equal(handle["data"][()], x) and np.array_equal(handle["label"][()], y)
    net = load_prototxt(files.train_test_prototxt)
    assert [(layer.type, layer.include[0].phase) for layer in net.layer[:2]] == [
        ("HDF5Data", caffe_pb2.TRAIN), ("HDF5Data", caffe_pb2.TEST)]
    deploy = load_prototxt(digits.deploy_prototxt())
    weighted = [(layer.name, layer.type) for layer in deploy.layer if layer.type in ("Convolution",
                                                                                     "InnerProduct")]
    assert [(layer.name, layer.type) for layer in net.layer if layer.type in ("Convolution",
                                                                             "InnerProduct")] == weighted
    assert [layer.type for layer in net.layer[-2:]] == ["SoftmaxWithLoss", "Accuracy"]


def test_float_digits_net(float_digits):
    digits = _digits()
    print(f"\nfloat digits test accuracy (numpy forward): {float_digits.accuracy:.4f}")
    assert float_digits.accuracy >= 0.95
    for prototxt in (float_digits.files.train_test_prototxt, float_digits.files.deploy_prototxt):
        assert digits.evaluate(prototxt, float_digits.caffemodel, "test") == pytest.approx(
            float_digits.accuracy, abs=1.5 / 360)
    # the training split, batch-wise with a padded last batch (1437 = 11 * 120 + 117)
    x, y = digits.load_split("train")
    scores = digits_scores(caffemodel_blobs(float_digits.caffemodel), x)
    train_acc = float(np.mean(scores.argmax(1) == y))
    assert digits.evaluate(float_digits.files.deploy_prototxt, float_digits.caffemodel, "train") == \
        pytest.approx(train_acc, abs=1.5 / 1437)


def test_retrain_model_keeps_float_accuracy(float_digits, retrained_digits):
    digits = _digits()
    config = json.loads(Path(retrained_digits.config).read_text())
    assert sorted(name for name in config if name != "version") == sorted(DIGITS_QUANTIZED)
    assert Path(retrained_digits.snapshot).is_file()
    accuracy = digits.evaluate(retrained_digits.model, retrained_digits.snapshot, "test")
    print(f"\nretrain model test accuracy: {accuracy:.4f} (float {float_digits.accuracy:.4f})")
    assert abs(accuracy - float_digits.accuracy) <= ONE_POINT
    # the solver's own test after training (3 x 120 = the whole test split) saw the same accuracy
    assert retrained_digits.solver_accuracy == pytest.approx(accuracy, abs=1e-6)
    # the snapshot holds the learned clips of the five layers' inputs
    blobs = caffemodel_blobs(retrained_digits.snapshot)
    for name in DIGITS_QUANTIZED:
        clip_max, clip_min = blobs[f"{name}_act_retrain"]
        assert clip_max.shape == (1,) and float(clip_max[0]) > max(float(clip_min[0]), 0.0)


def test_fake_quant_model_keeps_float_accuracy(float_digits, retrained_digits):
    digits = _digits()
    save = amct.save_quant_retrain_model
    prefix = retrained_digits.folder / "results" / "lenet_digits"
    save(retrained_digits.model, retrained_digits.snapshot, "Both", str(prefix), retrained_digits.record,
         retrained_digits.config)
    for suffix in ("fake_quant_model.prototxt", "fake_quant_weights.caffemodel", "deploy_model.prototxt",
                   "deploy_weights.caffemodel"):
        assert Path(f"{prefix}_{suffix}").is_file()
    accuracy = digits.evaluate(f"{prefix}_fake_quant_model.prototxt",
                               f"{prefix}_fake_quant_weights.caffemodel", "test")
    print(f"\nfake-quant model test accuracy: {accuracy:.4f} (float {float_digits.accuracy:.4f})")
    assert abs(accuracy - float_digits.accuracy) <= ONE_POINT
    types = [layer.type for layer in load_prototxt(f"{prefix}_fake_quant_model.prototxt").layer]
    assert types.count("Quant") == 5 and types.count("DeQuant") == 5
    assert "ActivationQAT" not in types and "WeightQAT" not in types


# -- AMCT's retrain sample flow ----------------------------------------------------------------------------
def test_amct_retrain_sample_flow(float_digits, tmp_path):
    work = tmp_path / "sample"
    work.mkdir()
    files = float_digits.files
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    env["AMCT_LOG_LEVEL"] = "WARNING"
    iterations = 60
    proc = subprocess.run(
        [sys.executable, str(SAMPLE), str(work), "--model_file", files.train_test_prototxt,
         "--weights_file", float_digits.caffemodel, "--train_data", files.train_list,
         "--test_data", files.test_list, "--train_iter", str(iterations)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"sample failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    tmp, result = work / "tmp", work / "results" / "retrain_results"
    # the solver snapshot under Caffe's default name: the solver file's path without extension
    assert (tmp / f"solver_iter_{iterations}.caffemodel").is_file()
    assert (tmp / f"solver_iter_{iterations}.solverstate").is_file()
    accuracy = json.loads((result / "accuracy.json").read_text())
    print(f"\nsample: float {accuracy['float']:.4f}, fake-quant {accuracy['fake_quant']:.4f}")
    assert accuracy["float"] == pytest.approx(float_digits.accuracy, abs=1.5 / 360)
    assert abs(accuracy["fake_quant"] - accuracy["float"]) <= ONE_POINT
    atc = caffe_pb2.NetParameter()
    text_format.Merge((result / "lenet_digits_atc_model.prototxt").read_text(), atc)
    assert atc.layer[0].type == "Input" and list(atc.layer[0].input_param.shape[0].dim) == [1, 1, 8, 8]
    types = [layer.type for layer in atc.layer]
    assert types.count("Quant") == 5 and types.count("DeQuant") == 5
    assert not {"HDF5Data", "SoftmaxWithLoss", "Accuracy"} & set(types)
    deploy = load_caffemodel(result / "lenet_digits_deploy_weights.caffemodel")
    conv1 = next(layer for layer in deploy.layer if layer.name == "conv1")
    assert len(conv1.blobs[0].int8_data) == 16 * 1 * 3 * 3


# -- real nets with random data ----------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(REAL_NETS))
def test_real_net_retrain_snapshot_has_learned_clips(shared_models, tmp_path, model):
    prototxt, weights, batch, size = REAL_NETS[model]
    deploy = load_prototxt(shared_models / prototxt)
    train = tmp_path / "train.prototxt"
    train.write_text(prototxt_text(synthetic_training_net(deploy, batch, size)))
    if weights is None:
        net = Net(deploy, caffe_pb2.TEST)
        randomize_params(net, seed=3)
        weights_file = str(tmp_path / "random.caffemodel")
        net.save(weights_file)
    else:
        weights_file = str(shared_models / weights)
    config = str(tmp_path / "config.json")
    amct.create_quant_retrain_config(config, str(train), weights_file)
    modified_model = str(tmp_path / "retrain.prototxt")
    modified_weights = str(tmp_path / "retrain.caffemodel")
    amct.create_quant_retrain_model(str(train), weights_file, config, modified_model, modified_weights,
                                    str(tmp_path / "record.txt"))
    retrain = load_prototxt(modified_model)
    acts = {layer.name: layer.retrain_data_quant_param for layer in retrain.layer
            if layer.type == "ActivationQAT"}
    assert len(acts) == expected_quantized_inputs(deploy) > 0

    # the solver as a user writes it; clip_gradients keeps random nets with huge outputs stable
    param = caffe_pb2.SolverParameter(net=modified_model, base_lr=0.1, lr_policy="fixed", momentum=0.9,
                                      max_iter=3, clip_gradients=1.0, random_seed=0, display=0)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(text_format.MessageToString(param))
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(modified_weights)
    first: dict[str, tuple[float, np.ndarray | None]] = {}

    def before_first_update() -> None:
        if solver.iter == 0:
            for layer in solver.net.engine_layers:
                if layer.name in acts:
                    grad = layer.blobs[0].grad
                    first[layer.name] = (float(layer.blobs[0].detach()[0]),
                                         None if grad is None else grad.detach().numpy().copy())

    solver.add_callback(on_gradients_ready=before_first_update)
    solver.solve()

    snapshot = tmp_path / "solver_iter_3.caffemodel"  # snapshot_prefix defaults to the solver file's stem
    assert snapshot.is_file()
    saved = caffemodel_blobs(str(snapshot))
    trained = {layer.name: layer for layer in solver.net.engine_layers}
    moved = 0
    for name, p in acts.items():
        assert name in saved, f"{model}: no clip blobs for {name} in the snapshot"
        clip_max, clip_min = saved[name]
        assert clip_max.shape == (1,) and clip_min.shape == (1,)
        assert np.isfinite(clip_max).all() and np.isfinite(clip_min).all()
        assert float(clip_max[0]) > float(clip_min[0])
        if p.fixed_min:
            assert float(clip_max[0]) > 0.0
        # the snapshot holds the trained values, and the gradient reached them
        assert np.array_equal(clip_max, trained[name].blobs[0].detach().numpy())
        initial, grad = first[name]
        assert grad is not None and np.isfinite(grad).all(), f"{model}: no clip gradient for {name}"
        moved += float(clip_max[0]) != initial
    assert moved > 0, f"{model}: training changed no clip_max"

    # the snapshot loads into the retrain net and its clips are used as they are (no IFMR again)
    loaded = Net(modified_model, caffe_pb2.TEST, weights=str(snapshot))
    loaded.run()
    for layer in loaded.engine_layers:
        if layer.name in acts:
            assert float(layer.blobs[0].detach()[0]) == float(saved[layer.name][0][0])
