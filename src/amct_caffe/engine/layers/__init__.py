"""Engine layer implementations, one module per family, and the registry they fill.

Importing this package imports every family module, which registers its layers; import the registry's
functions from here (``from amct_caffe.engine.layers import layer_class``) so that the registry is full.
"""

from amct_caffe.engine.layers import (  # noqa: F401  (imported to register their layers)
    activation,
    calibration,
    custom,
    data,
    data_sources,
    fork,
    loss,
    normalization,
    param_str,
    python,
    quant,
    region,
    ssd,
    structure,
    vision,
)
from amct_caffe.engine.layers.custom import CustomLayer, register_layer, unregister_layer
from amct_caffe.engine.layers.python import allow_python_layers
from amct_caffe.engine.layers.registry import (
    DEFAULT_VARIANT,
    LayerVariant,
    layer_class,
    register,
    supported_types,
    user_types,
)

__all__ = [
    "DEFAULT_VARIANT", "CustomLayer", "LayerVariant", "allow_python_layers", "layer_class", "register",
    "register_layer", "supported_types", "unregister_layer", "user_types",
]
