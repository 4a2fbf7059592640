"""Logging as AMCT does it: screen level from AMCT_LOG_LEVEL, file level from AMCT_LOG_FILE_LEVEL.

The file log goes to ``./amct_log/amct_caffe.log`` (relative to the working directory, as AMCT writes it) and
is only opened when something is logged, so importing the package creates no folder.
"""

from __future__ import annotations

import logging
import numbers
import os
import sys
import textwrap
import time
from collections.abc import Callable, Hashable

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


class _NoNegativeZero(logging.Filter):
    """Logs never show "-0": a float argument equal to zero is logged as 0 (clip_min -0.0 is 0)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(_is_zero_float(a) for a in record.args):
            record.args = tuple(0.0 if _is_zero_float(a) else a for a in record.args)
        return True


def _is_zero_float(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and value == 0


#: The package logger's screen handler, once :func:`get_logger` has configured it.
_screen: logging.Handler | None = None
#: The keys :func:`log_once` has logged in this process.
_logged_once: set[Hashable] = set()


def _configure(root: logging.Logger) -> None:
    """Give the package logger its screen and file handlers, with levels from the AMCT variables."""
    global _screen
    screen_level = _level_from_env("AMCT_LOG_LEVEL")
    file_level = _level_from_env("AMCT_LOG_FILE_LEVEL")
    screen = logging.StreamHandler()
    screen.setLevel(screen_level)
    screen.setFormatter(logging.Formatter(_FORMAT))
    screen.addFilter(_NoNegativeZero())
    root.addHandler(screen)
    _screen = screen
    file_handler = _LazyFileHandler(os.path.abspath(os.path.join(LOG_DIR, LOG_FILE)), file_level)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler.addFilter(_NoNegativeZero())
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


def quiet_screen() -> None:
    """Show only WARNING and above on the screen, unless ``AMCT_LOG_LEVEL`` asks otherwise: the command line
    prints its own one-line summary of each step, so the INFO lines would repeat it (the log file keeps
    them)."""
    get_logger()
    if _screen is not None and "AMCT_LOG_LEVEL" not in os.environ:
        _screen.setLevel(max(_screen.level, logging.WARNING))


def log_once(logger: logging.Logger, level: int, key: Hashable, message: str, *args: object) -> None:
    """Log ``message`` the first time ``key`` is seen in this process (e.g. a note about a file, once per
    file however often it is read)."""
    if key in _logged_once:
        return
    _logged_once.add(key)
    logger.log(level, message, *args)


def forget_logged_once() -> None:
    """Let every :func:`log_once` message be logged again (a test that reads a file other tests read too
    starts from here)."""
    _logged_once.clear()


def wrap_line(text: str, width: int = 110, indent: str = "    ") -> str:
    """One screen line wrapped at word boundaries into lines of at most ``width`` characters, continuation
    lines indented (long layer lists); a short line is returned unchanged."""
    return textwrap.fill(text, width=width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


class ProgressLines:
    """A progress line every ``every_s`` seconds where no tqdm bar shows (stderr is not a terminal: a log
    file, a CI job): call :meth:`tick` once per step.

    Args:
        total: the number of steps.
        what: what a step is, e.g. ``"iteration"``.
        emit: where the line goes (default: ``print`` to stdout).
        every_s: the least time between two lines.
        enabled: None (default): only when stderr is not a terminal.
    """

    def __init__(self, total: int, what: str, emit: Callable[[str], None] | None = None,
                 every_s: float = 10.0, enabled: bool | None = None) -> None:
        self.total = total
        self.what = what
        self.emit = emit if emit is not None else (lambda text: print(text, flush=True))
        self.every_s = every_s
        self.enabled = (not sys.stderr.isatty()) if enabled is None else enabled
        self.done = 0
        self.start = time.perf_counter()
        self.last = self.start

    def tick(self) -> None:
        """One step done; emit ``<what> <done>/<total> (<rate>/s)`` when ``every_s`` has passed."""
        self.done += 1
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            self.emit(f"{self.what} {self.done}/{self.total} ({rate:.3g}/s)")
