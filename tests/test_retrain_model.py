"""create_quant_retrain_model: the retrain prototxt layer by layer, its weights, record, phases, errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe import amct
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.errors import AmctError, ConfigError, ModelFormatError
from amct_caffe.model.io import load_caffemodel, save_caffemodel
from amct_caffe.model.phase import TEST, TRAIN
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.record import read_records
from amct_caffe.workflows import qat
from tests.helpers import caffemodel_blobs, parse_net
from tests.references.layers import fold_batchnorm
from tests.references.quant import arq_fake_quant

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a" type: "Convolution" bottom: "conv1" top: "conv2a" param { lr_mult: 0.5 }
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "conv2b" type: "Convolution" bottom: "conv1" top: "conv2b"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 3 } }
"""

SMALL_CONFIG = {
    "version": 1,
    "conv1": {"retrain_enable": True,
              "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 2.5, "clip_min": -1.5,
                                      "fixed_min": False},
              "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True}},
    "conv2a": {"retrain_enable": True, "retrain_data_config": {"algo": "ulq_quantize"}},
    "conv2b": {"retrain_enable": True, "retrain_data_config": {"algo": "ulq_quantize"}},
    "pool": {"retrain_enable": True, "retrain_data_config": {"algo": "ulq_quantize"}},
    "fc": {"retrain_enable": True,
           "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 4.0, "clip_min": -4.0},
           "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": False}},
    "fc2": {"retrain_enable": False},
}

ACT_PARAMS = "param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }"
EXPECTED_SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1_act_retrain" type: "ActivationQAT" bottom: "data" top: "conv1_act_retrain" ACT_PARAMS
        retrain_data_quant_param { clip_max: 2.5 clip_min: -1.5 ifmr_init: false with_offset: true
                                   fixed_min: false object_layer: "conv1" record_file_path: "REC" } }
