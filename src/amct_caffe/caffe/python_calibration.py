"""AMCT's ``IFMR`` calibration layer as a Caffe Python layer: a STOCK pycaffe runs the calibration model.

``amct-caffe pycaffe-rewrite calibration.prototxt calibration_pycaffe.prototxt`` turns every ``IFMR`` layer of
the model ``quantize_model`` writes into ``type: "Python"`` with ``python_param { module:
"amct_caffe.caffe.python_calibration" layer: "IFMR" param_str: <its ifmr_param as JSON> }``. The user then
runs ``batch_num`` forward batches in any Caffe built with Python layers; after the last one each layer writes
``scale_d``, ``offset_d`` and the input shapes of its ``object_layer`` names into the record file, exactly as
the engine's layer (:mod:`amct_caffe.engine.layers.calibration`) does, with the same three steps
(gather, calibrate, record).

Like :mod:`amct_caffe.caffe.python_layers`, this module imports only the standard library and numpy (Caffe
imports it inside its own process). Two numpy twins live here: :func:`ifmr_numpy`, of
:func:`amct_caffe.quant.ifmr.ifmr_gathered` as the brute-force search that function reproduces exactly (every
candidate quantizes every value: same float32 operations, float64 sums; a test keeps them equal),
and a small reader/writer of the record's protobuf text (``record { key: "..." value { field: value ... } }``)
that updates the fields it sets and keeps every other field and entry as written.

``param_str`` JSON keys: ``batch_num``, ``with_offset``, ``search_range_start``, ``search_range_end``,
``search_step``, ``max_percentile``, ``min_percentile``, ``object_layer`` (list), ``record_file_path``, and
``distinct`` -- the indices of the distinct bottom blob names (Caffe splits a blob listed twice into two
blobs with one value, which is gathered once).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from amct_caffe.caffe.python_layers import StandaloneLayer, _caffe_layer_base, _FakeQuantLayer, round_away

__all__ = ["IFMR", "ifmr_numpy", "standalone_ifmr", "update_record_text"]

FLT_EPSILON = np.float32(2.0**-23)
#: (candidate, value) pairs evaluated at once by the loss search (bounds the temporary memory).
LOSS_BLOCK_ELEMENTS = 1 << 22
#: ``SingleLayerRecord`` fields in field-number order (the order protobuf's text format writes them).
RECORD_FIELDS = ("scale_d", "offset_d", "scale_w", "offset_w", "shift_bit", "channels", "height", "width",
                 "skip_fusion")


# -- IFMR ---------------------------------------------------------------------------------------------------
def _rank(n: int, percentile: float) -> int:
    if 1.0 - percentile < float(FLT_EPSILON):
        return 1
    return min(max(n - math.floor(percentile * n), 1), n)


def _process_scale(s: np.ndarray) -> np.ndarray:
    if not np.isfinite(s).all():
        raise ValueError("IFMR: the activation scale is inf or NaN.")
    s = np.where(s < FLT_EPSILON, np.float32(1), s).astype(np.float32)
    if not (np.float32(1) / s >= FLT_EPSILON).all():
        raise ValueError("IFMR: the activation scale is too large for INT8 quantization.")
    return s


def _scale_offset(cmin: np.float32, cmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data_scale_offset``'s twin: ``s = (cmax - cmin) / 255``, ``o = -round_away(cmin / s) - 128``."""
    raw = ((cmax - cmin) / np.float32(255)).astype(np.float32)
    s = _process_scale(raw)
    o = np.where(raw < FLT_EPSILON, np.float32(-128), -round_away((cmin / s).astype(np.float32)) - 128)
    return s, o.astype(np.float32)


