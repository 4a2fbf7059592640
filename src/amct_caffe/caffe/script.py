"""Run an unchanged pycaffe script (``import caffe``) on the facade: ``amct-caffe exec script.py args...``.

For the run, and only inside the process that runs it, ``caffe`` and its submodules (``caffe.io``,
``caffe.proto.caffe_pb2``, ``caffe.net_spec``, ``caffe.draw``, ...) are entries of ``sys.modules`` that point
at :mod:`amct_caffe.caffe`; the entries that were there before (a real pycaffe the process had imported, or
none) come back afterwards. amct-caffe installs no top-level ``caffe`` package, so a plain ``import caffe``
anywhere else finds a real pycaffe or nothing, never this facade.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

from amct_caffe.errors import ConfigError

#: the pycaffe module names a script may import, and the facade modules they stand for
ALIASES = {
    "caffe": "amct_caffe.caffe",
    "caffe.pycaffe": "amct_caffe.caffe.pycaffe",
    "caffe.io": "amct_caffe.caffe.io",
    "caffe.proto": "amct_caffe.caffe.proto",
    "caffe.proto.caffe_pb2": "amct_caffe.proto.caffe_pb2",
    "caffe.net_spec": "amct_caffe.caffe.net_spec",
    "caffe.classifier": "amct_caffe.caffe.classifier",
    "caffe.detector": "amct_caffe.caffe.detector",
    "caffe.draw": "amct_caffe.caffe.draw",
}


@contextlib.contextmanager
def caffe_bound_to_facade() -> Iterator[ModuleType]:
    """Within the block, ``import caffe`` (and its submodules) gives the facade; yields the ``caffe``
    module."""
    saved = {name: sys.modules.get(name) for name in ALIASES}
    try:
        for name, target in ALIASES.items():
            sys.modules[name] = importlib.import_module(target)
        yield sys.modules["caffe"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def run_script(path: str | os.PathLike[str], args: Sequence[str] = ()) -> None:
    """Run the Python file ``path`` as ``__main__`` with ``sys.argv = [path, *args]`` and ``caffe`` bound to
    the facade (see the module docstring); the script's folder comes first on ``sys.path``, as for
    ``python path``.

    Raises:
        ConfigError: ``path`` is not a file.
        SystemExit: the script's own exit.
    """
    script = os.fspath(path)
    if not os.path.isfile(script):
        raise ConfigError(f"exec: '{script}' is not a file; give the path of a Python script.")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with caffe_bound_to_facade():
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
