"""The ``amct-caffe`` command line.

Exit codes: 0 success, 2 usage error, 1 failure (one line on stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from amct_caffe.errors import AmctError


def _bundled_model() -> Path:
    return Path(str(resources.files("amct_caffe") / "data" / "lenet_digits.prototxt"))


def _parse_inputs(specs: Sequence[str]) -> dict[str, np.ndarray]:
    inputs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise AmctError(f"--input '{spec}' must look like NAME=FILE.npy")
        try:
            inputs[name] = np.load(path).astype(np.float32)
        except OSError as exc:
            raise AmctError(
                f"--input '{spec}': cannot read '{path}' ({exc}); give an existing .npy file"
            ) from exc
    return inputs


def _print_outputs(outputs: dict[str, np.ndarray]) -> None:
    for name, value in outputs.items():
        flat = value.reshape(-1)
        head = ", ".join(f"{v:.6g}" for v in flat[:10])
        more = ", ..." if flat.size > 10 else ""
        print(f"{name}: shape {tuple(value.shape)} [{head}{more}]")


def cmd_run(args: argparse.Namespace) -> int:
    """Forward a net once on .npy inputs (random ones when none are given) and print or save its outputs."""
    from amct_caffe import caffe

    net = caffe.Net(args.model, caffe.TEST, weights=args.weights)
    inputs = _parse_inputs(args.input or [])
    rng = np.random.default_rng(args.seed)
    for name in net.inputs:
        if name in inputs:
            net.blobs[name].reshape(*inputs[name].shape)
        else:
            inputs[name] = rng.standard_normal(net.blobs[name].data.shape).astype(np.float32)
    net.reshape()
    start = time.perf_counter()
    outputs = net.forward(**inputs)
    elapsed = time.perf_counter() - start
    _print_outputs(outputs)
    print(f"forward: {elapsed * 1000:.1f} ms")
    if args.save:
        np.savez(args.save, **outputs)
        print(f"outputs saved to {args.save}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the bundled LeNet-style digits net in the engine and print its outputs."""
    model = _bundled_model()
    print(f"amct-caffe demo: running the bundled net {model.name} in the amct-caffe engine (random weights)")
    ns = argparse.Namespace(model=str(model), weights=None, input=[], seed=0, save=None)
    return cmd_run(ns)


def cmd_pycaffe_rewrite(args: argparse.Namespace) -> int:
    """Rewrite a fake-quant prototxt's Quant/DeQuant/AntiQuant layers into Caffe Python layers
    (amct_caffe.pycaffe_layers), so that a stock pycaffe built with Python layers runs it with the
    unchanged fake-quant caffemodel; that Caffe's Python needs amct_caffe importable (numpy only)."""
    from amct_caffe.workflows.pycaffe_rewrite import rewrite_fake_quant_for_pycaffe

    counts = rewrite_fake_quant_for_pycaffe(args.model_in, args.model_out)
    done = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"rewrote {done} layer(s) into {args.model_out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-caffe", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="forward a Caffe net in the engine", description=cmd_run.__doc__)
    run.add_argument("model", help="the .prototxt")
    run.add_argument("--weights", help="the .caffemodel (default: filler values)")
    run.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="input blob values")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    run.add_argument("--save", metavar="FILE.npz", help="save the outputs")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run the demo on the bundled model", description=cmd_demo.__doc__)
    demo.set_defaults(func=cmd_demo)

    rewrite = sub.add_parser(
        "pycaffe-rewrite",
        help="make a fake-quant model runnable in a stock pycaffe (Python layers)",
        description=cmd_pycaffe_rewrite.__doc__,
    )
    rewrite.add_argument("model_in", metavar="MODEL_IN", help="the *_fake_quant_model.prototxt")
    rewrite.add_argument("model_out", metavar="MODEL_OUT", help="the rewritten .prototxt to write")
    rewrite.set_defaults(func=cmd_pycaffe_rewrite)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AmctError as exc:
        if args.debug:
            raise
        print(f"amct-caffe: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
