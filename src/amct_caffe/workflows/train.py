"""``caffe train`` in the engine: a solver prototxt, optional starting weights or a solver state to resume,
in one process or data-parallel over several (``--nproc N`` local workers, or under ``torchrun``).

One process or many run the same :func:`train`: in a data-parallel run every worker builds the solver,
which joins the workers' process group from the environment (:mod:`amct_caffe.engine.distributed`); rank 0
writes the snapshots and reports. :func:`train_parallel` starts the local workers and runs :func:`train` in
each.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from amct_caffe.engine import distributed
from amct_caffe.engine.device import set_device, set_mode_gpu
from amct_caffe.engine.solver import Solver, get_solver
from amct_caffe.engine.solver.param import read_solver_param
from amct_caffe.errors import ConfigError
from amct_caffe.log import ProgressLines
from amct_caffe.workflows.solver import check_training_solver


@dataclass(frozen=True)
class TrainOptions:
    """What ``amct-caffe train`` was asked: the solver file, weights to start from (copied by layer name
    into the train and test nets) or a solver state to resume, and the CUDA device (None: CPU)."""

    solver: str
    weights: Sequence[str] = ()
    snapshot: str | None = None
    gpu: int | None = None


@dataclass
class TrainSummary:
    """What a training run did, for the report of rank 0."""

    net_name: str
    start_iter: int
    end_iter: int
    seconds: float
    workers: int
    test_results: list[list[tuple[str, float]]] = field(default_factory=list)
    snapshot: str | None = None


def check_options(options: TrainOptions) -> None:
    """The checks ``caffe train`` makes before building anything, and those of
    :func:`~amct_caffe.workflows.solver.check_training_solver` (a solver that would train nothing).

    Raises:
        ConfigError: both weights and a snapshot, a file that does not exist, or a solver that would train
            nothing (no max_iter, no data layer or loss, a retrain model without weights).
    """
    if options.weights and options.snapshot:
        raise ConfigError("give --snapshot to resume training or --weights to fine-tune, not both "
                          "(as caffe train)")
    for path, option in ((options.solver, "SOLVER"), (options.snapshot, "--snapshot"),
                         *((w, "--weights") for w in options.weights)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{option}: file '{path}' does not exist")
    check_training_solver(read_solver_param(options.solver), options.solver,
                          bool(options.weights or options.snapshot))


def _select_device(gpu: int | None) -> None:
    if gpu is None:
        return
    world = distributed.requested_world()
    set_device(gpu + world.local_rank if world.distributed else gpu)
    set_mode_gpu()


def train(options: TrainOptions) -> TrainSummary:
    """Train to the solver's ``max_iter`` (Caffe's ``caffe train``), in this process or as one worker of a
    data-parallel run the environment describes.

    Raises:
        ConfigError: see :func:`check_options`; ModelFormatError: a malformed solver or net;
        RuntimeEngineError: a worker of a data-parallel run stopped.
    """
    check_options(options)
    _select_device(options.gpu)
    solver: Solver = get_solver(options.solver)
    for w in options.weights:
        solver.net.copy_from(w)
        for net in solver.test_nets:
            net.copy_from(w)
    if options.snapshot:
        solver.restore(options.snapshot)  # what solve(resume_file) does first; done here to count the steps
    start_iter = solver.iter
    if solver.world.is_root:  # a line every few seconds where no progress bar shows (a log, a CI job)
        progress = ProgressLines(solver.param.max_iter - start_iter, "iteration")
        solver.add_callback(on_start=progress.tick)
    start = time.perf_counter()
    solver.solve()
    snapshot = solver.snapshot_filename(".caffemodel")
    return TrainSummary(
        net_name=solver.net.param.name or "net",
        start_iter=start_iter,
        end_iter=solver.iter,
        seconds=time.perf_counter() - start,
        workers=solver.world.size,
        test_results=[list(r) for r in solver.test_results],
        snapshot=snapshot if os.path.isfile(snapshot) else None,
    )


def _train_worker(options: TrainOptions, report: Callable[[TrainSummary], None] | None) -> None:
    summary = train(options)
    if report is not None and distributed.world().is_root:
        report(summary)


def train_parallel(options: TrainOptions, nproc: int,
                   report: Callable[[TrainSummary], None] | None = None) -> None:
    """Train with ``nproc`` local workers (each ``batch_size`` per iteration; worker ``i`` on CUDA device
    ``options.gpu + i`` when training on CUDA); rank 0 calls ``report`` with its summary. ``report`` must be
    importable by name (it runs in the worker).

    Raises:
        ConfigError: see :func:`check_options`, or ``nproc`` < 1;
        RuntimeEngineError: a worker failed or died (the others are stopped).
    """
    check_options(options)
    distributed.launch(nproc, _train_worker, (options, report))
