"""The scale/offset record file (docs/amct-reference.md §5): read, validate, write, and the
training-time shape updates.

The file is protobuf TEXT format of ``amct.ScaleOffsetRecord`` -- a list-encoded map from layer name to a
``SingleLayerRecord`` (``scale_d``, ``offset_d``, ``scale_w[]``, ``offset_w[]``, ``shift_bit[]``,
``channels``, ``height``, ``width``, ``skip_fusion``). The shape record the ``ActivationQAT`` layers write
during training (``caffe.RetrainShapeRecord``) uses the same field names, so its text parses as a
``ScaleOffsetRecord`` with only the shape fields set; one reader serves both.

Two views:

* the proto (:func:`parse_record`, :func:`read_record_proto`): exactly what the file holds, duplicates
  and all; :func:`update_shapes` edits it so that every other field survives unchanged;
* plain data (:func:`read_records`, :func:`records_from_proto`): ``{layer name: LayerRecord}``. A layer
  listed twice is merged entry by entry in file order, a later entry's set fields winning (protobuf's
  "last value wins" for duplicated optional fields, AMCT reference §5.1), with a warning.

Validation (:func:`validate_records`) enforces what AMCT's readers require: ``offset_w`` all 0 (weight
offsets are unsupported) and as long as ``scale_w``; ``scale_w`` of length 1 or C_out, finite and > 0;
``scale_d`` finite and > 0; ``offset_d`` in [-128, 127]. Errors are :class:`~amct_caffe.errors.RecordError`
naming the file and the layer.

Files are written atomically (:func:`amct_caffe.model.io.atomic_write`): readers see the old or the new
file, never a half-written one.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import text_format

from amct_caffe.errors import RecordError, where
from amct_caffe.log import get_logger
from amct_caffe.model.io import atomic_write
from amct_caffe.proto import amct_pb2
from amct_caffe.quant.numerics import INT8_MAX, INT8_MIN

LOGGER = get_logger("quant.record")

#: Serialises read-modify-write cycles on record files within this process (two nets -- e.g. the solver's
#: TRAIN and TEST nets -- may update the same file on their first forwards).
_FILE_LOCK = threading.Lock()

#: The record this process last wrote with :func:`update_layers`, per path: ``(file signature, bytes
#: written, message)``. The calibration model's IFMR layers each update the file once, all on the last batch;
#: re-parsing the growing text every time made that quadratic in the number of layers (most of the
#: calibration time of a 60-layer net). The cached message is used only while the file on disk is still the
#: one written (same inode, size, modification time), so an edit by anyone else is read as usual.
_LAST_WRITTEN: dict[str, tuple[tuple[int, int, int], amct_pb2.ScaleOffsetRecord]] = {}


@dataclass
class LayerRecord:
    """One layer's entry of the record file as plain Python values (``None``/empty: field not set).

    Float values are those of the file's float32 fields (as Python floats); writing stores them as float32.
    """

    scale_d: float | None = None
    offset_d: int | None = None
    scale_w: list[float] = field(default_factory=list)
    offset_w: list[int] = field(default_factory=list)
    shift_bit: list[int] = field(default_factory=list)
    channels: int | None = None
    height: int | None = None
    width: int | None = None
    skip_fusion: bool = False

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """``(channels, height, width)`` when all three are set, else None."""
        if self.channels is None or self.height is None or self.width is None:
            return None
        return (self.channels, self.height, self.width)

    @classmethod
    def from_proto(cls, msg: amct_pb2.SingleLayerRecord) -> LayerRecord:
        """The plain view of one ``SingleLayerRecord``."""
        rec = cls()
        rec.merge_proto(msg)
        return rec

    def merge_proto(self, msg: amct_pb2.SingleLayerRecord) -> None:
        """Overwrite this record's fields with those set in ``msg`` (non-empty repeated fields replace)."""
        for name in ("scale_d", "offset_d", "channels", "height", "width", "skip_fusion"):
            if msg.HasField(name):
                setattr(self, name, getattr(msg, name))
        for name in ("scale_w", "offset_w", "shift_bit"):
            values = list(getattr(msg, name))
            if values:
                setattr(self, name, values)

    def to_proto(self) -> amct_pb2.SingleLayerRecord:
        """This record as a ``SingleLayerRecord`` (unset fields stay unset; ``skip_fusion`` only if true)."""
        msg = amct_pb2.SingleLayerRecord()
        for name in ("scale_d", "offset_d", "channels", "height", "width"):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        msg.scale_w.extend(float(v) for v in self.scale_w)
        msg.offset_w.extend(int(v) for v in self.offset_w)
        msg.shift_bit.extend(int(v) for v in self.shift_bit)
        if self.skip_fusion:
            msg.skip_fusion = True
        return msg


