"""The digits demo: a LeNet-style net trained and evaluated on the bundled 8x8 digit images (the UCI optical
digits as scikit-learn ships them, stored in ``amct_caffe/data/digits.npz``).

Everything here runs offline in a few seconds on a CPU, so the QAT flow can be shown (and tested) end to
end on a real classification task:

* :func:`load_split` -- the bundled digits (1797 grey 8x8 images, values 0..16, 10 classes) scaled to
  [0, 1] and split once, stratified by class with a fixed seed, into 1437 training and 360 test images;
* :func:`write_hdf5_data` -- the two splits as HDF5 files (datasets ``data`` (N, 1, 8, 8) and ``label``
  (N,), float32) plus the list files Caffe's ``HDF5Data`` layer reads (absolute paths, because Caffe opens
  the listed files relative to the working directory, not to the list);
* :func:`train_test_net` / :func:`prepare` -- the training prototxt made from the bundled deploy net
  ``amct_caffe/data/lenet_digits.prototxt``: the same layers with the same names and blob shapes (so a
  caffemodel fits both), the ``Input`` layer replaced by two ``HDF5Data`` layers named ``data`` (TRAIN
  first, then TEST, as the data layers of AMCT's retrain sample), the final ``Softmax`` replaced by
  ``SoftmaxWithLoss`` and a TEST-phase ``Accuracy``;
* :func:`solver_param` / :func:`train_float` -- Caffe's SGD solver of the engine trains it
  (``amct_caffe.engine.solver``, with its tqdm progress bar on a terminal);
* :func:`evaluate` -- top-1 accuracy of any digits net (deploy, train/test, retrain or fake-quant prototxt)
  on a split, run batch-wise in the engine's TEST phase.

The data layers: ``HDF5Data`` reading files the demo writes when ``h5py`` is installed (a prototxt the
command line can train), else ``MemoryData`` fed from the arrays by :func:`feed_net` / :func:`feed_solver`
(Caffe's ``set_input_arrays``), so the demo needs no optional package.
"""

from __future__ import annotations

import importlib
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from tqdm.auto import tqdm

from amct_caffe.emulation.loader import load_net
from amct_caffe.engine.layers.data_sources import MemoryData
from amct_caffe.engine.net import Net
from amct_caffe.engine.solver import Solver
from amct_caffe.errors import ConfigError, ModelFormatError
from amct_caffe.model.io import AtomicFiles, atomic_write, load_prototxt, prototxt_text
from amct_caffe.model.phase import TEST, TRAIN, filter_net
from amct_caffe.proto import caffe_pb2

NUM_CLASSES = 10
#: One image as a Caffe blob row: (channels, height, width).
IMAGE_SHAPE = (1, 8, 8)
TRAIN_SIZE = 1437
TEST_SIZE = 360
SPLITS = ("train", "test")
#: Default batch sizes: 64 for training, 120 for testing (3 batches cover the 360 test images exactly).
TRAIN_BATCH = 64
TEST_BATCH = 120
#: Default number of float training iterations (about 27 epochs of the training split).
FLOAT_ITERATIONS = 600
#: Layer types that produce the data of a net from outside it (no bottoms).
DATA_LAYER_TYPES = ("Input", "HDF5Data", "MemoryData", "Data", "DummyData", "ImageData", "WindowData")


def _require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"The digits demo needs the package '{package}' (pip install {package}, or install "
            "amct-caffe with its 'demo' extra)."
        ) from exc


def deploy_prototxt() -> str:
    """Path of the bundled deploy net ``amct_caffe/data/lenet_digits.prototxt`` (Input 1x1x8x8 -> prob)."""
    return str(resources.files("amct_caffe") / "data" / "lenet_digits.prototxt")


