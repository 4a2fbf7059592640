"""Integer emulation of the deploy model (emulation/integer.py, loaded by emulation/loader.py) and fake-quant
vs deploy agreement.

The deploy/fake-quant model pairs are written here by hand in the format save_quant_retrain_model writes
(docs/design.md): one prototxt for both; the deploy caffemodel holds
the quantized weights in ``int8_data``, the biases in ``int32_data`` and one ``uint64_data`` DeQuant blob
(zero-extended float32 bits of deq_scale); the fake-quant caffemodel holds ``w_hat = q_w * s_w``, the
bias ``b_q * deq_scale`` and the DeQuant blobs ``[deq_scale, 0, 0]``. The expected deploy values come from
the numpy references (tests/references) in np.int64 arithmetic (codes, padding with the real zero, exact
sums, Caffe's AVE pooling windows), never from the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from amct_caffe import caffe
from amct_caffe.analysis.compare import compare_models
from amct_caffe.analysis.render import format_agreement
from amct_caffe.emulation.integer import (
    IntegerConvolution,
    IntegerDeQuant,
    IntegerQuant,
    integer_blob_scales,
    set_quant_formula,
)
from amct_caffe.emulation.loader import load_net
from amct_caffe.engine.layers import LayerVariant
from amct_caffe.engine.net import Net
from amct_caffe.errors import ConfigError, ModelFormatError, WeightShapeError
from amct_caffe.model.blobs import array_to_blob
from amct_caffe.model.io import load_caffemodel, save_caffemodel
from amct_caffe.proto import caffe_pb2
from tests.helpers import parse_net
from tests.references import layers, quant


def centred(q: np.ndarray, o: int) -> np.ndarray:
    """The codes minus their offset, in int64: the values the integer layers multiply (padding adds 0)."""
    return q.astype(np.int64) - o


def int_conv(q: np.ndarray, o: int, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int) -> np.ndarray:
    """INT64 convolution of the centred codes plus the INT32 bias (exact sums)."""
    return layers.conv2d(centred(q, o), w, b, stride, pad, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# a deploy / fake-quant pair, written by hand
# ---------------------------------------------------------------------------------------------------
def quant_param(s_d: float, o_d: int, consumers: str) -> str:
    scale = np.float32(1.0 / s_d)
    byte = "\\%03o" % (o_d & 0xFF)
    return (f'quant_param {{ scale: {float(scale)!r} offset: "{byte}" with_offset: true '
            f'object_layer: "{consumers}" }}')


PAIR = """
name: "tiny_deploy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1_quant_layer" type: "Quant" bottom: "data" top: "conv1_quant_layer" Q1 }
layer { name: "conv1" type: "Convolution" bottom: "conv1_quant_layer" top: "conv1_dequant_layer_in"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "conv1_dequant_layer" type: "DeQuant" bottom: "conv1_dequant_layer_in" top: "conv1"
        dequant_param { channel_wise: true layer_type: "Convolution" object_layer: "conv1" } }
layer { name: "conv2" type: "Convolution" bottom: "conv1_quant_layer" top: "conv2_dequant_layer_in"
        convolution_param { num_output: 4 kernel_size: 2 pad: 1 bias_term: false } }
