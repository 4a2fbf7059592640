"""Training and inference speed of the engine against the same network written as idiomatic PyTorch, and
the TEST forward against ONNX Runtime.

For each model (ResNet-50 and MobileNet-v2 deploy prototxts, random weights) the benchmark builds, from the
prototxt itself:

* an idiomatic ``torch.nn`` module (``Conv2d``, ``BatchNorm2d`` for Caffe's BatchNorm + Scale pair with
  torch's fused kernels, in-place ``ReLU``, channels-last memory format), trained with ``torch.optim.SGD``
  and ``CrossEntropyLoss`` -- the baseline a PyTorch user would write;
* the engine's TRAIN net (``Input`` data and label + the layers + ``SoftmaxWithLoss``) trained by the
  engine's SGD solver (momentum, weight decay) -- the float step;
* the QAT retrain model of the same net (``create_quant_retrain_model``), trained the same way -- the QAT
  step, after a first step that initialises the clips with IFMR (timed on its own);
* for the TEST forward: the engine's optimised forward, ONNX Runtime on the ``torch.nn`` module exported
  to ONNX, and the engine's net with its ONNX Runtime backend (``net.backend = "onnxruntime"``: time per
  forward after the first, and the export time) -- the last two when ``onnxruntime`` and ``onnx`` are
  installed (the columns are empty otherwise). These run in one process, interleaved over ``--fwd-rounds``.

Each training measurement runs in a fresh process (``_measure.run_worker``: wall time of ``--steps`` steps
after two warm-up steps, and the peak RSS), rounds interleaved so that other load hits all columns alike;
the table shows medians and throughput ratios. Timings vary with load; read the ratios.

    PYTHONPATH=src python benchmarks/bench_train.py                      # needs the public models folder
    PYTHONPATH=src python benchmarks/bench_train.py --configs mobilenet_v2:8 --steps 5 --rounds 3
    PYTHONPATH=src python benchmarks/bench_train.py --test-forward-only --configs mobilenet_v2:1 resnet50:8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _measure import run_worker, worker_script  # noqa: E402

MODELS = {
    "resnet50": "resnet50/ResNet-50-deploy.prototxt",
    "mobilenet_v2": "mobilenet_v2/mobilenet_v2_deploy.prototxt",
}
DEFAULT_CONFIGS = ["mobilenet_v2:8", "mobilenet_v2:32", "resnet50:8", "resnet50:32"]

#: Shared by every worker: the prototxt -> torch.nn translation and the engine nets.
SETUP = r'''
import numpy as np
import torch
import torch.nn as nn
from google.protobuf import text_format
from amct_caffe.proto import caffe_pb2

torch.set_num_threads(args["threads"])
torch.manual_seed(0)


def read_deploy(path):
    net = caffe_pb2.NetParameter()
    with open(path) as fh:
        text_format.Merge(fh.read(), net)
    return net


def input_shape(net):
    if net.layer and net.layer[0].type == "Input":
        return list(net.layer[0].input_param.shape[0].dim)
    return list(net.input_shape[0].dim) if net.input_shape else list(net.input_dim)


def body_layers(net):
    """The deploy net's layers without the input layer and the final Softmax."""
    layers = [l for l in net.layer if l.type not in ("Input", "Softmax")]
    return layers


def train_net(deploy, batch, classes):
    """Input (data, label) + the deploy net's layers + SoftmaxWithLoss, TRAIN phase."""
    net = caffe_pb2.NetParameter(name=deploy.name)
    shape = input_shape(deploy)
    data = net.layer.add(name="data", type="Input")
    data.top.extend(["data", "label"])
    s = data.input_param.shape.add()
    s.dim.extend([batch, *shape[1:]])
    data.input_param.shape.add().dim.extend([batch])
    layers = body_layers(deploy)
    for l in layers:
        net.layer.add().CopyFrom(l)
    last = layers[-1].top[0]
    loss = net.layer.add(name="loss", type="SoftmaxWithLoss")
    loss.bottom.extend([last, "label"])
    loss.top.append("loss")
    return net


