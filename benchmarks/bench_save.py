"""Time and peak memory of ``save_quant_retrain_model`` on a ResNet-50-sized retrain model.

Preparation (not timed): ResNet-50 from the sibling ``shared/models/resnet50`` gets random weights
(``randomize_params``, seed 0) saved by our ``Net``; ``create_quant_retrain_config`` and
``create_quant_retrain_model`` make its retrain model; the retrain net runs ONE forward in the TRAIN phase on
random data so that IFMR initialises every clip pair, and ``net.save`` writes the "retrained" caffemodel.

Measured, each in a fresh subprocess (so that peak RSS is that of the operation alone):

* ``save``: ``amct.save_quant_retrain_model(retrain prototxt, retrained caffemodel, <save_type>, ...)``;
* ``baseline``: the same retrained caffemodel read with protobuf (``NetParameter.ParseFromString``) and
  written back (``SerializeToString`` to a file) -- the least any tool that rewrites the caffemodel must do.

Each run reports the wall time and the CPU time (user + system; less sensitive than wall time to other load
on a shared machine) of the operation only, imports excluded; its peak RSS (``VmHWM`` of
``/proc/self/status``; ``ru_maxrss`` would include the benchmark process's RSS inherited at fork); and the
RSS after the imports, so that the memory the operation itself needs (peak minus imports) is visible apart
from the interpreter, torch and protobuf. The table gives the median over ``--repeats`` runs and the ratios
save/baseline.

    PYTHONPATH=src python benchmarks/bench_save.py                    # Both, 3 repeats
    PYTHONPATH=src python benchmarks/bench_save.py --save-types Fakequant Deploy Both --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import _measure
from _measure import worker_script

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "resnet50" / "ResNet-50-deploy.prototxt"

# The measured operations run in a fresh interpreter (_measure.worker_script); they print one JSON line.
WORKER = worker_script(
    setup=r"""
if args["kind"] == "save":
    from amct_caffe import amct
else:
    from amct_caffe.proto import caffe_pb2
""",
    body=r"""
if args["kind"] == "save":
    amct.save_quant_retrain_model(args["model"], args["weights"], args["save_type"], args["save_path"],
                                  args["record"], None)
else:
    net = caffe_pb2.NetParameter()
    with open(args["weights"], "rb") as f:
        net.ParseFromString(f.read())
    with open(args["out"], "wb") as f:
        f.write(net.SerializeToString())
""",
)


def prepare(model: Path, folder: Path) -> tuple[Path, Path]:
    """The retrain prototxt and a 'retrained' caffemodel (clips initialised by one forward)."""
    sys.path.insert(0, str(REPO / "src"))
    import logging

    import numpy as np

    from amct_caffe import amct
    from amct_caffe.caffe import pycaffe
    from amct_caffe.engine.net import Net
    from amct_caffe.engine.randomize import randomize_params
    from amct_caffe.log import get_logger
    from amct_caffe.proto import caffe_pb2

    get_logger().setLevel(logging.WARNING)
    float_net = Net(str(model), caffe_pb2.TEST)
    randomize_params(float_net, 0)
    float_net.save(folder / "float.caffemodel")
    float_weights = str(folder / "float.caffemodel")
    amct.create_quant_retrain_config(str(folder / "config.json"), str(model), float_weights)
    amct.create_quant_retrain_model(str(model), str(folder / "float.caffemodel"), str(folder / "config.json"),
                                    str(folder / "retrain.prototxt"), str(folder / "retrain.caffemodel"),
                                    str(folder / "record.txt"))
    net = pycaffe.Net(str(folder / "retrain.prototxt"), str(folder / "retrain.caffemodel"), pycaffe.TRAIN)
    shape = net.blobs[net.inputs[0]].data.shape
    net.forward(**{net.inputs[0]: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    net.save(str(folder / "retrained.caffemodel"))
    return folder / "retrain.prototxt", folder / "retrained.caffemodel"


def run_worker(args: dict) -> dict:
    return _measure.run_worker(WORKER, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="float deploy prototxt")
    parser.add_argument("--save-types", nargs="+", default=["Both"], choices=["Fakequant", "Deploy", "Both"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the workers (0: default)")
    opts = parser.parse_args()
    if opts.threads:
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)

    with tempfile.TemporaryDirectory(prefix="amct_bench_save_") as tmp:
        folder = Path(tmp)
        model, weights = prepare(opts.model, folder)
        size_mb = weights.stat().st_size / 1e6
        rows = []
        for save_type in opts.save_types:
            runs: dict[str, list[dict]] = {"save": [], "baseline": []}
            for i in range(opts.repeats):  # interleaved, so that other load hits both alike
                runs["baseline"].append(run_worker({"kind": "baseline", "src": str(REPO / "src"),
                                                    "weights": str(weights),
                                                    "out": str(folder / f"copy{i}.caffemodel")}))
                runs["save"].append(run_worker({"kind": "save", "src": str(REPO / "src"), "model": str(model),
                                                "weights": str(weights), "save_type": save_type,
                                                "save_path": str(folder / f"out{i}" / "resnet50"),
                                                "record": str(folder / f"out{i}" / "record.txt")}))
            med = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
                   for kind, rs in runs.items()}
            rows.append((save_type, med))
        outputs = sorted(p.name for p in (folder / "out0").iterdir())
        sizes = {p.name: p.stat().st_size / 1e6 for p in (folder / "out0").iterdir()}

    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; model {opts.model.name}; retrained caffemodel {size_mb:.1f} MB; "
          f"median of {opts.repeats}")
    print("| save_type | save s | baseline s | time ratio | save CPU s | baseline CPU s | CPU ratio "
          "| save peak MB | baseline peak MB | peak ratio | save peak - imports MB "
          "| baseline peak - imports MB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for save_type, med in rows:
        s, b = med["save"], med["baseline"]
        s_work, b_work = s["peak_mb"] - s["imports_mb"], b["peak_mb"] - b["imports_mb"]
        print(f"| {save_type} | {s['seconds']:.2f} | {b['seconds']:.2f} | {s['seconds'] / b['seconds']:.1f}x "
              f"| {s['cpu_seconds']:.2f} | {b['cpu_seconds']:.2f} "
              f"| {s['cpu_seconds'] / b['cpu_seconds']:.1f}x "
              f"| {s['peak_mb']:.0f} | {b['peak_mb']:.0f} | {s['peak_mb'] / b['peak_mb']:.2f}x "
              f"| {s_work:.0f} | {b_work:.0f} | {s_work / b_work:.2f}x |")
    print("outputs of the last save_type:", ", ".join(f"{n} ({sizes[n]:.1f} MB)" for n in outputs))


if __name__ == "__main__":
    main()
