"""The registry of layer implementations, keyed by Caffe type string and variant.

Each Caffe type has one default implementation (the float layer a Caffe net runs) and may have *variants*:
other implementations of the same type that a net builds for the layers it names. The deploy model's
integer layers are such variants (registered as ``"integer"`` by :mod:`amct_caffe.emulation.integer`), so a
net that runs them is built with them from the start instead of having layers swapped in afterwards. A
variant a type does not have falls back to the type's default implementation.

Registering the same type and variant twice is an error: two modules would silently disagree about which
class runs a layer.

A user's own layers (:func:`amct_caffe.engine.layers.custom.register_layer`) live beside the built-in ones:
a built-in type cannot be replaced, a user type can be registered again (the new class wins), and
:func:`supported_types` lists the built-in types only (:func:`user_types` the others).

Use the names through :mod:`amct_caffe.engine.layers`, whose import registers every layer family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from amct_caffe.engine.layers.base import Layer
from amct_caffe.errors import UnsupportedLayerError

#: The variant every type has: the float layer of Caffe.
DEFAULT_VARIANT = "default"

_REGISTRY: dict[tuple[str, str], type[Layer]] = {}
_USER: dict[str, type[Layer]] = {}


@dataclass(frozen=True)
class LayerVariant:
    """Which implementation of its type a net builds for a layer, and the options its constructor takes.

    Attributes:
        name: the registered variant (:data:`DEFAULT_VARIANT` for the float layer).
        options: keyword options for the implementation's :meth:`~amct_caffe.engine.layers.base.Layer.create`
            (e.g. the integer Quant's ``formula``); a layer without options refuses any.
    """

    name: str = DEFAULT_VARIANT
    options: Mapping[str, object] = field(default_factory=dict)


def register(*type_names: str, variant: str = DEFAULT_VARIANT) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: register a layer implementation under one or more Caffe type strings.

    Args:
        type_names: the Caffe types the class implements (the first becomes its ``type_name`` unless the
            class sets one).
        variant: the variant it implements (default: the type's default implementation).

    Raises:
        RuntimeError: a type already has an implementation for ``variant``.
    """
    if not type_names:
        raise RuntimeError("register() needs at least one Caffe type string")

    def wrap(cls: type[Layer]) -> type[Layer]:
        for name in type_names:
            other = _REGISTRY.get((name, variant))
            if other is not None:
                raise RuntimeError(
                    f"layer type {name!r} (variant {variant!r}) registered twice: by "
                    f"{other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                )
        for name in type_names:
            _REGISTRY[(name, variant)] = cls
        if not cls.type_name:
            cls.type_name = type_names[0]
        return cls

    return wrap


def layer_class(
    type_name: str, layer_name: str = "", path: str = "", variant: str = DEFAULT_VARIANT
) -> type[Layer]:
    """The implementation of a Caffe type: its ``variant`` when registered, else its default one.

    Args:
        type_name: the Caffe type string.
        layer_name, path: name the layer and file in the error.
        variant: the wanted variant.

    Raises:
        UnsupportedLayerError: the engine implements no such type.
    """
    cls = (_REGISTRY.get((type_name, variant)) or _REGISTRY.get((type_name, DEFAULT_VARIANT))
           or _USER.get(type_name))
    if cls is None:
        where = f" in '{path}'" if path else ""
        raise UnsupportedLayerError(
            f"Layer '{layer_name}'{where} has type '{type_name}', which the amct-caffe engine does not "
            f"implement. Supported types: {', '.join(supported_types())}; a layer of your own can be "
            "registered with amct_caffe.register_layer (README, 'Your own layers')."
        )
    return cls


def register_user(type_name: str, cls: type[Layer]) -> None:
    """Register a user's layer class under ``type_name`` (replacing an earlier user class of that type).

    Raises:
        ValueError: ``type_name`` is empty or a built-in type.
    """
    if not type_name:
        raise ValueError("register_layer needs a non-empty Caffe type string")
    if any(name == type_name for name, _ in _REGISTRY):
        raise ValueError(f"'{type_name}' is a built-in layer type of the engine; give your layer another "
                         "type.")
    _USER[type_name] = cls


def unregister_user(type_name: str) -> None:
    """Forget the user's layer of ``type_name`` (nothing happens if there is none)."""
    _USER.pop(type_name, None)


def user_types() -> list[str]:
    """The types of the user's registered layers, sorted."""
    return sorted(_USER)


def supported_types() -> list[str]:
    """Every Caffe type string the engine implements (by its default implementation), sorted."""
    return sorted(name for name, variant in _REGISTRY if variant == DEFAULT_VARIANT)

