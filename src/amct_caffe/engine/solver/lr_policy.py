"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``), one small function per ``lr_policy``.

Each policy maps ``(solver parameter, iteration, current_step)`` to ``(rate, current_step)``; only ``step``
and ``multistep`` move ``current_step``, which the solverstate saves. ``multistep`` advances it by at most one
per call, when ``iter >= stepvalue[current_step]`` -- Caffe's quirk: a state moved forward only by calls, as
the solver makes one per iteration. Rates are computed as Caffe does, with ``base_lr``, ``gamma`` and
``power`` rounded to float32 first and the result rounded to float32 last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from amct_caffe.engine.solver.float32 import c_exp, c_pow, f32
from amct_caffe.errors import ModelFormatError
from amct_caffe.log import get_logger
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.solver")

#: ``(param, iter, current_step) -> (rate, current_step)``.
LrPolicy: TypeAlias = Callable[[caffe_pb2.SolverParameter, int, int], tuple[float, int]]


def _base(p: caffe_pb2.SolverParameter) -> float:
    return float(f32(p.base_lr))


def fixed(p: caffe_pb2.SolverParameter, it: int, current: int) -> tuple[float, int]:
    """``base_lr``."""
    return _base(p), current


def step(p: caffe_pb2.SolverParameter, it: int, current: int) -> tuple[float, int]:
    """``base_lr * gamma ^ floor(iter / stepsize)``."""
    current = it // p.stepsize
    return _base(p) * c_pow(float(f32(p.gamma)), current), current


def exp(p: caffe_pb2.SolverParameter, it: int, current: int) -> tuple[float, int]:
    """``base_lr * gamma ^ iter``."""
    return _base(p) * c_pow(float(f32(p.gamma)), it), current


def inv(p: caffe_pb2.SolverParameter, it: int, current: int) -> tuple[float, int]:
    """``base_lr * (1 + gamma * iter) ^ (-power)``."""
    x = f32(1.0) + f32(p.gamma) * f32(it)
    return _base(p) * c_pow(float(x), -float(f32(p.power))), current


def multistep(p: caffe_pb2.SolverParameter, it: int, current: int) -> tuple[float, int]:
    """``base_lr * gamma ^ current_step``, ``current_step`` moving on at each ``stepvalue`` reached."""
    if current < len(p.stepvalue) and it >= p.stepvalue[current]:
        current += 1
        LOGGER.info("MultiStep Status: Iteration %d, step = %d", it, current)
    return _base(p) * c_pow(float(f32(p.gamma)), current), current


def poly(p: caffe_pb2.SolverParameter, it: int, current: int) -> tuple[float, int]:
    """``base_lr * (1 - iter / max_iter) ^ power``."""
    x = f32(1.0) - f32(it) / f32(p.max_iter)
    return _base(p) * c_pow(float(x), float(f32(p.power))), current


def sigmoid(p: caffe_pb2.SolverParameter, it: int, current: int) -> tuple[float, int]:
    """``base_lr / (1 + exp(-gamma * (iter - stepsize)))``."""
    e = c_exp(float(-f32(p.gamma) * (f32(it) - f32(p.stepsize))))
    return _base(p) * (1.0 / (1.0 + e)), current


#: Caffe's ``lr_policy`` names and their functions.
LR_POLICIES: dict[str, LrPolicy] = {
    "fixed": fixed,
    "step": step,
    "exp": exp,
    "inv": inv,
    "multistep": multistep,
    "poly": poly,
    "sigmoid": sigmoid,
}

#: The fields a policy reads that Caffe requires to be set sensibly.
_NEEDS_STEPSIZE = ("step", "sigmoid")
_NEEDS_GAMMA = ("step", "exp", "inv", "multistep", "sigmoid")
_NEEDS_MAX_ITER = ("poly",)


def check_lr_policy(p: caffe_pb2.SolverParameter, where: str) -> None:
    """The policy exists and the fields it reads have values Caffe accepts.

    Raises:
        ModelFormatError: an unknown ``lr_policy``, or ``stepsize``/``gamma``/``max_iter`` out of range.
    """
    policy = p.lr_policy
    if policy not in LR_POLICIES:
        raise ModelFormatError(
            f"{where}: unknown learning rate policy '{policy}'; set lr_policy to one of "
            f"{', '.join(LR_POLICIES)}."
        )
    if policy in _NEEDS_STEPSIZE and p.stepsize <= 0:
        raise ModelFormatError(f"{where}: lr_policy '{policy}' needs stepsize > 0 (got {p.stepsize}).")
    if policy in _NEEDS_GAMMA and p.gamma < 0:
        raise ModelFormatError(f"{where}: lr_policy '{policy}' needs gamma >= 0 (got {p.gamma}).")
    if policy in _NEEDS_MAX_ITER and p.max_iter <= 0:
        raise ModelFormatError(f"{where}: lr_policy '{policy}' needs max_iter > 0 (got {p.max_iter}).")


def learning_rate(p: caffe_pb2.SolverParameter, it: int, current_step: int) -> tuple[float, int]:
    """The rate of ``p.lr_policy`` at iteration ``it`` (a float32 value) and the new ``current_step``.

    The policy must have passed :func:`check_lr_policy`.
    """
    rate, current_step = LR_POLICIES[p.lr_policy](p, it, current_step)
    return float(f32(rate)), current_step
