"""AMCT's logging variables: screen level, file level, ./amct_log/amct_caffe.log created on first record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = """
from amct_caffe.log import get_logger
log = get_logger("t")
log.debug("debug-line")
log.info("info-line")
log.warning("warning-line")
"""


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AMCT_LOG")}
    full_env.update(PYTHONPATH=str(SRC), **env)
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                          env=full_env, timeout=60)


def test_default_levels_are_info(tmp_path):
    proc = run(tmp_path)
    assert "info-line" in proc.stderr and "debug-line" not in proc.stderr
    log_file = tmp_path / "amct_log" / "amct_caffe.log"
    text = log_file.read_text()
    assert "info-line" in text and "warning-line" in text and "debug-line" not in text


def test_levels_from_environment(tmp_path):
    proc = run(tmp_path, AMCT_LOG_LEVEL="warning", AMCT_LOG_FILE_LEVEL="DEBUG")
    assert "info-line" not in proc.stderr and "warning-line" in proc.stderr
    assert "debug-line" in (tmp_path / "amct_log" / "amct_caffe.log").read_text()


def test_import_creates_no_log_folder(tmp_path):
    subprocess.run([sys.executable, "-c", "import amct_caffe.log"], cwd=tmp_path, timeout=60,
                   env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert not (tmp_path / "amct_log").exists()
