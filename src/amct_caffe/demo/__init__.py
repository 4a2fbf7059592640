"""Small self-contained demonstrations of amct-caffe that need no downloads.

:mod:`amct_caffe.demo.digits` trains the bundled LeNet-style net (``amct_caffe/data/lenet_digits.prototxt``)
on scikit-learn's bundled 8x8 digit images with the engine's own solver, and evaluates any digits net
(float, retrain, fake-quant) in the engine. It needs the optional packages ``scikit-learn`` and ``h5py``.
"""
