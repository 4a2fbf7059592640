"""A small generated Faster R-CNN-style net (RPN, py-faster-rcnn's Python proposal layer, ROIPooling, fc
head) and an R-FCN-style head (PSROIPooling): they run, each region layer agrees with the numpy references
on the net's own blobs, and post-training quantization quantizes the convolutions and fc layers around
them while the region layers stay float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from amct_caffe import amct, caffe
from amct_caffe.analysis.compare import compare_models
from amct_caffe.engine.net import Net
from amct_caffe.engine.randomize import randomize_params
from amct_caffe.proto import caffe_pb2
from tests.helpers import assert_close, caffemodel_raw_blobs, read_net
from tests.references import roi_layers as ref

FASTER_RCNN = """
name: "mini_faster_rcnn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 64 dim: 80 } } }
layer { name: "im_info" type: "Input" top: "im_info" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "rpn_cls_score" type: "Convolution" bottom: "conv2" top: "rpn_cls_score"
        convolution_param { num_output: 18 kernel_size: 1 } }
layer { name: "rpn_bbox_pred" type: "Convolution" bottom: "conv2" top: "rpn_bbox_pred"
        convolution_param { num_output: 36 kernel_size: 1 } }
layer { name: "rpn_cls_score_reshape" type: "Reshape" bottom: "rpn_cls_score" top: "rpn_cls_score_reshape"
        reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }
layer { name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }
layer { name: "rpn_cls_prob_reshape" type: "Reshape" bottom: "rpn_cls_prob" top: "rpn_cls_prob_reshape"
        reshape_param { shape { dim: 0 dim: 18 dim: -1 dim: 0 } } }
layer { name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred"
        bottom: "im_info" top: "rois"
        python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "'feat_stride': 4" } }
