"""Agreement of the fake-quant model (float emulation) and the deploy model (integer emulation).

:func:`compare_models` runs both saved models of ``save_quant_retrain_model`` in the engine on the same
inputs and reports, for every blob both nets have, how far apart they are. The deploy net's blobs are read
as real values first (:mod:`amct_caffe.analysis.collect`): a Quant top holds INT8 codes, read as
``(q - o_d) * s_d``; a quantized layer's top (``<L>_dequant_layer_in``) holds the INT32 accumulator, read as
``acc * deq_scale``; every other blob is already real.

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
flips of the other reading. :func:`amct_caffe.analysis.render.format_agreement` prints the rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from amct_caffe.analysis.collect import DEFAULT_QUANT_FORMULA, BlobPair, ModelArg, fake_deploy_pairs
from amct_caffe.analysis.metrics import AgreementStats
from amct_caffe.analysis.results import BlobAgreement


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
        One :class:`~amct_caffe.analysis.results.BlobAgreement` per blob of both nets, in the deploy net's
        blob order (a blob whose shapes differ is logged and left out).

    Raises:
        ModelFormatError: ``deploy_weights`` is not a deploy caffemodel, or a model cannot be loaded.
        RuntimeEngineError: an input blob has no entry in ``inputs``.
    """
    pairs = fake_deploy_pairs(fake_model, fake_weights, deploy_model, deploy_weights, inputs, device=device,
                              quant_formula=quant_formula)
    return [_agreement(pair) for pair in pairs]


def _agreement(pair: BlobPair) -> BlobAgreement:
    stats = AgreementStats(pair.step)
    stats.add(pair.fake, pair.deploy)
    m = stats.metrics()
    step = None if pair.step is None else float(np.min(pair.step))
    return BlobAgreement(pair.blob, pair.layer, pair.kind, tuple(int(d) for d in pair.fake.shape), m.max_abs,
                         step, m.max_lsb, m.cosine, m.rel_err, pair.is_output,
                         m.over_half_step if pair.kind == "codes" else None)
