"""Reading and writing Caffe files: text prototxt, binary caffemodel, and atomic output.

Both readers upgrade old formats the way Caffe's ``UpgradeNetAsNeeded`` does (V1 ``layers {}`` to V2
``layer {}``, deprecated ``input:`` fields to an ``Input`` layer), so the rest of the package only ever sees
V2 nets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import message as pb_message
from google.protobuf import text_format

from amct_caffe.errors import ModelFormatError
from amct_caffe.log import get_logger
from amct_caffe.model.atomic import AtomicFiles as AtomicFiles  # re-exported: the workflows' writer
from amct_caffe.model.atomic import atomic_write
from amct_caffe.model.blobs import check_blob
from amct_caffe.model.limits import CAFFEMODEL_LIMIT_ENV, caffemodel_limit_bytes
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("model.io")

_LAYER_START = re.compile(r"^\s*(layers?)\s*\{")
_NAME_FIELD = re.compile(r'^\s*name\s*:\s*"([^"]*)"')


def _layer_at_line(text: str, line_no: int) -> str | None:
    """Name of the layer block that encloses 1-based ``line_no`` of a prototxt, if it can be told."""
    lines = text.splitlines()
    start = None
    for i in range(min(line_no, len(lines)) - 1, -1, -1):
        if _LAYER_START.match(lines[i]):
            start = i
            break
    if start is None:
        return None
    for line in lines[start:]:
        m = _NAME_FIELD.match(line)
        if m:
            return m.group(1)
    return None


def parse_prototxt_text(text: str, message: pb_message.Message, path: str) -> None:
    """Merge prototxt ``text`` into ``message``; a parse error names the file, line and enclosing layer."""
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as exc:
        line = getattr(exc, "GetLine", lambda: None)()
        layer = _layer_at_line(text, line) if line else None
        where = f" in layer '{layer}'" if layer else ""
        hint = ""
        if "has no field named" in str(exc) or "no field named" in str(exc):
            hint = (
                " The field is not part of the Caffe format amct-caffe knows (BVLC Caffe, Caffe-SSD and AMCT"
                " extensions); remove it or check its spelling."
            )
        raise ModelFormatError(f"Cannot parse prototxt '{path}'{where}: {exc}.{hint}") from exc


def load_prototxt(path: str | os.PathLike[str], *, upgrade: bool = True) -> caffe_pb2.NetParameter:
    """Read a text prototxt into a ``NetParameter``, upgraded to the V2 format.

    Args:
        path: the .prototxt file.
        upgrade: upgrade V1 layers and deprecated input fields (as Caffe does when it loads a net).

    Returns:
        The parsed (and upgraded) ``caffe_pb2.NetParameter``.

    Raises:
        ModelFormatError: the file is missing or does not parse as a Caffe net.
    """
    path = str(path)
    text = _read_text(path)
    net = caffe_pb2.NetParameter()
    parse_prototxt_text(text, net, path)
    if upgrade:
        from amct_caffe.model.upgrade import upgrade_net

        upgrade_net(net, path)
    return net


def load_caffemodel(path: str | os.PathLike[str], *, upgrade: bool = True) -> caffe_pb2.NetParameter:
    """Read a binary caffemodel into a ``NetParameter``, upgraded to the V2 format.

    What Caffe accepts is accepted: a 0-byte file is a net without weights (with a warning, since every
    layer then keeps its filler values). A text NetParameter that holds blobs is accepted too, as Caffe's
    tools do; a text prototxt without blobs, a file of another protobuf type (e.g. a solver) and a damaged
    file are refused. Every blob's stored values must fill its shape (see :func:`model.blobs.check_blob`).

    Args:
        path: the .caffemodel file (binary protobuf).
        upgrade: upgrade V1 layers (old binary snapshots store ``layers`` = field 2).

    Returns:
        The parsed ``caffe_pb2.NetParameter`` with its blobs.

    Raises:
        ModelFormatError: the file is missing, larger than the read limit, or not a caffemodel.
        WeightShapeError: a blob's values do not fill its shape.
        ConfigError: ``AMCT_CAFFEMODEL_LIMIT_MB`` is not a positive whole number.
    """
    path = str(path)
    data = _read_caffemodel_bytes(path)
    if not data:
        LOGGER.warning("Caffemodel '%s' is empty (0 bytes); Caffe reads it as a net without weights, so "
                       "every layer keeps its filler values.", path)
        return caffe_pb2.NetParameter()
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except pb_message.DecodeError as exc:
        net = _parse_text_caffemodel(data, path, exc)
    else:
        _check_binary_net(net, path)
    for layer in (*net.layer, *net.layers):
        for index, blob in enumerate(layer.blobs):
            check_blob(blob, file=path, layer=layer.name, index=index)
    if upgrade:
        from amct_caffe.model.upgrade import upgrade_net

        upgrade_net(net, path)
    return net


def _read_caffemodel_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise ModelFormatError(f"Caffemodel '{path}' does not exist or is not a regular file; check the "
                               "weights file path.")
    size = os.path.getsize(path)
    limit = caffemodel_limit_bytes()
    if size > limit:
        raise ModelFormatError(
            f"Caffemodel '{path}' is {size} bytes, above the read limit of {limit} bytes; "
            f"set {CAFFEMODEL_LIMIT_ENV} to a larger value if the file is trusted."
        )
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"Cannot read caffemodel '{path}': {exc.strerror or exc}.") from exc


def _check_binary_net(net: caffe_pb2.NetParameter, path: str) -> None:
    """Refuse bytes that parse as a NetParameter only by accident: no layers at all, or no blob in any layer
    together with fields a NetParameter does not have (another protobuf type, e.g. a SolverParameter)."""
    layers = (*net.layer, *net.layers)
    has_blobs = any(layer.blobs for layer in layers)
    if layers and (has_blobs or not _has_unknown_fields(net)):
        return
    raise ModelFormatError(
        f"Cannot parse caffemodel '{path}': it holds no Caffe layers (is it a solver or another protobuf "
        "file?); give the .caffemodel file that training wrote."
    )


def _has_unknown_fields(net: caffe_pb2.NetParameter) -> bool:
    """True when the parsed bytes hold net-level fields the schema does not know (unknown fields inside the
    layers are left out: a Caffe fork may add layer parameters)."""
    top = caffe_pb2.NetParameter()
    top.CopyFrom(net)
    del top.layer[:]
    del top.layers[:]
    known = caffe_pb2.NetParameter()
    known.CopyFrom(top)
    known.DiscardUnknownFields()
    return known.ByteSize() != top.ByteSize()


def _looks_like_text(data: bytes) -> str | None:
    """``data`` decoded when it is UTF-8 text without control characters (but tabs and line breaks)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return None
    return text


