"""Caffe's solvers on the engine: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta and Adam, as BVLC Caffe trains.

A solver is built from a ``solver.prototxt`` (or a ``caffe_pb2.SolverParameter``) exactly as Caffe's
``Solver::Init`` does: one train net from ``net`` / ``net_param`` / ``train_net`` / ``train_net_param``
(built in TRAIN phase; the NetState is TRAIN, then the net's own ``state``, then ``train_state``), and one
test net per ``test_iter`` entry from ``test_net`` / ``test_net_param`` or, for the remaining entries, from
the generic ``net`` / ``net_param`` (TEST phase, merged with the net's ``state`` and ``test_state[i]``).
Test nets use the train net's learnable blobs: the tensor objects are assigned layer by layer (by layer
name, Caffe's ``ShareTrainedLayersWith``) when the solver is built and again before every test, so a test
always sees the current weights.

One iteration (Caffe's ``Solver::Step``) is: clear the parameter gradients; test when ``test_interval``
divides the iteration (not at iteration 0 unless ``test_initialization``); ``iter_size`` forward/backward
passes whose gradients accumulate (the loss reported is their mean); then ``ApplyUpdate``:

1. the learning rate of ``lr_policy`` (``GetLearningRate``, in float32 like Caffe's ``Dtype``);
2. ``ClipGradients``: when the L2 norm of all gradients exceeds ``clip_gradients`` (>= 0), all are scaled
   by ``clip_gradients / norm``;
3. per learnable blob: ``Normalize`` (the accumulated gradient times ``1 / iter_size``), ``Regularize``
   (``weight_decay * decay_mult`` times the blob (L2) or its sign (L1) added to the gradient),
   ``ComputeUpdateValue`` (the solver's rule with ``local_rate = rate * lr_mult``), then
   ``blob -= update``;
4. the iteration counter moves on; a snapshot is written when ``snapshot`` divides it.

Learnable blobs are Caffe's ``learnable_params``: every blob of every layer, in layer order, except a blob
that shares (``param { name }``) a blob seen earlier, which is updated once through its owner. The
owner's ``lr_mult``/``decay_mult`` come from the first ``ParamSpec`` of the sharing group that sets them
(later ones must agree, as Caffe CHECKs); missing ``ParamSpec`` fields mean 1. A blob whose ``lr_mult``
is 0 is never changed (Caffe's update for it is exactly 0 in every rule) and needs no gradient: the
solver turns ``requires_grad`` on only for blobs some layer trains (Caffe's ``param_propagate_down``),
and never turns it off (``WeightQAT`` enables it on its ``lr_mult: 0`` blob 0 to route the gradient to
its shadow weight).

Gradients come from autograd of ``Net.loss()`` (the sum of the loss tops times their ``loss_weight``),
which is Caffe's backward where the layers implement Caffe's gradients.

Snapshots (``snapshot``, ``snapshot_prefix``, ``snapshot_after_train``) are binary caffemodels
``<prefix>_iter_<N>.caffemodel`` plus a ``.solverstate`` (``caffe_pb2.SolverState``: ``iter``,
``learned_net``, ``current_step`` and one history blob per learnable blob, two for AdaDelta and Adam, in
Caffe's order), so real Caffe can resume from ours and we from Caffe's; :meth:`Solver.restore` reads them.
A solver read from a file without ``snapshot_prefix`` snapshots to the file's path without its extension
(``dir/solver.prototxt`` -> ``dir/solver_iter_<N>.caffemodel``), and a ``snapshot_prefix`` naming an
existing folder means ``<folder>/<solver file stem>`` (Caffe's ``UpgradeSnapshotPrefixProperty``).

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from google.protobuf import message as pb_message
from tqdm.auto import tqdm

from amct_caffe.engine.device import full_float32
from amct_caffe.engine.layers.base import TEST, TRAIN
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError, UnsupportedLayerError
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import array_to_blob, blob_shape, blob_to_array, shape_matches
from amct_caffe.model.io import atomic_write, load_prototxt, parse_prototxt_text, save_caffemodel
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.solver")

Tensor = torch.Tensor
SolverSource = str | os.PathLike | caffe_pb2.SolverParameter

#: Caffe's legacy ``solver_type`` enum values and the ``type`` strings they upgrade to.
_LEGACY_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def _f32(value: float) -> np.float32:
    """``value`` as Caffe's ``Dtype`` (float): solver arithmetic is float32 there."""
    return np.float32(value)


def _pow(base: float, exponent: float) -> float:
    """C's ``pow`` on doubles: NaN where Python would raise or return a complex number, inf on overflow."""
    try:
        return math.pow(base, exponent)
    except ValueError:
        return math.nan
    except OverflowError:
        return math.inf


# -- reading solver files -------------------------------------------------------------------------------
def upgrade_solver_type(param: caffe_pb2.SolverParameter, path: str = "") -> None:
    """Caffe's ``UpgradeSolverType``: the legacy ``solver_type`` enum becomes the ``type`` string.

    Raises:
        ModelFormatError: both fields are set (Caffe refuses that too).
    """
    if not param.HasField("solver_type"):
        return
    if param.HasField("type"):
        raise ModelFormatError(
            f"Solver '{path or '<SolverParameter>'}' sets both the old solver_type field (enum) and the new "
            "type field (string); keep only one of them (e.g. type: \"SGD\")."
        )
    param.type = _LEGACY_TYPES[param.solver_type]
    param.ClearField("solver_type")


