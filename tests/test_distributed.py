"""Data-parallel training on torch.distributed (gloo, 2 CPU processes).

The equivalence check of Caffe's multi-GPU semantics: 2 workers x batch B give the same per-iteration loss
and final weights as 1 worker x batch 2B (within 1e-5 relative) -- for SGD with momentum and weight decay
on a float net, and for a QAT retrain model whose clips IFMR initialises on the first batch (from all
workers' values). The one-process run is the reference; the two-worker run never sees its numbers.
Also: the workers' weights stay identical bit for bit, a failing worker stops the run with a named error
(no hang), and the command line's ``--nproc`` trains and its snapshot resumes on one worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amct_caffe.engine import distributed
from amct_caffe.engine.net import Net
from amct_caffe.errors import RuntimeEngineError
from amct_caffe.proto import caffe_pb2
from tests import dist_scenarios as scen
from tests.helpers import caffemodel_blobs

pytest.importorskip("h5py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")

BATCH = 4
ITERS = 20


def _initial_weights(folder: Path, solver: Path) -> str:
    """Filler weights of the float net, saved once so that both runs start from them."""
    torch.manual_seed(11)
    net = Net(str(folder / "net.prototxt"), caffe_pb2.TRAIN)
    path = folder / "init.caffemodel"
    net.save(str(path))
    return str(path)


def _setups(tmp_path: Path) -> tuple[Path, Path]:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    return scen.write_setup(one, 2 * BATCH, ITERS), scen.write_setup(two, BATCH, ITERS)


def _compare(single: Path, parallel: Path) -> None:
    ref, got = np.load(single), np.load(parallel)
    assert sorted(ref.files) == sorted(got.files)
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=0)
    assert len(set(np.round(ref["losses"], 4))) > 5, "the loss should change over the iterations"
    for key in ref.files:
        if key != "losses":
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_two_workers_equal_one_worker_with_twice_the_batch(tmp_path: Path) -> None:
    solver_one, solver_two = _setups(tmp_path)
    weights = _initial_weights(tmp_path / "one", solver_one)
    scen.run_solver(str(solver_one), weights, ITERS, str(tmp_path / "single.npz"))
    distributed.launch(2, scen.run_solver, (str(solver_two), weights, ITERS, str(tmp_path / "parallel.npz")))
    _compare(tmp_path / "single.npz", tmp_path / "parallel.npz")


def _retrain_setup(folder: Path, batch: int, float_weights: str) -> tuple[Path, str]:
    """The float setup turned into a QAT retrain model (ActivationQAT with IFMR initialisation, WeightQAT)
    by create_quant_retrain_model from ``float_weights``; returns its solver and the retrain weights."""
    from amct_caffe import amct

    solver = scen.write_setup(folder, batch, ITERS)
    config = folder / "config.json"
    amct.create_quant_retrain_config(str(config), str(folder / "net.prototxt"), float_weights)
    model, weights = folder / "retrain.prototxt", folder / "retrain.caffemodel"
    amct.create_quant_retrain_model(str(folder / "net.prototxt"), float_weights, str(config), str(model),
                                    str(weights), str(folder / "record.txt"))
    solver.write_text(solver.read_text().replace(str(folder / "net.prototxt"), str(model)))
    return solver, str(weights)


def test_qat_two_workers_equal_one_worker_with_ifmr_clips(tmp_path: Path) -> None:
    solver_one, solver_two = _setups(tmp_path)
    float_weights = _initial_weights(tmp_path / "one", solver_one)
    solver_one, weights_one = _retrain_setup(tmp_path / "one", 2 * BATCH, float_weights)
    solver_two, weights_two = _retrain_setup(tmp_path / "two", BATCH, float_weights)
    scen.run_solver(str(solver_one), weights_one, ITERS, str(tmp_path / "single.npz"))
    parallel = str(tmp_path / "parallel.npz")
    distributed.launch(2, scen.run_solver, (str(solver_two), weights_two, ITERS, parallel))
    _compare(tmp_path / "single.npz", tmp_path / "parallel.npz")
    clips = [k for k in np.load(tmp_path / "single.npz").files if k.startswith("conv_act_retrain/")]
    assert clips, "the retrain model should hold ActivationQAT clip blobs"


def test_workers_hold_identical_weights(tmp_path: Path) -> None:
    _, solver_two = _setups(tmp_path)
    weights = _initial_weights(tmp_path / "two", solver_two)
    out = str(tmp_path / "same")
    distributed.launch(2, scen.run_and_compare_workers, (str(solver_two), weights, 5, out))
    for rank in (0, 1):
        assert json.loads(Path(f"{out}.{rank}.json").read_text()) == {"same": True}


def test_a_failing_worker_stops_the_others_with_a_named_error(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    with pytest.raises(RuntimeEngineError, match=r"worker 1 of 2 failed: ValueError: worker one gives up"):
        distributed.launch(2, scen.fail_on_rank_one, (str(marker),))
    assert not marker.exists()


def test_cli_nproc_trains_and_the_snapshot_resumes_on_one_worker(tmp_path: Path) -> None:
    _, solver_two = _setups(tmp_path)
    weights = _initial_weights(tmp_path / "two", solver_two)
    cmd = [sys.executable, "-m", "amct_caffe.cli", "train", str(solver_two), "--weights", weights,
           "--nproc", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"to iteration {ITERS}" in done.stdout and "on 2 workers" in done.stdout
    assert done.stdout.count("trained ") == 1, "only rank 0 reports"
    state = tmp_path / "two" / f"snap_iter_{ITERS}.solverstate"
    assert state.is_file()
    text = solver_two.read_text().replace(f"max_iter: {ITERS}", f"max_iter: {ITERS + 3}")
    solver_two.write_text(text)
    resumed = subprocess.run([sys.executable, "-m", "amct_caffe.cli", "train", str(solver_two), "--snapshot",
                              str(state)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"to iteration {ITERS + 3} (3 iteration(s)" in resumed.stdout


def test_nproc_rejects_zero_workers(tmp_path: Path) -> None:
    _, solver_two = _setups(tmp_path)
    cmd = [sys.executable, "-m", "amct_caffe.cli", "train", str(solver_two), "--nproc", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "--nproc 0" in done.stderr and "Traceback" not in done.stderr


def test_a_pycaffe_script_runs_data_parallel_under_torchrun(tmp_path: Path) -> None:
    """A pycaffe training script, unchanged, under ``torchrun --nproc-per-node 2``: its snapshot equals
    the one-process run with twice the batch."""
    solver_one, solver_two = _setups(tmp_path)
    weights = _initial_weights(tmp_path / "one", solver_one)
    scen.run_solver(str(solver_one), weights, ITERS, str(tmp_path / "single.npz"))
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\nfrom amct_caffe import caffe\n"
        "solver = caffe.SGDSolver(sys.argv[1])\nsolver.net.copy_from(sys.argv[2])\nsolver.solve()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(distributed.free_port()), str(script), str(solver_two), weights]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    snap = caffemodel_blobs(tmp_path / "two" / f"snap_iter_{ITERS}.caffemodel")
    ref = np.load(tmp_path / "single.npz")
    for layer, blobs in snap.items():
        for i, blob in enumerate(blobs):
            key = f"{layer}/{i}"
            np.testing.assert_allclose(blob, ref[key], rtol=1e-5, atol=1e-7, err_msg=key)
