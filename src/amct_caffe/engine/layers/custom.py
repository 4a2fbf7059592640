"""Layers of the user's own, in plain Python and torch: no Caffe to patch, nothing to compile.

A layer type that no Caffe knows is one class registered under its type string::

    @amct_caffe.register_layer("ScaledTanh")
    class ScaledTanh(amct_caffe.CustomLayer):
        def forward(self, bottoms):
            return [float(self.params.get("alpha", 1.0)) * torch.tanh(bottoms[0])]

and a prototxt uses it as any layer: ``layer { name: "act" type: "ScaledTanh" bottom: "x" top: "y"
python_param { param_str: "alpha: 2" } }``. The class follows the engine's layer contract
(:class:`~amct_caffe.engine.layers.base.Layer`): ``setup(bottoms)`` creates learnable blobs with
``self.new_blob(shape, filler)`` (they load from and save to caffemodels by layer name, and train with the
solver); ``forward(bottoms)`` returns the tops from differentiable torch operations, so training needs no
backward of its own.

The parameters come from ``python_param.param_str`` (:attr:`CustomLayer.params`; JSON, a Python dict
literal or YAML-style ``key: value`` pairs, never evaluated as code). A ``custom_param { ... }`` message
of the user's own cannot be written instead: a text prototxt names only fields of the schema, and every
Caffe (and ATC) refuses unknown ones; ``python_param`` is a field every layer may carry.

Quantization leaves such layers float: AMCT quantizes only Convolution, Deconvolution, InnerProduct and
AVE Pooling, so QAT and PTQ run through a net with custom layers and write them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from amct_caffe.engine.layers.base import Layer
from amct_caffe.engine.layers.param_str import parse_param_str
from amct_caffe.engine.layers.registry import register_user, unregister_user, user_types
from amct_caffe.proto import caffe_pb2

__all__ = ["CustomLayer", "register_layer", "unregister_layer", "user_types"]

L = TypeVar("L", bound=type[Layer])


class CustomLayer(Layer):
    """Base class of a layer of your own (see the module docstring).

    Attributes:
        params: ``python_param.param_str`` read as a mapping (empty when there is none).
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        self.params: dict[str, object] = parse_param_str(
            param.python_param.param_str, f"Layer '{param.name}' (type {param.type})"
        )


def register_layer(type_name: str) -> Callable[[L], L]:
    """Class decorator: the engine runs layers of Caffe type ``type_name`` with the decorated class.

    Args:
        type_name: the ``type`` string the prototxt uses; registering it again replaces the class.

    Returns:
        The decorator, which returns the class unchanged (its ``type_name`` set to ``type_name``).

    Raises:
        ValueError: ``type_name`` is empty or one of the engine's built-in types.
        TypeError: the decorated object is not a subclass of the engine's ``Layer`` (e.g. ``CustomLayer``).
    """

    def wrap(cls: L) -> L:
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise TypeError(f"register_layer('{type_name}') decorates a subclass of amct_caffe.CustomLayer, "
                            f"got {cls!r}.")
        register_user(type_name, cls)
        cls.type_name = type_name
        return cls

    return wrap


def unregister_layer(type_name: str) -> None:
    """Forget the layer registered for ``type_name`` by :func:`register_layer` (no error if none)."""
    unregister_user(type_name)
