"""Solvers for the retrain (QAT) model: the one ``amct-caffe solver`` writes, and the checks ``amct-caffe
train`` makes before it trains (docs/amct-reference.md §3.7, docs/decisions.md row 20).

AMCT's rules for retraining: one ``net:`` (the retrain prototxt, with its TRAIN and TEST phases), a TEST
phase that runs once at the end (``test_interval = max_iter``, ``test_initialization: false``, ``test_iter``
at least the config's ``batch_num``), a snapshot at ``max_iter`` (the caffemodel ``save_quant_retrain_model``
takes), and a small learning rate (about 1/100 of the float training's).

What ``train`` refuses before any work, because it would "train" without training anything:

* no ``max_iter`` (Caffe then runs 0 iterations);
* a relative ``net:`` that exists neither in the working directory (where Caffe opens it) nor beside the
  solver file (where amct-caffe also looks);
* a TRAIN net without a loss (no gradient reaches any weight) or without a data layer (its ``Input`` blobs
  stay zero);
* a retrain model trained without ``--weights`` or ``--snapshot`` (it would start from filler values,
  not from the float model's weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.io import atomic_write, load_prototxt, prototxt_text
from amct_caffe.model.layer_types import RETRAIN_TYPES
from amct_caffe.model.phase import TRAIN, filter_net
from amct_caffe.passes.atc import DATA_SOURCE_TYPES
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("solver")

#: AMCT's sample values for retraining.
DEFAULT_BASE_LR = 1e-4
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 1e-4

#: A complete solver for a retrain model, as ``amct-caffe solver`` writes it (shown in ``train --help``).
EXAMPLE = """\
net: "/abs/path/retrain.prototxt"   # the retrain model (TRAIN and TEST phases); absolute, or relative to
                                    # the folder you run `train` from