layer { name: "conv2_dequant_layer" type: "DeQuant" bottom: "conv2_dequant_layer_in" top: "conv2"
        dequant_param { channel_wise: true layer_type: "Convolution" object_layer: "conv2" } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool_quant_layer" type: "Quant" bottom: "conv1" top: "pool_quant_layer" QP }
layer { name: "pool" type: "Pooling" bottom: "pool_quant_layer" top: "pool_dequant_layer_in"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_dequant_layer" type: "DeQuant" bottom: "pool_dequant_layer_in" top: "pool"
        dequant_param { channel_wise: false layer_type: "Pooling" object_layer: "pool" } }
layer { name: "fc_quant_layer" type: "Quant" bottom: "pool" top: "fc_quant_layer" QF }
layer { name: "fc" type: "InnerProduct" bottom: "fc_quant_layer" top: "fc_dequant_layer_in"
        inner_product_param { num_output: 5 } }
layer { name: "fc_dequant_layer" type: "DeQuant" bottom: "fc_dequant_layer_in" top: "fc"
        dequant_param { channel_wise: false layer_type: "InnerProduct" object_layer: "fc" } }
layer { name: "deconv_quant_layer" type: "Quant" bottom: "conv2" top: "deconv_quant_layer" QD }
layer { name: "deconv" type: "Deconvolution" bottom: "deconv_quant_layer" top: "deconv_dequant_layer_in"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "deconv_dequant_layer" type: "DeQuant" bottom: "deconv_dequant_layer_in" top: "deconv"
        dequant_param { channel_wise: true layer_type: "Deconvolution" object_layer: "deconv" } }
"""

#: (s_d, o_d) of each Quant: non-zero offsets everywhere (o_d = -128 would be a ReLU output's usual value)
FACTORS = {
    "conv1_quant_layer": (0.0213, -14),
    "pool_quant_layer": (0.0117, -100),
    "fc_quant_layer": (0.0061, -90),
    "deconv_quant_layer": (0.0174, 9),
}


def pair_text() -> str:
    text = PAIR
    for key, name, consumers in (("Q1", "conv1_quant_layer", "conv1-conv2"),
                                 ("QP", "pool_quant_layer", "pool"), ("QF", "fc_quant_layer", "fc"),
                                 ("QD", "deconv_quant_layer", "deconv")):
        s_d, o_d = FACTORS[name]
        text = text.replace(f" {key} ", " " + quant_param(s_d, o_d, consumers) + " ")
    return text


class Pair:
    """Float weights -> ARQ codes, INT32 biases and deq_scales, and the two caffemodels."""

    # layer: (weight shape, bias?, ARQ axis (None: per tensor), input Quant)
    LAYERS = {
        "conv1": ((4, 3, 3, 3), True, 0, "conv1_quant_layer"),
        "conv2": ((4, 3, 2, 2), False, 0, "conv1_quant_layer"),
        "fc": ((5, 4 * 3 * 3), True, None, "fc_quant_layer"),
        "deconv": ((4, 6, 3, 3), True, 1, "deconv_quant_layer"),
    }

    def __init__(self, tmp: Path, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.text = pair_text()
        self.q: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray | None] = {}
        self.deq: dict[str, np.ndarray] = {}
        deploy, fake = caffe_pb2.NetParameter(name="tiny_deploy"), caffe_pb2.NetParameter(name="tiny_deploy")
        for name, (shape, has_bias, axis, quant_layer) in self.LAYERS.items():
            w = (rng.standard_normal(shape) * 0.3).astype(np.float32)
            s_w = quant.arq_scales(w, axis is not None, axis or 0)
            q = quant.arq_codes(w, s_w, axis is not None, axis or 0).astype(np.int8)
            s_d = np.float32(FACTORS[quant_layer][0])
            deq = (np.float64(s_d) * s_w.astype(np.float64)).astype(np.float32)
            self.q[name], self.deq[name] = q, deq
            w_hat = (q.astype(np.float32) * s_w.reshape([-1 if a == axis else 1 for a in range(len(shape))])
                     if axis is not None else q.astype(np.float32) * s_w[0]).astype(np.float32)
            bq = None
            d_layer, f_layer = deploy.layer.add(name=name), fake.layer.add(name=name)
            array_to_blob(q, d_layer.blobs.add(), kind="int8")
            array_to_blob(w_hat, f_layer.blobs.add())
            if has_bias:
                n_out = shape[axis] if axis is not None else shape[0]
                b = (rng.standard_normal(n_out) * 0.5).astype(np.float32)
                exact = b.astype(np.float64) / (np.float64(s_d) * s_w.astype(np.float64))
                bq = quant.round_away(exact).astype(np.int32)
                array_to_blob(bq, d_layer.blobs.add(), kind="int32")
                b_hat = (bq.astype(np.float64) * (deq.astype(np.float64) if deq.size > 1 else deq[0])).astype(
                    np.float32)
                array_to_blob(b_hat, f_layer.blobs.add())
            self.b[name] = bq
            self._dequant(deploy, fake, name, deq)
        s_pool = np.float32(FACTORS["pool_quant_layer"][0])
        self.deq["pool"] = np.array([s_pool], np.float32)
        self._dequant(deploy, fake, "pool", self.deq["pool"])
        self.deploy_path, self.fake_path = tmp / "tiny_deploy.caffemodel", tmp / "tiny_fake.caffemodel"
        self.proto_path = tmp / "tiny_model.prototxt"
        self.proto_path.write_text(self.text)
        save_caffemodel(deploy, self.deploy_path)
        save_caffemodel(fake, self.fake_path)

    @staticmethod
    def _dequant(deploy: caffe_pb2.NetParameter, fake: caffe_pb2.NetParameter, name: str,
                 deq: np.ndarray) -> None:
        # packed by hand (AMCT reference §7.3)
        packed = deq.astype(np.float32).view(np.uint32).astype(np.uint64)
        array_to_blob(packed, deploy.layer.add(name=f"{name}_dequant_layer").blobs.add(), kind="uint64")
        f_layer = fake.layer.add(name=f"{name}_dequant_layer")
        for values in (deq, np.zeros_like(deq), np.zeros_like(deq)):
            array_to_blob(values.astype(np.float32), f_layer.blobs.add())

    def reference(self, x: np.ndarray, codes=quant.ascend_quant_codes) -> dict[str, np.ndarray]:
        """Every blob of the deploy net, computed in numpy (int64 sums)."""
        def qp(name: str) -> tuple[np.float32, int]:
            s_d, o_d = FACTORS[name]
            return np.float32(1.0 / s_d), o_d

        out: dict[str, np.ndarray] = {}
        s1, o1 = qp("conv1_quant_layer")
        out["conv1_quant_layer"] = q1 = codes(x, s1, o1)
        out["conv1_dequant_layer_in"] = acc1 = int_conv(q1, o1, self.q["conv1"], self.b["conv1"], 2, 1)
        out["conv2_dequant_layer_in"] = acc2 = int_conv(q1, o1, self.q["conv2"], None, 1, 1)
        out["conv1"] = y1 = np.maximum(quant.dequant(acc1, self.deq["conv1"]), 0)
        out["conv2"] = y2 = quant.dequant(acc2, self.deq["conv2"])
        sp, op = qp("pool_quant_layer")
        out["pool_quant_layer"] = qpool = codes(y1, sp, op)
        avg = layers.pool2d(centred(qpool, op), "AVE", 3, 2, 1).astype(np.float32)
        out["pool_dequant_layer_in"] = avg
        out["pool"] = yp = quant.dequant(avg, self.deq["pool"])
        sf, of = qp("fc_quant_layer")
        out["fc_quant_layer"] = qf = codes(yp, sf, of)
        accf = (qf.reshape(len(qf), -1) - of) @ self.q["fc"].astype(np.int64).T
        accf = accf + self.b["fc"].astype(np.int64)
        out["fc_dequant_layer_in"] = accf
        out["fc"] = quant.dequant(accf, self.deq["fc"])
        sd_, od = qp("deconv_quant_layer")
        out["deconv_quant_layer"] = qd = codes(y2, sd_, od)
        accd = layers.deconv2d(centred(qd, od), self.q["deconv"], self.b["deconv"], 2, 1, dtype=np.int64)
        out["deconv_dequant_layer_in"] = accd
        out["deconv"] = quant.dequant(accd, self.deq["deconv"])
        return out


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def data(seed: int = 1, shape=(2, 3, 9, 9)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 0.9 + 0.3).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# integer emulation vs the numpy integer reference
# ---------------------------------------------------------------------------------------------------
def test_pycaffe_net_runs_deploy_model_exactly(pair: Pair):
    net = caffe.Net(str(pair.proto_path), str(pair.deploy_path), caffe.TEST)
    kinds = {layer.name: type(layer) for layer in net.engine_layers}
    assert kinds["conv1_quant_layer"] is IntegerQuant and kinds["conv1"] is IntegerConvolution
    assert kinds["fc_dequant_layer"] is IntegerDeQuant
    assert [layer.type for layer in net.layers][1:4] == ["Quant", "Convolution", "DeQuant"]
    assert net.params["conv1"][0].data.dtype == np.int8 and net.params["conv1"][1].data.dtype == np.int32
    x = data()
    out = net.forward(data=x)
    expected = pair.reference(x)
    assert set(out) == {"fc", "deconv"}
    for name, value in expected.items():
        got = net.blobs[name].data
        if name.endswith("_quant_layer"):
            assert got.dtype == np.int8, name
        elif name.endswith("_dequant_layer_in") and name != "pool_dequant_layer_in":
            assert got.dtype == np.int32, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    # the codes really use the offset and the padding sees the real zero (not the code 0)
    assert (expected["conv1_quant_layer"] != 0).mean() > 0.9
    # folding -o_d * sum(q_w) into the bias while padding the *code* 0 is wrong exactly at the borders
    q1, o1 = expected["conv1_quant_layer"], FACTORS["conv1_quant_layer"][1]
    naive = int_conv(q1, 0, pair.q["conv1"], pair.b["conv1"], 2, 1) - o1 * pair.q["conv1"].astype(
        np.int64).sum(axis=(1, 2, 3))[None, :, None, None]
    acc = expected["conv1_dequant_layer_in"]
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # windows within the 9x9 image
    np.testing.assert_array_equal(naive[inside], acc[inside])
    assert (naive[:, :, 0, :] != acc[:, :, 0, :]).all() and (naive[:, :, :, -1] != acc[:, :, :, -1]).all()


def test_exact_accumulation_beyond_float32(tmp_path: Path):
    """Extreme codes: |acc| > 2**24, where float32 sums would round; the emulation is exact."""
    c, k = 64, 3
    text = f"""
    layer {{ name: "data" type: "Input" top: "data"
            input_param {{ shape {{ dim: 1 dim: {c} dim: 4 dim: 4 }} }} }}
    layer {{ name: "q" type: "Quant" bottom: "data" top: "q" {quant_param(1.0, 127, "conv")} }}
    layer {{ name: "conv" type: "Convolution" bottom: "q" top: "acc"
            convolution_param {{ num_output: 2 kernel_size: {k} bias_term: true }} }}
    layer {{ name: "dq" type: "DeQuant" bottom: "acc" top: "y" dequant_param {{ channel_wise: true }} }}
    """
    rng = np.random.default_rng(3)
    w = rng.choice(np.array([-128, 127, -127], np.int8), size=(2, c, k, k))
    w[0] = -128
    bias = np.array([2**31 - 1 - 10_000_000, -5], np.int32)
    deq = np.array([2.0**-20, 3.0], np.float32)
    model = caffe_pb2.NetParameter()
    lay = model.layer.add(name="conv")
    array_to_blob(w, lay.blobs.add(), kind="int8")
    array_to_blob(bias, lay.blobs.add(), kind="int32")
    packed = deq.view(np.uint32).astype(np.uint64)
    array_to_blob(packed, model.layer.add(name="dq").blobs.add(), kind="uint64")
    net = load_net(parse_net(text), model)
    x = np.full((1, c, 4, 4), -1000.0, np.float32)  # saturates to -128: centred code -255
    x[0, :, 1, 2] = rng.standard_normal(c) * 30
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    q = quant.ascend_quant_codes(x, np.float32(1.0), 127)
    acc = int_conv(q, 127, w, None, 1, 0) + bias.astype(np.int64)[None, :, None, None]
    assert np.abs(acc).max() > 2**24
    wrapped = (acc + 2**31) % 2**32 - 2**31  # channel 0 overflows INT32: a 32-bit adder wraps
    assert (acc[0, 0] > 2**31 - 1).any()
    np.testing.assert_array_equal(net.tensor("acc").numpy(), wrapped)
    np.testing.assert_array_equal(net.tensor("y").numpy(), quant.dequant(wrapped, deq))


def test_copy_from_again_keeps_integer_layers(pair: Pair):
    net = load_net(str(pair.proto_path), str(pair.deploy_path), require_deploy=True)
    layers = list(net.engine_layers)
    net.copy_from(str(pair.deploy_path))
    assert all(a is b for a, b in zip(layers, net.engine_layers))
    x = data(2)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    np.testing.assert_array_equal(net.tensor("deconv").numpy(), pair.reference(x)["deconv"])


def test_inner_product_axis_and_transpose():
    """InnerProduct from axis 2 with a transposed [K, N] INT8 weight; the bias is on the last axis."""
    text = f"""
    layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 4 }} }} }}
    layer {{ name: "q" type: "Quant" bottom: "data" top: "q" {quant_param(0.05, 3, "ip")} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "q" top: "acc"
            inner_product_param {{ num_output: 5 axis: 2 transpose: true }} }}
    layer {{ name: "dq" type: "DeQuant" bottom: "acc" top: "y" }}
    """
    rng = np.random.default_rng(4)
    w = rng.integers(-128, 128, (4, 5)).astype(np.int8)
    b = rng.integers(-1000, 1000, 5).astype(np.int32)
    model = caffe_pb2.NetParameter()
    lay = model.layer.add(name="ip")
    array_to_blob(w, lay.blobs.add(), kind="int8")
    array_to_blob(b, lay.blobs.add(), kind="int32")
    array_to_blob(np.array([0.5], np.float32).view(np.uint32).astype(np.uint64),
                  model.layer.add(name="dq").blobs.add(), kind="uint64")
    net = load_net(parse_net(text), model)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    acc = (quant.ascend_quant_codes(x, np.float32(1 / 0.05), 3) - 3) @ w.astype(np.int64) + b
    np.testing.assert_array_equal(net.tensor("acc").numpy(), acc)
    np.testing.assert_array_equal(net.tensor("y").numpy(), (acc * 0.5).astype(np.float32))


def test_quant_formulas_differ_where_documented(pair: Pair):
    """AscendQuant (x*scale + offset in float32, then round) vs the fake Quant layer (x / s_d in double)."""
    s_d, o_d = FACTORS["conv1_quant_layer"]
    scale = np.float32(1.0 / s_d)
    x = np.zeros((2, 3, 9, 9), np.float32)
    # (i) the float32 product rounds onto a .5 tie the exact quotient does not reach:
    #     fl32(x * scale) = -74.5 while x / s_d = -74.4999963...
    x[0, 0, 0, 0] = np.array([3217759718], np.uint32).view(np.float32)[0]
    # (ii) a tie: fl32(x * scale) = 0.5 exactly, x / s_d = 0.50000002: ascend rounds -13.5 to -14,
    #      caffe rounds 0.50000002 to 1 and adds -14
    x[0, 0, 0, 1] = np.nextafter(np.float32(0.5) / scale, np.float32(1))
    assert float(np.float32(x[0, 0, 0, 1] * scale)) == 0.5 and float(x[0, 0, 0, 1]) * float(scale) > 0.5
    x[1] = data(5)[0]
    ascend, caffe_codes = quant.ascend_quant_codes(x, scale, o_d), quant.quant_layer_codes(x, scale, o_d)
    assert (ascend[0, 0, 0, 0], caffe_codes[0, 0, 0, 0]) == (-89, -88)
    assert (ascend[0, 0, 0, 1], caffe_codes[0, 0, 0, 1]) == (-14, -13)
    net = load_net(str(pair.proto_path), str(pair.deploy_path), quant_formula="ascend", require_deploy=True)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    np.testing.assert_array_equal(net.tensor("conv1_quant_layer").numpy(), ascend)
    set_quant_formula(net.engine_layers, "caffe")
    net.run()
    np.testing.assert_array_equal(net.tensor("conv1_quant_layer").numpy(), caffe_codes)
    expected = pair.reference(x, codes=quant.quant_layer_codes)
    np.testing.assert_array_equal(net.tensor("fc").numpy(), expected["fc"])
    # the fake-quant model's Quant layer is the "caffe" formula
    fake = Net(str(pair.proto_path), caffe.TEST, weights=str(pair.fake_path))
    fake.set_tensor("data", torch.from_numpy(x))
    fake.run()
    got = fake.tensor("conv1_quant_layer").numpy().astype(np.float64)
    np.testing.assert_allclose(got, (caffe_codes - o_d) * (1.0 / float(scale)), rtol=1e-6, atol=1e-7)


def test_blob_scales_describe_codes_and_accumulators(pair: Pair):
    net = load_net(str(pair.proto_path), str(pair.deploy_path), require_deploy=True)
    scales = integer_blob_scales(net.engine_layers)
    assert scales["conv1_quant_layer"].kind == "codes"
    assert scales["conv1_quant_layer"].offset == -14
    assert scales["conv1_dequant_layer_in"].kind == "accumulator"
    np.testing.assert_array_equal(scales["deconv_dequant_layer_in"].scale,
                                  pair.deq["deconv"].astype(np.float64))
    assert scales["deconv_dequant_layer_in"].scale.shape == (6,)
    assert "conv1" not in scales and "data" not in scales


# ---------------------------------------------------------------------------------------------------
# fake-quant vs deploy agreement
# ---------------------------------------------------------------------------------------------------
def check_agreement(rows, quantized_blobs: set[str]) -> None:
    by_name = {r.blob: r for r in rows}
    assert quantized_blobs <= set(by_name), sorted(quantized_blobs - set(by_name))
    for name in quantized_blobs:
        r = by_name[name]
        assert r.max_lsb is not None and r.max_lsb <= 1.0, (name, r)
    outputs = [r for r in rows if r.is_output]
    assert outputs
    for r in outputs:
        assert r.rel_err <= 1e-3 and r.cosine > 0.9999, r


def test_compare_fake_and_deploy_agree(pair: Pair):
    rows = compare_models(str(pair.proto_path), str(pair.fake_path), str(pair.proto_path),
                          str(pair.deploy_path), {"data": data(7)})
    by_name = {r.blob: r for r in rows}
    assert list(by_name)[0] == "data" and by_name["data"].max_abs_diff == 0.0
    assert {r.blob for r in rows if r.is_output} == {"fc", "deconv"}
    # steps: conv1's output feeds pool_quant_layer (after the in-place ReLU) -> its s_d; conv2's feeds
    # deconv_quant_layer; fc and deconv end the net -> their deq_scale (per channel for deconv)
    assert by_name["conv1"].step == pytest.approx(1.0 / float(np.float32(1.0 / 0.0117)))
    assert by_name["conv1_dequant_layer_in"].step == by_name["conv1"].step
    assert by_name["fc"].step == pytest.approx(float(pair.deq["fc"][0]))
    assert by_name["deconv"].step == pytest.approx(float(pair.deq["deconv"].min()))
    assert by_name["conv1_quant_layer"].kind == "codes" and by_name["conv1_quant_layer"].max_abs_diff < 1e-6
    check_agreement(rows, {"conv1", "conv2", "pool", "fc", "deconv", "conv1_dequant_layer_in",
                           "fc_dequant_layer_in", "pool_quant_layer", "fc_quant_layer"})
    assert "fc_dequant_layer_in" in format_agreement(rows)


def test_compare_shows_a_flipped_code(pair: Pair):
    """Where the two Quant formulas disagree, the report shows whole steps of difference."""
    x = data(7)
    # a tie (fl32(x * scale) = 0.5): ascend and caffe differ (see the test above)
    x[0, 0, 4, 4] = np.nextafter(np.float32(0.5) / np.float32(1.0 / 0.0213), np.float32(1))
    x[1, 2, 0, 0] = np.array([3217759718], np.uint32).view(np.float32)[0]  # float32 product rounding
    rows = {r.blob: r for r in compare_models(str(pair.proto_path), str(pair.fake_path),
                                              str(pair.proto_path), str(pair.deploy_path), {"data": x},
                                              quant_formula="ascend")}
    assert rows["conv1_quant_layer"].max_lsb == pytest.approx(1.0)
    assert rows["conv1_quant_layer"].flips == 2 and rows["conv1"].flips is None
    assert rows["conv1_dequant_layer_in"].max_abs_diff > 1e-4  # a flipped input code moves sums by q_w
    rows = {r.blob: r for r in compare_models(str(pair.proto_path), str(pair.fake_path),
                                              str(pair.proto_path), str(pair.deploy_path), {"data": x},
                                              quant_formula="caffe")}
    assert rows["conv1_quant_layer"].max_lsb < 1e-3 and rows["conv1_quant_layer"].flips == 0
    check_agreement(list(rows.values()), {"conv1", "conv2", "pool", "fc", "deconv"})


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
FLOAT_ONLY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
"""


