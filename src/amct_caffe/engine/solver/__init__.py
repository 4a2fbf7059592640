"""Caffe's solvers on the engine: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta and Adam, as BVLC Caffe trains.

The package is split as Caffe's solver is:

* :mod:`.param` -- the solver file: reading, the ``solver_type`` upgrade, Caffe's checks, the train and test
  nets it names;
* :mod:`.lr_policy` -- the learning-rate policies, one function per ``lr_policy``;
* :mod:`.rules` -- the update rules, one function per solver type, and the steps around them
  (ClipGradients, Normalize, Regularize) in Caffe's order;
* :mod:`.learnable` -- which blobs are learnable, with their ``lr_mult``/``decay_mult``, and how test nets
  share them;
* :mod:`.snapshot` -- caffemodel + ``.solverstate`` snapshots and restore;
* :mod:`.loop` -- :class:`Solver`: the nets, ``step``/``solve``, ``iter_size``, display, tests, progress;
* :mod:`.registry` -- one class per type and :func:`get_solver`.

A solver read from a file without ``snapshot_prefix`` snapshots to the file's path without its extension
(``dir/solver.prototxt`` -> ``dir/solver_iter_<N>.caffemodel``), and a ``snapshot_prefix`` naming an
existing folder means ``<folder>/<solver file stem>``, as Caffe does.
"""

from __future__ import annotations

from amct_caffe.engine.solver.learnable import (
    LearnableParam,
    enable_param_grads,
    learnable_params,
    share_trained_layers,
)
from amct_caffe.engine.solver.loop import LOGGER, Solver
from amct_caffe.engine.solver.lr_policy import LR_POLICIES, learning_rate
from amct_caffe.engine.solver.param import (
    read_solver_param,
    solver_type_name,
    upgrade_solver_type,
)
from amct_caffe.engine.solver.registry import (
    SOLVERS,
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    get_solver,
    solver_class,
)
from amct_caffe.engine.solver.rules import UPDATE_RULES, UpdateRule

__all__ = [
    "LOGGER",
    "LR_POLICIES",
    "SOLVERS",
    "UPDATE_RULES",
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "LearnableParam",
    "NesterovSolver",
    "RMSPropSolver",
    "SGDSolver",
    "Solver",
    "UpdateRule",
    "enable_param_grads",
    "get_solver",
    "learnable_params",
    "learning_rate",
    "read_solver_param",
    "share_trained_layers",
    "solver_class",
    "solver_type_name",
    "upgrade_solver_type",
]
