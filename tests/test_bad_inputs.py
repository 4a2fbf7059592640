"""A corpus of bad inputs, generated at test time, run against the API and the command line.

Every case replaces one file of a small good model (or sets one environment variable) and names the
AmctError it must give and a fragment of its message. Each case runs on the surfaces that read that file
(building a net, ``copy_from``, pycaffe's ``caffe.Net``, the QAT and PTQ APIs, the command line); every
surface must raise the named error -- the command line prints one line and exits 1, with no traceback --
and the files the call would write, which exist beforehand, must come out byte-identical.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import amct, cli
from amct_caffe.caffe import pycaffe
from amct_caffe.engine.net import Net
from amct_caffe.errors import (
    AmctError,
    BlobSizeError,
    ConfigError,
    ModelFormatError,
    RecordError,
    UnsupportedLayerError,
    WeightShapeError,
)
from amct_caffe.model.io import load_caffemodel
from amct_caffe.proto import caffe_pb2
from tests.helpers import TINY_BLOB_SHAPES, TINY_NET, blob_proto, tiny_caffemodel

MODEL, WEIGHTS, CONFIG = "model.prototxt", "weights.caffemodel", "qat.json"
#: What a failed call must leave alone: each output exists beforehand with this content.
SENTINEL = b"pre-existing output\n"


def _good_weights() -> dict[str, list[caffe_pb2.BlobProto]]:
    return {name: [blob_proto(s) for s in shapes] for name, shapes in TINY_BLOB_SHAPES.items()}


def _weights_with(layer: str, index: int, blob: caffe_pb2.BlobProto) -> bytes:
    blobs = _good_weights()
    blobs[layer][index] = blob
    return tiny_caffemodel(blobs)


def _net_with(old: str, new: str) -> str:
    assert old in TINY_NET
    return TINY_NET.replace(old, new)


def _solver_bytes() -> bytes:
    solver = caffe_pb2.SolverParameter(net="model.prototxt", base_lr=0.01, lr_policy="step", stepsize=100,
                                       max_iter=1000, snapshot_prefix="snap", momentum=0.9)
    solver.test_iter.append(10)
    return solver.SerializeToString()


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- the corpus ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad input: ``files`` replace the good model's files (text or bytes), ``env`` is set while it
    runs; every surface in ``surfaces`` must raise ``error`` with a message matching ``match``."""

    name: str
    error: type[AmctError]
    match: str
    surfaces: tuple[str, ...]
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


WEIGHT_SURFACES = ("net", "copy_from", "pycaffe", "qat", "ptq", "cli_run", "cli_retrain")
MODEL_SURFACES = ("net", "pycaffe", "qat", "ptq", "cli_run", "cli_retrain", "cli_inspect")
CONFIG_SURFACES = ("qat", "cli_retrain")

