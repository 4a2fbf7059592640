"""AMCT's ResNet-50 QAT sample flow (``ResNet50_retrain.py``), written as that sample is, on the digits net.

It uses only what an AMCT-Caffe user's script uses: ``caffe`` (here ``from amct_caffe import caffe``),
``caffe_pb2`` with ``google.protobuf.text_format`` to edit nets and write the solver, and AMCT's QAT API
(``from amct_caffe import amct``). The steps (docs/amct-reference.md §9.4):

0. edit the data layers of the training prototxt (TRAIN layer 0, TEST layer 1: source and batch size) and
   test the float model in Caffe's TEST phase;
1. ``amct.create_quant_retrain_config``;
2. ``amct.create_quant_retrain_model``;
3. write the solver (``net`` = modified prototxt, one test after training, ``test_initialization: false``,
   ``snapshot = max_iter``, no ``snapshot_prefix``, so the snapshot is
   ``tmp/solver_iter_<max_iter>.caffemodel``),
   ``caffe.SGDSolver``, ``solver.net.copy_from(modified caffemodel)``, ``solver.solve()``;
4. ``amct.save_quant_retrain_model(..., 'Both', results/retrain_results/<name>, record, config)``;
5. test the fake-quant model in Caffe's TEST phase (its accuracy layer is still there);
6. make the ATC model: the deploy prototxt with layer 0 replaced by an ``Input`` of one image and the last
   layers (loss, accuracy) dropped.

Usage: ``python retrain_sample.py WORK_DIR [--model_file ...] [--weights_file ...] [--train_data ...]
[--test_data ...]``; the defaults are the files the digits demo writes into ``WORK_DIR``
(``amct_caffe.demo.digits.prepare`` and ``train_float``). ``tmp/`` and ``results/`` are made in ``WORK_DIR``;
the accuracies go to ``results/retrain_results/accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from google.protobuf import text_format

from amct_caffe import amct, caffe

caffe_pb2 = caffe.proto.caffe_pb2

MODEL_NAME = "lenet_digits"
TRAIN_BATCH = 64
TEST_BATCH = 120
TEST_ITER = 3  # 3 x 120 = the 360 test images
# The final layers of the TEST view that ATC does not want: loss and accuracy.
TAIL_LAYERS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LeNet digits retrain (QAT) sample")
    parser.add_argument("work_dir", help="work folder; tmp/ and results/ are made there")
    parser.add_argument("--model_file", default=None, help="training prototxt (TRAIN and TEST phases)")
    parser.add_argument("--weights_file", default=None, help="trained float caffemodel")
    parser.add_argument("--train_data", default=None, help="HDF5 list file of the training data")
    parser.add_argument("--test_data", default=None, help="HDF5 list file of the test data")
    parser.add_argument("--train_iter", type=int, default=60, help="retrain iterations")
    parser.add_argument("--base_lr", type=float, default=5e-4, help="retrain learning rate")
    args = parser.parse_args(argv)
    work = os.path.realpath(args.work_dir)
    args.work_dir = work
    args.model_file = args.model_file or os.path.join(work, "lenet_digits_train_test.prototxt")
    args.weights_file = args.weights_file or os.path.join(work, "lenet_digits_float_iter_600.caffemodel")
    args.train_data = args.train_data or os.path.join(work, "digits_train_h5.txt")
    args.test_data = args.test_data or os.path.join(work, "digits_test_h5.txt")
    return args


def args_check(args: argparse.Namespace) -> None:
    for name in ("model_file", "weights_file", "train_data", "test_data"):
        path = getattr(args, name)
        if not os.path.isfile(path):
            raise RuntimeError(f"{name} '{path}' does not exist")
    if args.train_iter <= 0:
        raise RuntimeError("train_iter must be positive")


def test_model(model_file: str, weights_file: str, iterations: int) -> float:
    """Average the net's 'accuracy' output over ``iterations`` TEST-phase forwards (as the sample does)."""
    net = caffe.Net(model_file, weights_file, caffe.TEST)
    total = 0.0
    for _ in range(iterations):
        output = net.forward()
        total += float(output["accuracy"])
    accuracy = total / iterations
    print(f"[INFO] {os.path.basename(model_file)}: top-1 accuracy {accuracy:.4f}")
    return accuracy


