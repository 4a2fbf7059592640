"""Caffe's ``Solver``: the nets, the training loop (``step``/``solve``), tests, and the update of each
iteration, on the pieces of this package.

One iteration (Caffe's ``Solver::Step``) is: clear the parameter gradients; test when ``test_interval``
divides the iteration (not at iteration 0 unless ``test_initialization``); ``iter_size`` forward/backward
passes whose gradients accumulate (the loss reported is their mean); then ``ApplyUpdate``: the learning rate
of ``lr_policy`` (:mod:`.lr_policy`), ``ClipGradients``, and per learnable blob Normalize, Regularize and
the type's rule (:mod:`.rules`); the iteration counter moves on; a snapshot is written when ``snapshot``
divides it (:mod:`.snapshot`).

Gradients come from autograd of ``Net.loss()`` (the sum of the loss tops times their ``loss_weight``),
which is Caffe's backward where the layers implement Caffe's gradients. Test nets use the train net's
learnable blobs: the tensor objects are assigned layer by layer (by layer name, Caffe's
``ShareTrainedLayersWith``) when the solver is built and again before every test, so a test always sees the
current weights.

Record shapes: after each forward of one of its nets the solver runs that net's
:class:`~amct_caffe.engine.record_shapes.RecordShapesHook`, which writes the input shapes of the net's
``ActivationQAT`` layers into the record file their parameter names, once per layer (AMCT's retrain layers
do that on their first forward); nets without such layers have a hook that does nothing.

Data-parallel training (:mod:`amct_caffe.engine.distributed`): when the environment describes several
workers (``torchrun``, or ``amct-caffe train --nproc N``) the solver joins their process group when it is
built, and then follows Caffe's multi-GPU rules: every worker runs ``batch_size`` per iteration and its data
layers keep every N-th record (:mod:`amct_caffe.engine.layers.data_sources`); rank 0's weights are copied
to all workers before the first iteration; each iteration's gradients are averaged over the workers before
``on_gradients_ready`` callbacks and the update, so every worker applies the same update and the weights
(clip bounds and shadow weights included) stay identical; the loss reported is the workers' mean; tests,
snapshots, record shapes and log lines are rank 0's alone. ``random_seed`` seeds worker ``r`` with
``random_seed + r`` (Caffe's rule), and the data layers' shuffles use one seed agreed by all workers.

Progress: a tqdm bar over the iterations of ``step``/``solve`` (with the smoothed loss and the learning
rate; shown when stderr is a terminal and more than one iteration is asked), and every ``display``
iterations Caffe's log lines ``Iteration N, loss = X``, ``Train net output #k: ...`` and
``Iteration N, lr = Y`` through the ``amct_caffe`` logger; tests log ``Test net output #k: name = value``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from amct_caffe.engine import distributed
from amct_caffe.engine.device import current_device, full_float32, set_device
from amct_caffe.engine.layers.quant import ActivationQAT
from amct_caffe.engine.net import Net
from amct_caffe.engine.record_shapes import RecordShapesHook
from amct_caffe.engine.solver.float32 import f32
from amct_caffe.engine.solver.learnable import (
    LearnableParam,
    accumulated_gradient,
    blob_of,
    clear_param_grads,
    enable_param_grads,
    learnable_params,
    share_trained_layers,
)
from amct_caffe.engine.solver.lr_policy import learning_rate
from amct_caffe.engine.solver.param import (
    NetSpec,
    SolverSource,
    check_solver_param,
    load_solver,
    solver_where,
    test_net_specs,
    train_net_spec,
)
from amct_caffe.engine.solver.rules import UPDATE_RULES, UpdateRule, clip_gradients, update_blob
from amct_caffe.engine.solver.snapshot import (
    check_history,
    learned_net_path,
    load_history,
    read_solver_state,
    snapshot_filename,
    write_snapshot,
)
from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.solver")

Tensor = torch.Tensor
Callback = Callable[[], None]


def _blob_loss_weights(net: Net) -> dict[str, float]:
    return {net.layer_tops[li][ti]: w for (li, ti), w in net.loss_weights.items()}


def _output_values(net: Net) -> list[tuple[str, Tensor]]:
    """Each output blob with its values flattened (Caffe's ``output_blobs`` in order)."""
    return [(name, net.tensor(name).detach().reshape(-1).to(torch.float32)) for name in net.outputs]


class Solver:
    """Caffe's ``Solver``/``SGDSolver`` machinery with the update rule of the class's ``type_name``.

    Args:
        solver: a solver prototxt path or a ``caffe_pb2.SolverParameter`` (copied).

    Attributes:
        param: the (upgraded) SolverParameter.
        net: the train net; ``test_nets``: the test nets (TEST phase, sharing the train net's blobs).
        iter: the number of updates applied so far; ``current_step``: the step of the step/multistep
            policies (saved in the solverstate).
        rate: the learning rate of the last update.
        train_record_shapes, test_record_shapes: the steps that write AMCT's record shapes after the
            nets' forwards (:class:`~amct_caffe.engine.record_shapes.RecordShapesHook`).
        history: the update history, one tensor per learnable blob (two sets for AdaDelta and Adam).
        smoothed_loss: the loss averaged over the last ``average_loss`` iterations of the current step.
        world: this worker's place in a data-parallel run (one process: rank 0 of 1).
        test_results: per test net, ``[(output name, mean value), ...]`` of the last test.

    Raises:
        ModelFormatError: the solver or a net is malformed, or a field has a value Caffe rejects.
    """

    #: Caffe's registered type string: the update rule (:data:`.rules.UPDATE_RULES`) this class applies.
    type_name: ClassVar[str] = "SGD"

    def __init__(self, solver: SolverSource) -> None:
        self.param, self.path = load_solver(solver)
        self._where = solver_where(self.path)
        self.rule: UpdateRule = UPDATE_RULES[self.type_name]
        check_solver_param(self.param, self._where)
        self.rule.check(self.param, self._where)
        p = self.param
        self.world = self._join_workers()
        if p.random_seed >= 0:
            from amct_caffe.engine.fillers import set_random_seed

            # Caffe::set_random_seed seeds every generator before the nets (and their fillers) are built;
            # in a multi-GPU run each solver gets random_seed + its rank
            set_random_seed(int(p.random_seed) + self.world.rank)
            torch.manual_seed(int(p.random_seed) + self.world.rank)
        distributed.agree_on_data_seed()
        self.net: Net = self._init_train_net()
        self.test_nets: list[Net] = self._init_test_nets()
        # AMCT's retrain layers update the record file's shapes when they first run: a step after forwards
        # (rank 0's alone in a data-parallel run: one writer per record file)
        self.train_record_shapes = self._record_shapes(self.net)
        self.test_record_shapes = [self._record_shapes(net) for net in self.test_nets]
        self.iter = 0
        self.current_step = 0
        self.rate = 0.0
        self.losses: list[np.float32] = []
        self.smoothed_loss = np.float32(0.0)
        self.test_results: list[list[tuple[str, float]]] = [[] for _ in self.test_nets]
        self.callbacks: list[tuple[Callback | None, Callback | None]] = []
        #: False until rank 0's weights were copied to every worker (done before the first iteration).
        self.weights_shared = not self.world.distributed
        self._params = learnable_params(self.net)
        enable_param_grads(self.net, self._params)
        for test_net in self.test_nets:
            share_trained_layers(test_net, self.net)
        self.history: list[Tensor] = [
            torch.zeros(blob.shape, dtype=torch.float32, device=blob.device)
            for _ in range(self.rule.history_sets)
            for blob in (blob_of(self.net, lp) for lp in self._params)
        ]

    # -- data-parallel workers ------------------------------------------------------------------------------
    @staticmethod
    def _join_workers() -> distributed.World:
        """Join the workers the environment describes; a CUDA worker computes on ``cuda:LOCAL_RANK``."""
        wanted = distributed.requested_world()
        if wanted.distributed and current_device().type == "cuda":
            set_device(wanted.local_rank)
        return distributed.init_from_env(current_device())

    def _record_shapes(self, net: Net) -> RecordShapesHook:
        return RecordShapesHook.for_net(net) if self.world.is_root else RecordShapesHook([])

    def _share_weights(self) -> None:
        """Copy rank 0's blobs (weights, statistics, clips) and update history to every worker."""
        if self.weights_shared:
            return
        if self._test_due() and not all(
            layer.clips_ready for layer in self.net.engine_layers if isinstance(layer, ActivationQAT)
        ):
            raise ConfigError(
                f"{self._where}: test_initialization is true but the retrain layers' clips are set by IFMR "
                "on the first training batch; in a data-parallel run tests run on rank 0 alone, so set "
                "test_initialization: false (AMCT's rule for retraining)."
            )
        blobs: dict[int, Tensor] = {}
        for layer in self.net.engine_layers:
            for blob in layer.blobs:
                blobs.setdefault(id(blob), blob)
        distributed.broadcast([*blobs.values(), *self.history])
        self.weights_shared = True

    def _average_gradients(self) -> None:
        """Replace each learnable blob's gradient by the workers' mean (a missing gradient counts as zeros,
        which is what the update uses for it)."""
        if not self.world.distributed:
            return
        grads: dict[int, Tensor] = {}
        for lp in self._params:
            if not lp.need_grad:
                continue
            for li, bi in lp.users:
                blob = self.net.engine_layers[li].blobs[bi]
                if blob.grad is None:
                    blob.grad = torch.zeros_like(blob)
                grads.setdefault(id(blob), blob.grad)
        distributed.average(list(grads.values()))

    # -- the nets -------------------------------------------------------------------------------------------
    def make_net(self, source: str | caffe_pb2.NetParameter, phase: int, level: int,
                 stages: Sequence[str]) -> Net:
        """Build one of the solver's nets; the pycaffe facade overrides this to build its ``Net``."""
        return Net(source, phase, level=level, stages=stages)

    def _build(self, spec: NetSpec) -> Net:
        state = spec.state()
        return self.make_net(spec.source, state.phase, state.level, list(state.stage))

    def _init_train_net(self) -> Net:
        spec = train_net_spec(self.param, self.path, self._where)
        if isinstance(spec.source, str):
            LOGGER.info("Creating training net from %s: %s", spec.origin, spec.source)
        else:
            LOGGER.info("Creating training net specified in %s.", spec.origin)
        net = self._build(spec)
        for weights in self.param.weights:
            for model in weights.split(","):
                LOGGER.info("Copying weights from %s into the train net.", model)
                net.copy_from(model)
        return net

    def _init_test_nets(self) -> list[Net]:
        nets = []
        for i, spec in enumerate(test_net_specs(self.param, self.path, self._where)):
            LOGGER.info("Creating test net (#%d) specified by %s", i,
                        spec.source if isinstance(spec.source, str) else "a NetParameter")
            nets.append(self._build(spec))
        return nets

    @property
    def learnable(self) -> list[LearnableParam]:
        """The train net's learnable blobs in Caffe's order (the history's order)."""
        return list(self._params)

    # -- learning rate --------------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """Caffe's ``GetLearningRate`` at the current iteration (a float32 value); moves ``current_step`` for
        the step/multistep policies (see :mod:`.lr_policy`)."""
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        return rate

    # -- one iteration -------------------------------------------------------------------------------------
    def _display_now(self) -> bool:
        return bool(self.param.display) and self.iter % self.param.display == 0

    def forward_backward(self) -> float:
        """One forward and backward pass of the train net; returns its loss (Caffe's ``ForwardBackward``)."""
        with torch.enable_grad(), full_float32(self.net.device):
            self.net.run()
            self.train_record_shapes.after_forward()
            loss = self.net.loss()
            if loss.requires_grad:
                loss.backward()
        return float(loss.detach())

    def apply_update(self) -> None:
        """Caffe's ``SGDSolver::ApplyUpdate`` on the accumulated gradients (see :mod:`.rules`)."""
        self.rate = self.learning_rate()
        if self._display_now() and self.world.is_root:
            LOGGER.info("Iteration %d, lr = %g", self.iter, self.rate)
        diffs = [accumulated_gradient(self.net, lp) for lp in self._params]
        clip_gradients(diffs, self.param.clip_gradients)
        n = len(self._params)
        with torch.no_grad():
            for pid, (lp, diff) in enumerate(zip(self._params, diffs)):
                history = self.history[pid::n]
                update_blob(self.rule, self.param, blob_of(self.net, lp), diff, history, self.rate,
                            lp.lr_mult, lp.decay_mult, self.iter)

    def _update_smoothed_loss(self, loss: np.float32, start_iter: int, average_loss: int) -> None:
        """Caffe's ``UpdateSmoothedLoss``: the mean of the last ``average_loss`` iteration losses."""
        if len(self.losses) < average_loss:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed_loss = f32((self.smoothed_loss * f32(size - 1) + loss) / f32(size))
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss = f32(self.smoothed_loss + (loss - self.losses[idx]) / f32(average_loss))
            self.losses[idx] = loss

    def _log_outputs(self, net: Net, kind: str, values: Sequence[tuple[str, float]]) -> None:
        weights = _blob_loss_weights(net)
        for k, (name, value) in enumerate(values):
            w = weights.get(name, 0.0)
            extra = f" (* {w:g} = {float(f32(w) * f32(value)):g} loss)" if w else ""
            LOGGER.info("    %s net output #%d: %s = %g%s", kind, k, name, value, extra)

    def _log_train_outputs(self) -> None:
        LOGGER.info("Iteration %d, loss = %g", self.iter, float(self.smoothed_loss))
        outputs: list[tuple[str, float]] = []
        for name, values in _output_values(self.net):
            outputs.extend((name, float(v)) for v in values.cpu().tolist())
        self._log_outputs(self.net, "Train", outputs)

    def _test_due(self) -> bool:
        p = self.param
        return bool(p.test_interval) and self.iter % p.test_interval == 0 and \
            (self.iter > 0 or p.test_initialization)

    def _iteration(self, start_iter: int) -> None:
        """One iteration of ``step`` (see the module docstring)."""
        p = self.param
        clear_param_grads(self.net, self._params)
        if self._test_due() and self.world.is_root:
            self.test_all()
        for on_start, _ in self.callbacks:
            if on_start is not None:
                on_start()
        display = self._display_now()
        loss = f32(0.0)
        for _ in range(p.iter_size):
            loss = f32(loss + f32(self.forward_backward()))
        loss = f32(distributed.mean_value(float(f32(loss / f32(p.iter_size)))))
        self._update_smoothed_loss(loss, start_iter, p.average_loss)
        if display and self.world.is_root:
            self._log_train_outputs()
        self._average_gradients()
        for _, on_gradients_ready in self.callbacks:
            if on_gradients_ready is not None:
                on_gradients_ready()
        self.apply_update()
        self.iter += 1
        if p.snapshot and self.iter % p.snapshot == 0 and self.world.is_root:
            self.snapshot()

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's ``Solver::Step``), with a tqdm progress bar."""
        iters = int(iters)
        self._share_weights()
        start_iter = self.iter
        stop_iter = self.iter + iters
        self.losses = []
        self.smoothed_loss = f32(0.0)
        bar = tqdm(total=max(iters, 0), desc=f"Training {self.net.param.name or 'net'}", unit="iter",
                   disable=None if iters > 1 and self.world.is_root else True, dynamic_ncols=True)
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            if not bar.disable:
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm(loggers=[get_logger()]))
            while self.iter < stop_iter:
                self._iteration(start_iter)
                bar.update(1)
                bar.set_postfix(loss=f"{float(self.smoothed_loss):.4g}", lr=f"{self.rate:.3g}", refresh=False)

    def solve(self, resume_file: str | os.PathLike[str] | None = None) -> None:
        """Caffe's ``Solver::Solve``: optionally restore, train to ``max_iter``, snapshot, final display/test.

        After the last iteration: a snapshot unless one was just written (``snapshot_after_train``);
        then, when ``display`` divides ``max_iter``, one more train-net forward (no update) to log the
        loss, and when ``test_interval`` divides it, a test.
        """
        LOGGER.info("Solving %s", self.net.param.name)
        LOGGER.info("Learning Rate Policy: %s", self.param.lr_policy)
        if resume_file:
            self.restore(resume_file)
        start_iter = self.iter
        self.step(self.param.max_iter - self.iter)
        p = self.param
        root = self.world.is_root
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0) and root:
            self.snapshot()
        if self._display_now():
            with torch.no_grad():
                self.net.run()
                self.train_record_shapes.after_forward()
                loss = f32(distributed.mean_value(float(self.net.loss())))
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            if root:
                LOGGER.info("Iteration %d, loss = %g", self.iter, float(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0 and root:
            self.test_all()
        distributed.barrier()  # the workers finish together (rank 0 may still be writing its snapshot)
        LOGGER.info("Optimization Done.")

    # -- testing ---------------------------------------------------------------------------------------------
    def test_all(self) -> None:
        """Run every test net (Caffe's ``TestAll``)."""
        for i in range(len(self.test_nets)):
            self.test(i)

    def test(self, test_net_id: int = 0) -> list[tuple[str, float]]:
        """Caffe's ``Solver::Test``: ``test_iter`` forwards of a test net; logs and returns the mean of each
        output value (and ``Test loss`` when ``test_compute_loss``)."""
        LOGGER.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        share_trained_layers(net, self.net)
        n = self.param.test_iter[test_net_id]
        names: list[str] = []
        scores: Tensor | None = None
        loss = f32(0.0)
        with torch.no_grad():
            for _ in range(n):
                net.run()
                self.test_record_shapes[test_net_id].after_forward()
                if self.param.test_compute_loss:
                    loss = f32(loss + f32(float(net.loss())))
                outputs = _output_values(net)
                flat = torch.cat([v for _, v in outputs]) if outputs else torch.zeros(0)
                if scores is None:
                    names = [name for name, v in outputs for _ in range(v.numel())]
                    scores = flat.clone()
                else:
                    scores += flat
        if self.param.test_compute_loss:
            LOGGER.info("Test loss: %g", float(f32(loss / f32(n))) if n else math.nan)
        means = [] if scores is None else (scores / float(n)).cpu().tolist()
        results = list(zip(names, [float(m) for m in means]))
        self._log_outputs(net, "Test", results)
        self.test_results[test_net_id] = results
        return results

    # -- snapshots -----------------------------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        """Caffe's ``SnapshotFilename``: ``<snapshot_prefix>_iter_<iter><extension>``."""
        return snapshot_filename(self.param.snapshot_prefix, self.iter, extension)

    def snapshot(self) -> str:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``; returns the caffemodel's path.

        Raises:
            UnsupportedLayerError: ``snapshot_format: HDF5`` (only BINARYPROTO is written).
        """
        return write_snapshot(self.net, self.param, self.iter, self.current_step, self.history, self._where)

    def restore(self, state_file: str | os.PathLike[str]) -> None:
        """Resume from a ``.solverstate`` (ours or Caffe's): iteration, ``current_step``, history, and the
        weights of its ``learned_net`` (looked up as written, else beside the solverstate).

        Raises:
            ModelFormatError: the file is missing or malformed, or its history does not fit this solver.
            UnsupportedLayerError: an HDF5 solverstate (``.h5``).
        """
        path = os.fspath(state_file)
        state = read_solver_state(path)
        LOGGER.info("Restoring previous solver status from %s", path)
        check_history(state, self.history, [lp.name for lp in self._params], self.type_name, path)
        if state.HasField("learned_net"):
            self.net.copy_from(learned_net_path(state.learned_net, path))
        self.iter = int(state.iter)
        self.current_step = int(state.current_step)
        load_history(state, self.history)

    # -- pycaffe-style extras ------------------------------------------------------------------------------
    def add_callback(self, on_start: Callback | None = None,
                     on_gradients_ready: Callback | None = None) -> None:
        """Call ``on_start`` before each iteration's forward passes and ``on_gradients_ready`` before its
        update (pycaffe's ``solver.add_callback``)."""
        self.callbacks.append((on_start, on_gradients_ready))
