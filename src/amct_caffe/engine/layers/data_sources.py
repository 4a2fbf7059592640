"""Caffe's data layers that read training data: MemoryData, HDF5Data, ImageData and Data (LMDB).

Every layer here has no bottoms and produces a new batch on each forward, in TRAIN and TEST. The net's
shape pass (construction, ``net.reshape()``) runs ``forward`` with ``layer.reshaping = True``: the layers
then return zeros of the current top shapes and do not move their cursor, so building or reshaping a net
consumes no data and the first real forward gives the first batch, as in Caffe (whose ``Net::Init`` and
``Reshape`` never run Forward). The top shapes are those of the last batch produced, or the ones set up
from the first record (Caffe sizes the tops from the first datum/image/file in ``DataLayerSetUp``).

Caffe reads batches on a prefetch thread; the order of the batches it delivers is the order of the
source, which is what these layers produce, synchronously.

Random choices (``shuffle``, ``rand_skip``, the transformer's random crops and mirrors) use a numpy
generator per layer seeded from ``torch.initial_seed()`` and the layer name (so ``torch.manual_seed``
makes them reproducible), not Caffe's RNG: shuffled orders and random crops differ from Caffe's.

Optional packages are imported when a layer is built, so the package imports without them:
``h5py`` (HDF5Data), ``lmdb`` (Data), ``pillow`` (ImageData, and encoded datums in Data).
"""

from __future__ import annotations

import os
import re
import weakref
import zlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from amct_caffe.engine import distributed
from amct_caffe.engine.layers.base import TEST, Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.engine.transform import COLOR, GRAY, DataTransformer, decode_image, hwc_to_chw, resize_linear
from amct_caffe.errors import BlobSizeError, RuntimeEngineError, UnsupportedLayerError
from amct_caffe.log import get_logger
from amct_caffe.model.limits import data_file_problem, elements_problem, source_limit_bytes
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("engine.layers.data_sources")


# -- helpers --------------------------------------------------------------------------------------------
def _require(layer: Layer, module: str, package: str) -> ModuleType:
    """Import an optional package, or an UnsupportedLayerError naming the layer and the pip package."""
    try:
        return __import__(module)
    except ImportError:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' (type {layer.type_name}) needs the Python package '{package}', which is "
            f"not installed; run 'pip install {package}'."
        ) from None


def _layer_rng(layer: Layer) -> np.random.Generator:
    """A generator per layer: reproducible after ``torch.manual_seed``, different for each layer name, and
    the same on every worker of a data-parallel run (so their shares of a shuffled source never overlap)."""
    seed = distributed.data_seed() & 0xFFFFFFFFFFFFFFFF
    return np.random.default_rng([seed, zlib.crc32(layer.name.encode("utf-8"))])


def _shard(layer: Layer) -> tuple[int, int]:
    """(solver count, rank) for Caffe's multi-GPU ``Skip()``: in TRAIN each of N ranks keeps every N-th
    record (``offset % N == rank``); in TEST every rank reads everything. One process: (1, 0)."""
    if layer.phase == TEST:
        return 1, 0
    w = distributed.world()
    return w.size, w.rank


def _read_text(layer: Layer, path: str, field: str) -> str:
    limit = source_limit_bytes()
    problem = data_file_problem(path, limit)
    if problem is not None:
        raise layer.error(f"{field} '{path}' {problem}")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            # at most the limit: a file that grows while it is read stays bounded too
            return fh.read(limit)
    except OSError as exc:
        raise layer.error(f"cannot open {field} '{path}' (relative paths are relative to the working "
                          f"directory '{os.getcwd()}', as in Caffe): {exc.strerror or exc}.") from None


