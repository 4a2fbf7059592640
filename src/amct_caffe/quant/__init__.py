"""Quantization numerics and algorithms as pure functions on tensors.

No graphs and no torch modules here; only the config module reads protobuf text.

* :mod:`amct_caffe.quant.numerics` -- rounding, INT8 quantize/dequantize, activation factors from clip
  bounds, scale sanitising, bias quantization and ``deq_scale`` packing
  (docs/amct-reference.md §1.4, §7.3, §8.1, §8.3).
* :mod:`amct_caffe.quant.arq` -- ARQ symmetric weight quantization (AMCT reference §3.6, §8.2).
* :mod:`amct_caffe.quant.ulq` -- ULQ activation retrain forward/backward and ClipCheck
  (AMCT reference §3.4, §3.5).
* :mod:`amct_caffe.quant.ifmr` -- IFMR activation calibration (AMCT reference §8.4).
* :mod:`amct_caffe.quant.config` -- the quantization configs (AMCT reference §4).
"""
