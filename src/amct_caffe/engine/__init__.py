"""The Caffe engine on PyTorch: a net of registered layers, its fast TEST forward, solvers and data input.

It knows Caffe's files only through :mod:`amct_caffe.model` and AMCT's numerics only through
:mod:`amct_caffe.quant`; it never imports the deploy emulation, the analysis code or the workflows.
"""