# -- reading -----------------------------------------------------------------------------------------------
def parse_record(text: str, path: str = "") -> amct_pb2.ScaleOffsetRecord:
    """Parse record-file ``text`` (a ``ScaleOffsetRecord`` or the training-time shape record).

    Raises:
        RecordError: the text is not a record file; the message names ``path`` and the line.
    """
    msg = amct_pb2.ScaleOffsetRecord()
    try:
        text_format.Merge(text, msg)
    except text_format.ParseError as exc:
        raise RecordError(
            f"Cannot parse the scale/offset record {where(path or '<text>')}: {exc}. The file must be "
            "protobuf text of ScaleOffsetRecord: 'record { key: \"<layer>\" value { ... } }' entries."
        ) from exc
    for i, entry in enumerate(msg.record):
        if not entry.key:
            raise RecordError(
                f"Record entry {i} in {where(path or '<text>')} has no 'key' (the layer name); every "
                "'record { }' entry needs one."
            )
    return msg


def read_record_proto(path: str | os.PathLike[str]) -> amct_pb2.ScaleOffsetRecord:
    """Read a record file as the proto, exactly as stored.

    Raises:
        RecordError: the file is missing, not UTF-8 text, or does not parse.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise RecordError(
            f"The scale/offset record {where(path)} does not exist; check the record file path."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise RecordError(f"The scale/offset record {where(path)} is not UTF-8 text.") from exc
    return parse_record(text, path)


def records_from_proto(msg: amct_pb2.ScaleOffsetRecord, path: str = "") -> dict[str, LayerRecord]:
    """The plain view ``{layer: LayerRecord}`` in order of first appearance, duplicates merged."""
    out: dict[str, LayerRecord] = {}
    for entry in msg.record:
        if entry.key in out:
            LOGGER.warning(
                "Layer '%s' is listed more than once in the scale/offset record %s; later values win.",
                entry.key,
                path or "<text>",
            )
            out[entry.key].merge_proto(entry.value)
        else:
            out[entry.key] = LayerRecord.from_proto(entry.value)
    return out


def read_records(
    path: str | os.PathLike[str],
    *,
    validate: bool = True,
    couts: Mapping[str, int] | None = None,
    require_factors: bool = False,
) -> dict[str, LayerRecord]:
    """Read a record file into ``{layer: LayerRecord}``; by default validated (see :func:`validate_records`).

    Raises:
        RecordError: the file is missing or malformed, or (``validate``) a layer's factors are invalid.
    """
    path = str(path)
    records = records_from_proto(read_record_proto(path), path)
    if validate:
        validate_records(records, path, couts=couts, require_factors=require_factors)
    return records


# -- validation ----------------------------------------------------------------------------------------------
def validate_layer(
    name: str,
    rec: LayerRecord,
    path: str = "",
    cout: int | None = None,
    require_factors: bool = False,
) -> None:
    """Check one layer's record; ``cout`` (the layer's output channels, when known) bounds ``scale_w``.

    ``require_factors`` also demands ``scale_d`` and ``offset_d`` (and ``scale_w`` when ``cout`` is given),
    i.e. a record complete enough to build quantized models from. Fields that are not set are otherwise
    not checked (a shape-only training record is valid).

    Raises:
        RecordError: naming the file and the layer, saying what is wrong.
    """

    def fail(problem: str) -> RecordError:
        return RecordError(f"Invalid scale/offset record ({where(path or '<text>', name)}): {problem}")

    if rec.scale_d is not None and not (math.isfinite(rec.scale_d) and rec.scale_d > 0.0):
        raise fail(f"scale_d is {rec.scale_d}; it must be a finite value > 0.")
    if rec.offset_d is not None and not INT8_MIN <= rec.offset_d <= INT8_MAX:
        raise fail(f"offset_d is {rec.offset_d}; it must be in [{INT8_MIN}, {INT8_MAX}].")
    bad_scales = [v for v in rec.scale_w if not (math.isfinite(v) and v > 0.0)]
    if bad_scales:
        raise fail(f"scale_w holds {bad_scales[0]}; every weight scale must be a finite value > 0.")
    if rec.scale_w and cout is not None and len(rec.scale_w) not in (1, cout):
        raise fail(
            f"scale_w has {len(rec.scale_w)} values; it needs 1 (per tensor) or {cout} (one per output "
            "channel)."
        )
    if any(v != 0 for v in rec.offset_w):
        raise fail(f"offset_w is {list(rec.offset_w)}; weight offsets are not supported and must all be 0.")
    if rec.offset_w and len(rec.offset_w) != len(rec.scale_w):
        raise fail(
            f"offset_w has {len(rec.offset_w)} values but scale_w has {len(rec.scale_w)}; they must have "
            "the same length."
        )
    if require_factors:
        missing = [n for n in ("scale_d", "offset_d") if getattr(rec, n) is None]
        if cout is not None and not rec.scale_w:
            missing.append("scale_w")
        if missing:
            raise fail(f"{', '.join(missing)} missing; the record lacks this layer's quantization factors.")


def validate_records(
    records: Mapping[str, LayerRecord],
    path: str = "",
    *,
    couts: Mapping[str, int] | None = None,
    require_factors: bool = False,
) -> None:
    """:func:`validate_layer` on every layer (``couts`` gives the output channels of the layers it knows)."""
    couts = couts or {}
    for name, rec in records.items():
        validate_layer(name, rec, path, couts.get(name), require_factors)


# -- writing ------------------------------------------------------------------------------------------------
def _ordered(names: Iterable[str], order: Sequence[str] | None) -> list[str]:
    names = list(names)
    if order is None:
        return names
    present = set(names)
    first = [n for n in dict.fromkeys(order) if n in present]
    chosen = set(first)
    return first + [n for n in names if n not in chosen]


def records_to_proto(
    records: Mapping[str, LayerRecord], order: Sequence[str] | None = None
) -> amct_pb2.ScaleOffsetRecord:
    """``records`` as a ``ScaleOffsetRecord``: the layers named in ``order`` first (in that order), then the
    others in mapping order. Names of ``order`` that ``records`` lacks are skipped."""
    msg = amct_pb2.ScaleOffsetRecord()
    for name in _ordered(records, order):
        entry = msg.record.add()
        entry.key = name
        entry.value.CopyFrom(records[name].to_proto())
    return msg


def record_text(records: Mapping[str, LayerRecord], order: Sequence[str] | None = None) -> str:
    """The record file's text for ``records`` (protobuf text format; floats in shortest float32 form)."""
    return text_format.MessageToString(records_to_proto(records, order))


