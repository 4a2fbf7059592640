"""``type: "Python"`` layers: nothing is imported without the opt-in (argument, block, CLI flag or
environment variable); with it, a pycaffe layer class runs as pycaffe runs it (setup/reshape/forward/
backward, param_str, phase, learnable blobs), forward and backward checked against hand computations."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import amct_caffe
from amct_caffe import caffe
from amct_caffe.cli import main as cli_main
from amct_caffe.engine.layers.base import TEST, TRAIN
from amct_caffe.engine.layers.python import ENV_VAR
from amct_caffe.engine.net import Net
from amct_caffe.errors import PythonLayerNotAllowedError
from tests.helpers import parse_net

#: A pycaffe layer: top = scale * bottom + a learnable offset blob; the marker file records its import.
LAYER_MODULE = '''
from pathlib import Path
from amct_caffe import caffe

Path({marker!r}).write_text("imported")


class ScaleShift(caffe.Layer):
    def setup(self, bottom, top):
        self.scale = float(eval_free(self.param_str))
        self.seen_phase = self.phase
        self.blobs.add_blob(bottom[0].channels)
        self.blobs[0].data[...] = 0.5

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        shift = self.blobs[0].data.reshape(1, -1, *([1] * (bottom[0].data.ndim - 2)))
        top[0].data[...] = self.scale * bottom[0].data + shift

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.scale * top[0].diff
        axes = tuple(i for i in range(top[0].diff.ndim) if i != 1)
        self.blobs[0].diff[...] = top[0].diff.sum(axis=axes)


def eval_free(text):
    return text.split("=")[1]
'''


def _write_module(folder: Path, name: str) -> Path:
    marker = folder / f"{name}.imported"
    (folder / f"{name}.py").write_text(LAYER_MODULE.format(marker=str(marker)))
    return marker


def _prototxt(folder: Path, module: str, train: bool = False) -> Path:
    loss = ('layer { name: "t" type: "DummyData" top: "t" dummy_data_param { shape { dim: 2 dim: 3 dim: 2 '
            'dim: 2 } } }\nlayer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }\n'
            if train else "")
    text = textwrap.dedent(f'''\
        layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 3 dim: 2 dim: 2 }} }} }}
        layer {{ name: "py" type: "Python" bottom: "x" top: "y"
                 python_param {{ module: "{module}" layer: "ScaleShift" param_str: "scale=3" }} }}
        ''') + loss
    path = folder / f"{module}.prototxt"
    path.write_text(text)
    return path


@pytest.fixture
def layer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A fresh layer module on sys.path (a unique name per test), its marker file and its prototxt."""
    name = "pylayer_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    marker = _write_module(tmp_path, name)
    yield name, marker, tmp_path
    sys.modules.pop(name, None)


def _x() -> np.ndarray:
    return np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 10


# -- without the opt-in nothing is imported ---------------------------------------------------------------
def test_no_opt_in_raises_before_import(layer_module) -> None:
    name, marker, folder = layer_module
    with pytest.raises(PythonLayerNotAllowedError, match="allow_python_layers=True") as info:
        caffe.Net(str(_prototxt(folder, name)), caffe.TEST)
    message = str(info.value)
    assert ENV_VAR in message and "--allow-python-layers" in message and "'py'" in message
    assert f"{name}.prototxt" in message
    assert not marker.exists() and name not in sys.modules


def test_explicit_false_wins_over_the_environment(layer_module, monkeypatch: pytest.MonkeyPatch) -> None:
    name, marker, folder = layer_module
    monkeypatch.setenv(ENV_VAR, "1")
    with pytest.raises(PythonLayerNotAllowedError):
        caffe.Net(str(_prototxt(folder, name)), caffe.TEST, allow_python_layers=False)
    with amct_caffe.allow_python_layers(False), pytest.raises(PythonLayerNotAllowedError):
        Net(str(_prototxt(folder, name)))
    assert not marker.exists()


@pytest.mark.parametrize("value", ["0", "", "no"])
def test_environment_values_that_do_not_opt_in(layer_module, monkeypatch: pytest.MonkeyPatch,
                                               value: str) -> None:
    name, marker, folder = layer_module
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(PythonLayerNotAllowedError):
        Net(str(_prototxt(folder, name)))
    assert not marker.exists()


def test_cli_without_flag_fails_with_the_hint(layer_module, capsys: pytest.CaptureFixture[str]) -> None:
    name, marker, folder = layer_module
    assert cli_main(["run", str(_prototxt(folder, name))]) == 1
    assert "--allow-python-layers" in capsys.readouterr().err
    assert not marker.exists()


# -- with the opt-in the layer runs as in pycaffe ------------------------------------------------------
def _check_forward(net: caffe.Net) -> None:
    out = net.forward(x=_x())["y"]
    np.testing.assert_allclose(out, 3 * _x() + 0.5, rtol=1e-6)


