"""Solver files: reading and upgrading a ``SolverParameter``, the checks Caffe makes, and the nets it names.

Reading follows Caffe's ``ReadSolverParamsFromTextFileOrDie``: the legacy ``solver_type`` enum becomes the
``type`` string (``UpgradeSolverType``); a missing ``snapshot_prefix`` becomes the file's path without its
extension and a prefix naming an existing folder becomes ``<folder>/<file stem>``
(``UpgradeSnapshotPrefixProperty``).

The nets follow ``Solver::InitTrainNet``/``InitTestNets``: one train net from exactly one of ``net``,
``net_param``, ``train_net``, ``train_net_param`` (TRAIN phase; the NetState is TRAIN, then the net's own
``state``, then ``train_state``), and one test net per ``test_iter`` entry from ``test_net_param``, then
``test_net``, then the generic ``net``/``net_param`` for the remaining entries (TEST phase, merged with the
net's ``state`` and ``test_state[i]``). A net file is opened as written (relative to the working directory,
as Caffe does), else beside the solver file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from amct_caffe.engine.layers.base import TEST, TRAIN
from amct_caffe.engine.solver.lr_policy import check_lr_policy
from amct_caffe.errors import ModelFormatError
from amct_caffe.log import get_logger
from amct_caffe.model.io import load_prototxt, parse_prototxt_text
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.solver")

SolverSource: TypeAlias = str | os.PathLike[str] | caffe_pb2.SolverParameter
NetSource: TypeAlias = str | caffe_pb2.NetParameter

#: Caffe's legacy ``solver_type`` enum values and the ``type`` strings they upgrade to.
LEGACY_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}

_TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


# -- reading ---------------------------------------------------------------------------------------------
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
    param.type = LEGACY_TYPES[param.solver_type]
    param.ClearField("solver_type")


def _boost_replace_extension(path: str) -> str:
    """``boost::filesystem::path(path).replace_extension()``: drop the last ``.ext`` of the file name."""
    head, name = os.path.split(path)
    if name in ("", ".", ".."):
        return path
    dot = name.rfind(".")
    return os.path.join(head, name[:dot]) if dot >= 0 else path


def _boost_stem(path: str) -> str:
    """``boost::filesystem::path(path).stem()``."""
    name = os.path.basename(path)
    if name in (".", ".."):
        return name
    dot = name.rfind(".")
    return name[:dot] if dot >= 0 else name


def read_solver_param(path: str | os.PathLike[str]) -> caffe_pb2.SolverParameter:
    """Read a solver prototxt as Caffe's ``ReadSolverParamsFromTextFileOrDie`` does (see the module doc).

    Raises:
        ModelFormatError: the file is missing, not UTF-8 text, or does not parse as a SolverParameter.
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