def _parse_text_caffemodel(data: bytes, path: str, binary_error: Exception) -> caffe_pb2.NetParameter:
    text = _looks_like_text(data)
    if text is None:
        raise ModelFormatError(
            f"Cannot parse caffemodel '{path}': it is not a valid binary NetParameter ({binary_error}); the "
            "file is truncated or damaged, or not a caffemodel written by Caffe."
        ) from binary_error
    net = caffe_pb2.NetParameter()
    try:
        text_format.Merge(text, net)
    except text_format.ParseError as exc:
        raise ModelFormatError(
            f"Cannot parse caffemodel '{path}': it is neither a binary NetParameter nor a text one ({exc}); "
            "give the .caffemodel file that training wrote."
        ) from exc
    if not any(layer.blobs for layer in (*net.layer, *net.layers)):
        raise ModelFormatError(
            f"Caffemodel '{path}' is a text prototxt, not a binary caffemodel: it holds no weights. Give the "
            ".caffemodel file that training wrote (and the prototxt as the model file)."
        )
    return net


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        what = "is not a regular file (a folder, a device or a pipe)" if os.path.exists(path) else \
            "does not exist"
        raise ModelFormatError(f"Prototxt '{path}' {what}; check the model file path.")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(
            f"Prototxt '{path}' is not UTF-8 text; a binary caffemodel was perhaps given as the model file."
        ) from exc


def prototxt_text(message: pb_message.Message) -> str:
    """The text form Caffe writes: fields in schema order; float32 values in their shortest exact form
    (protobuf's default, which round-trips every float32)."""
    return text_format.MessageToString(message)


def save_prototxt(net: pb_message.Message, path: str | os.PathLike[str]) -> None:
    """Write ``net`` as a text prototxt, atomically (a temporary file renamed into place)."""
    atomic_write(path, prototxt_text(net).encode("utf-8"))


def save_caffemodel(net: caffe_pb2.NetParameter, path: str | os.PathLike[str]) -> None:
    """Write ``net`` as a binary caffemodel, atomically (a temporary file renamed into place)."""
    atomic_write(path, net.SerializeToString())


@dataclass(frozen=True)
class OutputConflict:
    """Why an output path cannot be written: ``kind`` is ``"folder"`` (the path is an existing folder),
    ``"input"`` (it is the input ``other``) or ``"same"`` (the output ``other`` has the same path)."""

    kind: str
    name: str
    path: str
    other: str = ""


def output_conflict(outputs: Iterable[tuple[str, str]],
                    inputs: Iterable[tuple[str, str | None]]) -> OutputConflict | None:
    """The first problem with the ``(name, path)`` outputs of one call, checked in order: an output that is
    an existing folder, one of the ``(name, path)`` inputs, or the same file as an earlier output. None when
    every output can be written. The callers phrase the error for their API.
    """
    sources = {os.path.abspath(p): name for name, p in inputs if p is not None}
    seen: dict[str, str] = {}
    for name, path in outputs:
        target = os.path.abspath(path)
        if os.path.isdir(target):
            return OutputConflict("folder", name, path)
        if target in sources:
            return OutputConflict("input", name, path, sources[target])
        if target in seen:
            return OutputConflict("same", name, path, seen[target])
        seen[target] = name
    return None