class CaffeAsTorch(nn.Module):
    """The deploy prototxt as an idiomatic torch.nn module (BatchNorm+Scale -> BatchNorm2d)."""

    def __init__(self, deploy):
        super().__init__()
        self.steps = []
        self.mods = nn.ModuleDict()
        layers = body_layers(deploy)
        channels = {"data": input_shape(deploy)[1]}
        skip = set()
        for i, l in enumerate(layers):
            if l.name in skip:
                continue
            key = l.name.replace(".", "_")
            b, t = list(l.bottom), list(l.top)
            if l.type == "Convolution":
                p = l.convolution_param
                k = p.kernel_size[0] if p.kernel_size else p.kernel_h
                st = p.stride[0] if p.stride else 1
                pad = p.pad[0] if p.pad else 0
                self.mods[key] = nn.Conv2d(channels[b[0]], p.num_output, k, st, pad, groups=p.group or 1,
                                           bias=p.bias_term)
                channels[t[0]] = p.num_output
                self.steps.append(("mod", key, b, t))
            elif l.type == "BatchNorm":
                nxt = layers[i + 1] if i + 1 < len(layers) else None
                if nxt is not None and nxt.type == "Scale" and list(nxt.bottom) == t:
                    skip.add(nxt.name)
                    t = list(nxt.top)
                self.mods[key] = nn.BatchNorm2d(channels[b[0]], eps=l.batch_norm_param.eps or 1e-5)
                channels[t[0]] = channels[b[0]]
                self.steps.append(("mod", key, b, t))
            elif l.type == "ReLU":
                channels[t[0]] = channels[b[0]]
                self.steps.append(("relu", key, b, t))
            elif l.type == "Eltwise":
                channels[t[0]] = channels[b[0]]
                self.steps.append(("add", key, b, t))
            elif l.type == "Pooling":
                p = l.pooling_param
                channels[t[0]] = channels[b[0]]
                if p.global_pooling:
                    self.mods[key] = nn.AdaptiveAvgPool2d(1) if p.pool == 1 else nn.AdaptiveMaxPool2d(1)
                else:
                    cls = nn.AvgPool2d if p.pool == 1 else nn.MaxPool2d
                    self.mods[key] = cls(p.kernel_size, p.stride or 1, p.pad, ceil_mode=True)
                self.steps.append(("mod", key, b, t))
            elif l.type == "InnerProduct":
                self.mods[key] = nn.Linear(channels[b[0]], l.inner_product_param.num_output)
                channels[t[0]] = l.inner_product_param.num_output
                self.steps.append(("linear", key, b, t))
            else:
                raise SystemExit(f"benchmark: no torch.nn translation for layer type {l.type}")
        self.output = t[0]

    def forward(self, x):
        blobs = {"data": x}
        for kind, key, b, t in self.steps:
            if kind == "mod":
                blobs[t[0]] = self.mods[key](blobs[b[0]])
            elif kind == "relu":
                blobs[t[0]] = torch.relu_(blobs[b[0]]) if t[0] == b[0] else torch.relu(blobs[b[0]])
            elif kind == "add":
                blobs[t[0]] = blobs[b[0]] + blobs[b[1]]
            else:
                blobs[t[0]] = self.mods[key](torch.flatten(blobs[b[0]], 1))
        return torch.flatten(blobs[self.output], 1)


def count_classes(net):
    for l in reversed(body_layers(net)):
        if l.type == "InnerProduct":
            return l.inner_product_param.num_output
        if l.type == "Convolution":
            return l.convolution_param.num_output
    raise SystemExit("benchmark: no classifier layer")


deploy = read_deploy(args["prototxt"])
batch = args["batch"]
shape = [batch, *input_shape(deploy)[1:]]
x = torch.randn(shape)
'''

TORCH_TRAIN = SETUP + r'''
model = CaffeAsTorch(deploy).to(memory_format=torch.channels_last)
classes = count_classes(deploy)
label = torch.randint(0, classes, (batch,))
xc = x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
lossf = nn.CrossEntropyLoss()
model.train()
def step():
    opt.zero_grad(set_to_none=True)
    loss = lossf(model(xc), label)
    loss.backward()
    opt.step()
for _ in range(2):
    step()
'''

ENGINE_TRAIN = SETUP + r'''
import logging
logging.getLogger("amct_caffe").setLevel(logging.WARNING)
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.engine.solver import get_solver

