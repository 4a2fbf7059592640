"""amct-caffe: the Ascend Model Compression Toolkit for Caffe models, without a Caffe build.

``from amct_caffe import caffe`` gives a pycaffe-style facade over our own Caffe engine on PyTorch;
``from amct_caffe import amct`` (or ``import amct_caffe as amct``) gives AMCT's API.
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``import amct_caffe as amct; amct.create_quant_retrain_config(...)``: AMCT's API names resolve lazily
    to ``amct_caffe.amct`` (importing it on first use), so importing the package stays cheap. Submodule
    names (``amct``, ``caffe``, ...) are left to the import system."""
    import importlib.util

    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from amct_caffe import amct

    if name in amct.__all__:
        return getattr(amct, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
