"""The element limits of :mod:`amct_caffe.model.limits`, enforced while a net infers its shapes.

The engine has no shape functions apart from the layers themselves: the shape pass runs every layer once on
placeholder values. A layer parameter such as ``num_output: 2147483648`` or ``tiles: 2000000000`` would
make that pass allocate tens of gigabytes (or, with overcommitted memory, fill the machine). So during the
shape pass every torch operation first runs on the ``meta`` device, which computes output shapes and
allocates nothing; an output above the per-blob limit is an error naming the layer before any real memory
is taken. An operation that has no meta implementation (or reads a value, like ``.item()``) runs as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from amct_caffe.errors import BlobSizeError
from amct_caffe.model.limits import MAX_ELEMENTS_ENV, MAX_NET_ELEMENTS_ENV

_META = torch.device("meta")


class _Overflow:
    """Stands for the outputs of an operation whose sizes overflowed torch's integers on the meta device."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _to_meta(value: Any) -> Any:
    return value.to(_META) if isinstance(value, torch.Tensor) else value


class AllocationGuard(TorchDispatchMode):
    """Within the block, refuse any torch operation whose output has more than ``limit`` elements.

    Args:
        limit: the most elements one tensor may have.
        label: names the net in messages.

    ``layer`` (set by the caller before each layer runs) is the ``Layer 'x' (type T)`` the messages name.
    """

    def __init__(self, limit: int, label: str) -> None:
        super().__init__()
        self.limit = limit
        self.label = label
        self.layer = ""

    def __torch_dispatch__(self, func: Callable[..., Any], types: Sequence[type],
                           args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        self._check(self._meta_outputs(func, args, kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def _meta_outputs(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
        """The outputs ``func`` would give, computed on the meta device; empty when that cannot be told."""
        meta_kwargs = tree_map(_to_meta, kwargs)
        if "device" in meta_kwargs:
            meta_kwargs["device"] = _META
        try:
            outputs = func(*tree_map(_to_meta, tuple(args)), **meta_kwargs)
        except RuntimeError as exc:
            if "overflow" in str(exc):
                # a size that does not fit torch's integers: the real operation would fail or exhaust memory
                return [_Overflow(str(exc).strip().splitlines()[0])]
            return []  # no meta kernel, or a data-dependent op: run it for real
        except Exception:  # noqa: BLE001 -- as above
            return []
        return tree_flatten(outputs)[0]

    def _check(self, outputs: Sequence[Any]) -> None:
        for value in outputs:
            if isinstance(value, _Overflow):
                raise BlobSizeError(
                    f"{self.layer or 'Net ' + repr(self.label)}: its parameters give sizes beyond torch's "
                    f"integers ({value.reason}); check the layer's shape parameters (num_output, kernel, "
                    "stride, pad, tiles, input dims)."
                )
            if isinstance(value, torch.Tensor) and value.numel() > self.limit:
                size = f"a blob of shape {tuple(value.shape)}, {value.numel()} elements"
            else:
                continue
            raise BlobSizeError(
                f"{self.layer or 'Net ' + repr(self.label)}: would allocate {size}, above the limit of "
                f"{self.limit} elements per blob; check the layer's shape parameters (num_output, kernel, "
                f"stride, tiles, input dims), or raise {MAX_ELEMENTS_ENV} if the net really is that large."
            )


def net_total_error(label: str, layer: str, total: int, limit: int) -> BlobSizeError:
    """The error for a net whose blobs together exceed ``limit`` elements once ``layer`` has run."""
    return BlobSizeError(
        f"Net '{label}': after {layer} its blobs hold {total} elements together, above the limit of {limit} "
        f"elements per net; use a smaller batch or input, or raise {MAX_NET_ELEMENTS_ENV} if the machine "
        "has the memory."
    )
