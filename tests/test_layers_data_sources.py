"""Data layers (MemoryData, HDF5Data, ImageData, Data/LMDB) and the DataTransformer, on fixtures written in
tmp_path, against hand values and independently computed arrays; HDF5Data and MemoryData batches over
several forwards are cross-checked against the reference Caffe."""

from __future__ import annotations

import io
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.net import Net
from amct_caffe.engine.transform import DataTransformer, resize_linear
from amct_caffe.errors import ModelFormatError, RuntimeEngineError, UnsupportedLayerError
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close

h5py = pytest.importorskip("h5py")
lmdb = pytest.importorskip("lmdb")
Image = pytest.importorskip("PIL.Image")

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make_net(text: str, phase: int = TEST) -> Net:
    return Net(text_format.Merge(text, caffe_pb2.NetParameter()), phase)


def forward(net: Net, *names: str) -> list[np.ndarray]:
    net.run()
    return [net.tensor(n).detach().cpu().numpy().copy() for n in names]


def transformer(text: str, phase: int = TEST, seed: int = 0) -> DataTransformer:
    param = text_format.Merge(text, caffe_pb2.TransformationParameter())
    return DataTransformer(param, phase, rng=np.random.default_rng(seed))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# -- DataTransformer -------------------------------------------------------------------------------------
X = np.arange(20, dtype=np.uint8).reshape(1, 4, 5)  # rows 0..4, 5..9, 10..14, 15..19


def test_transform_test_center_crop_mean_value_scale() -> None:
    t = transformer("crop_size: 2 mean_value: 10 scale: 0.5")
    # centre window: h_off = (4-2)//2 = 1, w_off = (5-2)//2 = 1 -> [[6, 7], [11, 12]]; (x - 10) * 0.5
    np.testing.assert_array_equal(t.transform(X), [[[-2.0, -1.5], [0.5, 1.0]]])


def test_transform_scale_only_and_float_input() -> None:
    t = transformer("scale: 0.25")
    x = np.array([[[1.0, -2.0], [4.0, 8.5]]], dtype=np.float32)
    np.testing.assert_array_equal(t.transform(x), [[[0.25, -0.5], [1.0, 2.125]]])


def test_transform_per_channel_mean_value() -> None:
    x = np.array([[[10, 20]], [[30, 40]], [[50, 60]]], dtype=np.uint8)  # (3, 1, 2)
    t = transformer("mean_value: 1 mean_value: 2 mean_value: 3 scale: 2")
    np.testing.assert_array_equal(t.transform(x), [[[18, 38]], [[56, 76]], [[94, 114]]])
    one = transformer("mean_value: 5")
    np.testing.assert_array_equal(one.transform(x), [[[5, 15]], [[25, 35]], [[45, 55]]])
    with pytest.raises(ModelFormatError, match="mean_value"):
        transformer("mean_value: 1 mean_value: 2").transform(x)


def test_transform_mean_file_is_cropped_with_the_image(tmp_path: Path) -> None:
    mean = caffe_pb2.BlobProto(num=1, channels=1, height=4, width=5)
    mean.data.extend([float(v) for v in range(100, 120)])
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(mean.SerializeToString())
    t = transformer(f'crop_size: 2 mean_file: "{path}" scale: 2')
    # window [[6, 7], [11, 12]] minus mean window [[106, 107], [111, 112]] -> -100 each, * 2
    np.testing.assert_array_equal(t.transform(X), np.full((1, 2, 2), -200.0))
    with pytest.raises(ModelFormatError, match="mean_file"):
        t.transform(np.zeros((1, 3, 5), np.uint8))
    with pytest.raises(ModelFormatError, match="both mean_file and mean_value"):
        transformer(f'mean_file: "{path}" mean_value: 1')
    with pytest.raises(ModelFormatError, match="cannot read"):
        transformer(f'mean_file: "{tmp_path / "missing"}"')


