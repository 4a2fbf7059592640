"""Every real model in the sibling shared/models loads, runs, and matches the real Caffe blob by blob."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import caffe
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.model.io import load_caffemodel
from tests.helpers import assert_close_to_scale
from tests.references.real_caffe import SHARED, run_reference

MODELS_DIR = SHARED / "models"
SPLIT_BLOB = re.compile(r"_split_\d+$")


def _model_cases() -> list[tuple[str, str | None]]:
    """(prototxt, caffemodel or None) for every prototxt of the sibling shared/models
    (empty when it is absent)."""
    cases = []
    if not MODELS_DIR.is_dir():
        return cases
    for folder in sorted(p for p in MODELS_DIR.iterdir() if p.is_dir()):
        weights = sorted(folder.glob("*.caffemodel"))
        for proto in sorted(folder.glob("*.prototxt")):
            cases.append((str(proto), str(weights[0]) if weights else None))
    return cases


CASES = _model_cases()
IDS = [str(Path(p).relative_to(MODELS_DIR)) for p, _ in CASES]
TRAINED = [(p, w) for p, w in CASES if w]
TRAINED_IDS = [str(Path(p).relative_to(MODELS_DIR)) for p, _ in TRAINED]

pytestmark = pytest.mark.skipif(not CASES, reason="the sibling shared/models is not present")


def _batch_one_inputs(net: caffe.Net, seed: int) -> dict[str, np.ndarray]:
    """Random inputs of batch 1 (the prototxt's own batch may be 10), set into the net's input blobs."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name in net.inputs:
        shape = (1,) + tuple(net.blobs[name].data.shape[1:])
        inputs[name] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
        net.blobs[name].reshape(*shape)
    net.reshape()
    return inputs


def _match_rows(ours: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DetectionOutput rows [image, label, score, box...] of the reference reordered to pair with ours.

    Rows of (nearly) equal score come out in an unspecified order: Caffe sorts with an unstable std::sort,
    and scores equal to 1e-7 swap places between engines. Each of our rows is paired with the nearest
    unpaired reference row; the caller then compares the pairs with the usual tolerance.
    """
    a = ours.reshape(-1, ours.shape[-1]).astype(np.float64)
    b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    if a.shape != b.shape:
        return a, b
    distance = np.abs(a[:, None, :] - b[None, :, :]).sum(axis=2)
    order = np.empty(len(a), dtype=np.int64)
    free = np.ones(len(b), dtype=bool)
    for i in np.argsort(distance.min(axis=1)):
        j = int(np.argmin(np.where(free, distance[i], np.inf)))
        order[i], free[j] = j, False
    return a, b[order]


def _all_finite(net: caffe.Net) -> list[str]:
    return [name for name, blob in net.blobs.items() if not np.all(np.isfinite(blob.data))]


@pytest.mark.parametrize(("prototxt", "weights"), CASES, ids=IDS)
def test_model_runs_with_random_weights(prototxt, weights):
    net = caffe.Net(prototxt, caffe.TEST)
    randomize_params(net, seed=1)
    inputs = _batch_one_inputs(net, seed=2)
    outputs = net.forward(**inputs)
    assert outputs, "a net has at least one output"
    assert _all_finite(net) == []


@pytest.mark.parametrize(("prototxt", "weights"), TRAINED, ids=TRAINED_IDS)
def test_model_runs_with_trained_weights(prototxt, weights):
    net = caffe.Net(prototxt, weights, caffe.TEST)
    inputs = _batch_one_inputs(net, seed=3)
    net.forward(**inputs)
    assert _all_finite(net) == []
    # the weights in the net are the caffemodel's (spot-check the first layer with blobs)
    source = {layer.name: layer for layer in load_caffemodel(weights).layer}
    name, blobs = next(iter(net.params.items()))
    src_values = np.asarray(source[name].blobs[0].data, dtype=np.float32)
    np.testing.assert_array_equal(blobs[0].data.reshape(-1), src_values)


@pytest.mark.reference
@pytest.mark.parametrize(("prototxt", "weights"), CASES, ids=IDS)
def test_model_matches_reference_caffe(prototxt, weights, reference_caffe, tmp_path):
    """Random (or trained) weights saved by us, loaded by the reference: every blob and param agrees."""
    net = caffe.Net(prototxt, caffe.TEST, weights=weights)
    if weights is None:
        randomize_params(net, seed=4)
    inputs = _batch_one_inputs(net, seed=5)
    ours = net.forward(**inputs)
    saved = tmp_path / "ours.caffemodel"
    net.save(saved)
    ref = run_reference(prototxt, inputs, weights=saved)
    # our caffemodel loads bit-exactly in the real Caffe
    for layer_name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_array_equal(ref["params"][f"{layer_name}/{i}"], blob.data, err_msg=layer_name)
    # Caffe adds Split layers (blobs "<blob>_<layer>_<i>_split_<k>") where a blob has several readers;
    # the engine needs none, and every other blob must exist in both.
    ref_blobs = {k: v for k, v in ref["blobs"].items() if not SPLIT_BLOB.search(k)}
    assert set(ref_blobs) == set(net.blobs)
    detections = {tops[0] for layer, tops in zip(net.layers, net.top_names.values())
                  if layer.type == "DetectionOutput"}
    for name, blob in net.blobs.items():
        ours_b, ref_b = blob.data, ref["blobs"][name]
        if name in detections:
            ours_b, ref_b = _match_rows(ours_b, ref_b)
        assert_close_to_scale(ours_b, ref_b, name)
    assert set(ours) == set(net.outputs)
