"""Engine layer implementations, one module per family; importing this package registers them all."""

from importlib import import_module

_MODULES = (
    "data",
    "vision",
    "activation",
    "normalization",
    "structure",
    "loss",
    "ssd",
    "data_sources",
    "quant",
    "calibration",
)

for _name in _MODULES:
    import_module(f"{__name__}.{_name}")
