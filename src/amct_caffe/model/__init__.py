"""Caffe files <-> graph: prototxt/caffemodel I/O, V1 upgrade, phase filtering, the graph IR."""

from amct_caffe.model.io import (
    atomic_write,
    load_caffemodel,
    load_prototxt,
    save_caffemodel,
    save_prototxt,
)
from amct_caffe.model.phase import filter_net

__all__ = [
    "atomic_write",
    "filter_net",
    "load_caffemodel",
    "load_prototxt",
    "save_caffemodel",
    "save_prototxt",
]