def test_int8_blobs_in_a_float_context_are_refused(pair: Pair):
    # the original float model (no Quant/DeQuant): the INT8 weights have nowhere to go
    with pytest.raises(WeightShapeError, match=r"layer 'conv1'.*not part of a Quant"):
        load_net(parse_net(FLOAT_ONLY), str(pair.deploy_path))
    # training a deploy model: the integer emulation is inference only
    with pytest.raises(WeightShapeError, match="TEST phase"):
        caffe.Net(str(pair.proto_path), str(pair.deploy_path), caffe.TRAIN)
    # a float (fake-quant) caffemodel is not a deploy model
    with pytest.raises(ModelFormatError, match="not a deploy caffemodel"):
        load_net(str(pair.proto_path), str(pair.fake_path), require_deploy=True)
    # a float bias where the deploy format needs int32_data
    model = caffe_pb2.NetParameter()
    model.CopyFrom(caffe_pb2.NetParameter.FromString(pair.deploy_path.read_bytes()))
    conv1 = next(lp for lp in model.layer if lp.name == "conv1")
    array_to_blob(np.zeros(4, np.float32), conv1.blobs[1])
    with pytest.raises(WeightShapeError, match=r"conv1.*int8_data, bias in int32_data"):
        load_net(str(pair.proto_path), model)