# -- the data ----------------------------------------------------------------------------------------------
def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits: images (1797, 1, 8, 8) float32 in [0, 1] (the 0..16 grey levels / 16) and labels
    (1797,) float32, from ``amct_caffe/data/digits.npz`` (scikit-learn's copy of the UCI optical digits;
    written by ``scripts/make_digits_data.py``)."""
    with resources.as_file(resources.files("amct_caffe") / "data" / "digits.npz") as path, \
            np.load(path, allow_pickle=False) as stored:
        images = stored["images"].astype(np.float32) / np.float32(16.0)
        labels = stored["labels"].astype(np.float32)
    return images.reshape(-1, *IMAGE_SHAPE), labels


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a split that keeps each class's share: class ``c`` with ``n_c`` of the
    ``N`` samples gets ``floor(n_c * test_size / N)`` test samples, the ones left over going to the classes
    with the largest remainders (then the smaller class label); which samples of a class are taken, and
    the order of each split, come from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / len(labels)
    take = np.floor(exact).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - take[i]), i))
    for i in order[:test_size - int(take.sum())]:
        take[i] += 1
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls, k in zip(classes, take):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[:k])
        train.append(members[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@lru_cache(maxsize=4)
def _split_arrays(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images, labels = digits_data()
    train, test = stratified_split(labels, TEST_SIZE, seed)
    out = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
    for x, y in out.values():
        x.setflags(write=False)
        y.setflags(write=False)
    return out


def load_split(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One split of the digits data: images (N, 1, 8, 8) float32 in [0, 1] and labels (N,) float32.

    ``split`` is ``"train"`` (1437 images) or ``"test"`` (360); the split is stratified by class and fixed
    by ``seed`` (:func:`stratified_split`), so the same seed always gives the same images. The arrays are
    fresh, writable copies.

    Raises:
        ConfigError: an unknown split.
    """
    if split not in SPLITS:
        raise ConfigError(f"Unknown digits split '{split}'; use 'train' or 'test'.")
    x, y = _split_arrays(int(seed))[split]
    return x.copy(), y.copy()


@dataclass(frozen=True)
class DigitsFiles:
    """The files :func:`prepare` writes into a working folder (absolute paths; the four data paths are ''
    when the nets read ``MemoryData``), and how the nets are fed (:data:`FEEDS`)."""

    train_h5: str
    test_h5: str
    train_list: str
    test_list: str
    train_test_prototxt: str
    deploy_prototxt: str
    feed: str = "hdf5"


