"""Protobuf schemas: ``caffe_pb2`` (BVLC Caffe + AMCT's custom layers) and ``amct_pb2`` (record and
config files). The ``*_pb2.py`` modules are generated from the ``.proto`` files beside them by
``scripts/gen_proto.py``."""

from amct_caffe.proto import amct_pb2, caffe_pb2

__all__ = ["amct_pb2", "caffe_pb2"]