classes = count_classes(deploy)
net_param = train_net(deploy, batch, classes)
label = torch.randint(0, classes, (batch,)).float()
work = args["work"]
weights = work + "/float.caffemodel"
if args["mode"] == "qat":
    from amct_caffe import amct
    float_net = Net(net_param, caffe_pb2.TRAIN)
    randomize_params(float_net, seed=0)
    float_net.save(weights)
    with open(work + "/float.prototxt", "w") as fh:
        fh.write(text_format.MessageToString(net_param))
    amct.create_quant_retrain_config(work + "/config.json", work + "/float.prototxt", weights)
    amct.create_quant_retrain_model(work + "/float.prototxt", weights, work + "/config.json",
                                    work + "/retrain.prototxt", work + "/retrain.caffemodel",
                                    work + "/record.txt")
    net_source, weights = work + "/retrain.prototxt", work + "/retrain.caffemodel"
    solver_param = caffe_pb2.SolverParameter(net=net_source)
else:
    solver_param = caffe_pb2.SolverParameter()
    solver_param.net_param.CopyFrom(net_param)
solver_param.base_lr = 1e-3
solver_param.momentum = 0.9
solver_param.weight_decay = 1e-4
solver_param.lr_policy = "fixed"
solver_param.max_iter = 1000000
solver_param.display = 0
solver = get_solver(solver_param)
if args["mode"] == "qat":
    solver.net.copy_from(weights)
else:
    randomize_params(solver.net, seed=0)
data_layer = solver.net.input_layer("data")
data_layer.set_input("data", x)
data_layer.set_input("label", label)
def step():
    solver.step(1)
import time as _t
_t0 = _t.perf_counter()
step()  # the QAT model's first step initialises the clips with IFMR
first_step = _t.perf_counter() - _t0
with open(work + "/first_step.json", "w") as fh:
    fh.write(json.dumps({"first_step": first_step}))
step()
'''

BODY = r'''
for _ in range(args["steps"]):
    step()
'''

TEST_FORWARD = SETUP + r'''
import logging, statistics, time
logging.getLogger("amct_caffe").setLevel(logging.WARNING)
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params

result = {}
engine_param = caffe_pb2.NetParameter(name=deploy.name)
data = engine_param.layer.add(name="data", type="Input")
data.top.append("data")
data.input_param.shape.add().dim.extend(shape)
for l in deploy.layer:
    if l.type != "Input":
        engine_param.layer.add().CopyFrom(l)
net = Net(engine_param, caffe_pb2.TEST)
randomize_params(net, seed=0)
net.input_layer(net.inputs[0]).set_input(net.inputs[0], x)

def timed(fn, iters):
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters

columns = {"engine_ms": net.run}
with torch.no_grad():
    model = CaffeAsTorch(deploy).eval()
    xc = x.contiguous(memory_format=torch.channels_last)
    model_cl = model.to(memory_format=torch.channels_last)
    columns["torch_eager_ms"] = lambda: model_cl(xc)
try:
    import onnxruntime as ort
    import onnx  # noqa: F401  (torch's exporter needs it)
except ImportError:
    ort = None
