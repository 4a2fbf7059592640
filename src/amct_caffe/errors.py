"""The exception hierarchy of amct-caffe.

Every error the toolkit raises on bad input is an :class:`AmctError`. Messages name the file and the layer
involved and say what to do about it, so a user can act on the one line the command-line tool prints.
"""

from __future__ import annotations


class AmctError(Exception):
    """Base class of every error amct-caffe raises on bad input or an unsupported model."""


class ModelFormatError(AmctError):
    """A prototxt, caffemodel or solver file cannot be parsed or is inconsistent."""


class WeightShapeError(ModelFormatError):
    """A caffemodel blob does not have the shape the prototxt asks for."""


class BlobSizeError(ModelFormatError):
    """A blob whose shape has a negative axis or more elements than the limits allow (the layer parameters
    ask for more memory than a real net needs; the limits and their environment variables are in
    docs/design.md, "Limits")."""


class UnsupportedLayerError(AmctError):
    """A layer type or a layer option that the engine or a pass does not support."""


class ConfigError(AmctError):
    """A quantization config (JSON or simplified .cfg) or an API argument is invalid."""


class RecordError(AmctError):
    """A scale/offset record file is missing, malformed or inconsistent with the model."""


class CalibrationDataError(ConfigError):
    """Calibration input files that do not fit the model (missing, too few, or of the wrong size)."""


class EvaluatorError(AmctError):
    """An evaluator given to ``accuracy_based_auto_calibration`` that breaks AMCT's contract (not a subclass
    of ``AutoCalibrationEvaluatorBase``, a method not overridden, ``metric_eval`` not returning
    ``(bool, number)``)."""


class GraphStateError(AmctError):
    """A graph returned by ``init`` is used after the files it was built from changed."""


class NotImplementedFeatureError(AmctError):
    """An AMCT API that amct-caffe does not implement (e.g. ``auto_nuq``)."""


class RuntimeEngineError(AmctError):
    """The engine cannot run a net as asked (missing input, wrong input shape, device unavailable)."""


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
