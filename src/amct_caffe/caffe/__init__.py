"""pycaffe-compatible entry point: ``from amct_caffe import caffe`` then use it as ``import caffe``.

``caffe.Net``, the solvers (``caffe.SGDSolver``, ``NesterovSolver``, ``AdaGradSolver``, ``RMSPropSolver``,
``AdaDeltaSolver``, ``AdamSolver``, ``caffe.get_solver``), ``caffe.TRAIN``/``caffe.TEST``,
``caffe.set_mode_cpu()``/``set_mode_gpu()``/``set_device()``,
``caffe.set_random_seed()``, ``caffe.layer_type_list()``, ``caffe.Layer``, ``caffe.io``, ``caffe.Classifier``,
``caffe.Detector``, ``caffe.NetSpec`` / ``caffe.layers`` / ``caffe.params``, ``caffe.draw`` and
``caffe.proto.caffe_pb2`` (our
own generated schema, BVLC-compatible plus AMCT's extensions) run on the amct-caffe engine; no Caffe build
is involved.

This package gathers everything pycaffe-shaped, laid out as real pycaffe is:

- ``pycaffe``: ``Net``, ``Blob`` and the solver classes over the engine;
- ``io``: blob <-> array conversion; ``proto``: the generated schema;
- ``layer``: ``caffe.Layer``, the base class of pycaffe Python layers (``type: "Python"``, run on opt-in);
- ``io``: blob <-> array conversion, images and ``Transformer``; ``proto``: the generated schema;
- ``classifier``, ``detector``: ``Classifier`` and ``Detector``; ``net_spec``: ``NetSpec``, ``layers``
  (``L``), ``params`` (``P``), ``to_proto``; ``draw``: graphs of nets (pydot, optional);
- ``script``: ``amct-caffe exec``, which runs an unchanged ``import caffe`` script on this facade;
- ``python_layers``: the fake-quant layers as Caffe Python layers for a *stock* pycaffe (numpy only);
- ``rewrite``: rewrites a fake-quant prototxt to use those Python layers.

The engine-backed names resolve on first use, so ``amct_caffe.caffe.python_layers`` can be imported by a
stock pycaffe without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names __getattr__ resolves, for type checkers (importing them here would load torch)
    from amct_caffe.caffe import draw as draw
    from amct_caffe.caffe import io as io
    from amct_caffe.caffe import net_spec as net_spec
    from amct_caffe.caffe import proto as proto
    from amct_caffe.caffe.classifier import Classifier as Classifier
    from amct_caffe.caffe.detector import Detector as Detector
    from amct_caffe.caffe.layer import Layer as Layer
    from amct_caffe.caffe.net_spec import NetSpec as NetSpec
    from amct_caffe.caffe.net_spec import layers as layers
    from amct_caffe.caffe.net_spec import params as params
    from amct_caffe.caffe.net_spec import to_proto as to_proto
    from amct_caffe.caffe.pycaffe import TEST as TEST
    from amct_caffe.caffe.pycaffe import TRAIN as TRAIN
    from amct_caffe.caffe.pycaffe import AdaDeltaSolver as AdaDeltaSolver
    from amct_caffe.caffe.pycaffe import AdaGradSolver as AdaGradSolver
    from amct_caffe.caffe.pycaffe import AdamSolver as AdamSolver
    from amct_caffe.caffe.pycaffe import Blob as Blob
    from amct_caffe.caffe.pycaffe import NesterovSolver as NesterovSolver
    from amct_caffe.caffe.pycaffe import Net as Net
    from amct_caffe.caffe.pycaffe import RMSPropSolver as RMSPropSolver
    from amct_caffe.caffe.pycaffe import SGDSolver as SGDSolver
    from amct_caffe.caffe.pycaffe import get_solver as get_solver
    from amct_caffe.caffe.pycaffe import layer_type_list as layer_type_list
    from amct_caffe.caffe.pycaffe import set_device as set_device
    from amct_caffe.caffe.pycaffe import set_mode_cpu as set_mode_cpu
    from amct_caffe.caffe.pycaffe import set_mode_gpu as set_mode_gpu
    from amct_caffe.caffe.pycaffe import set_random_seed as set_random_seed

# public name -> module that defines it
_EXPORTS = {
    "TEST": "pycaffe",
    "TRAIN": "pycaffe",
    "AdaDeltaSolver": "pycaffe",
    "AdaGradSolver": "pycaffe",
    "AdamSolver": "pycaffe",
    "Blob": "pycaffe",
    "Layer": "layer",
    "NesterovSolver": "pycaffe",
    "Net": "pycaffe",
    "RMSPropSolver": "pycaffe",
    "SGDSolver": "pycaffe",
    "get_solver": "pycaffe",
    "layer_type_list": "pycaffe",
    "set_device": "pycaffe",
    "set_mode_cpu": "pycaffe",
    "set_mode_gpu": "pycaffe",
    "set_random_seed": "pycaffe",
    "Classifier": "classifier",
    "Detector": "detector",
    "NetSpec": "net_spec",
    "layers": "net_spec",
    "params": "net_spec",
    "to_proto": "net_spec",
}
_SUBMODULES = ("draw", "io", "net_spec", "proto")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
