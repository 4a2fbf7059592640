"""The graph IR that passes edit: a V2 net's layers with producers, consumers and in-place blobs resolved.

Caffe names values by blob name and lets an in-place layer (top == bottom) overwrite a name. The graph
resolves this once: every bottom of every layer refers to the *producer* layer that last wrote that name
before it. Passes edit the net only through the named helpers here, then read the result back as a
``NetParameter``; the producer/consumer maps are recomputed after every edit, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from amct_caffe.errors import ModelFormatError
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
        self._index()

    # -- reading -----------------------------------------------------------------------------------
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
            raise ModelFormatError(f"{self._where()}has no layer '{name}'.") from None

    def index(self, name: str) -> int:
        self.layer(name)
        return self._by_name[name]

    def producer(self, layer_name: str, bottom_index: int = 0) -> caffe_pb2.LayerParameter | None:
        """The layer whose output ``layer_name`` reads as bottom ``bottom_index`` (None: no producer)."""
        idx = self._bottom_producer[self.index(layer_name)][bottom_index]
        return None if idx is None else self.net.layer[idx]

    def blob_producer(self, blob: str) -> caffe_pb2.LayerParameter | None:
        """The layer that first creates blob ``blob`` (not an in-place rewriter of it)."""
        for layer in self.net.layer:
            if blob in layer.top and blob not in layer.bottom:
                return layer
        return None

    def consumers(self, layer_name: str, top_index: int = 0) -> list[tuple[caffe_pb2.LayerParameter, int]]:
        """Every (layer, bottom index) that reads the value ``layer_name`` writes as top ``top_index``.

        An in-place layer that reads the value is a consumer; layers after it read the in-place layer's
        value instead, so they are not.
        """
        key = (self.index(layer_name), top_index)
        return [(self.net.layer[li], bi) for li, bi in self._consumers.get(key, [])]

    def blob_consumers(self, blob: str) -> list[caffe_pb2.LayerParameter]:
        """Every layer that has ``blob`` as a bottom (any in-place version of it)."""
        return [layer for layer in self.net.layer if blob in layer.bottom]

    def in_place(self, layer_name: str) -> bool:
        """True when the layer writes one of its bottoms' names (Caffe computes it in place)."""
        layer = self.layer(layer_name)
        return any(top in layer.bottom for top in layer.top)

    def in_place_chain(self, layer_name: str, top_index: int = 0) -> list[caffe_pb2.LayerParameter]:
        """The in-place layers that follow ``layer_name`` on its top, in order (e.g. BatchNorm, ReLU)."""
        chain: list[caffe_pb2.LayerParameter] = []
        current, index = layer_name, top_index
        blob = self.layer(layer_name).top[top_index]
        while True:
            followers = [
                (layer, bi)
                for layer, bi in self.consumers(current, index)
                if blob in layer.top and layer.bottom[bi] == blob
            ]
            if not followers:
                return chain
            nxt = followers[0][0]
            chain.append(nxt)
            current, index = nxt.name, list(nxt.top).index(blob)

    def topological_order(self) -> list[str]:
        """Layer names in an order where every producer precedes its consumers (stable w.r.t. file order)."""
        n = len(self.net.layer)
        indegree = [0] * n
        edges: dict[int, list[int]] = {}
        # A bottom no earlier layer writes (a layer placed too early by an edit) depends on the layer that
        # creates that blob anywhere in the net.
        creators: dict[str, int] = {}
        for li, layer in enumerate(self.net.layer):
            for top in layer.top:
                if top not in layer.bottom:
                    creators.setdefault(top, li)
        for li, producers in enumerate(self._bottom_producer):
            resolved = {
                p if p is not None else creators.get(self.net.layer[li].bottom[bi])
                for bi, p in enumerate(producers)
            }
            for p in {p for p in resolved if p is not None and p != li}:
                edges.setdefault(p, []).append(li)
                indegree[li] += 1
        ready = [i for i in range(n) if indegree[i] == 0]
        order: list[int] = []
        while ready:
            ready.sort()
            i = ready.pop(0)
            order.append(i)
            for j in edges.get(i, []):
                indegree[j] -= 1
                if indegree[j] == 0:
                    ready.append(j)
        if len(order) != n:
            raise ModelFormatError(f"{self._where()}has a cycle between its layers.")
        return [self.net.layer[i].name for i in order]

    # -- editing ------------------------------------------------------------------------------------
    def insert_before(self, anchor: str, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        """Insert a copy of ``layer`` just before layer ``anchor``; returns the inserted message."""
        return self._insert(self.index(anchor), layer)

    def insert_after(self, anchor: str, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        """Insert a copy of ``layer`` just after layer ``anchor``; returns the inserted message."""
        return self._insert(self.index(anchor) + 1, layer)

    def append(self, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        return self._insert(len(self.net.layer), layer)

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
            raise ModelFormatError(
                f"{self._where()}cannot remove layer '{name}' and reconnect it: it has {len(layer.top)} tops."
            )
        del self.net.layer[idx]
        self._index()

    def replace_bottom(self, layer_name: str, old: str, new: str) -> None:
        """Make layer ``layer_name`` read blob ``new`` wherever it read ``old``."""
        layer = self.layer(layer_name)
        if old not in layer.bottom:
            raise ModelFormatError(f"{self._where()}layer '{layer_name}' has no bottom '{old}'.")
        for i, b in enumerate(layer.bottom):
            if b == old:
                layer.bottom[i] = new
        self._index()

    def rename_top(self, layer_name: str, old: str, new: str, update_readers: bool = True) -> None:
        """Rename top ``old`` of a layer to ``new`` (and, by default, the bottoms that read that value)."""
        idx = self.index(layer_name)
        layer = self.net.layer[idx]
        if old not in layer.top:
            raise ModelFormatError(f"{self._where()}layer '{layer_name}' has no top '{old}'.")
        if update_readers:
            self._rename_reads_from(idx + 1, old, new)
        for i, t in enumerate(layer.top):
            if t == old:
                layer.top[i] = new
        self._index()

    def replace_layer(self, name: str, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        """Replace layer ``name`` in place by a copy of ``layer``."""
        idx = self.index(name)
        self.net.layer[idx].CopyFrom(layer)
        self._index()
        return self.net.layer[idx]

    def to_net_parameter(self) -> caffe_pb2.NetParameter:
        """A copy of the edited net."""
        out = caffe_pb2.NetParameter()
        out.CopyFrom(self.net)
        return out

    # -- internals -----------------------------------------------------------------------------------
    def _insert(self, position: int, layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
        if layer.name in self._by_name:
            raise ModelFormatError(f"{self._where()}already has a layer named '{layer.name}'.")
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
        self._by_name: dict[str, int] = {}
        self._bottom_producer: list[list[int | None]] = []
        self._consumers: dict[tuple[int, int], list[tuple[int, int]]] = {}
        writer: dict[str, tuple[int, int]] = {}
        for li, layer in enumerate(self.net.layer):
            if layer.name in self._by_name:
                raise ModelFormatError(f"{self._where()}has two layers named '{layer.name}'.")
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

    def _where(self) -> str:
        return f"Net '{self.path or self.net.name}' "


def layers_of_type(graph: Graph, types: Iterable[str]) -> list[caffe_pb2.LayerParameter]:
    """The layers whose Caffe type is one of ``types``, in file order."""
    wanted = set(types)
    return [layer for layer in graph if layer.type in wanted]


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
