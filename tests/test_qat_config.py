"""create_quant_retrain_config: quantizable layers, default fixed_min, the QAT JSON and the simplified .cfg.

Every expected config below is written out by hand from AMCT's rules (docs/amct-reference.md §2.1, §4.1,
§4.2), not taken from the code under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from google.protobuf import text_format

from amct_caffe.errors import ConfigError, ModelFormatError
from amct_caffe.model.graph import Graph
from amct_caffe.model.io import save_caffemodel
from amct_caffe.passes.quantizable import default_fixed_min, describe_layers, unsupported_reason
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.config import (
    LayerRetrainConfig,
    ModelLayer,
    default_config,
    dumps_json,
    load_json_config,
    parse_json_config,
)

NET = """
name: "qat_test"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv_pre" type: "Convolution" bottom: "conv1" top: "conv_pre"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "deconv_g2" type: "Deconvolution" bottom: "conv2" top: "deconv_g2"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 } }
layer { name: "deconv1" type: "Deconvolution" bottom: "conv2" top: "deconv1"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 } }
layer { name: "pool_ave" type: "Pooling" bottom: "conv1" top: "pool_ave"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "pool_max" type: "Pooling" bottom: "conv2" top: "pool_max"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "pool_global" type: "Pooling" bottom: "pool_ave" top: "pool_global"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool_ave" top: "fc1"
        inner_product_param { num_output: 10 } }
