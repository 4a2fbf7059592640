"""Structure layers (Eltwise, Concat, Slice, Split, Flatten, Reshape, Crop, Tile, Reduction, ArgMax, Softmax,
Silence) against numpy references and hand values, plus a cross-check of a net combining them against the
reference Caffe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from amct_caffe.engine.layers import layer_class
from amct_caffe.engine.net import Net
from amct_caffe.errors import ModelFormatError
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close
from tests.references.real_caffe import run_reference

RNG = np.random.default_rng(1234)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def make_layer(text: str, phase: int = caffe_pb2.TRAIN):
    lp = text_format.Merge(text, caffe_pb2.LayerParameter())
    return layer_class(lp.type)(lp, phase, torch.device("cpu"))


def apply(text: str, *arrays: np.ndarray) -> list[np.ndarray]:
    """Build one layer, set it up on the arrays and return its tops as numpy."""
    layer = make_layer(text)
    bottoms = [torch.from_numpy(a) for a in arrays]
    layer.setup(bottoms)
    return [t.detach().numpy() for t in layer.forward(bottoms)]


def input_layer(**shapes: tuple[int, ...]) -> str:
    tops = "".join(f' top: "{n}"' for n in shapes)
    dims = "".join("shape {" + "".join(f" dim: {d}" for d in s) + " } " for s in shapes.values())
    return f'layer {{ name: "input" type: "Input"{tops} input_param {{ {dims}}} }}\n'


def run_net(text: str, inputs: dict[str, np.ndarray]) -> Net:
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    for name, value in inputs.items():
        net.set_tensor(name, torch.from_numpy(value))
    net.run()
    return net


# -- Eltwise -----------------------------------------------------------------------------------------------
def test_eltwise_sum_with_coeffs() -> None:
    a, b, c = rand(2, 3, 4), rand(2, 3, 4), rand(2, 3, 4)
    (top,) = apply('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" '
                   "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }", a, b, c)
    expected = a.astype(np.float64) - 0.5 * b + 2 * c
    np.testing.assert_allclose(top, expected, rtol=1e-6, atol=1e-6)


def test_eltwise_sum_default_prod_max() -> None:
    a, b, c = rand(3, 5), rand(3, 5), rand(3, 5)
    (s,) = apply('name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "t"', a, b)
    np.testing.assert_allclose(s, a + b, rtol=1e-6)
    (p,) = apply('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" '
                 "eltwise_param { operation: PROD }", a, b, c)
    np.testing.assert_allclose(p, a * b * c, rtol=1e-6)
    (m,) = apply('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" '
                 "eltwise_param { operation: MAX }", a, b, c)
    np.testing.assert_array_equal(m, np.maximum(np.maximum(a, b), c))


def test_eltwise_max_tie_gradient_follows_caffe_mask() -> None:
    # Caffe: between bottoms 0 and 1 a tie goes to bottom 1; a later bottom must be strictly greater.
    a = torch.tensor([1.0, 2.0, 3.0, 0.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0, 3.0, 5.0], requires_grad=True)
    c = torch.tensor([1.0, 2.0, 4.0, 5.0], requires_grad=True)
    layer = make_layer('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" '
                       "eltwise_param { operation: MAX }")
    layer.setup([a, b, c])
    (top,) = layer.forward([a, b, c])
    top.backward(torch.ones(4))
    np.testing.assert_array_equal(top.detach().numpy(), [1, 2, 4, 5])
    # element 0: all equal -> b (index 1); 1: a wins (2 > 1), c ties -> a; 2: c strictly greater;
    # 3: b and c tie -> b
    np.testing.assert_array_equal(a.grad.numpy(), [0, 1, 0, 0])
    np.testing.assert_array_equal(b.grad.numpy(), [1, 0, 0, 1])
    np.testing.assert_array_equal(c.grad.numpy(), [0, 0, 1, 0])


def test_eltwise_prod_gradient_is_product_of_others() -> None:
    a = torch.tensor([2.0, 0.0], requires_grad=True)
    b = torch.tensor([3.0, 5.0], requires_grad=True)
    c = torch.tensor([4.0, 7.0], requires_grad=True)
    layer = make_layer('name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" '
                       "eltwise_param { operation: PROD }")
    layer.setup([a, b, c])
    (top,) = layer.forward([a, b, c])
    top.sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [12, 35])
    np.testing.assert_array_equal(b.grad.numpy(), [8, 0])


@pytest.mark.parametrize("params, shapes, message", [
    ("eltwise_param { coeff: 1 }", [(2, 3), (2, 3)], "coefficient"),
    ("eltwise_param { operation: PROD coeff: 1 coeff: 2 }", [(2, 3), (2, 3)], "only for SUM"),
    ("", [(2, 3), (3, 2)], "same shape"),
])
def test_eltwise_errors(params: str, shapes: list[tuple[int, ...]], message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        arrays = [rand(*s) for s in shapes]
        apply(f'name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "t" {params}', *arrays)


def test_eltwise_needs_two_bottoms() -> None:
    with pytest.raises(ModelFormatError, match="at least 2"):
        make_layer('name: "e" type: "Eltwise" bottom: "a" top: "t"')


# -- Concat ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, axis", [("", 1), ("concat_param { axis: -2 }", 2),
                                          ("concat_param { axis: 0 }", 0),
                                          ("concat_param { concat_dim: 3 }", 3)])
def test_concat_axes(params: str, axis: int) -> None:
    shape_a, shape_b = [2, 3, 4, 5], [2, 3, 4, 5]
    shape_b[axis] = 2
    a, b = rand(*shape_a), rand(*shape_b)
    (top,) = apply(f'name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t" {params}', a, b)
    expected_shape = list(shape_a)
    expected_shape[axis] += 2
    assert list(top.shape) == expected_shape
    # element-wise reference: index i on the axis comes from a when i < size of a, else from b
    for idx in np.ndindex(*top.shape):
        i = idx[axis]
        if i < shape_a[axis]:
            assert top[idx] == a[idx]
        else:
            src = list(idx)
            src[axis] = i - shape_a[axis]
            assert top[idx] == b[tuple(src)]


def test_concat_single_bottom_and_errors() -> None:
    a = rand(2, 3)
    (top,) = apply('name: "c" type: "Concat" bottom: "a" top: "t"', a)
    np.testing.assert_array_equal(top, a)
    with pytest.raises(ModelFormatError, match="same shape except"):
        apply('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t"', rand(2, 3, 4), rand(2, 3, 5))
    with pytest.raises(ModelFormatError, match="number of axes"):
        apply('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t"', rand(2, 3, 4), rand(2, 3))
    with pytest.raises(ModelFormatError, match="both axis and concat_dim"):
        apply('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t" '
              "concat_param { axis: 1 concat_dim: 1 }", rand(2, 3), rand(2, 3))
    with pytest.raises(ModelFormatError, match="out of range"):
        apply('name: "c" type: "Concat" bottom: "a" bottom: "b" top: "t" concat_param { axis: -3 }',
              rand(2, 3), rand(2, 3))


# -- Slice / Split -----------------------------------------------------------------------------------------
def test_slice_uneven_points() -> None:
    x = rand(2, 7, 3)
    tops = apply('name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
                 "slice_param { slice_point: 1 slice_point: 5 }", x)
    assert [t.shape for t in tops] == [(2, 1, 3), (2, 4, 3), (2, 2, 3)]
    np.testing.assert_array_equal(tops[0], x[:, 0:1])
    np.testing.assert_array_equal(tops[1], x[:, 1:5])
    np.testing.assert_array_equal(tops[2], x[:, 5:7])


@pytest.mark.parametrize("params, axis", [("slice_param { axis: -1 }", 2),
                                          ("slice_param { slice_dim: 0 }", 0), ("", 1)])
def test_slice_equal_split(params: str, axis: int) -> None:
    x = rand(4, 6, 8)
    tops = apply(f'name: "s" type: "Slice" bottom: "x" top: "a" top: "b" {params}', x)
    size = x.shape[axis] // 2
    for k, t in enumerate(tops):
        index = [slice(None)] * 3
        index[axis] = slice(k * size, (k + 1) * size)
        np.testing.assert_array_equal(t, x[tuple(index)])


@pytest.mark.parametrize("params, ntops, message", [
    ("", 4, "evenly divide"),
    ("slice_param { slice_point: 3 slice_point: 2 }", 3, "strictly increasing"),
    ("slice_param { slice_point: 2 }", 3, "one fewer"),
    ("slice_param { slice_point: 9 }", 2, "beyond"),
    ("slice_param { axis: 1 slice_dim: 1 }", 2, "both axis and slice_dim"),
])
def test_slice_errors(params: str, ntops: int, message: str) -> None:
    tops = "".join(f' top: "t{i}"' for i in range(ntops))
    with pytest.raises(ModelFormatError, match=message):
        apply(f'name: "s" type: "Slice" bottom: "x"{tops} {params}', rand(2, 6))


def test_split_copies_and_sums_gradients() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    layer = make_layer('name: "sp" type: "Split" bottom: "x" top: "a" top: "b" top: "c"')
    tops = layer.forward([x])
    assert len(tops) == 3
    for t in tops:
        np.testing.assert_array_equal(t.detach().numpy(), [1, 2])
    (tops[0] * 1 + tops[1] * 2 + tops[2] * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [6, 6])


# -- Flatten / Reshape -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, shape", [
    ("", (2, 60)),
    ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { axis: -3 end_axis: -2 }", (2, 12, 5)),
    ("flatten_param { axis: 0 end_axis: 1 }", (6, 4, 5)),
    ("flatten_param { axis: 2 end_axis: 1 }", (2, 3, 1, 4, 5)),
])
def test_flatten(params: str, shape: tuple[int, ...]) -> None:
    x = rand(2, 3, 4, 5)
    (top,) = apply(f'name: "f" type: "Flatten" bottom: "x" top: "t" {params}', x)
    assert top.shape == shape
    np.testing.assert_array_equal(top.ravel(), x.ravel())


def test_flatten_rejects_in_place() -> None:
    with pytest.raises(ModelFormatError, match="in-place"):
        apply('name: "f" type: "Flatten" bottom: "x" top: "x"', rand(2, 3))


@pytest.mark.parametrize("params, shape", [
    ("shape { dim: 0 dim: 0 dim: -1 }", (2, 6, 20)),
    ("shape { dim: -1 dim: 10 }", (24, 10)),
    ("shape { dim: 0 dim: 2 dim: -1 dim: 0 }", (2, 2, 12, 5)),  # the 0s copy bottom axes 0 and 3
    ("axis: 1 num_axes: 1 shape { dim: 2 dim: 3 }", (2, 2, 3, 4, 5)),
    ("axis: 1 shape { dim: 0 dim: -1 }", (2, 6, 20)),  # 0 copies bottom axis 1 + 0
    ("axis: 2 num_axes: 2 shape { dim: -1 }", (2, 6, 20)),
    ("axis: -1 num_axes: 0 shape { dim: 1 }", (2, 6, 4, 5, 1)),
    ("axis: 0 num_axes: 0 shape { dim: 1 }", (1, 2, 6, 4, 5)),
    ("axis: -2 shape { dim: 5 dim: 1 }", (2, 6, 4, 5, 1)),
    ("axis: 1 num_axes: 2 shape { dim: 0 dim: 4 dim: -1 }", (2, 6, 4, 1, 5)),
])
def test_reshape_rules(params: str, shape: tuple[int, ...]) -> None:
    x = rand(2, 6, 4, 5)
    (top,) = apply(f'name: "r" type: "Reshape" bottom: "x" top: "t" reshape_param {{ {params} }}', x)
    assert top.shape == shape
    np.testing.assert_array_equal(top.ravel(), x.ravel())


@pytest.mark.parametrize("params, message", [
    ("shape { dim: -1 dim: -1 }", "several -1"),
    ("shape { dim: -1 dim: 7 }", "divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 dim: 0 }", "no bottom axis"),
    ("shape { dim: 3 dim: 3 }", "must match input count"),
    ("axis: 3 num_axes: 2 shape { dim: 1 }", "out of range"),
    ("axis: 5 shape { dim: 1 }", "out of range"),
    ("num_axes: -2 shape { dim: 1 }", "num_axes"),
    ("shape { dim: -2 dim: 60 }", "negative dim"),
])
def test_reshape_errors(params: str, message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        apply(f'name: "r" type: "Reshape" bottom: "x" top: "t" reshape_param {{ {params} }}', rand(2, 6, 5))


# -- Crop / Tile -------------------------------------------------------------------------------------------
def test_crop_default_axis_and_offsets() -> None:
    x, ref = rand(2, 3, 8, 9), rand(5, 5, 4, 3)
    (top,) = apply('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "t"', x, ref)
    np.testing.assert_array_equal(top, x[:, :, 0:4, 0:3])
    (top,) = apply('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "t" crop_param { offset: 2 }', x, ref)
    np.testing.assert_array_equal(top, x[:, :, 2:6, 2:5])
    (top,) = apply('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "t" '
                   "crop_param { offset: 4 offset: 6 }", x, ref)
    np.testing.assert_array_equal(top, x[:, :, 4:8, 6:9])
    ref2 = rand(5, 2, 4, 3)
    (top,) = apply('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "t" '
                   "crop_param { axis: -3 offset: 1 offset: 3 offset: 5 }", x, ref2)
    np.testing.assert_array_equal(top, x[:, 1:3, 3:7, 5:8])


def test_crop_gradient_reaches_only_bottom0() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4).requires_grad_()
    ref = torch.zeros(1, 1, 2, 2, requires_grad=True)
    layer = make_layer('name: "c" type: "Crop" bottom: "x" bottom: "r" top: "t" crop_param { offset: 1 }')
    layer.setup([x, ref])
    (top,) = layer.forward([x, ref])
    np.testing.assert_array_equal(top.detach().numpy().ravel(), [5, 6, 9, 10])
    top.sum().backward()
    expected = np.zeros((4, 4))
    expected[1:3, 1:3] = 1
    np.testing.assert_array_equal(x.grad.numpy()[0, 0], expected)
    assert ref.grad is None


@pytest.mark.parametrize("params, ref_shape, message", [
    ("crop_param { offset: 6 }", (1, 1, 4, 4), "out of bounds"),
    ("crop_param { offset: 1 offset: 1 offset: 1 }", (1, 1, 4, 4), "one per cropped axis"),
    ("crop_param { axis: 4 }", (1, 1, 4, 4), "out of range"),
])
def test_crop_errors(params: str, ref_shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        apply(f'name: "c" type: "Crop" bottom: "x" bottom: "r" top: "t" {params}', rand(1, 1, 8, 8),
              rand(*ref_shape))


@pytest.mark.parametrize("axis, tiles", [(1, 3), (-1, 2), (0, 2)])
def test_tile(axis: int, tiles: int) -> None:
    x = rand(2, 3, 4)
    (top,) = apply(f'name: "t" type: "Tile" bottom: "x" top: "t" '
                   f"tile_param {{ axis: {axis} tiles: {tiles} }}", x)
    ax = axis % 3
    assert top.shape[ax] == x.shape[ax] * tiles
    for idx in np.ndindex(*top.shape):
        src = list(idx)
        src[ax] = idx[ax] % x.shape[ax]
        assert top[idx] == x[tuple(src)]


def test_tile_errors() -> None:
    with pytest.raises(ModelFormatError, match="must be specified"):
        apply('name: "t" type: "Tile" bottom: "x" top: "t"', rand(2, 3))
    with pytest.raises(ModelFormatError, match="positive"):
        apply('name: "t" type: "Tile" bottom: "x" top: "t" tile_param { tiles: 0 }', rand(2, 3))


# -- Reduction ---------------------------------------------------------------------------------------------
def np_reduction(x: np.ndarray, op: str, axis: int, coeff: float) -> np.ndarray:
    ax = axis % x.ndim
    flat = x.astype(np.float64).reshape(int(np.prod(x.shape[:ax])), -1)
    out = []
    for row in flat:
        if op == "SUM":
            v = sum(row)
        elif op == "ASUM":
            v = sum(abs(r) for r in row)
        elif op == "SUMSQ":
            v = sum(r * r for r in row)
        else:
            v = sum(row) / len(row)
        out.append(v * coeff)
    return np.array(out).reshape(x.shape[:ax])


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, coeff", [(0, 1.0), (1, 1.0), (-1, 0.25), (2, -2.0)])
def test_reduction(op: str, axis: int, coeff: float) -> None:
    x = rand(2, 3, 4)
    (top,) = apply(f'name: "r" type: "Reduction" bottom: "x" top: "t" '
                   f"reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}", x)
    expected = np_reduction(x, op, axis, coeff)
    assert top.shape == expected.shape
    np.testing.assert_allclose(top, expected, rtol=1e-5, atol=1e-5)


def test_reduction_axis0_is_scalar_and_asum_gradient() -> None:
    x = torch.tensor([[-2.0, 0.0], [3.0, 1.0]], requires_grad=True)
    layer = make_layer('name: "r" type: "Reduction" bottom: "x" top: "t" '
                       "reduction_param { operation: ASUM coeff: 2 }")
    (top,) = layer.forward([x])
    assert top.shape == ()
    assert float(top.detach()) == 12.0
    top.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[-2, 0], [2, 2]])


# -- ArgMax ------------------------------------------------------------------------------------------------
def np_argmax(x: np.ndarray, top_k: int = 1, out_max_val: bool = False,
              axis: int | None = None) -> np.ndarray:
    """Caffe's ArgMax: sort (value, index) pairs descending, so equal values put the higher index first."""
    def best(values: np.ndarray) -> list[tuple[float, int]]:
        return sorted(((float(v), j) for j, v in enumerate(values)), reverse=True)[:top_k]

    if axis is None:
        n = x.shape[0]
        flat = x.reshape(n, -1)
        out = np.zeros((n, 2 if out_max_val else 1, top_k), np.float32)
        for i in range(n):
            for j, (v, idx) in enumerate(best(flat[i])):
                out[i, 0, j] = idx
                if out_max_val:
                    out[i, 1, j] = v
        return out.reshape([n, out.shape[1], top_k] + [1] * max(0, x.ndim - 3))
    ax = axis % x.ndim
    moved = np.moveaxis(x, ax, -1)
    out = np.zeros(moved.shape[:-1] + (top_k,), np.float32)
    for idx in np.ndindex(*moved.shape[:-1]):
        out[idx] = [v if out_max_val else j for v, j in best(moved[idx])]
    return np.moveaxis(out, -1, ax)


