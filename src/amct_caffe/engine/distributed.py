"""Data-parallel training on ``torch.distributed``: who this process is, and the few collectives the
solver, the data layers and AMCT's retrain layers need.

Caffe trains on several GPUs with ``caffe train -gpu 0,1``: one solver per device, each running
``batch_size`` per iteration, the records of the shared data reader handed out round robin, the gradients
summed and scaled by ``1 / solver_count`` before every update, snapshots, logs and tests on the root solver.
This module gives the engine the same on ``torch.distributed`` (gloo on CPU, NCCL on CUDA): a process group
is created from the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), either by ``torchrun`` itself (any number of machines) or by :func:`launch`, which starts
N local workers with those variables set (``amct-caffe train --nproc N``).

Without such variables (or with ``WORLD_SIZE=1``) every function here is the identity and nothing of
``torch.distributed`` is touched, so one process runs exactly as before.

A worker that fails makes the others stop: :func:`launch` terminates the rest and raises one
:class:`~amct_caffe.errors.RuntimeEngineError` naming the worker and its error; under ``torchrun`` its agent
does the same; a collective that loses its peer raises (gloo/NCCL report the closed connection) instead of
waiting, and every collective has a timeout (``AMCT_CAFFE_DIST_TIMEOUT`` seconds, default 600).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from amct_caffe.errors import ConfigError, RuntimeEngineError, WorkerLostError
from amct_caffe.log import get_logger

Tensor = torch.Tensor

#: The environment variable holding the collectives' timeout in seconds.
TIMEOUT_VARIABLE = "AMCT_CAFFE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """This process's place among the workers: ``rank`` of ``size``, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one worker trains together."""
        return self.size > 1

    @property
    def is_root(self) -> bool:
        """True on the worker that writes snapshots and logs and runs the tests (Caffe's root solver)."""
        return self.rank == 0


@dataclass
class _State:
    """The process's data seed, agreed by all workers (see :func:`agree_on_data_seed`)."""

    data_seed: int | None = None


_STATE = _State()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"the environment variable {name}='{text}' is not an integer; torchrun sets it "
                          "to one (unset it to train in one process).") from None


def world() -> World:
    """This process's :class:`World`: the initialised process group's, else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


def requested_world() -> World:
    """The world the environment asks for (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``).

    Raises:
        ConfigError: a variable is not an integer, or the rank is outside ``[0, WORLD_SIZE)``.
    """
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size} in the environment do not describe a worker "
                          "(need 0 <= RANK < WORLD_SIZE); start workers with torchrun or --nproc.")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_VARIABLE}='{text}' is not a number of seconds.") from None
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_VARIABLE}={text} must be a positive number of seconds.")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: torch.device) -> World:
    """Join the process group the environment describes, once per process; returns this worker's World.

    With ``WORLD_SIZE`` unset or 1 nothing happens. The backend is NCCL when ``device`` is a CUDA device,
    gloo otherwise. A CUDA worker computes on ``cuda:LOCAL_RANK``, which the caller selects.

    Raises:
        ConfigError: malformed variables, or ``MASTER_ADDR``/``MASTER_PORT`` missing.
        RuntimeEngineError: the group could not be formed (a worker missing, the port taken...).
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    wanted = requested_world()
    if not wanted.distributed:
        return wanted
    if not dist.is_available():
        raise RuntimeEngineError("this torch build has no torch.distributed, which data-parallel training "
                                 "needs.")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"WORLD_SIZE={wanted.size} is set but {name} is not; start the workers with "
                              "torchrun or 'amct-caffe train --nproc N', which set it.")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=wanted.rank, world_size=wanted.size, timeout=_timeout())
    except (RuntimeError, ValueError) as exc:
        raise RuntimeEngineError(f"worker {wanted.rank} of {wanted.size} could not join the process group "
                                 f"({backend} at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): "
                                 f"{_first_line(exc)}") from exc
    if wanted.rank != 0:
        # Caffe's non-root solvers log nothing of their own; warnings and errors still show
        get_logger().setLevel(logging.WARNING)
    return world()


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.data_seed = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    """Run a collective; a lost worker or a timeout becomes a RuntimeEngineError saying how to resume."""
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as exc:
        w = world()
        raise WorkerLostError(
            f"worker {w.rank} of {w.size}: {what} failed, most likely because another worker stopped "
            f"({_first_line(exc)}). Resume from the last snapshot with --snapshot."
        ) from exc


