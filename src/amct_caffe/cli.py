"""The ``amct-caffe`` command line: AMCT's QAT API, the engine, the report and the demo from a shell.

Exit codes: 0 success, 2 usage error, 1 failure (one line ``amct-caffe: error: ...`` on stderr; ``--debug``
shows the traceback).

Each subcommand is thin: it parses its options, calls the public API (``amct_caffe.amct``, ``caffe``,
``workflows.report``, ``demo.run``) and prints what was done. A second console script, ``amct_caffe``
(AMCT's own spelling), offers the same subcommands; both have AMCT's ``calibration`` (post-training
quantization, ``workflows.calibration_run``) with AMCT's option names.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amct_caffe.errors import AmctError, ConfigError, ModelFormatError
from amct_caffe.log import quiet_screen, wrap_line

PROG = "amct-caffe"
AMCT_PROG = "amct_caffe"
#: File extensions ``run --input NAME=FILE`` reads as images (anything else is read as .npy).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".pnm"})


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _split_spec(spec: str, what: str = "--input", form: str = "NAME=FILE") -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"{what} '{spec}' must look like {form} (e.g. data=input.npy)")
    return name, path


def _load_npy(spec: str, path: str) -> np.ndarray:
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        reason = "no such file" if not os.path.exists(path) else str(exc)
        raise ConfigError(f"--input '{spec}': cannot read '{path}' as a .npy array ({reason}); give an "
                          "existing .npy file (or an image: .png, .jpg, ...)") from exc
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise ConfigError(f"--input '{spec}': '{path}' does not hold a numeric array")
    return value.astype(np.float32)


def load_image_input(path: str, shape: Sequence[int]) -> np.ndarray:
    """An image file as Caffe feeds it to a blob of ``shape`` (N, C, H, W): decoded as OpenCV's ``imread``
    does (B, G, R channel order for C = 3, grey levels for C = 1; 8-bit values 0..255, no scaling or mean,
    as an ``ImageData`` layer without ``transform_param``), resized to (H, W) as ``cv::resize(INTER_LINEAR)``
    and returned as a float32 (1, C, H, W) array."""
    from amct_caffe.engine.transform import COLOR, GRAY, decode_image, hwc_to_chw, resize_linear

    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ConfigError(
            f"image input '{path}': the input blob has shape {tuple(shape)}; an image fits an N x C x H x W "
            "blob with C = 1 (grey) or 3 (BGR). Give a .npy array instead"
        )
    img = decode_image(path, COLOR if shape[1] == 3 else GRAY, what="An image --input",
                       error=lambda message: ConfigError(f"--input: {message}"))
    img = resize_linear(img, int(shape[2]), int(shape[3]))
    return hwc_to_chw(img).astype(np.float32)[None]


def _float_list(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} '{text}' must be comma-separated numbers, e.g. 104,117,123") from None


def _image_transformer(args: argparse.Namespace, name: str, shape: Sequence[int]) -> Any:
    """The ``caffe.io.Transformer`` that ``run``'s classify.py options (--mean, --raw-scale, --scale,
    --channel-swap) ask for, for input ``name`` of ``shape``; None when none of them is given (images then
    feed as Caffe's ImageData does)."""
    if args.mean is None and args.raw_scale is None and args.scale is None and args.channel_swap is None:
        return None
    from amct_caffe.caffe.io import Transformer

    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ConfigError(f"image input '{name}': the input blob has shape {tuple(shape)}; an image fits an "
                          "N x C x H x W blob with C = 1 or 3 (set it with --input-shape)")
    transformer = Transformer({name: shape})
    transformer.set_transpose(name, (2, 0, 1))
    # classify.py's defaults: an image in [0, 1] RGB becomes Caffe's 0..255 BGR
    swap = args.channel_swap if args.channel_swap is not None else ("2,1,0" if shape[1] == 3 else "0")
    transformer.set_channel_swap(name, [int(v) for v in _float_list(swap, "--channel-swap")])
    transformer.set_raw_scale(name, args.raw_scale if args.raw_scale is not None else 255.0)
    if args.mean is not None:
        transformer.set_mean(name, _load_mean(args.mean))
    if args.scale is not None:
        transformer.set_input_scale(name, args.scale)
    return transformer


def _load_mean(text: str) -> np.ndarray:
    """``--mean``: per-channel values ``104,117,123``, or a .npy holding (C,) or (C, H, W) values."""
    if text.lower().endswith(".npy"):
        return _load_npy(f"--mean {text}", text)
    return np.array(_float_list(text, "--mean"), dtype=np.float32)


def _parse_input_specs(specs: Sequence[str]) -> list[tuple[str, str, str]]:
    """``[(spec, name, path)]``, checking the NAME=FILE form before anything is loaded."""
    return [(spec, *_split_spec(spec)) for spec in specs]


def _load_inputs(specs: Sequence[tuple[str, str, str]], shapes: dict[str, tuple[int, ...]],
                 args: argparse.Namespace | None = None) -> dict[str, np.ndarray]:
    """Load ``--input`` values for the input blobs of ``shapes`` (images are stacked on axis 0 when a
    name is given several times; a .npy of one axis less than the blob gets the batch axis added); with
    ``run``'s classify.py options in ``args``, images go through ``caffe.io`` as pycaffe's classify.py
    feeds them."""
    values: dict[str, list[np.ndarray]] = {}
    kinds: dict[str, str] = {}
    for spec, name, path in specs:
        if name not in shapes:
            known = ", ".join(shapes) or "none"
            raise ConfigError(f"--input '{spec}': the net has no input blob '{name}' (its input blobs: "
                              f"{known})")
        is_image = Path(path).suffix.lower() in IMAGE_EXTENSIONS
        kind = "image" if is_image else "npy"
        if name in kinds and (kind == "npy" or kinds[name] == "npy"):
            raise ConfigError(f"--input '{spec}': input '{name}' is given twice; repeat a name only for "
                              "images (they are stacked into a batch)")
        kinds[name] = kind
        if is_image:
            if not os.path.isfile(path):
                raise ConfigError(f"--input '{spec}': image file '{path}' does not exist")
            transformer = _image_transformer(args, name, shapes[name]) if args is not None else None
            if transformer is None:
                value = load_image_input(path, shapes[name])
            else:
                from amct_caffe.caffe.io import load_image

                image = load_image(path, color=shapes[name][1] == 3)
                value = transformer.preprocess(name, image)[None]
        else:
            value = _load_npy(spec, path)
            if value.ndim == len(shapes[name]) - 1:
                value = value[None]
        values.setdefault(name, []).append(value)
    return {name: arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            for name, arrays in values.items()}


def _print_outputs(outputs: dict[str, np.ndarray]) -> None:
    for name, value in outputs.items():
        flat = value.reshape(-1)
        head = ", ".join(f"{v:.6g}" for v in flat[:10])
        more = ", ..." if flat.size > 10 else ""
        print(f"{name}: shape {tuple(value.shape)} [{head}{more}]")


def _safe_file_name(blob: str) -> str:
    """A blob name as a file name: '/' becomes '%2F' (AMCT's rule for its dump files)."""
    return blob.replace("%", "%25").replace("/", "%2F").replace(os.sep, "%2F")


def _seed(text: str) -> int:
    """An argparse type: a seed is a whole number in [0, 2**32 - 1], as numpy and Caffe take it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give a seed in [0, 4294967295]")
    return value


def _atc_input_shape(text: str | None, atc_ready: bool) -> dict[str, tuple[int, ...]] | None:
    """``--input-shape 'data:1,3,224,224;info:1,3'`` (AMCT's form) as ``{top: shape}``; only with
    --atc-ready."""
    from amct_caffe.workflows.calibration_run import parse_input_shape

    if text is None:
        return None
    if not atc_ready:
        raise ConfigError("--input-shape sets the Input shapes of the ATC-ready models; add --atc-ready")
    return dict(parse_input_shape(text))


def _check_file(path: str | None, option: str) -> None:
    if path is not None and not os.path.isfile(path):
        what = "is not a regular file (a folder, a device or a pipe)" if os.path.exists(path) else \
            "does not exist"
        raise ConfigError(f"{option}: file '{path}' {what}")


# ---------------------------------------------------------------------------------------------------------
# subcommands: AMCT's QAT API
# ---------------------------------------------------------------------------------------------------------
def cmd_retrain_config(args: argparse.Namespace) -> int:
    """Write the QAT config (JSON) of a float model: every layer QAT can quantize, with AMCT's defaults or
    as a simplified .cfg (--config-defination) says (amct.create_quant_retrain_config)."""
    import json

    from amct_caffe import amct

    amct.create_quant_retrain_config(args.output, args.model, args.weights, args.config_defination)
    config = json.loads(Path(args.output).read_text(encoding="utf-8"))
    layers = {name: entry for name, entry in config.items() if isinstance(entry, dict)}
    enabled = [name for name, entry in layers.items() if entry.get("retrain_enable")]
    print(wrap_line(f"wrote {args.output}: {len(layers)} quantizable layer(s), {len(enabled)} enabled for "
                    f"retraining{': ' + ', '.join(enabled) if enabled else ''}"))
    return 0


def cmd_retrain_model(args: argparse.Namespace) -> int:
    """Build the retrain (QAT) model of a float model: BatchNorm/Scale folded into convolutions, then
    ActivationQAT/WeightQAT layers in front of every enabled layer (amct.create_quant_retrain_model).
    Train the result with `amct-caffe train` (or any Caffe solver) starting from --output-weights."""
    from amct_caffe import amct

    amct.create_quant_retrain_model(args.model, args.weights, args.config, args.output_model,
                                    args.output_weights, args.record)
    print(f"wrote {args.output_model}, {args.output_weights} and the record {args.record}")
    return 0


def cmd_save_retrain(args: argparse.Namespace) -> int:
    """Save a retrained model as a fake-quant model (runs in Caffe) and/or a deploy model (for ATC), with
    every factor recomputed from the retrained weights (amct.save_quant_retrain_model). --save-type is
    Fakequant, Deploy or Both; --save-path is a folder plus a file-name prefix."""
    from amct_caffe import amct
    from amct_caffe.workflows.save import output_paths, resolve_record_path

    amct.save_quant_retrain_model(args.model, args.weights, args.save_type, args.save_path, args.record,
                                  args.config, for_atc=args.atc_ready,
                                  input_shape=_atc_input_shape(args.input_shape, args.atc_ready))
    print(f"saved ({args.save_type}):")
    record = resolve_record_path(args.record, args.model)
    for _, path in output_paths(args.save_path, args.save_type, record).all():
        print(f"  {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# subcommands: the engine
# ---------------------------------------------------------------------------------------------------------
def _use_gpu(device_id: int | None) -> None:
    if device_id is None:
        return
    from amct_caffe import caffe

    caffe.set_device(device_id)
    caffe.set_mode_gpu()


def _train_options(args: argparse.Namespace) -> Any:
    from amct_caffe.workflows.train import TrainOptions

    weights = tuple(w for w in (args.weights or "").split(",") if w)
    return TrainOptions(args.solver, weights, args.snapshot, args.gpu)


def print_train_summary(summary: Any) -> None:
    """What ``train`` prints when it is done (rank 0's summary in a data-parallel run)."""
    done = summary.end_iter - summary.start_iter
    per_step = f", {summary.seconds / done * 1000:.1f} ms/iteration" if done else ""
    workers = f" on {summary.workers} workers" if summary.workers > 1 else ""
    print(f"trained {summary.net_name} to iteration {summary.end_iter} ({done} iteration(s) in "
          f"{summary.seconds:.1f} s{per_step}{workers})", flush=True)
    for i, results in enumerate(summary.test_results):
        if results:
            shown = ", ".join(f"{name} = {value:.6g}" for name, value in results)
            print(f"test net #{i}: {shown}", flush=True)
    if summary.snapshot:
        print(f"snapshot: {summary.snapshot}", flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a net with a Caffe solver prototxt in the amct-caffe engine, as `caffe train` does: optionally
    start from weights (--weights, comma-separated caffemodels copied into the nets by layer name) or resume
    from a solver state (--snapshot); snapshots and tests follow the solver file. --nproc N trains
    data-parallel on N local workers (torch.distributed; each runs the solver's batch_size); under torchrun
    the same command runs as one worker of the run torchrun describes."""
    from amct_caffe.workflows.train import train, train_parallel

    options = _train_options(args)
    if args.nproc is not None and args.nproc != 1:
        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: give at least 1 worker")
        if "WORLD_SIZE" in os.environ:
            raise ConfigError("--nproc starts local workers; under torchrun leave it out (torchrun's "
                              "--nproc-per-node sets the workers)")
        train_parallel(options, args.nproc, report=print_train_summary)
        return 0
    summary = train(options)
    from amct_caffe.engine.distributed import world

    if world().is_root:
        print_train_summary(summary)
    return 0


def cmd_solver(args: argparse.Namespace) -> int:
    """Write a solver for a retrain model with AMCT's rules: net = the retrain prototxt (absolute path),
    test_initialization false, one TEST pass and a snapshot at max_iter, base_lr 1e-4 (about 1/100 of the
    float training's), momentum 0.9, weight_decay 1e-4. Then: amct-caffe train SOLVER --weights
    <retrain caffemodel>, and save-retrain --weights <the snapshot it prints>."""
    from amct_caffe.workflows.solver import RetrainSolverOptions, write_retrain_solver

    _check_file(args.net, "--net")
    snapshot = write_retrain_solver(args.net, args.output, RetrainSolverOptions(
        args.max_iter, args.base_lr, args.test_iter, args.display, args.snapshot_prefix))
    print(f"wrote {args.output}: {args.max_iter} iteration(s) of {args.net}; snapshot {snapshot}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Forward a net once in the engine's TEST phase and print (or save) its outputs. Inputs: .npy arrays
    or images (--input NAME=FILE; an image is decoded as Caffe does, BGR or grey, values 0..255, resized to
    the blob's height and width); input blobs without a value get standard-normal random values. With
    pycaffe classify.py's options (--mean, --raw-scale, --scale, --channel-swap) images are read and
    preprocessed as classify.py does (caffe.io.load_image and caffe.io.Transformer: resize, channel swap,
    times raw scale, minus mean, times scale; raw scale 255 and swap 2,1,0 unless given). --input-shape
    sets input blob shapes first."""
    from amct_caffe import caffe

    specs = _parse_input_specs(args.input or [])
    _check_file(args.model, "MODEL")
    _check_file(args.weights, "--weights")
    _use_gpu(args.gpu)
    net = caffe.Net(args.model, caffe.TEST, weights=args.weights)
    if args.input_shape:
        _reshape_inputs(net, args.input_shape)
    shapes = {name: tuple(int(d) for d in net.blobs[name].data.shape) for name in net.inputs}
    inputs = _load_inputs(specs, shapes, args)
    rng = np.random.default_rng(args.seed)
    for name in net.inputs:
        if name in inputs:
            net.blobs[name].reshape(*inputs[name].shape)
        else:
            inputs[name] = rng.standard_normal(shapes[name]).astype(np.float32)
    net.reshape()
    for name, value in inputs.items():  # through the blobs: an input named start/end is no keyword clash
        net.blobs[name].data[...] = value
    start = time.perf_counter()
    outputs = net.forward()
    elapsed = time.perf_counter() - start
    _print_outputs(outputs)
    print(f"forward: {elapsed * 1000:.1f} ms")
    _save_outputs(outputs, args.output, args.output_dir)
    if args.output:
        print(f"outputs saved to {args.output}")
    if args.output_dir:
        print(f"{len(outputs)} output(s) saved as .npy files in {args.output_dir}")
    return 0


def _save_outputs(outputs: dict[str, Any], npz: str | None, folder: str | None) -> None:
    """``run --save`` (one .npz; numpy adds the suffix when missing) and ``--output-dir`` (a .npy per blob),
    written as one all-or-nothing set."""
    from amct_caffe.model.io import AtomicFiles

    with AtomicFiles() as files:
        if npz:
            buffer = io.BytesIO()
            arrays: dict[str, Any] = dict(outputs)  # numpy's stub would match a blob name to savez's flags
            np.savez(buffer, **arrays)
            files.write(npz if npz.endswith(".npz") else npz + ".npz", buffer.getvalue())
        if folder:
            for name, value in outputs.items():
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(value))
                files.write(os.path.join(folder, f"{_safe_file_name(name)}.npy"), buffer.getvalue())


def _reshape_inputs(net: Any, text: str) -> None:
    """``--input-shape name:n,c,h,w[;...]``: reshape those input blobs (and the net)."""
    from amct_caffe.workflows.calibration_run import parse_input_shape

    for name, shape in parse_input_shape(text):
        if name not in net.inputs:
            raise ConfigError(f"--input-shape: the net has no input blob '{name}' (its input blobs: "
                              f"{', '.join(net.inputs) or 'none'})")
        net.blobs[name].reshape(*shape)
    net.reshape()


def cmd_inspect(args: argparse.Namespace) -> int:
    """List the layers of a net: name, type, bottom -> top blob shapes (the engine's shape pass at the
    prototxt's batch size), a parameter summary, and whether QAT can quantize the layer (and why not)."""
    from amct_caffe.proto import caffe_pb2
    from amct_caffe.quant.config import QAT_LAYER_TYPES
    from amct_caffe.workflows.inspect import inspect_net, shape_text

    _check_file(args.model, "MODEL")
    phase = caffe_pb2.TRAIN if args.phase == "TRAIN" else caffe_pb2.TEST
    summary = inspect_net(args.model, phase, build=not args.no_shapes)

    def blobs(infos: Sequence[Any]) -> str:
        return ", ".join(f"{b.name} {shape_text(b.shape)}".strip() for b in infos)

    rows = [("layer", "type", "bottom -> top", "params", "QAT")]
    rows += [(layer.name, layer.type, f"{blobs(layer.bottoms)} -> {blobs(layer.tops)}".strip(), layer.params,
              layer.qat) for layer in summary.layers]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row[:4])) + "  " + row[4])
        if n == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 3)
    learnable = f", {summary.learnable:,} learnable values" if summary.shapes_known else ""
    if summary.data_layers and not args.no_shapes:
        print(f"(no shapes: layer(s) {', '.join(summary.data_layers)} read data files, which inspect "
              "does not open)")
    print(f"{summary.name or Path(args.model).stem} ({summary.phase} phase): {len(summary.layers)} layer(s)"
          f"{learnable}")
    if summary.already_quantized:
        print("QAT: this model already holds AMCT layers; give the original float model to quantize it")
    else:
        quantizable = summary.quantizable
        print(wrap_line(f"QAT can quantize {len(quantizable)} layer(s)"
                        f"{': ' + ', '.join(quantizable) if quantizable else ''} "
                        f"(types {', '.join(QAT_LAYER_TYPES)})"))
    return 0


# ---------------------------------------------------------------------------------------------------------
# subcommands: report, demo, pycaffe
# ---------------------------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    """Compare the float, fake-quant and (optionally) deploy models layer by layer on the same inputs:
    cosine similarity, SNR, largest error and the activation quantizers' saturation; writes report.json,
    report.html and plots into --output-dir and prints the table. Without --input, nets with Input blobs get
    random inputs (numerics, not accuracy) and nets with data layers read their own data."""
    from amct_caffe.analysis import render, report

    if (args.deploy_model is None) != (args.deploy_weights is None):
        raise ConfigError("give both --deploy-model and --deploy-weights, or neither")
    retrain = args.retrain_model is not None or args.retrain_weights is not None
    if retrain and (args.retrain_model is None or args.retrain_weights is None):
        raise ConfigError("give both --retrain-model and --retrain-weights, or neither")
    float_given = args.float_model is not None or args.float_weights is not None
    if float_given == retrain:
        raise ConfigError("give the float reference: --float-model and --float-weights, or after QAT "
                          "--retrain-model and --retrain-weights (the retrained float weights)")
    if float_given and (args.float_model is None or args.float_weights is None):
        raise ConfigError("give both --float-model and --float-weights")
    if args.sensitivity and not retrain:
        raise ConfigError("--sensitivity needs --retrain-model and --retrain-weights (the layers are "
                          "quantized one at a time with their trained factors)")
    if not args.sensitivity and (args.fake_model is None or args.fake_weights is None):
        raise ConfigError("give --fake-model and --fake-weights (or --sensitivity with --retrain-*)")
    for path, option in ((args.float_model, "--float-model"), (args.float_weights, "--float-weights"),
                         (args.retrain_model, "--retrain-model"), (args.retrain_weights, "--retrain-weights"),
                         (args.fake_model, "--fake-model"), (args.fake_weights, "--fake-weights"),
                         (args.deploy_model, "--deploy-model"), (args.deploy_weights, "--deploy-weights")):
        _check_file(path, option)
    inputs: dict[str, np.ndarray] | None = None
    if args.input:
        inputs = {}
        for spec, name, path in _parse_input_specs(args.input):
            if name in inputs:
                raise ConfigError(f"--input '{spec}': input '{name}' is given twice")
            inputs[name] = _load_npy(spec, path)
    if args.sensitivity:
        return _compare_sensitivity(args, inputs)
    float_model: Any = args.float_model
    float_weights: Any = args.float_weights
    if retrain:
        from amct_caffe.workflows.compare import retrained_float_model

        reference = retrained_float_model(args.retrain_model, args.retrain_weights)
        float_model, float_weights = reference.net, reference.weights
        print(f"float reference: {args.retrain_model} + {args.retrain_weights} with the retrain layers "
              "removed (the retrained float weights)")
    result = report.compare_report(
        float_model, float_weights, args.fake_model, args.fake_weights, args.deploy_model,
        args.deploy_weights, inputs=inputs, out_dir=None, threshold=args.threshold, batches=args.batches,
        seed=args.seed, equalizations=_equalizations(args.quant_info, args.fake_model),
    )
    if not result.measured:
        raise ModelFormatError(
            f"compare measured nothing: the float model '{args.float_model}' and the fake-quant model "
            f"'{args.fake_model}' share no quantized layer and no output blob; give the models that "
            "save_quant_retrain_model or quantize_model wrote from this float model"
        )
    written = report.write_report(result, args.output_dir)
    print(render.format_table(result))
    html = written.get("report.html", os.path.join(args.output_dir, "report.html"))
    print(f"report: {html} ({len(written)} file(s) in {args.output_dir})")
    return 0


def _equalizations(quant_info: str | None, fake_model: str) -> dict[str, np.ndarray] | None:
    """The equalization factors of ``--quant-info``, or of the ``<prefix>_quant.json`` beside a
    ``<prefix>_fake_quant_model.prototxt``; None when there is no such file."""
    from amct_caffe.analysis.collect import read_equalizations
    from amct_caffe.workflows.ptq import QUANT_INFO_SUFFIX

    suffix = "_fake_quant_model.prototxt"
    if quant_info is None and fake_model.endswith(suffix):
        beside = fake_model[:-len(suffix)] + QUANT_INFO_SUFFIX
        quant_info = beside if os.path.isfile(beside) else None
    if quant_info is None:
        return None
    _check_file(quant_info, "--quant-info")
    scales = read_equalizations(quant_info)
    if scales:
        print(f"float reference: {len(scales)} blob(s) scaled per channel as the equalization in "
              f"{quant_info} lists")
    return scales


def _compare_sensitivity(args: argparse.Namespace, inputs: dict[str, np.ndarray] | None) -> int:
    from amct_caffe.workflows.compare import layer_sensitivity, write_sensitivity

    ranking = layer_sensitivity(args.retrain_model, args.retrain_weights, inputs, args.batches, args.seed)
    width = max([5] + [len(s.name) for s in ranking])
    print(f"{'rank':>4}  {'layer':<{width}}  {'type':<14}  output cosine (only this layer quantized)")
    for rank, s in enumerate(ranking, start=1):
        mark = " *" if s.cosine < args.threshold else ""
        print(f"{rank:>4}  {s.name:<{width}}  {s.layer_type:<14}  {s.cosine:.6f}{mark}")
    below = [s.name for s in ranking if s.cosine < args.threshold]
    if below:
        print(f"most sensitive (cosine < {args.threshold:g}): {', '.join(below)}; keeping these float "
              "(retrain_enable false in the QAT config) costs the least accuracy")
    else:
        print(f"no layer alone brings the outputs below cosine {args.threshold:g}")
    print(f"sensitivity: {write_sensitivity(ranking, args.output_dir)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """AMCT's two flows on the bundled LeNet-style digits net in seconds on a CPU: float training with the
    engine's solver; PTQ (create_quant_config -> init -> quantize_model -> calibration batches ->
    save_model('Both')); QAT (create_quant_retrain_config -> create_quant_retrain_model -> retraining ->
    save_quant_retrain_model('Both')); then the accuracy of the float model and of each flow's fake-quant
    and deploy (integer emulation) models on held-out images, the model sizes, and the per-layer report.
    Needs: pip install 'amct-caffe[demo]'."""
    from amct_caffe.demo.run import run_demo

    run_demo(args.output_dir, float_iters=args.float_iters, retrain_iters=args.retrain_iters, seed=args.seed,
             report=not args.no_report)
    return 0


def cmd_pycaffe_rewrite(args: argparse.Namespace) -> int:
    """Rewrite a fake-quant prototxt's Quant/DeQuant/AntiQuant layers (or a calibration model's IFMR layers)
    into Caffe Python layers (amct_caffe.caffe.python_layers, python_calibration), so that a stock pycaffe
    built with Python layers runs it with the unchanged caffemodel; that Caffe's Python needs amct_caffe
    importable (numpy only)."""
    from amct_caffe.caffe.rewrite import rewrite_fake_quant_for_pycaffe

    counts = rewrite_fake_quant_for_pycaffe(args.model_in, args.model_out)
    done = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"rewrote {done} layer(s) into {args.model_out}")
    return 0


def cmd_calibration(args: argparse.Namespace) -> int:
    """AMCT's post-training quantization: config, calibration model, batch_num calibration batches from raw
    .bin files (--input_shape, --data_dir, --data_types) or an evaluator script (--evaluator), then the
    fake-quant and deploy models (workflows.calibration_run). AMCT's options: --key=value or --key value."""
    from amct_caffe.workflows.calibration_run import run_calibration

    written = run_calibration(args.model, args.weights, args.save_path, args.input_shape, args.data_dir,
                              args.data_types, args.evaluator, args.calibration_config, args.batch_num,
                              args.gpu_id, for_atc=args.atc_ready, refine=_names(args.refine, "--refine"))
    print("calibration done:")
    for path in written:
        print(f"  {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _names(text: str | None, option: str) -> list[str] | None:
    """The comma-separated names of ``option`` (blanks around them dropped); None when not given.

    Raises:
        ConfigError: an empty name.
    """
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ConfigError(f"{option} '{text}' has an empty name; separate the names by single commas.")
    return names


def _hidden_alias(parser: argparse.ArgumentParser, option: str, dest: str,
                  kind: Callable[[str], Any] | None = None) -> None:
    """Another spelling of an option (an older one, or AMCT's), accepted but not shown in --help."""
    if kind is None:
        parser.add_argument(option, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    else:
        parser.add_argument(option, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, type=kind)


#: Options a subcommand requires but declares optional, because a hidden alias may give them instead.
_REQUIRED_VIA_ALIAS = {"compare": ("output_dir", "--output-dir")}


def _subcommand_options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """``{subcommand: its option strings}``."""
    out: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = {opt for a in sub._actions for opt in a.option_strings}
    return out


def normalise_spellings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """AMCT's underscore spellings (``--save_path``, ``--gpu_id``, ...) and our hyphen spellings are the
    same option: a ``--a_b`` (or ``--a-b``) the subcommand does not know is read as its ``--a-b`` (``--a_b``).
    Only options of the subcommand named in ``argv`` are rewritten; values are never touched."""
    options = _subcommand_options(parser)
    known = next((options[arg] for arg in argv if arg in options), None)
    if known is None:
        return list(argv)
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if flag.startswith("--") and flag not in known:
            for other in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
                if other in known:
                    flag = other
                    break
        out.append(flag + sep + value if sep else flag)
    return out


def _add(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help_text: str,
         debug: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=" ".join((func.__doc__ or "").split()),
                            parents=[debug])
    parser.set_defaults(func=func)
    return parser


_BACKEND_HELP = ("who runs the whole TEST forwards of the nets (also: AMCT_CAFFE_BACKEND): engine (default), "
                 "onnxruntime (needs amct-caffe[ort]) or auto; every blob read keeps the engine's value")
_BACKENDS = ("engine", "onnxruntime", "auto")

_PYTHON_LAYERS_HELP = ("let the model's type: \"Python\" layers import and run their modules (also: "
                       "AMCT_CAFFE_ALLOW_PYTHON_LAYERS=1); only for models and modules you trust")


def _add_atc_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atc-ready", "--atc_ready", dest="atc_ready", action="store_true",
                   help="write the prototxts in inference form: data layers become Input layers, loss and "
                        "accuracy layers go; the deploy prototxt gets the layer types ATC reads "
                        "(SSDDetectionOutput, grouped Convolution for depthwise forks), so ATC converts it "
                        "as it is")
    p.add_argument("--input-shape", "--input_shape", dest="input_shape", metavar="NAME:DIMS[;NAME:DIMS]",
                   help="with --atc-ready: shapes of the Input layers, e.g. 'data:1,3,224,224' (default: "
                        "from the data layers, else the record, batch 1)")


def build_parser(prog: str = PROG, calibration: bool = True) -> argparse.ArgumentParser:
    """The argument parser of ``amct-caffe`` (``prog``); ``calibration`` adds AMCT's ``calibration``
    subcommand (both scripts have it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="amct-caffe: AMCT for Caffe (quantization-aware training and post-training quantization) "
                    "with its own Caffe engine on PyTorch. Exit codes: 0 success, 2 usage error, 1 failure.",
        epilog=f"'{prog} COMMAND --help' describes each command. QAT flow: retrain-config -> retrain-model "
               "-> train -> save-retrain (-> compare). Post-training quantization: calibration.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--allow-python-layers", action="store_true", help=_PYTHON_LAYERS_HELP)
    parser.add_argument("--backend", choices=_BACKENDS, default=None, help=_BACKEND_HELP)
    # also accepted after the subcommand; SUPPRESS keeps a value given before it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    debug.add_argument("--allow-python-layers", action="store_true", default=argparse.SUPPRESS,
                       help=_PYTHON_LAYERS_HELP)
    debug.add_argument("--backend", choices=_BACKENDS, default=argparse.SUPPRESS, help=_BACKEND_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    if calibration:
        p = _add(sub, "calibration", cmd_calibration,
                 "AMCT's post-training quantization (calibration) of a float model", debug)
        for option, text in (("--model", "the float .prototxt"), ("--weights", "the float .caffemodel"),
                             ("--save_path", "folder and file-name prefix of the results"),
                             ("--input_shape", "input shapes, e.g. 'data:1,3,224,224;info:1,3'"),
                             ("--data_dir", "one folder of calibration .bin files per input, ';'-separated"),
                             ("--data_types", "data type of each input, e.g. 'float32;float32'"),
                             ("--evaluator", "a Python file defining `evaluator` (calibration(model, "
                                             "weights) runs the batches); instead of the data options"),
                             ("--calibration_config", "a simplified PTQ .cfg")):
            p.add_argument(option, help=text, required=option in ("--model", "--weights", "--save_path"))
        p.add_argument("--batch_num", type=_positive_int, help="number of calibration batches (default: the "
                                                                ".cfg's batch_num, else 1)")
        p.add_argument("--gpu_id", type=int, help="calibrate on CUDA device GPU_ID")
        p.add_argument("--atc_ready", "--atc-ready", dest="atc_ready", action="store_true",
                       help="write the models in inference form (Input layers with --input_shape or the "
                            "net's shapes, no loss/accuracy), the deploy prototxt as ATC converts it as is")
        p.add_argument("--refine", metavar="NAMES",
                       help="not AMCT: refinements on the calibration batches, comma-separated: "
                            "equalization, then at most one of bias_correction, adaround, end_to_end (e.g. "
                            "equalization,end_to_end); needs the data options")

    p = _add(sub, "retrain-config", cmd_retrain_config,
             "write the QAT config of a float model (create_quant_retrain_config)", debug)
    p.add_argument("--model", required=True, help="the float model (training prototxt)")
    p.add_argument("--weights", required=True, help="its trained float weights (.caffemodel)")
    p.add_argument("--output", required=True, metavar="CONFIG.json", help="the QAT config to write")
    p.add_argument("--config-defination", metavar="FILE.cfg",
                   help="a simplified QAT config (proto text of AMCT's retrain_config_caffe.proto)")

    p = _add(sub, "retrain-model", cmd_retrain_model,
             "build the retrain (QAT) model of a float model (create_quant_retrain_model)", debug)
    p.add_argument("--model", required=True, help="the float model (training prototxt)")
    p.add_argument("--weights", required=True, help="its trained float weights (.caffemodel)")
    p.add_argument("--config", required=True, help="the QAT config from retrain-config")
    p.add_argument("--output-model", required=True, help="the retrain prototxt to write")
    p.add_argument("--output-weights", required=True, help="the retrain caffemodel to write")
    p.add_argument("--record", required=True, help="the scale/offset record file to write")

    from amct_caffe.workflows.solver import EXAMPLE

    p = _add(sub, "solver", cmd_solver, "write a solver for a retrain model with AMCT's rules", debug)
    p.add_argument("--net", required=True, help="the retrain prototxt (from retrain-model)")
    p.add_argument("--output", required=True, metavar="SOLVER.prototxt", help="the solver to write")
    p.add_argument("--max-iter", required=True, type=_positive_int, metavar="N",
                   help="training iterations (AMCT: 1/4 to 1/3 of the float training's epochs)")
    p.add_argument("--base-lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--test-iter", type=_positive_int, default=1, metavar="N",
                   help="TEST iterations at the end (at least the QAT config's batch_num; default 1)")
    p.add_argument("--display", type=int, default=0, metavar="N", help="log the loss every N iterations")
    p.add_argument("--snapshot-prefix", metavar="PREFIX",
                   help="snapshot prefix (default: <solver folder>/solver)")

    p = _add(sub, "train", cmd_train, "train a net with a Caffe solver prototxt in the engine", debug)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("A complete solver for a retrain model (`amct-caffe solver --net retrain.prototxt --output "
                "solver.prototxt --max-iter 1000` writes one):\n\n" + EXAMPLE)
    p.add_argument("solver", metavar="SOLVER", help="the solver prototxt (its net: the retrain model)")
    p.add_argument("--weights", metavar="CAFFEMODEL[,CAFFEMODEL...]",
                   help="weights to start from (copied by layer name), e.g. the retrain caffemodel")
    p.add_argument("--snapshot", metavar="SOLVERSTATE", help="a .solverstate to resume training from")
    p.add_argument("--gpu", type=int, nargs="?", const=0, default=None, metavar="ID",
                   help="train on CUDA device ID (default 0 when given without ID); with --nproc N, "
                        "worker i uses device ID + i")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel on N local worker processes (torch.distributed: gloo on CPU, "
                        "NCCL on CUDA); each runs the solver's batch_size, so the effective batch is "
                        "batch_size x N. Under torchrun leave it out")
    _hidden_alias(p, "--gpu_id", "gpu", int)

    p = _add(sub, "save-retrain", cmd_save_retrain,
             "save a retrained model as fake-quant and/or deploy model (save_quant_retrain_model)", debug)
    p.add_argument("--model", required=True, help="the retrain prototxt (from retrain-model)")
    p.add_argument("--weights", required=True, help="the retrained caffemodel (the solver's snapshot)")
    p.add_argument("--save-type", required=True, metavar="{Fakequant,Deploy,Both}",
                   help="which models to save: Fakequant, Deploy or Both")
    p.add_argument("--save-path", required=True, metavar="DIR/PREFIX",
                   help="folder plus file-name prefix of the saved files, e.g. results/model")
    p.add_argument("--record",
                   help="the record file to (re)write (default: the record the retrain model names, i.e. "
                        "the one given to retrain-model)")
    p.add_argument("--config", help="the QAT config; it selects the layers saved quantized (default: every "
                                    "layer with retrain layers)")
    _add_atc_options(p)

    p = _add(sub, "run", cmd_run, "forward a Caffe net in the engine", debug)
    p.add_argument("model", metavar="MODEL", help="the .prototxt")
    p.add_argument("--weights", help="the .caffemodel (default: filler values)")
    p.add_argument("--input", action="append", metavar="NAME=FILE",
                   help="value of input blob NAME: a .npy array or an image (.png, .jpg, ...); repeat for "
                        "several inputs, or one image name several times for a batch")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random values of inputs not given")
    p.add_argument("--input-shape", metavar="NAME:N,C,H,W[;...]",
                   help="reshape input blobs first, e.g. data:1,3,224,224 (images are resized to it)")
    p.add_argument("--mean", metavar="B,G,R|FILE.npy",
                   help="pycaffe classify.py: mean subtracted from images after the raw scale, per channel "
                        "values or a .npy of (C,) or (C,H,W) values")
    p.add_argument("--raw-scale", type=float, metavar="S",
                   help="pycaffe classify.py: images are read in [0, 1] and multiplied by S (default 255)")
    p.add_argument("--scale", "--input-scale", dest="scale", type=float, metavar="S",
                   help="pycaffe classify.py's --input_scale: multiply after the mean is subtracted")
    p.add_argument("--channel-swap", metavar="2,1,0",
                   help="pycaffe classify.py: channel order after reading RGB (default 2,1,0: BGR)")
    p.add_argument("--output", metavar="FILE.npz", help="save the outputs into one .npz file")
    _hidden_alias(p, "--save", "output")
    p.add_argument("--output-dir", metavar="DIR", help="save every output as DIR/<blob>.npy")
    p.add_argument("--gpu", type=int, nargs="?", const=0, default=None, metavar="ID",
                   help="run on CUDA device ID")
    _hidden_alias(p, "--gpu_id", "gpu", int)

    p = _add(sub, "inspect", cmd_inspect, "list a net's layers, shapes, parameters and QAT support", debug)
    p.add_argument("model", metavar="MODEL", help="the .prototxt")
    p.add_argument("--phase", choices=("TEST", "TRAIN"), default="TEST", help="the phase view (default TEST)")
    p.add_argument("--no-shapes", action="store_true",
                   help="do not build the net in the engine (no shapes; for nets whose data files are "
                        "absent)")

    p = _add(sub, "compare", cmd_compare, "per-layer report: float vs fake-quant vs deploy", debug)
    p.add_argument("--float-model", help="the float prototxt (or give --retrain-model)")
    p.add_argument("--float-weights", help="the float caffemodel")
    p.add_argument("--retrain-model", help="after QAT: the retrain prototxt; with --retrain-weights it is "
                                           "the float reference, quantization off (instead of --float-*)")
    p.add_argument("--retrain-weights", help="after QAT: the retrained caffemodel (the solver's snapshot)")
    p.add_argument("--sensitivity", action="store_true",
                   help="with --retrain-*: quantize one retrained layer at a time and rank the layers by "
                        "the cosine of the net outputs (PTQ auto calibration's measure); writes "
                        "sensitivity.json (--fake-* not needed)")
    p.add_argument("--fake-model", help="<prefix>_fake_quant_model.prototxt")
    p.add_argument("--fake-weights", help="<prefix>_fake_quant_weights.caffemodel")
    p.add_argument("--deploy-model", help="<prefix>_deploy_model.prototxt (optional)")
    p.add_argument("--deploy-weights", help="<prefix>_deploy_weights.caffemodel (optional)")
    p.add_argument("--quant-info", metavar="FILE",
                   help="<prefix>_quant.json of PTQ's save_model (default: the one beside --fake-model, if "
                        "any); its equalization factors are applied to the float reference")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                   help="input values (axis 0 is split into --batches forward passes); repeat per input")
    p.add_argument("--output-dir", metavar="DIR", help="folder of report.json/.html and plots (required)")
    _hidden_alias(p, "--output", "output_dir")
    p.add_argument("--threshold", type=float, default=0.99,
                   help="cosine below which a layer is a candidate to skip (default 0.99)")
    p.add_argument("--batches", type=_positive_int, default=1, help="forward passes (default 1)")
    _hidden_alias(p, "--batch_num", "batches", _positive_int)
    p.add_argument("--seed", type=_seed, default=0, help="seed of random inputs (default 0)")

    from amct_caffe.demo.run import DEFAULT_OUTPUT, RETRAIN_ITERATIONS

    p = _add(sub, "demo", cmd_demo, "PTQ and QAT end to end on the bundled digits net (seconds on a CPU)",
             debug)
    p.add_argument("--output-dir", default=f"./{DEFAULT_OUTPUT}", metavar="DIR",
                   help=f"output folder (default ./{DEFAULT_OUTPUT})")
    _hidden_alias(p, "--output", "output_dir")
    p.add_argument("--float-iters", type=_positive_int, default=None, metavar="N",
                   help="float training iterations (default 600)")
    p.add_argument("--retrain-iters", type=_positive_int, default=RETRAIN_ITERATIONS, metavar="N",
                   help=f"QAT retraining iterations (default {RETRAIN_ITERATIONS})")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data split and the solvers (default 0)")
    p.add_argument("--no-report", action="store_true", help="skip the per-layer report")

    p = _add(sub, "exec", cmd_exec, "run an unchanged pycaffe script (import caffe) on the engine", debug)
    p.add_argument("script", metavar="SCRIPT.py", help="the Python script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's arguments")

    p = _add(sub, "pycaffe-rewrite", cmd_pycaffe_rewrite,
             "make a fake-quant model runnable in a stock pycaffe (Python layers)", debug)
    p.add_argument("model_in", metavar="MODEL_IN", help="the *_fake_quant_model.prototxt")
    p.add_argument("model_out", metavar="MODEL_OUT", help="the rewritten .prototxt to write")
    return parser


def cmd_exec(args: argparse.Namespace) -> int:
    """Run a Python script that does `import caffe` with `caffe` bound to amct-caffe's pycaffe facade, for
    this run only (a plain `import caffe` elsewhere never finds the facade); the script's exit code is the
    command's."""
    from amct_caffe.caffe.script import run_script

    try:
        run_script(args.script, args.script_args)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, (AmctError, OSError)):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the command line (``argv`` without the program name); returns the exit code."""
    quiet_screen()
    parser = build_parser(prog)
    args = parser.parse_args(normalise_spellings(parser, sys.argv[1:] if argv is None else argv))
    required = _REQUIRED_VIA_ALIAS.get(args.command)
    if required is not None and getattr(args, required[0], None) is None:
        parser.error(f"{args.command}: the following arguments are required: {required[1]}")
    debug = bool(args.debug)
    # the opt-in for type: "Python" layers; without the flag the environment variable still decides
    python_layers: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if args.allow_python_layers:
        from amct_caffe.engine.layers.python import allow_python_layers

        python_layers = allow_python_layers(True)
    backend: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if args.backend is not None:
        from amct_caffe.engine.onnx_backend import use_backend

        backend = use_backend(args.backend)
    try:
        with python_layers, backend:
            return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def main_amct(argv: Sequence[str] | None = None) -> int:
    """The ``amct_caffe`` console script: AMCT's spelling, with its ``calibration`` subcommand."""
    return main(argv, prog=AMCT_PROG)


__all__ = ["build_parser", "load_image_input", "main", "main_amct"]


if __name__ == "__main__":
    sys.exit(main())
