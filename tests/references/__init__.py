"""Independent references for the tests: where every expected value that is not a hand computation comes from.

Each reference is written here once, from AMCT's and Caffe's documented behaviour (docs/design.md), as plain
numpy loops. ``quant``, ``layers``, ``metrics`` and ``records`` never import ``amct_caffe``, so an expected
value never comes from the code under test. The modules:

* ``quant``: rounding, ARQ, ULQ (forward, straight-through backward, ClipCheck), IFMR, the activation
  factors, the ``Quant``/AscendQuant codes and the deploy ``DeQuant``;
* ``layers``: Caffe's Convolution, Deconvolution, Pooling, InnerProduct, BatchNorm, Scale/Bias and the
  BatchNorm folding, in float64 (or int64 for the deploy model's integer arithmetic);
* ``metrics``: the agreement metrics of the per-layer report (cosine, SNR);
* ``records``: AMCT's documented example of a scale/offset record file;
* ``nets``: small test nets built in code (with the proto classes and the engine's shape inference, random
  filler and saving: they are inputs, not expected values), among them the post-training quantization
  tests' net, and the numpy forward of the digits demo net;
* ``real_caffe``: the real Caffe, run in a subprocess where it is installed.
"""