def write_hdf5_data(workdir: str | os.PathLike[str], seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write ``digits_<split>.h5`` and its list file ``digits_<split>_h5.txt`` for both splits.

    Returns:
        ``{split: (h5 path, list path)}``, absolute paths; each list holds the absolute path of its file.
    """
    h5py = _require("h5py", "h5py")
    folder = Path(workdir).resolve()
    out: dict[str, tuple[str, str]] = {}
    for split in SPLITS:
        x, y = load_split(split, seed)
        h5_path = folder / f"digits_{split}.h5"
        buffer = io.BytesIO()  # built in memory (the digits are small) so the pair is written as one set
        with h5py.File(buffer, "w") as handle:
            handle.create_dataset("data", data=x)
            handle.create_dataset("label", data=y)
        list_path = folder / f"digits_{split}_h5.txt"
        with AtomicFiles() as files:
            files.write(h5_path, buffer.getvalue())
            files.write(list_path, f"{h5_path}\n".encode())
        out[split] = (str(h5_path), str(list_path))
    return out


#: How the demo's nets get their data: ``HDF5Data`` files (needs h5py) or ``MemoryData`` fed from Python.
FEEDS = ("hdf5", "memory")


def default_feed() -> str:
    """``"hdf5"`` when h5py is installed, else ``"memory"``."""
    try:
        importlib.import_module("h5py")
    except ImportError:
        return "memory"
    return "hdf5"


def memory_arrays(split: str, seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of ``split`` for a ``MemoryData`` layer of ``batch_size``: Caffe's layer needs
    a multiple of the batch, so the first images are repeated at the end to fill the last batch (the
    training split: 1437 images -> 1472 for batches of 64; the test split's 360 need no padding for 120)."""
    x, y = load_split(split, seed)
    pad = -len(y) % batch_size
    if pad:
        x, y = np.concatenate([x, x[:pad]]), np.concatenate([y, y[:pad]])
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def feed_net(net: Net, split: str, seed: int = 0) -> bool:
    """Give a net whose first layer is ``MemoryData`` the images of ``split`` (:func:`memory_arrays`);
    returns False, doing nothing, for a net fed otherwise."""
    first = net.engine_layers[0] if net.engine_layers else None
    if not isinstance(first, MemoryData):
        return False
    first.set_input_arrays(*memory_arrays(split, seed, first.batch_size))
    return True


def feed_solver(solver: Solver, seed: int = 0) -> None:
    """:func:`feed_net` for a solver's train net (the training split) and test nets (the test split)."""
    feed_net(solver.net, "train", seed)
    for net in solver.test_nets:
        feed_net(net, "test", seed)


# -- the nets ----------------------------------------------------------------------------------------------
def train_test_net(
    train_source: str,
    test_source: str,
    train_batch: int = TRAIN_BATCH,
    test_batch: int = TEST_BATCH,
    deploy: str | os.PathLike[str] | None = None,
    feed: str = "hdf5",
) -> caffe_pb2.NetParameter:
    """The training prototxt (both phases) of the deploy net ``deploy`` (default: the bundled one).

    Layer 0 is the TRAIN ``HDF5Data`` (``train_source``, shuffled), layer 1 the TEST one (``test_source``),
    both named ``data`` with tops ``data`` and ``label`` (``feed="memory"``: two ``MemoryData`` layers of
    1x8x8 images instead, the sources unused); then every deploy layer except the ``Input`` and a
    final ``Softmax``, with the usual ``param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }`` added to
    convolutions and inner products that give none (biases learn twice as fast and are not decayed);
    then ``SoftmaxWithLoss`` ``loss`` and the TEST-phase ``Accuracy`` ``accuracy`` on the classifier blob.
    """
    source = load_prototxt(os.fspath(deploy) if deploy is not None else deploy_prototxt())
    net = caffe_pb2.NetParameter(name=source.name)
    if feed not in FEEDS:
        raise ConfigError(f"Unknown digits feed '{feed}'; use one of {', '.join(FEEDS)}.")
    for phase, path, batch in ((TRAIN, train_source, train_batch), (TEST, test_source, test_batch)):
        if feed == "memory":
            layer = net.layer.add(name="data", type="MemoryData", top=["data", "label"])
            layer.include.add(phase=phase)
            layer.memory_data_param.batch_size = int(batch)
            layer.memory_data_param.channels, layer.memory_data_param.height, \
                layer.memory_data_param.width = IMAGE_SHAPE
            continue
        layer = net.layer.add(name="data", type="HDF5Data", top=["data", "label"])
        layer.include.add(phase=phase)
        layer.hdf5_data_param.source = path
        layer.hdf5_data_param.batch_size = int(batch)
        if phase == TRAIN:
            layer.hdf5_data_param.shuffle = True
    layers = [layer for layer in source.layer if layer.type != "Input"]
    if layers and layers[-1].type == "Softmax":
        layers = layers[:-1]
    if not layers:
        raise ModelFormatError(f"The deploy net '{deploy}' has no layer besides its Input and Softmax.")
    for layer in layers:
        copy = net.layer.add()
        copy.CopyFrom(layer)
        if copy.type in ("Convolution", "InnerProduct") and not copy.param:
            copy.param.add(lr_mult=1.0)
            copy.param.add(lr_mult=2.0, decay_mult=0.0)
    classifier = layers[-1].top[0]
    net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=[classifier, "label"], top=["loss"])
    accuracy = net.layer.add(name="accuracy", type="Accuracy", bottom=[classifier, "label"], top=["accuracy"])
    accuracy.include.add(phase=TEST)
    return net


def prepare(
    workdir: str | os.PathLike[str],
    seed: int = 0,
    train_batch: int = TRAIN_BATCH,
    test_batch: int = TEST_BATCH,
    feed: str | None = None,
) -> DigitsFiles:
    """Write the data (:func:`write_hdf5_data`; none for ``feed="memory"``), ``lenet_digits_train_test
    .prototxt`` and a copy of the deploy net ``lenet_digits_deploy.prototxt`` into ``workdir`` (created if
    needed). ``feed`` None: :func:`default_feed`."""
    folder = Path(workdir).resolve()
    feed = default_feed() if feed is None else feed
    if feed == "hdf5":
        data = write_hdf5_data(folder, seed)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data = {split: ("", "") for split in SPLITS}
    net = train_test_net(data["train"][1], data["test"][1], train_batch, test_batch, feed=feed)
    train_test = folder / "lenet_digits_train_test.prototxt"
    atomic_write(train_test, prototxt_text(net).encode("utf-8"))
    deploy = folder / "lenet_digits_deploy.prototxt"
    atomic_write(deploy, Path(deploy_prototxt()).read_bytes())
    return DigitsFiles(data["train"][0], data["test"][0], data["train"][1], data["test"][1], str(train_test),
                       str(deploy), feed)


