"""Engine layer implementations, one module per family, and the registry they fill.

Importing this package imports every family module, which registers its layers; import the registry's
functions from here (``from amct_caffe.engine.layers import layer_class``) so that the registry is full.
"""

from amct_caffe.engine.layers import (  # noqa: F401  (imported to register their layers)
    activation,
    calibration,
    data,
    data_sources,
    loss,
    normalization,
    python,
    quant,
    region,
    ssd,
    structure,
    vision,
)
from amct_caffe.engine.layers.registry import (
    DEFAULT_VARIANT,
    LayerVariant,
    layer_class,
    register,
    supported_types,
)

__all__ = ["DEFAULT_VARIANT", "LayerVariant", "layer_class", "register", "supported_types"]