def _atoi(text: str) -> int:
    """C's ``atoi``: optional leading whitespace and sign, then digits; 0 when there are none."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def _batch_size(layer: Layer, value: int, field: str) -> int:
    if value <= 0:
        raise layer.error(f"{field}.batch_size is {value}; set a positive batch_size.")
    return int(value)


class _DataSource(Layer):
    """Common part: no bottoms; placeholder tops during the shape pass; a new batch on every forward.

    A data layer opens its source and reads what sizes its tops when it is built (it has no bottoms, so
    :meth:`setup` has nothing to add).
    """

    exact_bottoms = 0
    min_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        #: This layer's generator for shuffling, ``rand_skip`` and the transformer's random draws.
        self.rng = _layer_rng(self)
        #: The top shapes of the shape pass: those of the last batch, or set from the first record.
        self._top_shapes: list[tuple[int, ...]] = []

    def next_batch(self) -> list[np.ndarray]:
        """The next batch, one float32 array per top, advancing the cursor."""
        raise NotImplementedError

    def _placeholders(self) -> list[Tensor]:
        return [torch.zeros(shape, dtype=torch.float32, device=self.device) for shape in self._top_shapes]

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        if self.reshaping:
            return self._placeholders()
        arrays = self.next_batch()
        self._top_shapes = [tuple(a.shape) for a in arrays]
        return [torch.from_numpy(a).to(self.device) for a in arrays]

    def _transformer(self) -> DataTransformer:
        return DataTransformer(self.param.transform_param, self.phase, rng=self.rng, error=self.error,
                               what=f"Layer '{self.name}' (type {self.type_name})")


# -- MemoryData -----------------------------------------------------------------------------------------
@register("MemoryData")
class MemoryData(_DataSource):
    """Batches from arrays held in memory, fed from Python (Caffe's ``MemoryDataLayer``).

    ``set_input_arrays(data, labels)`` is Caffe's ``Reset`` as pycaffe's ``net.set_input_arrays`` calls
    it: ``data`` float32, 4-D (N, channels, height, width), C-contiguous; ``labels`` float32 with N values
    (shape (N,) or (N, 1, 1, 1)); N a multiple of ``batch_size``. Tops: data (batch_size, C, H, W) and
    label, which Caffe shapes (batch_size,) at setup but (batch_size, 1, 1, 1) at every forward (its
    ``Forward_cpu`` reshapes it so); both are reproduced. Like Caffe, the layer keeps the arrays
    themselves (no copy): changing them later changes later batches. Each forward gives the next
    ``batch_size`` rows and wraps around after N. Arrays set this way are *not* transformed (Caffe logs
    a warning if ``transform_param`` is set); :meth:`add_datum_vector` (Caffe's ``AddDatumVector``)
    transforms its datums with ``transform_param``.
    """

    exact_tops = 2

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.memory_data_param
        self.batch_size, self.channels = int(p.batch_size), int(p.channels)
        self.height, self.width = int(p.height), int(p.width)
        if min(self.batch_size, self.channels, self.height, self.width) <= 0:
            raise self.error(
                "memory_data_param needs batch_size, channels, height and width, all positive (got "
                f"{self.batch_size}, {self.channels}, {self.height}, {self.width})."
            )
        self.transformer = self._transformer()
        self._data: Tensor | None = None
        self._labels: Tensor | None = None
        self._n = 0
        self._pos = 0
        self.has_new_data = False
        self._top_shapes = [(self.batch_size, self.channels, self.height, self.width), (self.batch_size,)]

    def set_input_arrays(self, data: Any, labels: Any) -> None:
        """Feed (N, C, H, W) float32 data and N float32 labels (pycaffe's ``net.set_input_arrays``)."""
        data_arr = self._check_array(data, "data array", (self.channels, self.height, self.width))
        labels_arr = np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels.detach().numpy()
        if labels_arr.ndim == 1:
            labels_arr = labels_arr.reshape(-1, 1, 1, 1)
        labels_arr = self._check_array(labels_arr, "labels array", (1, 1, 1))
        if data_arr.shape[0] != labels_arr.shape[0]:
            raise RuntimeEngineError(
                f"Layer '{self.name}' (type MemoryData): data and labels must have the same first dimension "
                f"(got {data_arr.shape[0]} and {labels_arr.shape[0]})."
            )
        self._reset(data_arr, labels_arr.reshape(-1), data_arr.shape[0])

    def _check_array(self, arr: Any, what: str, chw: tuple[int, int, int]) -> np.ndarray:
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
        arr = np.asarray(arr)
        prefix = f"Layer '{self.name}' (type MemoryData): {what}"
        if not arr.flags.c_contiguous:
            raise RuntimeEngineError(f"{prefix} must be C contiguous (use np.ascontiguousarray).")
        if arr.ndim != 4:
            raise RuntimeEngineError(f"{prefix} must be 4-d, got shape {arr.shape}.")
        if arr.dtype != np.float32:
            raise RuntimeEngineError(f"{prefix} must be float32, got {arr.dtype} (use .astype(np.float32)).")
        if tuple(arr.shape[1:]) != chw:
            raise RuntimeEngineError(
                f"{prefix} has shape {arr.shape}; memory_data_param asks for (N, {chw[0]}, {chw[1]}, "
                f"{chw[2]})."
            )
        if not arr.flags.writeable:
            arr = arr.copy()  # torch cannot share read-only memory
        return arr

    def _reset(self, data: np.ndarray, labels: np.ndarray, n: int) -> None:
        # Caffe's Reset: no transformation of arrays, only a warning.
        if n <= 0 or n % self.batch_size:
            raise RuntimeEngineError(
                f"Layer '{self.name}' (type MemoryData): the first dimension of the input arrays ({n}) "
                f"must be a positive multiple of batch_size {self.batch_size}."
            )
        if self.param.HasField("transform_param"):
            LOGGER.warning("Layer '%s': MemoryData does not transform array data on Reset "
                           "(set_input_arrays); transform_param is ignored for these arrays.", self.name)
        self._data = torch.from_numpy(data)
        self._labels = torch.from_numpy(labels)
        self._n = n
        self._pos = 0

    def add_datum_vector(self, datums: Sequence[caffe_pb2.Datum]) -> None:
        """Caffe's ``AddDatumVector``: transform the datums with ``transform_param`` and serve them."""
        if self.has_new_data:
            raise RuntimeEngineError(f"Layer '{self.name}' (type MemoryData): can't add data until the "
                                     "current data has been consumed.")
        num = len(datums)
        if num == 0:
            raise RuntimeEngineError(f"Layer '{self.name}' (type MemoryData): there is no datum to add.")
        if num % self.batch_size:
            raise RuntimeEngineError(f"Layer '{self.name}' (type MemoryData): the added data ({num}) must "
                                     f"be a multiple of the batch size {self.batch_size}.")
        data = np.empty((num, self.channels, self.height, self.width), dtype=np.float32)
        for i, datum in enumerate(datums):
            item = self.transformer.transform_datum(datum)
            if item.shape != data.shape[1:]:
                raise self.error(f"datum {i} transforms to shape {item.shape} but memory_data_param asks for "
                                 f"{data.shape[1:]}.")
            data[i] = item
        labels = np.asarray([d.label for d in datums], dtype=np.float32)
        self._data, self._labels = torch.from_numpy(data), torch.from_numpy(labels)
        self._n, self._pos = num, 0
        self.has_new_data = True

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        if self.reshaping:
            return self._placeholders()
        if self._data is None or self._labels is None:
            raise RuntimeEngineError(
                f"Layer '{self.name}' (type MemoryData) has no data: call set_input_arrays(data, labels) "
                "(pycaffe: net.set_input_arrays) before the forward."
            )
        b, pos = self.batch_size, self._pos
        data = self._data[pos:pos + b]
        labels = self._labels[pos:pos + b]
        self._pos = (pos + b) % self._n
        if self._pos == 0:
            self.has_new_data = False
        # Caffe quirk: setup shapes the label (batch_size,), Forward reshapes it (batch_size, 1, 1, 1)
        labels = labels.view(b, 1, 1, 1)
        self._top_shapes = [tuple(data.shape), tuple(labels.shape)]
        return [data.to(self.device), labels.to(self.device)]


# -- HDF5Data -------------------------------------------------------------------------------------------
@register("HDF5Data")
class HDF5Data(_DataSource):
    """Rows of HDF5 datasets (Caffe's ``HDF5DataLayer``); each top reads the dataset of its name.

    ``hdf5_data_param.source`` is a text file listing .h5 files separated by white space (Caffe reads it
    with ``>>``, so one per line works and names cannot contain spaces). Both the list and the files it
    names are opened as given, i.e. relative paths are relative to the *working directory*, not to the
    list file (Caffe passes them to ``H5Fopen`` unchanged). All tops' datasets must have the same number
    of rows; a top has shape (batch_size, *dataset.shape[1:]) and values converted to float32 (Caffe reads
    with ``H5LTread_dataset_float``). Rows are read in order across the files and wrap around to the first
    file; a file is loaded whole when the cursor reaches it. No ``transform_param`` (Caffe refuses it).

    ``shuffle`` permutes the file order (again at every wrap) and the rows of each file (again each time
    the file's rows are exhausted), as Caffe does, but with this layer's own RNG: the order differs from
    Caffe's ``std::random_shuffle``.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        if param.HasField("transform_param"):
            raise self.error("does not transform data (Caffe refuses transform_param for HDF5 data, which is "
                             "generic); remove transform_param and store the data preprocessed.")
        p = param.hdf5_data_param
        self.batch_size = _batch_size(self, p.batch_size, "hdf5_data_param")
        self.shuffle = bool(p.shuffle)
        if not p.source:
            raise self.error("hdf5_data_param.source is empty; give a text file listing the .h5 files.")
        self.files = _read_text(self, p.source, "hdf5_data_param.source").split()
        if not self.files:
            raise self.error(f"must have at least 1 HDF5 filename listed in '{p.source}'.")
        self.h5py = _require(self, "h5py", "h5py")
        self.file_perm = np.arange(len(self.files))
        if self.shuffle:
            self.rng.shuffle(self.file_perm)
        self._row_shapes: list[tuple[int, ...]] | None = None
        #: The loaded file's datasets (one array per top) and the order of its rows; see :meth:`_load`.
        self.arrays: list[np.ndarray] = []
        self.perm = np.arange(0)
        self.current_file = 0
        self._load(int(self.file_perm[0]))
        self.current_row = 0
        self.offset = 0
        rows: list[tuple[int, ...]] = self._row_shapes or []
        self._top_shapes = [(self.batch_size, *shape) for shape in rows]

    def _load(self, index: int) -> None:
        """Caffe's ``LoadHDF5FileData``: read every top's dataset of one file."""
        path = self.files[index]
        problem = data_file_problem(path)
        if problem is not None:
            listed = self.param.hdf5_data_param.source
            raise self.error(f"HDF5 file '{path}' (listed in '{listed}') {problem}")
        try:
            handle = self.h5py.File(path, "r")
        except OSError as exc:
            listed = self.param.hdf5_data_param.source
            raise self.error(f"failed opening HDF5 file '{path}' (listed in '{listed}'; relative to the "
                             f"working directory '{os.getcwd()}'): {exc}.") from None
        arrays: list[np.ndarray] = []
        with handle:
            for top in self.param.top:
                ds = handle.get(top)
                if ds is None or not isinstance(ds, self.h5py.Dataset):
                    raise self.error(f"HDF5 file '{path}' has no dataset '{top}'; every top of an HDF5Data "
                                     "layer names a dataset of the files.")
                if ds.dtype.kind not in "fiu":
                    raise self.error(f"dataset '{top}' of '{path}' has type {ds.dtype}; Caffe reads integer "
                                     "or float datasets only.")
                if ds.ndim < 1:
                    raise self.error(f"dataset '{top}' of '{path}' is a scalar; it needs at least 1 axis.")
                problem = elements_problem(ds.shape)
                if problem is not None:
                    raise BlobSizeError(f"Layer '{self.name}' (type {self.type_name}): dataset '{top}' of "
                                        f"'{path}' {problem}")
                arrays.append(np.asarray(ds[()], dtype=np.float32))
        rows = arrays[0].shape[0]
        for top, arr in zip(self.param.top, arrays):
            if arr.shape[0] != rows:
                raise self.error(f"in '{path}' dataset '{top}' has {arr.shape[0]} rows but "
                                 f"'{self.param.top[0]}' has {rows}; all datasets need the same number.")
        if rows == 0:
            raise self.error(f"the datasets of '{path}' have no rows.")
        shapes = [tuple(a.shape[1:]) for a in arrays]
        if self._row_shapes is None:
            self._row_shapes = shapes
        elif shapes != self._row_shapes:
            raise self.error(f"the datasets of '{path}' have row shapes {shapes} but the first file's are "
                             f"{self._row_shapes}; every file must match (tops are sized from the first).")
        self.arrays = arrays
        self.perm = np.arange(rows)
        if self.shuffle:
            self.rng.shuffle(self.perm)

    def _advance(self, count: int) -> None:
        """Caffe's ``Next()`` ``count`` times (``count`` never passes the end of the current file)."""
        self.current_row += count
        self.offset += count
        if self.current_row == len(self.perm):
            if len(self.files) > 1:
                self.current_file += 1
                if self.current_file == len(self.files):
                    self.current_file = 0
                    if self.shuffle:
                        self.rng.shuffle(self.file_perm)
                self._load(int(self.file_perm[self.current_file]))
            self.current_row = 0
            if self.shuffle:
                self.rng.shuffle(self.perm)

    def next_batch(self) -> list[np.ndarray]:
        b = self.batch_size
        out = [np.empty((b, *shape), dtype=np.float32) for shape in self._row_shapes or []]
        size, rank = _shard(self)
        filled = 0
        while filled < b:
            left = len(self.perm) - self.current_row
            positions = np.arange(left)
            if size > 1:
                positions = positions[(self.offset + positions) % size == rank]
            positions = positions[: b - filled]
            if len(positions):
                rows = self.perm[self.current_row + positions]
                for dst, src in zip(out, self.arrays):
                    dst[filled:filled + len(positions)] = src[rows]
                filled += len(positions)
            # Caffe calls Next() after each copied row and for each skipped one
            self._advance(int(positions[-1]) + 1 if filled == b and len(positions) else left)
        return out


# -- ImageData ------------------------------------------------------------------------------------------
@register("ImageData")
class ImageData(_DataSource):
    """Images listed in a text file, with integer labels (Caffe's ``ImageDataLayer``).

    Each line of ``image_data_param.source`` is ``<path> <label>``, split at the *last* space (so paths may
    contain spaces) with the label parsed by C ``atoi``; blank lines are skipped (Caffe would fail on
    them). An image is read from ``root_folder + path`` -- plain string concatenation as in Caffe, so
    ``root_folder`` needs its trailing ``/`` -- relative to the working directory. ``is_color`` reads 3
    channels in OpenCV's **BGR** order (Caffe uses ``cv::imread``; Pillow's RGB is reversed here), else
    1 grey channel. With ``new_height``/``new_width`` (both or neither) the image is resized as OpenCV's
    bilinear ``cv::resize`` (see :func:`amct_caffe.engine.transform.resize_linear`; a real OpenCV can
    differ by one grey level at some pixels). Then ``transform_param`` applies. Tops: data (batch_size,
    C, H, W) and label (batch_size,). ``shuffle`` shuffles the list at setup and at every wrap (own RNG);
    ``rand_skip`` skips a random number ``< rand_skip`` of lines at setup. In a data-parallel TRAIN run each
    of N workers keeps every N-th line, as Caffe's Data and HDF5Data layers do (Caffe's ImageDataLayer has no
    such share and would give every worker the same images).
    """

    exact_tops = 2

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.image_data_param
        self.new_height, self.new_width = int(p.new_height), int(p.new_width)
        if (self.new_height > 0) != (self.new_width > 0):
            raise self.error("image_data_param needs new_height and new_width set together (or neither); got "
                             f"new_height={self.new_height}, new_width={self.new_width}.")
        self.is_color = bool(p.is_color)
        self.root_folder = p.root_folder
        self.batch_size = _batch_size(self, p.batch_size, "image_data_param")
        self.shuffle = bool(p.shuffle)
        if not p.source:
            raise self.error("image_data_param.source is empty; give a text file of '<image path> <label>'.")
        self.lines = self._parse(_read_text(self, p.source, "image_data_param.source"))
        if not self.lines:
            raise self.error(f"the image list '{p.source}' is empty.")
        self.what = f"Layer '{self.name}' (type ImageData)"
        from amct_caffe.engine.transform import pillow

        pillow(self.what)  # fail early, naming the layer, when Pillow is missing
        if self.shuffle:
            self._shuffle()
        self.lines_id = 0
        #: Lines visited since setup, for the data-parallel share (see :func:`_shard`).
        self.offset = 0
        if p.rand_skip:
            skip = int(self.rng.integers(1 << 32)) % int(p.rand_skip)
            if len(self.lines) <= skip:
                raise self.error(f"not enough images ({len(self.lines)}) to skip {skip} (rand_skip).")
            self.lines_id = skip
        self.transformer = self._transformer()
        shape = self.transformer.infer_shape(self._read(self.lines_id).shape)
        self._top_shapes = [(self.batch_size, *shape), (self.batch_size,)]

    @staticmethod
    def _parse(text: str) -> list[tuple[str, int]]:
        lines: list[tuple[str, int]] = []
        for line in text.split("\n"):
            if not line.strip():
                continue
            pos = line.rfind(" ")
            # Caffe: label = atoi(line.substr(pos + 1)), path = line.substr(0, pos); npos + 1 == 0
            lines.append((line[:pos] if pos >= 0 else line, _atoi(line[pos + 1:])))
        return lines

    def _shuffle(self) -> None:
        order = self.rng.permutation(len(self.lines))
        self.lines = [self.lines[i] for i in order]

    def _read(self, index: int) -> np.ndarray:
        path = self.root_folder + self.lines[index][0]
        problem = data_file_problem(path, source_limit_bytes())
        if problem is not None:
            raise self.error(f"image '{path}' (listed in '{self.param.image_data_param.source}') {problem}")
        img = decode_image(path, COLOR if self.is_color else GRAY, what=self.what, error=self.error)
        if self.new_height > 0:
            img = resize_linear(img, self.new_height, self.new_width)
        return hwc_to_chw(img)

    def _next_line(self) -> None:
        self.lines_id += 1
        self.offset += 1
        if self.lines_id >= len(self.lines):
            self.lines_id = 0
            if self.shuffle:
                self._shuffle()

    def next_batch(self) -> list[np.ndarray]:
        size, rank = _shard(self)
        items: list[np.ndarray] = []
        labels = np.empty(self.batch_size, dtype=np.float32)
        for i in range(self.batch_size):
            while size > 1 and self.offset % size != rank:
                self._next_line()
            items.append(self._read(self.lines_id))
            labels[i] = self.lines[self.lines_id][1]
            self._next_line()
        return [self.transformer.transform_items(items), labels]


#: LMDB environments open in this process, by real path: LMDB (and py-lmdb) allow one environment per
#: database and process, while several nets (TRAIN and TEST, or a net built twice) may read one database.
#: Each layer keeps its own read transaction and cursor on the shared environment.
_LMDB_ENVS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def _open_lmdb(lmdb: ModuleType, source: str) -> Any:
    key = os.path.realpath(source)
    env = _LMDB_ENVS.get(key)
    if env is None:
        env = lmdb.open(source, readonly=True, lock=False, subdir=True)
        _LMDB_ENVS[key] = env
    return env


# -- Data (LMDB) ----------------------------------------------------------------------------------------
@register("Data")
class Data(_DataSource):
    """Serialized ``Datum`` records from an LMDB database (Caffe's ``DataLayer``).

    ``data_param.source`` is the LMDB folder and ``backend`` must be ``LMDB`` (Caffe's default is LEVELDB,
    which this engine does not read). Records are read in key order (LMDB's byte order) and wrap around.
    A datum holds uint8 ``data`` or ``float_data`` (channels x height x width), or with ``encoded`` an
    image file decoded as Caffe does (its own channels in BGR order, or ``force_color``/``force_gray``).
    The first datum sizes the tops at setup; each batch takes its shape from its first datum. Then
    ``transform_param`` applies. Tops: data, and the label (batch_size,) when a second top is given.
    ``rand_skip`` skips a random number ``< rand_skip`` of records at setup.
    """

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        if len(param.top) > 2:
            raise self.error(f"takes at most 2 tops (data, label), has {len(param.top)}.")
        p = param.data_param
        if p.backend != caffe_pb2.DataParameter.LMDB:
            raise UnsupportedLayerError(
                f"Layer '{self.name}' (type Data) uses backend LEVELDB (Caffe's default when data_param has "
                "no 'backend'), which the amct-caffe engine does not read. Convert the database to LMDB "
                "(Caffe's convert_imageset -backend lmdb) and set 'backend: LMDB'."
            )
        self.batch_size = _batch_size(self, p.batch_size, "data_param")
        self.output_labels = len(self.param.top) == 2
        lmdb = _require(self, "lmdb", "lmdb")
        if not p.source or not os.path.isdir(p.source):
            raise self.error(f"data_param.source '{p.source}' is not an LMDB folder (relative paths are "
                             f"relative to the working directory '{os.getcwd()}').")
        try:
            self.env = _open_lmdb(lmdb, p.source)
            self.txn = self.env.begin(buffers=False)
            self.cursor = self.txn.cursor()
        except lmdb.Error as exc:
            raise self.error(f"cannot open LMDB '{p.source}': {exc}.") from None
        if not self.cursor.first():
            raise self.error(f"the LMDB '{p.source}' holds no records.")
        self.offset = 0
        if p.rand_skip:
            skip = int(self.rng.integers(1 << 32)) % int(p.rand_skip)
            LOGGER.info("Layer '%s': skipping first %d data points.", self.name, skip)
            for _ in range(skip):
                self._next_record()
            self.offset = 0
        self.transformer = self._transformer()
        shape = self.transformer.infer_shape(self.transformer.datum_array(self._datum()).shape)
        self._top_shapes = [(self.batch_size, *shape)]
        if self.output_labels:
            self._top_shapes.append((self.batch_size,))

    def _datum(self) -> caffe_pb2.Datum:
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(self.cursor.value())
        except Exception:  # protobuf's DecodeError
            source = self.param.data_param.source
            raise self.error(f"the record at key {self.cursor.key()!r} of '{source}' is not a serialized "
                             "caffe Datum.") from None
        return datum

    def _next_record(self) -> None:
        if not self.cursor.next():
            self.cursor.first()  # Caffe: "Restarting data prefetching from start."
        self.offset += 1

    def next_batch(self) -> list[np.ndarray]:
        size, rank = _shard(self)
        items: list[np.ndarray] = []
        labels = np.empty(self.batch_size, dtype=np.float32)
        for i in range(self.batch_size):
            while size > 1 and self.offset % size != rank:
                self._next_record()
            datum = self._datum()
            items.append(self.transformer.datum_array(datum))
            labels[i] = datum.label
            self._next_record()
        data = self.transformer.transform_items(items)
        return [data, labels] if self.output_labels else [data]
