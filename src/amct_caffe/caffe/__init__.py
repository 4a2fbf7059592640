"""pycaffe-compatible entry point: ``from amct_caffe import caffe`` then use it as ``import caffe``.

``caffe.Net``, the solvers (``caffe.SGDSolver``, ``NesterovSolver``, ``AdaGradSolver``, ``RMSPropSolver``,
``AdaDeltaSolver``, ``AdamSolver``, ``caffe.get_solver``), ``caffe.TRAIN``/``caffe.TEST``,
``caffe.set_mode_cpu()``/``set_mode_gpu()``/``set_device()``,
``caffe.set_random_seed()``, ``caffe.layer_type_list()``, ``caffe.io`` and ``caffe.proto.caffe_pb2`` (our
own generated schema, BVLC-compatible plus AMCT's extensions) run on the amct-caffe engine; no Caffe build
is involved.
"""

from amct_caffe.caffe import io, proto
from amct_caffe.runtime.device import set_device, set_mode_cpu, set_mode_gpu
from amct_caffe.runtime.fillers import set_random_seed
from amct_caffe.runtime.pycaffe import (
    TEST,
    TRAIN,
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    Blob,
    NesterovSolver,
    Net,
    RMSPropSolver,
    SGDSolver,
    get_solver,
    layer_type_list,
)

__all__ = [
    "TEST",
    "TRAIN",
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "Blob",
    "NesterovSolver",
    "Net",
    "RMSPropSolver",
    "SGDSolver",
    "get_solver",
    "io",
    "layer_type_list",
    "proto",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_random_seed",
]
