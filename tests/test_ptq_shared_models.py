"""Post-training quantization of every shared model with trained weights: the fake-quant and the deploy
model (integer emulation) agree.

Each model in the sibling shared/models that ships a caffemodel goes through create_quant_config -> init ->
quantize_model -> 2 calibration batches of random data (uniform in [-1, 1], the input shapes of the
prototxt) -> save_model('Both') (every model but the face detector once more with
``refine="equalization"``, whose outputs must agree at 0.9999 too), and both saved models run on a third
random batch (``analysis.compare.compare_models``):

* every quantized layer whose input codes agree in both models is within 1 LSB of the step of the next
  ``Quant`` downstream of it (its DeQuant's top, through the float layers in between); where an input code
  flipped at a rounding tie, the layer's output moves by whole input steps times its weight codes, which is
  the documented float-vs-integer difference (docs/design.md), so those layers are only counted;
* the net's outputs have cosine similarity >= 0.9999; a ``DetectionOutput`` is judged on its inputs (its
  output is a variable-length list of boxes after NMS, where one score crossing the threshold changes the
  shape).

The sfd_mbv2ssd_bn face detector (MobileNet-v2 SSD, 63 quantized layers) is the exception measured and kept
at a lower bound: on white-noise input the tie flips cascade through its depth (a flipped code shifts the
layer's outputs by ``|w| * s_in``, which flips codes of the next Quant in turn), and the detection inputs
reach cosine ~0.997 (see ``COSINE_SFD``). The cascade is float32's, not the deploy model's: the same
fake-quant model run twice in float32 (the engine's optimised forward, then layer by layer) flips the same
way and agrees with itself only at cosine 0.99945 on ``mbox_loc-_`` (docs/design.md, "Deep nets: the
tie-flip cascade"), so no float32 evaluation of it can meet 0.9999 against the exact integer model.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest

from amct_caffe import amct, caffe
from amct_caffe.analysis.compare import compare_models
from amct_caffe.analysis.results import BlobAgreement
from tests.references.real_caffe import SHARED

MODELS_DIR = SHARED / "models"
CALIBRATION_BATCHES = 2
COSINE = 0.9999
#: measured 0.9973 (mbox_loc-_) on the random batch of this test; the tie-flip cascade of the module docstring
#: (two float32 runs of the fake-quant model alone agree at 0.99945; natural photos give 0.9983-0.9989)
COSINE_SFD = 0.995


def _weighted_models() -> list[tuple[Path, Path]]:
    """(prototxt, caffemodel) for every prototxt of a shared model folder holding a caffemodel."""
    if not MODELS_DIR.is_dir():
        return []
    cases = []
    for folder in sorted(p for p in MODELS_DIR.iterdir() if p.is_dir()):
        weights = sorted(folder.glob("*.caffemodel"))
        if weights:
            cases += [(proto, weights[0]) for proto in sorted(folder.glob("*.prototxt"))]
    return cases


CASES = _weighted_models()
SLOW = {"sfd_mbv2ssd_bn"}
PARAMS = [pytest.param(proto, weights, id=str(proto.relative_to(MODELS_DIR)),
                       marks=[pytest.mark.slow] if proto.parent.name in SLOW else [])
          for proto, weights in CASES]

pytestmark = pytest.mark.skipif(not CASES, reason="the sibling shared/models is not present")


def random_inputs(net: caffe.Net, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.uniform(-1.0, 1.0, net.blobs[name].data.shape).astype(np.float32)
            for name in net.inputs}


def run_ptq(proto: Path, weights: Path, folder: Path, rng: np.random.Generator,
            refine: str | None = None) -> str:
    """The PTQ flow with random calibration batches (and ``refine`` on them); returns the save_model
    prefix."""
    config, record = str(folder / "config.json"), str(folder / "record.txt")
    amct.create_quant_config(config, str(proto), str(weights), batch_num=CALIBRATION_BATCHES)
    graph = amct.init(config, str(proto), str(weights), record)
    cal_model, cal_weights = str(folder / "calibration.prototxt"), str(folder / "calibration.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    net = caffe.Net(cal_model, caffe.TEST, weights=cal_weights)
    batches = [random_inputs(net, rng) for _ in range(CALIBRATION_BATCHES)]
    for batch in batches:
        net.forward(**batch)
    prefix = str(folder / "out" / proto.parent.name)
    if refine is None:
        amct.save_model(graph, "Both", prefix)
    else:
        amct.save_model(graph, "Both", prefix, refine=refine, calibration_data=batches)
    return prefix


def downstream_quants(net: caffe.Net, blob: str) -> list[str]:
    """The Quant layers first reached from ``blob`` through the layers reading it (and their tops)."""
    types = {layer.name: layer.type for layer in net.layers}
    readers: dict[str, list[str]] = {}
    for name in types:
        for bottom in net.bottom_names[name]:
            readers.setdefault(bottom, []).append(name)
    found, seen, queue = [], set(), deque([blob])
    while queue:
        value = queue.popleft()
        for layer in readers.get(value, []):
            if layer in seen:
                continue
            seen.add(layer)
            if types[layer] == "Quant":
                found.append(layer)
            else:
                queue.extend(t for t in net.top_names[layer] if t != value)
    return found


def judged_outputs(net: caffe.Net) -> list[str]:
    """The net's outputs, a DetectionOutput replaced by its inputs."""
    detection = {net.top_names[layer.name][0]: net.bottom_names[layer.name] for layer in net.layers
                 if layer.type == "DetectionOutput"}
    judged: list[str] = []
    for out in net.outputs:
        judged += detection.get(out, [out])
    return judged