def test_transform_mirror_with_mean_file_subtracts_before_flipping(tmp_path: Path) -> None:
    # mirror in TEST still flips at random (Caffe has no phase check on mirror); the mean is taken at the
    # source pixel, so a flipped output is the flipped (x - mean)
    mean = caffe_pb2.BlobProto()
    mean.shape.dim.extend([1, 1, 1, 3])
    mean.data.extend([1.0, 2.0, 4.0])
    path = tmp_path / "m.binaryproto"
    path.write_bytes(mean.SerializeToString())
    x = np.array([[[10, 20, 40]]], dtype=np.uint8)
    t = transformer(f'mirror: true mean_file: "{path}"', TEST, seed=3)
    seen = {tuple(t.transform(x).ravel()) for _ in range(40)}
    assert seen == {(9.0, 18.0, 36.0), (36.0, 18.0, 9.0)}


def test_transform_train_random_crop_is_a_valid_window_and_mirror_flips() -> None:
    t = transformer("crop_size: 2 mirror: true", TRAIN, seed=7)
    windows = {}
    for h in range(3):
        for w in range(4):
            win = X[0, h:h + 2, w:w + 2].astype(np.float32)
            windows[(h, w, False)] = win
            windows[(h, w, True)] = win[:, ::-1]
    seen = set()
    for _ in range(300):
        out = t.transform(X)
        assert out.shape == (1, 2, 2) and out.dtype == np.float32
        match = [k for k, v in windows.items() if np.array_equal(out[0], v)]
        assert match, f"{out} is not a crop window of X (plain or mirrored)"
        seen.add(match[0])
    assert len(seen) == len(windows)  # every offset and both mirror states occur


def test_transform_train_without_mirror_never_flips_and_test_crop_is_fixed() -> None:
    t = transformer("crop_size: 3", TRAIN, seed=1)
    for _ in range(50):
        out = t.transform(X)[0]
        assert any(np.array_equal(out, X[0, h:h + 3, w:w + 3]) for h in range(2) for w in range(3))
    centre = transformer("crop_size: 3", TEST)
    for _ in range(5):
        np.testing.assert_array_equal(centre.transform(X)[0], X[0, 0:3, 1:4])  # (4-3)//2=0, (5-3)//2=1


def test_transform_batch_draws_per_item() -> None:
    t = transformer("mirror: true", TRAIN, seed=11)
    batch = np.stack([X] * 64)
    out = t.transform_batch(batch)
    flipped = [bool(np.array_equal(o[0], X[0, :, ::-1])) for o in out]
    assert all(f or np.array_equal(o[0], X[0]) for f, o in zip(flipped, out))
    assert 0 < sum(flipped) < 64


def test_transform_crop_larger_than_image_is_an_error() -> None:
    with pytest.raises(ModelFormatError, match="crop_size 5"):
        transformer("crop_size: 5").transform(X)


def test_datum_uint8_float_and_encoded() -> None:
    t = transformer("")
    d = caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes([1, 2, 3, 250]))
    np.testing.assert_array_equal(t.transform_datum(d), [[[1, 2], [3, 250]]])
    f = caffe_pb2.Datum(channels=1, height=1, width=3)
    f.float_data.extend([0.5, -1.0, 7.25])
    np.testing.assert_array_equal(t.transform_datum(f), [[[0.5, -1.0, 7.25]]])
    rgb = np.array([[[200, 100, 50], [1, 2, 3]]], dtype=np.uint8)  # H=1, W=2, RGB
    e = caffe_pb2.Datum(encoded=True, data=png_bytes(rgb))
    # BGR order, (C, H, W)
    np.testing.assert_array_equal(t.transform_datum(e), [[[50, 3]], [[100, 2]], [[200, 1]]])
    bad = caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes([1, 2, 3]))
    with pytest.raises(ModelFormatError, match="3 bytes"):
        t.transform_datum(bad)