@pytest.mark.parametrize("shape", [(3, 10), (2, 3, 2, 2), (2, 5), (4,)])
@pytest.mark.parametrize("top_k, out_max_val", [(1, False), (1, True), (3, False), (3, True)])
def test_argmax_without_axis(shape: tuple[int, ...], top_k: int, out_max_val: bool) -> None:
    # rounding to a coarse grid makes ties frequent
    x = np.round(rand(*shape) * 2).astype(np.float32)
    if int(np.prod(shape[1:])) < top_k:
        with pytest.raises(ModelFormatError, match="top_k"):
            apply(f'name: "a" type: "ArgMax" bottom: "x" top: "t" '
                  f"argmax_param {{ top_k: {top_k} out_max_val: {str(out_max_val).lower()} }}", x)
        return
    (top,) = apply(f'name: "a" type: "ArgMax" bottom: "x" top: "t" '
                   f"argmax_param {{ top_k: {top_k} out_max_val: {str(out_max_val).lower()} }}", x)
    expected = np_argmax(x, top_k, out_max_val)
    assert top.shape == expected.shape
    np.testing.assert_array_equal(top, expected)


def test_argmax_shapes_and_ties_by_hand() -> None:
    x = np.array([[1, 3, 3, 0], [2, 2, 2, 2]], np.float32).reshape(2, 4, 1, 1)
    (top,) = apply('name: "a" type: "ArgMax" bottom: "x" top: "t"', x)
    assert top.shape == (2, 1, 1, 1)
    np.testing.assert_array_equal(top.ravel(), [2, 3])  # ties go to the higher index
    (top,) = apply('name: "a" type: "ArgMax" bottom: "x" top: "t" '
                   "argmax_param { out_max_val: true top_k: 2 }", x)
    assert top.shape == (2, 2, 2, 1)
    np.testing.assert_array_equal(top[:, 0].ravel(), [2, 1, 3, 2])
    np.testing.assert_array_equal(top[:, 1].ravel(), [3, 3, 2, 2])


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
@pytest.mark.parametrize("top_k, out_max_val", [(1, False), (2, True), (2, False)])
def test_argmax_with_axis(axis: int, top_k: int, out_max_val: bool) -> None:
    x = np.round(rand(3, 4, 5)).astype(np.float32)
    (top,) = apply(f'name: "a" type: "ArgMax" bottom: "x" top: "t" argmax_param '
                   f"{{ axis: {axis} top_k: {top_k} out_max_val: {str(out_max_val).lower()} }}", x)
    expected = np_argmax(x, top_k, out_max_val, axis)
    assert top.shape == expected.shape
    np.testing.assert_array_equal(top, expected)


