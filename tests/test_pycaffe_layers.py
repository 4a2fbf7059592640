"""The fake-quant layers as Caffe Python layers (amct_caffe.caffe.python_layers) and the pycaffe rewrite.

Expected values are hand computations (docs/amct-reference.md §6.2 Quant, §6.3 DeQuant) and, for the numpy
twins of amct_caffe.quant.numerics / the engine's layers, the torch implementations on many random values with
ties (one formula, two array libraries: they must agree bit for bit). The end-to-end checks run a hand-built
fake-quant model (and, when available, one written by save_quant_retrain_model) rewritten for pycaffe in
the REAL reference Caffe and compare it with the original model in our engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import cli
from amct_caffe.caffe.python_layers import (
    StandaloneBlob,
    fake_quant_data,
    offset_byte,
    quant_scale_d,
    round_away,
    shift_n,
    standalone_layer,
)
from amct_caffe.caffe.rewrite import (
    PYCAFFE_LAYERS_MODULE,
    rewrite_fake_quant_for_pycaffe,
    rewrite_net_for_pycaffe,
)
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.model.blobs import array_to_blob
from amct_caffe.model.io import load_prototxt, save_caffemodel
from amct_caffe.proto import caffe_pb2
from tests.references.quant import quant_layer_codes
from tests.references.real_caffe import REPO, run_reference

SRC = REPO / "src"


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def forward(layer, x: np.ndarray) -> np.ndarray:
    """setup + reshape + forward of a standalone layer on one bottom; returns the top's data."""
    bottom = [StandaloneBlob.from_array(x)]
    top = [StandaloneBlob()]
    if not getattr(layer, "_set_up", False):
        layer.setup(bottom, top)
        layer._set_up = True
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return top[0].data


def quant(scale: float, offset: int) -> object:
    return standalone_layer("Quant", json.dumps({"scale": scale, "offset": offset}))


def dequant(channel_wise: bool, shape: tuple[int, ...]) -> object:
    layer = standalone_layer("DeQuant", json.dumps({"channel_wise": channel_wise}))
    layer.setup([StandaloneBlob(*shape)], [StandaloneBlob()])
    layer._set_up = True
    return layer


# ---------------------------------------------------------------------------------------------------
# the numpy layers on hand values
# ---------------------------------------------------------------------------------------------------
def test_quant_hand_values_with_ties_and_saturation() -> None:
    # s_d = 1/2.0 = 0.5, o_d = -3
    x = np.array([0.25, -0.25, 0.75, -0.75, 100.0, -100.0, 0.0, 0.2], np.float32)
    # x/s: 0.5 -> 1, -0.5 -> -1, 1.5 -> 2, -1.5 -> -2 (ties away); 200 - 3 -> 127; -200 - 3 -> -128; 0.4 -> 0
    expected = np.array([0.5, -0.5, 1.0, -1.0, (127 + 3) * 0.5, (-128 + 3) * 0.5, 0.0, 0.0], np.float32)
    y = forward(quant(2.0, -3), x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)


def test_quant_reconstructs_scale_d_as_double_reciprocal() -> None:
    # scale 7: s_d = 1/7 in double; 0.5 / (1/7.0) = 3.5 exactly in double -> 4 (away), whereas a float32
    # s_d (0.14285715) would give 3.4999998 -> 3.
    assert forward(quant(7.0, 0), np.array([0.5], np.float32))[0] == np.float32(4 * (1 / 7.0))
    # scale 10: float32(0.35) = 0.3499999940395355; / 0.1 in double = 3.49999994 -> 3 (float32 x*10 = 3.5).
    assert forward(quant(10.0, 0), np.array([0.35], np.float32))[0] == np.float32(3 * (1 / 10.0))
    # the JSON scale is read as the float32 proto field: 0.1 means float32(0.1) = 0.10000000149011612
    assert quant_scale_d(0.1) == 1.0 / 0.10000000149011612
    assert quant_scale_d(float(np.float32(1 / 0.0213))) == 1.0 / float(np.float32(1 / 0.0213))


def test_quant_random_values_against_loop_reference() -> None:
    scale = float(np.float32(1 / 0.0213))
    x = (np.random.RandomState(4).randn(300) * 2).astype(np.float32)
    s_d = 1.0 / scale
    expected = ((quant_layer_codes(x, scale, -14) + 14) * s_d).astype(np.float32)
    np.testing.assert_array_equal(forward(quant(scale, -14), x), expected)


