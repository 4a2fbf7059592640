"""What the data-parallel tests run in each worker process (functions importable by name, as
``torch.multiprocessing`` needs), and the small training setup they share. Not a test module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch.distributed as dist

from amct_caffe.engine.solver import get_solver

#: Samples in the HDF5 file; iterations read 2 x batch per step, so 20 steps wrap around it.
SAMPLES = 48


def write_setup(folder: Path, batch: int, iters: int, seed: int = 3) -> Path:
    """A float net (HDF5Data -> Convolution -> ReLU -> InnerProduct -> SoftmaxWithLoss), its data, and an
    SGD solver with momentum and weight decay; returns the solver's path."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(folder / "data.h5", "w") as fh:
        fh["data"] = rng.normal(size=(SAMPLES, 2, 6, 6)).astype(np.float32)
        fh["label"] = rng.integers(0, 4, size=SAMPLES).astype(np.float32)
    (folder / "list.txt").write_text(f"{folder / 'data.h5'}\n")
    (folder / "net.prototxt").write_text(net_text(folder, batch))
    solver = folder / "solver.prototxt"
    solver.write_text(
        f'net: "{folder / "net.prototxt"}"\nbase_lr: 0.05\nmomentum: 0.9\nweight_decay: 0.001\n'
        f'lr_policy: "fixed"\nmax_iter: {iters}\ndisplay: 0\naverage_loss: 1\nrandom_seed: 7\n'
        f'snapshot: {iters}\nsnapshot_prefix: "{folder / "snap"}"\n'
    )
    return solver


def net_text(folder: Path, batch: int, extra: str = "") -> str:
    return f"""
name: "tiny"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param {{ source: "{folder / 'list.txt'}" batch_size: {batch} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 3 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.3 }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.2 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
{extra}"""


def run_solver(solver_path: str, weights: str, iters: int, out: str) -> None:
    """Train ``iters`` iterations from ``weights``; rank 0 writes the per-iteration losses and the final
    blobs to ``out`` (.npz)."""
    solver = get_solver(solver_path)
    solver.net.copy_from(weights)
    losses = []
    for _ in range(iters):
        solver.step(1)
        losses.append(float(solver.smoothed_loss))
    if solver.world.is_root:
        blobs = {f"{layer.name}/{i}": blob.detach().cpu().numpy()
                 for layer in solver.net.engine_layers for i, blob in enumerate(layer.blobs)}
        np.savez(out, losses=np.array(losses, dtype=np.float64), **blobs)


def run_and_compare_workers(solver_path: str, weights: str, iters: int, out: str) -> None:
    """As :func:`run_solver`, and every rank writes whether its blobs equal rank 0's bit for bit."""
    solver = get_solver(solver_path)
    solver.net.copy_from(weights)
    solver.step(iters)
    import torch

    blobs = [blob.detach().reshape(-1) for layer in solver.net.engine_layers for blob in layer.blobs]
    flat = torch.cat(blobs)
    root = flat.clone()
    dist.broadcast(root, src=0)
    Path(f"{out}.{solver.world.rank}.json").write_text(json.dumps({"same": bool(torch.equal(flat, root))}))


def fail_on_rank_one(marker: str) -> None:
    """Rank 1 raises after joining; rank 0 then waits in a collective that can never complete."""
    import torch

    from amct_caffe.engine import distributed

    distributed.init_from_env(torch.device("cpu"))
    if distributed.world().rank == 1:
        raise ValueError("worker one gives up")
    t = torch.ones(1)
    distributed.average([t])
    Path(marker).write_text("rank 0 got past the collective")
