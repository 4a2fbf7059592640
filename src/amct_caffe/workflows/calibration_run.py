"""The whole post-training quantization of one model, as AMCT's ``amct_caffe calibration`` command runs it.

Calibration data comes either from raw binary files or from the user's evaluator script:

* ``--input_shape "data:32,3,224,224;im_info:32,3"``, ``--data_dir "bins/data;bins/im_info"``,
  ``--data_types "float32;float32"`` -- one folder per net input (in the order of ``input_shape``); every
  ``.bin`` file in it is one batch: the raw array of that input's shape in that data type (native byte
  order, C order), with no header. The files are taken in ascending name order, one per calibration batch.
  A file of another size is a :class:`~amct_caffe.errors.CalibrationDataError` naming it, as is a folder
  with fewer files than ``batch_num``;
* ``--evaluator script.py`` -- a Python file defining ``evaluator``, an object whose
  ``calibration(model_file, weights_file)`` runs the ``batch_num`` forward batches of the calibration model
  it is given (AMCT's evaluator contract), or a class with that method constructed without arguments.

Then ``create_quant_config`` (AMCT's defaults, or ``--calibration_config`` -- a simplified ``.cfg``),
``init``, ``quantize_model``, the calibration batches, and ``save_model('Both')``. ``--batch_num``
overrides the ``.cfg``'s ``batch_num`` (default 1).

``save_path`` is a folder plus a file-name prefix as in ``save_model`` (a folder alone, or a path ending
with a separator, takes the model file's name as the prefix). Outputs: the four model files and
``<prefix>_quant.json`` of ``save_model``, plus ``<prefix>_quant_config.json`` (the PTQ config used) and
``<prefix>_scale_offset_record.txt`` (the record). Beyond AMCT, ``--refine`` runs ``save_model``'s
refinements (``equalization``, ``bias_correction``, ``adaround``, ``end_to_end``; comma-separated) on the
batches of the data options. The calibration model lives in a temporary folder that is
removed afterwards. Everything is checked (inputs, data files, config) before the first output is written,
and on any error no output is left.
"""

from __future__ import annotations

import os
import runpy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from amct_caffe.errors import CalibrationDataError, ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.io import atomic_write
from amct_caffe.quant.ptq_config import dumps_json
from amct_caffe.workflows import ptq
from amct_caffe.workflows.refine import refine_plan

LOGGER = get_logger("calibration")

#: The ``--data_types`` names accepted (numpy's names; AMCT documents float32/float64 and friends).
DATA_TYPES = ("float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool")
CONFIG_SUFFIX = "_quant_config.json"
RECORD_SUFFIX = "_scale_offset_record.txt"


@dataclass(frozen=True)
class InputData:
    """The calibration data of one net input: its name, shape and type, and one file per batch."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    files: tuple[str, ...]

    def batch(self, index: int) -> np.ndarray:
        """Batch ``index`` as float32, shaped ``shape``."""
        raw = np.fromfile(self.files[index], dtype=self.dtype)
        return raw.reshape(self.shape).astype(np.float32)


def _split(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(";")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f"{option} '{text}' has an empty entry; separate the inputs with ';' and no empty "
                          "parts.")
    return items


def parse_input_shape(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``"data:32,3,224,224;label:32"`` -> ``[("data", (32, 3, 224, 224)), ("label", (32,))]``.

    Raises:
        ConfigError: an entry is not ``name:d1,d2,...`` with positive integer dims, or a name repeats.
    """
    out: list[tuple[str, tuple[int, ...]]] = []
    for item in _split(text, "--input_shape"):
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) <= 0:
            raise ConfigError(f"--input_shape entry '{item}' must look like name:n,c,h,w with positive "
                              "integer dims, e.g. data:1,3,224,224.")
        if name in (n for n, _ in out):
            raise ConfigError(f"--input_shape gives input '{name}' twice; give each input once.")
        out.append((name, shape))
    return out


def parse_data_types(text: str, count: int) -> list[np.dtype]:
    """``"float32;uint8"`` -> numpy dtypes, one per input.

    Raises:
        ConfigError: an unknown type name, or not ``count`` of them.
    """
    names = _split(text, "--data_types")
    if len(names) != count:
        raise ConfigError(f"--data_types gives {len(names)} type(s) for {count} input(s) of --input_shape; "
                          "give one per input, in the same order, separated by ';'.")
    for name in names:
        if name not in DATA_TYPES:
            raise ConfigError(f"--data_types: '{name}' is not a supported data type; use one of "
                              f"{', '.join(DATA_TYPES)}.")
    return [np.dtype(name) for name in names]