CASES = [
    # caffemodels
    Case("truncated caffemodel", ModelFormatError, "Cannot parse caffemodel", WEIGHT_SURFACES,
         {WEIGHTS: tiny_caffemodel()[:10]}),
    Case("caffemodel of random bytes", ModelFormatError, "Cannot parse caffemodel", WEIGHT_SURFACES,
         {WEIGHTS: bytes(np.random.default_rng(5).integers(0, 256, 300, dtype=np.uint8))}),
    Case("prototxt given as caffemodel", ModelFormatError, "text prototxt, not a binary caffemodel",
         WEIGHT_SURFACES, {WEIGHTS: TINY_NET}),
    Case("solver given as caffemodel", ModelFormatError, "Cannot parse caffemodel", WEIGHT_SURFACES,
         {WEIGHTS: _solver_bytes()}),
    Case("caffemodel of another net", WeightShapeError, "shape", WEIGHT_SURFACES,
         {WEIGHTS: _weights_with("conv1", 0, blob_proto((16, 1, 3, 3)))}),
    Case("blob values fewer than its shape", WeightShapeError, r"Blob 0 of layer 'conv1'.*stores 72",
         WEIGHT_SURFACES,
         {WEIGHTS: _weights_with("conv1", 0, blob_proto((16, 1, 3, 3), np.zeros(72)))}),
    Case("1e6 x 1e6 blob without data", WeightShapeError, "Blob 0 of layer 'ip1'", WEIGHT_SURFACES,
         {WEIGHTS: _weights_with("ip1", 0, blob_proto((10**6, 10**6), []))}),
    Case("blob with a negative axis", WeightShapeError, "negative axis", WEIGHT_SURFACES,
         {WEIGHTS: _weights_with("conv1", 1, blob_proto((-4,), []))}),
    Case("convolution with three blobs", WeightShapeError, "holds 3 blob", WEIGHT_SURFACES,
         {WEIGHTS: tiny_caffemodel({**_good_weights(), "conv1": [blob_proto(s) for s in
                                                                ((4, 1, 3, 3), (4,), (4,))]})}),
    Case("missing caffemodel", ModelFormatError, "does not exist", WEIGHT_SURFACES[:4] + ("qat",),
         {WEIGHTS: ""}),
    Case("caffemodel limit is not a number", ConfigError, "AMCT_CAFFEMODEL_LIMIT_MB", WEIGHT_SURFACES,
         env={"AMCT_CAFFEMODEL_LIMIT_MB": "abc"}),
    # prototxts
    Case("prototxt syntax error", ModelFormatError, "Cannot parse prototxt", MODEL_SURFACES,
         {MODEL: TINY_NET + "layer { name: \"x\" \n"}),
    Case("unknown prototxt field", ModelFormatError, "no field named", MODEL_SURFACES,
         {MODEL: _net_with("kernel_size: 3", "kernel_size: 3 kernel_sizes: 4")}),
    Case("binary file as prototxt", ModelFormatError, "not UTF-8", MODEL_SURFACES,
         {MODEL: b"\xff\xfe\x00garbage"}),
    Case("unknown layer type", UnsupportedLayerError, "NoSuchLayer", ("net", "pycaffe", "cli_run"),
         {MODEL: TINY_NET + 'layer { name: "odd" type: "NoSuchLayer" bottom: "ip1" top: "odd" }\n'}),
    Case("Python layer", UnsupportedLayerError, "Python", ("net", "pycaffe", "cli_run", "cli_inspect"),
         {MODEL: TINY_NET + 'layer { name: "py" type: "Python" bottom: "ip1" top: "py" '
                            'python_param { module: "os" layer: "system" } }\n'}),
    Case("top produced by two layers", ModelFormatError, "produced by multiple sources", MODEL_SURFACES,
         {MODEL: TINY_NET + 'layer { name: "ip2" type: "InnerProduct" bottom: "conv1" top: "ip1" '
                            "inner_product_param { num_output: 3 } }\n"}),
    Case("a cycle: conv reads a later blob", ModelFormatError, "no earlier layer produces", MODEL_SURFACES,
         {MODEL: TINY_NET + 'layer { name: "conv2" type: "Convolution" bottom: "ip1b" top: "c2" '
                            "convolution_param { num_output: 2 kernel_size: 1 } }\n"
                            'layer { name: "ipb" type: "InnerProduct" bottom: "ip1" top: "ip1b" '
                            "inner_product_param { num_output: 2 } }\n"}),
    # the engine runs such a net, as Caffe does; the quantization flows key on names and refuse it
    Case("two layers of one name", ModelFormatError, "two layers named", ("qat", "ptq", "cli_retrain"),
         {MODEL: _net_with('name: "relu1"', 'name: "conv1"')}),
    # the QAT flow checks the weights against the layer first: the caffemodel no longer fits
    Case("num_output 2^31", ModelFormatError, r"limit of \d+ elements|does not fit num_output",
         MODEL_SURFACES,
         {MODEL: _net_with("num_output: 4", "num_output: 2147483648")}),
    Case("Input dim -1", ModelFormatError, "negative axis", MODEL_SURFACES,
         {MODEL: _net_with("dim: 8 dim: 8", "dim: -1 dim: 8")}),
    Case("Tile 2e9", ModelFormatError, r"Layer 't' \(type Tile\).*limit", MODEL_SURFACES,
         {MODEL: TINY_NET + 'layer { name: "t" type: "Tile" bottom: "ip1" top: "t" '
                            "tile_param { tiles: 2000000000 } }\n"}),
    Case("Deconvolution stride 2^32-1", ModelFormatError,
         r"Layer 'conv1' \(type Deconvolution\).*limit|does not fit num_output",
         MODEL_SURFACES,
         {MODEL: _net_with('"Convolution"', '"Deconvolution"').replace("kernel_size: 3",
                                                                      "kernel_size: 3 stride: 4294967295")}),
    Case("Pooling stride 2^32-1", ModelFormatError, r"Layer 'p' \(type Pooling\)", MODEL_SURFACES,
         {MODEL: TINY_NET + 'layer { name: "p" type: "Pooling" bottom: "conv1" top: "p" '
                            "pooling_param { kernel_size: 2 stride: 4294967295 } }\n"}),
    Case("element limit is not a number", ConfigError, "AMCT_CAFFE_MAX_ELEMENTS",
         ("net", "pycaffe", "qat", "cli_run", "cli_inspect"), env={"AMCT_CAFFE_MAX_ELEMENTS": "-3"}),
    Case("a small element limit", ModelFormatError, "limit of 100 elements",
         ("net", "pycaffe", "qat", "ptq", "cli_run", "cli_inspect"), env={"AMCT_CAFFE_MAX_ELEMENTS": "100"}),
    Case("a small net element limit", BlobSizeError, "limit of 150 elements per net",
         ("net", "pycaffe", "qat", "ptq", "cli_run", "cli_inspect"),
         env={"AMCT_CAFFE_MAX_NET_ELEMENTS": "150"}),
    # data sources
    Case("ImageData source is /dev/zero", ModelFormatError, "not a regular file", ("net", "cli_run"),
         {MODEL: 'layer { name: "d" type: "ImageData" top: "d" top: "l" '
                 'image_data_param { source: "/dev/zero" batch_size: 1 } }\n'}),
    Case("HDF5Data source is a folder", ModelFormatError, "not a regular file", ("net", "cli_run"),
         {MODEL: 'layer { name: "d" type: "HDF5Data" top: "d" '
                 'hdf5_data_param { source: "." batch_size: 1 } }\n'}),
    Case("mean file is /dev/zero", ModelFormatError, "not a regular file", ("net", "cli_run"),
         {MODEL: 'layer { name: "d" type: "ImageData" top: "d" top: "l" transform_param { '
                 'mean_file: "/dev/zero" } image_data_param { source: "list.txt" batch_size: 1 } }\n',
          "list.txt": "img.png 0\n"}),
    Case("ImageData source above the size limit", ModelFormatError, "AMCT_DATA_SOURCE_LIMIT_MB",
         ("net", "cli_run"),
         {MODEL: 'layer { name: "d" type: "ImageData" top: "d" top: "l" '
                 'image_data_param { source: "list.txt" batch_size: 1 } }\n',
          "list.txt": "img.png 0\n" * 120_000},
         env={"AMCT_DATA_SOURCE_LIMIT_MB": "1"}),
    Case("prototxt is /dev/zero", ModelFormatError, "not a regular file", MODEL_SURFACES,
         {MODEL: ""}),
    # configs
    Case("config is /dev/zero", ConfigError, "not a regular file", CONFIG_SURFACES, {CONFIG: ""}),
    Case("config JSON nested 100,000 deep", ConfigError, "nest", CONFIG_SURFACES,
         {CONFIG: _deep_json(100_000)}),
    Case("config with a 5000-digit number", ConfigError, "5000 characters", CONFIG_SURFACES,
         {CONFIG: '{"version": ' + "9" * 5000 + "}"}),
    Case("config with a 5000-digit float", ConfigError, "characters", CONFIG_SURFACES,
         {CONFIG: '{"version": 1.' + "5" * 5000 + "}"}),
    Case("config above the size limit", ConfigError, "AMCT_CONFIG_LIMIT_MB", CONFIG_SURFACES,
         {CONFIG: '{"version": 1}' + " " * (1024**2 + 10)}, env={"AMCT_CONFIG_LIMIT_MB": "1"}),
    Case("config is not JSON", ConfigError, "not valid JSON", CONFIG_SURFACES, {CONFIG: "{version: 1"}),
    Case("config for another model", ConfigError, "nosuchlayer", CONFIG_SURFACES,
         {CONFIG: json.dumps({"version": 1, "nosuchlayer": {"retrain_enable": True}})}),
]