def test_argmax_errors() -> None:
    with pytest.raises(ModelFormatError, match="top_k"):
        apply('name: "a" type: "ArgMax" bottom: "x" top: "t" argmax_param { axis: 1 top_k: 4 }', rand(2, 3))
    with pytest.raises(ModelFormatError, match="out of range"):
        apply('name: "a" type: "ArgMax" bottom: "x" top: "t" argmax_param { axis: 2 }', rand(2, 3))


# -- Softmax / Silence -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, -1, 0, 2])
def test_softmax(axis: int) -> None:
    x = rand(2, 3, 4) * 5
    (top,) = apply(f'name: "s" type: "Softmax" bottom: "x" top: "t" softmax_param {{ axis: {axis} }}', x)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(top, e / e.sum(axis=axis, keepdims=True), rtol=1e-5, atol=1e-7)


def test_softmax_default_axis_is_1() -> None:
    x = rand(2, 3, 2)
    (top,) = apply('name: "s" type: "Softmax" bottom: "x" top: "t"', x)
    np.testing.assert_allclose(top.sum(axis=1), np.ones((2, 2)), rtol=1e-6)


def test_silence_has_no_tops_and_hides_outputs() -> None:
    text = input_layer(x=(2, 3)) + (
        'layer { name: "sp" type: "Split" bottom: "x" top: "a" top: "b" }\n'
        'layer { name: "sil" type: "Silence" bottom: "a" }\n')
    net = run_net(text, {"x": rand(2, 3)})
    assert net.outputs == ["b"]
    layer = make_layer('name: "sil" type: "Silence" bottom: "a" bottom: "b"')
    assert layer.forward([torch.zeros(1), torch.zeros(2)]) == []


