"""Helpers of the post-training quantization tests (not a test module): one PTQ run of the small net of
:data:`tests.references.nets.PTQ_NET` in a folder, driven through the public API, and its calibration data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from amct_caffe import amct, caffe
from amct_caffe.workflows.ptq import CalibrationGraph
from tests.references.nets import write_random_net

#: The calibration batches a :class:`PtqFlow` asks for unless told otherwise.
BATCH_NUM = 3
#: The blobs that feed the quantized layers of the PTQ net (one per IFMR group).
QUANTIZED_INPUTS = ("data", "conv1", "pool1", "sum")


def calibration_batches(seed: int = 1) -> list[np.ndarray]:
    """Three calibration batches of different ranges for the PTQ net: the last one alone gives other
    factors."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((2, 3, 6, 6)) * scale + shift).astype(np.float32)
            for scale, shift in ((3.0, 0.5), (1.0, -0.2), (0.5, 0.0))]


class PtqFlow:
    """The files of one PTQ run on the PTQ net in ``folder``: the float model with random weights, its
    quantization config (``create_quant_config`` with ``batch_num`` and ``config_kw``), the record and the
    calibration model's paths."""

    def __init__(self, folder: Path, batch_num: int = BATCH_NUM, **config_kw: Any) -> None:
        self.folder = folder
        self.model, self.weights = write_random_net(folder)
        self.config = str(folder / "config.json")
        self.record = str(folder / "record.txt")
        self.cal_model = str(folder / "calibration.prototxt")
        self.cal_weights = str(folder / "calibration.caffemodel")
        amct.create_quant_config(self.config, self.model, self.weights, batch_num=batch_num, **config_kw)

    def init(self) -> CalibrationGraph:
        """``amct.init`` on the run's files."""
        return amct.init(self.config, self.model, self.weights, self.record)

    def quantize(self) -> CalibrationGraph:
        """``init``, then ``quantize_model`` writing the calibration model; returns the graph."""
        graph = self.init()
        amct.quantize_model(graph, self.cal_model, self.cal_weights)
        return graph

    def calibrate(self, data: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Run the calibration model on ``data`` (pycaffe style); returns every quantized input per batch."""
        net = caffe.Net(self.cal_model, caffe.TEST, weights=self.cal_weights)
        seen: dict[str, list[np.ndarray]] = {name: [] for name in QUANTIZED_INPUTS}
        for x in data:
            net.forward(data=x)
            for name in seen:
                seen[name].append(net.blobs[name].data.copy())
        return seen


def calibrated_graph(proto: str, weights: str, folder: Path,
                     data: list[dict[str, np.ndarray]]) -> CalibrationGraph:
    """PTQ of any model up to ``save_model``: the default config with ``batch_num = len(data)``, ``init``,
    ``quantize_model`` and the calibration model run on each batch of ``data`` (``{input blob: array}``,
    the inputs reshaped to each batch); the files go to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config, record = str(folder / "config.json"), str(folder / "record.txt")
    amct.create_quant_config(config, proto, weights, batch_num=len(data))
    graph = amct.init(config, proto, weights, record)
    cal_model, cal_weights = str(folder / "calibration.prototxt"), str(folder / "calibration.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    net = caffe.Net(cal_model, caffe.TEST, weights=cal_weights)
    for batch in data:
        for name, value in batch.items():
            net.blobs[name].reshape(*value.shape)
        net.reshape()
        net.forward(**batch)
    return graph