if ort is not None:
    path = args["work"] + "/model.onnx"
    torch.onnx.export(model, (x,), path, input_names=["data"], output_names=["out"], dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args["threads"]
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {"data": x.numpy()}
    columns["ort_ms"] = lambda: sess.run(None, feed)
    # the same engine net with the ONNX Runtime backend (engine/onnx_backend.py): the first forward
    # exports (trace, ONNX, session, check; the exporter's import included)
    net.backend = "onnxruntime"
    t0 = time.perf_counter()
    net.run()
    result["backend_first_s"] = time.perf_counter() - t0
    result["backend_export_s"] = net.backend_stats.export_seconds
    if net.backend_stats.session_forwards != 1:
        raise SystemExit(f"benchmark: the backend stayed on the engine: {net.backend_stats.reason}")
    engine_net = net
    net = Net(engine_param, caffe_pb2.TEST)  # the engine column's own net (same weights)
    net.copy_from(engine_net.to_proto())
    net.input_layer(net.inputs[0]).set_input(net.inputs[0], x)
    columns["engine_ms"] = net.run
    columns["backend_ms"] = engine_net.run
times = {k: [] for k in columns}
with torch.no_grad():
    for _ in range(args["fwd_rounds"]):  # interleaved, so that other load hits every column alike
        for k, fn in columns.items():
            times[k].append(timed(fn, args["iters"]) * 1000)
result.update({k: statistics.median(v) for k, v in times.items()})
print(json.dumps(result))
raise SystemExit(0)
'''


def models_root(explicit: str | None) -> Path | None:
    for c in (explicit, os.environ.get("AMCT_MODELS_DIR"), str(REPO.parent / "shared" / "models")):
        if c and Path(c).is_dir():
            return Path(c)
    return None


def _cell(row: dict, key: str, fmt: str, suffix: str = "") -> str:
    return format(row[key], fmt) + suffix if key in row else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="model:batch pairs")
    parser.add_argument("--models", help="the folder of the public models (default: $AMCT_MODELS_DIR)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per worker")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians are reported)")
    parser.add_argument("--iters", type=int, default=10, help="timed TEST forwards")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-test-forward", action="store_true")
    parser.add_argument("--test-forward-only", action="store_true", help="skip the training measurements")
    parser.add_argument("--fwd-rounds", type=int, default=3, help="interleaved rounds of the TEST forwards")
    opts = parser.parse_args()
    root = models_root(opts.models)
    if root is None:
        print("bench_train: the public models folder was not found (--models or $AMCT_MODELS_DIR)")
        return 1
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, threads={opts.threads}")
    rows = []
    for config in opts.configs:
        name, batch_text = config.split(":")
        prototxt = str(root / MODELS[name])
        times: dict[str, list[float]] = {"torch": [], "float": [], "qat": []}
        peaks: dict[str, list[float]] = {"torch": [], "float": [], "qat": []}
        first: list[float] = []
        for _ in range(0 if opts.test_forward_only else opts.rounds):
            for mode in ("torch", "float", "qat"):
                with tempfile.TemporaryDirectory() as work:
                    args = {"prototxt": prototxt, "batch": int(batch_text), "threads": opts.threads,
                            "steps": opts.steps, "mode": mode, "work": work}
                    setup = TORCH_TRAIN if mode == "torch" else ENGINE_TRAIN
                    out = run_worker(worker_script(setup, BODY), args)
                    times[mode].append(out["seconds"] / opts.steps * 1000)
                    peaks[mode].append(out["peak_mb"] - out["imports_mb"])
                    if mode == "qat":
                        record = json.loads(Path(work, "first_step.json").read_text())
                        first.append(record["first_step"] * 1000)
        row: dict = {"config": config}
        if not opts.test_forward_only:
            med = {k: statistics.median(v) for k, v in times.items()}
            peak = {k: statistics.median(v) for k, v in peaks.items()}
            row.update({**{f"{k}_ms": v for k, v in med.items()},
                        "float_vs_torch": med["torch"] / med["float"],
                        "qat_vs_float": med["qat"] / med["float"],
                        "ifmr_first_step_ms": statistics.median(first),
                        "first_vs_float": statistics.median(first) / med["float"],
                        "peak_qat_vs_float": peak["qat"] / peak["float"]})
        if not opts.skip_test_forward:
            with tempfile.TemporaryDirectory() as work:
                # the worker prints its own result line and exits before the generic measurement
                fwd = run_worker(worker_script(TEST_FORWARD, ""), {
                    "prototxt": prototxt, "batch": int(batch_text), "threads": opts.threads,
                    "iters": opts.iters, "work": work, "fwd_rounds": opts.fwd_rounds})
            row.update(fwd)
            if "ort_ms" in fwd:
                row["engine_vs_ort"] = fwd["ort_ms"] / fwd["engine_ms"]
                row["backend_vs_ort"] = fwd["ort_ms"] / fwd["backend_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    if not opts.test_forward_only:
        print("| config | torch.nn step ms | float step ms | QAT step ms | float/torch.nn | QAT/float | "
              "first QAT step (IFMR) / float | peak QAT/float |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['config']} | {r['torch_ms']:.0f} | {r['float_ms']:.0f} | {r['qat_ms']:.0f} | "
                  f"{r['float_vs_torch']:.2f}x | {r['qat_vs_float']:.2f}x | {r['first_vs_float']:.1f}x | "
                  f"{r['peak_qat_vs_float']:.2f}x |")
        print()
    if not opts.skip_test_forward:
        print("| config | TEST engine ms | ONNX Runtime ms | engine/ORT | engine + ORT backend ms | "
              "backend/ORT | backend export s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['config']} | {_cell(r, 'engine_ms', '.1f')} | {_cell(r, 'ort_ms', '.1f')} | "
                  f"{_cell(r, 'engine_vs_ort', '.2f', 'x')} | {_cell(r, 'backend_ms', '.1f')} | "
                  f"{_cell(r, 'backend_vs_ort', '.2f', 'x')} | {_cell(r, 'backend_export_s', '.2f')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
