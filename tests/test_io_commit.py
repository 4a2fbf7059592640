"""The commit protocol of output files (``model.atomic``): fault injection at every step of a multi-file
commit (``os.replace``, ``os.fsync``, ``os.link``, ``os.open``, ``os.write`` failing at call k), checked to
leave all the old files or all the new ones byte for byte and no temporary file or backup; the same through
the real QAT ``save_quant_retrain_model`` and PTQ ``save_model``; stale temporary files of a crashed run;
path problems (a folder as output, a path under a regular file, a read-only file system, long names) as
named errors that leave no folder the call created."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from amct_caffe import amct, caffe, cli
from amct_caffe.engine.net import Net
from amct_caffe.engine.solver.snapshot import write_snapshot
from amct_caffe.errors import AmctError, OutputLockError, OutputWriteError
from amct_caffe.model import atomic
from amct_caffe.model.atomic import LOCK_NAME, TEMP_PREFIX, AtomicFiles, atomic_write, folder_lock
from amct_caffe.proto import caffe_pb2
from amct_caffe.workflows import qat
from tests.ptq_helpers import PtqFlow, calibration_batches
from tests.references.nets import write_random_net

OPS = ("replace", "fsync", "link", "open", "write")


class Fault:
    """``os.<name>`` failing with ``error`` (an errno, or an exception class raised bare) at its k-th call
    from now on (k = 0: never, only counting); ``persistent``: at every later call too."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, k: int, error: int | type = errno.EIO,
                 persistent: bool = False) -> None:
        self.calls = 0
        self.failed = 0
        real = getattr(os, name)

        def patched(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if k and (self.calls == k or (persistent and self.calls > k)):
                self.failed += 1
                if isinstance(error, int):
                    raise OSError(error, os.strerror(error))
                raise error()
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, patched)


def ours(folder: Path) -> list[str]:
    """The temporary files, backups and lock files of amct-caffe in ``folder``."""
    return sorted(name for name in os.listdir(folder) if name.startswith(TEMP_PREFIX))


def snapshot(paths: list[Path]) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in paths}


def restore(state: dict[Path, bytes | None]) -> None:
    for path, data in state.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def count_calls(monkeypatch: pytest.MonkeyPatch, op: str, action: Callable[[], None]) -> int:
    with monkeypatch.context() as patch:
        fault = Fault(patch, op, 0)
        action()
    return fault.calls


def inject_each_step(monkeypatch: pytest.MonkeyPatch, op: str, action: Callable[[], None],
                     old: dict[Path, bytes | None], new: dict[Path, bytes | None],
                     folders: list[Path]) -> int:
    """Run ``action`` once per call of ``os.<op>`` it makes, with that call failing; after each, the files
    must be all ``old`` (and a named error raised) or all ``new``, with none of our files left. Returns the
    number of steps that failed the write."""
    restore(old)
    steps = count_calls(monkeypatch, op, action)
    assert steps > 0, f"os.{op} is never called"
    failures = 0
    for k in range(1, steps + 1):
        restore(old)
        with monkeypatch.context() as patch:
            Fault(patch, op, k)
            try:
                action()
            except OutputWriteError as exc:
                failures += 1
                assert "No output file was changed" in str(exc), str(exc)
                assert snapshot(list(old)) == old, f"os.{op} failing at call {k}: not all old"
            else:
                assert snapshot(list(new)) == new, f"os.{op} failing at call {k}: not all new"
        for folder in folders:
            assert ours(folder) == [], f"os.{op} failing at call {k}: left {ours(folder)}"
    return failures


# -- AtomicFiles ---------------------------------------------------------------------------------------------
@pytest.fixture
def three(tmp_path: Path) -> tuple[list[Path], dict[Path, bytes | None], dict[Path, bytes | None]]:
    """Three outputs in two folders: two exist (old bytes), one is new."""
    paths = [tmp_path / "a" / "x.bin", tmp_path / "a" / "y.bin", tmp_path / "b" / "z.bin"]
    old = {paths[0]: b"old x", paths[1]: b"old y", paths[2]: None}
    new = {p: f"new {p.name}".encode() * 1000 for p in paths}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return paths, old, new


