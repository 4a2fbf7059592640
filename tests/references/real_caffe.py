"""The real Caffe as a reference: forward a net in it, in a subprocess, exchanging arrays through files.

The real Caffe aborts its whole process on bad input, so it is never imported here. It is found through
``$AMCT_REF_CAFFE_PYTHON`` (the python of a venv with pycaffe) or the repository's ``.cache/ref-caffe``,
where ``scripts/test.sh`` installs it when the shared tools are present; tests that need it take the
``reference_caffe`` fixture (conftest.py), which skips them when it is absent. The shared real-model folder
(``SHARED / "models"``) is optional in the same way (the ``shared_models`` fixture).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
WORKER = Path(__file__).with_name("_real_caffe_worker.py")


def reference_python() -> str | None:
    """Path of the reference venv's python: $AMCT_REF_CAFFE_PYTHON, else .cache/ref-caffe in the repo."""
    default = REPO / ".cache" / "ref-caffe" / "bin" / "python"
    candidates = [os.environ.get("AMCT_REF_CAFFE_PYTHON"), str(default)]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    return None


class ReferenceError(RuntimeError):
    pass


def run_reference(
    prototxt: str | Path,
    inputs: dict[str, np.ndarray] | None = None,
    weights: str | Path | None = None,
    phase: str = "TEST",
    save_weights: str | Path | None = None,
    timeout: float = 300,
) -> dict[str, dict[str, np.ndarray]]:
    """Forward a net in the reference Caffe.

    Args:
        prototxt: path of the net, or its text.
        inputs: arrays for input blobs (the blobs are reshaped to them first).
        weights: optional caffemodel.
        phase: "TEST" or "TRAIN".
        save_weights: if given, the reference writes the net's weights there (``net.save``).

    Returns:
        ``{"blobs": {name: array}, "params": {"layer/i": array}}`` after one forward.
    """
    py = reference_python()
    if py is None:
        raise ReferenceError("no reference Caffe installed")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        text = str(prototxt)
        if "\n" in text or "{" in text:
            net_file = tmp_path / "net.prototxt"
            net_file.write_text(text)
        else:
            net_file = Path(text)
        np.savez(tmp_path / "inputs.npz", **(inputs or {}))
        cmd = [py, str(WORKER), str(net_file), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz"), phase,
               str(weights) if weights else "-", str(save_weights) if save_weights else "-"]
        env = dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise ReferenceError(
                f"reference Caffe failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        out = np.load(tmp_path / "out.npz")
        blobs = {k[len("blob:"):]: out[k] for k in out.files if k.startswith("blob:")}
        params = {k[len("param:"):]: out[k] for k in out.files if k.startswith("param:")}
        return {"blobs": blobs, "params": params}


SCRIPT_RUNNER = Path(__file__).with_name("_real_caffe_script.py")


def run_reference_script(script: str | Path, *args: str, timeout: float = 300) -> None:
    """Run a pycaffe script unchanged in the reference Caffe (``python SCRIPT ARGS...``; see
    ``_real_caffe_script.py`` for the two scikit-image names it restores).

    Raises:
        ReferenceError: no reference is installed, or the script failed.
    """
    py = reference_python()
    if py is None:
        raise ReferenceError("no reference Caffe installed")
    env = dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([py, str(SCRIPT_RUNNER), str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise ReferenceError(f"reference pycaffe script {script} failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


if __name__ == "__main__":  # pragma: no cover - manual use
    print(reference_python(), file=sys.stderr)
