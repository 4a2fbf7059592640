"""Agreement of the fake-quant model (float emulation) and the deploy model (integer emulation).

:func:`compare_models` runs both saved models of ``save_quant_retrain_model`` in the engine on the same
inputs and reports, for every blob both nets have, how far apart they are. The deploy net's blobs are read
as real values first (:func:`amct_caffe.emulation.integer.integer_blob_scales`): a Quant top holds INT8
codes, read as ``(q - o_d) * s_d``; a quantized layer's top (``<L>_dequant_layer_in``) holds the INT32
accumulator, read as ``acc * deq_scale``; every other blob is already real.

Units: each quantized layer has an output quantization step -- the ``s_d`` of the next ``Quant`` that
reads its DeQuant's top (the blob name, through in-place layers), else its ``deq_scale`` (per channel);
that step applies to the DeQuant's top and to the accumulator before it. A Quant top's step is its own
``s_d``. Blobs without a known step (ordinary float layers) get ``max_lsb = None``; their agreement is
the relative error and the cosine similarity.

The two models are meant to differ only by float32 rounding (the fake model sums in float32, the deploy
model exactly in integers) and by the ``Quant`` formula at rounding ties (see
:mod:`amct_caffe.emulation.integer`): expect ``max_lsb`` well below 1, except where a code flips at a tie,
which shows as ``flips`` on the Quant top and as whole input steps times ``|q_w|`` in the layers after
it. Ties are not as rare as random data suggests: values on a quantization grid (the output of an AVE
pooling of codes, a clip bound equal to a data maximum) land exactly on them, and there AscendQuant's
``round(x*scale + offset)`` and the fake layer's ``round(x/s_d) + offset`` round the opposite ways
whenever ``x*scale + offset`` is negative. The default ``quant_formula="caffe"`` runs the deploy model
with the fake layer's formula, which isolates the float-vs-integer arithmetic; ``"ascend"`` shows the
flips of the other reading.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from amct_caffe.emulation.integer import (
    DEFAULT_QUANT_FORMULA,
    IntegerDeQuant,
    IntegerQuant,
    integer_blob_scales,
)
from amct_caffe.emulation.loader import load_net
from amct_caffe.engine.layers.base import TEST
from amct_caffe.engine.net import Net
from amct_caffe.errors import RuntimeEngineError
from amct_caffe.log import get_logger
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("analysis.compare")

ModelArg = str | os.PathLike[str] | caffe_pb2.NetParameter


@dataclass
class BlobAgreement:
    """Agreement of one blob between the fake-quant and the deploy model.

    Attributes:
        blob: the blob name (present in both nets).
        layer: the deploy net's layer that last writes it.
        kind: how the deploy value was read: ``"codes"``, ``"accumulator"`` or ``"real"``.
        shape: the blob's shape.
        max_abs_diff: ``max |fake - deploy|`` in real units.
        step: the output quantization step used for ``max_lsb`` (the smallest one when per channel), or
            None when unknown.
        max_lsb: ``max |fake - deploy| / step`` (element-wise with per-channel steps), or None.
        cosine: cosine similarity of the flattened values (1.0 when both are all zero).
        rel_err: ``||fake - deploy||_2 / ||fake||_2`` (0 when both are zero, inf when only fake is).
        is_output: True for the net's outputs (blobs no layer consumes).
        flips: for a Quant top (``kind == "codes"``): how many codes differ (by half a step or more)
            between the models; None for other blobs.
    """

    blob: str
    layer: str
    kind: str
    shape: tuple[int, ...]
    max_abs_diff: float
    step: float | None
    max_lsb: float | None
    cosine: float
    rel_err: float
    is_output: bool = False
    flips: int | None = None


def _load(model: ModelArg, weights: ModelArg | None, device: torch.device | str | None) -> Net:
    return Net(model, TEST, weights=weights, device=device)


def feed_inputs(net: Net, inputs: Mapping[str, np.ndarray | torch.Tensor], which: str) -> None:
    """Set every input blob of ``net`` from ``inputs`` (arrays or tensors); ``which`` names the model in
    the error raised when one is missing."""
    missing = [name for name in net.inputs if name not in inputs]
    if missing:
        raise RuntimeEngineError(
            f"No input given for the {which} model's input blob(s) {missing}; pass them in "
            "`inputs` ({name: array})."
        )
    for name in net.inputs:
        value = inputs[name]
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        net.set_tensor(name, tensor.to(torch.float32))


def _writers(net: Net) -> dict[str, str]:
    out: dict[str, str] = {}
    for layer in net.engine_layers:
        for top in layer.param.top:
            out[top] = layer.name
    return out


def output_steps(net: Net) -> dict[str, np.ndarray]:
    """The output quantization step of every quantized layer's blobs in an integer net.

    For each DeQuant: the ``s_d`` of the first integer Quant reading its top (through in-place layers),
    else its ``deq_scale``; it applies to the DeQuant's top and bottom.
    """
    layers = net.engine_layers
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, IntegerDeQuant):
            continue
        top = layer.param.top[0]
        step: np.ndarray = layer.deq_scale().numpy().astype(np.float64)
        for j in range(i + 1, len(layers)):
            p = layers[j].param
            if top in p.bottom and isinstance(layers[j], IntegerQuant):
                step = np.array([layers[j].scale_d])
                break
            if top in p.top and top not in p.bottom:
                break
        out[top] = step
        out[layer.param.bottom[0]] = step
    return out


def _agreement(
    name: str, layer: str, kind: str, fake: torch.Tensor, deploy: torch.Tensor, step: np.ndarray | None,
    is_output: bool,
) -> BlobAgreement:
    a = fake.detach().to(torch.float64).cpu()
    b = deploy.detach().to(torch.float64).cpu()
    diff = (a - b).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_lsb = None
    step_value = None
    flips = None
    if step is not None:
        s = torch.from_numpy(np.asarray(step, dtype=np.float64))
        view = s.reshape(()) if s.numel() == 1 else s.reshape([1, -1] + [1] * (diff.dim() - 2))
        lsb = diff / view
        max_lsb = float(lsb.max()) if diff.numel() else 0.0
        step_value = float(s.min())
        if kind == "codes":
            flips = int((lsb >= 0.5).sum())
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if na == 0.0 and nb == 0.0:
        cosine = 1.0
    elif na == 0.0 or nb == 0.0:
        cosine = 0.0
    else:
        cosine = float((a.reshape(-1) @ b.reshape(-1)) / (na * nb))
    nd = float(torch.linalg.vector_norm(a - b))
    rel = 0.0 if nd == 0.0 else (nd / na if na > 0.0 else math.inf)
    return BlobAgreement(name, layer, kind, tuple(int(d) for d in a.shape), max_abs, step_value, max_lsb,
                         cosine, rel, is_output, flips)


def compare_models(
    fake_model: ModelArg,
    fake_weights: ModelArg,
    deploy_model: ModelArg,
    deploy_weights: ModelArg,
    inputs: Mapping[str, np.ndarray | torch.Tensor],
    *,
    device: torch.device | str | None = None,
    quant_formula: str = DEFAULT_QUANT_FORMULA,
) -> list[BlobAgreement]:
    """Run the fake-quant and the deploy model on ``inputs`` and compare every blob present in both.

    Args:
        fake_model, fake_weights: ``<prefix>_fake_quant_model.prototxt`` / ``_weights.caffemodel`` (paths or
            NetParameters).
        deploy_model, deploy_weights: ``<prefix>_deploy_model.prototxt`` / ``_weights.caffemodel``.
        inputs: ``{input blob name: array}`` for the nets' ``Input`` blobs (both nets get the same).
        device: torch device for both nets (default: the global mode).
        quant_formula: the deploy ``Quant`` formula, ``"caffe"`` (default) or ``"ascend"``.

    Returns:
        One :class:`BlobAgreement` per blob of both nets, in the deploy net's blob order.

    Raises:
        ModelFormatError: ``deploy_weights`` is not a deploy caffemodel, or a model cannot be loaded.
        RuntimeEngineError: an input blob has no entry in ``inputs``.
    """
    fake = _load(fake_model, fake_weights, device)
    deploy = load_net(deploy_model, deploy_weights, TEST, device=device, quant_formula=quant_formula,
                      require_deploy=True)
    feed_inputs(fake, inputs, "fake-quant")
    feed_inputs(deploy, inputs, "deploy")
    with torch.no_grad():
        fake.run()
        deploy.run()
    scales = integer_blob_scales(deploy.engine_layers)
    steps = output_steps(deploy)
    for blob, scale in scales.items():
        if scale.kind == "codes":
            steps.setdefault(blob, np.asarray(scale.scale, dtype=np.float64))
    writers = _writers(deploy)
    outputs = set(deploy.outputs)
    fake_blobs = set(fake.blob_names)
    rows: list[BlobAgreement] = []
    for name in deploy.blob_names:
        if name not in fake_blobs:
            continue
        value = deploy.tensor(name)
        scale = scales.get(name)
        real = scale.to_real(value) if scale is not None else value
        ref = fake.tensor(name)
        if tuple(ref.shape) != tuple(real.shape):
            LOGGER.warning("compare_models: blob '%s' has shape %s in the fake-quant model and %s in the "
                           "deploy model; not compared.", name, tuple(ref.shape), tuple(real.shape))
            continue
        rows.append(_agreement(name, writers.get(name, ""), scale.kind if scale else "real", ref, real,
                               steps.get(name), name in outputs))
    return rows


def format_agreement(rows: list[BlobAgreement]) -> str:
    """A plain-text table of :func:`compare_models` rows (one line per blob)."""
    lines = [f"{'blob':<32} {'kind':<11} {'max_abs':>11} {'max_lsb':>9} {'cosine':>10} {'rel_err':>10} "
             f"{'flips':>6}"]
    for r in rows:
        lsb = f"{r.max_lsb:9.3f}" if r.max_lsb is not None else f"{'-':>9}"
        flips = f"{r.flips:6d}" if r.flips is not None else f"{'-':>6}"
        mark = " (output)" if r.is_output else ""
        lines.append(f"{r.blob:<32} {r.kind:<11} {r.max_abs_diff:11.4g} {lsb} {r.cosine:10.7f} "
                     f"{r.rel_err:10.3g} {flips}{mark}")
    return "\n".join(lines)