def write_set(new: dict[Path, bytes | None]) -> None:
    with AtomicFiles() as files:
        for path, data in new.items():
            assert data is not None
            files.write(path, data)


@pytest.mark.parametrize("op", OPS)
def test_atomic_files_fault_at_each_step(three, tmp_path, monkeypatch, op):
    paths, old, new = three
    failures = inject_each_step(monkeypatch, op, lambda: write_set(new), old, new,
                                [tmp_path / "a", tmp_path / "b"])
    # a failed hard link falls back to a copy; every other failing call fails the set
    assert failures == (0 if op == "link" else count_calls(monkeypatch, op, lambda: write_set(new)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_interrupt_during_the_renames_restores_the_old_files(three, tmp_path, monkeypatch, k):
    paths, old, new = three
    restore(old)
    Fault(monkeypatch, "replace", k, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        write_set(new)
    monkeypatch.undo()
    assert snapshot(paths) == old
    assert ours(tmp_path / "a") == ours(tmp_path / "b") == []


def test_undo_that_fails_too_names_the_backups(three, tmp_path, monkeypatch):
    """The third rename fails and so does every later os.replace (the undo): the error says which file is
    new and where its old content is; that backup holds the old bytes and is not removed."""
    paths, old, new = three
    restore(old)
    Fault(monkeypatch, "replace", 3, persistent=True)
    with pytest.raises(OutputWriteError, match="could not all be put back") as info:
        write_set(new)
    monkeypatch.undo()
    message = str(info.value)
    assert str(paths[2]) in message  # the rename that failed
    for path in paths[:2]:
        assert path.read_bytes() == new[path]
        assert f"'{path}' is new, its old content is in '" in message
        backup = message.split(f"'{path}' is new, its old content is in '")[1].split("'")[0]
        assert Path(backup).read_bytes() == old[path]
    assert not paths[2].exists()
    assert len(ours(tmp_path / "a")) == 2 and ours(tmp_path / "b") == []


def test_failed_write_keeps_modes_and_symlinks(tmp_path, monkeypatch):
    """The undo puts back the replaced file itself: its mode and, for a symlink, the link."""
    real = tmp_path / "real.bin"
    real.write_bytes(b"real")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    moded = tmp_path / "moded.bin"
    moded.write_bytes(b"old")
    moded.chmod(0o640)
    Fault(monkeypatch, "replace", 3)
    with pytest.raises(OutputWriteError), AtomicFiles() as files:
        files.write(link, b"new link")
        files.write(moded, b"new moded")
        files.write(tmp_path / "third.bin", b"3")
    monkeypatch.undo()
    assert link.is_symlink() and real.read_bytes() == b"real"
    assert moded.read_bytes() == b"old" and moded.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "moded.bin", "real.bin"]


# -- through the real saves --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrained(tmp_path_factory) -> tuple[Path, str, str, str]:
    """A retrain model of the small PTQ net and two 'trained' caffemodels of it (forwards on different data
    set different clips), so two saves write different bytes."""
    folder = tmp_path_factory.mktemp("qat_faults")
    model, weights = write_random_net(folder)
    config, retrain, retrain_weights = (str(folder / n) for n in ("qat.json", "r.prototxt", "r.caffemodel"))
    amct.create_quant_retrain_config(config, model, weights)
    amct.create_quant_retrain_model(model, weights, config, retrain, retrain_weights, str(folder / "rec.txt"))
    trained = []
    for scale in (1.0, 4.0):
        net = caffe.Net(retrain, caffe.TEST, weights=retrain_weights)
        net.forward(data=(np.random.default_rng(0).standard_normal((2, 3, 6, 6)) * scale).astype(np.float32))
        path = str(folder / f"trained_{scale:g}.caffemodel")
        net.save(path)
        trained.append(path)
    return folder, retrain, trained[0], trained[1]


QAT_FILES = ["m_fake_quant_model.prototxt", "m_fake_quant_weights.caffemodel", "m_deploy_model.prototxt",
             "m_deploy_weights.caffemodel"]


@pytest.mark.parametrize("op", ["replace", "fsync", "open"])
def test_save_quant_retrain_model_fault_at_each_step(retrained, tmp_path, monkeypatch, op):
    source, retrain, weights_a, weights_b = retrained
    record = tmp_path / "rec.txt"
    record.write_bytes((source / "rec.txt").read_bytes())
    paths = [tmp_path / "out" / name for name in QAT_FILES] + [record]

    def save(weights: str) -> None:
        monkeypatch.setattr(qat, "_LAST_RETRAIN", None)
        prefix = str(tmp_path / "out" / "m")
        amct.save_quant_retrain_model(retrain, weights, "Both", prefix, str(record), None)

    save(weights_b)
    new = snapshot(paths)
    save(weights_a)
    old = snapshot(paths)
    assert all(old[p] != new[p] for p in paths[1:])  # the weights and the record differ between the saves
    folders = [tmp_path, tmp_path / "out"]
    failures = inject_each_step(monkeypatch, op, lambda: save(weights_b), old, new, folders)
    assert failures > 0


@pytest.fixture(scope="module")
def ptq_graph(tmp_path_factory) -> Any:
    flow = PtqFlow(tmp_path_factory.mktemp("ptq_faults"))
    graph = flow.quantize()
    flow.calibrate(calibration_batches())
    return graph


PTQ_FILES = QAT_FILES + ["m_quant.json"]


@pytest.mark.parametrize("op", ["replace", "fsync", "open", "write"])
def test_ptq_save_model_fault_at_each_step(ptq_graph, tmp_path, monkeypatch, op):
    prefix = tmp_path / "out" / "m"
    amct.save_model(ptq_graph, "Both", str(prefix))
    paths = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in paths] == sorted(PTQ_FILES)
    new = snapshot(paths)
    old: dict[Path, bytes | None] = {p: b"old " + p.name.encode() for p in paths}
    failures = inject_each_step(monkeypatch, op, lambda: amct.save_model(ptq_graph, "Both", str(prefix)),
                                old, new, [tmp_path / "out"])
    assert failures > 0


# -- stale temporary files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


def test_stale_temps_of_the_same_output_are_removed(tmp_path, dead_pid):
    target = tmp_path / "f.bin"
    stale = [f"{TEMP_PREFIX}f.bin.{dead_pid}.0123abcd.tmp", f"{TEMP_PREFIX}f.bin.{dead_pid}.deadbeef.bak"]
    kept = [
        f"{TEMP_PREFIX}f.bin.{os.getppid()}.0123abcd.tmp",  # a running process's
        f"{TEMP_PREFIX}g.bin.{dead_pid}.0123abcd.tmp",  # another output's
        f"{TEMP_PREFIX}f.bin.{dead_pid}.0123abcd.tmp.mine",  # not one of our names
        f"{TEMP_PREFIX}f.bin.x.0123abcd.tmp",
        f".f.bin.{dead_pid}.0123abcd.tmp",
        "f.bin.bak",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"left")
    atomic_write(target, b"new")
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["f.bin"])
    assert target.read_bytes() == b"new"