def batch_files(folder: str, batch_num: int, input_name: str) -> tuple[str, ...]:
    """The first ``batch_num`` ``.bin`` files of ``folder`` in ascending name order.

    Raises:
        CalibrationDataError: the folder is missing or holds fewer ``.bin`` files.
    """
    if not os.path.isdir(folder):
        raise CalibrationDataError(f"--data_dir: the folder '{folder}' of input '{input_name}' does not "
                                   "exist.")
    files = sorted(entry.name for entry in os.scandir(folder)
                   if entry.is_file() and entry.name.endswith(".bin"))
    if len(files) < batch_num:
        raise CalibrationDataError(
            f"--data_dir: folder '{folder}' of input '{input_name}' holds {len(files)} .bin file(s), but "
            f"batch_num is {batch_num} (one file per batch); add files or lower --batch_num."
        )
    return tuple(os.path.join(folder, name) for name in files[:batch_num])


def calibration_inputs(input_shape: str, data_dir: str, data_types: str, batch_num: int) -> list[InputData]:
    """The calibration data described by the three options; every file's size is checked.

    Raises:
        ConfigError: malformed options.
        CalibrationDataError: a folder is missing or short of files, or a file's size does not fit its
            input's shape and type.
    """
    shapes = parse_input_shape(input_shape)
    dtypes = parse_data_types(data_types, len(shapes))
    folders = _split(data_dir, "--data_dir")
    if len(folders) != len(shapes):
        raise ConfigError(f"--data_dir gives {len(folders)} folder(s) for {len(shapes)} input(s) of "
                          "--input_shape; give one folder per input, in the same order, separated by ';'.")
    inputs = []
    for (name, shape), dtype, folder in zip(shapes, dtypes, folders):
        files = batch_files(folder, batch_num, name)
        expected = int(np.prod(shape)) * dtype.itemsize
        for path in files:
            size = os.path.getsize(path)
            if size != expected:
                raise CalibrationDataError(
                    f"Calibration file '{path}' of input '{name}' has {size} bytes, but one batch of shape "
                    f"{','.join(map(str, shape))} in {dtype.name} has {expected} bytes; write each batch as "
                    "a raw array of exactly that shape and type (or fix --input_shape/--data_types)."
                )
        inputs.append(InputData(name, shape, dtype, files))
    return inputs


def output_prefix(save_path: str, model_file: str) -> str:
    """``save_path`` as a folder plus prefix: a folder (existing, or ending with a separator) takes the model
    file's stem as the prefix."""
    if os.path.isdir(save_path) or save_path.endswith(("/", os.sep)):
        return os.path.join(save_path, Path(model_file).stem)
    return save_path


# -- running the calibration model -------------------------------------------------------------------------
def run_batches(model_file: str, weights_file: str, inputs: Sequence[InputData], batch_num: int) -> None:
    """Forward the calibration model ``batch_num`` times in the engine, batch ``i`` of every input each time.

    Raises:
        CalibrationDataError: an input name is not an input blob of the model.
    """
    from amct_caffe.engine.layers.base import TEST
    from amct_caffe.engine.net import Net

    net = Net(model_file, TEST, weights=weights_file)
    unknown = [data.name for data in inputs if data.name not in net.inputs]
    if unknown:
        raise CalibrationDataError(
            f"--input_shape names {unknown}, which are not input blobs of model '{model_file}' (its inputs: "
            f"{net.inputs or 'none: give the model an Input layer'})."
        )
    for i in tqdm(range(batch_num), desc="Calibration", unit="batch", disable=None):
        for data in inputs:
            net.set_tensor(data.name, torch.from_numpy(data.batch(i)).to(net.device))
        net.run()