def _boost_replace_extension(path: str) -> str:
    """``boost::filesystem::path(path).replace_extension()``: drop the last ``.ext`` of the file name."""
    head, name = os.path.split(path)
    if name in ("", ".", ".."):
        return path
    dot = name.rfind(".")
    return os.path.join(head, name[:dot]) if dot >= 0 else path


def _boost_stem(path: str) -> str:
    name = os.path.basename(path)
    if name in (".", ".."):
        return name
    dot = name.rfind(".")
    return name[:dot] if dot >= 0 else name


def read_solver_param(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    """Read a solver prototxt as Caffe's ``ReadSolverParamsFromTextFileOrDie`` does.

    After parsing: the legacy ``solver_type`` enum is upgraded to ``type``; a missing ``snapshot_prefix``
    becomes the file's path without its extension, and a prefix that names an existing folder becomes
    ``<folder>/<file stem>`` (Caffe's ``UpgradeSnapshotPrefixProperty``).

    Raises:
        ModelFormatError: the file is missing or does not parse as a SolverParameter.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFormatError(f"Solver file '{path}' does not exist; check the solver prototxt path.")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"Solver file '{path}' is not UTF-8 text; give the solver prototxt.") from exc
    param = caffe_pb2.SolverParameter()
    parse_prototxt_text(text, param, path)
    upgrade_solver_type(param, path)
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = _boost_replace_extension(path)
        LOGGER.debug("snapshot_prefix was not specified and is set to %s", param.snapshot_prefix)
    elif os.path.isdir(param.snapshot_prefix):
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, _boost_stem(path))
        LOGGER.debug("snapshot_prefix was a directory and is replaced to %s", param.snapshot_prefix)
    return param


def solver_type_name(param: caffe_pb2.SolverParameter) -> str:
    """The solver type of a SolverParameter: ``type``, or the upgraded legacy ``solver_type``."""
    if param.HasField("solver_type") and not param.HasField("type"):
        return _LEGACY_TYPES[param.solver_type]
    return param.type


# -- learnable parameters ---------------------------------------------------------------------------------
@dataclass
class LearnableParam:
    """One of Caffe's ``learnable_params``: a blob owned by ``(layer, index)`` of the train net.

    ``users`` are every ``(layer, index)`` holding it (the owner first, then the layers sharing it by
    ``param { name }``); ``need_grad`` is true when any of them has its own ``lr_mult != 0`` (Caffe then
    computes the blob's gradient).
    """

    layer: int
    index: int
    name: str
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    has_lr_mult: bool = False
    has_decay_mult: bool = False
    need_grad: bool = True
    users: list[tuple[int, int]] = field(default_factory=list)


def learnable_params(net: Net) -> list[LearnableParam]:
    """Caffe's ``Net::AppendParam`` over the whole net: the learnable blobs with their multipliers.

    Raises:
        ModelFormatError: layers sharing a named blob give different ``lr_mult`` or ``decay_mult``.
    """
    params: list[LearnableParam] = []
    by_name: dict[str, int] = {}
    for li, layer in enumerate(net.engine_layers):
        specs = layer.param.param
        for bi in range(len(layer.blobs)):
            spec = specs[bi] if bi < len(specs) else caffe_pb2.ParamSpec()
            own_need = float(spec.lr_mult) != 0.0
            if not spec.name or spec.name not in by_name:
                display = spec.name or f"{layer.name}/{bi}"
                if spec.name:
                    by_name[spec.name] = len(params)
                params.append(LearnableParam(
                    li, bi, display, float(spec.lr_mult), float(spec.decay_mult), spec.HasField("lr_mult"),
                    spec.HasField("decay_mult"), own_need, [(li, bi)],
                ))
                continue
            owner = params[by_name[spec.name]]
            owner.users.append((li, bi))
            owner.need_grad = owner.need_grad or own_need
            for attr, has_attr, what in (("lr_mult", "has_lr_mult", "lr_mult"),
                                         ("decay_mult", "has_decay_mult", "decay_mult")):
                if not spec.HasField(what):
                    continue
                value = float(getattr(spec, what))
                if getattr(owner, has_attr):
                    if value != getattr(owner, attr):
                        raise ModelFormatError(
                            f"Shared param '{spec.name}' has mismatched {what}: layer '{layer.name}' gives "
                            f"{value}, layer '{net.engine_layers[owner.layer].name}' (or an earlier sharer) "
                            f"{getattr(owner, attr)}; give every layer sharing it the same {what}."
                        )
                else:
                    setattr(owner, attr, value)
                    setattr(owner, has_attr, True)
    return params


def enable_param_grads(net: Net, params: Sequence[LearnableParam] | None = None) -> None:
    """Make every blob that some layer trains (own ``lr_mult != 0``) require grad, as Caffe's
    ``param_propagate_down``; other blobs are left as they are."""
    for p in params if params is not None else learnable_params(net):
        if not p.need_grad:
            continue
        for li, bi in p.users:
            t = net.engine_layers[li].blobs[bi]
            if t.is_leaf and not t.requires_grad:
                t.requires_grad_(True)


def share_trained_layers(target: Net, source: Net) -> None:
    """Caffe's ``Net::ShareTrainedLayersWith``: every layer of ``target`` named like a layer of ``source``
    uses ``source``'s blob tensors (the objects themselves, so later updates are seen).

    Raises:
        ModelFormatError: a layer's blob count or a blob's shape differs between the two nets.
    """
    theirs = {layer.name: layer for layer in source.engine_layers}
    for layer in target.engine_layers:
        src = theirs.get(layer.name)
        if src is None:
            continue
        if len(src.blobs) != len(layer.blobs):
            raise ModelFormatError(
                f"Incompatible number of blobs for layer '{layer.name}': {len(src.blobs)} in the train net, "
                f"{len(layer.blobs)} in the test net; the TRAIN and TEST versions of a layer must have the "
                "same parameters."
            )
        for i, blob in enumerate(src.blobs):
            if tuple(blob.shape) != tuple(layer.blobs[i].shape):
                raise ModelFormatError(
                    f"Cannot share param {i} weights from layer '{layer.name}'; shape mismatch. Source param "
                    f"shape is {tuple(blob.shape)}; target param shape is {tuple(layer.blobs[i].shape)}."
                )
            layer.blobs[i] = blob


def _blob_loss_weights(net: Net) -> dict[str, float]:
    weights: dict[str, float] = {}
    for (li, ti), w in net.loss_weights.items():
        weights[net.layer_tops[li][ti]] = w
    return weights


def _output_values(net: Net) -> list[tuple[str, Tensor]]:
    """Each output blob with its values flattened (Caffe's ``output_blobs`` in order)."""
    return [(name, net.tensor(name).detach().reshape(-1).to(torch.float32)) for name in net.outputs]


# -- the solver -----------------------------------------------------------------------------------------
class Solver:
    """Caffe's ``Solver``/``SGDSolver`` machinery; subclasses give the update rule.

    Args:
        solver: a solver prototxt path or a ``caffe_pb2.SolverParameter`` (copied).

    Attributes:
        param: the (upgraded) SolverParameter.
        net: the train net; ``test_nets``: the test nets (TEST phase, sharing the train net's blobs).
        iter: the number of updates applied so far; ``current_step``: the step of the step/multistep
            policies (saved in the solverstate).
        history: the update history, one tensor per learnable blob (two sets for AdaDelta and Adam).
        smoothed_loss: the loss averaged over the last ``average_loss`` iterations of the current step.
        test_results: per test net, ``[(output name, mean value), ...]`` of the last test.

    Raises:
        ModelFormatError: the solver or a net is malformed, or a field has a value Caffe rejects.
    """

    #: Caffe's registered type string.
    type_name = "SGD"
    #: history tensors per learnable blob (AdaDelta and Adam keep a second set after the first).
    history_sets = 1

    def __init__(self, solver: SolverSource) -> None:
        if isinstance(solver, caffe_pb2.SolverParameter):
            self.path = ""
            self.param = caffe_pb2.SolverParameter()
            self.param.CopyFrom(solver)
            upgrade_solver_type(self.param)
        else:
            self.path = os.fspath(solver)
            self.param = read_solver_param(self.path)
        self._where = f"Solver '{self.path}'" if self.path else "Solver"
        self._check_param()
        p = self.param
        if p.random_seed >= 0:
            from amct_caffe.engine.fillers import set_random_seed

            # Caffe::set_random_seed seeds every generator before the nets (and their fillers) are built
            set_random_seed(int(p.random_seed))
            torch.manual_seed(int(p.random_seed))
        self.net: Net = self._init_train_net()
        self.test_nets: list[Net] = self._init_test_nets()
        self.iter = 0
        self.current_step = 0
        self.losses: list[np.float32] = []
        self.smoothed_loss = np.float32(0.0)
        self.test_results: list[list[tuple[str, float]]] = [[] for _ in self.test_nets]
        self.callbacks: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = []
        self._params = learnable_params(self.net)
        enable_param_grads(self.net, self._params)
        for test_net in self.test_nets:
            share_trained_layers(test_net, self.net)
        self.history: list[Tensor] = []
        for _ in range(self.history_sets):
            for lp in self._params:
                blob = self._blob(lp)
                self.history.append(torch.zeros(blob.shape, dtype=torch.float32, device=blob.device))
        self._check_solver()

    # -- construction -------------------------------------------------------------------------------------
    def _check_param(self) -> None:
        p = self.param
        if p.snapshot and not p.HasField("snapshot_prefix"):
            raise ModelFormatError(
                f"{self._where}: snapshot is {p.snapshot} but snapshot_prefix is not set; give "
                "snapshot_prefix (e.g. \"models/net\" for models/net_iter_<N>.caffemodel)."
            )
        if p.average_loss < 1:
            raise ModelFormatError(f"{self._where}: average_loss is {p.average_loss}; it must be >= 1.")
        if p.iter_size < 1:
            raise ModelFormatError(f"{self._where}: iter_size is {p.iter_size}; it must be >= 1.")
        if p.regularization_type not in ("L1", "L2"):
            raise ModelFormatError(
                f"{self._where}: unknown regularization_type '{p.regularization_type}'; use \"L2\" or \"L1\"."
            )
        policy = p.lr_policy
        if policy not in LR_POLICIES:
            raise ModelFormatError(
                f"{self._where}: unknown learning rate policy '{policy}'; set lr_policy to one of "
                f"{', '.join(LR_POLICIES)}."
            )
        if policy in ("step", "sigmoid") and p.stepsize <= 0:
            raise ModelFormatError(f"{self._where}: lr_policy '{policy}' needs stepsize > 0 "
                                   f"(got {p.stepsize}).")
        if policy in ("step", "exp", "inv", "multistep", "sigmoid") and p.gamma < 0:
            raise ModelFormatError(f"{self._where}: lr_policy '{policy}' needs gamma >= 0 (got {p.gamma}).")
        if policy == "poly" and p.max_iter <= 0:
            raise ModelFormatError(f"{self._where}: lr_policy 'poly' needs max_iter > 0 (got {p.max_iter}).")

    def _check_solver(self) -> None:
        """Subclasses' constructor checks (Caffe's ``constructor_sanity_check``)."""

    def make_net(self, source: str | caffe_pb2.NetParameter, phase: int, level: int,
                 stages: Sequence[str]) -> Net:
        """Build one of the solver's nets; the pycaffe facade overrides this to build its ``Net``."""
        return Net(source, phase, level=level, stages=stages)

    def _net_file(self, name: str, field_name: str) -> str:
        """A net file named in the solver: as given (relative to the working directory, as Caffe opens
        it), else relative to the solver file's folder."""
        if os.path.isfile(name) or not self.path or os.path.isabs(name):
            return name
        beside = os.path.join(os.path.dirname(self.path), name)
        if os.path.isfile(beside):
            LOGGER.info("%s: %s '%s' is not in the working directory; using '%s' beside the solver file.",
                        self._where, field_name, name, beside)
            return beside
        return name

    def _build(self, source: str | caffe_pb2.NetParameter, phase: int,
               extra_state: caffe_pb2.NetState | None) -> Net:
        """Merge the NetState as Caffe does (phase, then the net's own state, then the solver's), build."""
        net_param = load_prototxt(source) if isinstance(source, str) else source
        state = caffe_pb2.NetState(phase=phase)
        state.MergeFrom(net_param.state)
        if extra_state is not None:
            state.MergeFrom(extra_state)
        return self.make_net(source, state.phase, state.level, list(state.stage))

    def _init_train_net(self) -> Net:
        p = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        names = "net, net_param, train_net, train_net_param"
        if not fields:
            raise ModelFormatError(
                f"{self._where} must specify a train net using one of these fields: {names}."
            )
        if len(fields) > 1:
            raise ModelFormatError(
                f"{self._where} must not contain more than one of these fields specifying a train net: "
                f"{names} (it sets {', '.join(fields)})."
            )
        which = fields[0]
        if which in ("net", "train_net"):
            source: str | caffe_pb2.NetParameter = self._net_file(getattr(p, which), which)
            LOGGER.info("Creating training net from %s file: %s", which, source)
        else:
            source = getattr(p, which)
            LOGGER.info("Creating training net specified in %s.", which)
        net = self._build(source, TRAIN, p.train_state if p.HasField("train_state") else None)
        for weights in p.weights:
            for model in weights.split(","):
                LOGGER.info("Copying weights from %s into the train net.", model)
                net.copy_from(model)
        return net

    def _init_test_nets(self) -> list[Net]:
        p = self.param
        generic = int(p.HasField("net")) + int(p.HasField("net_param"))
        if generic > 1:
            raise ModelFormatError(f"{self._where}: both net_param and net may not be specified.")
        specific = len(p.test_net_param) + len(p.test_net)
        if generic and len(p.test_iter) < specific:
            raise ModelFormatError(f"{self._where}: test_iter must be specified for each test network "
                                   f"({specific} test nets, {len(p.test_iter)} test_iter).")
        if not generic and len(p.test_iter) != specific:
            raise ModelFormatError(f"{self._where}: test_iter must be specified for each test network "
                                   f"({specific} test nets, {len(p.test_iter)} test_iter).")
        count = len(p.test_iter)
        if len(p.test_state) and len(p.test_state) != count:
            raise ModelFormatError(
                f"{self._where}: test_state must be unspecified or specified once per test net ({count} test "
                f"nets, {len(p.test_state)} test_state)."
            )
        if count and p.test_interval <= 0:
            raise ModelFormatError(
                f"{self._where} has {count} test net(s) (test_iter) but test_interval is {p.test_interval}; "
                "set test_interval > 0 (AMCT's retrain flow: test_interval = max_iter)."
            )
        sources: list[str | caffe_pb2.NetParameter] = []
        sources.extend(p.test_net_param)
        sources.extend(self._net_file(name, "test_net") for name in p.test_net)
        remaining = count - len(sources)
        if p.HasField("net_param"):
            sources.extend([p.net_param] * remaining)
        elif p.HasField("net"):
            sources.extend([self._net_file(p.net, "net")] * remaining)
        nets = []
        for i, source in enumerate(sources):
            LOGGER.info("Creating test net (#%d) specified by %s", i,
                        source if isinstance(source, str) else "a NetParameter")
            nets.append(self._build(source, TEST, p.test_state[i] if len(p.test_state) else None))
        return nets

    # -- learning rate --------------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """Caffe's ``SGDSolver::GetLearningRate`` at the current iteration (a float32 value).

        ``step`` sets ``current_step = iter // stepsize``; ``multistep`` advances ``current_step`` by at
        most one per call, when ``iter >= stepvalue[current_step]`` (Caffe's quirk: it is a state, moved
        forward only by calls, as the solver makes one per iteration).
        """
        p = self.param
        policy = p.lr_policy
        base = float(_f32(p.base_lr))
        gamma = _f32(p.gamma)
        it = self.iter
        if policy == "fixed":
            rate = base
        elif policy == "step":
            self.current_step = it // p.stepsize
            rate = base * _pow(float(gamma), self.current_step)
        elif policy == "exp":
            rate = base * _pow(float(gamma), it)
        elif policy == "inv":
            x = _f32(1.0) + gamma * _f32(it)
            rate = base * _pow(float(x), -float(_f32(p.power)))
        elif policy == "multistep":
            if self.current_step < len(p.stepvalue) and it >= p.stepvalue[self.current_step]:
                self.current_step += 1
                LOGGER.info("MultiStep Status: Iteration %d, step = %d", it, self.current_step)
            rate = base * _pow(float(gamma), self.current_step)
        elif policy == "poly":
            x = _f32(1.0) - _f32(it) / _f32(p.max_iter)
            rate = base * _pow(float(x), float(_f32(p.power)))
        elif policy == "sigmoid":
            arg = float(-gamma * (_f32(it) - _f32(p.stepsize)))
            try:
                e = math.exp(arg)
            except OverflowError:
                e = math.inf
            rate = base * (1.0 / (1.0 + e))
        else:  # pragma: no cover - rejected at construction
            raise ModelFormatError(f"{self._where}: unknown learning rate policy '{policy}'.")
        return float(_f32(rate))

    # -- parameters ---------------------------------------------------------------------------------------
    def _blob(self, lp: LearnableParam) -> Tensor:
        return self.net.engine_layers[lp.layer].blobs[lp.index]

    @property
    def learnable(self) -> list[LearnableParam]:
        """The train net's learnable blobs in Caffe's order (the history's order)."""
        return list(self._params)

    def _clear_grads(self) -> None:
        """Caffe's ``ClearParamDiffs`` (and re-enable gradients of blobs ``copy_from`` may have replaced)."""
        for layer in self.net.engine_layers:
            for blob in layer.blobs:
                if blob.is_leaf:
                    blob.grad = None
        enable_param_grads(self.net, self._params)

    def _gradient(self, lp: LearnableParam) -> Tensor | None:
        """The blob's accumulated gradient (summed over the tensors of its users), or None when Caffe
        computes none for it (no user has ``lr_mult != 0``) or none arrived."""
        if not lp.need_grad:
            return None
        total: Tensor | None = None
        seen: set[int] = set()
        owner = self._blob(lp)
        for li, bi in lp.users:
            t = self.net.engine_layers[li].blobs[bi]
            if id(t) in seen or t.grad is None:
                continue
            seen.add(id(t))
            g = t.grad.detach().reshape(owner.shape)
            total = g.clone() if total is None else total.add_(g)
        return total

    # -- one iteration -------------------------------------------------------------------------------------
    def _display_now(self) -> bool:
        return bool(self.param.display) and self.iter % self.param.display == 0

    def forward_backward(self) -> float:
        """One forward and backward pass of the train net; returns its loss (Caffe's ``ForwardBackward``)."""
        with torch.enable_grad(), full_float32(self.net.device):
            self.net.run()
            loss = self.net.loss()
            if loss.requires_grad:
                loss.backward()
        return float(loss.detach())

    def _update_smoothed_loss(self, loss: np.float32, start_iter: int, average_loss: int) -> None:
        """Caffe's ``UpdateSmoothedLoss``: the mean of the last ``average_loss`` iteration losses."""
        if len(self.losses) < average_loss:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed_loss = _f32((self.smoothed_loss * _f32(size - 1) + loss) / _f32(size))
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss = _f32(self.smoothed_loss + (loss - self.losses[idx]) / _f32(average_loss))
            self.losses[idx] = loss

    def _log_outputs(self, net: Net, kind: str, values: Sequence[tuple[str, float]]) -> None:
        weights = _blob_loss_weights(net)
        for k, (name, value) in enumerate(values):
            w = weights.get(name, 0.0)
            extra = f" (* {w:g} = {float(_f32(w) * _f32(value)):g} loss)" if w else ""
            LOGGER.info("    %s net output #%d: %s = %g%s", kind, k, name, value, extra)

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's ``Solver::Step``); see the module docstring for one iteration."""
        iters = int(iters)
        start_iter = self.iter
        stop_iter = self.iter + iters
        average_loss = self.param.average_loss
        self.losses = []
        self.smoothed_loss = _f32(0.0)
        bar = tqdm(total=max(iters, 0), desc=f"Training {self.net.param.name or 'net'}", unit="iter",
                   disable=None if iters > 1 else True, dynamic_ncols=True)
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            if not bar.disable:
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm(loggers=[get_logger()]))
            while self.iter < stop_iter:
                self._clear_grads()
                p = self.param
                if p.test_interval and self.iter % p.test_interval == 0 and \
                        (self.iter > 0 or p.test_initialization):
                    self.test_all()
                for on_start, _ in self.callbacks:
                    if on_start is not None:
                        on_start()
                display = self._display_now()
                loss = _f32(0.0)
                for _ in range(p.iter_size):
                    loss = _f32(loss + _f32(self.forward_backward()))
                loss = _f32(loss / _f32(p.iter_size))
                self._update_smoothed_loss(loss, start_iter, average_loss)
                if display:
                    LOGGER.info("Iteration %d, loss = %g", self.iter, float(self.smoothed_loss))
                    outputs = []
                    for name, values in _output_values(self.net):
                        outputs.extend((name, float(v)) for v in values.cpu().tolist())
                    self._log_outputs(self.net, "Train", outputs)
                for _, on_gradients_ready in self.callbacks:
                    if on_gradients_ready is not None:
                        on_gradients_ready()
                self.apply_update()
                self.iter += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(self.smoothed_loss):.4g}", lr=f"{self._rate:.3g}",
                                refresh=False)
                if p.snapshot and self.iter % p.snapshot == 0:
                    self.snapshot()

    def solve(self, resume_file: str | os.PathLike | None = None) -> None:
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
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self._display_now():
            with torch.no_grad():
                self.net.run()
                loss = _f32(float(self.net.loss()))
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            LOGGER.info("Iteration %d, loss = %g", self.iter, float(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
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
        loss = _f32(0.0)
        with torch.no_grad():
            for i in range(n):
                net.run()
                if self.param.test_compute_loss:
                    loss = _f32(loss + _f32(float(net.loss())))
                outputs = _output_values(net)
                flat = torch.cat([v for _, v in outputs]) if outputs else torch.zeros(0)
                if i == 0:
                    names = [name for name, v in outputs for _ in range(v.numel())]
                    scores = flat.clone()
                else:
                    assert scores is not None
                    scores += flat
        if self.param.test_compute_loss:
            LOGGER.info("Test loss: %g", float(_f32(loss / _f32(n))) if n else math.nan)
        means = [] if scores is None else (scores / float(n)).cpu().tolist()
        results = list(zip(names, [float(m) for m in means]))
        self._log_outputs(net, "Test", results)
        self.test_results[test_net_id] = results
        return results

    # -- the update -----------------------------------------------------------------------------------------
    _rate: float = 0.0

    def apply_update(self) -> None:
        """Caffe's ``SGDSolver::ApplyUpdate`` on the accumulated gradients (see the module docstring)."""
        rate = self.learning_rate()
        self._rate = rate
        if self._display_now():
            LOGGER.info("Iteration %d, lr = %g", self.iter, rate)
        diffs = [self._gradient(lp) for lp in self._params]
        self._clip_gradients(diffs)
        p = self.param
        normalization = _f32(1.0) / _f32(p.iter_size)
        weight_decay = _f32(p.weight_decay)
        with torch.no_grad():
            for pid, (lp, diff) in enumerate(zip(self._params, diffs)):
                if lp.lr_mult == 0.0:
                    continue  # every rule multiplies by local_rate = 0: the blob does not change
                data = self._blob(lp)
                if diff is None:
                    diff = torch.zeros_like(data)
                if p.iter_size != 1:
                    diff.mul_(float(normalization))
                local_decay = float(weight_decay * _f32(lp.decay_mult))
                if local_decay:
                    if p.regularization_type == "L2":
                        diff.add_(data.detach(), alpha=local_decay)
                    else:
                        diff.add_(torch.sign(data.detach()), alpha=local_decay)
                local_rate = float(_f32(rate) * _f32(lp.lr_mult))
                update = self.compute_update_value(pid, local_rate, diff)
                data.sub_(update)

    def _clip_gradients(self, diffs: list[Tensor | None]) -> None:
        clip = float(_f32(self.param.clip_gradients))
        if clip < 0:
            return
        present = [d for d in diffs if d is not None]
        if not present:
            return
        sumsq = torch.stack([d.pow(2).sum().cpu() for d in present]).sum()
        l2norm = float(torch.sqrt(sumsq))
        if l2norm > clip:
            scale = float(_f32(clip) / _f32(l2norm))
            LOGGER.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale factor %g",
                        l2norm, clip, scale)
            for d in present:
                d.mul_(scale)

    def compute_update_value(self, pid: int, local_rate: float, diff: Tensor) -> Tensor:
        """The value subtracted from learnable blob ``pid`` given its regularised gradient ``diff``."""
        raise NotImplementedError

    # -- snapshots -----------------------------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        """Caffe's ``SnapshotFilename``: ``<snapshot_prefix>_iter_<iter><extension>``."""
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> str:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``; returns the caffemodel's path.

        Raises:
            UnsupportedLayerError: ``snapshot_format: HDF5`` (only BINARYPROTO is written).
        """
        if self.param.snapshot_format != caffe_pb2.SolverParameter.BINARYPROTO:
            raise UnsupportedLayerError(
                f"{self._where}: snapshot_format HDF5 is not supported; remove snapshot_format (the default "
                "BINARYPROTO writes .caffemodel and .solverstate files)."
            )
        model_filename = self.snapshot_filename(".caffemodel")
        LOGGER.info("Snapshotting to binary proto file %s", model_filename)
        if self.param.snapshot_diff:
            save_caffemodel(self.net.to_proto(write_diff=True), model_filename)
        else:
            self.net.save(model_filename)
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=model_filename,
                                      current_step=self.current_step)
        for h in self.history:
            array_to_blob(h.detach().cpu().numpy(), state.history.add())
        state_filename = self.snapshot_filename(".solverstate")
        LOGGER.info("Snapshotting solver state to binary proto file %s", state_filename)
        atomic_write(state_filename, state.SerializeToString())
        return model_filename

    def restore(self, state_file: str | os.PathLike) -> None:
        """Resume from a ``.solverstate`` (ours or Caffe's): iteration, ``current_step``, history, and the
        weights of its ``learned_net`` (looked up as written, else beside the solverstate).

        Raises:
            ModelFormatError: the file is missing or malformed, or its history does not fit this solver.
            UnsupportedLayerError: an HDF5 solverstate (``.h5``).
        """
        path = os.fspath(state_file)
        if path.endswith(".h5"):
            raise UnsupportedLayerError(f"Cannot restore '{path}': HDF5 solver states are not supported; use "
                                        "the binary .solverstate.")
        if not os.path.isfile(path):
            raise ModelFormatError(f"Solver state '{path}' does not exist; check the .solverstate path.")
        LOGGER.info("Restoring previous solver status from %s", path)
        state = caffe_pb2.SolverState()
        try:
            state.ParseFromString(Path(path).read_bytes())
        except pb_message.DecodeError as exc:
            raise ModelFormatError(f"Solver state '{path}' is not a binary SolverState: {exc}.") from exc
        if len(state.history) != len(self.history):
            raise ModelFormatError(
                f"Incorrect length of history blobs in '{path}': {len(state.history)}, but this "
                f"{self.type_name} solver keeps {len(self.history)}; restore a state of the same solver type "
                "and net."
            )
        for i, blob in enumerate(state.history):
            if not shape_matches(blob, self.history[i].shape):
                raise ModelFormatError(
                    f"History blob {i} of '{path}' has shape {blob_shape(blob)} but learnable blob "
                    f"{self._params[i % len(self._params)].name} has {tuple(self.history[i].shape)}; the "
                    "solver state belongs to another net."
                )
        if state.HasField("learned_net"):
            self.net.copy_from(self._learned_net(state.learned_net, path))
        self.iter = int(state.iter)
        self.current_step = int(state.current_step)
        with torch.no_grad():
            for h, blob in zip(self.history, state.history):
                h.copy_(torch.from_numpy(blob_to_array(blob, tuple(h.shape))).to(h.device))

    @staticmethod
    def _learned_net(name: str, state_path: str) -> str:
        if os.path.isfile(name):
            return name
        folder = os.path.dirname(state_path)
        candidates = [] if os.path.isabs(name) else [os.path.join(folder, name)]
        candidates.append(os.path.join(folder, os.path.basename(name)))
        for candidate in candidates:
            if os.path.isfile(candidate):
                return candidate
        raise ModelFormatError(f"The learned net '{name}' named in solver state '{state_path}' does not "
                               "exist (neither as written nor beside the solver state).")

    # -- pycaffe-style extras ------------------------------------------------------------------------------
    def add_callback(self, on_start: Callable[[], None] | None = None,
                     on_gradients_ready: Callable[[], None] | None = None) -> None:
        """Call ``on_start`` before each iteration's forward passes and ``on_gradients_ready`` before its
        update (pycaffe's ``solver.add_callback``)."""
        self.callbacks.append((on_start, on_gradients_ready))


# -- update rules -----------------------------------------------------------------------------------------
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum: ``h = momentum * h + local_rate * g``; ``w -= h``."""

    type_name = "SGD"

    def compute_update_value(self, pid: int, local_rate: float, diff: Tensor) -> Tensor:
        h = self.history[pid]
        h.mul_(float(_f32(self.param.momentum))).add_(diff, alpha=local_rate)
        return h


class NesterovSolver(Solver):
    """Nesterov's accelerated gradient, as Caffe writes it: ``h' = momentum * h + local_rate * g``;
    ``w -= (1 + momentum) * h' - momentum * h``."""

    type_name = "Nesterov"

    def compute_update_value(self, pid: int, local_rate: float, diff: Tensor) -> Tensor:
        h = self.history[pid]
        momentum = float(_f32(self.param.momentum))
        previous = h.clone()
        h.mul_(momentum).add_(diff, alpha=local_rate)
        return h.mul(float(_f32(1.0) + _f32(momentum))).sub_(previous, alpha=momentum)


class AdaGradSolver(Solver):
    """AdaGrad: ``h += g^2``; ``w -= local_rate * g / (sqrt(h) + delta)``. Caffe refuses momentum."""

    type_name = "AdaGrad"

    def _check_solver(self) -> None:
        if self.param.momentum != 0:
            raise ModelFormatError(f"{self._where}: momentum cannot be used with AdaGrad (momentum is "
                                   f"{self.param.momentum}); remove it.")

    def compute_update_value(self, pid: int, local_rate: float, diff: Tensor) -> Tensor:
        h = self.history[pid]
        h.add_(diff * diff)
        return diff / (h.sqrt() + float(_f32(self.param.delta))) * local_rate


class RMSPropSolver(Solver):
    """RMSProp: ``h = (1 - rms_decay) * g^2 + rms_decay * h``; ``w -= local_rate * g / (sqrt(h) + delta)``.
    Caffe refuses momentum and needs ``0 <= rms_decay < 1``."""

    type_name = "RMSProp"

    def _check_solver(self) -> None:
        p = self.param
        if p.momentum != 0:
            raise ModelFormatError(f"{self._where}: momentum cannot be used with RMSProp (momentum is "
                                   f"{p.momentum}); remove it.")
        if not 0 <= p.rms_decay < 1:
            raise ModelFormatError(
                f"{self._where}: rms_decay should lie between 0 and 1 (got {p.rms_decay})."
            )

    def compute_update_value(self, pid: int, local_rate: float, diff: Tensor) -> Tensor:
        h = self.history[pid]
        decay = _f32(self.param.rms_decay)
        h.mul_(float(decay)).add_(diff * diff, alpha=float(_f32(1.0) - decay))
        return diff / (h.sqrt() + float(_f32(self.param.delta))) * local_rate


class AdaDeltaSolver(Solver):
    """AdaDelta (Caffe's form, ``momentum`` as the decay, ``delta`` as epsilon; history: ``E[g^2]`` then
    ``E[dx^2]``)::

        E[g^2]  = (1 - momentum) g^2 + momentum E[g^2]
        dx      = g * sqrt((E[dx^2] + delta) / (E[g^2] + delta))
        E[dx^2] = (1 - momentum) dx^2 + momentum E[dx^2]
        w      -= local_rate * dx
    """

    type_name = "AdaDelta"
    history_sets = 2

    def compute_update_value(self, pid: int, local_rate: float, diff: Tensor) -> Tensor:
        n = len(self._params)
        hg, hu = self.history[pid], self.history[pid + n]
        momentum = _f32(self.param.momentum)
        delta = float(_f32(self.param.delta))
        one_minus = float(_f32(1.0) - momentum)
        hg.mul_(float(momentum)).add_(diff * diff, alpha=one_minus)
        dx = diff * ((hu + delta) / (hg + delta)).sqrt()
        hu.mul_(float(momentum)).add_(dx * dx, alpha=one_minus)
        return dx.mul_(local_rate)


class AdamSolver(Solver):
    """Adam with Caffe's bias correction (history: ``m`` then ``v``; ``t = iter + 1``)::

        m  = beta1 m + (1 - beta1) g          (beta1 = momentum)
        v  = beta2 v + (1 - beta2) g^2        (beta2 = momentum2)
        w -= local_rate * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + delta)

    ``delta`` (epsilon) is added outside the square root and is not bias-corrected, as in Caffe.
    """

    type_name = "Adam"
    history_sets = 2

    def compute_update_value(self, pid: int, local_rate: float, diff: Tensor) -> Tensor:
        n = len(self._params)
        m, v = self.history[pid], self.history[pid + n]
        beta1, beta2 = _f32(self.param.momentum), _f32(self.param.momentum2)
        t = self.iter + 1
        correction = _f32(math.sqrt(1.0 - _pow(float(beta2), t)) / (1.0 - _pow(float(beta1), t)))
        m.mul_(float(beta1)).add_(diff, alpha=float(_f32(1.0) - beta1))
        v.mul_(float(beta2)).add_(diff * diff, alpha=float(_f32(1.0) - beta2))
        step = m / (v.sqrt() + float(_f32(self.param.delta)))
        return step.mul_(float(_f32(local_rate) * correction))


#: Caffe's solver registry: ``type`` string -> class.
SOLVERS: dict[str, type[Solver]] = {
    cls.type_name: cls
    for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)
}


def solver_class(type_name: str, where: str = "", registry: dict[str, type[Solver]] | None = None
                 ) -> type[Solver]:
    """The class registered for a solver ``type`` (Caffe's ``SolverRegistry``)."""
    registry = SOLVERS if registry is None else registry
    try:
        return registry[type_name]
    except KeyError:
        raise ModelFormatError(
            f"{where or 'Solver'}: unknown solver type '{type_name}' (known types: "
            f"{', '.join(registry)})."
        ) from None


def get_solver(solver: SolverSource) -> Solver:
    """A solver of the type the SolverParameter names (``type``, or the legacy ``solver_type``)."""
    if isinstance(solver, caffe_pb2.SolverParameter):
        param, where = solver, "Solver"
    else:
        param, where = read_solver_param(solver), f"Solver '{os.fspath(solver)}'"
    return solver_class(solver_type_name(param), where)(solver)


__all__ = [
    "SOLVERS",
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "LearnableParam",
    "NesterovSolver",
    "RMSPropSolver",
    "SGDSolver",
    "Solver",
    "enable_param_grads",
    "get_solver",
    "learnable_params",
    "read_solver_param",
    "share_trained_layers",
    "solver_class",
    "solver_type_name",
    "upgrade_solver_type",
]
