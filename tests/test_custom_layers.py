"""A user's own layer type (``amct_caffe.register_layer``): the README's example run exactly as written;
parameters from ``python_param.param_str``; a learnable custom layer through QAT (training, save) and PTQ,
staying float while the layers around it are quantized, with the fake-quant and deploy models agreeing."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import amct_caffe
from amct_caffe import amct, caffe
from amct_caffe.analysis.compare import compare_models
from amct_caffe.engine.layers import layer_class, supported_types
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.errors import ModelFormatError, UnsupportedLayerError
from amct_caffe.proto import caffe_pb2
from tests.helpers import caffemodel_raw_blobs, read_net

REPO = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    """The first Python block of the README's 'Your own layers' section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own layers", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no Python block under 'Your own layers'"
    return match.group(1)


@pytest.fixture
def forget_layers() -> Iterator[None]:
    yield
    for name in ("ScaledTanh", "GainTanh"):
        amct_caffe.unregister_layer(name)


def test_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        forget_layers: None) -> None:
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 12, "the README promises a short example"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "custom.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "act" type: "ScaledTanh" bottom: "x" top: "act" '
        'python_param { param_str: "alpha: 2" } }\n'
    )
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (our own README's example)
    net = namespace["net"]
    assert isinstance(net, caffe.Net)
    x = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)
    out = net.forward(x=x)["act"]
    np.testing.assert_allclose(out, 2 * np.tanh(x.astype(np.float64)), rtol=1e-6)
    assert "ScaledTanh" in caffe.layer_type_list() and "ScaledTanh" not in supported_types()