def test_argument_opt_in_runs_the_layer(layer_module) -> None:
    name, marker, folder = layer_module
    net = caffe.Net(str(_prototxt(folder, name)), caffe.TEST, allow_python_layers=True)
    assert marker.exists()
    _check_forward(net)
    impl = net.engine_layers[1].impl
    assert impl.param_str == "scale=3" and impl.param_str_ == "scale=3" and impl.seen_phase == caffe.TEST
    assert [p.data.tolist() for p in net.params["py"]] == [[0.5, 0.5, 0.5]]


def test_environment_opt_in(layer_module, monkeypatch: pytest.MonkeyPatch) -> None:
    name, _, folder = layer_module
    monkeypatch.setenv(ENV_VAR, "1")
    _check_forward(caffe.Net(str(_prototxt(folder, name)), caffe.TEST))


def test_block_opt_in(layer_module) -> None:
    name, _, folder = layer_module
    with amct_caffe.allow_python_layers():
        net = caffe.Net(str(_prototxt(folder, name)), caffe.TEST)
    _check_forward(net)


def test_cli_flag_opt_in(layer_module, tmp_path: Path) -> None:
    name, marker, folder = layer_module
    np.save(tmp_path / "x.npy", _x())
    out = tmp_path / "out.npz"
    code = cli_main(["run", str(_prototxt(folder, name)), "--input", f"x={tmp_path / 'x.npy'}",
                     "--save", str(out), "--allow-python-layers"])
    assert code == 0 and marker.exists()
    np.testing.assert_allclose(np.load(out)["y"], 3 * _x() + 0.5, rtol=1e-6)


def test_backward_gives_bottom_and_blob_gradients(layer_module) -> None:
    """Upstream diff of the loss 0.5/N * sum((y - t)^2) through y = 3x + shift: dx = 3 (y - t)/N,
    dshift = sum over N, H, W of (y - t)/N (Caffe's EuclideanLoss divides by the batch size)."""
    name, _, folder = layer_module
    net = Net(str(_prototxt(folder, name, train=True)), TRAIN, allow_python_layers=True)
    x = torch.from_numpy(_x()).requires_grad_(True)
    net.set_tensor("x", x)
    shift = net.engine_layers[1].blobs[0]
    shift.requires_grad_(True)
    with torch.enable_grad():
        net.run(1)  # from the Python layer on: the Input layer would detach x
        net.loss().backward()
    t = net.tensor("t").detach().numpy()
    residual = (3 * _x() + 0.5 - t) / 2
    np.testing.assert_allclose(x.grad.numpy(), 3 * residual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shift.grad.numpy(), residual.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_shape_pass_calls_reshape_only(layer_module) -> None:
    """Caffe's Net::Init runs setup and reshape, never forward: a layer whose forward fails on the
    placeholder zeros still builds."""
    name, _, folder = layer_module
    module = folder / f"{name}.py"
    module.write_text(module.read_text().replace(
        "    def forward(self, bottom, top):\n",
        "    def forward(self, bottom, top):\n        assert bottom[0].data.any(), 'zeros'\n"))
    net = caffe.Net(str(_prototxt(folder, name)), caffe.TEST, allow_python_layers=True)
    _check_forward(net)


def test_blob_view_properties() -> None:
    from amct_caffe.engine.layers.python import PyBlob

    blob = PyBlob(np.zeros((2, 3, 4, 5), np.float32))
    assert (blob.num, blob.channels, blob.height, blob.width, blob.count) == (2, 3, 4, 5, 120)
    blob.reshape(7, 2)
    assert blob.shape == (7, 2) and blob.diff.shape == (7, 2) and (blob.height, blob.width) == (1, 1)


def test_base_class_requires_forward() -> None:
    layer = caffe.Layer()
    assert layer.param_str == "" and layer.phase == TEST
    with pytest.raises(NotImplementedError):
        layer.forward([], [])


def test_amct_pycaffe_quant_layer_runs_in_the_engine_with_opt_in() -> None:
    """AMCT's stock-pycaffe Quant layer (amct_caffe.caffe.python_layers) gives the native Quant's values."""
    head = ('layer { name: "x" type: "Input" top: "x" '
            'input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }\n')
    python = head + ('layer { name: "q" type: "Python" bottom: "x" top: "y" python_param { module: '
                     '"amct_caffe.caffe.python_layers" layer: "Quant" param_str: "{\\"scale\\": 4.0, '
                     '\\"offset\\": 3}" } }\n')
    native = head + ('layer { name: "q" type: "Quant" bottom: "x" top: "y" quant_param { scale: 4.0 '
                     'offset: "\\003" } }\n')
    x = np.linspace(-40, 40, 24, dtype=np.float32).reshape(2, 3, 2, 2)
    outs = []
    for text in (python, native):
        net = Net(parse_net(text), TEST, allow_python_layers=True)
        net.set_tensor("x", torch.from_numpy(x))
        net.run()
        outs.append(net.tensor("y").numpy().copy())
    np.testing.assert_array_equal(outs[0], outs[1])
    assert len(np.unique(outs[0])) > 10
