"""Solver snapshots: Caffe's caffemodel + ``.solverstate`` pair, written and restored.

A snapshot at iteration N is ``<snapshot_prefix>_iter_<N>.caffemodel`` (binary; the gradients too with
``snapshot_diff``) and ``<snapshot_prefix>_iter_<N>.solverstate`` (``caffe_pb2.SolverState``: ``iter``,
``learned_net``, ``current_step`` and one history blob per learnable blob, two for AdaDelta and Adam, in
Caffe's order), so real Caffe resumes from ours and we from Caffe's. Only BINARYPROTO is supported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from google.protobuf import message as pb_message

from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError, UnsupportedLayerError
from amct_caffe.log import get_logger
from amct_caffe.model.blobs import array_to_blob, blob_shape, blob_to_array, check_blob, shape_matches
from amct_caffe.model.io import AtomicFiles
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.solver")

Tensor = torch.Tensor


def snapshot_filename(prefix: str, iteration: int, extension: str) -> str:
    """Caffe's ``SnapshotFilename``: ``<prefix>_iter_<iteration><extension>``."""
    return f"{prefix}_iter_{iteration}{extension}"


def write_snapshot(net: Net, param: caffe_pb2.SolverParameter, iteration: int, current_step: int,
                   history: Sequence[Tensor], where: str) -> str:
    """Write the caffemodel and the solverstate of ``iteration`` (one all-or-nothing set); returns the
    caffemodel's path.

    Raises:
        UnsupportedLayerError: ``snapshot_format: HDF5``.
        OutputWriteError: a file cannot be written (neither is then).
    """
    if param.snapshot_format != caffe_pb2.SolverParameter.BINARYPROTO:
        raise UnsupportedLayerError(
            f"{where}: snapshot_format HDF5 is not supported; remove snapshot_format (the default "
            "BINARYPROTO writes .caffemodel and .solverstate files)."
        )
    model_filename = snapshot_filename(param.snapshot_prefix, iteration, ".caffemodel")
    state = caffe_pb2.SolverState(iter=iteration, learned_net=model_filename, current_step=current_step)
    for h in history:
        array_to_blob(h.detach().cpu().numpy(), state.history.add())
    state_filename = snapshot_filename(param.snapshot_prefix, iteration, ".solverstate")
    LOGGER.info("Snapshotting to binary proto file %s", model_filename)
    LOGGER.info("Snapshotting solver state to binary proto file %s", state_filename)
    # one set: a resume never finds a solverstate whose caffemodel is missing or from another snapshot
    with AtomicFiles() as files:
        files.write(model_filename, net.to_proto(write_diff=bool(param.snapshot_diff)).SerializeToString())
        files.write(state_filename, state.SerializeToString())
    return model_filename


def read_solver_state(path: str) -> caffe_pb2.SolverState:
    """A binary ``.solverstate`` file.

    Raises:
        ModelFormatError: the file is missing or is not a binary SolverState.
        UnsupportedLayerError: an HDF5 solverstate (``.h5``).
    """
    if path.endswith(".h5"):
        raise UnsupportedLayerError(f"Cannot restore '{path}': HDF5 solver states are not supported; use the "
                                    "binary .solverstate.")
    if not os.path.isfile(path):
        raise ModelFormatError(f"Solver state '{path}' does not exist; check the .solverstate path.")
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(Path(path).read_bytes())
    except pb_message.DecodeError as exc:
        raise ModelFormatError(f"Solver state '{path}' is not a binary SolverState: {exc}.") from exc
    return state


def check_history(state: caffe_pb2.SolverState, history: Sequence[Tensor], blob_names: Sequence[str],
                  type_name: str, path: str) -> None:
    """The solverstate's history blobs fit this solver's (count and shapes).

    Raises:
        ModelFormatError: they do not (WeightShapeError: a blob's values do not fill its shape); the
            message names the blob.
    """
    if len(state.history) != len(history):
        raise ModelFormatError(
            f"Incorrect length of history blobs in '{path}': {len(state.history)}, but this {type_name} "
            f"solver keeps {len(history)}; restore a state of the same solver type and net."
        )
    for i, blob in enumerate(state.history):
        check_blob(blob, file=path, layer="", index=i)
        if not shape_matches(blob, history[i].shape):
            raise ModelFormatError(
                f"History blob {i} of '{path}' has shape {blob_shape(blob)} but learnable blob "
                f"{blob_names[i % len(blob_names)]} has {tuple(history[i].shape)}; the solver state belongs "
                "to another net."
            )


def load_history(state: caffe_pb2.SolverState, history: Sequence[Tensor]) -> None:
    """Copy the solverstate's history blobs into ``history`` (checked by :func:`check_history`)."""
    with torch.no_grad():
        for i, (h, blob) in enumerate(zip(history, state.history)):
            h.copy_(torch.from_numpy(blob_to_array(blob, tuple(h.shape), index=i)).to(h.device))


def learned_net_path(name: str, state_path: str) -> str:
    """The caffemodel a solverstate names: as written, else beside the solverstate.

    Raises:
        ModelFormatError: neither exists.
    """
    if os.path.isfile(name):
        return name
    folder = os.path.dirname(state_path)
    candidates = [] if os.path.isabs(name) else [os.path.join(folder, name)]
    candidates.append(os.path.join(folder, os.path.basename(name)))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise ModelFormatError(f"The learned net '{name}' named in solver state '{state_path}' does not exist "
                           "(neither as written nor beside the solver state).")
