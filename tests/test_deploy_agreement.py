"""Fake-quant vs deploy (integer emulation) after a short QAT on the shared nets, per the save issue:
every quantized layer within 1 LSB of its output quantization step, final outputs within 1e-3."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe import amct, caffe
from amct_caffe.analysis.compare import compare_models
from amct_caffe.model.io import load_prototxt, prototxt_text
from amct_caffe.proto import caffe_pb2
from tests.helpers import deploy_view
from tests.references.nets import REAL_NETS, synthetic_training_net

NETS = ["mtcnn_det1", "mtcnn_det2", "mtcnn_det3", "lenet_mnist", "resnet50_stem", "fsrcnn"]


@pytest.mark.parametrize("model", NETS)
def test_fake_quant_and_deploy_agree_after_qat(shared_models, tmp_path, model):
    prototxt, weights, batch, size = REAL_NETS[model]
    deploy = load_prototxt(shared_models / prototxt)
    train = tmp_path / "train.prototxt"
    train.write_text(prototxt_text(synthetic_training_net(deploy, batch, size)))
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_retrain_config(config, str(train), str(shared_models / weights))
    r_model, r_weights = str(tmp_path / "retrain.prototxt"), str(tmp_path / "retrain.caffemodel")
    amct.create_quant_retrain_model(str(train), str(shared_models / weights), config, r_model, r_weights,
                                    record)
    param = caffe_pb2.SolverParameter(net=r_model, base_lr=0.01, lr_policy="fixed", momentum=0.9, max_iter=3,
                                      clip_gradients=1.0, random_seed=0, display=0)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(text_format.MessageToString(param))
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(r_weights)
    solver.solve()
    prefix = str(tmp_path / "out" / model)
    amct.save_quant_retrain_model(r_model, str(tmp_path / "solver_iter_3.caffemodel"), "Both", prefix, record,
                                  config)
    fake_m, dep_m = str(tmp_path / "fake.prototxt"), str(tmp_path / "deploy.prototxt")
    deploy_view(f"{prefix}_fake_quant_model.prototxt", deploy, fake_m)
    deploy_view(f"{prefix}_deploy_model.prototxt", deploy, dep_m)

    probe = caffe.Net(fake_m, caffe.TEST)
    rng = np.random.default_rng(7)
    inputs = {name: rng.uniform(-1.0, 1.0, probe.blobs[name].data.shape).astype(np.float32)
              for name in probe.inputs}
    rows = compare_models(fake_m, f"{prefix}_fake_quant_weights.caffemodel",
                          dep_m, f"{prefix}_deploy_weights.caffemodel", inputs)
    by_blob = {r.blob: r for r in rows}
    quantized = [r for r in rows if r.kind == "accumulator"]
    assert quantized, "the deploy net has integer layers"
    # each quantized layer's output (the DeQuant's top) in steps of the Quant that reads it next
    fake = caffe.Net(fake_m, f"{prefix}_fake_quant_weights.caffemodel", caffe.TEST)
    readers = {b for layer in fake.layers if layer.type == "Quant" for b in fake.bottom_names[layer.name]}
    checked = 0
    for layer in fake.layers:
        if layer.type != "DeQuant":
            continue
        top = fake.top_names[layer.name][0]
        if top in readers and by_blob[top].max_lsb is not None:
            assert by_blob[top].max_lsb <= 1.0, (model, top, by_blob[top])
            checked += 1
    # the net's outputs: max |fake - deploy| within 1e-3 of the output's largest magnitude
    fake_out = fake.forward(**inputs)
    for name in fake.outputs:
        scale = float(np.abs(fake_out[name]).max()) or 1.0
        assert by_blob[name].max_abs_diff <= 1e-3 * scale, (model, name, by_blob[name], scale)
    assert checked or len(quantized) == 1