def ifmr_numpy(
    chunks: Sequence[np.ndarray],
    max_percentile: float = 0.999999,
    min_percentile: float = 0.999999,
    search_start: float = 0.7,
    search_end: float = 1.3,
    search_step: float = 0.01,
    with_offset: bool = True,
) -> tuple[float, int]:
    """IFMR over every value of ``chunks`` (float32): ``(scale_d, offset_d)``; numpy twin of
    ``amct_caffe.quant.ifmr.ifmr_gathered``. inf/NaN or no data raise ValueError."""
    flat = [np.asarray(c, np.float32).ravel() for c in chunks if np.size(c)]
    if not flat:
        raise ValueError("IFMR calibration got no data.")
    x_all = np.concatenate(flat)
    if not np.isfinite(x_all).all():
        raise ValueError("IFMR: the calibration data contains inf or NaN values.")
    n = x_all.size
    k_max, k_min = _rank(n, max_percentile), _rank(n, min_percentile)
    vmax = np.partition(x_all, n - k_max)[n - k_max]
    vmin = np.partition(x_all, k_min - 1)[k_min - 1]
    vmax, vmin = np.float32(max(vmax, 0)), np.float32(min(vmin, 0))
    count = math.floor((search_end - search_start) / search_step + 1e-9)
    ratios = np.array([search_start + i * search_step for i in range(count + 1)], np.float32)
    if with_offset:
        cands = (ratios * vmax).astype(np.float32)
        scales, _ = _scale_offset(vmin, cands)
        lows = np.full_like(cands, vmin)
    else:
        cands = (ratios * np.float32(max(abs(vmax), abs(vmin)))).astype(np.float32)
        scales = _process_scale((cands / np.float32(127)).astype(np.float32))
        lows = -cands
    lo, hi, s = lows.reshape(-1, 1), cands.reshape(-1, 1), scales.reshape(-1, 1)
    losses = np.zeros(len(cands), np.float64)
    step = max(1, LOSS_BLOCK_ELEMENTS // len(cands))
    for x in flat:
        for start in range(0, x.size, step):
            block = x[start:start + step].reshape(1, -1)
            clipped = np.minimum(np.maximum(block, lo), hi)
            q = (round_away((clipped / s).astype(np.float32)) * s).astype(np.float32)
            d = (q - block).astype(np.float32)
            losses += np.sum(d * d, axis=1, dtype=np.float64)
    best = int(np.argmin(losses))
    if with_offset:
        s_best, o_best = _scale_offset(vmin, cands[best:best + 1])
        return float(s_best[0]), int(o_best[0])
    return float(scales[best]), 0


# -- the record file's text ---------------------------------------------------------------------------------
_TOKEN = re.compile(r'\s+|#[^\n]*|([{}:<>])|("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|([^\s{}:<>"\']+)')


def _tokens(text: str) -> list[str]:
    out = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"record text: cannot read it at offset {pos}")
        pos = match.end()
        token = match.group(1) or match.group(2) or match.group(3)
        if token:
            out.append(token)
    return out


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def parse_record_text(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The entries of a record file: ``[(layer, [(field, value text), ...]), ...]`` in file order.

    Raises:
        ValueError: the text is not a record file.
    """
    tokens = _tokens(text)
    entries: list[tuple[str, list[tuple[str, str]]]] = []
    i = 0

    def peek() -> str:
        if i >= len(tokens):
            raise ValueError("record text: it ends inside an entry")
        return tokens[i]

    def take(expected: str | None = None) -> str:
        nonlocal i
        token = peek()
        if expected is not None and token != expected:
            raise ValueError(f"record text: expected '{expected}', got '{token}' (token {i})")
        i += 1
        return token

    def optional_colon() -> None:
        if peek() == ":":
            take()

    while i < len(tokens):
        take("record")
        optional_colon()
        take("{")
        key, fields = "", []
        while peek() != "}":
            name = take()
            if name == "key":
                take(":")
                key = _unquote(take())
            elif name == "value":
                optional_colon()
                take("{")
                while peek() != "}":
                    field = take()
                    take(":")
                    fields.append((field, take()))
                take("}")
            else:
                raise ValueError(f"record text: unknown field '{name}' in a record entry")
        take("}")
        entries.append((key, fields))
    return entries


def record_text(entries: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> str:
    """The text of ``entries`` (fields in field-number order), as protobuf's text format lays it out."""
    order = {name: k for k, name in enumerate(RECORD_FIELDS)}
    lines = []
    for key, fields in entries:
        escaped = key.replace("\\", "\\\\").replace('"', '\\"')
        lines += ["record {", f'  key: "{escaped}"', "  value {"]
        for field, value in sorted(fields, key=lambda f: order.get(f[0], len(order))):
            lines.append(f"    {field}: {value}")
        lines += ["  }", "}"]
    return "\n".join(lines) + ("\n" if lines else "")


def update_record_text(path: str, updates: Mapping[str, Mapping[str, Any]]) -> None:
    """Set the given scalar fields of the given layers in the record file ``path`` (update or append;
    other fields and entries are kept), atomically. A missing file is created."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    entries = parse_record_text(text)
    for layer, values in updates.items():
        rendered = {name: _value_text(value) for name, value in values.items()}
        targets = [fields for key, fields in entries if key == layer]
        if not targets:
            entries.append((layer, []))
            targets = [entries[-1][1]]
        for fields in targets:
            fields[:] = [(f, v) for f, v in fields if f not in rendered] + list(rendered.items())
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(record_text(entries))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _value_text(value: Any) -> str:
    """A float as its shortest float32 text (the record's float fields are float32), an int as is."""
    if isinstance(value, float):
        return str(np.float32(value))
    return str(int(value))


# -- the layer -------------------------------------------------------------------------------------------
def _legacy_chw(shape: Sequence[int]) -> tuple[int, int, int] | None:
    if len(shape) > 4:
        return None
    dims = [int(d) for d in shape] + [1] * (4 - len(shape))
    return dims[1], dims[2], dims[3]


class _IFMRLogic(_FakeQuantLayer):
    """AMCT ``IFMR`` (AMCT reference §3.1-3.2): gathers its bottoms over ``batch_num`` forwards, then IFMR
    over all of them, then the record file (see the module docstring). No tops; nothing to propagate
    backwards."""

    type_name = "IFMR"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # From param_str, which Caffe sets after construction: parsed by setup.
        self.batch_num = 0
        self.object_layers: list[str] = []
        self.search: tuple[float, ...] = ()
        self.with_offset = True
        self.record_file_path = ""
        self.distinct: list[int] = []
        # The calibration's state: the gathered values, how many batches, the result once done.
        self.gathered: list[np.ndarray] = []
        self.batches_gathered = 0
        self.result: tuple[float, int, dict[str, tuple[int, int, int] | None]] | None = None

    def setup(self, bottom: Any, top: Any) -> None:
        if len(top) != 0 or len(bottom) < 1:
            raise ValueError(f"IFMR Python layer takes 1 or more bottoms and no top (got {len(bottom)} and "
                             f"{len(top)}).")
        params = self._params()
        batch_num = params.get("batch_num")
        if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num <= 0:
            raise ValueError(f"IFMR Python layer: batch_num must be an integer > 0, got {batch_num!r}.")
        self.batch_num = batch_num
        self.object_layers = [str(n) for n in params.get("object_layer", [])]
        if not self.object_layers or len(bottom) not in (1, len(self.object_layers)):
            raise ValueError("IFMR Python layer: give one object_layer name per bottom (or one bottom).")
        keys = ("max_percentile", "min_percentile", "search_range_start", "search_range_end", "search_step")
        self.search = tuple(float(params[k]) for k in keys)  # the five in ifmr_numpy's order
        self.with_offset = bool(params.get("with_offset", True))
        self.record_file_path = str(params.get("record_file_path", ""))
        self.distinct = [int(i) for i in params.get("distinct", range(len(bottom)))]
        self.gathered = []
        self.batches_gathered = 0
        self.result = None

    def reshape(self, bottom: Any, top: Any) -> None:
        """No tops to shape."""

    def forward(self, bottom: Any, top: Any) -> None:
        if self.result is not None:
            return
        if not self.batch_num:
            raise ValueError("IFMR Python layer: forward before setup (Caffe calls setup first).")
        self.gather(bottom)
        if self.batches_gathered == self.batch_num:
            self.result = self.calibrate(bottom)
            self.on_calibration_end()

    def gather(self, bottom: Any) -> None:
        """Step 1: keep a copy of this batch's values (each distinct bottom once)."""
        for i in self.distinct:
            self.gathered.append(np.array(bottom[i].data, dtype=np.float32).ravel())
        self.batches_gathered += 1

    def calibrate(self, bottom: Any) -> tuple[float, int, dict[str, tuple[int, int, int] | None]]:
        """Step 2: IFMR over every gathered value; the gathered data is released."""
        try:
            max_p, min_p, start, end, step = self.search
            s, o = ifmr_numpy(self.gathered, max_p, min_p, start, end, step, self.with_offset)
        finally:
            self.gathered = []
        shapes = {}
        for k, name in enumerate(self.object_layers):
            blob = bottom[k if len(bottom) == len(self.object_layers) else 0]
            shapes[name] = _legacy_chw(blob.data.shape)
        return s, o, shapes

    def on_calibration_end(self) -> None:
        """Step 3: the record file gets every object layer's factors and input shape."""
        if not self.record_file_path or self.result is None:
            return
        s, o, shapes = self.result
        updates: dict[str, dict[str, Any]] = {}
        for name, chw in shapes.items():
            fields: dict[str, Any] = {"scale_d": s, "offset_d": o}
            if chw is not None:
                fields.update(channels=chw[0], height=chw[1], width=chw[2])
            updates[name] = fields
        update_record_text(self.record_file_path, updates)

    def backward(self, top: Any, propagate_down: Any, bottom: Any) -> None:
        """Calibration has no gradient."""


class IFMR(_IFMRLogic, _caffe_layer_base()):  # type: ignore[misc]
    """Caffe Python layer ``amct_caffe.caffe.python_calibration.IFMR``; see :class:`_IFMRLogic`."""


def standalone_ifmr(param_str: str, phase: int = 1) -> Any:
    """An ``IFMR`` layer on the numpy stand-in base, usable without Caffe (``setup``/``forward`` with lists of
    ``python_layers.StandaloneBlob``)."""
    cls = type("IFMR", (_IFMRLogic, StandaloneLayer), {})
    return cls(param_str=param_str, phase=phase)