layer { name: "relu2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 5 } }
layer { name: "fc_train" type: "InnerProduct" bottom: "fc1" top: "fc_train"
        inner_product_param { num_output: 5 } include { phase: TRAIN } }
"""

CONV = {"algo": "arq_retrain", "channel_wise": True}
FC = {"algo": "arq_retrain", "channel_wise": False}


def data(fixed_min, clip_max=None, clip_min=None):
    out = {"algo": "ulq_quantize"}
    if clip_max is not None:
        out["clip_max"] = clip_max
        out["clip_min"] = clip_min
    out["fixed_min"] = fixed_min
    return out


# Hand-written: conv1 reads the net input; conv_pre reads conv1 *before* the in-place relu1; conv2 and
# pool_ave read relu1's output; deconv_g2 (group 2), pool_max, pool_global are not quantizable; deconv1
# reads conv2 (no ReLU); fc1 reads an AVE pooling; fc2 reads the in-place relu2; fc_train is TRAIN-only.
EXPECTED_DEFAULT = {
    "version": 1,
    "conv1": {"retrain_enable": True, "retrain_data_config": data(False), "retrain_weight_config": CONV},
    "conv_pre": {"retrain_enable": True, "retrain_data_config": data(False), "retrain_weight_config": CONV},
    "conv2": {"retrain_enable": True, "retrain_data_config": data(True), "retrain_weight_config": CONV},
    "deconv1": {"retrain_enable": True, "retrain_data_config": data(False), "retrain_weight_config": CONV},
    "pool_ave": {"retrain_enable": True, "retrain_data_config": data(True)},
    "fc1": {"retrain_enable": True, "retrain_data_config": data(False), "retrain_weight_config": FC},
    "fc2": {"retrain_enable": True, "retrain_data_config": data(True), "retrain_weight_config": FC},
}

# AMCT reference §4.2's example, adapted to NET, plus a type override.
CFG = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: -6.0 } } }
retrain_weight_quant_config { arq_retrain { channel_wise: true } }
skip_layers: "conv_pre"
override_layer_configs {
  layer_name: "fc2"
  retrain_data_quant_config { ulq_quantize { fixed_min: true } }
  retrain_weight_quant_config { arq_retrain { channel_wise: false } }
}
override_layer_types {
  layer_type: "Deconvolution"
  retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 0.3 clip_min: -0.3 } } }
  retrain_weight_quant_config { arq_retrain { channel_wise: false } }
}
"""

EXPECTED_CFG = {
    "version": 1,
    "conv1": {
        "retrain_enable": True,
        "retrain_data_config": data(False, 6.0, -6.0),
        "retrain_weight_config": CONV,
    },
    "conv_pre": {
        "retrain_enable": False,
        "retrain_data_config": data(False, 6.0, -6.0),
        "retrain_weight_config": CONV,
    },
    "conv2": {
        "retrain_enable": True,
        "retrain_data_config": data(True, 6.0, -6.0),
        "retrain_weight_config": CONV,
    },
    "deconv1": {
        "retrain_enable": True,
        "retrain_data_config": data(False, 0.3, -0.3),
        "retrain_weight_config": FC,
    },
    "pool_ave": {"retrain_enable": True, "retrain_data_config": data(True, 6.0, -6.0)},
    # the global channel_wise true is for convolutions; InnerProduct keeps per-tensor weights
    "fc1": {
        "retrain_enable": True,
        "retrain_data_config": data(False, 6.0, -6.0),
        "retrain_weight_config": FC,
    },
    "fc2": {"retrain_enable": True, "retrain_data_config": data(True), "retrain_weight_config": FC},
}


def write_model(tmp_path: Path, text: str = NET, name: str = "model") -> tuple[str, str]:
    """The prototxt and a caffemodel for it (layer names only: the config never reads weights)."""
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    net = text_format.Merge(text, caffe_pb2.NetParameter())
    weights = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        weights.layer.add(name=layer.name, type=layer.type)
    caffemodel = tmp_path / f"{name}.caffemodel"
    save_caffemodel(weights, caffemodel)
    return str(proto), str(caffemodel)


def graph_of(text: str) -> Graph:
    return Graph(text_format.Merge(text, caffe_pb2.NetParameter()))


def model_layers() -> list[ModelLayer]:
    from amct_caffe.model.phase import TEST, filter_net

    return describe_layers(Graph(filter_net(text_format.Merge(NET, caffe_pb2.NetParameter()), TEST)))


# -- quantizable layers and fixed_min -----------------------------------------------------------------------
def test_quantizable_and_reasons():
    layers = {layer.name: layer for layer in model_layers()}
    assert "fc_train" not in layers  # TEST-phase view
    quantizable = [name for name, layer in layers.items() if layer.quantizable]
    assert quantizable == ["conv1", "conv_pre", "conv2", "deconv1", "pool_ave", "fc1", "fc2"]
    assert "group" in layers["deconv_g2"].unsupported_reason
    assert "MAX" in layers["pool_max"].unsupported_reason
    assert "global" in layers["pool_global"].unsupported_reason
    assert "ReLU" in layers["relu1"].unsupported_reason


@pytest.mark.parametrize(
    "layer, reason",
    [
        (
            'type: "InnerProduct" bottom: "data" top: "y" '
            "inner_product_param { num_output: 2 transpose: true }",
            "transpose",
        ),
        (
            'type: "InnerProduct" bottom: "data" top: "y" inner_product_param { num_output: 2 axis: 2 }',
            "axis",
        ),
        (
            'type: "Convolution" bottom: "data" top: "y" '
            "convolution_param { num_output: 2 kernel_size: 1 kernel_size: 1 kernel_size: 1 }",
            "3 spatial axes",
        ),
        (
            'type: "Deconvolution" bottom: "data" top: "y" convolution_param { num_output: 2 kernel_size: 2 '
            "dilation: 2 }",
            "dilation",
        ),
        (
            'type: "Pooling" bottom: "data" top: "y" pooling_param { pool: STOCHASTIC kernel_size: 2 }',
            "STOCHASTIC",
        ),
        (
            'type: "Convolution" bottom: "data" bottom: "data2" top: "y" top: "y2" '
            "convolution_param { num_output: 2 kernel_size: 1 }",
            "2 bottoms",
        ),
    ],
)
def test_unsupported_layer_options(layer, reason):
    g = graph_of(
        'layer { name: "in" type: "Input" top: "data" top: "data2" '
        "input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n"
        f'layer {{ name: "L" {layer} }}'
    )
    assert reason in unsupported_reason(g, "L")


def test_filter_rank_from_input_rank():
    """A single kernel_size on a 5-D input is a 3-D convolution (5-D filter): not quantizable."""
    net = (
        'layer { name: "in" type: "Input" top: "x" '
        "input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 dim: %s } } }\n"
        'layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }\n'
        'layer { name: "c" type: "Convolution" bottom: "x" top: "c" '
        "convolution_param { num_output: 2 kernel_size: 1 } }"
    )
    assert "3 spatial axes" in unsupported_reason(graph_of(net % "4"), "c")
    four_d = net.replace(" dim: %s", "")
    assert unsupported_reason(graph_of(four_d), "c") is None
    assert (
        unsupported_reason(graph_of(net.replace("kernel_size: 1", "kernel_h: 1 kernel_w: 1") % "4"), "c")
        is None
    )


@pytest.mark.parametrize(
    "activation, expected",
    [
        ('type: "ReLU"', True),
        ('type: "ReLU" relu_param { negative_slope: 0.1 }', False),
        ('type: "ReLU6"', True),
        ('type: "Clip" clip_param { min: 0 max: 6 }', True),
        ('type: "Clip" clip_param { min: -1 max: 6 }', False),
        ('type: "Sigmoid"', False),
        ('type: "TanH"', False),
    ],
)
def test_default_fixed_min_by_activation(activation, expected):
    g = graph_of(
        'layer { name: "in" type: "Input" top: "x" }\n'
        'layer { name: "c0" type: "Convolution" bottom: "x" top: "c0" }\n'
        f'layer {{ name: "act" {activation} bottom: "c0" top: "c0" }}\n'
        'layer { name: "drop" type: "Dropout" bottom: "c0" top: "c0" }\n'
        'layer { name: "c1" type: "Convolution" bottom: "c0" top: "c1" }\n'
        f'layer {{ name: "act2" {activation} bottom: "c1" top: "a2" }}\n'
        'layer { name: "c2" type: "Convolution" bottom: "a2" top: "c2" }\n'
    )
    assert default_fixed_min(g, "c1") is expected  # in place, through an in-place Dropout
    assert default_fixed_min(g, "c2") is expected  # not in place
    assert default_fixed_min(g, "c0") is False  # the net input


def test_already_quantized_model_is_rejected():
    g = graph_of(NET + 'layer { name: "fc2_quant_layer" type: "Quant" bottom: "fc1" top: "q" }')
    with pytest.raises(ConfigError, match="already quantized.*fc2_quant_layer"):
        describe_layers(g)


# -- the default config and its JSON ------------------------------------------------------------------------
def test_default_config_json(tmp_path, amct_log):
    from amct_caffe import amct

    model, weights = write_model(tmp_path)
    config_file = tmp_path / "out" / "config.json"
    amct.create_quant_retrain_config(str(config_file), model, weights)
    assert "Create quant retrain config file" in amct_log.text
    assert "Layer 'deconv_g2' stays float: Deconvolution with group: 2" in amct_log.text
    text = config_file.read_text()
    written = json.loads(text)
    assert written == EXPECTED_DEFAULT
    assert list(written) == list(EXPECTED_DEFAULT)  # version first, then the layers in model order
    assert text == json.dumps(EXPECTED_DEFAULT, indent=4) + "\n"


def test_package_level_api(tmp_path):
    import amct_caffe as amct

    model, weights = write_model(tmp_path)
    amct.create_quant_retrain_config(str(tmp_path / "c.json"), model, weights, None)
    assert json.loads((tmp_path / "c.json").read_text()) == EXPECTED_DEFAULT


def test_json_round_trip(tmp_path):
    layers = model_layers()
    config = default_config((x.name, x.layer_type, x.default_fixed_min) for x in layers if x.quantizable)
    path = tmp_path / "c.json"
    path.write_text(dumps_json(config))
    assert load_json_config(path, layers) == config
    # clips and skips survive too
    edited = dict(config)
    edited["conv1"] = LayerRetrainConfig("conv1", "Convolution", False, 2.5, -1.5, False, False)
    path.write_text(dumps_json(edited))
    assert load_json_config(path, layers) == edited


def test_json_defaults_for_omitted_keys(tmp_path):
    """Omitted fixed_min is the graph's; omitted channel_wise AMCT's default; version is optional."""
    text = json.dumps({"conv2": {"retrain_data_config": {"algo": "ulq_quantize"}}, "fc1": {}})
    config = parse_json_config(text, "c.json", model_layers())
    assert config == {
        "conv2": LayerRetrainConfig("conv2", "Convolution", True, None, None, True, True),
        "fc1": LayerRetrainConfig("fc1", "InnerProduct", True, None, None, False, False),
    }


def test_cfg_example(tmp_path):
    from amct_caffe import amct

    model, weights = write_model(tmp_path)
    cfg = tmp_path / "retrain.cfg"
    cfg.write_text(CFG)
    config_file = tmp_path / "config.json"
    amct.create_quant_retrain_config(str(config_file), model, weights, config_defination=str(cfg))
    written = json.loads(config_file.read_text())
    assert written == EXPECTED_CFG
    assert list(written) == list(EXPECTED_CFG)


# -- invalid JSON configs ---------------------------------------------------------------------------------
def base_json() -> dict:
    return json.loads(json.dumps(EXPECTED_DEFAULT))


def _set(path, value):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return cfg

    return edit


def _drop(path):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return cfg

    return edit


JSON_CASES = [
    ("unknown layer", _set(["nope"], {"retrain_enable": True}), ["nope", "no layer"]),
    ("unsupported layer", _set(["pool_max"], {"retrain_enable": True}), ["pool_max", "MAX"]),
    ("unsupported type", _set(["relu1"], {"retrain_enable": True}), ["relu1", "ReLU"]),
    ("clip_max zero", _set(["conv1", "retrain_data_config", "clip_max"], 0.0), ["conv1", "clip_max"]),
    (
        "clip_max negative",
        lambda c: _set(["conv1", "retrain_data_config", "clip_min"], -1.0)(
            _set(["conv1", "retrain_data_config", "clip_max"], -0.5)(c)
        ),
        ["conv1", "clip_max", "> 0"],
    ),
    (
        "clip_min positive",
        lambda c: _set(["conv1", "retrain_data_config", "clip_min"], 0.5)(
            _set(["conv1", "retrain_data_config", "clip_max"], 1.0)(c)
        ),
        ["conv1", "clip_min", "< 0"],
    ),
    (
        "clip_min zero",
        lambda c: _set(["conv1", "retrain_data_config", "clip_min"], 0)(
            _set(["conv1", "retrain_data_config", "clip_max"], 1.0)(c)
        ),
        ["conv1", "clip_min"],
    ),
    ("only clip_max", _set(["conv1", "retrain_data_config", "clip_max"], 1.0), ["conv1", "without clip_min"]),
    (
        "only clip_min",
        _set(["conv1", "retrain_data_config", "clip_min"], -1.0),
        ["conv1", "without clip_max"],
    ),
    (
        "channel_wise on InnerProduct",
        _set(["fc1", "retrain_weight_config", "channel_wise"], True),
        ["fc1", "channel_wise"],
    ),
    (
        "unknown layer key",
        _set(["conv1", "retrain_enabled"], True),
        ["conv1", "retrain_enabled", "unknown key"],
    ),
    ("unknown data key", _set(["conv1", "retrain_data_config", "clipmax"], 1.0), ["conv1", "clipmax"]),
    (
        "unknown weight key",
        _set(["conv1", "retrain_weight_config", "per_channel"], True),
        ["conv1", "per_channel"],
    ),
    (
        "retrain_enable not bool",
        _set(["conv2", "retrain_enable"], "yes"),
        ["conv2", "retrain_enable", "bool"],
    ),
    ("fixed_min not bool", _set(["conv2", "retrain_data_config", "fixed_min"], 1), ["conv2", "fixed_min"]),
    (
        "clip_max string",
        lambda c: _set(["conv1", "retrain_data_config", "clip_min"], -1.0)(
            _set(["conv1", "retrain_data_config", "clip_max"], "6")(c)
        ),
        ["conv1", "clip_max", "number"],
    ),
    (
        "clip_max bool",
        lambda c: _set(["conv1", "retrain_data_config", "clip_min"], -1.0)(
            _set(["conv1", "retrain_data_config", "clip_max"], True)(c)
        ),
        ["conv1", "clip_max"],
    ),
    (
        "channel_wise not bool",
        _set(["conv1", "retrain_weight_config", "channel_wise"], "true"),
        ["conv1", "channel_wise"],
    ),
    ("data config not object", _set(["conv1", "retrain_data_config"], []), ["conv1", "retrain_data_config"]),
    ("layer not object", _set(["conv1"], True), ["conv1", "object"]),
    (
        "data algo",
        _set(["fc2", "retrain_data_config", "algo"], "ifmr_quantize"),
        ["fc2", "algo", "ulq_quantize"],
    ),
    (
        "weight algo",
        _set(["fc2", "retrain_weight_config", "algo"], "arq_quantize"),
        ["fc2", "algo", "arq_retrain"],
    ),
    (
        "weights on AVE pooling",
        _set(["pool_ave", "retrain_weight_config"], CONV),
        ["pool_ave", "retrain_weight_config"],
    ),
    ("version", _set(["version"], 2), ["version"]),
    (
        "dst_type INT4",
        _set(["conv1", "retrain_data_config", "dst_type"], "INT4"),
        ["conv1", "dst_type", "INT8"],
    ),
    ("omitted algo is accepted", _drop(["fc2", "retrain_weight_config", "algo"]), None),
]


@pytest.mark.parametrize("name, edit, words", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_invalid_json(tmp_path, name, edit, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(edit(base_json()), indent=4))
    if words is None:
        load_json_config(path, model_layers())
        return
    with pytest.raises(ConfigError) as info:
        load_json_config(path, model_layers())
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"version": 1, "conv1": {}, "conv1": {}}', ["conv1", "more than once"]),
        (
            '{"conv1": {"retrain_enable": true, "retrain_enable": false}}',
            ["conv1", "retrain_enable", "more than once"],
        ),
        (
            '{"conv1": {"retrain_data_config": {"fixed_min": true, "fixed_min": false}}}',
            ["conv1", "fixed_min"],
        ),
        ('{"conv1": {', ["line 1", "JSON"]),
        ("[1, 2]", ["one JSON object"]),
        ('{"conv1": {"retrain_data_config": {"clip_max": Infinity, "clip_min": -1}}}', ["conv1", "clip_max"]),
    ],
)
def test_invalid_json_text(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_json_config(path, model_layers())
    for word in [str(path), *words]:
        assert word in str(info.value)


# -- invalid .cfg and API errors: nothing is written --------------------------------------------------------
OVERRIDE = """override_layer_configs {{ layer_name: "{name}"
  retrain_data_quant_config {{ ulq_quantize {{ {data} }} }}
  retrain_weight_quant_config {{ arq_retrain {{ {weights} }} }} }}
"""
TYPE_OVERRIDE = """override_layer_types {{ layer_type: "{name}"
  retrain_data_quant_config {{ ulq_quantize {{ {data} }} }}
  retrain_weight_quant_config {{ arq_retrain {{ {weights} }} }} }}
"""

CFG_CASES = [
    ("skip_layer_types", 'skip_layer_types: "Convolution"', ["skip_layer_types", "not supported for Caffe"]),
    ("quant_skip_types", 'quant_skip_types: "Pooling"', ["quant_skip_types", "not supported for Caffe"]),
    ("skip unknown layer", 'skip_layers: "nope"', ["nope", "no layer"]),
    ("quant_skip unknown layer", 'quant_skip_layers: "nope2"', ["nope2"]),
    ("override unknown layer", OVERRIDE.format(name="nope", data="", weights=""), ["nope", "no layer"]),
    (
        "override unsupported layer",
        OVERRIDE.format(name="pool_max", data="", weights=""),
        ["pool_max", "MAX"],
    ),
    ("override twice", OVERRIDE.format(name="fc1", data="", weights="") * 2, ["fc1", "more than once"]),
    (
        "override channel_wise FC",
        OVERRIDE.format(name="fc1", data="", weights="channel_wise: true"),
        ["fc1", "channel_wise"],
    ),
    (
        "override bad clips",
        OVERRIDE.format(name="conv2", data="clip_max_min { clip_max: 1 clip_min: 0.5 }", weights=""),
        ["conv2", "clip_min"],
    ),
    ("type override unsupported", TYPE_OVERRIDE.format(name="ReLU", data="", weights=""), ["ReLU"]),
    (
        "type override channel_wise FC",
        TYPE_OVERRIDE.format(name="InnerProduct", data="", weights="channel_wise: true"),
        ["InnerProduct", "channel_wise"],
    ),
    (
        "type override twice",
        TYPE_OVERRIDE.format(name="Pooling", data="", weights="") * 2,
        ["Pooling", "more than once"],
    ),
    (
        "global clip_max",
        "retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: -1 clip_min: -2 } } }",
        ["retrain_data_quant_config", "clip_max"],
    ),
    (
        "missing required",
        'override_layer_configs { layer_name: "fc1" }',
        ["required", "retrain_data_quant_config"],
    ),
    (
        "missing clip_min",
        "retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 1 } } }",
        ["required", "clip_min"],
    ),
    ("parse error", "no_such_field: 1", ["no_such_field"]),
    ("dst_type INT4", "retrain_weight_quant_config { arq_retrain { dst_type: INT4 } }", ["dst_type", "INT8"]),
]


@pytest.mark.parametrize("name, text, words", CFG_CASES, ids=[c[0] for c in CFG_CASES])
def test_invalid_cfg_writes_nothing(tmp_path, name, text, words):
    from amct_caffe import amct

    model, weights = write_model(tmp_path)
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(text)
    config_file = tmp_path / "config.json"
    config_file.write_text("previous contents")
    with pytest.raises(ConfigError) as info:
        amct.create_quant_retrain_config(str(config_file), model, weights, str(cfg))
    for word in [str(cfg), *words]:
        assert word in str(info.value)
    assert config_file.read_text() == "previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.cfg",
        "config.json",
        "model.caffemodel",
        "model.prototxt",
    ]


