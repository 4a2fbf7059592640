"""Forward throughput of the amct-caffe engine vs the reference C++ Caffe (CPU), TEST phase.

For each (model, batch): our net gets random weights (``randomize_params``), which are saved as a caffemodel
that the reference Caffe loads, so both engines compute the same function on the same random input. The
reference runs in a subprocess of its own venv (``_ref_forward_worker.py``; it is never imported here).
Both engines warm up the same number of forwards, then time ``--rounds`` rounds of ``--iters`` forwards,
interleaved (reference, ours optimised, ours with ``net.optimize = False``), so that load from other
processes hits all three alike; the table reports the median time per forward.

    PYTHONPATH=src python benchmarks/bench_forward.py            # or .venv/bin/python benchmarks/...
    PYTHONPATH=src python benchmarks/bench_forward.py --configs resnet50:8 --rounds 5

Both engines use ``--threads`` threads (default: all cores): torch via ``torch.set_num_threads`` in this
process only, the reference via OMP/OpenBLAS/MKL environment variables of its process.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from amct_caffe.caffe import pycaffe  # noqa: E402
from amct_caffe.engine.optimize import InferenceOptions  # noqa: E402
from amct_caffe.engine.randomize import randomize_params  # noqa: E402

WORKER = Path(__file__).with_name("_ref_forward_worker.py")
MODELS = {
    "resnet50": "resnet50/ResNet-50-deploy.prototxt",
    "mobilenet_v2": "mobilenet_v2/mobilenet_v2_deploy.prototxt",
}
DEFAULT_CONFIGS = ["resnet50:1", "resnet50:8", "mobilenet_v2:1", "mobilenet_v2:8"]
#: --ablation: the optimised forward with parts of it switched off
ABLATION = {
    "fold only": InferenceOptions(channels_last=False, prepack=False),
    "fold + channels-last": InferenceOptions(prepack=False),
    "no fold (channels-last + prepack)": InferenceOptions(fold=False),
}


def reference_python(explicit: str | None) -> str | None:
    """--ref-python, else $AMCT_REF_CAFFE_PYTHON, else the repo's .cache/ref-caffe, else ../refcaffe/venv."""
    candidates = [explicit, os.environ.get("AMCT_REF_CAFFE_PYTHON"),
                  str(REPO / ".cache" / "ref-caffe" / "bin" / "python"),
                  str(REPO.parent / "refcaffe" / "venv" / "bin" / "python")]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    return None


