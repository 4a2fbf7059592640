"""``caffe.Layer``: the base class of pycaffe Python layers, for modules run by our engine.

A prototxt's ``type: "Python"`` layer names a module and a class; with the opt-in (``caffe.Net(...,
allow_python_layers=True)``, ``--allow-python-layers`` or ``AMCT_CAFFE_ALLOW_PYTHON_LAYERS=1``) the engine
imports it and runs it as pycaffe does (:mod:`amct_caffe.engine.layers.python`). A module written for
pycaffe starts with ``import caffe``; for this engine it writes ``from amct_caffe import caffe`` (or the
process installs ours under that name first: ``sys.modules.setdefault("caffe", amct_caffe.caffe)``).

This module imports nothing (no torch), so a layer module that only subclasses ``caffe.Layer`` stays light.
"""

from __future__ import annotations

from typing import Any

#: ``caffe.TEST``: the phase a layer sees until the engine sets its own.
_TEST = 1


class Layer:
    """pycaffe's ``caffe.Layer``: override ``setup``, ``reshape``, ``forward`` and (to train) ``backward``.

    The engine constructs the class with the ``LayerParameter``, then sets ``param_str`` (also as the
    older ``param_str_``), ``phase`` (``caffe.TRAIN``/``caffe.TEST``) and ``blobs`` (the learnable blobs:
    ``blobs.add_blob(*shape)``, ``blobs[i].data``/``.diff``). ``bottom`` and ``top`` are lists of blobs with
    numpy ``data``/``diff``, ``shape``, ``count``, ``num``/``channels``/``height``/``width`` and
    ``reshape(*shape)``.
    """

    def __init__(self, param: Any = None) -> None:
        self.param_str: str = ""
        self.param_str_: str = ""
        self.phase: int = _TEST
        self.blobs: Any = []
        #: The ``LayerParameter`` the layer was built from (None when built by hand).
        self.layer_param: Any = param

    def setup(self, bottom: Any, top: Any) -> None:
        """Called once, before the first ``reshape``; read ``self.param_str`` here."""

    def reshape(self, bottom: Any, top: Any) -> None:
        """Give every top its shape (``top[i].reshape(*shape)``); called before every ``forward``."""
        raise NotImplementedError(f"{type(self).__name__} must define reshape(bottom, top).")

    def forward(self, bottom: Any, top: Any) -> None:
        """Write ``top[i].data`` from ``bottom[i].data``."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(bottom, top).")

    def backward(self, top: Any, propagate_down: Any, bottom: Any) -> None:
        """Write ``bottom[i].diff`` where ``propagate_down[i]`` (and learnable blobs' ``diff``) from the top
        diffs; needed only when training goes through the layer."""
        raise NotImplementedError(f"{type(self).__name__} must define backward(top, propagate_down, bottom) "
                                  "to be trained through.")