def test_float_layer_reading_codes_is_refused(pair: Pair):
    text = pair.text + """
    layer { name: "peek" type: "ReLU" bottom: "fc_quant_layer" top: "peek" }
    """
    with pytest.raises(WeightShapeError, match=r"'peek'.*reads the INT8 codes"):
        load_net(parse_net(text), str(pair.deploy_path))


def test_fake_model_unaffected(pair: Pair):
    """The same prototxt with the fake-quant caffemodel runs the float layers (no integer emulation)."""
    net = Net(str(pair.proto_path), caffe.TEST, weights=str(pair.fake_path))
    assert not any(isinstance(layer, IntegerQuant) for layer in net.engine_layers)
    assert len(net.engine_layers[net.layer_names.index("fc_dequant_layer")].blobs) == 3
    # the loader chooses no integer layer for it either, and the blobs are the fake-quant model's
    loaded = load_net(str(pair.proto_path), str(pair.fake_path))
    assert [type(layer) for layer in loaded.engine_layers] == [type(layer) for layer in net.engine_layers]
    fake_conv1 = next(lp for lp in load_caffemodel(pair.fake_path).layer if lp.name == "conv1")
    np.testing.assert_array_equal(loaded.engine_layers[loaded.layer_names.index("conv1")].blobs[0].numpy(),
                                  np.array(fake_conv1.blobs[0].data, np.float32).reshape(4, 3, 3, 3))