class Reference:
    """The reference Caffe in a subprocess, driven by JSON lines (see _ref_forward_worker.py)."""

    def __init__(self, python: str, threads: int) -> None:
        env = dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def call(self, **msg: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"reference Caffe worker died (exit {self.proc.wait()}) on {msg['cmd']}")
        reply = json.loads(line)
        if not reply.get("ok", False):
            raise RuntimeError(f"reference Caffe worker: {reply}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, BrokenPipeError, ValueError):
            self.call(cmd="quit")
        self.proc.wait(timeout=30)


@dataclass
class Result:
    model: str
    batch: int
    ours: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    diffs: dict[str, float] = field(default_factory=dict)
    variants: dict[str, list[float]] = field(default_factory=dict)

    @staticmethod
    def ms(times: list[float]) -> float:
        return statistics.median(times) * 1000.0 if times else float("nan")


def time_ours(net: pycaffe.Net, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        net.forward()
        times.append(time.perf_counter() - start)
    return times


def compared_blobs(net: pycaffe.Net) -> list[str]:
    """The net's outputs and the bottoms of the layers that produce them (e.g. the logits before Softmax,
    whose differences a saturated Softmax would hide)."""
    names = list(net.outputs)
    for layer in net.engine_layers:
        if any(t in net.outputs for t in layer.param.top):
            names += [b for b in layer.param.bottom if b not in names and b not in net.inputs]
    return names


def bench_one(model: str, batch: int, args: argparse.Namespace, ref: Reference | None, tmp: Path) -> Result:
    prototxt = str(Path(args.models_dir) / MODELS[model])
    net = pycaffe.Net(prototxt, pycaffe.TEST)
    randomize_params(net, seed=args.seed)
    weights = tmp / f"{model}.caffemodel"
    net.save(weights)
    name = net.inputs[0]
    shape = (batch,) + tuple(net.blobs[name].shape[1:])
    net.blobs[name].reshape(*shape)
    net.reshape()
    x = np.random.default_rng(args.seed + 1).standard_normal(shape).astype(np.float32)
    net.blobs[name].data[...] = x
    result = Result(model, batch)
    blobs = compared_blobs(net)

    if ref is not None:
        np.save(tmp / "input.npy", x)
        ref.call(cmd="load", prototxt=prototxt, weights=str(weights), input=str(tmp / "input.npy"))
        ref.call(cmd="time", iters=args.warmup)
    # ablation variants: nets of their own (same weights and input), each keeping its plan's caches
    variants = {}
    for label, options in (ABLATION.items() if args.ablation else ()):
        variants[label] = pycaffe.Net(prototxt, str(weights), pycaffe.TEST)
        variants[label].blobs[name].reshape(*shape)
        variants[label].reshape()
        variants[label].blobs[name].data[...] = x
        variants[label].inference_plan(options)
    for optimize in (True, False):
        net.optimize = optimize
        time_ours(net, args.warmup)
    for other in variants.values():
        time_ours(other, args.warmup)
    for _ in range(args.rounds):
        if ref is not None:
            result.ref += ref.call(cmd="time", iters=args.iters)["times"]
        net.optimize = True
        result.ours += time_ours(net, args.iters)
        for label, other in variants.items():
            result.variants.setdefault(label, []).extend(time_ours(other, args.iters))
        net.optimize = False
        result.plain += time_ours(net, args.iters)
    del variants

    net.optimize = False
    plain_out = {b: net.blobs[b].data.copy() for b in blobs}
    net.optimize = True
    net.forward()
    ours_out = {b: net.blobs[b].data.copy() for b in blobs}
    result.diffs["opt vs no-opt"] = max(float(np.abs(ours_out[b] - plain_out[b]).max()) for b in blobs)
    result.diffs["opt vs no-opt (rel. to max)"] = max(
        float(np.abs(ours_out[b] - plain_out[b]).max()) / max(float(np.abs(plain_out[b]).max()), 1e-30)
        for b in blobs
    )
    if ref is not None:
        ref.call(cmd="outputs", blobs=blobs, path=str(tmp / "ref_out.npz"))
        with np.load(tmp / "ref_out.npz") as ref_out:
            for b in blobs:
                scale = max(float(np.abs(ref_out[b]).max()), 1e-30)
                diff = float(np.abs(ours_out[b] - ref_out[b]).max())
                result.diffs[f"{b} vs ref"] = diff
                result.diffs[f"{b} vs ref (rel. to max)"] = diff / scale
    return result


def print_table(results: list[Result]) -> None:
    head = ("model", "batch", "ours ms", "ours no-opt ms", "reference ms", "ours/ref", "no-opt/ref",
            "opt gain")
    rows = []
    for r in results:
        ours, plain, ref = Result.ms(r.ours), Result.ms(r.plain), Result.ms(r.ref)
        if r.ref:
            ref_cols = (f"{ref:.1f}", f"{ref / ours:.2f}x", f"{ref / plain:.2f}x")
        else:
            ref_cols = ("n/a", "n/a", "n/a")
        rows.append((r.model, str(r.batch), f"{ours:.1f}", f"{plain:.1f}", *ref_cols, f"{plain / ours:.2f}x"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    print("\nratios are throughput ratios (reference time / our time); times are medians per forward")
    if any(r.variants for r in results):
        print("\nablation (ms per forward, median; all = every optimisation on):")
        for r in results:
            parts = [f"all {Result.ms(r.ours):.1f}"]
            parts += [f"{k} {Result.ms(v):.1f}" for k, v in r.variants.items()]
            print(f"  {r.model} b{r.batch}: " + ", ".join(parts) + f", off {Result.ms(r.plain):.1f}")
    print("\noutput agreement (max |difference|):")
    for r in results:
        text = ", ".join(f"{k} {v:.3g}" for k, v in r.diffs.items())
        print(f"  {r.model} b{r.batch}: {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help=f"model:batch pairs; models: {', '.join(MODELS)} (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up forwards per engine (default 3)")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for both engines (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", default=str(REPO.parent / "shared" / "models"))
    parser.add_argument("--ref-python", default=None, help="the reference Caffe venv's python")
    parser.add_argument("--no-reference", action="store_true", help="time our engine only")
    parser.add_argument("--ablation", action="store_true",
                        help="also time the optimised forward with parts of it switched off")
    parser.add_argument("--json", default=None, help="also write the raw times and diffs to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    py = None if args.no_reference else reference_python(args.ref_python)
    if py is None and not args.no_reference:
        print("reference Caffe not found (set AMCT_REF_CAFFE_PYTHON or --ref-python); timing ours only",
              file=sys.stderr)
    print(f"# {datetime.date.today()}  {platform.machine()}  {os.cpu_count()} cores  threads {args.threads}  "
          f"torch {torch.__version__}  warmup {args.warmup}  {args.rounds} rounds x {args.iters} iters")
    results = []
    ref = Reference(py, args.threads) if py else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for config in args.configs:
                model, _, batch = config.partition(":")
                if model not in MODELS:
                    parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
                res = bench_one(model, int(batch or 1), args, ref, Path(tmp))
                results.append(res)
                ref_ms = f"{Result.ms(res.ref):.1f} ms" if res.ref else "n/a"
                print(f"  {model} b{res.batch}: ours {Result.ms(res.ours):.1f} ms, no-opt "
                      f"{Result.ms(res.plain):.1f} ms, reference {ref_ms}", flush=True)
    finally:
        if ref is not None:
            ref.close()
    print()
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