layer { name: "conv1_wts_retrain" type: "WeightQAT" bottom: "conv1_act_retrain" top: "conv1_wts_retrain"
        param { name: "conv1_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 decay_mult: 1 }
        retrain_weight_quant_param { cout: 4 cin: 3 h: 3 w: 3 channel_wise: true layer_type: "Convolution"
                                     with_offset: false } }
layer { name: "conv1" type: "Convolution" bottom: "conv1_wts_retrain" top: "conv1"
        param { name: "conv1_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 bias_term: true kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a_act_retrain" type: "ActivationQAT" bottom: "conv1" top: "conv2a_act_retrain" ACT_PARAMS
        retrain_data_quant_param { ifmr_init: true with_offset: true fixed_min: true
                                   object_layer: "conv2a-conv2b" record_file_path: "REC" } }
layer { name: "conv2a_wts_retrain" type: "WeightQAT" bottom: "conv2a_act_retrain" top: "conv2a_wts_retrain"
        param { name: "conv2a_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 0.5 decay_mult: 1 }
        retrain_weight_quant_param { cout: 4 cin: 4 h: 1 w: 1 channel_wise: true layer_type: "Convolution"
                                     with_offset: false } }
layer { name: "conv2a" type: "Convolution" bottom: "conv2a_wts_retrain" top: "conv2a"
        param { name: "conv2a_wts_retrain_w" lr_mult: 0 decay_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "conv2b_wts_retrain" type: "WeightQAT" bottom: "conv2a_act_retrain" top: "conv2b_wts_retrain"
        param { name: "conv2b_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 decay_mult: 1 }
        retrain_weight_quant_param { cout: 4 cin: 2 h: 3 w: 3 channel_wise: true layer_type: "Convolution"
                                     with_offset: false } }
layer { name: "conv2b" type: "Convolution" bottom: "conv2b_wts_retrain" top: "conv2b"
        param { name: "conv2b_wts_retrain_w" lr_mult: 0 decay_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }
layer { name: "pool_act_retrain" type: "ActivationQAT" bottom: "sum" top: "pool_act_retrain" ACT_PARAMS
        retrain_data_quant_param { ifmr_init: true with_offset: true fixed_min: false object_layer: "pool"
                                   record_file_path: "REC" } }
layer { name: "pool" type: "Pooling" bottom: "pool_act_retrain" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc_act_retrain" type: "ActivationQAT" bottom: "pool" top: "fc_act_retrain" ACT_PARAMS
        retrain_data_quant_param { clip_max: 4 clip_min: -4 ifmr_init: false with_offset: true
                                   fixed_min: false object_layer: "fc" record_file_path: "REC" } }
layer { name: "fc_wts_retrain" type: "WeightQAT" bottom: "fc_act_retrain" top: "fc_wts_retrain"
        param { name: "fc_wts_retrain_w" lr_mult: 0 decay_mult: 0 } param { lr_mult: 1 decay_mult: 1 }
        retrain_weight_quant_param { cout: 5 cin: 64 channel_wise: false layer_type: "InnerProduct"
                                     with_offset: false } }
layer { name: "fc" type: "InnerProduct" bottom: "fc_wts_retrain" top: "fc"
        param { name: "fc_wts_retrain_w" lr_mult: 0 decay_mult: 0 } inner_product_param { num_output: 5 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 3 } }
"""


# -- helpers -------------------------------------------------------------------------------------------------
def write_model(folder: Path, text: str, seed: int = 0, weights_text: str | None = None) -> tuple[str, str]:
    """The prototxt ``text`` and a caffemodel of random weights (made with ``weights_text`` if given)."""
    model = folder / "model.prototxt"
    model.write_text(text)
    net = Net(parse_net(weights_text or text), TEST)
    randomize_params(net, seed=seed)
    weights = folder / "model.caffemodel"
    save_caffemodel(net.to_proto(), weights)
    return str(model), str(weights)


def outputs(folder: Path) -> tuple[str, str, str]:
    return str(folder / "out.prototxt"), str(folder / "out.caffemodel"), str(folder / "record.txt")


@pytest.fixture
def small(tmp_path):
    """The small net converted with SMALL_CONFIG: (folder, model, weights, config, outputs)."""
    model, weights = write_model(tmp_path, SMALL, seed=4)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    outs = outputs(tmp_path)
    amct.create_quant_retrain_model(model, weights, str(config), *outs)
    return tmp_path, model, weights, str(config), outs


# -- the small net ------------------------------------------------------------------------------------------
def test_retrain_prototxt_layer_by_layer(small):
    _, _, _, _, (out_model, _, record) = small
    written = parse_net(Path(out_model).read_text())
    expected = parse_net(EXPECTED_SMALL.replace("ACT_PARAMS", ACT_PARAMS)
                         .replace("REC", os.path.abspath(record)))
    assert [layer.name for layer in written.layer] == [layer.name for layer in expected.layer]
    for got, want in zip(written.layer, expected.layer):
        assert text_format.MessageToString(got) == text_format.MessageToString(want), got.name
    assert written == expected


def test_retrain_weights(small):
    _, _, weights, _, (_, out_weights, _) = small
    original = caffemodel_blobs(weights, keep_empty=True)
    written = caffemodel_blobs(out_weights, keep_empty=True)
    assert list(written) == ["conv1_act_retrain", "conv1_wts_retrain", "conv1", "conv2a_wts_retrain",
                             "conv2a", "conv2b_wts_retrain", "conv2b", "fc_act_retrain", "fc_wts_retrain",
                             "fc", "fc2"]

    w1, b1 = fold_batchnorm({"conv": original["conv1"], "bn": original["bn1"], "scale": original["scale1"]},
                        conv_bias=True, scale=True, scale_bias=True, axis=0, eps=1e-5)
    w1_hat = arq_fake_quant(w1, channel_wise=True)[0]
    np.testing.assert_array_equal(written["conv1_wts_retrain"][1], w1)
    shadow = written["conv1_wts_retrain"][1]
    np.testing.assert_array_equal(written["conv1_wts_retrain"][0], arq_fake_quant(shadow, True)[0])
    np.testing.assert_array_equal(written["conv1_wts_retrain"][0], w1_hat)
    np.testing.assert_array_equal(written["conv1"][0], written["conv1_wts_retrain"][0])
    np.testing.assert_allclose(written["conv1"][1], b1, rtol=1e-6, atol=1e-6)

    for name in ("conv2a", "conv2b"):
        w = original[name][0]
        np.testing.assert_array_equal(written[f"{name}_wts_retrain"][1], w)
        w_hat, _ = arq_fake_quant(w, channel_wise=True)
        np.testing.assert_array_equal(written[f"{name}_wts_retrain"][0], w_hat)
        np.testing.assert_array_equal(written[name][0], w_hat)
    np.testing.assert_array_equal(written["conv2b"][1], original["conv2b"][1])
    assert len(written["conv2a"]) == 1

    fc = original["fc"][0]
    np.testing.assert_array_equal(written["fc_wts_retrain"][1], fc)
    np.testing.assert_array_equal(written["fc_wts_retrain"][0], arq_fake_quant(fc, channel_wise=False)[0])
    np.testing.assert_array_equal(written["fc"][0], arq_fake_quant(fc, channel_wise=False)[0])
    np.testing.assert_array_equal(written["fc"][1], original["fc"][1])
    np.testing.assert_array_equal(written["fc2"][0], original["fc2"][0])

    # configured clips -> blobs [clip_max], [clip_min]; unconfigured -> no blobs at all
    assert [a.tolist() for a in written["conv1_act_retrain"]] == [[2.5], [-1.5]]
    assert [a.tolist() for a in written["fc_act_retrain"]] == [[4.0], [-4.0]]
    assert "conv2a_act_retrain" not in written and "pool_act_retrain" not in written


def test_record_file_and_remembered_paths(small):
    folder, _, _, config, (_, _, record) = small
    records = read_records(record)
    assert list(records) == ["conv1", "conv2a", "conv2b", "pool", "fc"]
    shapes = {name: rec.shape for name, rec in records.items()}
    assert shapes == {"conv1": (3, 8, 8), "conv2a": (4, 8, 8), "conv2b": (4, 8, 8), "pool": (4, 8, 8),
                      "fc": (4, 4, 4)}
    assert all(rec.scale_d is None and not rec.scale_w for rec in records.values())
    assert qat.last_retrain_paths() == qat.RetrainPaths(str(folder / "record.txt"), config)


def test_retrain_model_runs_in_the_engine(tmp_path):
    """The written retrain model builds in the engine with its weights and runs forward in TEST and TRAIN;
    with the clips initialised by IFMR on the batch, the fake-quant output stays close to the float model's
    (8-bit activations and weights)."""
    model, weights = write_model(tmp_path, SMALL, seed=4)
    config = {name: dict(layer) for name, layer in SMALL_CONFIG.items() if name != "version"}
    for layer in config.values():
        layer["retrain_data_config"] = {"algo": "ulq_quantize"}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    out_model, out_weights, record = outputs(tmp_path)
    amct.create_quant_retrain_model(model, weights, str(config_path), out_model, out_weights, record)
    x = np.random.default_rng(0).normal(0.0, 1.0, (2, 3, 8, 8)).astype(np.float32)
    float_net = Net(model, TEST, weights=weights)
    float_net.set_tensor("data", torch.from_numpy(x))
    float_net.run()
    expected = float_net.tensor("fc2").numpy()
    for phase in (TEST, TRAIN):
        net = Net(out_model, phase, weights=out_weights)
        # loaded without clip blobs: IFMR waits for the first real batch, not construction's shape pass
        assert not net.engine_layers[net.layer_index("conv2a_act_retrain")].clips_ready
        net.set_tensor("data", torch.from_numpy(x))
        net.run()
        got = net.tensor("fc2").detach().numpy()
        assert got.shape == (2, 3) and np.all(np.isfinite(got))
        assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max() + 1e-3
        conv1 = net.engine_layers[net.layer_index("conv1")]
        wts = net.engine_layers[net.layer_index("conv1_wts_retrain")]
        assert conv1.blobs[0] is wts.blobs[0]  # the conv uses the fake-quantized weight
        shadow = wts.blobs[1].detach().numpy()
        np.testing.assert_array_equal(conv1.blobs[0].detach().numpy(), arq_fake_quant(shadow, True)[0])


def test_deconvolution_weight_axes(tmp_path):
    """Deconvolution weights are [in, out, kh, kw]: cout/cin are axes 1/0 and ARQ scales along axis 1."""
    text = """
name: "up"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "up" type: "Deconvolution" bottom: "data" top: "up"
        convolution_param { num_output: 6 kernel_size: 2 stride: 2 } }
"""
    model, weights = write_model(tmp_path, text, seed=9)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"up": {"retrain_data_config": {"clip_max": 1.0, "clip_min": -1.0}}}))
    outs = outputs(tmp_path)
    amct.create_quant_retrain_model(model, weights, str(config), *outs)
    written = parse_net(Path(outs[0]).read_text())
    p = written.layer[2].retrain_weight_quant_param
    assert (p.cout, p.cin, p.h, p.w, p.channel_wise, p.layer_type) == (6, 3, 2, 2, True, "Deconvolution")
    w = caffemodel_blobs(weights, keep_empty=True)["up"][0]
    blobs = caffemodel_blobs(outs[1], keep_empty=True)
    assert w.shape == (3, 6, 2, 2)
    np.testing.assert_array_equal(blobs["up_wts_retrain"][0], arq_fake_quant(w, True, axis=1)[0])
    np.testing.assert_array_equal(blobs["up"][0], arq_fake_quant(w, True, axis=1)[0])
    assert read_records(outs[2])["up"].shape == (3, 4, 4)
    net = Net(outs[0], TEST, weights=outs[1])
    assert net.engine_layers[net.layer_index("up")].blobs[0].shape == (3, 6, 2, 2)


# -- phases -------------------------------------------------------------------------------------------------
PHASED = """
name: "phased"
layer { name: "data" type: "DummyData" top: "data" top: "label" include { phase: TRAIN }
        dummy_data_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } shape { dim: 4 }
                           data_filler { type: "gaussian" std: 1 }
                           data_filler { type: "constant" value: 1 } } }
layer { name: "data" type: "DummyData" top: "data" top: "label" include { phase: TEST }
        dummy_data_param { shape { dim: 2 dim: 2 dim: 6 dim: 6 } shape { dim: 2 }
                           data_filler { type: "gaussian" std: 1 }
                           data_filler { type: "constant" value: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
        include { phase: TEST } }
"""


def test_train_and_test_data_layers_get_one_insertion(tmp_path):
    model, weights = write_model(tmp_path, PHASED, seed=2)
    config = str(tmp_path / "config.json")
    amct.create_quant_retrain_config(config, model, weights)
    outs = outputs(tmp_path)
    amct.create_quant_retrain_model(model, weights, config, *outs)
    written = parse_net(Path(outs[0]).read_text())
    assert [(layer.name, layer.type) for layer in written.layer] == [
        ("data", "DummyData"), ("data", "DummyData"), ("conv1_act_retrain", "ActivationQAT"),
        ("conv1_wts_retrain", "WeightQAT"), ("conv1", "Convolution"), ("relu1", "ReLU"),
        ("fc_act_retrain", "ActivationQAT"), ("fc_wts_retrain", "WeightQAT"), ("fc", "InnerProduct"),
        ("loss", "SoftmaxWithLoss"), ("accuracy", "Accuracy")]
    original = parse_net(PHASED)
    assert written.layer[0] == original.layer[0] and written.layer[1] == original.layer[1]
    assert list(written.layer[2].bottom) == ["data"]
    assert written.layer[6].retrain_data_quant_param.fixed_min
    assert read_records(outs[2])["conv1"].shape == (2, 6, 6)
    for phase, batch in ((TRAIN, 4), (TEST, 2)):
        net = Net(outs[0], phase, weights=outs[1])
        net.run()
        assert net.tensor("conv1_act_retrain").shape == (batch, 2, 6, 6)
        assert np.isfinite(float(net.tensor("loss")))


def test_phase_dependent_wiring_of_quantized_layers_is_an_error(tmp_path):
    """A TRAIN-only in-place Dropout between two quantized readers of one blob: in TEST they share the value,
    in TRAIN they do not."""
    text = PHASED.replace(
        'layer { name: "fc"',
        'layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" '
        'convolution_param { num_output: 3 kernel_size: 1 } }\n'
        'layer { name: "drop" type: "Dropout" bottom: "conv1" top: "conv1" include { phase: TRAIN } }\n'
        'layer { name: "conv3" type: "Convolution" bottom: "conv1" top: "conv3" '
        'convolution_param { num_output: 3 kernel_size: 1 } }\n'
        'layer { name: "cat" type: "Concat" bottom: "conv2" bottom: "conv3" top: "cat" }\n'
        'layer { name: "fc"').replace('bottom: "conv1" top: "fc"', 'bottom: "cat" top: "fc"')
    model, weights = write_model(tmp_path, text)
    config = str(tmp_path / "config.json")
    amct.create_quant_retrain_config(config, model, weights)
    with pytest.raises(ConfigError, match=r"conv2.*TRAIN"):
        amct.create_quant_retrain_model(model, weights, config, *outputs(tmp_path))
    assert not any(Path(p).exists() for p in outputs(tmp_path))


def test_quantized_layer_in_one_phase_only_is_an_error(tmp_path):
    text = PHASED.replace('layer { name: "fc" type: "InnerProduct"',
                          'layer { name: "fc" type: "InnerProduct" include { phase: TEST }')
    model, weights = write_model(tmp_path, text.replace("include { phase: TEST }", "", 1))
    model_path = Path(model)
    model_path.write_text(text)
    config = str(tmp_path / "config.json")
    amct.create_quant_retrain_config(config, model, weights)
    with pytest.raises(ConfigError, match=r"'fc'.*not in the TRAIN phase"):
        amct.create_quant_retrain_model(model, weights, config, *outputs(tmp_path))


def test_quantized_layer_defined_once_per_phase_is_an_error(tmp_path):
    fc = ('layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" '
          'inner_product_param { num_output: 4 } }')
    text = PHASED.replace(fc, fc.replace("} }", "} include { phase: TRAIN } }") + "\n"
                          + fc.replace("} }", "} include { phase: TEST } }"))
    assert text.count('name: "fc"') == 2
    model, weights = write_model(tmp_path, text)
    config = str(tmp_path / "config.json")
    amct.create_quant_retrain_config(config, model, weights)
    with pytest.raises(ConfigError, match=r"'fc'.*defined 2 times"):
        amct.create_quant_retrain_model(model, weights, config, *outputs(tmp_path))
    assert not any(Path(p).exists() for p in outputs(tmp_path))


def test_unbuildable_test_net_gives_no_shapes_and_a_warning(tmp_path, amct_log):
    data = ('layer {{ name: "data" type: "HDF5Data" top: "data" include {{ phase: {phase} }} '
            'hdf5_data_param {{ source: "{missing}" batch_size: 2 }} }}\n')
    missing = str(tmp_path / "missing.txt")
    body = SMALL.split("\n", 3)[3]
    text = ('name: "h5"\n' + data.format(phase="TRAIN", missing=missing)
            + data.format(phase="TEST", missing=missing) + body)
    model, weights = write_model(tmp_path, text, weights_text=SMALL)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    outs = outputs(tmp_path)
    amct.create_quant_retrain_model(model, weights, str(config), *outs)
    records = read_records(outs[2])
    assert list(records) == ["conv1", "conv2a", "conv2b", "pool", "fc"]
    assert all(rec.shape is None for rec in records.values())
    assert any(r.levelno == logging.WARNING and "TEST phase" in r.getMessage() for r in amct_log.records)


# -- errors -------------------------------------------------------------------------------------------------
def _prepare(tmp_path: Path, config: dict | None = None, weights_text: str | None = None):
    model, weights = write_model(tmp_path, SMALL, seed=1, weights_text=weights_text)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config or SMALL_CONFIG))
    outs = outputs(tmp_path)
    for path in outs:
        Path(path).write_text("old contents")
    return model, weights, str(config_path), outs


def _assert_untouched(tmp_path: Path, outs) -> None:
    for path in outs:
        assert Path(path).read_text() == "old contents"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_error_missing_weights_leaves_outputs_untouched(tmp_path):
    without_conv2a = (SMALL.replace('bottom: "conv1" top: "conv2a"', 'bottom: "conv1" top: "conv2a_x"')
                      .replace('name: "conv2a"', 'name: "other"')
                      .replace('bottom: "conv2a" bottom', 'bottom: "conv2a_x" bottom'))
    model, weights, config, outs = _prepare(tmp_path, weights_text=without_conv2a)
    with pytest.raises(ModelFormatError, match=r"'conv2a'.*no weights.*model.caffemodel"):
        amct.create_quant_retrain_model(model, weights, config, *outs)
    _assert_untouched(tmp_path, outs)


def test_error_group_settings_disagree(tmp_path):
    config = json.loads(json.dumps(SMALL_CONFIG))
    config["conv2b"]["retrain_data_config"]["fixed_min"] = False
    model, weights, config_path, outs = _prepare(tmp_path, config)
    with pytest.raises(ConfigError, match=r"'conv2a' and 'conv2b'.*config\.json.*same input 'conv1'"):
        amct.create_quant_retrain_model(model, weights, config_path, *outs)
    _assert_untouched(tmp_path, outs)


def test_error_nothing_enabled(tmp_path):
    config = {"version": 1, "conv1": {"retrain_enable": False}}
    model, weights, config_path, outs = _prepare(tmp_path, config)
    with pytest.raises(ConfigError, match="enables no layer"):
        amct.create_quant_retrain_model(model, weights, config_path, *outs)
    _assert_untouched(tmp_path, outs)


def test_error_bad_config_and_same_outputs(tmp_path):
    model, weights, config, outs = _prepare(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        amct.create_quant_retrain_model(model, weights, str(tmp_path / "nope.json"), *outs)
    with pytest.raises(ConfigError, match="same file"):
        amct.create_quant_retrain_model(model, weights, config, outs[0], outs[0], outs[2])
    with pytest.raises(ConfigError, match="input files"):
        amct.create_quant_retrain_model(model, weights, config, outs[0], weights, outs[2])
    with pytest.raises(ConfigError, match="non-empty file path"):
        amct.create_quant_retrain_model(model, weights, config, outs[0], None, outs[2])
    _assert_untouched(tmp_path, outs)


def test_error_model_already_has_retrain_layers(small):
    folder, _, _, config, (out_model, out_weights, _) = small
    again = outputs(folder / "again")
    with pytest.raises(AmctError, match=r"already quantized.*ActivationQAT"):
        amct.create_quant_retrain_model(out_model, out_weights, config, *again)
    assert not (folder / "again").exists()


# -- a real model -------------------------------------------------------------------------------------------
def test_resnet50_converts_with_every_batch_norm_folded(shared_models, tmp_path):
    """Every BatchNorm/Scale of ResNet-50 is folded, whether its convolution is retrained or not. (Only a
    few layers are enabled, which keeps ARQ over 25 million weights out of this test's time.)"""
    from amct_caffe.caffe.pycaffe import Net as PyNet

    prototxt = str(shared_models / "resnet50" / "ResNet-50-deploy.prototxt")
    net = PyNet(prototxt, caffe_pb2.TEST)
    randomize_params(net, seed=5)
    weights = str(tmp_path / "resnet50.caffemodel")
    net.save(weights)
    config = tmp_path / "config.json"
    amct.create_quant_retrain_config(str(config), prototxt, weights)
    settings = json.loads(config.read_text())
    assert len(settings) == 1 + 53 + 2  # version, the convolutions, pool5 (AVE 7x7), fc1000
    enabled = ("conv1", "res2a_branch1", "res2a_branch2a", "res5c_branch2c", "fc1000")
    for name, layer in settings.items():
        if name != "version":
            layer["retrain_enable"] = name in enabled
    config.write_text(json.dumps(settings))
    outs = outputs(tmp_path)
    amct.create_quant_retrain_model(prototxt, weights, str(config), *outs)
    written = parse_net(Path(outs[0]).read_text())
    types = [layer.type for layer in written.layer]
    assert types.count("Convolution") == 53
    assert types.count("BatchNorm") == 0 and types.count("Scale") == 0
    assert all(layer.convolution_param.bias_term for layer in written.layer if layer.type == "Convolution")
    assert types.count("WeightQAT") == 5
    acts = [layer for layer in written.layer if layer.type == "ActivationQAT"]
    assert [layer.retrain_data_quant_param.object_layer for layer in acts] == [
        "conv1", "res2a_branch1-res2a_branch2a", "res5c_branch2c", "fc1000"]
    blobs = {layer.name: len(layer.blobs) for layer in load_caffemodel(outs[1]).layer}
    assert blobs["conv1"] == 2 and blobs["res2a_branch1"] == 2 and blobs["res3a_branch1"] == 2
    assert not [name for name in blobs if name.startswith(("bn", "scale"))]
    records = read_records(outs[2])
    assert {name: rec.shape for name, rec in records.items()} == {
        "conv1": (3, 224, 224), "res2a_branch1": (64, 56, 56), "res2a_branch2a": (64, 56, 56),
        "res5c_branch2c": (512, 7, 7), "fc1000": (2048, 1, 1)}