def test_plain_engine_net_refuses_a_deploy_caffemodel(pair: Pair, amct_log):
    """The engine's Net copies blobs only: integer blobs for its float layers are an error naming the layer
    and the loader, raised before anything is copied."""
    net = Net(str(pair.proto_path), caffe.TEST)
    before = {name: [b.clone() for b in net.engine_layers[i].blobs] for i, name in enumerate(net.layer_names)}
    with pytest.raises(WeightShapeError, match=r"layer 'conv1'.*stored as int8.*deploy model.*load_net"):
        net.copy_from(str(pair.deploy_path))
    with pytest.raises(WeightShapeError, match=r"layer 'conv1'.*load_net"):
        Net(str(pair.proto_path), caffe.TEST, weights=str(pair.deploy_path))
    for i, name in enumerate(net.layer_names):
        for old, new in zip(before[name], net.engine_layers[i].blobs):
            assert torch.equal(old, new), name


def test_integer_variants_built_by_hand_match_the_loader(pair: Pair):
    """The engine builds whatever variants it is given; with the loader's choice it is the same net."""
    integer = ["conv1_quant_layer", "conv1", "conv1_dequant_layer", "conv2", "conv2_dequant_layer"]
    variants = {name: "integer" for name in integer}
    variants["conv2_dequant_layer"] = LayerVariant("integer", {"blob_shape": (4,)})
    net = Net(parse_net(pair.text.split('layer { name: "relu1"')[0]), caffe.TEST, variants=variants)
    kinds = {name: type(layer) for name, layer in zip(net.layer_names, net.engine_layers)}
    assert kinds["conv1_quant_layer"] is IntegerQuant and kinds["conv1"] is IntegerConvolution
    assert kinds["conv1_dequant_layer"] is IntegerDeQuant
    # without the option the DeQuant blob follows the float layer's rule (channel_wise: [C])
    assert [tuple(b.shape) for b in net.engine_layers[3].blobs] == [(4,)]
    assert net.engine_layers[2].quant is net.engine_layers[1]  # linked to the Quant that feeds it
    net.copy_from(str(pair.deploy_path))
    x = data(3)
    net.set_tensor("data", torch.from_numpy(x))
    net.run()
    expected = pair.reference(x, codes=quant.quant_layer_codes)
    for name in ("conv1_quant_layer", "conv1_dequant_layer_in", "conv2"):
        np.testing.assert_array_equal(net.tensor(name).numpy(), expected[name], err_msg=name)


