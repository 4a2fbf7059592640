"""pycaffe's ``caffe.net_spec``: write a net in Python and get its ``NetParameter``.

``from amct_caffe.caffe import layers as L, params as P, NetSpec`` (under ``amct-caffe exec``:
``from caffe import layers as L``)::

    n = NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64, ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    print(n.to_proto())

Naming follows pycaffe, so the text equals pycaffe's for the same script: a top takes the name of the
``NetSpec`` attribute it is assigned to, else ``<Type><count>``; a layer takes the name of its first top;
``in_place=True`` makes the layer write its bottoms; ``ntop=k`` gives k tops (0: the layer itself). Keyword
arguments ending in ``param`` set the ``LayerParameter`` field of that name; the others set the fields of
the layer type's own parameter message (``convolution_param`` for ``Convolution``) when it has one, else
the ``LayerParameter``'s. A list sets a repeated field; dicts (and lists of dicts) fill messages.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

from amct_caffe.proto import caffe_pb2

__all__ = ["Function", "Layers", "NetSpec", "Parameters", "Top", "layers", "params", "to_proto"]


def param_name_dict() -> dict[str, str]:
    """``{layer type: its parameter field without '_param'}``, read from the schema: the message type of
    each ``*_param`` field of ``LayerParameter`` names the type (``ConvolutionParameter`` ->
    ``Convolution``)."""
    names: dict[str, str] = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[: -len("Parameter")]] = field.name[: -len("_param")]
    return names


_PARAM_NAMES = param_name_dict()


def assign_proto(proto: Any, name: str, value: Any) -> None:
    """Set field ``name`` of ``proto`` from a Python value (pycaffe's rules; see the module docstring)."""
    field = getattr(proto, name)
    repeated = hasattr(field, "extend")
    if repeated and not isinstance(value, list):
        value = [value]
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for item in value:
                message = field.add()
                for key, sub_value in item.items():
                    assign_proto(message, key, sub_value)
        else:
            field.extend(value)
    elif isinstance(value, dict):
        for key, sub_value in value.items():
            assign_proto(field, key, sub_value)
    else:
        setattr(proto, name, value)


class Top:
    """Top ``n`` of a :class:`Function` (what ``L.Type(...)`` returns and layers take as bottoms)."""

    def __init__(self, fn: Function, n: int) -> None:
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The net of the layers this top depends on."""
        return to_proto(self)

    def _to_proto(self, layers: OrderedDict[Function, caffe_pb2.LayerParameter], names: dict[Any, str],
                  autonames: Counter[str]) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer of a net spec: its type, bottoms (:class:`Top`) and keyword parameters."""

    def __init__(self, type_name: str, inputs: tuple[Top, ...], params: dict[str, Any]) -> None:
        self.type_name = type_name
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = int(self.params.pop("ntop", 1))
        self.in_place = bool(self.params.pop("in_place", False))
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _top_name(self, top: Top, names: dict[Any, str], autonames: Counter[str]) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _name(self, names: dict[Any, str], autonames: Counter[str]) -> str:
        if self not in names:
            if self.ntop > 0:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _to_proto(self, layers: OrderedDict[Function, caffe_pb2.LayerParameter], names: dict[Any, str],
                  autonames: Counter[str]) -> None:
        if self in layers:
            return
        bottoms = []
        for top in self.inputs:
            top._to_proto(layers, names, autonames)
            bottoms.append(layers[top.fn].top[top.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._name(names, autonames)
        for key, value in self.params.items():
            if key.endswith("param"):
                assign_proto(layer, key, value)
                continue
            own = _PARAM_NAMES.get(self.type_name)
            try:
                if own is None:
                    raise AttributeError(key)
                assign_proto(getattr(layer, own + "_param"), key, value)
            except AttributeError:
                assign_proto(layer, key, value)
        layers[self] = layer


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """The net of the layers the given tops depend on, in dependency order (tops named automatically)."""
    layers: OrderedDict[Function, caffe_pb2.LayerParameter] = OrderedDict()
    autonames: Counter[str] = Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Tops by name: assign ``n.name = L.Type(...)``; :meth:`to_proto` names each top after its attribute."""

    def __init__(self) -> None:
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value: Any) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value: Any) -> None:
        self.tops[key] = value

    def __getitem__(self, item: str) -> Any:
        return self.tops[item]

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tops)

    def keys(self) -> list[str]:
        return list(self.tops)

    def vals(self) -> list[Any]:
        return list(self.tops.values())

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The net of every assigned top and what it depends on, in assignment order."""
        names: dict[Any, str] = {value: key for key, value in self.tops.items()}
        autonames: Counter[str] = Counter()
        layers: OrderedDict[Function, caffe_pb2.LayerParameter] = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``L.Type(*bottoms, **params)`` makes a layer of that type: one top, a tuple of ``ntop`` tops, or the
    layer itself for ``ntop=0``."""

    def __getattr__(self, name: str) -> Any:
        def layer_fn(*args: Top, **kwargs: Any) -> Any:
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        return layer_fn


class _EnumValues:
    """The enum values of one parameter message: ``P.Pooling.MAX``."""

    def __init__(self, message: str) -> None:
        self._message = message

    def __getattr__(self, name: str) -> Any:
        return getattr(getattr(caffe_pb2, self._message + "Parameter"), name)


class Parameters:
    """``P.Type.VALUE``: an enum value of ``TypeParameter`` (``P.Pooling.MAX``, ``P.Data.LMDB``)."""

    def __getattr__(self, name: str) -> _EnumValues:
        return _EnumValues(name)


layers = Layers()
params = Parameters()