def update_shapes(path: str | os.PathLike[str], shapes: Mapping[str, tuple[int, int, int]]) -> None:
    """Set ``channels/height/width`` of the given layers in the record file ``path`` (update-or-append).

    A layer already in the file keeps every other field (all its entries are updated when it is listed
    more than once); a new layer is appended as a shape-only entry; other layers are untouched. A missing
    file is created (:func:`update_layers`).

    Raises:
        RecordError: the existing file does not parse (it is left unchanged).
    """
    updates = {}
    for name, shape in shapes.items():
        channels, height, width = (int(v) for v in shape)
        updates[name] = LayerRecord(channels=channels, height=height, width=width)
    update_layers(path, updates)


def legacy_chw(shape: Sequence[int]) -> tuple[int, int, int] | None:
    """The record's ``(channels, height, width)`` of a blob shape: Caffe's ``channels()/height()/width()``
    (axes 1, 2, 3, each 1 when the blob has fewer axes); None for blobs of more than 4 axes, which Caffe's
    legacy accessors refuse."""
    if len(shape) > 4:
        return None
    dims = [int(d) for d in shape] + [1] * (4 - len(shape))
    return dims[1], dims[2], dims[3]


def _set_fields(msg: amct_pb2.SingleLayerRecord, rec: LayerRecord) -> None:
    """Write the fields ``rec`` sets into ``msg`` (non-empty repeated fields replace); others stay."""
    for name in ("scale_d", "offset_d", "channels", "height", "width"):
        value = getattr(rec, name)
        if value is not None:
            setattr(msg, name, value)
    for name in ("scale_w", "offset_w", "shift_bit"):
        values = getattr(rec, name)
        if values:
            field_values = getattr(msg, name)
            del field_values[:]
            field_values.extend(values)
    if rec.skip_fusion:
        msg.skip_fusion = True