def test_encoded_datum_force_color_and_force_gray() -> None:
    gray = np.array([[7, 9, 11]], dtype=np.uint8)
    e = caffe_pb2.Datum(encoded=True, data=png_bytes(gray))
    assert transformer("").transform_datum(e).shape == (1, 1, 3)
    np.testing.assert_array_equal(transformer("force_color: true").transform_datum(e), [[[7, 9, 11]]] * 3)
    grey_rgb = np.repeat(np.array([[[60], [90]]], dtype=np.uint8), 3, axis=2)  # R=G=B -> luma = value
    e2 = caffe_pb2.Datum(encoded=True, data=png_bytes(grey_rgb))
    np.testing.assert_array_equal(transformer("force_gray: true").transform_datum(e2), [[[60, 90]]])
    with pytest.raises(ModelFormatError, match="force_color and force_gray"):
        transformer("force_color: true force_gray: true").transform_datum(e2)


# -- OpenCV-like bilinear resize --------------------------------------------------------------------------
def test_resize_linear_hand_values() -> None:
    # widen [0, 100] to 4: source x = (d + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamp, 25, 75, clamp
    row = np.array([[[0], [100]]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_linear(row, 1, 4)[0, :, 0], [0, 25, 75, 100])
    row = np.array([[[0], [101]]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_linear(row, 1, 4)[0, :, 0], [0, 25, 76, 101])  # 25.25, 75.75
    # an exact 2x shrink is OpenCV's area average with +2 rounding: (1+2+3+4+2)>>2 = 3
    block = np.array([[1, 2, 9, 9], [3, 4, 9, 9], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)[:, :, None]
    np.testing.assert_array_equal(resize_linear(block, 2, 2)[:, :, 0], [[3, 9], [0, 0]])
    # a constant image stays constant; same size is a copy
    const = np.full((5, 7, 3), 77, dtype=np.uint8)
    assert np.all(resize_linear(const, 3, 4) == 77) and resize_linear(const, 3, 4).shape == (3, 4, 3)
    np.testing.assert_array_equal(resize_linear(block, 4, 4), block)


def test_resize_and_decode_match_opencv_when_installed() -> None:
    cv2 = pytest.importorskip("cv2")  # optional: the real OpenCV that Caffe uses, when present
    from amct_caffe.engine.transform import COLOR, GRAY, UNCHANGED, decode_image

    rng = np.random.default_rng(3)
    for h, w, c, oh, ow in [(37, 53, 3, 20, 30), (10, 10, 3, 23, 17), (5, 7, 1, 9, 13), (16, 16, 4, 8, 8)]:
        img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        ref = cv2.resize(img, (ow, oh)).reshape(oh, ow, c)
        np.testing.assert_array_equal(resize_linear(img, oh, ow), ref)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        raw = buf.getvalue()
        for flag, mode in ((1, COLOR), (0, GRAY), (-1, UNCHANGED)):
            ref = cv2.imdecode(np.frombuffer(raw, np.uint8), flag)
            np.testing.assert_array_equal(decode_image(raw, mode), ref.reshape(*ref.shape[:2], -1), fmt)


# -- MemoryData -------------------------------------------------------------------------------------------
MEMORY_NET = """
layer { name: "mem" type: "MemoryData" top: "data" top: "label"
        memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
"""


def test_memory_data_cycles_batches() -> None:
    net = make_net(MEMORY_NET)  # construction needs no data
    assert tuple(net.tensor("data").shape) == (2, 1, 2, 3)
    assert tuple(net.tensor("label").shape) == (2,)
    data = np.arange(6 * 6, dtype=np.float32).reshape(6, 1, 2, 3)
    labels = np.array([10, 11, 12, 13, 14, 15], dtype=np.float32)
    net.engine_layers[0].set_input_arrays(data, labels)
    d, lab = forward(net, "data", "label")
    np.testing.assert_array_equal(d, data[0:2])
    np.testing.assert_array_equal(lab, np.array([10, 11]).reshape(2, 1, 1, 1))  # Caffe's Forward shape
    d, lab = forward(net, "data", "label")
    np.testing.assert_array_equal(d, data[2:4])
    d, lab = forward(net, "data", "label")
    np.testing.assert_array_equal(lab.ravel(), [14, 15])
    d, lab = forward(net, "data", "label")  # wraps
    np.testing.assert_array_equal(d, data[0:2])
    np.testing.assert_array_equal(lab.ravel(), [10, 11])


def test_memory_data_does_not_transform_arrays_but_transforms_datums() -> None:
    text = MEMORY_NET.replace("memory_data_param", "transform_param { scale: 0.5 } memory_data_param")
    net = make_net(text)
    layer = net.engine_layers[0]
    data = np.ones((2, 1, 2, 3), dtype=np.float32) * 4
    layer.set_input_arrays(data, np.zeros(2, np.float32))
    (d,) = forward(net, "data")
    np.testing.assert_array_equal(d, data)  # Caffe's Reset does not transform
    datums = [caffe_pb2.Datum(channels=1, height=2, width=3, data=bytes([2 * i] * 6), label=i)
              for i in range(2)]
    layer.add_datum_vector(datums)
    with pytest.raises(RuntimeEngineError, match="consumed"):
        layer.add_datum_vector(datums)
    d, lab = forward(net, "data", "label")
    np.testing.assert_array_equal(d[:, 0], [np.zeros((2, 3)), np.ones((2, 3))])  # 2*i * 0.5
    np.testing.assert_array_equal(lab.ravel(), [0, 1])
    layer.add_datum_vector(datums)  # consumed after one full pass


def test_memory_data_checks_like_pycaffe() -> None:
    net = make_net(MEMORY_NET)
    layer = net.engine_layers[0]
    with pytest.raises(RuntimeEngineError, match="set_input_arrays"):
        net.run()
    good = np.zeros((4, 1, 2, 3), np.float32)
    with pytest.raises(RuntimeEngineError, match="float32"):
        layer.set_input_arrays(good.astype(np.float64), np.zeros(4, np.float32))
    with pytest.raises(RuntimeEngineError, match="4-d"):
        layer.set_input_arrays(good.reshape(4, 6), np.zeros(4, np.float32))
    with pytest.raises(RuntimeEngineError, match="multiple of batch_size"):
        layer.set_input_arrays(good[:3], np.zeros(3, np.float32))
    with pytest.raises(RuntimeEngineError, match="same first dimension"):
        layer.set_input_arrays(good, np.zeros(2, np.float32))
    with pytest.raises(RuntimeEngineError, match="contiguous"):
        strided = np.zeros((4, 1, 3, 2), np.float32).transpose(0, 1, 3, 2)
        layer.set_input_arrays(strided, np.zeros(4, np.float32))
    with pytest.raises(RuntimeEngineError, match=r"\(N, 1, 2, 3\)"):
        layer.set_input_arrays(np.zeros((4, 2, 2, 3), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ModelFormatError, match="positive"):
        make_net(MEMORY_NET.replace("channels: 1", "channels: 0"))


# -- HDF5Data ---------------------------------------------------------------------------------------------
def write_h5_pair(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two files (5 and 3 rows); returns all rows in file order (data float64 in the files, int labels)."""
    rng = np.random.default_rng(5)
    data = rng.standard_normal((8, 2, 3))  # float64: the layer must give float32
    labels = np.arange(100, 108, dtype=np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("a.h5", slice(0, 5)), ("b.h5", slice(5, 8))):
        with h5py.File(folder / name, "w") as f:
            f.create_dataset("data", data=data[rows])
            f.create_dataset("label", data=labels[rows])
    return data, labels


def hdf5_net(source: str, batch: int = 3, extra: str = "") -> str:
    return (f'layer {{ name: "h5" type: "HDF5Data" top: "data" top: "label" {extra} '
            f'hdf5_data_param {{ source: "{source}" batch_size: {batch} }} }}')


def test_hdf5_batches_cross_files_and_wrap(tmp_path: Path) -> None:
    data, labels = write_h5_pair(tmp_path / "h5")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'h5' / 'a.h5'}\n{tmp_path / 'h5' / 'b.h5'}\n")
    net = make_net(hdf5_net(str(listing)))
    assert tuple(net.tensor("data").shape) == (3, 2, 3)
    for k in range(6):  # construction consumes nothing: the first batch is rows 0..2
        rows = [(3 * k + i) % 8 for i in range(3)]  # the stream a0..a4 b0..b2 a0 ...
        d, lab = forward(net, "data", "label")
        assert d.dtype == np.float32
        np.testing.assert_array_equal(d, data[rows].astype(np.float32))
        np.testing.assert_array_equal(lab, labels[rows].astype(np.float32))


def test_hdf5_paths_are_relative_to_the_working_directory(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = write_h5_pair(tmp_path / "h5")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("h5/a.h5 h5/b.h5")  # white space separated, as Caffe
    monkeypatch.chdir(tmp_path)
    net = make_net(hdf5_net("lists/train.txt", batch=5))
    np.testing.assert_array_equal(forward(net, "data")[0], data[:5].astype(np.float32))
    monkeypatch.chdir(tmp_path / "lists")  # relative to the list file would find nothing either way
    with pytest.raises(ModelFormatError, match="cannot open hdf5_data_param.source"):
        make_net(hdf5_net("lists/train.txt"))
    (tmp_path / "lists" / "lists").mkdir()
    (tmp_path / "lists" / "lists" / "train.txt").write_text("h5/a.h5\n")
    with pytest.raises(ModelFormatError, match="failed opening HDF5 file 'h5/a.h5'"):
        make_net(hdf5_net("lists/train.txt"))


def test_hdf5_shuffle_visits_every_row_once_per_pass(tmp_path: Path) -> None:
    data, labels = write_h5_pair(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.h5'}\n{tmp_path / 'b.h5'}\n")
    net = make_net(hdf5_net(str(listing), batch=4).replace("batch_size: 4", "batch_size: 4 shuffle: true"))
    seen = np.concatenate([forward(net, "label")[0] for _ in range(4)])
    for epoch in (seen[:8], seen[8:]):
        assert sorted(epoch.tolist()) == labels.astype(np.float32).tolist()


def test_hdf5_errors(tmp_path: Path) -> None:
    write_h5_pair(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.h5'}\n")
    with pytest.raises(ModelFormatError, match="does not transform"):
        make_net(hdf5_net(str(listing), extra="transform_param { scale: 2 }"))
    with pytest.raises(ModelFormatError, match="no dataset 'other'"):
        make_net(hdf5_net(str(listing)).replace('top: "label"', 'top: "other"'))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ModelFormatError, match="at least 1 HDF5"):
        make_net(hdf5_net(str(tmp_path / "empty.txt")))
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((2, 4)))
        f.create_dataset("label", data=np.zeros(2))
    listing.write_text(f"{tmp_path / 'a.h5'} {tmp_path / 'c.h5'}")
    net = make_net(hdf5_net(str(listing), batch=5))
    with pytest.raises(ModelFormatError, match="row shapes"):
        forward(net, "data")


# -- ImageData --------------------------------------------------------------------------------------------
def write_images(folder: Path) -> list[np.ndarray]:
    """Three RGB PNGs (H=4, W=6) with different values per channel; returns their RGB arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(3):
        rgb = np.zeros((4, 6, 3), dtype=np.uint8)
        rgb[..., 0] = 10 + i           # R
        rgb[..., 1] = 100 + i          # G
        rgb[..., 2] = np.arange(6) * 30 + i  # B varies along the width
        Image.fromarray(rgb).save(folder / f"img{i}.png")
        images.append(rgb)
    (folder / "list.txt").write_text("img0.png 3\nimg1.png 7\nimg2.png -2\n")
    return images


def image_net(folder: Path, params: str, transform: str = "") -> str:
    return (f'layer {{ name: "img" type: "ImageData" top: "data" top: "label" {transform} '
            f'image_data_param {{ source: "{folder / "list.txt"}" root_folder: "{folder}/" {params} }} }}')


def test_image_data_bgr_order_labels_and_wrap(tmp_path: Path) -> None:
    images = write_images(tmp_path)
    net = make_net(image_net(tmp_path, "batch_size: 2"))
    assert tuple(net.tensor("data").shape) == (2, 3, 4, 6)
    expected = [rgb[..., ::-1].transpose(2, 0, 1).astype(np.float32) for rgb in images]  # BGR, CHW
    d, lab = forward(net, "data", "label")
    np.testing.assert_array_equal(d, [expected[0], expected[1]])
    np.testing.assert_array_equal(d[0, 0, 0], [0, 30, 60, 90, 120, 150])  # channel 0 is blue
    np.testing.assert_array_equal(d[0, 2], np.full((4, 6), 10.0))        # channel 2 is red
    np.testing.assert_array_equal(lab, [3, 7])
    d, lab = forward(net, "data", "label")  # img2 then wraps to img0
    np.testing.assert_array_equal(d, [expected[2], expected[0]])
    np.testing.assert_array_equal(lab, [-2, 3])


def test_image_data_resize_and_transform(tmp_path: Path) -> None:
    write_images(tmp_path)
    net = make_net(image_net(tmp_path, "batch_size: 3 new_height: 2 new_width: 3",
                             "transform_param { mean_value: 1 mean_value: 2 mean_value: 3 scale: 0.5 }"))
    d, lab = forward(net, "data", "label")
    assert d.shape == (3, 3, 2, 3)
    # an exact 2x shrink averages 2x2 blocks: blue columns (30*2j + 30*(2j+1) + 2*i... ) per image i
    for i in range(3):
        blue = [((2 * (60 * j + 30) + 2 * (60 * j) + 4 * i) + 2) // 4 for j in range(3)]
        np.testing.assert_array_equal(d[i, 0], [[(b - 1) * 0.5 for b in blue]] * 2)
        np.testing.assert_array_equal(d[i, 1], np.full((2, 3), (100 + i - 2) * 0.5))
        np.testing.assert_array_equal(d[i, 2], np.full((2, 3), (10 + i - 3) * 0.5))
    np.testing.assert_array_equal(lab, [3, 7, -2])


def test_image_data_shuffle_and_rand_skip(tmp_path: Path) -> None:
    write_images(tmp_path)
    net = make_net(image_net(tmp_path, "batch_size: 3 shuffle: true"))
    for _ in range(3):  # each batch is one whole (reshuffled) pass over the three images
        (lab,) = forward(net, "label")
        assert sorted(lab.tolist()) == [-2.0, 3.0, 7.0]
    firsts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        (lab,) = forward(make_net(image_net(tmp_path, "batch_size: 1 rand_skip: 2")), "label")
        firsts.add(float(lab[0]))
    assert firsts == {3.0, 7.0}  # skips 0 or 1 lines


def test_image_data_gray_and_checks(tmp_path: Path) -> None:
    write_images(tmp_path)
    gray = np.array([[5, 6], [7, 8]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    (tmp_path / "glist.txt").write_text("g.png 1\n")
    text = image_net(tmp_path, "batch_size: 1 is_color: false").replace("list.txt", "glist.txt")
    d, = forward(make_net(text), "data")
    np.testing.assert_array_equal(d, [[[[5, 6], [7, 8]]]])
    # a grey image read in colour is replicated to 3 channels
    d, = forward(make_net(text.replace("is_color: false", "")), "data")
    np.testing.assert_array_equal(d[0], [gray] * 3)
    with pytest.raises(ModelFormatError, match="new_height and new_width"):
        make_net(image_net(tmp_path, "new_height: 3"))
    with pytest.raises(ModelFormatError, match="no such file"):
        make_net(image_net(tmp_path, "").replace(f'root_folder: "{tmp_path}/"', f'root_folder: "{tmp_path}"'))


# -- Data (LMDB) ------------------------------------------------------------------------------------------
def write_lmdb(path: Path) -> list[tuple[np.ndarray, int]]:
    """Three Datums, written out of key order: uint8, float and an encoded PNG; returns (CHW, label)."""
    u8 = np.arange(12, dtype=np.uint8).reshape(3, 2, 2) * 20
    fl = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 2, 2)
    rgb = np.array([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]], dtype=np.uint8)  # H=2, W=2, RGB
    d0 = caffe_pb2.Datum(channels=3, height=2, width=2, data=u8.tobytes(), label=1)
    d1 = caffe_pb2.Datum(channels=3, height=2, width=2, label=2)
    d1.float_data.extend(fl.ravel().tolist())
    d2 = caffe_pb2.Datum(encoded=True, data=png_bytes(rgb), label=3)
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"00000002", d2.SerializeToString())
        txn.put(b"00000000", d0.SerializeToString())
        txn.put(b"00000001", d1.SerializeToString())
    env.close()
    return [(u8.astype(np.float32), 1), (fl, 2), (rgb[..., ::-1].transpose(2, 0, 1).astype(np.float32), 3)]


def data_net(path: Path, params: str = "batch_size: 2", transform: str = "",
             tops: str = 'top: "label"') -> str:
    return (f'layer {{ name: "db" type: "Data" top: "data" {tops} {transform} '
            f'data_param {{ source: "{path}" backend: LMDB {params} }} }}')


def test_lmdb_data_in_key_order_with_wrap_and_transform(tmp_path: Path) -> None:
    records = write_lmdb(tmp_path / "db")
    net = make_net(data_net(tmp_path / "db", transform="transform_param { scale: 0.5 }"), TRAIN)
    assert tuple(net.tensor("data").shape) == (2, 3, 2, 2)
    order = [0, 1, 2, 0, 1, 2]
    for k in range(3):
        d, lab = forward(net, "data", "label")
        idx = order[2 * k:2 * k + 2]
        np.testing.assert_array_equal(d, [records[i][0] * np.float32(0.5) for i in idx])
        np.testing.assert_array_equal(lab, [records[i][1] for i in idx])


def test_lmdb_rand_skip(tmp_path: Path) -> None:
    write_lmdb(tmp_path / "db")
    firsts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        net = make_net(data_net(tmp_path / "db", "batch_size: 1 rand_skip: 3"))
        firsts.add(float(forward(net, "label")[0][0]))
    assert firsts == {1.0, 2.0, 3.0}


def test_lmdb_single_top_and_crop(tmp_path: Path) -> None:
    records = write_lmdb(tmp_path / "db")
    net = make_net(data_net(tmp_path / "db", "batch_size: 3", "transform_param { crop_size: 1 }", tops=""))
    assert net.layer_tops[0] == ["data"]
    (d,) = forward(net, "data")
    # crop 1 of 2x2 in TEST: offset (2-1)//2 = 0 -> pixel (0, 0)
    np.testing.assert_array_equal(d, [r[0][:, :1, :1] for r in records])


def test_lmdb_backend_and_source_errors(tmp_path: Path) -> None:
    write_lmdb(tmp_path / "db")
    with pytest.raises(UnsupportedLayerError, match="LEVELDB"):
        make_net(data_net(tmp_path / "db").replace("backend: LMDB", ""))
    with pytest.raises(UnsupportedLayerError, match="LEVELDB"):
        make_net(data_net(tmp_path / "db").replace("backend: LMDB", "backend: LEVELDB"))
    with pytest.raises(ModelFormatError, match="not an LMDB folder"):
        make_net(data_net(tmp_path / "nothing"))
    env = lmdb.open(str(tmp_path / "empty"), map_size=1 << 20)
    env.close()
    with pytest.raises(ModelFormatError, match="no records"):
        make_net(data_net(tmp_path / "empty"))


def test_missing_optional_package_names_layer_and_pip(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name in ("lmdb", "h5py"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    write_lmdb(tmp_path / "db")
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UnsupportedLayerError, match=r"'db' \(type Data\).*pip install lmdb"):
        make_net(data_net(tmp_path / "db"))
    (tmp_path / "l.txt").write_text("x.h5\n")
    with pytest.raises(UnsupportedLayerError, match=r"'h5' \(type HDF5Data\).*pip install h5py"):
        make_net(hdf5_net(str(tmp_path / "l.txt")))


# -- net.reshape() -------------------------------------------------------------------------------------------
def test_net_reshape_consumes_no_data(tmp_path: Path) -> None:
    data, labels = write_h5_pair(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.h5'}\n{tmp_path / 'b.h5'}\n")
    net = make_net(hdf5_net(str(listing)))
    net.reshape()
    (lab,) = forward(net, "label")
    np.testing.assert_array_equal(lab, labels[:3])
    net.reshape()
    (lab,) = forward(net, "label")
    np.testing.assert_array_equal(lab, labels[3:6])
    assert tuple(net.tensor("data").shape) == (3, 2, 3)

    mem = make_net(MEMORY_NET)
    arrays = np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3)
    mem.engine_layers[0].set_input_arrays(arrays, np.arange(4, dtype=np.float32))
    mem.reshape()
    np.testing.assert_array_equal(forward(mem, "data")[0], arrays[:2])
    mem.reshape()
    assert tuple(mem.tensor("label").shape) == (2, 1, 1, 1)  # the last batch's shapes
    np.testing.assert_array_equal(forward(mem, "data")[0], arrays[2:])


# -- reference Caffe: several forwards --------------------------------------------------------------------
REFERENCE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import caffe

    caffe.set_mode_cpu()
    net_file, phase, count, out = sys.argv[1:5]
    net = caffe.Net(net_file, caffe.TRAIN if phase == "TRAIN" else caffe.TEST)
    if len(sys.argv) > 5:
        arrays = np.load(sys.argv[5])
        data, labels = np.ascontiguousarray(arrays["data"]), np.ascontiguousarray(arrays["labels"])
        net.set_input_arrays(data, labels)
    result = {}
    for i in range(int(count)):
        net.forward()
        for name, blob in net.blobs.items():
            result["%d:%s" % (i, name)] = np.array(blob.data)
    np.savez(out, **result)
""")


def run_reference_forwards(py: str, tmp_path: Path, net_text: str, phase: str, count: int,
                           arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    script = tmp_path / "ref_forwards.py"
    script.write_text(REFERENCE_SCRIPT)
    net_file = tmp_path / f"ref_{phase}.prototxt"
    net_file.write_text(net_text)
    out = tmp_path / f"ref_{phase}.npz"
    cmd = [py, str(script), str(net_file), phase, str(count), str(out)]
    if arrays is not None:
        np.savez(tmp_path / "arrays.npz", **arrays)
        cmd.append(str(tmp_path / "arrays.npz"))
    env = dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as res:
        return {k: res[k] for k in res.files}


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_hdf5_matches_reference_over_several_forwards(reference_caffe: str, tmp_path: Path,
                                                      phase: str) -> None:
    write_h5_pair(tmp_path / "h5")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'h5' / 'a.h5'}\n{tmp_path / 'h5' / 'b.h5'}\n")
    text = hdf5_net(str(listing))
    ref = run_reference_forwards(reference_caffe, tmp_path, text, phase, 5)
    net = make_net(text, TRAIN if phase == "TRAIN" else TEST)
    for i in range(5):
        d, lab = forward(net, "data", "label")
        assert_close(d, ref[f"{i}:data"], f"forward {i} data")
        assert_close(lab, ref[f"{i}:label"], f"forward {i} label")


def test_memory_data_matches_reference(reference_caffe: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    arrays = {"data": rng.standard_normal((6, 1, 2, 3)).astype(np.float32),
              "labels": np.arange(6, dtype=np.float32)}
    ref = run_reference_forwards(reference_caffe, tmp_path, MEMORY_NET, "TEST", 4, arrays)
    net = make_net(MEMORY_NET)
    net.engine_layers[0].set_input_arrays(arrays["data"], arrays["labels"])
    for i in range(4):
        d, lab = forward(net, "data", "label")
        assert_close(d, ref[f"{i}:data"], f"forward {i} data")
        assert_close(lab, ref[f"{i}:label"], f"forward {i} label")


def test_layers_produce_float32_tensors_on_the_net_device(tmp_path: Path) -> None:
    write_lmdb(tmp_path / "db")
    net = make_net(data_net(tmp_path / "db"))
    net.run()
    t = net.tensor("data")
    assert t.dtype == torch.float32 and t.device == net.device
