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
)

for _name in _MODULES:
    try:
        import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a family not written yet
        if _exc.name != f"{__name__}.{_name}":
            raise
