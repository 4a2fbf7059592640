"""``amct-caffe demo``: AMCT's two flows for Caffe -- post-training quantization and quantization-aware
training -- on the bundled digits net, in seconds on a CPU.

:func:`run_demo` composes the public pieces, exactly as an AMCT user's script would, and prints what a user
wants to see:

1. the float model: the bundled LeNet-style net (``amct_caffe/data/lenet_digits.prototxt``) trained on the
   fly on the bundled 8x8 digits (:mod:`amct_caffe.demo.digits`: HDF5 files, a train/test prototxt)
   with the engine's SGD solver;
2. post-training quantization (PTQ) of the deploy net: ``amct.create_quant_config`` -> ``amct.init`` ->
   ``amct.quantize_model``, :data:`PTQ_BATCHES` calibration batches of training images through
   ``caffe.Net`` on the calibration model, ``amct.save_model(..., 'Both', ...)``;
3. QAT: ``amct.create_quant_retrain_config`` -> ``amct.create_quant_retrain_model``;
4. retraining of the retrain model with the engine's solver (``caffe.get_solver``, ``net.copy_from``,
   ``solve()``: the official sample's flow, docs/amct-reference.md §9.4);
5. ``amct.save_quant_retrain_model(..., 'Both', ...)``: fake-quant and deploy models and the record;
6. evaluation of the float model and of both flows' fake-quant and deploy models on the held-out split (the
   QAT and float models through ``caffe.Net(prototxt, caffemodel, caffe.TEST)`` reading the held-out HDF5
   file, the PTQ models -- deploy-form nets with an ``Input`` -- fed the same images; a deploy model runs in
   the engine's integer emulation, which a deploy caffemodel switches on by itself), and the agreement of
   each flow's fake-quant and deploy predictions;
7. the per-layer report (:mod:`amct_caffe.analysis.report`) float vs QAT fake-quant vs deploy on a few
   held-out batches, written to ``<output>/report`` (skipped, with a note, when matplotlib is absent).

Layout of the output folder (files are overwritten, nothing else is touched)::

    float/    digits_{train,test}.h5 (+ list files; not without h5py, the nets then read MemoryData),
              lenet_digits_train_test.prototxt,
              lenet_digits_deploy.prototxt, lenet_digits_float_solver.prototxt,
              lenet_digits_float_iter_<N>.caffemodel (+ .solverstate)
    ptq/      config.json, the calibration model (calibration.prototxt/.caffemodel)
    retrain/  config.json, lenet_digits_retrain.prototxt/.caffemodel, lenet_digits_retrain_solver.prototxt,
              lenet_digits_retrain_iter_<M>.caffemodel (+ .solverstate)
    results/  QAT: lenet_digits_{fake_quant,deploy}_model.prototxt, lenet_digits_{fake_quant,deploy}_weights
              .caffemodel, lenet_digits_scale_offset_record.txt; PTQ: the same with the prefix
              lenet_digits_ptq, and lenet_digits_ptq_quant.json
    report/   the per-layer report

Progress bars (training, evaluation, report batches) go to stderr through tqdm; the engine's INFO log
lines are held back during the demo unless ``AMCT_LOG_LEVEL`` is set, so stdout carries only the steps
and the tables. Needs the optional packages of ``pip install 'amct-caffe[demo]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm.auto import tqdm

from amct_caffe.errors import ConfigError
from amct_caffe.log import ProgressLines, get_logger

#: Default output folder (relative to the working directory).
DEFAULT_OUTPUT = "amct_demo_output"
#: The file-name prefix of the saved models.
MODEL_NAME = "lenet_digits"
#: Default QAT retraining iterations (about 4.5 epochs of the training split).
RETRAIN_ITERATIONS = 100
#: Retraining learning rate: AMCT's advice, about 1/100 of the float one (0.05).
RETRAIN_LR = 5e-4
#: Calibration batches (of :data:`amct_caffe.demo.digits.TRAIN_BATCH` training images) of the PTQ step.
PTQ_BATCHES = 4
#: Held-out batches (of 120 images) the per-layer report runs on.
REPORT_BATCHES = 3
#: The report's cosine-similarity threshold for flagging a layer.
REPORT_THRESHOLD = 0.99


# -- results -------------------------------------------------------------------------------------------------
@dataclass
class ModelResult:
    """One evaluated model: its files, held-out accuracy and top-1 predictions."""

    label: str
    prototxt: str
    caffemodel: str
    accuracy: float
    predictions: np.ndarray
    labels: np.ndarray
    seconds: float

    @property
    def size(self) -> int:
        """Size of the caffemodel in bytes."""
        return os.path.getsize(self.caffemodel)


@dataclass
class DemoResult:
    """What :func:`run_demo` did and measured.

    Attributes:
        output_dir: the absolute output folder.
        models: ``{"float", "ptq_fake_quant", "ptq_deploy", "fake_quant", "deploy"}`` -> :class:`ModelResult`
            (``fake_quant``/``deploy``: QAT's).
        agreement: fraction of held-out images whose top-1 prediction is the same for QAT's fake-quant and
            deploy models; ``agree_count`` of ``total`` images; ``ptq_agree_count`` the same for PTQ's.
        step_seconds: mean wall time of one training step, ``{"float", "retrain"}``.
        iterations: training iterations, ``{"float", "retrain"}``.
        quantized_layers: the layers the QAT config enables.
        files: the files a user looks for, by role (``config``, ``retrain_model``, ``fake_quant_model``...).
        report: the per-layer report result (None with ``report=False``), ``report_table`` its table and
            ``report_files`` what it wrote.
        seconds: wall time of the whole demo.
    """

    output_dir: Path
    models: dict[str, ModelResult] = field(default_factory=dict)
    agreement: float = 0.0
    agree_count: int = 0
    ptq_agree_count: int = 0
    total: int = 0
    step_seconds: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    quantized_layers: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    report: Any = None
    report_table: str | None = None
    report_files: list[str] = field(default_factory=list)
    seconds: float = 0.0


# -- helpers -------------------------------------------------------------------------------------------------
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def quiet_engine_logs() -> Iterator[None]:
    """Hold the engine's INFO lines off the screen (WARNING and above still show) unless the user set
    ``AMCT_LOG_LEVEL``; the log file keeps its own level."""
    if os.environ.get("AMCT_LOG_LEVEL"):
        yield
        return
    handlers = [h for h in get_logger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, logging.WARNING))
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


def _rel(path: str | os.PathLike[str], base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base))
    except ValueError:
        return str(path)


def _size(num: int) -> str:
    return f"{num / 1024:.1f} KiB" if num < 1024 * 1024 else f"{num / 1024 / 1024:.2f} MiB"


def _timed_solve(solver: Any, say: Callable[[str], None]) -> float:
    """``solver.solve()``; returns the mean wall time of one training step (forward, backward, update).
    Where no progress bar shows, ``say`` gets a progress line every few seconds.

    Measured between the solver's ``on_start`` callbacks, i.e. over whole iterations; the final snapshot
    and test are not counted. One iteration only: the whole solve.
    """
    marks: list[float] = []
    progress = ProgressLines(solver.param.max_iter - solver.iter, "  iteration", say)
    solver.add_callback(on_start=lambda: marks.append(time.perf_counter()))
    solver.add_callback(on_start=progress.tick)
    start = time.perf_counter()
    solver.solve()
    if len(marks) >= 2:
        return (marks[-1] - marks[0]) / (len(marks) - 1)
    return time.perf_counter() - start


def _scores_blob(prototxt: str) -> tuple[str, str]:
    """The class-score blob (an Accuracy layer's first bottom) and the label blob of a digits prototxt."""
    from amct_caffe.model.io import load_prototxt
    from amct_caffe.model.phase import TEST, filter_net

    net = filter_net(load_prototxt(prototxt), TEST, path=prototxt)
    for layer in net.layer:
        if layer.type == "Accuracy":
            return layer.bottom[0], layer.bottom[1]
    raise ConfigError(f"'{prototxt}' has no Accuracy layer in its TEST phase; the demo reads the class "
                      "scores from its first bottom.")


def evaluate_model(label: str, prototxt: str, caffemodel: str, total: int, batch: int,
                   seed: int = 0) -> ModelResult:
    """Top-1 accuracy and predictions of a digits model on the held-out split.

    The model runs as a user runs it, ``caffe.Net(prototxt, caffemodel, caffe.TEST)``, its TEST-phase
    data layer reading the held-out images in order (an ``HDF5Data`` file, or the arrays given to its
    ``MemoryData`` as pycaffe's ``set_input_arrays`` gives them); ``ceil(total / batch)`` forwards, the
    first ``total`` rows count. A deploy caffemodel runs in the engine's integer emulation.
    """
    from amct_caffe import caffe
    from amct_caffe.demo import digits

    scores_name, label_name = _scores_blob(prototxt)
    start = time.perf_counter()
    net = caffe.Net(prototxt, caffemodel, caffe.TEST)
    digits.feed_net(net, "test", seed)
    predictions: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for _ in tqdm(range(-(-total // batch)), desc=f"Evaluating {label}", unit="batch", disable=None,
                  leave=False):
        net.forward()
        scores = net.blobs[scores_name].data
        predictions.append(scores.reshape(scores.shape[0], -1).argmax(axis=1))
        labels.append(net.blobs[label_name].data.reshape(-1).astype(np.int64))
    pred = np.concatenate(predictions)[:total]
    truth = np.concatenate(labels)[:total]
    return ModelResult(label, prototxt, caffemodel, float(np.mean(pred == truth)), pred, truth,
                       time.perf_counter() - start)


def _write_solver(path: Path, param: Any) -> str:
    from amct_caffe.model.io import atomic_write, prototxt_text

    atomic_write(path, prototxt_text(param).encode("utf-8"))
    return str(path)


# -- the demo ------------------------------------------------------------------------------------------------
def run_demo(
    output_dir: str | os.PathLike[str] = DEFAULT_OUTPUT,
    float_iters: int | None = None,
    retrain_iters: int = RETRAIN_ITERATIONS,
    seed: int = 0,
    report: bool = True,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the PTQ and QAT demo (see the module docstring) and print its steps and tables to ``stream``.

    Args:
        output_dir: the output folder (created; existing files of the same names are overwritten).
        float_iters: float training iterations (default :data:`amct_caffe.demo.digits.FLOAT_ITERATIONS`).
        retrain_iters: QAT retraining iterations.
        seed: the data split and the solvers' random seed.
        report: run the per-layer report.
        stream: where the steps and tables go (default: stdout).

    Returns:
        A :class:`DemoResult`.

    Raises:
        ConfigError: an iteration count is not positive.
        AmctError: any step of the flow failed (its message names the file and the layer).
    """
    out = stream if stream is not None else sys.stdout
    from amct_caffe.demo import digits

    float_iters = digits.FLOAT_ITERATIONS if float_iters is None else int(float_iters)
    retrain_iters = int(retrain_iters)
    for name, value in (("--float-iters", float_iters), ("--retrain-iters", retrain_iters)):
        if value <= 0:
            raise ConfigError(f"{name} must be a positive number of iterations, got {value}")

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    if report and not _importable("matplotlib"):
        say("note: matplotlib is not installed, so the per-layer report (its plots) is skipped; "
            "pip install matplotlib to get it.")
        report = False

    with quiet_engine_logs():
        return _run(Path(output_dir).resolve(), float_iters, retrain_iters, int(seed), report, say)


def _run(root: Path, float_iters: int, retrain_iters: int, seed: int, report: bool,
         say: Callable[[str], None]) -> DemoResult:
    from amct_caffe import amct, caffe
    from amct_caffe.demo import digits

    begin = time.perf_counter()
    result = DemoResult(root)
    result.iterations = {"float": float_iters, "retrain": retrain_iters}
    float_dir, ptq_dir, retrain_dir = root / "float", root / "ptq", root / "retrain"
    results_dir = root / "results"
    for folder in (float_dir, ptq_dir, retrain_dir, results_dir):
        folder.mkdir(parents=True, exist_ok=True)
    steps = 8 if report else 7
    say("amct-caffe demo: post-training quantization (PTQ) and quantization-aware training (QAT) of a "
        "LeNet-style net on 8x8 handwritten digits (UCI optical digits)")
    say(f"  {digits.TRAIN_SIZE} training / {digits.TEST_SIZE} held-out images; output folder: {root}")

    # 1. the float model
    say(f"[1/{steps}] training the float model: {float_iters} iterations of SGD in the amct-caffe engine")
    files = digits.prepare(float_dir, seed)
    float_solver_param = digits.solver_param(files.train_test_prototxt, float_iters, seed,
                                             snapshot_prefix=str(float_dir / f"{MODEL_NAME}_float"))
    float_solver = caffe.get_solver(_write_solver(float_dir / f"{MODEL_NAME}_float_solver.prototxt",
                                                  float_solver_param))
    digits.feed_solver(float_solver, seed)
    result.step_seconds["float"] = _timed_solve(float_solver, say)
    float_weights = float_solver.snapshot_filename(".caffemodel")

    # 2. post-training quantization
    ptq_prefix = _ptq(files.deploy_prototxt, float_weights, ptq_dir, results_dir / f"{MODEL_NAME}_ptq", seed)
    say(f"[2/{steps}] PTQ: create_quant_config -> init -> quantize_model, {PTQ_BATCHES} calibration batches "
        f"of {digits.TRAIN_BATCH} training images, save_model(..., 'Both', ...)")

    # 3. config and retrain model
    config = str(retrain_dir / "config.json")
    retrain_model = str(retrain_dir / f"{MODEL_NAME}_retrain.prototxt")
    retrain_weights = str(retrain_dir / f"{MODEL_NAME}_retrain.caffemodel")
    record = str(results_dir / f"{MODEL_NAME}_scale_offset_record.txt")
    amct.create_quant_retrain_config(config, files.train_test_prototxt, float_weights)
    result.quantized_layers = _enabled_layers(config)
    say(f"[3/{steps}] QAT: create_quant_retrain_config: {len(result.quantized_layers)} layers to quantize "
        f"({', '.join(result.quantized_layers)})")
    amct.create_quant_retrain_model(files.train_test_prototxt, float_weights, config, retrain_model,
                                    retrain_weights, record)
    say(f"[4/{steps}] QAT: create_quant_retrain_model: retrain model with ActivationQAT/WeightQAT layers")

    # 4. retraining
    say(f"[5/{steps}] QAT retraining: {retrain_iters} iterations of SGD (learning rate {RETRAIN_LR:g})")
    retrain_param = digits.solver_param(retrain_model, retrain_iters, seed, base_lr=RETRAIN_LR,
                                        snapshot_prefix=str(retrain_dir / f"{MODEL_NAME}_retrain"))
    retrain_solver = caffe.get_solver(_write_solver(retrain_dir / f"{MODEL_NAME}_retrain_solver.prototxt",
                                                    retrain_param))
    retrain_solver.net.copy_from(retrain_weights)
    digits.feed_solver(retrain_solver, seed)
    result.step_seconds["retrain"] = _timed_solve(retrain_solver, say)
    retrained = retrain_solver.snapshot_filename(".caffemodel")

    # 5. save
    prefix = results_dir / MODEL_NAME
    amct.save_quant_retrain_model(retrain_model, retrained, "Both", str(prefix), record, config)
    say(f"[6/{steps}] QAT: save_quant_retrain_model(..., 'Both', ...): fake-quant and deploy models")
    fake_model = f"{prefix}_fake_quant_model.prototxt"
    fake_weights = f"{prefix}_fake_quant_weights.caffemodel"
    deploy_model, deploy_weights = f"{prefix}_deploy_model.prototxt", f"{prefix}_deploy_weights.caffemodel"

    # 6. evaluation
    say(f"[7/{steps}] evaluating the float model and the PTQ and QAT fake-quant and deploy (integer "
        f"emulation) models on the {digits.TEST_SIZE} held-out images")
    total, batch = digits.TEST_SIZE, digits.TEST_BATCH
    for key, label, model, weights in (
        ("float", "float", files.train_test_prototxt, float_weights),
        ("fake_quant", "QAT fake-quant", fake_model, fake_weights),
        ("deploy", "QAT deploy", deploy_model, deploy_weights),
    ):
        result.models[key] = evaluate_model(label, model, weights, total, batch, seed)
    for key, label, kind in (("ptq_fake_quant", "PTQ fake-quant", "fake_quant"),
                             ("ptq_deploy", "PTQ deploy", "deploy")):
        result.models[key] = _evaluate_deploy_form(label, f"{ptq_prefix}_{kind}_model.prototxt",
                                                   f"{ptq_prefix}_{kind}_weights.caffemodel", seed)
    fake, deploy = result.models["fake_quant"], result.models["deploy"]
    result.agree_count = int(np.sum(fake.predictions == deploy.predictions))
    result.ptq_agree_count = int(np.sum(result.models["ptq_fake_quant"].predictions
                                        == result.models["ptq_deploy"].predictions))
    result.total = int(len(fake.predictions))
    result.agreement = result.agree_count / max(result.total, 1)
    result.files = {
        "float model": files.train_test_prototxt,
        "float weights": float_weights,
        "PTQ config": str(ptq_dir / "config.json"),
        "PTQ fake-quant model": f"{ptq_prefix}_fake_quant_model.prototxt",
        "PTQ deploy model": f"{ptq_prefix}_deploy_model.prototxt",
        "PTQ record": f"{ptq_prefix}_scale_offset_record.txt",
        "QAT config": config,
        "retrain model": retrain_model,
        "retrained weights": retrained,
        "fake-quant model": fake_model,
        "fake-quant weights": fake_weights,
        "deploy model": deploy_model,
        "deploy weights": deploy_weights,
        "record": record,
    }
    say("")
    say(format_summary(result))

    # 7. the per-layer report
    if report:
        say("")
        say(f"[8/{steps}] per-layer report: float vs QAT fake-quant vs deploy on {REPORT_BATCHES} held-out "
            "batches")
        _report(result, root / "report", files.train_test_prototxt, float_weights, fake_model, fake_weights,
                deploy_model, deploy_weights, seed, say, memory=files.feed == "memory")
    result.seconds = time.perf_counter() - begin
    say("")
    say(format_files(result))
    say(f"demo finished in {result.seconds:.1f} s")
    return result


def _ptq(deploy_model: str, float_weights: str, work: Path, prefix: Path, seed: int) -> str:
    """Post-training quantization of the deploy net (an ``Input`` of one 1x8x8 image): the default
    config with :data:`PTQ_BATCHES` batches, ``init``, ``quantize_model``, the calibration model run on the
    first :data:`PTQ_BATCHES` batches of training images, ``save_model('Both')``; returns the prefix of
    the saved models (the record is ``<prefix>_scale_offset_record.txt``)."""
    from amct_caffe import amct, caffe
    from amct_caffe.demo import digits

    config = str(work / "config.json")
    record = f"{prefix}_scale_offset_record.txt"
    amct.create_quant_config(config, deploy_model, float_weights, batch_num=PTQ_BATCHES)
    graph = amct.init(config, deploy_model, float_weights, record)
    cal_model, cal_weights = str(work / "calibration.prototxt"), str(work / "calibration.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    net = caffe.Net(cal_model, caffe.TEST, weights=cal_weights)
    x, _ = digits.load_split("train", seed)
    step = digits.TRAIN_BATCH
    net.blobs["data"].reshape(step, *digits.IMAGE_SHAPE)
    for i in tqdm(range(PTQ_BATCHES), desc="Calibration", unit="batch", disable=None, leave=False):
        net.forward(data=x[i * step:(i + 1) * step])
    amct.save_model(graph, "Both", str(prefix))
    return str(prefix)


def _evaluate_deploy_form(label: str, prototxt: str, caffemodel: str, seed: int) -> ModelResult:
    """A deploy-form digits model (``Input`` -> ``prob``) on the held-out split, the images fed in batches
    of :data:`amct_caffe.demo.digits.TEST_BATCH` (:func:`amct_caffe.demo.digits.predict`)."""
    from amct_caffe.demo import digits

    start = time.perf_counter()
    predictions, labels = digits.predict(prototxt, caffemodel, "test", seed)
    return ModelResult(label, prototxt, caffemodel, float(np.mean(predictions == labels)), predictions,
                       labels, time.perf_counter() - start)


def _enabled_layers(config: str) -> list[str]:
    import json

    data = json.loads(Path(config).read_text(encoding="utf-8"))
    return [name for name, entry in data.items() if isinstance(entry, dict) and entry.get("retrain_enable")]


def _report(result: DemoResult, out_dir: Path, float_model: str, float_weights: str, fake_model: str,
            fake_weights: str, deploy_model: str, deploy_weights: str, seed: int,
            say: Callable[[str], None], memory: bool = False) -> None:
    """The per-layer report on the first :data:`REPORT_BATCHES` held-out batches: the three nets run their
    own TEST-phase ``HDF5Data`` layers (same file, same order; the report checks that they read identical
    batches) or, for ``MemoryData`` nets (``memory``), each net's data layer becomes an ``Input`` and the
    same held-out batches are given to all three; written to ``out_dir`` and printed as a table."""
    from amct_caffe.analysis import render
    from amct_caffe.analysis import report as report_mod
    from amct_caffe.demo import digits

    models: list[Any] = [float_model, fake_model, deploy_model]
    inputs: list[dict[str, np.ndarray]] | None = None
    if memory:
        models = [digits.input_fed_net(path, digits.TEST_BATCH) for path in models]
        x, y = digits.load_split("test", seed)
        step = digits.TEST_BATCH
        inputs = [{"data": x[i * step:(i + 1) * step], "label": y[i * step:(i + 1) * step]}
                  for i in range(REPORT_BATCHES)]
    outcome = report_mod.compare_report(
        models[0], float_weights, models[1], fake_weights, models[2], deploy_weights,
        inputs=inputs, out_dir=None, threshold=REPORT_THRESHOLD, batches=REPORT_BATCHES, seed=seed,
    )
    written = report_mod.write_report(outcome, out_dir)
    result.report = outcome
    result.report_table = render.format_table(outcome)
    result.report_files = sorted(str(path) for path in written.values())
    result.files["report"] = str(out_dir / "report.html")
    say(result.report_table)


# -- printing ------------------------------------------------------------------------------------------------
def format_summary(result: DemoResult) -> str:
    """The demo's results table: accuracy and caffemodel size of each model, agreement, training speed."""
    base = result.output_dir
    float_size = result.models["float"].size
    rows = [("model", "held-out top-1", "caffemodel", "size", "vs float")]
    for key in ("float", "ptq_fake_quant", "ptq_deploy", "fake_quant", "deploy"):
        if key not in result.models:
            continue
        m = result.models[key]
        rows.append((m.label, f"{m.accuracy * 100:.2f} %", _rel(m.caffemodel, base), _size(m.size),
                     f"{m.size / float_size:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]),
                 row[3].rjust(widths[3]), row[4].rjust(widths[4])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    f = result.models["float"]
    lines.append("")
    for flow, key, same in (("PTQ", "ptq_fake_quant", result.ptq_agree_count),
                            ("QAT", "fake_quant", result.agree_count)):
        if key not in result.models:
            continue
        q = result.models[key]
        lines.append(f"{flow}: fake-quant vs float accuracy {(q.accuracy - f.accuracy) * 100:+.2f} points; "
                     f"fake-quant and deploy give the same top-1 on {same}/{result.total} held-out images "
                     f"({same / max(result.total, 1) * 100:.2f} %)")
    speed = ", ".join(
        f"{label} {result.step_seconds[key] * 1000:.1f} ms/step ({result.iterations[key]} steps, batch "
        f"{_train_batch()})"
        for key, label in (("float", "float"), ("retrain", "QAT retrain")) if key in result.step_seconds)
    lines.append(f"training: {speed}")
    return "\n".join(lines)


def _train_batch() -> int:
    from amct_caffe.demo import digits

    return digits.TRAIN_BATCH


def format_files(result: DemoResult) -> str:
    """Where the files are (paths relative to the working directory when below it)."""
    cwd = Path.cwd().resolve()
    keys = ["fake-quant model", "fake-quant weights", "deploy model", "deploy weights", "record"]
    if "report" in result.files:
        keys.append("report")
    keys += ["QAT config", "retrain model", "retrained weights", "float weights"]
    keys += [key for key in ("PTQ fake-quant model", "PTQ deploy model", "PTQ record", "PTQ config")
             if key in result.files]
    width = max(len(k) for k in keys)
    lines = ["files:"]
    for key in keys:
        lines.append(f"  {key.ljust(width)}  {_rel(result.files[key], cwd)}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_OUTPUT",
    "PTQ_BATCHES",
    "RETRAIN_ITERATIONS",
    "DemoResult",
    "ModelResult",
    "evaluate_model",
    "format_files",
    "format_summary",
    "run_demo",
]
