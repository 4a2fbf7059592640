"""The limits on what amct-caffe reads and allocates, each overridable by an environment variable.

Every limit guards against a file that would make the tool exhaust memory or time (a blob of 10^12 values,
a data source that is ``/dev/zero``, a config nested 100,000 deep) and is far above what a real model needs;
``docs/design.md`` ("Limits") lists them. A value set in the environment that is not a positive whole
number is itself a named error, so a typo never silently disables a limit.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable

from amct_caffe.errors import ConfigError

#: Caffe refuses a blob of more than INT_MAX elements (``Blob::Reshape``); so do we, by default.
DEFAULT_MAX_ELEMENTS = 2**31 - 1
#: All the blobs (tops and learnable blobs) one net may hold at once: 32 GiB of float32.
DEFAULT_MAX_NET_ELEMENTS = 2**33
#: Largest caffemodel read (Caffe's own kProtoReadBytesLimit is 2 GiB).
DEFAULT_CAFFEMODEL_LIMIT_MB = 2048
#: Largest data-layer ``source`` list file (ImageData, HDF5Data, WindowData) read.
DEFAULT_SOURCE_LIMIT_MB = 1024
#: Largest quantization config (JSON or .cfg) read.
DEFAULT_CONFIG_LIMIT_MB = 16

MAX_ELEMENTS_ENV = "AMCT_CAFFE_MAX_ELEMENTS"
MAX_NET_ELEMENTS_ENV = "AMCT_CAFFE_MAX_NET_ELEMENTS"
CAFFEMODEL_LIMIT_ENV = "AMCT_CAFFEMODEL_LIMIT_MB"
SOURCE_LIMIT_ENV = "AMCT_DATA_SOURCE_LIMIT_MB"
CONFIG_LIMIT_ENV = "AMCT_CONFIG_LIMIT_MB"

_MB = 1024**2


def env_limit(name: str, default: int) -> int:
    """The positive whole number in environment variable ``name``, or ``default`` when it is unset or empty.

    Raises:
        ConfigError: the variable holds anything else (``abc``, ``-1``, ``1.5``).
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or len(raw) > 30 or int(raw) <= 0:
        raise ConfigError(
            f"Environment variable {name}={raw[:40]!r} is not a positive whole number; set it to one "
            f"(the default is {default}) or unset it."
        )
    return int(raw)


def max_elements() -> int:
    """The most elements one blob may have (``AMCT_CAFFE_MAX_ELEMENTS``)."""
    return env_limit(MAX_ELEMENTS_ENV, DEFAULT_MAX_ELEMENTS)


def max_net_elements() -> int:
    """The most elements all the blobs of one net may have together (``AMCT_CAFFE_MAX_NET_ELEMENTS``)."""
    return env_limit(MAX_NET_ELEMENTS_ENV, DEFAULT_MAX_NET_ELEMENTS)


def caffemodel_limit_bytes() -> int:
    """The largest caffemodel read, in bytes (``AMCT_CAFFEMODEL_LIMIT_MB``)."""
    return env_limit(CAFFEMODEL_LIMIT_ENV, DEFAULT_CAFFEMODEL_LIMIT_MB) * _MB


def source_limit_bytes() -> int:
    """The largest data-layer source list read, in bytes (``AMCT_DATA_SOURCE_LIMIT_MB``)."""
    return env_limit(SOURCE_LIMIT_ENV, DEFAULT_SOURCE_LIMIT_MB) * _MB


def config_limit_bytes() -> int:
    """The largest quantization config read, in bytes (``AMCT_CONFIG_LIMIT_MB``)."""
    return env_limit(CONFIG_LIMIT_ENV, DEFAULT_CONFIG_LIMIT_MB) * _MB


def data_file_problem(path: str, limit: int | None = None) -> str | None:
    """Why a data file (a source list, an image, an HDF5 file, a mean file) must not be read, or None.

    A folder, a device (``/dev/zero``) or a pipe would make a read fail late, never end or exhaust memory;
    only regular files are read. ``limit`` is the largest size in bytes (None: no size limit). A missing
    file is left to the reader's own message. The text completes a sentence about the file.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a folder, a device or a pipe); give a file."
    if limit is not None and info.st_size > limit:
        return (f"is {info.st_size} bytes, above the limit of {limit} bytes for a data file; raise "
                f"{SOURCE_LIMIT_ENV} if the file is trusted.")
    return None


def element_count(shape: Iterable[int]) -> int:
    """The number of elements of ``shape`` (1 for a 0-axis shape), as an exact Python int."""
    return math.prod(int(d) for d in shape)


def elements_problem(shape: Iterable[int], limit: int | None = None) -> str | None:
    """Why a blob of ``shape`` cannot be allocated (a negative axis, more elements than the limit), or None.

    The text completes a sentence about the blob and names the limit's environment variable.
    """
    dims = tuple(int(d) for d in shape)
    negative = [d for d in dims if d < 0]
    if negative:
        return f"has shape {dims} with a negative axis; every axis must be 0 or more, as Caffe requires."
    limit = max_elements() if limit is None else limit
    count = element_count(dims)
    if count > limit:
        return (f"has shape {dims}, {count} elements, above the limit of {limit} elements per blob; check "
                f"the shape parameters, or raise {MAX_ELEMENTS_ENV} if the net really is that large.")
    return None
