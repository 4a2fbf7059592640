#!/usr/bin/env python3
"""CUDA check of the engine: the same nets on CPU and on the GPU must agree.

Run on a machine with a CUDA build of torch: ``PYTHONPATH=src python scripts/gpu_check.py [--models DIR]``
(default: the sibling shared/models). For every model
of the sibling shared/models (random weights) it compares every blob of a TEST forward on CPU and CUDA (the
optimised TEST path included). Prints one line per model and exits 1 if any disagrees.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from amct_caffe import caffe  # noqa: E402
from amct_caffe.engine.randomize import randomize_params  # noqa: E402

MODELS = REPO.parent / "shared" / "models"


def forward(prototxt: str, weights: str, inputs: dict[str, np.ndarray], gpu: bool) -> dict[str, np.ndarray]:
    caffe.set_mode_gpu() if gpu else caffe.set_mode_cpu()
    net = caffe.Net(prototxt, weights, caffe.TEST)
    for name, value in inputs.items():
        net.blobs[name].reshape(*value.shape)
    net.reshape()
    net.forward(**inputs)
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


def check_models(tmp: Path, models: Path) -> list[str]:
    failures = []
    for proto in sorted(models.glob("*/*.prototxt")):
        caffe.set_mode_cpu()
        net = caffe.Net(str(proto), caffe.TEST)
        randomize_params(net, seed=1)
        weights = tmp / f"{proto.parent.name}.caffemodel"
        net.save(str(weights))
        rng = np.random.default_rng(2)
        inputs = {n: rng.uniform(-1, 1, (1,) + net.blobs[n].data.shape[1:]).astype(np.float32)
                  for n in net.inputs}
        cpu = forward(str(proto), str(weights), inputs, gpu=False)
        gpu = forward(str(proto), str(weights), inputs, gpu=True)
        worst = 0.0
        for name, ref in cpu.items():
            if "detection" in name:
                continue  # rows of tied scores may come out in another order
            scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
            worst = max(worst, float(np.abs(gpu[name] - ref).max()) / scale if ref.size else 0.0)
        ok = worst < 1e-4
        status = "ok  " if ok else "FAIL"
        print(f"{status} forward {proto.parent.name}/{proto.name}: max diff / scale {worst:.2e}")
        if not ok:
            failures.append(proto.name)
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(sys.argv[sys.argv.index("--models") + 1]) if "--models" in sys.argv else MODELS
        failures = check_models(Path(tmp), models)
    print("all agree" if not failures else f"disagree: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
