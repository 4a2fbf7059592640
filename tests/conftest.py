"""Shared fixtures: paths of ../shared models and the reference Caffe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reference import SHARED, reference_python

MODELS = SHARED / "models"


@pytest.fixture
def shared_models() -> Path:
    """The read-only real Caffe models of ../shared/models; skips when ../shared is absent."""
    if not MODELS.is_dir():
        pytest.skip("../shared/models is not present")
    return MODELS


@pytest.fixture
def reference_caffe() -> str:
    """The reference Caffe's python; skips when it is not installed (.ci/run installs it)."""
    py = reference_python()
    if py is None:
        pytest.skip("reference Caffe not installed (set AMCT_REF_CAFFE_PYTHON or run .ci/run)")
    return py


@pytest.fixture
def amct_log(caplog):
    """caplog that also sees the amct_caffe logger (it does not propagate to the root logger)."""
    import logging

    from amct_caffe.log import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="amct_caffe")
    yield caplog
    logger.removeHandler(caplog.handler)