# -- a learnable custom layer through QAT and PTQ -----------------------------------------------------------
@pytest.fixture
def gain_tanh(forget_layers: None) -> type:
    @amct_caffe.register_layer("GainTanh")
    class GainTanh(amct_caffe.CustomLayer):
        """y = gain[c] * tanh(alpha * x): a learnable per-channel gain (initial value from param_str)."""

        def setup(self, bottoms: Sequence[torch.Tensor]) -> None:
            filler = caffe_pb2.FillerParameter(type="constant", value=float(self.params.get("gain", 1.0)))
            self.blobs.append(self.new_blob([bottoms[0].shape[1]], filler))

        def forward(self, bottoms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            x = bottoms[0]
            gain = self.blobs[0].reshape(1, -1, *([1] * (x.dim() - 2)))
            return [gain * torch.tanh(float(self.params["alpha"]) * x)]

    return GainTanh


MODEL = """
name: "customnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "act1" type: "GainTanh" bottom: "conv1" top: "act1"
        python_param { param_str: '{"alpha": 0.5, "gain": 1.5}' } }
layer { name: "pool1" type: "Pooling" bottom: "act1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1" inner_product_param { num_output: 5 } }
layer { name: "target" type: "DummyData" top: "target" include { phase: TRAIN }
        dummy_data_param { shape { dim: 2 dim: 5 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "loss"
        include { phase: TRAIN } }
"""


def _float_model(folder: Path) -> tuple[str, str]:
    model = folder / "model.prototxt"
    model.write_text(MODEL)
    net = Net(str(model))
    randomize_params(net, 4)
    with torch.no_grad():
        net.engine_layers[2].blobs[0].fill_(1.5)  # the custom layer's gain: its param_str value
    weights = folder / "model.caffemodel"
    net.save(weights)
    return str(model), str(weights)


def _layer(net: caffe_pb2.NetParameter, name: str) -> caffe_pb2.LayerParameter:
    return next(layer for layer in net.layer if layer.name == name)


def _check_saved_pair(prefix: str, x: np.ndarray) -> None:
    """The custom layer stays float in both models; conv1/pool1/ip1 are quantized; the two agree."""
    for kind in ("fake_quant", "deploy"):
        net = read_net(f"{prefix}_{kind}_model.prototxt")
        act = _layer(net, "act1")
        assert act.type == "GainTanh" and '"alpha": 0.5' in act.python_param.param_str
        types = [layer.type for layer in net.layer]
        assert types.count("Quant") >= 2 and types.count("DeQuant") == 3
    blobs = caffemodel_raw_blobs(f"{prefix}_deploy_weights.caffemodel")
    assert len(blobs["act1"]) == 1 and len(blobs["act1"][0].data) == 4  # float, never int8
    assert len(blobs["conv1"][0].int8_data) == 4 * 3 * 3 * 3
    rows = compare_models(f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel",
                          f"{prefix}_deploy_model.prototxt", f"{prefix}_deploy_weights.caffemodel",
                          {"data": x})
    fake = caffe.Net(f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel",
                     caffe.TEST)
    out = fake.forward(data=x)["ip1"]
    row = next(r for r in rows if r.blob == "ip1")
    assert row.max_abs_diff <= 1e-3 * float(np.abs(out).max())


def test_custom_layer_through_qat(tmp_path: Path, gain_tanh: type) -> None:
    model, weights = _float_model(tmp_path)
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_retrain_config(config, model, weights)
    r_model, r_weights = str(tmp_path / "retrain.prototxt"), str(tmp_path / "retrain.caffemodel")
    amct.create_quant_retrain_model(model, weights, config, r_model, r_weights, record)
    assert _layer(read_net(r_model), "act1").type == "GainTanh"
    param = caffe_pb2.SolverParameter(net=r_model, base_lr=0.05, lr_policy="fixed", momentum=0.9, max_iter=3,
                                      random_seed=0, display=0, snapshot_prefix=str(tmp_path / "s"))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(text_format.MessageToString(param))
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(r_weights)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for _ in range(3):
        solver.net.blobs["data"].data[...] = x
        solver.step(1)
    gain = solver.net.params["act1"][0].data
    assert not np.allclose(gain, 1.5), "the custom layer's learnable blob trains"
    trained = str(tmp_path / "trained.caffemodel")
    solver.net.save(trained)
    prefix = str(tmp_path / "out" / "m")
    amct.save_quant_retrain_model(r_model, trained, "Both", prefix, record, config)
    saved_gain = np.array(caffemodel_raw_blobs(f"{prefix}_fake_quant_weights.caffemodel")["act1"][0].data)
    np.testing.assert_allclose(saved_gain, gain, rtol=0, atol=0)
    _check_saved_pair(prefix, x)


def test_custom_layer_through_ptq(tmp_path: Path, gain_tanh: type) -> None:
    model, weights = _float_model(tmp_path)
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, model, weights, batch_num=2)
    graph = amct.init(config, model, weights, record)
    cal_model, cal_weights = str(tmp_path / "cal.prototxt"), str(tmp_path / "cal.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    net = caffe.Net(cal_model, caffe.TEST, weights=cal_weights)
    rng = np.random.default_rng(8)
    for _ in range(2):
        net.forward(data=rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    prefix = str(tmp_path / "out" / "m")
    amct.save_model(graph, "Both", prefix)
    _check_saved_pair(prefix, rng.standard_normal((2, 3, 8, 8)).astype(np.float32))


# -- registration rules ---------------------------------------------------------------------------------
def test_registration_rules(forget_layers: None) -> None:
    with pytest.raises(ValueError, match="built-in"):
        amct_caffe.register_layer("Convolution")(type("C", (amct_caffe.CustomLayer,), {}))
    with pytest.raises(TypeError):
        amct_caffe.register_layer("ScaledTanh")(object)  # type: ignore[type-var]
    with pytest.raises(UnsupportedLayerError, match="register_layer"):
        layer_class("ScaledTanh")

    first = amct_caffe.register_layer("ScaledTanh")(type("A", (amct_caffe.CustomLayer,), {}))
    second = amct_caffe.register_layer("ScaledTanh")(type("B", (amct_caffe.CustomLayer,), {}))
    assert layer_class("ScaledTanh") is second is not first and second.type_name == "ScaledTanh"


def test_param_str_is_never_evaluated(tmp_path: Path, gain_tanh: type) -> None:
    marker = tmp_path / "ran"
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
            'layer { name: "a" type: "GainTanh" bottom: "x" top: "y" python_param { param_str: '
            f'"{{\'alpha\': __import__(\'pathlib\').Path(\'{marker}\').touch()}}" }} }}\n')
    with pytest.raises(ModelFormatError, match="param_str"):
        Net(text_format.Merge(text, caffe_pb2.NetParameter()))
    assert not marker.exists()