def test_stale_temps_of_a_long_name_are_removed(tmp_path, dead_pid):
    name = "n" * 250 + ".bin"  # 254 bytes: its temporary names carry a hash instead of the whole name
    target = tmp_path / name
    stem = atomic.temp_stem(str(target))
    assert stem != name and len(os.fsencode(f"{TEMP_PREFIX}{stem}.{2**32}.0123abcd.tmp")) <= 255
    (tmp_path / f"{TEMP_PREFIX}{stem}.{dead_pid}.0123abcd.tmp").write_bytes(b"left")
    atomic_write(target, b"new")
    assert sorted(os.listdir(tmp_path)) == [name]


def test_a_crashed_writer_leaves_temps_the_next_run_removes(tmp_path):
    """A process killed after staging (temporary files written, nothing renamed): the outputs are the old
    ones, and the next save of the same outputs removes its temporary files."""
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    script = ("import os, sys\nfrom amct_caffe.model.atomic import AtomicFiles\n"
              "files = AtomicFiles()\nfiles.write(sys.argv[1], b'half')\nos._exit(9)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", script, str(target)], env=env, check=False)
    assert proc.returncode == 9
    assert len(ours(tmp_path)) == 1 and target.read_bytes() == b"old"
    atomic_write(target, b"new")
    assert sorted(os.listdir(tmp_path)) == ["f.bin"] and target.read_bytes() == b"new"