def test_integer_variant_options_are_checked(pair: Pair):
    head = parse_net(pair.text.split('layer { name: "conv2"')[0])
    with pytest.raises(ConfigError, match="quant_formula must be one of ascend, caffe"):
        Net(head, caffe.TEST, variants={"conv1_quant_layer": LayerVariant("integer", {"formula": "npu"})})
    with pytest.raises(ConfigError, match=r"conv1_quant_layer.*unknown option\(s\) \['scale'\]"):
        Net(head, caffe.TEST, variants={"conv1_quant_layer": LayerVariant("integer", {"scale": 2.0})})
    with pytest.raises(ConfigError, match="quant_formula must be one of"):
        load_net(str(pair.proto_path), str(pair.deploy_path), quant_formula="Ascend")
    # an integer convolution must read the codes of an integer Quant
    with pytest.raises(ModelFormatError, match=r"'conv1'.*written by layer 'conv1_quant_layer'.*an integer"):
        Net(head, caffe.TEST, variants={"conv1": "integer"})


def test_dequant_blob_shape_must_fit_the_channels(pair: Pair):
    model = caffe_pb2.NetParameter()
    model.CopyFrom(load_caffemodel(pair.deploy_path))
    dequant = next(lp for lp in model.layer if lp.name == "conv1_dequant_layer")
    array_to_blob(np.zeros(3, np.uint64), dequant.blobs[0], kind="uint64")
    with pytest.raises(WeightShapeError, match=r"conv1_dequant_layer.*shape \(3,\); it must be \[4\]"):
        load_net(str(pair.proto_path), model)
    array_to_blob(np.zeros((4, 1), np.uint64), dequant.blobs[0], kind="uint64")
    with pytest.raises(WeightShapeError, match=r"conv1_dequant_layer.*shape \(4, 1\)"):
        load_net(str(pair.proto_path), model)