def average(tensors: Sequence[Tensor]) -> None:
    """Replace every tensor by its mean over the workers, in place (Caffe's summed and scaled gradients).

    The tensors travel as one flat buffer per dtype and device, so an update costs one all-reduce.
    """
    w = world()
    if not w.distributed or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        _collective("averaging the gradients", functools.partial(dist.all_reduce, flat, op=dist.ReduceOp.SUM))
        flat /= w.size
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def mean_value(value: float) -> float:
    """The mean of a float over the workers (a loss to report)."""
    w = world()
    if not w.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    _collective("averaging the loss", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return float(t[0]) / w.size


def broadcast(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of every tensor to all workers, in place."""
    w = world()
    if not w.distributed:
        return
    with torch.no_grad():
        for t in tensors:
            buffer = t.detach()
            if not buffer.is_contiguous():
                buffer = buffer.contiguous()
            _collective("sharing the weights", functools.partial(dist.broadcast, buffer, src=src))
            if buffer.data_ptr() != t.data_ptr():
                t.copy_(buffer)


def barrier() -> None:
    """Wait until every worker gets here (a no-op in one process)."""
    if world().distributed:
        _collective("waiting for the other workers", dist.barrier)


def gather(values: Tensor) -> Tensor:
    """All workers' ``values``, flattened and concatenated in rank order (the same tensor on every worker).

    Workers may hold different numbers of values (a last, short batch): sizes are exchanged first and the
    buffers padded to the largest.
    """
    w = world()
    flat = values.detach().reshape(-1)
    if not w.distributed:
        return flat
    size = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
    sizes = [torch.zeros_like(size) for _ in range(w.size)]
    _collective("gathering statistics", lambda: dist.all_gather(sizes, size))
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=flat.dtype, device=flat.device)
    padded[:flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    _collective("gathering statistics", lambda: dist.all_gather(parts, padded))
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def agree_on_data_seed() -> None:
    """All workers take rank 0's ``torch.initial_seed()`` for the data layers' shuffles (so the workers'
    round-robin shares of a shuffled source never overlap); one process keeps its own."""
    w = world()
    if not w.distributed:
        _STATE.data_seed = None
        return
    seed = torch.tensor([int(torch.initial_seed()) & 0x7FFFFFFFFFFFFFFF], dtype=torch.int64)
    _collective("agreeing on the data seed", lambda: dist.broadcast(seed, src=0))
    _STATE.data_seed = int(seed[0])


def data_seed() -> int:
    """The seed of the data layers' generators: the agreed one in a data-parallel run, else this process's
    ``torch.initial_seed()``."""
    if _STATE.data_seed is not None and world().distributed:
        return _STATE.data_seed
    return int(torch.initial_seed())


# -- local workers ---------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this machine now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, nproc: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...],
            error_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        fn(*args)
        barrier()
        # past the barrier every worker has finished ``fn``: what happens after (tearing the group down,
        # which gloo sometimes aborts on) cannot lose work, and the launcher reads this mark to know it
        with open(os.path.join(error_dir, f"done.{rank}"), "w", encoding="utf-8"):
            pass
    except BaseException as exc:
        # written before this process exits (and its connections close), so the launcher can tell the
        # worker that failed first from those that lost it
        report = {"rank": rank, "lost_peer": isinstance(exc, WorkerLostError),
                  "error": "".join(traceback.format_exception_only(type(exc), exc)).strip()}
        with open(os.path.join(error_dir, f"{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh)
        raise
    finally:
        shutdown()


def _all_finished(error_dir: str) -> bool:
    """True when a worker got past the final barrier, i.e. every worker finished its work."""
    return any(name.startswith("done.") for name in os.listdir(error_dir))


def _root_cause(error_dir: str) -> dict[str, Any] | None:
    """The report of a worker that failed by itself (not by losing a peer), lowest rank first."""
    reports = []
    for name in os.listdir(error_dir):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(error_dir, name), encoding="utf-8") as fh:
            reports.append(json.load(fh))
    reports.sort(key=lambda r: (bool(r["lost_peer"]), int(r["rank"])))
    return reports[0] if reports else None


def launch(nproc: int, fn: Callable[..., Any], args: tuple[Any, ...] = ()) -> None:
    """Run ``fn(*args)`` in ``nproc`` new local processes that form one process group (torchrun's
    variables set; rank ``i`` on ``cuda:i`` when training on CUDA). ``fn`` must be importable by name.

    Raises:
        ConfigError: ``nproc`` < 1.
        RuntimeEngineError: a worker failed or died; the others were stopped.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give at least 1 worker.")
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="amct-workers-") as error_dir:
        try:
            mp.start_processes(_worker, args=(nproc, port, fn, args, error_dir), nprocs=nproc, join=True,
                               start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            if isinstance(exc, mp.ProcessExitedException) and _all_finished(error_dir):
                get_logger().debug("worker %d of %d died after every worker had finished (exit code %s, "
                                   "while leaving the process group); the run is complete.", exc.error_index,
                                   nproc, exc.exit_code)
                return
            cause = _root_cause(error_dir)
            if cause is not None and not cause["lost_peer"]:
                raise RuntimeEngineError(f"worker {cause['rank']} of {nproc} failed: {cause['error']}; the "
                                         "other workers were stopped.") from None
            if isinstance(exc, mp.ProcessExitedException):
                raise RuntimeEngineError(f"worker {exc.error_index} of {nproc} died (exit code "
                                         f"{exc.exit_code}); the other workers were stopped. Resume from the "
                                         "last snapshot with --snapshot.") from None
            line = _last_error_line(str(exc))
            raise RuntimeEngineError(f"worker {exc.error_index} of {nproc} failed: {line}; the other "
                                     "workers were stopped.") from None


def _last_error_line(text: str) -> str:
    """The exception line of a worker's formatted traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith((" ", "\t")) and ":" in line:
            return line.strip()
    return lines[-1].strip() if lines else "unknown error"