# -- path problems -------------------------------------------------------------------------------------------
def test_existing_folder_as_output_fails_before_writing(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_bytes(b"x")
    with pytest.raises(OutputWriteError, match="is an existing folder"):
        atomic_write(tmp_path / "dir", b"new")
    with pytest.raises(OutputWriteError, match="is an existing folder"), AtomicFiles() as files:
        files.write(tmp_path / "first.bin", b"1")
        files.write(tmp_path / "dir", b"2")
    assert sorted(os.listdir(tmp_path)) == ["dir"]
    assert os.listdir(tmp_path / "dir") == ["inside"]


def test_retrain_config_to_a_folder_leaves_nothing(tmp_path):
    model, weights = write_random_net(tmp_path)
    (tmp_path / "out").mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(AmctError, match="folder"):
        amct.create_quant_retrain_config(str(tmp_path / "out"), model, weights)
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "out") == []


def test_path_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputWriteError, match="is a file, not a folder"):
        atomic_write(tmp_path / "file" / "sub" / "out.bin", b"new")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_read_only_file_system_removes_the_folders_it_created(tmp_path, monkeypatch):
    (tmp_path / "existing").mkdir()
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(tmp_path)) and args and args[0] & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    target = tmp_path / "existing" / "new1" / "new2" / "out.bin"
    with pytest.raises(OutputWriteError, match="read-only") as info:
        atomic_write(target, b"x")
    assert str(target) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["existing"] and os.listdir(tmp_path / "existing") == []


def test_read_only_at_commit_through_the_api(tmp_path, monkeypatch):
    """The lock file cannot be created (the folder turned read-only): a named error, no folder or temporary
    file left."""
    model, weights = write_random_net(tmp_path)
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputWriteError, match="read-only"):
        amct.create_quant_retrain_config(str(tmp_path / "new" / "qat.json"), model, weights)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("length", [200, 240, 255])
def test_names_up_to_name_max_are_written(tmp_path, length):
    target = tmp_path / ("n" * (length - 4) + ".bin")
    atomic_write(target, b"new")
    atomic_write(target, b"newer")  # replaced: the backup's name fits too
    assert sorted(os.listdir(tmp_path)) == [target.name] and target.read_bytes() == b"newer"


def test_name_past_name_max_is_a_named_error(tmp_path):
    target = tmp_path / ("n" * 300 + ".bin")
    with pytest.raises(OutputWriteError, match="longer than the 255 bytes"):
        atomic_write(target, b"new")
    (tmp_path / "m").mkdir()
    model, weights = write_random_net(tmp_path / "m")
    with pytest.raises(OutputWriteError, match="shorter name"):
        amct.create_quant_retrain_config(str(tmp_path / "new" / ("c" * 300 + ".json")), model, weights)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_reserved_names_and_twice_written_outputs(tmp_path):
    with pytest.raises(OutputWriteError, match="reserved"):
        atomic_write(tmp_path / f"{TEMP_PREFIX}x", b"new")
    with pytest.raises(OutputWriteError, match="written twice"), AtomicFiles() as files:
        files.write(tmp_path / "a.bin", b"1")
        files.write(tmp_path / "." / "a.bin", b"2")
    assert os.listdir(tmp_path) == []


# -- the lock ------------------------------------------------------------------------------------------------
@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[Path]:
    """The output lock of ``tmp_path`` held (as another writer would)."""
    with folder_lock(str(tmp_path), 1.0):
        yield tmp_path / LOCK_NAME


