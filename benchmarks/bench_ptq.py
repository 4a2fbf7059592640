"""Time and peak memory of the post-training quantization flow on ResNet-50.

Preparation (not timed): ResNet-50 from the sibling ``shared/models/resnet50`` gets random weights
(``randomize_params``, seed 0) saved by our ``Net``; the calibration data are ``--batches`` random batches
of ``--batch`` images (standard normal, seed 0), saved as one ``.npy``.

Measured, each in a fresh subprocess (so that peak RSS is that of the operation alone), interleaved:

* ``ptq``: the whole flow -- ``create_quant_config(batch_num=--batches)`` -> ``init`` -> ``quantize_model``
  -> ``caffe.Net(calibration model)`` and ``--batches`` forwards -> ``save_model('Both')``;
* ``baseline``: what the flow cannot avoid -- ``caffe.Net(float model)`` and the same ``--batches`` float
  forwards, plus the float caffemodel read with protobuf (``ParseFromString``) and written back
  (``SerializeToString`` to a file);
* ``float``: the float forwards alone (``caffe.Net`` + ``--batches`` forwards), the memory reference.

Each run reports the wall and CPU time of the operation (imports excluded), its peak RSS (``VmHWM``) and
the RSS after the imports. The table gives medians over ``--repeats`` runs; time ratio = ptq / baseline,
memory ratio = ptq peak / float peak (also with the imports' RSS subtracted from both).

    PYTHONPATH=src python benchmarks/bench_ptq.py                          # 4 batches of 8, 3 repeats
    PYTHONPATH=src python benchmarks/bench_ptq.py --batches 4 --batch 8 --repeats 3 --threads 2
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
import numpy as np
from amct_caffe import amct, caffe
from amct_caffe.proto import caffe_pb2
data = np.load(args["data"])
batch = data.shape[1]

def forwards(model, weights):
    net = caffe.Net(model, caffe.TEST, weights=weights)
    name = net.inputs[0]
    net.blobs[name].reshape(*data.shape[1:])
    net.reshape()
    for x in data:
        net.forward(**{name: x})
""",
    body=r"""
if args["kind"] == "ptq":
    out = args["out"]
    config, record = os.path.join(out, "config.json"), os.path.join(out, "record.txt")
    amct.create_quant_config(config, args["model"], args["weights"], batch_num=len(data))
    graph = amct.init(config, args["model"], args["weights"], record)
    cal_model, cal_weights = os.path.join(out, "cal.prototxt"), os.path.join(out, "cal.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    forwards(cal_model, cal_weights)
    amct.save_model(graph, "Both", os.path.join(out, "resnet50"))
else:
    forwards(args["model"], args["weights"])
    if args["kind"] == "baseline":
        net = caffe_pb2.NetParameter()
        with open(args["weights"], "rb") as f:
            net.ParseFromString(f.read())
        with open(os.path.join(args["out"], "copy.caffemodel"), "wb") as f:
            f.write(net.SerializeToString())
""",
)

KINDS = ("baseline", "float", "ptq")


def prepare(model: Path, folder: Path, batches: int, batch: int) -> tuple[Path, Path]:
    """The random float caffemodel and the calibration batches (``.npy``, shape (batches, batch, C, H, W))."""
    sys.path.insert(0, str(REPO / "src"))
    import logging

    import numpy as np

    from amct_caffe.engine.net import Net
    from amct_caffe.engine.randomize import randomize_params
    from amct_caffe.log import get_logger
    from amct_caffe.proto import caffe_pb2

    get_logger().setLevel(logging.WARNING)
    float_net = Net(str(model), caffe_pb2.TEST)
    randomize_params(float_net, 0)
    weights = folder / "float.caffemodel"
    float_net.save(weights)
    shape = tuple(float_net.tensor(float_net.inputs[0]).shape[1:])
    data = np.random.default_rng(0).standard_normal((batches, batch, *shape)).astype(np.float32)
    np.save(folder / "data.npy", data)
    return weights, folder / "data.npy"


def run_worker(args: dict) -> dict:
    return _measure.run_worker(WORKER, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="float deploy prototxt")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches (batch_num)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the workers (0: default)")
    opts = parser.parse_args()
    if opts.threads:
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)

    with tempfile.TemporaryDirectory(prefix="amct_bench_ptq_") as tmp:
        folder = Path(tmp)
        weights, data = prepare(opts.model, folder, opts.batches, opts.batch)
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for i in range(opts.repeats):  # interleaved, so that other load hits all alike
            for kind in KINDS:
                out = folder / f"{kind}{i}"
                out.mkdir()
                args = {"kind": kind, "src": str(REPO / "src"), "model": str(opts.model),
                        "weights": str(weights), "data": str(data), "out": str(out)}
                runs[kind].append(run_worker(args))
        med = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for kind, rs in runs.items()}
        sizes = {p.name: p.stat().st_size / 1e6 for p in (folder / "ptq0").iterdir() if p.is_file()}

    load = os.getloadavg()
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; model {opts.model.name}; {opts.batches} batches of {opts.batch}; "
          f"threads {opts.threads or 'default'}; median of {opts.repeats}; load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}")
    print("| run | wall s | CPU s | peak MB | peak - imports MB |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        m = med[kind]
        print(f"| {kind} | {m['seconds']:.2f} | {m['cpu_seconds']:.2f} | {m['peak_mb']:.0f} "
              f"| {m['peak_mb'] - m['imports_mb']:.0f} |")
    p, b, f = med["ptq"], med["baseline"], med["float"]
    print(f"time ptq/baseline: {p['seconds'] / b['seconds']:.2f}x wall, "
          f"{p['cpu_seconds'] / b['cpu_seconds']:.2f}x CPU (target <= 3x)")
    print(f"peak memory ptq/float forward: {p['peak_mb'] / f['peak_mb']:.2f}x, without the imports "
          f"{(p['peak_mb'] - p['imports_mb']) / (f['peak_mb'] - f['imports_mb']):.2f}x (target <= 2x)")
    print("ptq outputs:", ", ".join(f"{n} ({s:.1f} MB)" for n, s in sorted(sizes.items())))


if __name__ == "__main__":
    main()