# ---------------------------------------------------------------------------------------------------
# end to end: retrain model -> forwards -> save 'Both' -> agreement
# ---------------------------------------------------------------------------------------------------
E2E_MODEL = """
name: "e2e"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 10 dim: 10 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2
                            weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.2 } } }
"""


def test_end_to_end_retrain_save_compare(tmp_path: Path):
    from amct_caffe import amct
    from amct_caffe.engine.fillers import set_random_seed

    set_random_seed(11)
    model = tmp_path / "model.prototxt"
    model.write_text(E2E_MODEL)
    weights = tmp_path / "model.caffemodel"
    Net(str(model), caffe.TEST).save(str(weights))
    config = tmp_path / "config.json"
    amct.create_quant_retrain_config(str(config), str(model), str(weights))
    r_model, r_weights = tmp_path / "retrain.prototxt", tmp_path / "retrain.caffemodel"
    amct.create_quant_retrain_model(str(model), str(weights), str(config), str(r_model), str(r_weights),
                                    str(tmp_path / "record.txt"))
    net = caffe.Net(str(r_model), str(r_weights), caffe.TEST)
    rng = np.random.default_rng(2)
    for _ in range(3):
        net.forward(data=(rng.standard_normal((4, 3, 10, 10)) * 0.8).astype(np.float32))
    trained = tmp_path / "trained.caffemodel"
    net.save(str(trained))
    prefix = tmp_path / "out" / "e2e"
    amct.save_quant_retrain_model(str(r_model), str(trained), "Both", str(prefix))
    fake_m, fake_w = f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel"
    dep_m, dep_w = f"{prefix}_deploy_model.prototxt", f"{prefix}_deploy_weights.caffemodel"
    x = (rng.standard_normal((4, 3, 10, 10)) * 0.8).astype(np.float32)
    # the fake layer's Quant formula (the default): only float-vs-integer arithmetic differs
    rows = compare_models(fake_m, fake_w, dep_m, dep_w, {"data": x})
    quantized = {r.blob for r in rows if r.kind == "accumulator"}
    assert {"conv1_dequant_layer_in", "pool1_dequant_layer_in", "fc_dequant_layer_in"} <= quantized
    check_agreement(rows, quantized | {"conv1", "pool1", "fc"})
    assert all(r.flips == 0 for r in rows if r.kind == "codes")
    # AscendQuant's literal formula: codes may flip, but only at rounding ties
    rows = compare_models(fake_m, fake_w, dep_m, dep_w, {"data": x}, quant_formula="ascend")
    for r in rows:
        if r.kind == "codes":
            assert r.max_lsb <= 1.0 + 1e-6 and r.flips <= 0.01 * np.prod(r.shape), r
    assert all(r.cosine > 0.999 for r in rows if r.is_output)
    deploy = load_net(dep_m, dep_w, quant_formula="ascend", require_deploy=True)
    kinds = {type(layer) for layer in deploy.engine_layers}
    assert kinds >= {IntegerQuant, IntegerConvolution, IntegerDeQuant}
    deploy.set_tensor("data", torch.from_numpy(x))
    deploy.run()
    for layer in deploy.engine_layers:
        if isinstance(layer, IntegerQuant):
            xin = deploy.tensor(layer.param.bottom[0]).numpy()
            got = deploy.tensor(layer.param.top[0]).numpy()
            scale = np.float32(layer.param.quant_param.scale)
            np.testing.assert_array_equal(got, quant.ascend_quant_codes(xin, scale, layer.offset_d))
            differ = got != quant.quant_layer_codes(xin, scale, layer.offset_d)
            t = xin.astype(np.float64)[differ] * float(scale)
            assert (np.abs(np.abs(t - np.trunc(t)) - 0.5) < 1e-5).all(), layer.name  # ties only


def test_deploy_net_saves_integer_blobs_in_their_fields(pair: Pair, tmp_path):
    """net.save() on a deploy net keeps int8/int32/uint64 storage (a float `data` copy would corrupt it)."""
    net = load_net(str(pair.proto_path), str(pair.deploy_path), require_deploy=True)
    out = tmp_path / "resaved.caffemodel"
    net.save(str(out))
    saved = {layer.name: layer for layer in load_caffemodel(out).layer}
    original = {layer.name: layer for layer in load_caffemodel(pair.deploy_path).layer}
    for name, layer in original.items():
        for ours, theirs in zip(saved[name].blobs, layer.blobs):
            assert ours.int8_data == theirs.int8_data, name
            assert list(ours.int32_data) == list(theirs.int32_data), name
            assert list(ours.uint64_data) == list(theirs.uint64_data), name
            assert list(ours.data) == list(theirs.data), name