layer { name: "roi_pool5" type: "ROIPooling" bottom: "conv2" bottom: "rois" top: "pool5"
        roi_pooling_param { pooled_w: 3 pooled_h: 3 spatial_scale: 0.25 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 10 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc6" top: "cls_score"
        inner_product_param { num_output: 3 } }
layer { name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }
"""

#: An R-FCN-style head on the same backbone: position-sensitive score maps, PSROIPooling, average vote.
RFCN_HEAD = """
layer { name: "rfcn_cls" type: "Convolution" bottom: "conv2" top: "rfcn_cls"
        convolution_param { num_output: 27 kernel_size: 1 } }
layer { name: "psroipooled_cls_rois" type: "PSROIPooling" bottom: "rfcn_cls" bottom: "rois"
        top: "psroipooled_cls_rois" psroi_pooling_param { spatial_scale: 0.25 output_dim: 3 group_size: 3 } }
layer { name: "ave_cls_score_rois" type: "Pooling" bottom: "psroipooled_cls_rois" top: "cls_score_rfcn"
        pooling_param { pool: AVE kernel_size: 3 stride: 3 } }
"""


def _inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"data": rng.standard_normal((1, 3, 64, 80)).astype(np.float32),
            "im_info": np.array([[64.0, 80.0, 1.0]], np.float32)}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("faster_rcnn")
    proto = folder / "model.prototxt"
    proto.write_text(FASTER_RCNN + RFCN_HEAD)
    net = Net(str(proto))
    randomize_params(net, 6)
    weights = folder / "model.caffemodel"
    net.save(weights)
    return str(proto), str(weights)


def test_region_layers_agree_with_references_inside_the_net(model_files: tuple[str, str]) -> None:
    net = caffe.Net(model_files[0], model_files[1], caffe.TEST)
    inputs = _inputs(1)
    out = net.forward(**inputs)
    prob = net.blobs["rpn_cls_prob_reshape"].data
    deltas = net.blobs["rpn_bbox_pred"].data
    want_rois, _ = ref.proposal(prob, deltas, inputs["im_info"], 4, 6000, 300, np.float32(0.7), 16)
    rois = net.blobs["rois"].data
    assert rois.shape[0] > 5, "the generated net proposes regions"
    assert_close(rois, want_rois, "rois", rtol=1e-6, atol=1e-4)
    want_pool, _ = ref.roi_pooling(net.blobs["conv2"].data, rois, 3, 3, 0.25)
    assert_close(net.blobs["pool5"].data, want_pool, "pool5", rtol=0, atol=0)
    want_ps, _ = ref.psroi_pooling(net.blobs["rfcn_cls"].data, rois, 3, 3, 0.25)
    assert_close(net.blobs["psroipooled_cls_rois"].data, want_ps, "psroipooled", rtol=1e-5, atol=1e-6)
    assert out["cls_prob"].shape == (rois.shape[0], 3)
    assert out["cls_score_rfcn"].shape == (rois.shape[0], 3, 1, 1)


def test_ptq_keeps_region_layers_float(model_files: tuple[str, str], tmp_path: Path) -> None:
    model, weights = model_files
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_config(config, model, weights, batch_num=2)
    graph = amct.init(config, model, weights, record)
    cal_model, cal_weights = str(tmp_path / "cal.prototxt"), str(tmp_path / "cal.caffemodel")
    amct.quantize_model(graph, cal_model, cal_weights)
    net = caffe.Net(cal_model, caffe.TEST, weights=cal_weights)
    for seed in (2, 3):
        net.forward(**_inputs(seed))
    prefix = str(tmp_path / "out" / "m")
    amct.save_model(graph, "Both", prefix)

    deploy = read_net(f"{prefix}_deploy_model.prototxt")
    types = {layer.name: layer.type for layer in deploy.layer}
    assert types["proposal"] == "Python" and types["roi_pool5"] == "ROIPooling"
    assert types["psroipooled_cls_rois"] == "PSROIPooling"
    dequantized = {layer.dequant_param.object_layer for layer in deploy.layer if layer.type == "DeQuant"}
    assert {"conv1", "conv2", "rpn_cls_score", "rpn_bbox_pred", "fc6", "cls_score", "rfcn_cls"} <= dequantized
    blobs = caffemodel_raw_blobs(f"{prefix}_deploy_weights.caffemodel")
    assert len(blobs["fc6"][0].int8_data) == 10 * 16 * 3 * 3

    # the backbone and RPN agree between the fake-quant and the deploy model; beyond the proposal layer the
    # roi count may differ (a box at the NMS threshold), so compare up to the RPN outputs
    inputs = _inputs(4)
    rows = {r.blob: r for r in compare_models(f"{prefix}_fake_quant_model.prototxt",
                                              f"{prefix}_fake_quant_weights.caffemodel",
                                              f"{prefix}_deploy_model.prototxt",
                                              f"{prefix}_deploy_weights.caffemodel", inputs)}
    fake = caffe.Net(f"{prefix}_fake_quant_model.prototxt", f"{prefix}_fake_quant_weights.caffemodel",
                     caffe.TEST)
    fake.forward(**inputs)
    for blob in ("rpn_cls_prob_reshape", "rpn_bbox_pred"):
        scale = float(np.abs(fake.blobs[blob].data).max()) or 1.0
        assert rows[blob].max_abs_diff <= 1e-3 * scale, (blob, rows[blob])


#: Training-only loss for QAT: the squared sum of the class scores (gradients flow back through ROIPooling
#: and PSROIPooling into the backbone; the Proposal layer gives none, as py-faster-rcnn's).
TRAIN_LOSS = """
layer { name: "loss" type: "Reduction" bottom: "cls_score" top: "loss" include { phase: TRAIN }
        reduction_param { operation: SUMSQ coeff: 0.01 } loss_weight: 1 }
layer { name: "loss_rfcn" type: "Reduction" bottom: "cls_score_rfcn" top: "loss_rfcn"
        include { phase: TRAIN }
        reduction_param { operation: SUMSQ coeff: 0.01 } loss_weight: 1 }
"""


def test_qat_trains_through_region_layers(tmp_path: Path) -> None:
    model = tmp_path / "model.prototxt"
    model.write_text(FASTER_RCNN + RFCN_HEAD + TRAIN_LOSS)
    float_net = Net(str(model))
    randomize_params(float_net, 6)
    weights = str(tmp_path / "model.caffemodel")
    float_net.save(weights)
    config, record = str(tmp_path / "config.json"), str(tmp_path / "record.txt")
    amct.create_quant_retrain_config(config, str(model), weights)
    r_model, r_weights = str(tmp_path / "retrain.prototxt"), str(tmp_path / "retrain.caffemodel")
    amct.create_quant_retrain_model(str(model), weights, config, r_model, r_weights, record)
    param = caffe_pb2.SolverParameter(net=r_model, base_lr=0.01, lr_policy="fixed", momentum=0.9, max_iter=2,
                                      random_seed=0, display=0, snapshot_prefix=str(tmp_path / "s"))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(text_format.MessageToString(param))
    solver = caffe.SGDSolver(str(solver_file))
    solver.net.copy_from(r_weights)
    shadows = ("conv2_wts_retrain", "rfcn_cls_wts_retrain")
    before = {name: solver.net.params[name][1].data.copy() for name in shadows}
    for seed in (5, 6):
        for name, value in _inputs(seed).items():
            solver.net.blobs[name].data[...] = value
        solver.step(1)
    for name, old in before.items():  # the float shadow weights moved: gradients came through the ROI layers
        assert not np.allclose(solver.net.params[name][1].data, old), name
    trained = str(tmp_path / "trained.caffemodel")
    solver.net.save(trained)
    prefix = str(tmp_path / "out" / "m")
    amct.save_quant_retrain_model(r_model, trained, "Both", prefix, record, config)
    deploy = read_net(f"{prefix}_deploy_model.prototxt")
    types = {layer.name: layer.type for layer in deploy.layer}
    assert (types["proposal"], types["roi_pool5"], types["psroipooled_cls_rois"]) == (
        "Python", "ROIPooling", "PSROIPooling")
    net = caffe.Net(f"{prefix}_deploy_model.prototxt", f"{prefix}_deploy_weights.caffemodel", caffe.TEST)
    out = net.forward(**_inputs(7))
    assert np.isfinite(out["cls_prob"]).all() and out["cls_prob"].shape[1] == 3
