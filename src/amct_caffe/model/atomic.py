"""All-or-nothing output files: the one commit protocol every file amct-caffe writes goes through.

A set of output files (the four models and the record of a save, a config, a report folder, a snapshot) is
written by one :class:`AtomicFiles`:

1. ``write`` checks the target (not a folder, not under a regular file, a name the file system accepts),
   creates its missing folders (remembering which) and writes the bytes to a temporary file beside it,
   fsync'ed.
2. ``commit`` locks each output folder (``fcntl.flock`` on ``.amct~lock`` there), removes the stale
   temporary files of the same outputs that a crashed earlier run left, keeps a backup of every file about
   to be replaced (a hard link, or a copy where the file system has none), renames the new files into place
   one after another, fsyncs the folders, then removes the backups and unlocks.
3. Any failure before the end undoes what was done: the files already renamed are put back from their
   backups (new ones removed), the temporary files and backups are removed, the folders this set created
   are removed again, and an :class:`~amct_caffe.errors.OutputWriteError` names the file, the OS reason
   and the fix. Readers see all the old files or all the new ones.

Temporary files and backups are named ``.amct~<name>.<pid>.<8 hex>.tmp`` / ``.bak`` (a name too long for
the file system is cut and ends in a hash of the whole name), so a later run can tell its own leftovers
from a user's files and removes only those of processes that no longer run. The lock file is removed when
the set is written (a crashed run may leave it; it is empty and the next writer reuses it). Two processes
saving to the same folder take turns; the second waits up to ``AMCT_OUTPUT_LOCK_TIMEOUT`` seconds
(default 600). On Windows there is no lock (``fcntl`` is POSIX); the rest of the protocol holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from amct_caffe.errors import ConfigError, OutputLockError, OutputWriteError
from amct_caffe.log import get_logger

if sys.platform != "win32":
    import fcntl

LOGGER = get_logger("model.atomic")

#: The first characters of every temporary file, backup and lock file amct-caffe creates.
TEMP_PREFIX = ".amct~"
#: The lock file in each output folder.
LOCK_NAME = TEMP_PREFIX + "lock"
#: Seconds a writer waits for another process's lock on the same folder.
DEFAULT_LOCK_TIMEOUT = 600.0
LOCK_TIMEOUT_ENV = "AMCT_OUTPUT_LOCK_TIMEOUT"

# ".<pid>.<token>.tmp" at its longest: the stem's room is fixed, so a name maps to one stem in every process
_SUFFIX_ROOM = len(".") + 10 + len(".") + 8 + len(".tmp")
_HASH_CHARS = 16
_LOCK_POLL_S = 0.05

_FIXES = {
    errno.ENOSPC: "free some disk space or write to another disk",
    errno.EDQUOT: "free some space within the disk quota or write elsewhere",
    errno.EROFS: "the file system is read-only; give an output path on a writable one",
    errno.EACCES: "there is no permission to write there; give a folder you can write to",
    errno.EPERM: "the operation is not permitted there; give a folder you can write to",
    errno.ENAMETOOLONG: "the path is too long for the file system; give a shorter name or path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; give a path in a folder",
    errno.EISDIR: "the output is a folder; give a file path",
    errno.EIO: "the disk reported an I/O error; check the disk and try again",
}
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}
_NO_LOCKS = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL}


@dataclass
class _Staged:
    """One output of a set: its target, the temporary file with its new bytes and, during the commit, the
    backup of the file it replaces."""

    target: str
    temp: str
    backup: str = ""
    renamed: bool = False


class _StepError(Exception):
    """An ``OSError`` of one commit step, with the file it concerns and what was being done."""

    def __init__(self, path: str, step: str, error: OSError) -> None:
        super().__init__(f"{step} '{path}': {error}")
        self.path = path
        self.step = step
        self.error = error


class AtomicFiles:
    """Write several output files all-or-nothing (the protocol in this module's docstring).

    Use as a context manager: ``write`` stages each file in a temporary file beside its target; leaving the
    block without an error commits them all, an error removes them all and leaves every existing target
    untouched.

    Raises:
        OutputWriteError: a file cannot be written (named, with the OS reason and the fix); no output file
            was changed, or, where even the undo failed, the message lists the backups holding the old
            files.
        OutputLockError: another process kept an output folder locked past the timeout.
    """

    def __init__(self) -> None:
        self._staged: list[_Staged] = []
        self._created: list[str] = []

    def write(self, path: str | os.PathLike[str], data: bytes) -> None:
        """Stage ``data`` for ``path``: checked, its folders created, written to a temporary file and
        fsync'ed. Nothing at ``path`` changes before ``commit``.

        Raises:
            OutputWriteError: the path is a folder, lies under a regular file, has too long a name, was
                already written in this set, or the temporary file cannot be written.
        """
        target = os.path.abspath(os.fspath(path))
        check_output_path(target)
        if any(entry.target == target for entry in self._staged):
            raise OutputWriteError(f"Output '{target}' is written twice in one set of outputs; give each "
                                   "output its own path.")
        folder = os.path.dirname(target)
        try:
            _make_folders(folder, self._created)
            temp = _write_temp(target, data)
        except _StepError as exc:
            raise _error(exc, []) from exc.error
        self._staged.append(_Staged(target, temp))

    def commit(self) -> None:
        """Put every staged file in place, all-or-nothing (see the module docstring).

        Raises:
            OutputWriteError, OutputLockError: as the class says; on failure nothing is left staged.
        """
        staged, self._staged = self._staged, []
        created, self._created = self._created, []
        folders = sorted({os.path.dirname(entry.target) for entry in staged})
        try:
            with _locked(folders):
                for entry in staged:
                    remove_stale_temps(entry.target)
                _commit(staged, folders)
        except BaseException:
            _remove_temps(staged)
            _remove_folders(created)
            raise
        _remove_backups(staged)

    def discard(self) -> None:
        """Remove the staged temporary files and the folders this set created; no target changes."""
        _remove_temps(self._staged)
        _remove_folders(self._created)
        self._staged.clear()
        self._created.clear()

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    Missing parent folders are created. On any error the temporary file is removed, an existing file at
    ``path`` is untouched and the folders created are removed again.

    Raises:
        OutputWriteError, OutputLockError: as :class:`AtomicFiles`.
    """
    with AtomicFiles() as files:
        files.write(path, data)


# -- checks --------------------------------------------------------------------------------------------------
def check_output_path(target: str) -> None:
    """Refuse an output path that cannot become a file, before anything is written.

    Raises:
        OutputWriteError: ``target`` is an existing folder, lies under a regular file, is named like
            amct-caffe's temporary files, or has a name longer than the file system allows.
    """
    if os.path.isdir(target):
        raise OutputWriteError(f"Output '{target}' is an existing folder; give a file path (nothing was "
                               "written).")
    name = os.path.basename(target)
    if name.startswith(TEMP_PREFIX):
        raise OutputWriteError(f"Output '{target}': names starting with '{TEMP_PREFIX}' are reserved for "
                               "amct-caffe's temporary files; give another name.")
    ancestor = _existing_ancestor(os.path.dirname(target))
    if not os.path.isdir(ancestor):
        raise OutputWriteError(f"Output '{target}': '{ancestor}' is a file, not a folder, so nothing can be "
                               "written under it; give a path in a folder.")
    limit = _name_max(ancestor)
    size = len(os.fsencode(name))
    if size > limit:
        raise OutputWriteError(f"Output '{target}': the file name is {size} bytes, longer than the {limit} "
                               "bytes the file system allows; give a shorter name.")


def _existing_ancestor(folder: str) -> str:
    while not os.path.lexists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def _name_max(folder: str) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


# -- temporary names and stale ones ----------------------------------------------------------------------
def temp_stem(target: str) -> str:
    """The part of ``target``'s temporary names that names it: the file name, or where that would make
    a temporary name too long for the file system, its start and a hash of the whole name."""
    folder, name = os.path.split(target)
    room = _name_max(_existing_ancestor(folder)) - len(TEMP_PREFIX) - _SUFFIX_ROOM
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
    return os.fsdecode(raw[:max(room - _HASH_CHARS - 1, 0)]) + "~" + digest


def _temp_path(target: str, kind: str) -> str:
    name = f"{TEMP_PREFIX}{temp_stem(target)}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"
    return os.path.join(os.path.dirname(target), name)


def _temp_pattern(target: str) -> re.Pattern[str]:
    return re.compile(re.escape(TEMP_PREFIX + temp_stem(target)) + r"\.(\d+)\.[0-9a-f]{8}\.(?:tmp|bak)")


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        return True  # no cheap check there: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it runs, under another user
    return True


def remove_stale_temps(target: str) -> list[str]:
    """Remove the temporary files and backups of ``target`` that an earlier run left (its process no
    longer runs); returns their paths. Other files, and those of running processes, are kept."""
    folder = os.path.dirname(target)
    pattern = _temp_pattern(target)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _process_runs(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    if removed:
        LOGGER.info("Removed %d temporary file(s) of '%s' left by an earlier run: %s", len(removed), target,
                    ", ".join(removed))
    return removed


# -- the steps -----------------------------------------------------------------------------------------------
def _make_folders(folder: str, created: list[str]) -> None:
    missing = []
    path = folder
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                error = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                raise _StepError(path, "creating the folder", error) from None
        except OSError as exc:
            raise _StepError(path, "creating the folder", exc) from exc
        else:
            created.append(path)


def _output_mode(target: str) -> int | None:
    """The mode of the file ``target`` replaces; None for a new file (then open's 0666 less the umask)."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        return None


def _write_temp(target: str, data: bytes) -> str:
    temp = _temp_path(target, "tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(temp, flags, 0o666)
    except OSError as exc:
        raise _StepError(target, "creating the temporary file", exc) from exc
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        mode = _output_mode(target)
        if mode is not None:
            os.chmod(temp, mode)
    except OSError as exc:
        _remove_quietly([temp])
        raise _StepError(target, "writing the temporary file", exc) from exc
    except BaseException:
        _remove_quietly([temp])
        raise
    return temp


def _back_up(entry: _Staged) -> None:
    if not os.path.lexists(entry.target):
        return
    backup = _temp_path(entry.target, "bak")
    try:
        os.link(entry.target, backup, follow_symlinks=False)
    except (OSError, NotImplementedError):
        # no hard links here (some network and FAT file systems): a copy restores the same bytes
        try:
            shutil.copy2(entry.target, backup, follow_symlinks=False)
        except OSError as exc:
            _remove_quietly([backup])
            raise _StepError(entry.target, "keeping a backup of the old file", exc) from exc
    entry.backup = backup


def _sync_folder(folder: str) -> None:
    if sys.platform == "win32":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise _StepError(folder, "syncing the folder", exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_SYNC:
            raise _StepError(folder, "syncing the folder", exc) from exc
    finally:
        os.close(fd)


def _commit(staged: Sequence[_Staged], folders: Sequence[str]) -> None:
    """Back up, rename and sync; on any failure restore the renamed files and raise."""
    try:
        for entry in staged:
            _back_up(entry)
        for entry in staged:
            try:
                os.replace(entry.temp, entry.target)
            except OSError as exc:
                raise _StepError(entry.target, "renaming the new file into place", exc) from exc
            entry.renamed = True
        for folder in folders:
            _sync_folder(folder)
    except BaseException as exc:
        unrestored = [_unrestored_text(entry) for entry in _roll_back(staged)]
        for entry in staged:
            if entry.renamed:
                entry.backup = ""  # the old content is there now: kept for the user, not cleaned up
        if isinstance(exc, _StepError):
            raise _error(exc, unrestored) from exc.error
        if unrestored:
            LOGGER.error("Interrupted while writing outputs; not restored: %s", "; ".join(unrestored))
        raise


def _roll_back(staged: Sequence[_Staged]) -> list[_Staged]:
    """Put back the old file of every renamed output (remove those that were new); returns the outputs
    that could not be restored (their backups are kept)."""
    failed = []
    for entry in reversed(staged):
        if not entry.renamed:
            continue
        try:
            if entry.backup:
                os.replace(entry.backup, entry.target)
                entry.backup = ""
            else:
                os.remove(entry.target)
        except OSError:
            failed.append(entry)
            continue
        entry.renamed = False
    return failed


def _unrestored_text(entry: _Staged) -> str:
    if entry.backup:
        return f"'{entry.target}' is new, its old content is in '{entry.backup}'"
    return f"'{entry.target}' is new and could not be removed"


def _error(step: _StepError, unrestored: Sequence[str]) -> OutputWriteError:
    reason = step.error.strerror or str(step.error)
    fix = _FIXES.get(step.error.errno or 0, "check the path, its permissions and the free disk space")
    text = f"Cannot write output '{step.path}': {step.step} failed ({reason}); {fix}."
    if unrestored:
        text += f" The old files could not all be put back: {'; '.join(unrestored)}."
    else:
        text += " No output file was changed."
    return OutputWriteError(text)


def _remove_temps(staged: Iterable[_Staged]) -> None:
    _remove_quietly(entry.temp for entry in staged if not entry.renamed)
    _remove_backups(staged)


def _remove_backups(staged: Iterable[_Staged]) -> None:
    _remove_quietly(entry.backup for entry in staged if entry.backup)


def _remove_folders(created: Sequence[str]) -> None:
    """Remove the folders a set created (deepest first), where they are still empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _remove_quietly(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


# -- the lock ----------------------------------------------------------------------------------------------
def lock_timeout() -> float:
    """Seconds to wait for another writer's lock (``AMCT_OUTPUT_LOCK_TIMEOUT``, default 600).

    Raises:
        ConfigError: the variable is not a non-negative number.
    """
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{LOCK_TIMEOUT_ENV}='{text}' is not a number of seconds; set it to e.g. 600 or "
                          "unset it.")
    return value


@contextlib.contextmanager
def _locked(folders: Sequence[str]) -> Iterator[None]:
    """Hold the lock of every folder (in sorted order, so two sets never wait on each other)."""
    timeout = lock_timeout()
    with contextlib.ExitStack() as stack:
        for folder in sorted(set(folders)):
            stack.enter_context(folder_lock(folder, timeout))
        yield


@contextlib.contextmanager
def folder_lock(folder: str, timeout: float) -> Iterator[None]:
    """Hold ``folder``'s output lock (``.amct~lock`` there), waiting at most ``timeout`` seconds.

    The lock file is removed on release. A waiter that then holds the lock on the removed file sees that
    the path no longer names its file and locks the new one instead.

    Raises:
        OutputLockError: another process held the lock for ``timeout`` seconds.
        OutputWriteError: the lock file cannot be created (a read-only or unwritable folder).
    """
    if sys.platform == "win32":
        yield
        return
    path = os.path.join(folder, LOCK_NAME)
    deadline = time.monotonic() + timeout
    fd = _acquire(path, deadline, timeout)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


def _acquire(path: str, deadline: float, timeout: float) -> int:
    while True:
        try:
            fd = _open_lock_file(path)
        except OSError as exc:
            raise _error(_StepError(os.path.dirname(path), "locking the folder", exc), []) from exc
        try:
            if not _lock_fd(fd, path, deadline, timeout):
                return fd  # no locks on this file system: written unlocked
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _open_lock_file(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        # a lock file another user's killed run left: flock works on a read-only descriptor too
        return os.open(path, os.O_RDONLY)


def _lock_fd(fd: int, path: str, deadline: float, timeout: float) -> bool:
    """Lock ``fd`` exclusively; False where the file system has no locks."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OutputLockError(
                    f"Output folder '{os.path.dirname(path)}' is locked by another amct-caffe process (lock "
                    f"file '{path}') and stayed locked for {timeout:g} s; wait for that process to finish, "
                    f"write elsewhere, or raise {LOCK_TIMEOUT_ENV}.") from None
            time.sleep(_LOCK_POLL_S)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise _error(_StepError(os.path.dirname(path), "locking the folder", exc), []) from exc
            LOGGER.warning("Output folder '%s' cannot be locked (%s); writing without a lock.",
                           os.path.dirname(path), exc.strerror)
            return False