def solver_param(
    net_path: str,
    iterations: int = FLOAT_ITERATIONS,
    seed: int = 0,
    base_lr: float = 0.05,
    snapshot_prefix: str | None = None,
    test_batch: int = TEST_BATCH,
) -> caffe_pb2.SolverParameter:
    """The float training solver: SGD with momentum 0.9, weight decay 5e-4, ``poly`` policy (power 1: the
    rate falls linearly to 0 at ``iterations``), ``random_seed = seed``; one test after training over
    the whole test split (``test_interval = max_iter``, ``test_initialization: false``, AMCT's rule);
    a snapshot after training (``<snapshot_prefix>_iter_<iterations>.caffemodel``)."""
    if iterations <= 0:
        raise ConfigError(f"iterations must be positive, got {iterations}.")
    p = caffe_pb2.SolverParameter(
        net=net_path, type="SGD", base_lr=base_lr, momentum=0.9, weight_decay=5e-4, lr_policy="poly",
        power=1.0, max_iter=int(iterations), display=0, random_seed=int(seed), test_interval=int(iterations),
        test_initialization=False,
    )
    p.test_iter.append(max(1, -(-TEST_SIZE // int(test_batch))))
    if snapshot_prefix is not None:
        p.snapshot_prefix = snapshot_prefix
    return p


def train_float(workdir: str | os.PathLike[str], iterations: int = FLOAT_ITERATIONS, seed: int = 0) -> str:
    """Train the float digits net in ``workdir`` and return the path of its caffemodel.

    Writes the files of :func:`prepare`, the solver ``lenet_digits_float_solver.prototxt`` and trains with
    the engine's SGD solver; the result is the solver's snapshot
    ``<workdir>/lenet_digits_float_iter_<iterations>.caffemodel`` (and ``.solverstate``). With the
    defaults the test accuracy is about 97-98 %. Same ``seed``, same data split and same weights.
    """
    from amct_caffe.engine.solver import get_solver

    folder = Path(workdir).resolve()
    files = prepare(folder, seed)
    param = solver_param(files.train_test_prototxt, iterations, seed,
                         snapshot_prefix=str(folder / "lenet_digits_float"))
    solver_path = folder / "lenet_digits_float_solver.prototxt"
    atomic_write(solver_path, prototxt_text(param).encode("utf-8"))
    solver = get_solver(str(solver_path))
    feed_solver(solver, seed)
    solver.solve()
    return solver.snapshot_filename(".caffemodel")


# -- evaluation --------------------------------------------------------------------------------------------
def _input_fed(net: caffe_pb2.NetParameter, batch: int, path: str) -> tuple[caffe_pb2.NetParameter, str, str]:
    """``net`` (one phase) with its data layer replaced by an ``Input`` of batch ``batch``; returns the
    net, the data blob and the label blob ('' when the data layer has no second top)."""
    data_layers = [i for i, layer in enumerate(net.layer)
                   if layer.type in DATA_LAYER_TYPES and not layer.bottom]
    if len(data_layers) != 1:
        raise ModelFormatError(
            f"Net '{path}' has {len(data_layers)} data layers in its TEST phase; a digits net has exactly "
            "one (an Input, or HDF5Data/MemoryData/... with tops data and label)."
        )
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    old = out.layer[data_layers[0]]
    tops = list(old.top)
    if not 1 <= len(tops) <= 2:
        raise ModelFormatError(f"The data layer '{old.name}' of '{path}' has {len(tops)} tops; expected data "
                               "and optionally label.")
    new = caffe_pb2.LayerParameter(name=old.name, type="Input", top=tops)
    new.input_param.shape.add(dim=[batch, *IMAGE_SHAPE])
    if len(tops) == 2:
        new.input_param.shape.add(dim=[batch])
    old.CopyFrom(new)
    return out, tops[0], tops[1] if len(tops) == 2 else ""


def input_fed_net(prototxt: str | os.PathLike[str], batch: int) -> caffe_pb2.NetParameter:
    """The TEST-phase view of a digits prototxt with its data layer replaced by ``Input`` blobs ``data``
    (batch, 1, 8, 8) and ``label`` (batch,)."""
    path = os.fspath(prototxt)
    return _input_fed(filter_net(load_prototxt(path), TEST, path=path), batch, path)[0]


def _scores_blob(param: caffe_pb2.NetParameter, net: Net, batch: int, path: str) -> str:
    """The class-score blob: the first bottom of an ``Accuracy`` layer, else the one output of shape
    (batch, 10) (``prob`` preferred when several)."""
    for layer in param.layer:
        if layer.type == "Accuracy":
            return layer.bottom[0]
    candidates = [name for name in net.outputs if net.tensor(name).numel() == batch * NUM_CLASSES
                  and net.tensor(name).shape[0] == batch]
    if "prob" in candidates:
        return "prob"
    if len(candidates) != 1:
        raise ModelFormatError(
            f"Cannot tell which output of '{path}' holds the class scores (outputs of shape ({batch}, "
            f"{NUM_CLASSES}): {candidates}); add an Accuracy layer or name it 'prob'."
        )
    return candidates[0]


def predict(
    prototxt: str | os.PathLike[str],
    caffemodel: str | os.PathLike[str],
    split: str = "test",
    seed: int = 0,
    batch_size: int = TEST_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-1 classes a digits net predicts for the images of one split, and their labels (see
    :func:`evaluate`, which scores them).

    Raises:
        ConfigError: ``batch_size`` is not positive.
        ModelFormatError: the net is not a digits net (no single data layer, no class-score blob) or the
            caffemodel does not fit it.
    """
    path = os.fspath(prototxt)
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}.")
    x, y = load_split(split, seed)
    param, data_blob, label_blob = _input_fed(filter_net(load_prototxt(path), TEST, path=path), batch_size,
                                              path)
    net = load_net(param, os.fspath(caffemodel), TEST)  # a deploy caffemodel runs the integer emulation
    scores_name = _scores_blob(param, net, batch_size, path)
    predictions = []
    for start in tqdm(range(0, len(y), batch_size), desc=f"Evaluating {Path(path).name} on {split}",
                      unit="batch", disable=None, leave=False):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        count = len(yb)
        if count < batch_size:
            pad = batch_size - count
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[-1:], pad, axis=0)])
        net.set_tensor(data_blob, torch.from_numpy(np.ascontiguousarray(xb)))
        if label_blob:
            net.set_tensor(label_blob, torch.from_numpy(np.ascontiguousarray(yb)))
        net.run()
        scores = net.tensor(scores_name).detach().cpu().numpy().reshape(batch_size, -1)[:count]
        predictions.append(scores.argmax(axis=1))
    return np.concatenate(predictions), y.astype(np.int64)


def evaluate(
    prototxt: str | os.PathLike[str],
    caffemodel: str | os.PathLike[str],
    split: str = "test",
    seed: int = 0,
    batch_size: int = TEST_BATCH,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of a digits net on one split, in the engine's TEST phase.

    ``prototxt`` may be the deploy net, the train/test prototxt, the retrain model of
    ``create_quant_retrain_model`` or a fake-quant model: its TEST-phase view is taken and its one data
    layer (``Input``, ``HDF5Data``...) is replaced by an ``Input`` of ``batch_size`` images (and labels when
    the data layer has a label top, so Accuracy and loss layers still run); the images of ``split``
    (:func:`load_split` with ``seed``, which must be the seed the data was written with) are fed batch by
    batch, and the arg-max of the class scores (the ``Accuracy`` layer's first bottom, else the
    (batch, 10) output) is compared with the labels. The last batch is padded by repeating its last image;
    the padding rows are not counted.

    Raises:
        ModelFormatError: the net is not a digits net (no single data layer, no class-score blob) or the
            caffemodel does not fit it.
    """
    predictions, labels = predict(prototxt, caffemodel, split, seed, batch_size)
    return float(np.mean(predictions == labels))


__all__ = [
    "FLOAT_ITERATIONS",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "TEST_BATCH",
    "TEST_SIZE",
    "TRAIN_BATCH",
    "TRAIN_SIZE",
    "DigitsFiles",
    "FEEDS",
    "default_feed",
    "deploy_prototxt",
    "digits_data",
    "feed_net",
    "feed_solver",
    "input_fed_net",
    "memory_arrays",
    "evaluate",
    "predict",
    "load_split",
    "prepare",
    "solver_param",
    "stratified_split",
    "train_float",
    "train_test_net",
    "write_hdf5_data",
]
