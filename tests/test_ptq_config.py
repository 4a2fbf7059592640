"""create_quant_config and the PTQ config files: the generated JSON, the simplified .cfg with its priority
rules, reading a JSON back, and every invalid value -> ConfigError naming the file, key or layer (nothing
written). Expected files are written out by hand from AMCT's documented keys and defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format

from amct_caffe import amct
from amct_caffe.errors import ConfigError, ModelFormatError
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import save_caffemodel
from amct_caffe.model.phase import TEST, filter_net
from amct_caffe.passes.quantizable import describe_layers
from amct_caffe.proto import amct_pb2, caffe_pb2
from amct_caffe.quant.ptq_config import load_json_config, parse_cfg_config

NET = """
name: "cfgnet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "deconv1" type: "Deconvolution" bottom: "conv1" top: "deconv1"
        convolution_param { num_output: 4 kernel_size: 2 } }
layer { name: "pool_ave" type: "Pooling" bottom: "conv1" top: "pool_ave"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "pool_max" type: "Pooling" bottom: "deconv1" top: "pool_max"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool_ave" top: "fc1" inner_product_param { num_output: 8 } }
layer { name: "fc_t" type: "InnerProduct" bottom: "fc1" top: "fc_t"
        inner_product_param { num_output: 3 transpose: true } }
layer { name: "fc_train" type: "InnerProduct" bottom: "fc1" top: "fc_train"
        inner_product_param { num_output: 2 } include { phase: TRAIN } }
"""
QUANTIZABLE = ["conv1", "deconv1", "pool_ave", "fc1"]


def act(max_p=0.999999, min_p=0.999999, start=0.7, end=1.3, step=0.01) -> dict:
    return {"max_percentile": max_p, "min_percentile": min_p, "search_range": [start, end],
            "search_step": step}


def layer(enable=True, channel_wise=None, **act_kw) -> dict:
    out = {"quant_enable": enable, "activation_quant_params": act(**act_kw)}
    if channel_wise is not None:
        out["weight_quant_params"] = {"channel_wise": channel_wise}
    return out


def header(batch_num=1, activation_offset=True, do_fusion=True, skip_fusion=()) -> dict:
    return {"version": 1, "batch_num": batch_num, "activation_offset": activation_offset,
            "do_fusion": do_fusion, "skip_fusion_layers": list(skip_fusion)}


DEFAULT = {**header(), "conv1": layer(channel_wise=True), "deconv1": layer(channel_wise=True),
           "pool_ave": layer(), "fc1": layer(channel_wise=False)}


def write_model(tmp_path: Path, text: str = NET, name: str = "model") -> tuple[str, str]:
    """The prototxt and a caffemodel naming its layers (the config reads no weight values)."""
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    net = text_format.Merge(text, caffe_pb2.NetParameter())
    weights = caffe_pb2.NetParameter(name=net.name)
    for lp in net.layer:
        weights.layer.add(name=lp.name, type=lp.type)
    caffemodel = tmp_path / f"{name}.caffemodel"
    save_caffemodel(weights, caffemodel)
    return str(proto), str(caffemodel)


def model_layers(text: str = NET):
    return describe_layers(Graph(filter_net(text_format.Merge(text, caffe_pb2.NetParameter()), TEST)))


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# -- generation -------------------------------------------------------------------------------------------
def test_default_config_json(tmp_path):
    model, weights = write_model(tmp_path)
    out = tmp_path / "sub" / "config.json"
    amct.create_quant_config(str(out), model, weights)
    assert read_json(out) == DEFAULT
    assert list(read_json(out)) == ["version", "batch_num", "activation_offset", "do_fusion",
                                    "skip_fusion_layers", *QUANTIZABLE]
    assert out.read_text().endswith("}\n")


def test_arguments_skip_layers_batch_num_activation_offset(tmp_path):
    model, weights = write_model(tmp_path)
    out = tmp_path / "config.json"
    amct.create_quant_config(str(out), model, weights, ["deconv1", "fc1"], 4, False)
    expected = {**header(4, False), "conv1": layer(channel_wise=True),
                "deconv1": layer(False, channel_wise=True), "pool_ave": layer(),
                "fc1": layer(False, channel_wise=False)}
    assert read_json(out) == expected
    # positional use, as AMCT's samples call it; the package-level names work too
    import amct_caffe

    amct_caffe.create_quant_config(str(out), model, weights, None, 2, True)
    assert read_json(out) == {**DEFAULT, "batch_num": 2}


def test_json_round_trip(tmp_path):
    model, weights = write_model(tmp_path)
    out = tmp_path / "config.json"
    amct.create_quant_config(str(out), model, weights, ["pool_ave"], 3)
    config = load_json_config(out, model_layers())
    assert config.batch_num == 3 and config.activation_offset and config.do_fusion
    assert config.enabled == ["conv1", "deconv1", "fc1"]
    assert config.layers["fc1"].channel_wise is False and config.layers["pool_ave"].channel_wise is None
    assert config.layers["conv1"].ifmr.search_range_end == 1.3


def test_json_defaults_for_omitted_keys(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"conv1": {}, "fc1": {"quant_enable": False}}))
    config = load_json_config(path, model_layers())
    assert (config.batch_num, config.activation_offset, config.do_fusion) == (1, True, True)
    assert list(config.layers) == ["conv1", "fc1"] and config.enabled == ["conv1"]
    assert config.layers["conv1"].channel_wise is True
    assert config.layers["conv1"].ifmr.max_percentile == 0.999999


CFG = """
batch_num: 2
activation_offset: false
skip_layers: "deconv1"
skip_fusion_layers: "conv1"
common_config {
  arq_quantize { channel_wise: true }
  ifmr_quantize { search_range_start: 0.8 search_range_end: 1.2 search_step: 0.02
                  max_percentile: 0.9999 min_percentile: 0.9999 }
}
override_layer_types {
  layer_type: "Pooling"
  calibration_config { arq_quantize { channel_wise: false } ifmr_quantize { search_step: 0.05 } }
}
override_layer_types {
  layer_type: "InnerProduct"
  calibration_config { arq_quantize { channel_wise: false } ifmr_quantize { max_percentile: 0.99 } }
}
override_layer_configs {
  layer_name: "fc1"
  calibration_config { ifmr_quantize { min_percentile: 0.98 } }
}
"""


def test_cfg_priority(tmp_path):
    """override_layer_configs > override_layer_types > common_config, each a whole calibration_config: fc1
    takes its own override (AMCT's defaults where it is silent, not the type override's max_percentile),
    pool_ave the Pooling override (arq_quantize on a Pooling is accepted and ignored), conv1 the common
    one."""
    model, weights = write_model(tmp_path)
    cfg = tmp_path / "quant.cfg"
    cfg.write_text(CFG)
    out = tmp_path / "config.json"
    amct.create_quant_config(str(out), model, weights, config_defination=str(cfg))
    common = {"max_p": 0.9999, "min_p": 0.9999, "start": 0.8, "end": 1.2, "step": 0.02}
    expected = {
        **header(2, False, True, ["conv1"]),
        "conv1": layer(channel_wise=True, **common),
        "deconv1": layer(False, channel_wise=True, **common),
        "pool_ave": layer(step=0.05),
        "fc1": layer(channel_wise=False, min_p=0.98),
    }
    assert read_json(out) == expected


def test_cfg_skip_layer_types_and_do_fusion(tmp_path):
    model, weights = write_model(tmp_path)
    cfg = tmp_path / "quant.cfg"
    cfg.write_text('do_fusion: false skip_layer_types: "Convolution" skip_layer_types: "Pooling"')
    out = tmp_path / "config.json"
    amct.create_quant_config(str(out), model, weights, config_defination=str(cfg))
    got = read_json(out)
    assert got["do_fusion"] is False
    assert [name for name in QUANTIZABLE if got[name]["quant_enable"]] == ["deconv1", "fc1"]


def test_cfg_ignores_the_other_arguments_with_a_warning(tmp_path, amct_log):
    model, weights = write_model(tmp_path)
    cfg = tmp_path / "quant.cfg"
    cfg.write_text("batch_num: 5")
    out = tmp_path / "config.json"
    amct.create_quant_config(str(out), model, weights, ["conv1"], 3, False, str(cfg))
    assert read_json(out) == {**DEFAULT, "batch_num": 5}
    assert "skip_layers, batch_num, activation_offset are ignored" in amct_log.text


def test_proto_has_the_calibration_config_messages():
    names = set(amct_pb2.AMCTConfig.DESCRIPTOR.fields_by_name)
    assert {"batch_num", "activation_offset", "do_fusion", "skip_fusion_layers", "skip_layers",
            "common_config", "override_layer_types", "override_layer_configs"} <= names
    ifmr = amct_pb2.IFMRQuantize()
    assert (ifmr.search_range_start, ifmr.search_step) == pytest.approx((0.7, 0.01))


# -- invalid arguments and .cfg files ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"batch_num": 0}, ["batch_num", "> 0"]),
    ({"batch_num": -2}, ["batch_num"]),
    ({"batch_num": True}, ["batch_num"]),
    ({"batch_num": 2.0}, ["batch_num"]),
    ({"activation_offset": "yes"}, ["activation_offset"]),
    ({"skip_layers": "conv1"}, ["skip_layers", "list"]),
    ({"skip_layers": ["nope"]}, ["skip_layers", "'nope'"]),
])
def test_bad_arguments_write_nothing(tmp_path, kwargs, words):
    model, weights = write_model(tmp_path)
    out = tmp_path / "config.json"
    with pytest.raises(ConfigError) as info:
        amct.create_quant_config(str(out), model, weights, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert not out.exists()


def test_missing_files_and_unquantizable_model(tmp_path):
    model, weights = write_model(tmp_path)
    with pytest.raises(ModelFormatError, match="missing.caffemodel"):
        amct.create_quant_config(str(tmp_path / "c.json"), model, str(tmp_path / "missing.caffemodel"))
    relu = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
            'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    model2, weights2 = write_model(tmp_path, relu, "relu")
    with pytest.raises(ConfigError, match="nothing to quantize"):
        amct.create_quant_config(str(tmp_path / "c.json"), model2, weights2)
    quantized = NET.replace('type: "ReLU"', 'type: "Quant"')
    model3, weights3 = write_model(tmp_path, quantized, "quantized")
    with pytest.raises(ConfigError, match="already quantized"):
        amct.create_quant_config(str(tmp_path / "c.json"), model3, weights3)
    assert not (tmp_path / "c.json").exists()


BAD_CFGS = [
    ("syntax", "batch_num: 2 nonsense {", ["cannot parse"]),
    ("unknown field", "batch_size: 2", ["cannot parse", "batch_size"]),
    ("batch_num 0", "batch_num: 0", ["batch_num", "> 0"]),
    ("missing required", 'override_layer_configs { layer_name: "conv1" }',
     ["required", "calibration_config"]),
    ("nuq", "common_config { nuq_quantize { num_steps: 16 } }", ["nuq_quantize", "not implemented"]),
    ("skip unknown", 'skip_layers: "nope"', ["skip_layers 'nope'", "no layer"]),
    ("skip type", 'skip_layer_types: "ReLU"', ["skip_layer_types 'ReLU'"]),
    ("fusion skip unknown", 'skip_fusion_layers: "nope"', ["skip_fusion_layers 'nope'"]),
    ("fusion skip pooling", 'skip_fusion_layers: "pool_ave"', ["pool_ave", "Pooling"]),
    ("override unknown", 'override_layer_configs { layer_name: "nope" calibration_config { } }',
     ["override_layer_configs 'nope'"]),
    ("override unquantizable", 'override_layer_configs { layer_name: "pool_max" calibration_config { } }',
     ["pool_max", "cannot be quantized", "AVE"]),
    ("override twice", 'override_layer_configs { layer_name: "fc1" calibration_config { } }\n'
     'override_layer_configs { layer_name: "fc1" calibration_config { } }', ["more than once"]),
    ("type twice", 'override_layer_types { layer_type: "Pooling" calibration_config { } }\n'
     'override_layer_types { layer_type: "Pooling" calibration_config { } }', ["more than once"]),
    ("type unknown", 'override_layer_types { layer_type: "ReLU" calibration_config { } }',
     ["override_layer_types 'ReLU'"]),
    ("ip channel_wise", 'override_layer_configs { layer_name: "fc1" calibration_config { arq_quantize { '
     'channel_wise: true } } }', ["channel_wise", "InnerProduct"]),
    ("percentile", "common_config { ifmr_quantize { max_percentile: 0.4 } }", ["max_percentile", "(0.5, 1]"]),
    ("range reversed", "common_config { ifmr_quantize { search_range_start: 1.3 search_range_end: 0.7 } }",
     ["search_range_start", "0 < search_range_start < search_range_end"]),
    ("step too big", "common_config { ifmr_quantize { search_step: 0.7 } }", ["search_step", "(0,"]),
    ("step zero", 'override_layer_types { layer_type: "Convolution" calibration_config { ifmr_quantize { '
     'search_step: 0 } } }', ["override_layer_types 'Convolution'", "search_step"]),
]


@pytest.mark.parametrize("name, text, words", BAD_CFGS, ids=[c[0] for c in BAD_CFGS])
def test_invalid_cfg_writes_nothing(tmp_path, name, text, words):
    model, weights = write_model(tmp_path)
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(text)
    out = tmp_path / "config.json"
    out.write_text("old")
    with pytest.raises(ConfigError) as info:
        amct.create_quant_config(str(out), model, weights, config_defination=str(cfg))
    message = str(info.value)
    assert "bad.cfg" in message and "Simplified PTQ config" in message
    for word in words:
        assert word in message, (word, message)
    assert out.read_text() == "old"


def test_cfg_direct_parse_global_channel_wise_on_inner_product():
    text = "common_config { arq_quantize { channel_wise: true } }"
    config = parse_cfg_config(text, "x.cfg", model_layers())
    assert config.layers["fc1"].channel_wise is False and config.layers["conv1"].channel_wise is True


# -- invalid JSON files (read by init) -----------------------------------------------------------------------
def _set(path: str, value):
    def edit(cfg: dict) -> None:
        keys = path.split(".")
        target = cfg
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


def _drop(path: str):
    def edit(cfg: dict) -> None:
        keys = path.split(".")
        target = cfg
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


BAD_JSON = [
    ("version", _set("version", 2), ["key 'version'"]),
    ("batch_num zero", _set("batch_num", 0), ["key 'batch_num'", "> 0"]),
    ("batch_num float", _set("batch_num", 1.5), ["batch_num"]),
    ("batch_num bool", _set("batch_num", True), ["batch_num"]),
    ("activation_offset", _set("activation_offset", 1), ["activation_offset", "bool"]),
    ("do_fusion", _set("do_fusion", "no"), ["do_fusion"]),
    ("skip_fusion type", _set("skip_fusion_layers", "conv1"), ["skip_fusion_layers", "list"]),
    ("skip_fusion unknown", _set("skip_fusion_layers", ["nope"]), ["skip_fusion_layers 'nope'"]),
    ("skip_fusion pooling", _set("skip_fusion_layers", ["pool_ave"]), ["Pooling"]),
    ("another model", _set("conv9", {"quant_enable": True}),
     ["layer 'conv9'", "no layer", "create_quant_config"]),
    ("unquantizable", _set("pool_max", {}), ["pool_max", "cannot be quantized"]),
    ("train-only layer", _set("fc_train", {}), ["fc_train", "TEST-phase"]),
    ("unknown key", _set("conv1.wts_algo", "x"), ["layer 'conv1', key 'wts_algo'", "unknown key"]),
    ("quant_enable type", _set("conv1.quant_enable", "true"), ["quant_enable", "bool"]),
    ("act params type", _set("conv1.activation_quant_params", []), ["activation_quant_params", "object"]),
    ("unknown act key", _set("conv1.activation_quant_params.num_bits", 8), ["num_bits", "unknown key"]),
    ("max_percentile", _set("conv1.activation_quant_params.max_percentile", 0.5), ["max_percentile",
                                                                                    "(0.5, 1]"]),
    ("min_percentile", _set("conv1.activation_quant_params.min_percentile", 1.01), ["min_percentile"]),
    ("percentile type", _set("conv1.activation_quant_params.max_percentile", "1"), ["max_percentile",
                                                                                     "number"]),
    ("search_range len", _set("conv1.activation_quant_params.search_range", [0.7]), ["search_range",
                                                                                      "two numbers"]),
    ("search_range order", _set("conv1.activation_quant_params.search_range", [1.3, 0.7]),
     ["search_range[0]", "0 < search_range[0] < search_range[1]"]),
    ("search_range zero", _set("conv1.activation_quant_params.search_range", [0.0, 1.3]), ["search_range"]),
    ("search_step", _set("conv1.activation_quant_params.search_step", 0.0), ["search_step"]),
    ("search_step big", _set("conv1.activation_quant_params.search_step", 0.61), ["search_step", "0.6"]),
    ("weights on pooling", _set("pool_ave.weight_quant_params", {"channel_wise": False}),
     ["pool_ave", "no weights"]),
    ("ip channel_wise", _set("fc1.weight_quant_params.channel_wise", True), ["fc1", "channel_wise"]),
    ("channel_wise type", _set("conv1.weight_quant_params.channel_wise", 1), ["channel_wise", "bool"]),
    ("unknown weight key", _set("conv1.weight_quant_params.algo", "arq"), ["algo", "unknown key"]),
    ("nothing enabled", lambda c: [c[n].update(quant_enable=False) for n in QUANTIZABLE],
     ["enables no layer"]),
    ("layer not an object", _set("conv1", True), ["layer 'conv1'", "object"]),
    ("drop act", _drop("conv1.activation_quant_params"), None),  # valid: defaults
]


@pytest.mark.parametrize("name, edit, words", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_invalid_json_refused_by_init(tmp_path, name, edit, words):
    model, weights = write_model(tmp_path)
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), model, weights)
    data = read_json(config)
    edit(data)
    config.write_text(json.dumps(data))
    record = tmp_path / "record.txt"
    if words is None:
        amct.init(str(config), model, weights, str(record))
        assert record.exists()
        return
    with pytest.raises(ConfigError) as info:
        amct.init(str(config), model, weights, str(record))
    message = str(info.value)
    assert "config.json" in message, message
    for word in words:
        assert word in message, (word, message)
    assert not record.exists()


@pytest.mark.parametrize("text, words", [
    ("{", ["line 1", "not valid JSON"]),
    ("[1, 2]", ["one JSON object"]),
    ('{"conv1": {}, "conv1": {}}', ["conv1", "more than once"]),
    ('{"conv1": {"quant_enable": true, "quant_enable": false}}', ["quant_enable", "more than once"]),
])
def test_invalid_json_text(tmp_path, text, words):
    model, weights = write_model(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        amct.init(str(config), model, weights, str(tmp_path / "r.txt"))
    for word in words:
        assert word in str(info.value)


def test_layer_named_like_a_global_key_cannot_be_written(tmp_path):
    model, weights = write_model(tmp_path, NET.replace('"conv1"', '"batch_num"'), "odd")
    with pytest.raises(ConfigError, match="batch_num"):
        amct.create_quant_config(str(tmp_path / "c.json"), model, weights)
    assert not (tmp_path / "c.json").exists()
