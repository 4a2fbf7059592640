"""``caffe.proto.caffe_pb2``: our generated Caffe schema, importable under pycaffe's module path too."""

import sys

from amct_caffe.proto import caffe_pb2

# ``from amct_caffe.caffe.proto.caffe_pb2 import NetParameter`` works like pycaffe's module path.
sys.modules[__name__ + ".caffe_pb2"] = caffe_pb2

__all__ = ["caffe_pb2"]
