"""``accuracy_based_auto_calibration`` (AMCT reference §1.2) on a small net with one layer broken on purpose.

The net: data -> conv1 -> ReLU -> conv2 -> ReLU -> conv3 -> ReLU -> ip1 -> ReLU -> ip2 (5 quantized
layers). conv1's last output channel is dead (zero weights, negative bias: always 0 after the ReLU), and
every output channel of conv2 carries one huge weight on that dead input channel. In float the huge weights
multiply zeros and change nothing; conv2's INT8 weight scale (one per output channel, set by its largest
magnitude) is then so coarse that every other conv2 weight rounds to 0, so plain PTQ destroys conv2 and
only conv2. The evaluator's metric is the top-1 accuracy on fixed data whose labels are the float model's
own predictions (so the float model scores 1.0), and the goal is a drop of at most 5 points.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import amct, caffe
from amct_caffe.common.auto_calibration import (
    AutoCalibrationEvaluatorBase,
    BinarySearchStrategy,
    CosineSimilaritySensitivity,
)
from amct_caffe.errors import AmctError, ConfigError, EvaluatorError
from amct_caffe.workflows.auto_calibration import binary_search
from tests.helpers import caffemodel_blobs

NET = """
name: "autocal"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 16 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv3" top: "ip1" inner_product_param { num_output: 16 } }
layer { name: "relu4" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 5 } }
"""
QUANTIZED = ["conv1", "conv2", "conv3", "ip1", "ip2"]
BATCH, BATCHES, CALIBRATION_BATCHES = 16, 4, 2
OUTPUT_SUFFIXES = ["_fake_quant_model.prototxt", "_fake_quant_weights.caffemodel", "_deploy_model.prototxt",
                   "_deploy_weights.caffemodel", "_quant.json", "_quant_config.json", "_sensitivity.json",
                   "_fallback_history.json"]


def write_model(folder: Path, break_conv2: bool = True) -> tuple[str, str]:
    """The prototxt and a caffemodel with seeded weights (conv2 broken as the module docstring says)."""
    rng = np.random.default_rng(0)
    proto = folder / "model.prototxt"
    proto.write_text(NET)
    net = caffe.Net(str(proto), caffe.TEST)
    for params in net.params.values():
        w = params[0].data
        w[...] = rng.standard_normal(w.shape) * np.sqrt(2.0 / np.prod(w.shape[1:]))
        params[1].data[...] = rng.standard_normal(params[1].data.shape) * 0.05
    conv1_w, conv1_b = net.params["conv1"][0].data, net.params["conv1"][1].data
    conv1_w[5] = 0.0
    conv1_b[5] = -1.0  # conv1's channel 5 is 0 after relu1 for every input
    if break_conv2:
        net.params["conv2"][0].data[:, 5, 1, 1] = 1.0e4
    weights = folder / "model.caffemodel"
    net.save(str(weights))
    return str(proto), str(weights)


def logits(model_file: str, weights_file: str, batches: np.ndarray) -> np.ndarray:
    net = caffe.Net(model_file, weights_file, caffe.TEST)
    return np.concatenate([net.forward(data=batch)["ip2"].copy() for batch in batches])


def predict(model_file: str, weights_file: str, batches: np.ndarray) -> np.ndarray:
    return logits(model_file, weights_file, batches).argmax(axis=1)


def clear_cut_data(model_file: str, weights_file: str) -> tuple[np.ndarray, np.ndarray]:
    """``BATCHES`` batches of the inputs whose float top-1 wins by the widest margin (so INT8 noise of the
    healthy layers does not flip them, and the accuracy speaks of the broken layer), and their labels."""
    pool = np.random.default_rng(1).standard_normal((3 * BATCHES, BATCH, 3, 8, 8)).astype(np.float32)
    scores = np.sort(logits(model_file, weights_file, pool), axis=1)
    keep = np.argsort(scores[:, -2] - scores[:, -1])[:BATCHES * BATCH]
    batches = pool.reshape(-1, 3, 8, 8)[np.sort(keep)].reshape(BATCHES, BATCH, 3, 8, 8)
    return batches, predict(model_file, weights_file, batches)


class Evaluator(AutoCalibrationEvaluatorBase):
    """Top-1 accuracy on fixed data; goal: at most ``target_loss`` points below the float model. Records the
    files each method was given."""

    def __init__(self, batches: np.ndarray, labels: np.ndarray, target_loss: float = 5.0) -> None:
        super().__init__()
        self.batches = batches
        self.labels = labels
        self.target_loss = target_loss
        self.calls: list[tuple[str, str, str]] = []

    def calibration(self, model_file: str, weights_file: str) -> None:
        self.calls.append(("calibration", model_file, weights_file))
        net = caffe.Net(model_file, weights_file, caffe.TEST)
        for batch in self.batches[:CALIBRATION_BATCHES]:
            net.forward(data=batch)

    def evaluate(self, model_file: str, weights_file: str) -> float:
        self.calls.append(("evaluate", model_file, weights_file))
        return float((predict(model_file, weights_file, self.batches) == self.labels).mean())

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = (original_metric - new_metric) * 100
        return loss <= self.target_loss, loss


@pytest.fixture
def setup(tmp_path):
    model, weights = write_model(tmp_path)
    batches, labels = clear_cut_data(model, weights)
    config = str(tmp_path / "config.json")
    amct.create_quant_config(config, model, weights, None, CALIBRATION_BATCHES)
    return tmp_path, model, weights, config, batches, labels


def outputs_of(prefix: Path) -> list[Path]:
    return [Path(str(prefix) + suffix) for suffix in OUTPUT_SUFFIXES]


def test_broken_layer_falls_back_and_the_goal_is_met(setup):
    tmp_path, model, weights, config, batches, labels = setup
    evaluator = Evaluator(batches, labels)
    prefix = tmp_path / "result" / "model"
    record = tmp_path / "result" / "record.txt"
    config_before = Path(config).read_bytes()
    record.parent.mkdir()
    record.write_text("an older record\n")  # overwritten
    amct.accuracy_based_auto_calibration(model, weights, evaluator, config, str(record), str(prefix))

    assert all(path.is_file() for path in outputs_of(prefix)) and record.is_file()
    assert Path(config).read_bytes() == config_before  # the user's config is read, not changed
    sensitivity = json.loads(Path(str(prefix) + "_sensitivity.json").read_text())
    ranked = [entry["layer"] for entry in sensitivity["layers"]]
    assert sensitivity["computed"] and sorted(ranked) == sorted(QUANTIZED)
    assert ranked[0] == "conv2"
    cosines = [entry["cosine_similarity"] for entry in sensitivity["layers"]]
    assert cosines == sorted(cosines) and cosines[0] < 0.9 < cosines[1]

    history = json.loads(Path(str(prefix) + "_fallback_history.json").read_text())
    probes = history["probes"]
    assert history["original_metric"] == 1.0
    # plain PTQ misses the goal; binary search over k in [1, 4]: k = 2 (satisfied), then k = 1 (satisfied)
    assert probes[0]["fallback_layers"] == [] and not probes[0]["satisfied"] and probes[0]["loss"] > 5.0
    assert [p["fallback_count"] for p in probes] == [0, 2, 1]
    assert [p["fallback_layers"] for p in probes[1:]] == [ranked[:2], ["conv2"]]
    assert all(p["satisfied"] for p in probes[1:])
    assert history["result"] == {"probe": 2, "fallback_layers": ["conv2"], "satisfied": True}

    # the saved models: conv2 float, the other layers quantized, and the fake-quant model meets the goal
    saved = json.loads(Path(str(prefix) + "_quant.json").read_text())
    assert sorted(entry["layer"] for entry in saved["quantized_layers"]) == sorted(set(QUANTIZED) - {"conv2"})
    final_config = json.loads(Path(str(prefix) + "_quant_config.json").read_text())
    assert [n for n in QUANTIZED if not final_config[n]["quant_enable"]] == ["conv2"]
    fake = (str(prefix) + "_fake_quant_model.prototxt", str(prefix) + "_fake_quant_weights.caffemodel")
    accuracy = (predict(*fake, batches) == labels).mean()
    assert (1.0 - accuracy) * 100 <= 5.0
    blobs = caffemodel_blobs(fake[1])
    np.testing.assert_array_equal(blobs["conv2"][0][:, 5, 1, 1], 1.0e4)  # float weights kept
    deploy = caffemodel_blobs(str(prefix) + "_deploy_weights.caffemodel")
    assert deploy["conv1"][0].dtype == np.int8 and deploy["conv2"][0].dtype == np.float32
    record_text = record.read_text()
    assert "older" not in record_text and '"conv1"' in record_text and '"conv2"' not in record_text

    # the evaluator's methods got the float model, calibration models and fake-quant models
    assert evaluator.calls[0] == ("evaluate", model, weights)
    calibrations = [c for c in evaluator.calls if c[0] == "calibration"]
    evaluations = [c for c in evaluator.calls[1:] if c[0] == "evaluate"]
    assert len(calibrations) == len(evaluations) == len(probes)
    for _, model_file, weights_file in calibrations:
        assert model_file.endswith(".prototxt") and weights_file.endswith(".caffemodel")
    for _, model_file, weights_file in evaluations:
        assert model_file.endswith("_fake_quant_model.prototxt")
        assert weights_file.endswith("_fake_quant_weights.caffemodel")
    # intermediate files live in a temporary folder that is gone
    assert not any(os.path.exists(path) for _, path, _ in evaluator.calls[1:])


class CheckingEvaluator(Evaluator):
    """Checks, while the files exist, that calibration gets the IFMR model and evaluate a fake-quant one."""

    def calibration(self, model_file: str, weights_file: str) -> None:
        text = Path(model_file).read_text()
        assert 'type: "IFMR"' in text and 'type: "Quant"' not in text
        super().calibration(model_file, weights_file)

    def evaluate(self, model_file: str, weights_file: str) -> float:
        if self.calls:
            text = Path(model_file).read_text()
            assert 'type: "Quant"' in text and 'type: "IFMR"' not in text
        return super().evaluate(model_file, weights_file)


def test_models_given_to_the_evaluator(setup):
    tmp_path, model, weights, config, batches, labels = setup
    evaluator = CheckingEvaluator(batches, labels)
    amct.accuracy_based_auto_calibration(model, weights, evaluator, config, str(tmp_path / "r.txt"),
                                         str(tmp_path / "out" / "m"), BinarySearchStrategy(),
                                         CosineSimilaritySensitivity())
    assert len(evaluator.calls) == 1 + 2 * 3


def test_plain_ptq_meeting_the_goal_stops_at_once(tmp_path):
    model, weights = write_model(tmp_path, break_conv2=False)
    batches, labels = clear_cut_data(model, weights)
    config = str(tmp_path / "config.json")
    amct.create_quant_config(config, model, weights, None, CALIBRATION_BATCHES)
    evaluator = Evaluator(batches, labels, target_loss=100.0)
    prefix = tmp_path / "out" / "m"
    import amct_caffe  # AMCT's spelling: ``import amct_caffe as amct``

    amct_caffe.accuracy_based_auto_calibration(model, weights, evaluator, config, str(tmp_path / "r.txt"),
                                               str(prefix))
    history = json.loads(Path(str(prefix) + "_fallback_history.json").read_text())
    assert [p["fallback_count"] for p in history["probes"]] == [0] and history["result"]["satisfied"]
    assert json.loads(Path(str(prefix) + "_sensitivity.json").read_text())["computed"] is False
    assert all(path.is_file() for path in outputs_of(prefix))


class NeverSatisfied(Evaluator):
    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        return False, (original_metric - new_metric) * 100


def test_an_unreachable_goal_warns_and_keeps_the_smallest_loss(setup, caplog):
    tmp_path, model, weights, config, batches, labels = setup
    prefix = tmp_path / "out" / "m"
    with caplog.at_level(logging.WARNING):
        amct.accuracy_based_auto_calibration(model, weights, NeverSatisfied(batches, labels), config,
                                             str(tmp_path / "r.txt"), str(prefix))
    assert "no fallback set meets the accuracy goal" in caplog.text
    history = json.loads(Path(str(prefix) + "_fallback_history.json").read_text())
    probes = history["probes"]
    # nothing satisfied: k = 2, 3, 4 are probed (the search moves up), the plain PTQ first
    assert [p["fallback_count"] for p in probes] == [0, 2, 3, 4] and not history["result"]["satisfied"]
    best = min(range(len(probes)), key=lambda i: (probes[i]["loss"], probes[i]["fallback_count"]))
    assert history["result"]["probe"] == best
    assert all(path.is_file() for path in outputs_of(prefix))


@pytest.mark.parametrize("low, high, threshold, expected", [
    (1, 4, 1, 1), (1, 4, 3, 3), (1, 4, 4, 4), (1, 4, 5, None), (1, 0, 1, None), (1, 9, 7, 7)])
def test_binary_search_finds_the_smallest_satisfied_k(low, high, threshold, expected):
    probed: list[int] = []

    def satisfied(k: int) -> bool:
        probed.append(k)
        return k >= threshold

    assert binary_search(low, high, satisfied) == expected
    assert len(probed) == len(set(probed)) and len(probed) <= max(0, high - low + 1).bit_length()


class Incomplete(AutoCalibrationEvaluatorBase):
    pass


def test_base_methods_raise_when_not_overridden():
    evaluator = Incomplete()
    for call in (lambda: evaluator.calibration("m", "w"), lambda: evaluator.evaluate("m", "w"),
                 lambda: evaluator.metric_eval(1.0, 1.0)):
        with pytest.raises(EvaluatorError, match="Incomplete does not override"):
            call()


class DuckEvaluator:
    def calibration(self, model_file, weights_file): ...
    def evaluate(self, model_file, weights_file): return 1.0
    def metric_eval(self, original_metric, new_metric): return True, 0.0


class BadVerdict(Evaluator):
    def metric_eval(self, original_metric, new_metric):  # type: ignore[override]
        return "yes"


@pytest.mark.parametrize("case, error, words", [
    ("duck", EvaluatorError, "subclass of"),
    ("strategy", ConfigError, "unknown strategy 'Greedy'"),
    ("sensitivity", ConfigError, "unknown sensitivity 'L2'"),
    ("no_prefix", ConfigError, "no file-name prefix"),
    ("below_a_file", ConfigError, "is a file, not a folder"),
    ("record_is_model", ConfigError, "is the model_file"),
    ("incomplete", EvaluatorError, "does not override evaluate"),
    ("verdict", EvaluatorError, "must return (satisfied: bool, loss: number)"),
])
def test_errors_write_nothing(setup, case, error, words):
    tmp_path, model, weights, config, batches, labels = setup
    evaluator: object = Evaluator(batches, labels)
    strategy, sensitivity = "BinarySearch", "CosineSimilarity"
    record, prefix = str(tmp_path / "out" / "r.txt"), str(tmp_path / "out" / "m")
    if case == "duck":
        evaluator = DuckEvaluator()
    elif case == "strategy":
        strategy = "Greedy"
    elif case == "sensitivity":
        sensitivity = "L2"
    elif case == "no_prefix":
        prefix = str(tmp_path / "out") + os.sep
    elif case == "below_a_file":
        (tmp_path / "blocker").write_text("a file")
        prefix = str(tmp_path / "blocker" / "m")
    elif case == "record_is_model":
        record = model
    elif case == "incomplete":
        evaluator = Incomplete()
    elif case == "verdict":
        evaluator = BadVerdict(batches, labels)
    before = sorted(p.name for p in tmp_path.iterdir())
    model_bytes = Path(model).read_bytes()
    with pytest.raises(error) as info:
        amct.accuracy_based_auto_calibration(model, weights, evaluator, config, record, prefix, strategy,
                                             sensitivity)
    assert words in str(info.value) and isinstance(info.value, AmctError)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and Path(model).read_bytes() == model_bytes


def test_observe_inputs_sees_whole_forwards_only_inside_the_block(tmp_path):
    from amct_caffe.engine.net import observe_inputs

    model, weights = write_model(tmp_path)
    net = caffe.Net(model, weights, caffe.TEST)
    x = np.random.default_rng(2).standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    seen: list[tuple[object, np.ndarray]] = []

    def observer(observed, inputs):
        seen.append((observed, inputs["data"].numpy().copy()))

    with observe_inputs(observer):
        net.forward(data=x)
        net.forward(start="conv2")  # not a whole forward
    net.forward(data=x)
    assert len(seen) == 1 and seen[0][0] is net
    np.testing.assert_array_equal(seen[0][1], x)