def load_solver(source: SolverSource) -> tuple[caffe_pb2.SolverParameter, str]:
    """The upgraded SolverParameter of a solver file or message (a message is copied), and the file's path
    ("" for a message)."""
    if isinstance(source, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(source)
        upgrade_solver_type(param)
        return param, ""
    path = os.fspath(source)
    return read_solver_param(path), path


def solver_type_name(param: caffe_pb2.SolverParameter) -> str:
    """The solver type of a SolverParameter: ``type``, or the upgraded legacy ``solver_type``."""
    if param.HasField("solver_type") and not param.HasField("type"):
        return LEGACY_TYPES[param.solver_type]
    return param.type


def solver_where(path: str) -> str:
    """How messages name a solver: ``Solver '<path>'``, or ``Solver`` for one given as a message."""
    return f"Solver '{path}'" if path else "Solver"


# -- checks --------------------------------------------------------------------------------------------------
def check_solver_param(p: caffe_pb2.SolverParameter, where: str) -> None:
    """The checks Caffe's ``Solver::Init`` and ``SGDSolver`` make on the fields the loop and the learning rate
    read (the update rule's own checks are the rule's; the nets' fields are checked where they are read).

    Raises:
        ModelFormatError: a field has a value Caffe rejects; the message names the field and the fix.
    """
    if p.snapshot and not p.HasField("snapshot_prefix"):
        raise ModelFormatError(
            f"{where}: snapshot is {p.snapshot} but snapshot_prefix is not set; give snapshot_prefix (e.g. "
            "\"models/net\" for models/net_iter_<N>.caffemodel)."
        )
    if p.average_loss < 1:
        raise ModelFormatError(f"{where}: average_loss is {p.average_loss}; it must be >= 1.")
    if p.iter_size < 1:
        raise ModelFormatError(f"{where}: iter_size is {p.iter_size}; it must be >= 1.")
    if p.regularization_type not in ("L1", "L2"):
        raise ModelFormatError(
            f"{where}: unknown regularization_type '{p.regularization_type}'; use \"L2\" or \"L1\"."
        )
    check_lr_policy(p, where)


# -- the nets ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetSpec:
    """One net a solver builds: its prototxt (path or message), phase and the solver's extra NetState."""

    source: NetSource
    phase: int
    extra_state: caffe_pb2.NetState | None
    #: how the log names the source, e.g. ``net file: models/train.prototxt``.
    origin: str

    def state(self) -> caffe_pb2.NetState:
        """The NetState as Caffe merges it: the phase, then the net's own ``state``, then the solver's."""
        net_param = load_prototxt(self.source) if isinstance(self.source, str) else self.source
        state = caffe_pb2.NetState()
        state.phase = caffe_pb2.Phase.Value(caffe_pb2.Phase.Name(self.phase))
        state.MergeFrom(net_param.state)
        if self.extra_state is not None:
            state.MergeFrom(self.extra_state)
        return state


def net_file(name: str, field_name: str, solver_path: str, where: str) -> str:
    """A net file named in a solver: as given when it exists (or is absolute, or the solver is a message),
    else the file of that name beside the solver file when that one exists, else as given."""
    if os.path.isfile(name) or not solver_path or os.path.isabs(name):
        return name
    beside = os.path.join(os.path.dirname(solver_path), name)
    if os.path.isfile(beside):
        LOGGER.info("%s: %s '%s' is not in the working directory; using '%s' beside the solver file.",
                    where, field_name, name, beside)
        return beside
    return name


def train_net_spec(p: caffe_pb2.SolverParameter, solver_path: str, where: str) -> NetSpec:
    """The train net of a solver (Caffe's ``InitTrainNet``).

    Raises:
        ModelFormatError: none, or more than one, of the train-net fields is set.
    """
    fields = [f for f in _TRAIN_NET_FIELDS if p.HasField(f)]
    names = ", ".join(_TRAIN_NET_FIELDS)
    if not fields:
        raise ModelFormatError(f"{where} must specify a train net using one of these fields: {names}.")
    if len(fields) > 1:
        raise ModelFormatError(
            f"{where} must not contain more than one of these fields specifying a train net: {names} (it "
            f"sets {', '.join(fields)})."
        )
    extra = p.train_state if p.HasField("train_state") else None
    which = fields[0]
    if which == "net":
        return NetSpec(net_file(p.net, which, solver_path, where), TRAIN, extra, "net file")
    if which == "train_net":
        return NetSpec(net_file(p.train_net, which, solver_path, where), TRAIN, extra, "train_net file")
    return NetSpec(p.net_param if which == "net_param" else p.train_net_param, TRAIN, extra, which)


def test_net_specs(p: caffe_pb2.SolverParameter, solver_path: str, where: str) -> list[NetSpec]:
    """The test nets of a solver, one per ``test_iter`` entry (Caffe's ``InitTestNets``).

    Raises:
        ModelFormatError: the test-net fields, ``test_iter``, ``test_state`` and ``test_interval`` do not
            agree as Caffe requires.
    """
    generic = int(p.HasField("net")) + int(p.HasField("net_param"))
    if generic > 1:
        raise ModelFormatError(f"{where}: both net_param and net may not be specified.")
    specific = len(p.test_net_param) + len(p.test_net)
    count = len(p.test_iter)
    if (generic and count < specific) or (not generic and count != specific):
        raise ModelFormatError(f"{where}: test_iter must be specified for each test network ({specific} test "
                               f"nets, {count} test_iter).")
    if len(p.test_state) and len(p.test_state) != count:
        raise ModelFormatError(
            f"{where}: test_state must be unspecified or specified once per test net ({count} test nets, "
            f"{len(p.test_state)} test_state)."
        )
    if count and p.test_interval <= 0:
        raise ModelFormatError(
            f"{where} has {count} test net(s) (test_iter) but test_interval is {p.test_interval}; set "
            "test_interval > 0 (AMCT's retrain flow: test_interval = max_iter)."
        )
    sources: list[tuple[NetSource, str]] = [(net, "test_net_param") for net in p.test_net_param]
    sources += [(net_file(name, "test_net", solver_path, where), "test_net file") for name in p.test_net]
    remaining = count - len(sources)
    if p.HasField("net_param"):
        sources += [(p.net_param, "net_param")] * remaining
    elif p.HasField("net"):
        sources += [(net_file(p.net, "net", solver_path, where), "net file")] * remaining
    return [
        NetSpec(source, TEST, p.test_state[i] if len(p.test_state) else None, origin)
        for i, (source, origin) in enumerate(sources)
    ]