def test_quant_backward_is_straight_through_and_in_place_works() -> None:
    layer = quant(4.0, 0)
    blob = StandaloneBlob.from_array(np.array([0.1, 0.4, -0.6], np.float32))
    layer.setup([blob], [blob])
    layer.reshape([blob], [blob])
    layer.forward([blob], [blob])  # in place: top is bottom
    np.testing.assert_array_equal(blob.data, np.array([0.0, 0.5, -0.5], np.float32))
    top, bottom = StandaloneBlob(3), StandaloneBlob(3)
    top.diff[...] = [1.0, -2.0, 3.0]
    layer.backward([top], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, [1.0, -2.0, 3.0])
    untouched = StandaloneBlob(3)
    layer.backward([top], [False], [untouched])
    np.testing.assert_array_equal(untouched.diff, [0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("param_str", "match"),
    [
        ("", "scale"),
        ('{"offset": 1}', "scale"),
        ('{"scale": 0}', "scale"),
        ('{"scale": -2.0}', "scale"),
        ('{"scale": 1e39}', "scale"),  # inf as float32
        ('{"scale": 2.0, "offset": 128}', "offset"),
        ('{"scale": 2.0, "offset": 1.5}', "offset"),
        ("scale=2", "JSON"),
        ("[2.0]", "JSON object"),
    ],
)
def test_quant_rejects_bad_params(param_str: str, match: str) -> None:
    layer = standalone_layer("Quant", param_str)
    with pytest.raises(ValueError, match=match):
        layer.setup([StandaloneBlob(2)], [StandaloneBlob()])


def test_layers_need_one_bottom_and_one_top() -> None:
    for kind in ("Quant", "DeQuant", "AntiQuant"):
        layer = standalone_layer(kind, '{"scale": 1.0}')
        with pytest.raises(ValueError, match="exactly 1 bottom"):
            layer.setup([StandaloneBlob(2), StandaloneBlob(2)], [StandaloneBlob()])


def test_offset_byte_matches_the_engine() -> None:
    from amct_caffe.quant.numerics import offset_byte as engine_offset_byte

    for value in (b"", b"\x00", b"\x7f", b"\x80", b"\xf2", b"\xff", b"\x7f\x01", b"\xfd\x00"):
        assert offset_byte(value) == engine_offset_byte(value)
    assert [offset_byte(v) for v in (b"\xf2", b"\x80", b"\x7f\x01", b"")] == [-14, -128, 127, 0]


@pytest.mark.parametrize(
    ("channel_wise", "shape", "blob"),
    [(True, (2, 5, 3, 3), 5), (False, (2, 5, 3, 3), 1), (True, (2, 5), 1), (True, (2, 5, 3), 1)],
)
def test_dequant_blob_shapes(channel_wise: bool, shape: tuple[int, ...], blob: int) -> None:
    layer = dequant(channel_wise, shape)
    assert [b.data.shape for b in layer.blobs] == [(blob,)] * 3
    assert all(not b.data.any() for b in layer.blobs)


def test_dequant_keeps_blobs_given_by_the_layer_parameter() -> None:
    layer = standalone_layer("DeQuant", '{"channel_wise": true}')
    for _ in range(3):
        layer.blobs.add_blob(2)
    layer.blobs[0].data[...] = [0.5, 0.25]
    layer.setup([StandaloneBlob(1, 2, 1, 1)], [StandaloneBlob()])
    assert len(layer.blobs) == 3 and layer.blobs[0].data.tolist() == [0.5, 0.25]
    wrong = standalone_layer("DeQuant", '{"channel_wise": false}')
    for _ in range(3):
        wrong.blobs.add_blob(2)
    with pytest.raises(ValueError, match=r"3 blobs of shape \[1\]"):
        wrong.setup([StandaloneBlob(1, 2, 1, 1)], [StandaloneBlob()])


def test_dequant_identity_without_shift() -> None:
    layer = dequant(True, (1, 2, 1, 3))
    layer.blobs[0].data[...] = [0.5, 0.25]
    x = np.array([3.3, -1.25, 7.0, 0.625, 1e5, -0.1], np.float32).reshape(1, 2, 1, 3)
    np.testing.assert_array_equal(forward(layer, x), x)


def test_dequant_shift_n_emulation_hand_values() -> None:
    layer = dequant(True, (1, 2, 1, 3))
    layer.blobs[0].data[...] = [0.5, 0.25]
    layer.blobs[1].data[...] = [1.0, 2.0]
    x = np.array([3.3, -1.25, 7.0, 0.625, 1e5, -0.1], np.float32).reshape(1, 2, 1, 3)
    # ch0, deq 0.5, N 1: 3.3 -> 6.6 -> 7 -> 3.5 -> 4 -> 4*0.5*2 = 4;  -1.25 -> -2.5 -> -3 -> -1.5 -> -2 -> -2;
    #                    7.0 -> 14 -> 7 -> 7
    # ch1, deq 0.25, N 2: 0.625 -> 2.5 -> 3 -> 0.75 -> 1 -> 1;  1e5 -> 4e5 -> 1e5 -> clamp 32767 -> 32767;
    #                    -0.1 -> -0.4 -> 0 -> 0
    expected = np.array([4.0, -2.0, 7.0, 1.0, 32767.0, 0.0], np.float32).reshape(1, 2, 1, 3)
    y = forward(layer, x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)
    top, bottom = StandaloneBlob(1, 2, 1, 3), StandaloneBlob(1, 2, 1, 3)
    top.diff[...] = 2.0
    layer.backward([top], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, np.full((1, 2, 1, 3), 2.0, np.float32))


def test_dequant_rejects_bad_shift_bits_and_scales() -> None:
    layer = dequant(True, (1, 2, 1, 1))
    x = np.ones((1, 2, 1, 1), np.float32)
    layer.blobs[0].data[...] = 0.5
    for shift in ([0.0, 3.0], [17.0, 3.0], [1.5, 2.0], [np.nan, 1.0]):
        layer.blobs[1].data[...] = shift
        with pytest.raises(ValueError, match="shift_bit"):
            forward(layer, x)
    layer.blobs[1].data[...] = [1.0, 2.0]
    layer.blobs[0].data[...] = [0.5, 0.0]
    with pytest.raises(ValueError, match="deq_scale"):
        forward(layer, x)


def test_antiquant_is_identity() -> None:
    layer = standalone_layer("AntiQuant", "")
    x = np.array([[1.5, -2.0, 0.0], [3.0, 4.0, -5.0]], np.float32)
    np.testing.assert_array_equal(forward(layer, x), x)
    assert len(layer.blobs) == 0


def test_module_imports_neither_torch_nor_protobuf() -> None:
    code = (
        "import sys; import amct_caffe.caffe.python_layers as m; "
        "bad = sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'google'}); "
        "print(bad, m._LayerBase.__name__)"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "StandaloneLayer"]


# ---------------------------------------------------------------------------------------------------
# the numpy twins equal amct_caffe.quant.numerics and the engine's layers
# ---------------------------------------------------------------------------------------------------
def _values_with_ties(rng: np.random.RandomState, n: int) -> np.ndarray:
    ties = rng.randint(-300, 300, n).astype(np.float64) + 0.5
    near = ties + rng.choice([-1, 1], n) * np.ldexp(1.0, -rng.randint(20, 52, n))
    wide = rng.randn(n) * 10.0 ** rng.randint(-3, 7, n)
    special = np.array([0.0, -0.0, 0.5, -0.5, 0.49999997, -0.49999997, 2.0**52 + 1, 2.0**23 + 0.5,
                        np.inf, -np.inf, np.nan])
    return np.concatenate([ties, near, wide, np.trunc(wide), special])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_away_twin_equals_numerics(dtype) -> None:
    from amct_caffe.quant import numerics

    x = _values_with_ties(np.random.RandomState(0), 4000).astype(dtype)
    ours = round_away(x)
    assert ours.dtype == dtype
    theirs = numerics.round_away(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, theirs)  # NaN positions compare equal
    assert np.array_equal(np.signbit(ours), np.signbit(theirs))
    assert round_away(np.array([2.5, -2.5, 0.5, -1.5], dtype)).tolist() == [3.0, -3.0, 1.0, -2.0]


def test_fake_quant_twin_equals_numerics_and_engine_layer() -> None:
    from amct_caffe.engine.layers import layer_class
    from amct_caffe.quant import numerics

    rng = np.random.RandomState(1)
    for trial in range(20):
        scale = float(np.float32(np.exp(rng.uniform(-3, 6))))
        offset = int(rng.randint(-128, 128))
        s_d = quant_scale_d(scale)
        # values on the grid's ties (x / s_d = k + 0.5 in double), beyond it (saturation), and random ones
        k = rng.randint(-200, 200, 500).astype(np.float64)
        x = np.concatenate([((k + 0.5) * s_d), rng.randn(500) * 150 * s_d]).astype(np.float32)
        ours = fake_quant_data(x, s_d, offset)
        want = numerics.fake_quant_data(torch.from_numpy(x.astype(np.float64)),
                                        torch.tensor(s_d, dtype=torch.float64), offset)
        np.testing.assert_array_equal(ours, want.to(torch.float32).numpy(), err_msg=f"trial {trial}")

        lp = caffe_pb2.LayerParameter(name="q", type="Quant", bottom=["x"], top=["y"])
        lp.quant_param.scale = scale
        lp.quant_param.offset = bytes([offset & 0xFF])
        layer = layer_class("Quant")(lp, caffe_pb2.TEST, torch.device("cpu"))
        layer.setup([torch.from_numpy(x)])
        with torch.no_grad():
            engine = layer.forward([torch.from_numpy(x)])[0].numpy()
        param_str = json.loads(rewrite_net_for_pycaffe(_net_with(lp))[0].layer[0].python_param.param_str)
        np.testing.assert_array_equal(forward(standalone_layer("Quant", json.dumps(param_str)), x), engine)


def _net_with(lp: caffe_pb2.LayerParameter) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    net.layer.add().CopyFrom(lp)
    return net


def test_shift_n_twin_equals_engine_layer() -> None:
    from amct_caffe.engine.layers import layer_class

    rng = np.random.RandomState(2)
    lp = caffe_pb2.LayerParameter(name="dq", type="DeQuant", bottom=["x"], top=["y"])
    lp.dequant_param.channel_wise = True
    deq = np.float32(np.exp(rng.uniform(-8, -2, 6))).astype(np.float32)
    shift = rng.randint(1, 17, 6).astype(np.float32)
    acc = rng.randint(-(2**22), 2**22, (3, 6, 4, 5)).astype(np.float32)  # INT32-like accumulators
    acc[0, :, 0, :] = (rng.randint(-64, 64, (6, 5)) * 2 + 1) * np.exp2(shift - 1)[:, None]  # t / 2^N ties
    x = (acc * deq[None, :, None, None]).astype(np.float32)
    x[1] += (rng.randn(6, 4, 5) * deq[:, None, None]).astype(np.float32)  # off-grid values
    layer = layer_class("DeQuant")(lp, caffe_pb2.TEST, torch.device("cpu"))
    layer.setup([torch.from_numpy(x)])
    with torch.no_grad():
        layer.blobs[0].copy_(torch.from_numpy(deq))
        layer.blobs[1].copy_(torch.from_numpy(shift))
        engine = layer.forward([torch.from_numpy(x)])[0].numpy()
    np.testing.assert_array_equal(shift_n(x, deq, shift), engine)
    ours = dequant(True, x.shape)
    ours.blobs[0].data[...] = deq
    ours.blobs[1].data[...] = shift
    np.testing.assert_array_equal(forward(ours, x), engine)


# ---------------------------------------------------------------------------------------------------
# the rewrite
# ---------------------------------------------------------------------------------------------------
FAKE_QUANT = r"""
name: "fq"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1_quant_layer" type: "Quant" bottom: "data" top: "conv1_quant_layer"
        quant_param { scale: 16 offset: "\375" with_offset: true object_layer: "conv1" } }
layer { name: "conv1" type: "Convolution" bottom: "conv1_quant_layer" top: "conv1_dequant_layer_in"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv1_dequant_layer" type: "DeQuant" bottom: "conv1_dequant_layer_in" top: "conv1"
        dequant_param { channel_wise: true layer_type: "Convolution" object_layer: "conv1" } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1_quant_layer" type: "Quant" bottom: "conv1" top: "ip1_quant_layer"
        quant_param { scale: IP1_SCALE offset: "\200" with_offset: true object_layer: "ip1" } }
layer { name: "ip1" type: "InnerProduct" bottom: "ip1_quant_layer" top: "ip1_dequant_layer_in"
        inner_product_param { num_output: 5 } }
layer { name: "ip1_dequant_layer" type: "DeQuant" bottom: "ip1_dequant_layer_in" top: "ip1"
        dequant_param { channel_wise: true layer_type: "InnerProduct" object_layer: "ip1" } }
layer { name: "ip1_anti_quant_layer" type: "AntiQuant" bottom: "ip1" top: "out" }
""".replace("IP1_SCALE", repr(float(np.float32(1 / 0.0173))))


def test_rewrite_turns_fake_quant_layers_into_python_layers(tmp_path: Path) -> None:
    model = tmp_path / "fq.prototxt"
    model.write_text(FAKE_QUANT)
    out = tmp_path / "sub" / "fq_pycaffe.prototxt"
    counts = rewrite_fake_quant_for_pycaffe(model, out)
    assert counts == {"Quant": 2, "DeQuant": 2, "AntiQuant": 1}
    original = text_format.Merge(FAKE_QUANT, caffe_pb2.NetParameter())
    written = text_format.Merge(out.read_text(), caffe_pb2.NetParameter())
    assert written.name == "fq"
    assert [(ly.name, list(ly.bottom), list(ly.top)) for ly in written.layer] == \
        [(ly.name, list(ly.bottom), list(ly.top)) for ly in original.layer]
    by_name = {ly.name: ly for ly in written.layer}
    for name in ("data", "conv1", "relu1", "ip1"):
        assert by_name[name] == next(ly for ly in original.layer if ly.name == name)
    expected = {
        "conv1_quant_layer": ("Quant", {"scale": 16.0, "offset": -3, "with_offset": True,
                                        "object_layer": "conv1"}),
        "ip1_quant_layer": ("Quant", {"scale": float(np.float32(1 / 0.0173)), "offset": -128,
                                      "with_offset": True, "object_layer": "ip1"}),
        "conv1_dequant_layer": ("DeQuant", {"channel_wise": True, "layer_type": "Convolution",
                                            "object_layer": "conv1"}),
        "ip1_dequant_layer": ("DeQuant", {"channel_wise": True, "layer_type": "InnerProduct",
                                          "object_layer": "ip1"}),
        "ip1_anti_quant_layer": ("AntiQuant", {}),
    }
    for name, (kind, params) in expected.items():
        layer = by_name[name]
        assert layer.type == "Python"
        assert layer.python_param.module == PYCAFFE_LAYERS_MODULE == "amct_caffe.caffe.python_layers"
        assert layer.python_param.layer == kind
        assert json.loads(layer.python_param.param_str) == params
        assert not layer.HasField("quant_param") and not layer.HasField("dequant_param")
        # DeQuant blobs are fixed factors: no learning, no weight decay in a stock solver
        want_params = [(0.0, 0.0)] * 3 if kind == "DeQuant" else []
        assert [(p.lr_mult, p.decay_mult) for p in layer.param] == want_params
    # the text names no AMCT field, so a stock caffe.proto parses it
    assert "quant_param" not in out.read_text()


def test_rewrite_keeps_dequant_param_specs_and_rules(tmp_path: Path) -> None:
    text = """
    layer { name: "dq" type: "DeQuant" bottom: "a" top: "b" param { lr_mult: 0 } include { phase: TEST }
            dequant_param { channel_wise: false shift_bit: 2 } }
    """
    out, counts = rewrite_net_for_pycaffe(text_format.Merge(text, caffe_pb2.NetParameter()))
    assert counts == {"Quant": 0, "DeQuant": 1, "AntiQuant": 0}
    layer = out.layer[0]
    assert len(layer.param) == 1 and layer.include[0].phase == caffe_pb2.TEST
    assert json.loads(layer.python_param.param_str) == {"channel_wise": False, "shift_bit": [2.0]}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('layer { name: "c" type: "Convolution" bottom: "a" top: "b" }', "no Quant, DeQuant or AntiQuant"),
        ('layer { name: "c_act_retrain" type: "ActivationQAT" bottom: "a" top: "b" }', "retrain"),
        ('layer { name: "q" type: "Quant" bottom: "a" top: "b" quant_param { offset: "\\000" } }',
         "Layer 'q'.*scale"),
        ('layer { name: "q" type: "Quant" bottom: "a" top: "b" quant_param { scale: -1 } }', "scale"),
        ("layer { name: ", "Cannot parse"),
    ],
)
def test_rewrite_errors_write_nothing(tmp_path: Path, text: str, match: str) -> None:
    model = tmp_path / "in.prototxt"
    model.write_text(text)
    out = tmp_path / "out.prototxt"
    with pytest.raises(ModelFormatError, match=match):
        rewrite_fake_quant_for_pycaffe(model, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.prototxt"]


def test_cli_pycaffe_rewrite(tmp_path: Path, capsys) -> None:
    model = tmp_path / "fq.prototxt"
    model.write_text(FAKE_QUANT)
    out = tmp_path / "fq_py.prototxt"
    assert cli.main(["pycaffe-rewrite", str(model), str(out)]) == 0
    assert "2 Quant, 2 DeQuant, 1 AntiQuant" in capsys.readouterr().out
    assert load_prototxt(out).layer[1].type == "Python"
    assert cli.main(["pycaffe-rewrite", str(tmp_path / "missing.prototxt"), str(out)]) == 1
    assert "missing.prototxt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["pycaffe-rewrite", "--help"])
    assert exc.value.code == 0
    assert "MODEL_IN" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# end to end: the rewritten model in the real Caffe equals the original in our engine
# ---------------------------------------------------------------------------------------------------
def _fake_quant_weights(seed: int) -> dict[str, list[np.ndarray]]:
    """Weights of FAKE_QUANT. conv1 is grid-exact (power-of-two s_d and s_w, integer bias codes), so its
    accumulators are exact integers in float32 whatever the summation order, and DeQuant's shift-N (with
    ties at t / 2^N) and the following Quant see identical values in both engines; ip1 is an ordinary
    ARQ-style fake-quantized layer with a float bias."""
    rng = np.random.RandomState(seed)
    s_d = 2.0**-4
    s_w = np.array([2.0**-6, 2.0**-7, 2.0**-5, 2.0**-6], np.float32)
    codes = rng.randint(-128, 128, (4, 3, 3, 3))
    codes[:, 0, 0, 0] = 127
    conv_w = (codes * s_w[:, None, None, None]).astype(np.float32)
    deq1 = (s_d * s_w).astype(np.float32)
    conv_b = (rng.randint(-500, 500, 4) * deq1).astype(np.float32)
    ip_codes = rng.randint(-128, 128, (5, 144))
    ip_codes[:, 0] = -128
    s_w2 = np.float32(0.0031)
    ip_w = (ip_codes * s_w2).astype(np.float32)
    ip_b = rng.randn(5).astype(np.float32)
    return {
        "conv1": [conv_w, conv_b],
        "conv1_dequant_layer": [deq1, np.array([1, 2, 3, 1], np.float32), np.zeros(4, np.float32)],
        "ip1": [ip_w, ip_b],
        "ip1_dequant_layer": [np.array([0.0173 * 0.0031], np.float32), np.zeros(1, np.float32),
                              np.zeros(1, np.float32)],
    }


def _write_caffemodel(net_text: str, weights: dict[str, list[np.ndarray]], path: Path) -> None:
    """A caffemodel as AMCT writes it: every layer's full parameter (AMCT fields included) plus blobs."""
    net = text_format.Merge(net_text, caffe_pb2.NetParameter())
    for layer in net.layer:
        for array in weights.get(layer.name, []):
            array_to_blob(array, layer.blobs.add())
    save_caffemodel(net, path)


def _engine_blobs(model: str | Path, weights: str | Path, inputs: dict[str, np.ndarray],
                  names: list[str]) -> dict[str, np.ndarray]:
    net = Net(str(model), caffe_pb2.TEST, weights=str(weights))
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    with torch.no_grad():
        net.run()
    return {name: net.tensor(name).detach().cpu().numpy().copy() for name in names}


def _assert_same(ours: np.ndarray, ref: np.ndarray, name: str, exact: bool) -> None:
    assert ours.shape == ref.shape, name
    if exact:
        np.testing.assert_array_equal(ours, ref, err_msg=name)
    else:  # 1e-5 relative to the blob's magnitude (float32 sums in another order)
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.reference
def test_rewritten_model_in_reference_caffe_equals_engine(tmp_path: Path, reference_caffe, monkeypatch):
    model = tmp_path / "fq.prototxt"
    model.write_text(FAKE_QUANT)
    weights = tmp_path / "fq.caffemodel"
    params = _fake_quant_weights(seed=7)
    _write_caffemodel(FAKE_QUANT, params, weights)
    rewritten = tmp_path / "fq_pycaffe.prototxt"
    rewrite_fake_quant_for_pycaffe(model, rewritten)

    rng = np.random.RandomState(8)
    x = (rng.randn(2, 3, 6, 6) * 3).astype(np.float32)
    x[0, 0, 0, :] = (rng.randint(-100, 100, 6) + 0.5) / 16  # ties of the first Quant (s_d = 1/16)
    x[1, 2, 5, :] = [9.0, -9.0, 100.0, -100.0, 8.1, -7.9]  # saturation

    monkeypatch.setenv("PYTHONPATH", str(SRC))  # run_reference passes the environment through
    ref = run_reference(rewritten, inputs={"data": x}, weights=weights)
    exact = ["conv1_quant_layer", "conv1_dequant_layer_in", "conv1", "ip1_quant_layer"]
    ours = _engine_blobs(model, weights, {"data": x}, exact + ["ip1", "out"])
    for name in exact:
        _assert_same(ours[name], ref["blobs"][name], name, exact=True)
    for name in ("ip1", "out"):
        _assert_same(ours[name], ref["blobs"][name], name, exact=False)
    # the DeQuant blobs loaded into the Python layers by layer name
    for i, array in enumerate(params["conv1_dequant_layer"]):
        np.testing.assert_array_equal(ref["params"][f"conv1_dequant_layer/{i}"], array)
    # the shift-N emulation did something: it differs from the identity (ties and clamps included)
    assert not np.array_equal(ref["blobs"]["conv1"], np.maximum(ref["blobs"]["conv1_dequant_layer_in"], 0))


# ---------------------------------------------------------------------------------------------------
# end to end on a model written by save_quant_retrain_model
# ---------------------------------------------------------------------------------------------------
FLOAT_MODEL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "data" top: "conv2"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "cat" type: "Concat" bottom: "conv1" bottom: "conv2" top: "cat" }
layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc" inner_product_param { num_output: 5 } }
"""

# conv1 and conv2 read the network input, so their shared Quant sees identical values in both engines; fc
# (after float sums) stays float, so no quantization step can flip between the engines.
FLOAT_CONFIG = {
    "version": 1,
    "conv1": {"retrain_enable": True,
              "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 2.7, "clip_min": -2.2,
                                      "fixed_min": False},
              "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True}},
    "conv2": {"retrain_enable": True,
              "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 2.7, "clip_min": -2.2,
                                      "fixed_min": False},
              "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": False}},
    "fc": {"retrain_enable": False},
}


@pytest.mark.reference
def test_saved_fake_quant_model_in_reference_caffe_equals_engine(tmp_path: Path, reference_caffe,
                                                                 monkeypatch) -> None:
    from amct_caffe import amct
    from amct_caffe.engine.randomize import randomize_params

    model = tmp_path / "model.prototxt"
    model.write_text(FLOAT_MODEL)
    net = Net(text_format.Merge(FLOAT_MODEL, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    randomize_params(net, seed=5)
    weights = tmp_path / "model.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FLOAT_CONFIG))
    retrain = [str(tmp_path / n) for n in ("retrain.prototxt", "retrain.caffemodel", "record.txt")]
    amct.create_quant_retrain_model(str(model), str(weights), str(config), *retrain)
    prefix = tmp_path / "saved" / "small"
    amct.save_quant_retrain_model(retrain[0], retrain[1], "Fakequant", str(prefix))
    fq_model = Path(f"{prefix}_fake_quant_model.prototxt")
    fq_weights = Path(f"{prefix}_fake_quant_weights.caffemodel")
    assert fq_model.is_file() and fq_weights.is_file()
    rewritten = tmp_path / "small_pycaffe.prototxt"
    counts = rewrite_fake_quant_for_pycaffe(fq_model, rewritten)
    assert counts["Quant"] >= 1 and counts["DeQuant"] == 2

    x = (np.random.RandomState(9).randn(2, 3, 8, 8) * 1.5).astype(np.float32)
    monkeypatch.setenv("PYTHONPATH", str(SRC))
    ref = run_reference(rewritten, inputs={"data": x}, weights=fq_weights)
    quant_tops = [ly.top[0] for ly in load_prototxt(fq_model).layer if ly.type == "Quant"]
    ours = _engine_blobs(fq_model, fq_weights, {"data": x}, quant_tops + ["conv1", "conv2", "fc"])
    for name in quant_tops:
        _assert_same(ours[name], ref["blobs"][name], name, exact=True)
    for name in ("conv1", "conv2", "fc"):
        _assert_same(ours[name], ref["blobs"][name], name, exact=False)