def test_api_errors_write_nothing(tmp_path):
    from amct_caffe import amct

    model, weights = write_model(tmp_path)
    config_file = tmp_path / "config.json"
    with pytest.raises(ModelFormatError, match="missing.caffemodel"):
        amct.create_quant_retrain_config(str(config_file), model, str(tmp_path / "missing.caffemodel"))
    with pytest.raises(ConfigError, match="config_file"):
        amct.create_quant_retrain_config(3, model, weights)
    with pytest.raises(ConfigError, match="config_defination"):
        amct.create_quant_retrain_config(str(config_file), model, weights, config_defination=["a.cfg"])
    with pytest.raises(ConfigError, match="cfg.*does not exist"):
        amct.create_quant_retrain_config(str(config_file), model, weights, str(tmp_path / "none.cfg"))
    quantized, qweights = write_model(
        tmp_path, NET + 'layer { name: "act_retrain" type: "ActivationQAT" bottom: "fc1" top: "fc1" }', "q"
    )
    with pytest.raises(ConfigError, match="already quantized"):
        amct.create_quant_retrain_config(str(config_file), quantized, qweights)
    plain, pweights = write_model(
        tmp_path,
        'layer { name: "in" type: "Input" top: "x" }\nlayer { name: "r" type: "ReLU" bottom: "x" top: "y" }',
        "plain",
    )
    with pytest.raises(ConfigError, match="no layer that QAT can quantize"):
        amct.create_quant_retrain_config(str(config_file), plain, pweights)
    assert not config_file.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_layer_named_version_cannot_be_written():
    with pytest.raises(ConfigError, match="version"):
        dumps_json(default_config([("version", "Convolution", False)]))


