"""Small self-contained demonstrations of amct-caffe that need no downloads.

:mod:`amct_caffe.demo.digits` trains the bundled LeNet-style net (``amct_caffe/data/lenet_digits.prototxt``)
on the 8x8 digit images shipped in ``amct_caffe/data/digits.npz`` (the UCI optical digits, as scikit-learn
ships them) with the engine's own solver, and evaluates any digits net (float, retrain, fake-quant) in the
engine. It needs the optional package ``h5py``; the report's plots need ``matplotlib``.
"""