# -- reference cross-check ---------------------------------------------------------------------------------
STRUCT_NET = input_layer(x=(2, 6, 4, 5), y=(2, 3, 4, 5), z=(2, 6, 2, 3)) + """
layer { name: "sl" type: "Slice" bottom: "x" top: "s0" top: "s1" top: "s2"
        slice_param { slice_point: 1 slice_point: 3 } }
layer { name: "esum" type: "Eltwise" bottom: "s2" bottom: "y" top: "e1"
        eltwise_param { coeff: 0.5 coeff: -2 } }
layer { name: "eprod" type: "Eltwise" bottom: "s2" bottom: "y" bottom: "e1" top: "e2"
        eltwise_param { operation: PROD } }
layer { name: "emax" type: "Eltwise" bottom: "s2" bottom: "y" bottom: "e2" top: "e3"
        eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "s0" bottom: "s1" bottom: "e3" top: "c" concat_param { axis: -3 } }
layer { name: "cat2" type: "Concat" bottom: "c" bottom: "x" top: "c2" concat_param { concat_dim: 2 } }
layer { name: "flat" type: "Flatten" bottom: "c" top: "f" flatten_param { axis: 2 } }
layer { name: "rs" type: "Reshape" bottom: "c2" top: "r"
        reshape_param { axis: 1 num_axes: 2 shape { dim: 0 dim: -1 dim: 4 } } }
layer { name: "rs2" type: "Reshape" bottom: "x" top: "r2" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "crop" type: "Crop" bottom: "x" bottom: "z" top: "cr" crop_param { offset: 1 offset: 2 } }
layer { name: "crop2" type: "Crop" bottom: "c2" bottom: "z" top: "cr2" crop_param { axis: 1 offset: 0 } }
layer { name: "tile" type: "Tile" bottom: "cr" top: "tl" tile_param { axis: -1 tiles: 3 } }
layer { name: "red" type: "Reduction" bottom: "tl" top: "rd"
        reduction_param { operation: SUMSQ axis: 2 coeff: 0.5 } }
layer { name: "red2" type: "Reduction" bottom: "x" top: "rd2" reduction_param { operation: MEAN } }
layer { name: "red3" type: "Reduction" bottom: "x" top: "rd3" reduction_param { operation: ASUM axis: -1 } }
layer { name: "am" type: "ArgMax" bottom: "x" top: "am" argmax_param { out_max_val: true top_k: 3 } }
layer { name: "am2" type: "ArgMax" bottom: "x" top: "am2"
        argmax_param { axis: 1 top_k: 2 out_max_val: true } }
layer { name: "am3" type: "ArgMax" bottom: "y" top: "am3" argmax_param { axis: -1 top_k: 2 } }
layer { name: "sm" type: "Softmax" bottom: "x" top: "sm" softmax_param { axis: -1 } }
layer { name: "sm2" type: "Softmax" bottom: "y" top: "sm2" }
layer { name: "sp" type: "Split" bottom: "f" top: "f1" top: "f2" }
layer { name: "sil" type: "Silence" bottom: "f2" }
"""


@pytest.mark.reference
def test_structure_net_matches_reference(reference_caffe: str) -> None:
    inputs = {"x": rand(2, 6, 4, 5), "y": rand(2, 3, 4, 5), "z": rand(2, 6, 2, 3)}
    net = run_net(STRUCT_NET, inputs)
    ours = net.blob_arrays()
    ref = run_reference(STRUCT_NET, inputs)["blobs"]
    assert ours["r"].shape == (2, 6, 2, 4, 5)
    assert ours["am"].shape == (2, 2, 3, 1)
    for name, value in ours.items():
        assert name in ref, name
        assert_close(value, ref[name], name)