# -- real models -------------------------------------------------------------------------------------------
def count_by_hand(text: str) -> tuple[list[str], list[str]]:
    """Names of the Convolution/InnerProduct layers and of the non-global AVE Pooling layers of a prototxt,
    found by matching braces in the text (independent of our protobuf parser)."""
    weighted, pools = [], []
    for match in re.finditer(r"\blayers?\s*\{", text):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        block = text[match.end() : i - 1]
        name = re.search(r'^\s*name\s*:\s*"([^"]+)"', block, re.M).group(1)
        kind = re.search(r'^\s*type\s*:\s*"([^"]+)"', block, re.M).group(1)
        if kind in ("Convolution", "InnerProduct"):
            weighted.append(name)
        elif (
            kind == "Pooling"
            and re.search(r"pool\s*:\s*AVE", block)
            and not re.search(r"global_pooling\s*:\s*true", block)
        ):
            pools.append(name)
    return weighted, pools


@pytest.mark.parametrize(
    "model, expected_weighted, expected_pools, fixed_min",
    [
        (
            "resnet50/ResNet-50-deploy.prototxt",
            54,
            ["pool5"],
            {
                "conv1": False,
                "res2a_branch1": False,
                "res2a_branch2b": True,
                "res5c_branch2c": True,
                "fc1000": False,
            },
        ),
        (
            "mobilenet_v2/mobilenet_v2_deploy.prototxt",
            54,
            [],
            {
                "conv1": False,
                "conv2_1/expand": True,
                "conv2_1/dwise": True,
                "conv2_1/linear": True,
                "conv2_2/expand": False,
            },
        ),
    ],
)
def test_real_models(tmp_path, shared_models, model, expected_weighted, expected_pools, fixed_min):
    from amct_caffe import amct

    prototxt = shared_models / model
    weighted, pools = count_by_hand(prototxt.read_text())
    assert len(weighted) == expected_weighted and pools == expected_pools
    # the models ship without weights: a caffemodel naming the layers is enough (the config reads none)
    net = caffe_pb2.NetParameter(name="weights")
    for name in weighted:
        net.layer.add(name=name)
    save_caffemodel(net, tmp_path / "w.caffemodel")
    config_file = tmp_path / "config.json"
    amct.create_quant_retrain_config(str(config_file), str(prototxt), str(tmp_path / "w.caffemodel"))
    config = json.loads(config_file.read_text())
    layers = [k for k in config if k != "version"]
    assert sorted(layers) == sorted(weighted + pools)
    assert len(layers) == expected_weighted + len(expected_pools)
    for name, value in fixed_min.items():
        assert config[name]["retrain_data_config"]["fixed_min"] is value, name
    assert all(config[p].keys() == {"retrain_enable", "retrain_data_config"} for p in pools)


def test_weights_from_engine_net(tmp_path):
    """A caffemodel with real (random) blobs written by our pycaffe facade is accepted too."""
    from amct_caffe import amct
    from amct_caffe.caffe.pycaffe import TEST, Net

    model, _ = write_model(tmp_path)
    Net(model, TEST).save(str(tmp_path / "real.caffemodel"))
    amct.create_quant_retrain_config(str(tmp_path / "c.json"), model, str(tmp_path / "real.caffemodel"))
    assert json.loads((tmp_path / "c.json").read_text()) == EXPECTED_DEFAULT
