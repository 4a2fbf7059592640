"""Caffe's solver classes, one per ``type``, and ``get_solver`` (Caffe's ``SolverRegistry``)."""

from __future__ import annotations

from collections.abc import Mapping

from amct_caffe.engine.solver.loop import Solver
from amct_caffe.engine.solver.param import SolverSource, load_solver, solver_type_name, solver_where
from amct_caffe.errors import ModelFormatError


class SGDSolver(Solver):
    """Stochastic gradient descent with momentum (:func:`.rules.sgd`)."""

    type_name = "SGD"


class NesterovSolver(Solver):
    """Nesterov's accelerated gradient (:func:`.rules.nesterov`)."""

    type_name = "Nesterov"


class AdaGradSolver(Solver):
    """AdaGrad (:func:`.rules.adagrad`); Caffe refuses momentum."""

    type_name = "AdaGrad"


class RMSPropSolver(Solver):
    """RMSProp (:func:`.rules.rmsprop`); Caffe refuses momentum and needs ``0 <= rms_decay < 1``."""

    type_name = "RMSProp"


class AdaDeltaSolver(Solver):
    """AdaDelta (:func:`.rules.adadelta`)."""

    type_name = "AdaDelta"


class AdamSolver(Solver):
    """Adam with Caffe's bias correction (:func:`.rules.adam`)."""

    type_name = "Adam"


#: Caffe's solver registry: ``type`` string -> class.
SOLVERS: dict[str, type[Solver]] = {
    cls.type_name: cls
    for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)
}


def solver_class(type_name: str, where: str = "", registry: Mapping[str, type[Solver]] | None = None
                 ) -> type[Solver]:
    """The class registered for a solver ``type``.

    Raises:
        ModelFormatError: no class is registered for it.
    """
    registry = SOLVERS if registry is None else registry
    try:
        return registry[type_name]
    except KeyError:
        raise ModelFormatError(
            f"{where or 'Solver'}: unknown solver type '{type_name}' (known types: {', '.join(registry)})."
        ) from None


def get_solver(solver: SolverSource, registry: Mapping[str, type[Solver]] | None = None) -> Solver:
    """A solver of the type the SolverParameter names (``type``, or the legacy ``solver_type``).

    Args:
        solver: a solver prototxt path or a ``caffe_pb2.SolverParameter``.
        registry: the classes to choose from by ``type`` (default :data:`SOLVERS`; the pycaffe facade
            passes its own, whose nets are facade nets).

    Raises:
        ModelFormatError: the solver file is missing or malformed, or its type is unknown.
    """
    param, path = load_solver(solver)
    return solver_class(solver_type_name(param), solver_where(path), registry)(solver)
