"""The exception hierarchy of amct-caffe.

Every error the toolkit raises on bad input is an :class:`AmctError`. Messages name the file and the layer
involved and say what to do about it, so a user can act on the one line the command-line tool prints.

Each class also derives from the builtin exception pycaffe raises for the same problem, so a script's
existing ``except`` clauses keep catching them: a file that is missing, unreadable or malformed, a layer type
the engine lacks, a net that cannot run -> ``RuntimeError`` (what pycaffe's C++ checks raise); a bad argument
or config value -> ``ValueError``; a name the net does not have -> ``KeyError`` (:class:`UnknownNameError`,
for lookups that are dictionaries in pycaffe) or ``ValueError`` (layer names, a list index in pycaffe).
"""

from __future__ import annotations


class AmctError(Exception):
    """Base class of every error amct-caffe raises on bad input or an unsupported model."""


class ModelFormatError(AmctError, RuntimeError):
    """A prototxt, caffemodel or solver file cannot be parsed or is inconsistent."""


class WeightShapeError(ModelFormatError):
    """A caffemodel blob does not have the shape the prototxt asks for."""


class DuplicateLayerNameError(ModelFormatError):
    """Two layers of one phase share a name where a flow needs one layer per name (quantization configs and
    record files key on layer names). The engine itself runs such nets, as Caffe does."""



class ModelMismatchError(ModelFormatError):
    """Models given to be compared (float, fake-quant, deploy) that do not belong together: a quantized
    layer's blob is missing from one of them or has another shape there."""


class BlobSizeError(ModelFormatError):
    """A blob whose shape has a negative axis or more elements than the limits allow (the layer parameters
    ask for more memory than a real net needs; the limits and their environment variables are in
    docs/design.md, "Limits")."""


class UnsupportedLayerError(AmctError, RuntimeError):
    """A layer type or a layer option that the engine or a pass does not support."""


class ConfigError(AmctError, ValueError):
    """A quantization config (JSON or simplified .cfg) or an API argument is invalid."""


class RecordError(AmctError, RuntimeError):
    """A scale/offset record file is missing, malformed or inconsistent with the model."""


class CalibrationDataError(ConfigError):
    """Calibration input files that do not fit the model (missing, too few, or of the wrong size)."""


class EvaluatorError(AmctError):
    """An evaluator given to ``accuracy_based_auto_calibration`` that breaks AMCT's contract (not a subclass
    of ``AutoCalibrationEvaluatorBase``, a method not overridden, ``metric_eval`` not returning
    ``(bool, number)``)."""


class GraphStateError(AmctError, RuntimeError):
    """A graph returned by ``init`` is used after the files it was built from changed."""


class OutputWriteError(AmctError):
    """An output file cannot be written (a folder in its place, a read-only or full disk, no permission, a
    name too long). No output of the set was changed unless the message says otherwise."""


class OutputLockError(OutputWriteError):
    """Another process kept the output folder locked longer than the lock timeout."""


class NotImplementedFeatureError(AmctError, NotImplementedError):
    """An AMCT API that amct-caffe does not implement (e.g. ``auto_nuq``)."""


class PythonLayerNotAllowedError(UnsupportedLayerError):
    """A net has a ``type: "Python"`` layer and the caller did not opt in to importing its module (the
    message says how: ``allow_python_layers=True``, ``--allow-python-layers`` or
    ``AMCT_CAFFE_ALLOW_PYTHON_LAYERS=1``)."""


class RuntimeEngineError(AmctError, RuntimeError):
    """The engine cannot run a net as asked (missing input, wrong input shape, device unavailable)."""


class WorkerLostError(RuntimeEngineError):
    """A collective of data-parallel training failed because another worker stopped (or timed out)."""


class UnknownNameError(RuntimeEngineError, KeyError):
    """A blob or layer name the net does not have (a ``KeyError`` as pycaffe's ``net.blobs[name]``)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownLayerError(RuntimeEngineError, ValueError):
    """A layer name the net does not have, where pycaffe looks it up in a list (``forward(start=...)``,
    ``backward(end=...)``: a ``ValueError``)."""


def where(file: str | None = None, layer: str | None = None) -> str:
    """Format the 'in file X, layer Y' part that every message carries."""
    parts = []
    if file:
        parts.append(f"file '{file}'")
    if layer:
        parts.append(f"layer '{layer}'")
    return ", ".join(parts)


def model_where(model: str, noun: str = "model", *, role: str = "", file: str = "") -> str:
    """Name a model in a message: ``model 'lenet.prototxt'``, followed by ``(config 'qat.json')`` when
    another file the message concerns is given.

    Args:
        model: the model's file, or its net name when it came from no file.
        noun: what the message calls the model (``"Net"``, ``"retrain model"``...).
        role: what ``file`` is to the model (``"config"``, ``"weights"``...).
        file: that other file; empty for none.
    """
    text = f"{noun} '{model}'"
    return f"{text} ({role} '{file}')" if file else text