# -- the good model and the surfaces ------------------------------------------------------------------------
def _write_good(folder: Path) -> None:
    (folder / MODEL).write_text(TINY_NET)
    (folder / WEIGHTS).write_bytes(tiny_caffemodel())
    config = {"version": 1, "conv1": {"retrain_enable": True,
                                      "retrain_data_config": {"algo": "ulq_quantize"},
                                      "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True}}}
    (folder / CONFIG).write_text(json.dumps(config))
    (folder / "ptq.json").write_text(json.dumps({"version": 1, "batch_num": 1, "activation_offset": True,
                                                 "conv1": {"quant_enable": True}}))


def _apply(folder: Path, case: Case) -> None:
    for name, content in case.files.items():
        path = folder / name
        if content == "" and name == WEIGHTS:
            path.unlink()
        elif content == "":
            path.unlink()
            path.symlink_to("/dev/zero")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _outputs(folder: Path) -> list[Path]:
    out = folder / "out"
    return [out / "retrain.prototxt", out / "retrain.caffemodel", out / "record.txt", out / "ptq_record.txt",
            out / "run.npz"]


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Run the command line in-process: it must fail with one line on stderr, exit 1, no traceback."""
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 1, f"exit {code}, stderr {err!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("amct-caffe: error: "), err
    assert "Traceback" not in err and "--debug for the traceback" not in err, err
    raise _CliFailed(lines[0])


class _CliFailed(Exception):
    """The one line the command line printed (so that the test matches it like an API error)."""


def _surface(name: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> Callable[[], object]:
    model, weights, config = (str(folder / n) for n in (MODEL, WEIGHTS, CONFIG))
    out = folder / "out"
    calls: dict[str, Callable[[], object]] = {
        "net": lambda: Net(model, caffe_pb2.TEST, weights=weights),
        "copy_from": lambda: Net(TINY_NET_FILE, caffe_pb2.TEST).copy_from(weights),
        "pycaffe": lambda: pycaffe.Net(model, weights, pycaffe.TEST),
        "qat": lambda: amct.create_quant_retrain_model(
            model, weights, config, str(out / "retrain.prototxt"), str(out / "retrain.caffemodel"),
            str(out / "record.txt")),
        "ptq": lambda: amct.init(str(folder / "ptq.json"), model, weights, str(out / "ptq_record.txt")),
        "cli_run": lambda: _run_cli(["run", model, "--weights", weights, "--save", str(out / "run.npz")],
                                    capsys),
        "cli_retrain": lambda: _run_cli(["retrain-model", "--model", model, "--weights", weights, "--config",
                                         config, "--output-model", str(out / "retrain.prototxt"),
                                         "--output-weights", str(out / "retrain.caffemodel"), "--record",
                                         str(out / "record.txt")], capsys),
        "cli_inspect": lambda: _run_cli(["inspect", model], capsys),
    }
    return calls[name]


TINY_NET_FILE = ""


@pytest.fixture(autouse=True)
def _good_model_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A good copy of the tiny model for ``copy_from`` (the net the bad caffemodel is copied into)."""
    global TINY_NET_FILE
    path = tmp_path_factory.getbasetemp() / "tiny_good.prototxt"
    path.write_text(TINY_NET)
    TINY_NET_FILE = str(path)


def test_the_good_model_passes_every_surface(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The corpus's base is good: every surface accepts it (so each case fails for its own change)."""
    _write_good(tmp_path)
    for name in ("net", "copy_from", "pycaffe", "qat", "ptq"):
        _surface(name, tmp_path, capsys)()
    assert cli.main(["inspect", str(tmp_path / MODEL)]) == 0
    assert cli.main(["run", str(tmp_path / MODEL), "--weights", str(tmp_path / WEIGHTS)]) == 0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_a_named_error(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _write_good(tmp_path)
    _apply(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    outputs = _outputs(tmp_path)
    outputs[0].parent.mkdir()
    for path in outputs:
        path.write_bytes(SENTINEL)
    for surface in case.surfaces:
        call = _surface(surface, tmp_path, capsys)
        expected: type[Exception] = _CliFailed if surface.startswith("cli") else case.error
        with pytest.raises(expected) as caught:
            call()
        assert re.search(case.match, str(caught.value), re.S), f"{surface}: {caught.value}"
        if not surface.startswith("cli"):
            assert type(caught.value) is case.error or isinstance(caught.value, case.error), surface
        for path in outputs:
            assert path.read_bytes() == SENTINEL, f"{surface} changed {path.name}"
        assert sorted(p.name for p in outputs[0].parent.iterdir()) == sorted(p.name for p in outputs), surface


# -- the cases that are not a file of the model -------------------------------------------------------------
def test_empty_caffemodel_is_accepted_with_a_warning(tmp_path: Path, amct_log) -> None:
    """Caffe reads a 0-byte caffemodel as a net without weights; so do we, and say so."""
    _write_good(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"")
    net = Net(str(tmp_path / MODEL), caffe_pb2.TEST, weights=str(tmp_path / WEIGHTS))
    assert net.engine_layers[1].blobs[0].shape == (4, 1, 3, 3)
    warnings = [r.getMessage() for r in amct_log.records if r.levelname == "WARNING"]
    assert any("is empty (0 bytes)" in w for w in warnings), warnings


def test_solver_that_parses_as_a_net_is_refused(tmp_path: Path) -> None:
    """Some SolverParameters parse as a NetParameter without error (field numbers overlap); with no layer
    and unknown fields they are no caffemodel."""
    solver = caffe_pb2.SolverParameter(base_lr=0.01, max_iter=100)
    parsed = caffe_pb2.NetParameter.FromString(solver.SerializeToString())  # no DecodeError
    assert not parsed.layer
    path = tmp_path / "solver.caffemodel"
    path.write_bytes(solver.SerializeToString())
    with pytest.raises(ModelFormatError, match="holds no Caffe layers"):
        load_caffemodel(str(path))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_caffemodel_without_blobs_from_a_fork_is_accepted(tmp_path: Path) -> None:
    """A caffemodel of a net without learnable layers holds layers and no blobs; a fork's extra layer
    parameter (a field our schema lacks, inside the layer) does not make it "not a caffemodel"."""
    layer = caffe_pb2.LayerParameter(name="pool", type="Pooling").SerializeToString()
    layer += _varint(9000 << 3) + _varint(1)  # field 9000, varint 1: unknown to the schema
    data = _varint(100 << 3 | 2) + _varint(len(layer)) + layer  # NetParameter.layer (field 100)
    path = tmp_path / "pool.caffemodel"
    path.write_bytes(data)
    assert [lp.name for lp in load_caffemodel(str(path)).layer] == ["pool"]


def test_caffemodel_of_another_net_is_said(tmp_path: Path, amct_log) -> None:
    """A caffemodel none of whose layers matches the net by name loads nothing (Caffe copies by name and
    skips the rest); a WARNING says so, since every layer then keeps its filler values."""
    _write_good(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(tiny_caffemodel({"other": [blob_proto((2, 2))]}))
    Net(str(tmp_path / MODEL), caffe_pb2.TEST, weights=str(tmp_path / WEIGHTS))
    warnings = [r.getMessage() for r in amct_log.records if r.levelname == "WARNING"]
    assert any("matches a layer of net" in w for w in warnings), warnings


def test_activation_qat_blob_without_data(tmp_path: Path) -> None:
    """A retrain caffemodel whose ActivationQAT clip blob has shape (1,) and no value: a named error from
    save_quant_retrain_model, and nothing written."""
    _write_good(tmp_path)
    out = tmp_path / "out"
    retrain, retrain_weights = out / "retrain.prototxt", out / "retrain.caffemodel"
    amct.create_quant_retrain_model(str(tmp_path / MODEL), str(tmp_path / WEIGHTS), str(tmp_path / CONFIG),
                                    str(retrain), str(retrain_weights), str(out / "record.txt"))
    act = _activation_qat_layer(retrain)
    net = caffe_pb2.NetParameter.FromString(retrain_weights.read_bytes())
    # a trained retrain caffemodel holds the clip bounds [clip_max, clip_min], one value each
    clips = [blob_proto((1,), []), blob_proto((1,), [-1.0])]
    net.layer.add(name=act, type="ActivationQAT").blobs.extend(clips)
    retrain_weights.write_bytes(net.SerializeToString())
    save = tmp_path / "saved" / "m"
    with pytest.raises(WeightShapeError, match=f"Blob 0 of layer '{act}'"):
        amct.save_quant_retrain_model(str(retrain), str(retrain_weights), "Both", str(save),
                                      str(out / "record.txt"))
    assert not save.parent.exists() or not list(save.parent.iterdir())


def _activation_qat_layer(prototxt: Path) -> str:
    names = re.findall(r'name: "([^"]+)"\s+type: "ActivationQAT"', prototxt.read_text())
    assert names, "the retrain model has no ActivationQAT layer"
    return names[0]


def test_bad_save_type_and_paths(tmp_path: Path) -> None:
    _write_good(tmp_path)
    model, weights = str(tmp_path / MODEL), str(tmp_path / WEIGHTS)
    with pytest.raises(ConfigError, match="save_type"):
        amct.save_quant_retrain_model(model, weights, "Everything", str(tmp_path / "s" / "m"))
    with pytest.raises(ModelFormatError, match="does not exist"):
        amct.create_quant_retrain_model(str(tmp_path / "none.prototxt"), weights, str(tmp_path / CONFIG),
                                        str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="folder"):
        amct.create_quant_retrain_model(model, weights, str(tmp_path / CONFIG), str(tmp_path / "folder"),
                                        str(tmp_path / "b"), str(tmp_path / "c"))


def test_bad_record(tmp_path: Path) -> None:
    _write_good(tmp_path)
    record = tmp_path / "record.txt"
    record.write_text("record { key: \"conv1\" value { scale_d: oops } }\n")
    with pytest.raises(RecordError):
        amct.convert_model(str(tmp_path / MODEL), str(tmp_path / WEIGHTS), str(record),
                           str(tmp_path / "conv" / "m"))
    assert not (tmp_path / "conv").exists() or not list((tmp_path / "conv").iterdir())


def test_data_source_fifo_does_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO as the source would block a read forever; it is refused before it is opened."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / MODEL).write_text('layer { name: "d" type: "HDF5Data" top: "d" '
                                  f'hdf5_data_param {{ source: "{fifo}" batch_size: 1 }} }}\n')
    with pytest.raises(ModelFormatError, match="not a regular file"):
        Net(str(tmp_path / MODEL), caffe_pb2.TEST)


def test_inspect_opens_no_data_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect`` lists a net with data layers without opening their sources (here: a FIFO, which would
    block, and a missing file)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / MODEL).write_text(
        f'layer {{ name: "d" type: "ImageData" top: "d" top: "l" image_data_param {{ source: "{fifo}" '
        'batch_size: 1 } }\n'
        'layer { name: "h" type: "HDF5Data" top: "h" '
        'hdf5_data_param { source: "missing.txt" batch_size: 1 } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "h" top: "ip" '
        'inner_product_param { num_output: 2 } }\n')
    assert cli.main(["inspect", str(tmp_path / MODEL)]) == 0
    out = capsys.readouterr().out
    assert "read data files, which inspect does not open" in out and "ImageData" in out


def test_cli_negative_seed_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_good(tmp_path)
    with pytest.raises(SystemExit) as caught:
        cli.main(["run", str(tmp_path / MODEL), "--seed", "-1"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "out of range" in err and "Traceback" not in err


def test_compare_of_unrelated_models_measures_nothing(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Two models with no layer or output in common: compare refuses them (here already because the
    "fake-quant" model holds no DeQuant layer; with one, because nothing could be measured) and exits 1."""
    _write_good(tmp_path)
    other = tmp_path / "other.prototxt"
    other.write_text('layer { name: "in" type: "Input" top: "data" '
                     'input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }\n'
                     'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "y" '
                     'inner_product_param { num_output: 2 } }\n')
    other_weights = tmp_path / "other.caffemodel"
    other_weights.write_bytes(tiny_caffemodel({"fc": [blob_proto((2, 64)), blob_proto((2,))]}))
    code = cli.main(["compare", "--float-model", str(tmp_path / MODEL), "--float-weights",
                     str(tmp_path / WEIGHTS), "--fake-model", str(other), "--fake-weights",
                     str(other_weights), "--output", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 1 and ("measured nothing" in err or "not a quantized model" in err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("param_str", ["{not json", "[1, 2]", '{"scale": "big"}', '{"scale": [1]}',
                                       '{"scale": 0}', '{"scale": 1, "offset": 300}', "[" * 100_000])
def test_python_quant_layer_bad_param_str(param_str: str) -> None:
    """The stock-pycaffe Quant layer refuses a bad param_str with a ValueError subclass that says what is
    wrong (the module cannot use the package's errors: it runs inside Caffe, numpy only)."""
    from amct_caffe.caffe.python_layers import ParamStrError, StandaloneBlob, standalone_layer

    layer = standalone_layer("Quant", param_str)
    bottom, top = [StandaloneBlob(1, 2)], [StandaloneBlob(1, 2)]
    with pytest.raises(ParamStrError, match="Quant Python layer|quant_param.scale"):
        layer.setup(bottom, top)
    assert issubclass(ParamStrError, ValueError)


# -- the rules themselves ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["abc", "0", "-1", "1.5", "1e9", " 12x"])
def test_a_limit_variable_must_be_a_positive_whole_number(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from amct_caffe.model.limits import max_elements

    monkeypatch.setenv("AMCT_CAFFE_MAX_ELEMENTS", raw)
    with pytest.raises(ConfigError, match="AMCT_CAFFE_MAX_ELEMENTS.*positive whole number"):
        max_elements()


def test_limit_variables_unset_empty_and_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from amct_caffe.model.limits import max_elements

    monkeypatch.delenv("AMCT_CAFFE_MAX_ELEMENTS", raising=False)
    assert max_elements() == 2**31 - 1  # Caffe's INT_MAX blob limit
    monkeypatch.setenv("AMCT_CAFFE_MAX_ELEMENTS", "")
    assert max_elements() == 2**31 - 1
    monkeypatch.setenv("AMCT_CAFFE_MAX_ELEMENTS", " 42 ")
    assert max_elements() == 42


def test_in_place_means_top_j_is_bottom_j(tmp_path: Path) -> None:
    """Caffe's rule: a top may repeat a blob name only as the same-index bottom (in place); an Eltwise
    writing its second bottom's name as its first top produces that blob twice."""
    head = ('layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 2 } } }\n'
            'layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 1 dim: 2 } } }\n')
    ok = tmp_path / "ok.prototxt"
    ok.write_text(head + 'layer { name: "r" type: "ReLU" bottom: "b" top: "b" }\n'
                  'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "a" }\n')
    Net(str(ok), caffe_pb2.TEST)
    bad = tmp_path / "bad.prototxt"
    bad.write_text(head + 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "b" }\n')
    with pytest.raises(ModelFormatError, match="'b' is produced by multiple sources"):
        Net(str(bad), caffe_pb2.TEST)
