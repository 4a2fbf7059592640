"""amct-caffe: the Ascend Model Compression Toolkit for Caffe models, without a Caffe build.

``from amct_caffe import caffe`` gives a pycaffe-style facade over our own Caffe engine on PyTorch;
``from amct_caffe import amct`` (or ``import amct_caffe as amct``) gives AMCT's API.
"""

from __future__ import annotations

__version__ = "0.1.0"