max_iter: 1000                      # AMCT: 1/4 to 1/3 of the float training's epochs
base_lr: 0.0001                     # about 1/100 of the float training's
lr_policy: "fixed"
momentum: 0.9
weight_decay: 0.0001
display: 100
test_iter: 1                        # >= batch_num of the QAT config
test_interval: 1000                 # = max_iter: one TEST pass at the end
test_initialization: false          # AMCT: no TEST pass before training
snapshot: 1000                      # = max_iter: <prefix>_iter_1000.caffemodel for save-retrain
snapshot_prefix: "/abs/path/solver"
type: "SGD"
"""


@dataclass(frozen=True)
class RetrainSolverOptions:
    """The values of a retrain solver (module docstring)."""

    max_iter: int
    base_lr: float = DEFAULT_BASE_LR
    test_iter: int = 1
    display: int = 0
    snapshot_prefix: str | None = None


def retrain_solver(
    net_file: str, solver_file: str, options: RetrainSolverOptions
) -> caffe_pb2.SolverParameter:
    """The solver for retraining ``net_file``, following AMCT's rules (module docstring). Paths are written
    absolute, so the solver works from any working directory; the default snapshot prefix is
    ``<solver folder>/solver``.

    Raises:
        ConfigError: ``max_iter``, ``test_iter`` or ``base_lr`` out of range; ``net_file`` missing.
    """
    if options.max_iter <= 0:
        raise ConfigError(f"max_iter must be > 0, got {options.max_iter}.")
    if options.test_iter <= 0:
        raise ConfigError(f"test_iter must be > 0 (at least the QAT config's batch_num), got "
                          f"{options.test_iter}.")
    if not options.base_lr > 0:
        raise ConfigError(f"base_lr must be > 0, got {options.base_lr}.")
    if not os.path.isfile(net_file):
        raise ConfigError(f"net '{net_file}' does not exist; give the retrain prototxt written by "
                          "retrain-model.")
    folder = os.path.dirname(os.path.abspath(solver_file))
    param = caffe_pb2.SolverParameter()
    param.net = os.path.abspath(net_file)
    param.max_iter = options.max_iter
    param.base_lr = options.base_lr
    param.lr_policy = "fixed"
    param.momentum = DEFAULT_MOMENTUM
    param.weight_decay = DEFAULT_WEIGHT_DECAY
    param.display = options.display
    param.test_iter.append(options.test_iter)
    param.test_interval = options.max_iter
    param.test_initialization = False
    param.snapshot = options.max_iter
    param.snapshot_prefix = os.path.abspath(options.snapshot_prefix) if options.snapshot_prefix else \
        os.path.join(folder, "solver")
    param.type = "SGD"
    return param


def write_retrain_solver(net_file: str, solver_file: str, options: RetrainSolverOptions) -> str:
    """Write :func:`retrain_solver` to ``solver_file`` (atomically); returns the snapshot the training
    will write at ``max_iter`` (what ``save-retrain --weights`` takes).

    Raises:
        ConfigError: see :func:`retrain_solver`.
    """
    param = retrain_solver(net_file, solver_file, options)
    net = load_prototxt(net_file)
    if not any(layer.type in RETRAIN_TYPES for layer in net.layer):
        LOGGER.warning("'%s' holds no retrain layers (ActivationQAT/WeightQAT); the solver trains it as a "
                       "float net. For QAT give the model retrain-model wrote.", net_file)
    atomic_write(solver_file, prototxt_text(param).encode("utf-8"))
    return f"{param.snapshot_prefix}_iter_{param.max_iter}.caffemodel"


# -- the checks of `train` ------------------------------------------------------------------------------
def _net_path(param: caffe_pb2.SolverParameter, solver_file: str) -> str | None:
    """The train net file of the solver as the engine opens it (None: the net is inline)."""
    name = param.net or param.train_net
    if not name:
        return None
    if os.path.isabs(name) or os.path.isfile(name):
        return name
    beside = os.path.join(os.path.dirname(solver_file), name)
    if os.path.isfile(beside):
        LOGGER.warning(
            "Solver '%s': net '%s' is not in the working directory '%s' (Caffe opens it from there); "
            "using '%s' beside the solver. Real Caffe would not find it: write the path relative to the "
            "working directory, or absolute.", solver_file, name, os.getcwd(), beside)
        return beside
    raise ConfigError(
        f"Solver '{solver_file}': net '{name}' is a relative path that exists neither in the working "
        f"directory '{os.getcwd()}' (Caffe opens it from there) nor beside the solver ('{beside}'). Run "
        "from the folder the path is relative to, or write an absolute path (`amct-caffe solver` does)."
    )


def check_training_solver(param: caffe_pb2.SolverParameter, solver_file: str, has_weights: bool) -> None:
    """What ``train`` refuses before training (module docstring).

    Raises:
        ConfigError: the message names the solver or net file and says what to do.
    """
    if param.max_iter <= 0:
        raise ConfigError(
            f"Solver '{solver_file}' has no max_iter (or max_iter <= 0): training would run 0 iterations. "
            "Set max_iter (AMCT: 1/4 to 1/3 of the float training's epochs); `amct-caffe solver` writes a "
            "complete solver."
        )
    path = _net_path(param, solver_file)
    if path is None:
        return
    net = filter_net(load_prototxt(path), TRAIN, path=path)
    types = [layer.type for layer in net.layer]
    where = f"The TRAIN phase of '{path}' (the net of solver '{solver_file}')"
    if not any(t in DATA_SOURCE_TYPES for t in types):
        raise ConfigError(
            f"{where} has no data layer, so its inputs would stay zero and training would learn nothing. "
            "Build the retrain model from the training prototxt (data layers with the training data, the "
            "loss) instead of a deploy prototxt."
        )
    if not any(layer.type.endswith("Loss") or any(layer.loss_weight) for layer in net.layer):
        raise ConfigError(
            f"{where} has no loss layer, so no gradient reaches any weight. Build the retrain model from "
            "the training prototxt (with its loss layer) instead of a deploy prototxt."
        )
    if not has_weights and any(t in RETRAIN_TYPES for t in types):
        raise ConfigError(
            f"'{path}' is a retrain model but no --weights (or --snapshot) was given: training would start "
            "from filler values instead of the float model. Pass --weights with the caffemodel "
            "retrain-model wrote."
        )