def load_evaluator(path: str) -> Callable[[str, str], Any]:
    """The ``calibration(model_file, weights_file)`` of the evaluator script ``path`` (module docstring).

    Raises:
        ConfigError: the file is missing or defines no usable evaluator.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"--evaluator: the script '{path}' does not exist.")
    namespace = runpy.run_path(path, run_name="amct_caffe_evaluator")
    candidate = namespace.get("evaluator")
    if candidate is None:
        classes = [value for value in namespace.values()
                   if isinstance(value, type) and callable(getattr(value, "calibration", None))
                   and value.__module__ == "amct_caffe_evaluator"]
        if len(classes) == 1:
            candidate = classes[0]()
    method = getattr(candidate, "calibration", None)
    if not callable(method):
        raise ConfigError(f"--evaluator: '{path}' defines no evaluator; define `evaluator`, an object with a "
                          "calibration(model_file, weights_file) method that runs the batch_num forward "
                          "batches (or one class with that method).")
    return method


# -- the command -------------------------------------------------------------------------------------------
def run_calibration(
    model_file: str,
    weights_file: str,
    save_path: str,
    input_shape: str | None = None,
    data_dir: str | None = None,
    data_types: str | None = None,
    evaluator: str | None = None,
    calibration_config: str | None = None,
    batch_num: int | None = None,
    gpu_id: int | None = None,
    *,
    for_atc: bool = False,
    refine: Sequence[str] | None = None,
) -> list[str]:
    """Quantize ``model_file`` after training (module docstring); returns the files written. ``for_atc``
    writes the inference / ATC-ready prototxts (``ptq.save_model``), its Input shapes from ``input_shape``
    where given. ``refine`` (not AMCT's): the refinements of ``save_model`` (``workflows.refine``), run on
    the calibration batches of the data options.

    Raises:
        ConfigError: missing or conflicting options; anything the PTQ API refuses.
        CalibrationDataError: calibration files that do not fit.
        ModelFormatError: a model or weights file is missing or malformed.
    """
    data_options = {"--input_shape": input_shape, "--data_dir": data_dir, "--data_types": data_types}
    given = [name for name, value in data_options.items() if value is not None]
    if evaluator is not None and given:
        raise ConfigError(f"--evaluator cannot be combined with {', '.join(given)}; give either the "
                          "evaluator or the three data options.")
    if evaluator is None and len(given) != 3:
        missing = [name for name, value in data_options.items() if value is None]
        raise ConfigError(f"calibration data is missing: give {', '.join(missing)} (or --evaluator).")
    for option, path in (("--model", model_file), ("--weights", weights_file),
                         ("--calibration_config", calibration_config)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{option}: file '{path}' does not exist.")
    if batch_num is not None and batch_num <= 0:
        raise ConfigError(f"--batch_num must be a positive integer, got {batch_num}.")
    if refine:
        refine_plan(list(refine), None, "--refine", need_data=False)
        if evaluator is not None:
            raise ConfigError("--refine trains on the calibration batches, which an evaluator script runs "
                              "out of sight; give the data options (--input_shape, --data_dir, --data_types) "
                              "instead of --evaluator.")
    if gpu_id is not None:
        from amct_caffe.engine import device

        device.set_device(gpu_id)
        device.set_mode_gpu()
    prefix = output_prefix(save_path, model_file)

    with tempfile.TemporaryDirectory(prefix="amct_calibration_") as work:
        config_path = os.path.join(work, "quant_config.json")
        record_path = os.path.join(work, "record.txt")
        config = ptq.create_quant_config(config_path, model_file, weights_file,
                                         config_defination=calibration_config)
        if batch_num is not None and batch_num != config.batch_num:
            if calibration_config is not None:
                LOGGER.warning("--batch_num %d overrides batch_num %d of '%s'.", batch_num, config.batch_num,
                               calibration_config)
            config = replace(config, batch_num=batch_num)
            atomic_write(config_path, dumps_json(config).encode("utf-8"))
        run: Callable[[str, str], Any]
        batches: list[dict[str, np.ndarray]] | None = None
        if evaluator is not None:
            run = load_evaluator(evaluator)
        else:
            inputs = calibration_inputs(str(input_shape), str(data_dir), str(data_types), config.batch_num)
            if refine:
                batches = [{data.name: data.batch(i) for data in inputs} for i in range(config.batch_num)]

            def run(model: str, weights: str) -> None:
                run_batches(model, weights, inputs, config.batch_num)

        graph = ptq.init(config_path, model_file, weights_file, record_path)
        modified = (os.path.join(work, "calibration_model.prototxt"),
                    os.path.join(work, "calibration_weights.caffemodel"))
        ptq.quantize_model(graph, *modified)
        run(*modified)
        extra = {prefix + CONFIG_SUFFIX: Path(config_path).read_bytes(),
                 prefix + RECORD_SUFFIX: Path(record_path).read_bytes()}
        shapes = dict(parse_input_shape(input_shape)) if for_atc and input_shape is not None else None
        ptq.save_model(graph, "Both", prefix, extra_files=extra, refine=list(refine) if refine else None,
                       calibration_data=batches, for_atc=for_atc, input_shape=shapes)
    written = [prefix + suffix for suffix in ("_fake_quant_model.prototxt", "_fake_quant_weights.caffemodel",
                                              "_deploy_model.prototxt", "_deploy_weights.caffemodel",
                                              ptq.QUANT_INFO_SUFFIX, CONFIG_SUFFIX, RECORD_SUFFIX)]
    LOGGER.info("Calibration of '%s' done: %s.", model_file, ", ".join(written))
    return written
