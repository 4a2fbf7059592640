"""Shared fixtures: the shared real models, the real Caffe, the amct_caffe logger; hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.references.real_caffe import SHARED, reference_python

MODELS = SHARED / "models"

# Bounded, reproducible property tests: a fixed derandomized run by default ("ci"); "explore" draws new
# examples on every run (HYPOTHESIS_PROFILE=explore) to look for counterexamples.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, database=None,
                          print_blob=True)
settings.register_profile("explore", max_examples=2000, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def shared_models() -> Path:
    """The read-only real Caffe models of the shared folder; skips when it is absent."""
    if not MODELS.is_dir():
        pytest.skip("the shared models folder is not present")
    return MODELS


@pytest.fixture
def reference_caffe() -> str:
    """The real Caffe's python; skips when it is not installed (scripts/test.sh installs it)."""
    py = reference_python()
    if py is None:
        pytest.skip("reference Caffe not installed (set AMCT_REF_CAFFE_PYTHON or run scripts/test.sh)")
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