@pytest.mark.parametrize(("proto", "weights"), PARAMS)
def test_ptq_fake_quant_and_deploy_agree(tmp_path, proto, weights):
    rng = np.random.default_rng(0)
    prefix = run_ptq(proto, weights, tmp_path, rng)
    fake_model = f"{prefix}_fake_quant_model.prototxt"
    fake_weights = f"{prefix}_fake_quant_weights.caffemodel"
    fake = caffe.Net(fake_model, caffe.TEST, weights=fake_weights)
    inputs = random_inputs(fake, rng)
    rows = compare_models(fake_model, fake_weights, f"{prefix}_deploy_model.prototxt",
                          f"{prefix}_deploy_weights.caffemodel", inputs)
    by_blob: dict[str, BlobAgreement] = {r.blob: r for r in rows}
    layer_types = {layer.name: layer.type for layer in fake.layers}
    quant_top = {name: fake.top_names[name][0] for name, t in layer_types.items() if t == "Quant"}
    quant_of_blob = {top: name for name, top in quant_top.items()}

    checked, after_flip = 0, 0
    for name, layer_type in layer_types.items():
        if layer_type != "DeQuant":
            continue
        quantized = fake.bottom_names[name][0]  # <L>_dequant_layer_in, written by the quantized layer L
        writer = next(n for n in layer_types if quantized in fake.top_names[n])
        input_quant = quant_of_blob.get(fake.bottom_names[writer][0])
        nexts = downstream_quants(fake, fake.top_names[name][0])
        if not nexts:
            continue  # no Quant after it: judged with the outputs
        if input_quant is not None and by_blob[quant_top[input_quant]].flips:
            after_flip += 1
            continue
        step = min(by_blob[quant_top[q]].step for q in nexts)
        row = by_blob[fake.top_names[name][0]]
        assert row.max_abs_diff <= step, (proto.parent.name, name, row.max_abs_diff / step, row)
        checked += 1
    assert checked >= 1 or after_flip == 0, (checked, after_flip)

    bound = COSINE_SFD if proto.parent.name == "sfd_mbv2ssd_bn" else COSINE
    for blob in judged_outputs(fake):
        assert by_blob[blob].cosine >= bound, (proto.parent.name, blob, by_blob[blob])


@pytest.mark.parametrize(("proto", "weights"), [p for p in PARAMS if p.id.split("/")[0] not in SLOW])
def test_equalized_ptq_fake_quant_and_deploy_agree(tmp_path, proto, weights):
    # refine="equalization" rescales the weights and recalibrates the rescaled inputs: the deploy model built
    # from them still computes what the fake-quant model does (the outputs, or a detector's inputs)
    rng = np.random.default_rng(0)
    prefix = run_ptq(proto, weights, tmp_path, rng, refine="equalization")
    fake_model = f"{prefix}_fake_quant_model.prototxt"
    fake_weights = f"{prefix}_fake_quant_weights.caffemodel"
    fake = caffe.Net(fake_model, caffe.TEST, weights=fake_weights)
    rows = compare_models(fake_model, fake_weights, f"{prefix}_deploy_model.prototxt",
                          f"{prefix}_deploy_weights.caffemodel", random_inputs(fake, rng))
    by_blob = {r.blob: r for r in rows}
    for blob in judged_outputs(fake):
        assert by_blob[blob].cosine >= COSINE, (proto.parent.name, blob, by_blob[blob])