def set_data_layers(model_file: str, new_model_file: str, train_data: str, test_data: str) -> None:
    """Point the TRAIN (layer 0) and TEST (layer 1) data layers at the data and set their batch sizes."""
    net = caffe_pb2.NetParameter()
    with open(model_file) as f:
        text_format.Merge(f.read(), net)
    net.layer[0].hdf5_data_param.source = train_data
    net.layer[0].hdf5_data_param.batch_size = TRAIN_BATCH
    net.layer[1].hdf5_data_param.source = test_data
    net.layer[1].hdf5_data_param.batch_size = TEST_BATCH
    with open(new_model_file, "w") as f:
        f.write(text_format.MessageToString(net))


def write_solver(solver_file: str, model_file: str, max_iter: int, base_lr: float) -> None:
    """The retrain solver, as the sample writes it (one test after training, snapshot at max_iter)."""
    solver_param = caffe_pb2.SolverParameter()
    solver_param.net = model_file
    solver_param.test_iter.append(TEST_ITER)
    solver_param.test_interval = max_iter
    solver_param.test_initialization = False
    solver_param.base_lr = base_lr
    solver_param.lr_policy = "step"
    solver_param.stepsize = max(1, max_iter // 2)
    solver_param.gamma = 0.1
    solver_param.momentum = 0.9
    solver_param.weight_decay = 1e-4
    solver_param.display = max_iter
    solver_param.max_iter = max_iter
    solver_param.snapshot = max_iter
    solver_param.random_seed = 0
    solver_param.solver_mode = caffe_pb2.SolverParameter.CPU
    with open(solver_file, "w") as f:
        f.write(text_format.MessageToString(solver_param))


def train_model(solver_file: str, weights_file: str) -> None:
    solver = caffe.SGDSolver(solver_file)
    solver.net.copy_from(weights_file)
    solver.solve()


def make_atc_model(deploy_model_file: str, atc_model_file: str) -> None:
    """Layer 0 becomes an Input of one image; the loss and accuracy layers at the end are dropped."""
    net = caffe_pb2.NetParameter()
    with open(deploy_model_file) as f:
        text_format.Merge(f.read(), net)
    data = net.layer[0]
    tops = list(data.top)
    data.Clear()
    data.name = "data"
    data.type = "Input"
    data.top.append(tops[0])
    data.input_param.shape.add(dim=[1, 1, 8, 8])
    del net.layer[len(net.layer) - TAIL_LAYERS:]
    with open(atc_model_file, "w") as f:
        f.write(text_format.MessageToString(net))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args_check(args)
    caffe.set_mode_cpu()
    amct.set_cpu_mode()
    tmp = os.path.join(args.work_dir, "tmp")
    result = os.path.join(args.work_dir, "results", "retrain_results")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(result, exist_ok=True)

    # Phase 0: set the data layers and test the float model
    model_file = os.path.join(tmp, "train_test.prototxt")
    set_data_layers(args.model_file, model_file, args.train_data, args.test_data)
    float_accuracy = test_model(model_file, args.weights_file, TEST_ITER)

    # Phase 1: the QAT config
    config_file = os.path.join(tmp, "config.json")
    amct.create_quant_retrain_config(config_file, model_file, args.weights_file)

    # Phase 2: the retrain model
    modified_model_file = os.path.join(tmp, "modified_model.prototxt")
    modified_weights_file = os.path.join(tmp, "modified_model.caffemodel")
    scale_offset_record_file = os.path.join(tmp, "record.txt")
    amct.create_quant_retrain_model(model_file, args.weights_file, config_file, modified_model_file,
                                    modified_weights_file, scale_offset_record_file)

    # Phase 3: retrain
    solver_file = os.path.join(tmp, "solver.prototxt")
    write_solver(solver_file, modified_model_file, args.train_iter, args.base_lr)
    train_model(solver_file, modified_weights_file)

    # Phase 4: save the fake-quant and deploy models
    retrained_weights_file = os.path.join(tmp, f"solver_iter_{args.train_iter}.caffemodel")
    save_path = os.path.join(result, MODEL_NAME)
    amct.save_quant_retrain_model(modified_model_file, retrained_weights_file, "Both", save_path,
                                  scale_offset_record_file, config_file)

    # Phase 5: test the fake-quant model
    fake_quant_accuracy = test_model(f"{save_path}_fake_quant_model.prototxt",
                                     f"{save_path}_fake_quant_weights.caffemodel", TEST_ITER)

    # Phase 6: the model for ATC
    make_atc_model(f"{save_path}_deploy_model.prototxt", f"{save_path}_atc_model.prototxt")

    with open(os.path.join(result, "accuracy.json"), "w") as f:
        json.dump({"float": float_accuracy, "fake_quant": fake_quant_accuracy}, f)
    print(f"[INFO] float {float_accuracy:.4f}, fake-quant {fake_quant_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
