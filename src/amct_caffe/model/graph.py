"""The graph IR that passes edit: a V2 net's layers with producers, consumers and in-place blobs resolved.

Caffe names values by blob name and lets an in-place layer (top == bottom) overwrite a name. The graph
resolves this once: every bottom of every layer refers to the *producer* layer that last wrote that name
before it. Passes edit the net only through the named helpers here, then read the result back as a
``NetParameter``; the producer/consumer maps are recomputed after every edit, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from amct_caffe.errors import DuplicateLayerNameError, ModelFormatError, model_where
from amct_caffe.proto import caffe_pb2


class Graph:
    """An editable view of a V2 ``NetParameter``.

    Args:
        net: the net; the graph works on a copy.
        path: the file the net came from, for error messages.
    """

    def __init__(self, net: caffe_pb2.NetParameter, path: str = "") -> None:
        self.net = caffe_pb2.NetParameter()
        self.net.CopyFrom(net)
        self.path = path
        #: Derived from ``self.net`` by :meth:`_index` after every edit: layer index by name, the producer
        #: (layer index or None) of each bottom of each layer, and the readers (layer, bottom index) of each
        #: (layer, top index).
        self._by_name: dict[str, int] = {}
        self._bottom_producer: list[list[int | None]] = []
        self._consumers: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._index()

    # -- reading -----------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """How messages name this net: its file, or its name when it came from no file."""
        return self.path or self.net.name

    @property
    def layers(self) -> list[caffe_pb2.LayerParameter]:
        """The layers in execution (file) order; the entries are live messages of ``self.net``."""
        return list(self.net.layer)

    def __iter__(self) -> Iterator[caffe_pb2.LayerParameter]:
        return iter(self.net.layer)

    def __len__(self) -> int:
        return len(self.net.layer)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def layer(self, name: str) -> caffe_pb2.LayerParameter:
        """The layer called ``name``; ModelFormatError if there is none."""
        try:
            return self.net.layer[self._by_name[name]]
        except KeyError:
            raise self._error(f"has no layer '{name}'.") from None

    def index(self, name: str) -> int:
        self.layer(name)
        return self._by_name[name]

    def producer(self, layer_name: str, bottom_index: int = 0) -> caffe_pb2.LayerParameter | None:
        """The layer whose output ``layer_name`` reads as bottom ``bottom_index`` (None: no producer)."""
        idx = self._bottom_producer[self.index(layer_name)][bottom_index]
        return None if idx is None else self.net.layer[idx]

    def consumers(self, layer_name: str, top_index: int = 0) -> list[tuple[caffe_pb2.LayerParameter, int]]:
        """Every (layer, bottom index) that reads the value ``layer_name`` writes as top ``top_index``.

        An in-place layer that reads the value is a consumer; layers after it read the in-place layer's
        value instead, so they are not.
        """
        key = (self.index(layer_name), top_index)
        return [(self.net.layer[li], bi) for li, bi in self._consumers.get(key, [])]

    # -- editing ------------------------------------------------------------------------------------
    def insert_before(self, anchor: str, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        """Insert a copy of ``layer`` just before layer ``anchor``; returns the inserted message."""
        return self._insert(self.index(anchor), layer)

    def insert_after(self, anchor: str, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        """Insert a copy of ``layer`` just after layer ``anchor``; returns the inserted message."""
        return self._insert(self.index(anchor) + 1, layer)

    def remove_layer(self, name: str, reconnect: bool = True) -> None:
        """Delete layer ``name``.

        With ``reconnect`` (single bottom, single top), the readers of its output read its input instead:
        later bottoms named like its top are renamed to its bottom until another layer rewrites that name.
        """
        idx = self.index(name)
        layer = self.net.layer[idx]
        if reconnect and len(layer.top) == 1 and len(layer.bottom) == 1 and layer.top[0] != layer.bottom[0]:
            self._rename_reads_from(idx + 1, layer.top[0], layer.bottom[0])
        elif reconnect and len(layer.top) > 1:
            raise self._error(f"cannot remove layer '{name}' and reconnect it: it has {len(layer.top)} tops.")
        del self.net.layer[idx]
        self._index()

    def replace_bottom(self, layer_name: str, old: str, new: str) -> None:
        """Make layer ``layer_name`` read blob ``new`` wherever it read ``old``."""
        layer = self.layer(layer_name)
        if old not in layer.bottom:
            raise self._error(f"layer '{layer_name}' has no bottom '{old}'.")
        for i, b in enumerate(layer.bottom):
            if b == old:
                layer.bottom[i] = new
        self._index()

    def rename_top(self, layer_name: str, old: str, new: str, update_readers: bool = True) -> None:
        """Rename top ``old`` of a layer to ``new`` (and, by default, the bottoms that read that value)."""
        idx = self.index(layer_name)
        layer = self.net.layer[idx]
        if old not in layer.top:
            raise self._error(f"layer '{layer_name}' has no top '{old}'.")
        if update_readers:
            self._rename_reads_from(idx + 1, old, new)
        for i, t in enumerate(layer.top):
            if t == old:
                layer.top[i] = new
        self._index()

    def to_net_parameter(self) -> caffe_pb2.NetParameter:
        """A copy of the edited net."""
        out = caffe_pb2.NetParameter()
        out.CopyFrom(self.net)
        return out

    # -- internals -----------------------------------------------------------------------------------
    def _insert(self, position: int, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        if layer.name in self._by_name:
            raise self._error(f"already has a layer named '{layer.name}'.")
        new = self.net.layer.add()
        new.CopyFrom(layer)
        # move the new last element to ``position`` by rotating the tail
        layers = list(self.net.layer)
        moved = [caffe_pb2.LayerParameter() for _ in layers[position:]]
        for dst, src in zip(moved, [layers[-1]] + layers[position:-1]):
            dst.CopyFrom(src)
        del self.net.layer[position:]
        self.net.layer.extend(moved)
        self._index()
        return self.net.layer[position]

    def _rename_reads_from(self, start: int, old: str, new: str) -> None:
        """Rename bottoms ``old`` -> ``new`` from layer ``start`` on, until a layer writes ``old`` again.

        A layer that rewrites ``old`` (in place or not) keeps its top name: its readers read its value,
        and renaming an in-place top would change what other readers of ``new`` see.
        """
        for layer in self.net.layer[start:]:
            for i, b in enumerate(layer.bottom):
                if b == old:
                    layer.bottom[i] = new
            if old in layer.top:
                return

    def _index(self) -> None:
        self._by_name = {}
        self._bottom_producer = []
        self._consumers = {}
        writer: dict[str, tuple[int, int]] = {}
        for li, layer in enumerate(self.net.layer):
            if layer.name in self._by_name:
                first = self.net.layer[self._by_name[layer.name]]
                raise DuplicateLayerNameError(
                    f"{model_where(self.label, 'Net')} has two layers named '{layer.name}': layer "
                    f"{self._by_name[layer.name]} (type {first.type}) and layer {li} (type {layer.type}). "
                    "Quantization configs and record files name layers, so each name must be used once in a "
                    "phase: rename one of the two in the prototxt. (A caffemodel's weights of that name load "
                    "into the first, as in Caffe.)"
                )
            self._by_name[layer.name] = li
            producers: list[int | None] = []
            for bi, blob in enumerate(layer.bottom):
                src = writer.get(blob)
                producers.append(None if src is None else src[0])
                if src is not None:
                    self._consumers.setdefault(src, []).append((li, bi))
            self._bottom_producer.append(producers)
            for ti, top in enumerate(layer.top):
                writer[top] = (li, ti)

    def _error(self, message: str) -> ModelFormatError:
        """A ModelFormatError that names this net (``Net 'file' <message>``)."""
        return ModelFormatError(f"{model_where(self.label, 'Net')} {message}")


# -- the same producer/reader rule on a plain layer list (nets that are read, not edited) -------------------
def producer_index(layers: Sequence[caffe_pb2.LayerParameter], index: int, blob: str) -> int | None:
    """Index of the layer whose output layer ``index`` reads as ``blob``: the last layer before ``index``
    that writes ``blob`` (an in-place layer counts), or None when no earlier layer writes it."""
    for j in range(index - 1, -1, -1):
        if blob in layers[j].top:
            return j
    return None


def value_readers(layers: Sequence[caffe_pb2.LayerParameter], index: int, blob: str) -> list[int]:
    """Indices of the layers after ``index`` that read the value ``blob`` holds after layer ``index``.

    A layer that writes ``blob`` ends that value: an in-place layer reads it (and is listed), a layer that
    writes ``blob`` without reading it is not.
    """
    out = []
    for j in range(index + 1, len(layers)):
        if blob in layers[j].bottom:
            out.append(j)
        if blob in layers[j].top:
            break
    return out