def update_layers(path: str | os.PathLike[str], updates: Mapping[str, LayerRecord]) -> None:
    """Set the fields each ``LayerRecord`` of ``updates`` sets in the record file ``path`` (update or append).

    A layer already in the file keeps every field the update leaves unset (all its entries are updated when
    it is listed more than once); a new layer is appended; other layers are untouched. A missing file is
    created. The read-modify-write runs under a process-wide lock and the write is atomic, so nets of one
    process writing their entries cannot lose each other's.

    Raises:
        RecordError: the existing file does not parse (it is left unchanged), or an update is invalid.
    """
    path = str(path)
    for name, rec in updates.items():
        validate_layer(name, rec, path)
    with _FILE_LOCK:
        msg = _current_record(path)
        for name, rec in updates.items():
            entries = [e for e in msg.record if e.key == name]
            if not entries:
                entry = msg.record.add()
                entry.key = name
                entries = [entry]
            for entry in entries:
                _set_fields(entry.value, rec)
        atomic_write(path, _record_text(msg).encode("utf-8"))
        _LAST_WRITTEN[os.path.abspath(path)] = (_file_signature(path), msg)


#: The text of each record entry last formatted, by the entry's serialized bytes: a calibration writes one
#: entry per layer into a record holding every layer's per-channel ``scale_w``, and formatting the whole
#: text each time was quadratic in the layers.
_ENTRY_TEXT: dict[bytes, str] = {}


def _record_text(msg: amct_pb2.ScaleOffsetRecord) -> str:
    """``text_format.MessageToString(msg)``: the concatenation of each entry's text, reusing the entries
    formatted by the previous write."""
    texts = {}
    parts = []
    for entry in msg.record:
        key = entry.SerializeToString(deterministic=True)
        text = _ENTRY_TEXT.get(key)
        if text is None:
            single = amct_pb2.ScaleOffsetRecord()
            single.record.add().CopyFrom(entry)
            text = text_format.MessageToString(single)
        texts[key] = text
        parts.append(text)
    _ENTRY_TEXT.clear()
    _ENTRY_TEXT.update(texts)
    return "".join(parts)


def _file_signature(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _current_record(path: str) -> amct_pb2.ScaleOffsetRecord:
    """The record file's message for a read-modify-write: a copy of the one this process last wrote while the
    file is unchanged since, else parsed from the file (an empty record for a missing file)."""
    if not os.path.exists(path):
        return amct_pb2.ScaleOffsetRecord()
    cached = _LAST_WRITTEN.get(os.path.abspath(path))
    if cached is not None and cached[0] == _file_signature(path):
        msg = amct_pb2.ScaleOffsetRecord()
        msg.CopyFrom(cached[1])
        return msg
    return read_record_proto(path)