def test_lock_timeout_is_a_named_error(held_lock, tmp_path, monkeypatch):
    (tmp_path / "f.bin").write_bytes(b"old")
    monkeypatch.setenv(atomic.LOCK_TIMEOUT_ENV, "0.2")
    with pytest.raises(OutputLockError, match="locked by another amct-caffe process"):
        atomic_write(tmp_path / "f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"old"
    assert ours(tmp_path) == [LOCK_NAME]  # the holder's


def test_lock_file_is_removed_after_the_commit(tmp_path):
    atomic_write(tmp_path / "f.bin", b"new")
    assert os.listdir(tmp_path) == ["f.bin"]


def test_lock_timeout_variable_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(atomic.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(AmctError, match=atomic.LOCK_TIMEOUT_ENV):
        atomic_write(tmp_path / "f.bin", b"new")
    assert os.listdir(tmp_path) == []


# -- path problems through the API and the command line ------------------------------------------------------
def test_ptq_save_model_path_problems(ptq_graph, tmp_path, monkeypatch):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputWriteError, match="is a file, not a folder"):
        amct.save_model(ptq_graph, "Both", str(tmp_path / "file" / "sub" / "m"))
    # 225 + len("_fake_quant_weights.caffemodel") = 255 bytes: written; 226 is one byte too long
    amct.save_model(ptq_graph, "Fakequant", str(tmp_path / "ok" / ("p" * 225)))
    assert len(os.listdir(tmp_path / "ok")) == 3  # the two models and the quant.json
    with pytest.raises(OutputWriteError, match="shorter name") as info:
        amct.save_model(ptq_graph, "Fakequant", str(tmp_path / "long" / ("p" * 226)))
    assert "_fake_quant_weights.caffemodel" in str(info.value)
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(tmp_path / "ro")) and args and args[0] & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputWriteError, match="read-only"):
        amct.save_model(ptq_graph, "Both", str(tmp_path / "ro" / "deep" / "m"))
    assert sorted(os.listdir(tmp_path)) == ["file", "ok"]


def test_cli_outputs_that_are_folders_leave_nothing(retrained, tmp_path, capsys, monkeypatch):
    source, retrain, weights, _ = retrained
    monkeypatch.setattr(qat, "_LAST_RETRAIN", None)
    record = tmp_path / "rec.txt"
    record.write_bytes((source / "rec.txt").read_bytes())
    amct.save_quant_retrain_model(retrain, weights, "Fakequant", str(tmp_path / "m"), str(record), None)
    (tmp_path / "float").mkdir()
    model, float_weights = write_random_net(tmp_path / "float")
    (tmp_path / "dir").mkdir()
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    fake = str(tmp_path / "m_fake_quant_model.prototxt")
    assert cli.main(["pycaffe-rewrite", fake, str(tmp_path / "dir")]) == 1
    assert cli.main(["retrain-config", "--model", model, "--weights", float_weights, "--output",
                     str(tmp_path / "dir")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("folder" in line and str(tmp_path / "dir") in line for line in lines)
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "dir") == []


def test_solver_snapshot_is_one_set(tmp_path, monkeypatch):
    """The solverstate's rename fails: the caffemodel of the same snapshot is not left alone either."""
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 2 } }\n')
    net = Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    param = caffe_pb2.SolverParameter(snapshot_prefix=str(tmp_path / "snap" / "s"))
    Fault(monkeypatch, "replace", 2)
    with pytest.raises(OutputWriteError, match="s_iter_7.solverstate"):
        write_snapshot(net, param, 7, 0, [], "solver")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["net.prototxt"]  # the snap folder it created is gone too
    assert write_snapshot(net, param, 7, 0, [], "solver") == str(tmp_path / "snap" / "s_iter_7.caffemodel")
    assert sorted(os.listdir(tmp_path / "snap")) == ["s_iter_7.caffemodel", "s_iter_7.solverstate"]
