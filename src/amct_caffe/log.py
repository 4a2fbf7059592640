"""Logging as AMCT does it: screen level from AMCT_LOG_LEVEL, file level from AMCT_LOG_FILE_LEVEL.

The file log goes to ``./amct_log/amct_caffe.log`` (relative to the working directory, as AMCT writes it) and
is only opened when something is logged, so importing the package creates no folder.
"""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "amct_caffe"
LOG_DIR = "amct_log"
LOG_FILE = "amct_caffe.log"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
_FORMAT = "%(asctime)s - %(levelname)s - [AMCT]:%(message)s"


def _level_from_env(var: str) -> int:
    value = os.environ.get(var, "INFO").strip().upper()
    return _LEVELS.get(value, logging.INFO)


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates ./amct_log only when the first record is written."""

    def __init__(self, path: str, level: int) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        super().emit(record)


def _configure(root: logging.Logger) -> None:
    """Give the package logger its screen and file handlers, with levels from the AMCT variables."""
    screen_level = _level_from_env("AMCT_LOG_LEVEL")
    file_level = _level_from_env("AMCT_LOG_FILE_LEVEL")
    screen = logging.StreamHandler()
    screen.setLevel(screen_level)
    screen.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(screen)
    file_handler = _LazyFileHandler(os.path.abspath(os.path.join(LOG_DIR, LOG_FILE)), file_level)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(file_handler)
    root.setLevel(min(screen_level, file_level))
    root.propagate = False


#: True once :func:`get_logger` has configured the package logger (once per process: the environment is
#: read then, and the handlers are never added twice).
_configured = False


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger (or a child of it), configured from the AMCT environment variables once."""
    global _configured
    root = logging.getLogger(LOGGER_NAME)
    if not _configured:
        _configure(root)
        _configured = True
    return root if name is None else root.getChild(name)
