"""Optional post-training refinements of the PTQ models: bias correction, learned rounding, end-to-end codes.

Off by default (``save_model``'s ``refine=None`` writes exactly AMCT's models). ``refine`` is one name or a
list of names: at most one of the three weight refinements below, optionally with ``"equalization"``
(``workflows.equalize``), which always runs first. With
``refine="bias_correction"`` the float bias of every quantized Convolution/Deconvolution/InnerProduct that
has one is shifted, per output channel, by the mean difference between the float model's output of that
layer and the fake-quant model's output of it on the calibration data:

    b'_c = b_c + mean over (batch, spatial) of (y_float - y_fakequant)_c

Quantization noise of the weights and the input has a non-zero mean per channel (the rounding of a fixed
weight is the same for every input); the shift removes that mean. The layers are corrected in file order
in one pass over all the calibration batches together: a layer's difference is measured with every layer
before it already corrected, so a correction never counts the error an earlier one removed.

The saved models keep their structure: only the float bias changes, and the deploy bias is the usual
``round(b' / (s_d * s_w))`` in INT32 (a corrected bias that leaves INT32 fails like any other). Layers
without a bias (``bias_term: false``) and AVE Pooling are left as they are: adding a bias would change the
layer.

With ``refine="adaround"`` the INT8 weight codes of every quantized Convolution/Deconvolution/InnerProduct
are chosen, per weight, between ``floor`` and ``ceil`` of ``w / s_w`` on ARQ's grid (the record's ``s_w``,
unchanged) to minimise the mean squared difference between the layer's output with its fake-quantized input
and the float model's output of that layer on the calibration data (``quant.adaround``). The layers are
done in file order, each one measured with the earlier ones already rounded, a fixed number of Adam steps
each on all calibration batches together (no sampling, so the result is deterministic). A layer keeps
ARQ's codes when the learned ones do not lower its output error. Only the codes change: scales, biases,
layers and formats are those of the plain save.

With ``refine="end_to_end"`` the INT8 weight codes and the float biases of every quantized
Convolution/Deconvolution/InnerProduct are trained together, with the whole fake-quant model in the loop,
against the float model's outputs on the calibration data (``end_to_end``): each layer holds a latent weight
``u`` in code units (starting at ``w / s_w``, so the first step's codes are ARQ's) and its float bias; the
forward uses exactly what the saved models will hold (``s_w * clamp(round(u), -128, 127)``, the bias on its
``s_d * s_w`` grid, every input through its ``Quant`` layer with the record's factors), the backward treats
each rounding as the identity (``quant.ste_codes``). So a layer's codes see, and can partly compensate, the
activation rounding of every layer before it, which the layer-wise objective of ``adaround`` cannot. Adam
runs a fixed number of steps, each over all calibration batches (gradients summed, one batch in memory at a
time), the learning rates falling to 0 on a cosine; the step whose loss (the mean squared difference of
the outputs, each batch weighted by its sample count) is lowest wins, and the first step is ARQ's codes
with the record's biases, so the result is never worse on the calibration data. Scales, offsets, layers
and formats are those of the plain save; only the INT8 weights and the INT32 bias codes change. See
docs/design.md, "Post-training refinement".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from amct_caffe.engine.device import full_float32
from amct_caffe.engine.layers.vision import Convolution, Deconvolution, InnerProduct
from amct_caffe.engine.net import Net
from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.phase import TEST
from amct_caffe.model.weights import Weights
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.adaround import (
    annealed_beta,
    hard_codes,
    nearest_codes,
    rounding_penalty,
    rounding_start,
    soft_weight,
)
from amct_caffe.quant.numerics import deq_scale, fake_quant_bias
from amct_caffe.quant.ste_codes import final_codes, ste_bias, ste_codes

LOGGER = get_logger("ptq.refine")

#: The weight refinements ``save_model`` accepts (at most one per save).
REFINEMENTS = ("bias_correction", "adaround", "end_to_end")
#: The refinement that rescales channels before any of them (``workflows.equalize``).
EQUALIZATION = "equalization"
#: Adam steps per layer of ``refine="adaround"``, its learning rate on ``v``, the weight of the rounding
#: penalty, and the share of the steps run without the penalty first.
ADAROUND_STEPS = 300
ADAROUND_LR = 1e-2
ADAROUND_PENALTY = 0.01
ADAROUND_WARMUP = 0.2
#: Adam steps of ``refine="end_to_end"`` and its learning rates (latent weights in code units, float
#: biases), both falling to 0 on a cosine.
E2E_STEPS = 150
E2E_LR = 0.03
E2E_BIAS_LR = 1e-3
_BIASED_TYPES = ("Convolution", "Deconvolution", "InnerProduct")


@dataclass(frozen=True)
class RefinePlan:
    """What ``save_model``'s ``refine`` asks for.

    Attributes:
        equalize: run cross-layer range equalization first (``workflows.equalize``).
        weights: the weight refinement after it (one of :data:`REFINEMENTS`), or None.
    """

    equalize: bool
    weights: str | None


def refine_plan(
    refine: str | Sequence[str] | None, data: Sequence[Mapping[str, np.ndarray]] | None, api: str,
    need_data: bool = True,
) -> RefinePlan | None:
    """The plan of ``refine``: None, one name, or a list/tuple of names holding at most one of
    :data:`REFINEMENTS` and :data:`EQUALIZATION` at most once (equalization always runs first).
    ``need_data=False`` checks the names only (the data comes later).

    Raises:
        ConfigError: an unknown name, two weight refinements, a repeated name, or a refinement without
            calibration data.
    """
    if refine is None:
        return None
    names = [refine] if isinstance(refine, str) else list(refine) if isinstance(refine, (list, tuple)) else []
    known = (EQUALIZATION, *REFINEMENTS)
    valid = all(isinstance(n, str) and n in known for n in names) and len(set(names)) == len(names)
    if not names or not valid:
        raise ConfigError(f"{api}: refine must be None, one of {list(known)}, or a list of them with "
                          f"'{EQUALIZATION}' and at most one other, got {refine!r}.")
    chosen = [n for n in names if n in REFINEMENTS]
    if len(chosen) > 1:
        raise ConfigError(f"{api}: refine holds {chosen}; give at most one of {list(REFINEMENTS)} (each one "
                          f"replaces the others' weights), with or without '{EQUALIZATION}'.")
    if need_data and not data:
        raise ConfigError(
            f"{api}: refine={refine!r} needs calibration_data: the input batches the calibration ran, as a "
            "list of {input blob name: array} dicts (the same arrays given to net.forward)."
        )
    return RefinePlan(EQUALIZATION in names, chosen[0] if chosen else None)


def _stack(
    data: Sequence[Mapping[str, np.ndarray]], inputs: Sequence[str], api: str
) -> dict[str, torch.Tensor]:
    """All batches as one batch per input blob."""
    out = {}
    for name in inputs:
        try:
            arrays = [np.asarray(batch[name], dtype=np.float32) for batch in data]
        except KeyError:
            raise ConfigError(f"{api}: a calibration_data batch has no array for the input blob '{name}'; "
                              f"every batch needs all of {list(inputs)}.") from None
        out[name] = torch.from_numpy(np.concatenate(arrays, axis=0))
    return out


def _layer_net(net: caffe_pb2.NetParameter, weights: caffe_pb2.NetParameter) -> Net:
    engine = Net(net, TEST, weights=weights)
    engine.optimize = False  # layer by layer: a quantized layer's output is read before in-place layers
    return engine


def _fed_layer_nets(
    float_net: caffe_pb2.NetParameter, float_weights: caffe_pb2.NetParameter,
    fake_net: caffe_pb2.NetParameter, fake_weights: caffe_pb2.NetParameter,
    data: Sequence[Mapping[str, np.ndarray]], api: str,
) -> tuple[Net, Net]:
    """The float and fake-quant nets, run layer by layer, both holding all calibration batches as one."""
    reference = _layer_net(float_net, float_weights)
    fake = _layer_net(fake_net, fake_weights)
    stacked = _stack(data, reference.inputs, api)
    for net in (reference, fake):
        for name, value in stacked.items():
            net.set_tensor(name, value.to(net.device))
    return reference, fake


def _channel_means(diff: torch.Tensor) -> np.ndarray:
    """Mean over every axis but 1 (the output channels of Convolution/Deconvolution/InnerProduct)."""
    axes = [a for a in range(diff.dim()) if a != 1]
    return diff.to(torch.float64).mean(dim=axes).numpy() if axes else diff.to(torch.float64).numpy()


def bias_correction(
    float_net: caffe_pb2.NetParameter,
    float_weights: caffe_pb2.NetParameter,
    fake_net: caffe_pb2.NetParameter,
    fake_weights: caffe_pb2.NetParameter,
    layers: Mapping[str, tuple[float, np.ndarray]],
    weights: Weights,
    data: Sequence[Mapping[str, np.ndarray]],
    api: str = "save_model",
) -> Weights:
    """The float weights with the bias of each of ``layers`` corrected (module docstring).

    Args:
        float_net, float_weights: the folded float model (what the saved models are built from).
        fake_net, fake_weights: its fake-quant model (the Quant/DeQuant layers inserted).
        layers: the quantized layers (file order) with their ``(scale_d, scale_w)``: the fake-quant model
            holds the bias ``round(b / (scale_d * scale_w)) * scale_d * scale_w``, so a corrected bias is
            put on that grid before the layers after it are measured, as the saved model will hold it.
        weights: the float weights by layer name (not changed; the result is a new mapping).
        data: the calibration batches ``{input blob: array}``.

    Returns:
        A copy of ``weights`` whose corrected layers have a new bias array.

    Raises:
        ConfigError: a batch lacks an input blob.
    """
    reference, fake = _fed_layer_nets(float_net, float_weights, fake_net, fake_weights, data, api)
    targets = {name for name in layers
               if name in weights and len(weights[name]) > 1
               and fake.engine_layers[fake.layer_index(name)].type_name in _BIASED_TYPES}
    skipped = [name for name in layers if name not in targets]
    if skipped:
        LOGGER.info("Bias correction: layer(s) %s have no bias (or are AVE Pooling); left as they are.",
                    skipped)
    corrected: Weights = {name: list(blobs) for name, blobs in weights.items()}
    ref_index = {name: i for i, name in enumerate(reference.layer_names)}
    done = 0
    with torch.no_grad():
        for i, name in enumerate(tqdm(fake.layer_names, desc="bias correction", disable=None)):
            fake.run(i, i)
            if name not in targets:
                continue
            j = ref_index[name]
            reference.run(done, j)
            done = j + 1
            top = reference.layer_tops[j][0]
            shift = _channel_means(reference.tensor(top) - fake.tensor(fake.layer_tops[i][0]))
            # the shift was measured with the bias the fake-quant model holds (on the quantization grid), so
            # it corrects that value, not the float bias before its rounding
            bias = fake.engine_layers[i].blobs[1]
            held = bias.detach().cpu().numpy().astype(np.float64).reshape(-1)
            new_bias = (held + shift.reshape(-1)).astype(np.float32)
            corrected[name][1] = new_bias.reshape(corrected[name][1].shape)
            scale_d, scale_w = layers[name]
            on_grid = fake_quant_bias(new_bias, np.float32(scale_d), scale_w, name)
            bias.copy_(on_grid.reshape(bias.shape).to(bias))
            fake.run(i, i)  # later layers see the corrected output
            LOGGER.debug("Bias correction of '%s': mean |shift| %.3g.", name, float(np.abs(shift).mean()))
    LOGGER.info("Bias correction: %d layer(s) corrected on %d calibration batch(es).", len(targets),
                len(data))
    return corrected


#: The layer classes whose weights learned rounding chooses codes for.
WeightedLayer = Convolution | Deconvolution | InnerProduct


def _mse(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((y - ref) ** 2).mean()


def _scale_view(scale_w: np.ndarray, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``scale_w`` shaped to broadcast along ``axis`` of ``weight`` (a single scale as a scalar)."""
    s = torch.as_tensor(np.asarray(scale_w, np.float32), device=weight.device)
    if s.numel() == 1:
        return s.reshape([1] * weight.dim())
    shape = [1] * weight.dim()
    shape[axis] = -1
    return s.reshape(shape)


def learn_rounding(
    layer: WeightedLayer, x: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    scale: torch.Tensor, steps: int = ADAROUND_STEPS,
) -> tuple[torch.Tensor, float, float]:
    """The codes of ``weight`` (``floor`` or ``ceil`` of ``weight / scale``) that bring ``layer.apply(x, .)``
    closest to ``ref``; ARQ's nearest codes when the learned ones are not closer.

    Returns:
        ``(codes, error of ARQ's codes, error of the returned codes)``, errors as mean squared differences.
    """
    floor, span, v0 = rounding_start(weight, scale)
    v = v0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=ADAROUND_LR)
    warmup = int(ADAROUND_WARMUP * steps)
    for step in tqdm(range(steps), desc=f"adaround {layer.name}", leave=False, disable=None):
        loss = _mse(layer.apply(x, soft_weight(floor, span, v, scale), bias), ref)
        if step >= warmup:
            loss = loss + ADAROUND_PENALTY * rounding_penalty(v, annealed_beta(step - warmup, steps - warmup))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nearest = nearest_codes(weight, scale)
        learned = hard_codes(floor, span, v.detach())
        before = float(_mse(layer.apply(x, nearest * scale, bias), ref))
        after = float(_mse(layer.apply(x, learned * scale, bias), ref))
    return (learned, before, after) if after < before else (nearest, before, before)


def adaround(
    float_net: caffe_pb2.NetParameter,
    float_weights: caffe_pb2.NetParameter,
    fake_net: caffe_pb2.NetParameter,
    fake_weights: caffe_pb2.NetParameter,
    layers: Mapping[str, tuple[np.ndarray, int]],
    weights: Weights,
    data: Sequence[Mapping[str, np.ndarray]],
    api: str = "save_model",
    steps: int = ADAROUND_STEPS,
) -> dict[str, np.ndarray]:
    """Learned INT8 weight codes of ``layers`` (module docstring).

    Args:
        float_net, float_weights: the folded float model (what the saved models are built from).
        fake_net, fake_weights: its fake-quant model (the Quant/DeQuant layers inserted).
        layers: the quantized layers with weights (file order), each with ``(scale_w, output-channel axis)``.
        weights: the float weights by layer name (not changed).
        data: the calibration batches ``{input blob: array}``.
        steps: Adam steps per layer.

    Returns:
        ``{layer name: int8 codes}`` for every layer of ``layers`` of type Convolution, Deconvolution or
        InnerProduct (ARQ's codes where learning did not help).

    Raises:
        ConfigError: a batch lacks an input blob.
    """
    reference, fake = _fed_layer_nets(float_net, float_weights, fake_net, fake_weights, data, api)
    targets = {name for name in layers if name in weights
               and fake.engine_layers[fake.layer_index(name)].type_name in _BIASED_TYPES}
    ref_index = {name: i for i, name in enumerate(reference.layer_names)}
    codes: dict[str, np.ndarray] = {}
    done = 0
    for i, name in enumerate(tqdm(fake.layer_names, desc="adaround", disable=None)):
        if name in targets:
            j = ref_index[name]
            with torch.no_grad():
                reference.run(done, j)
            done = j + 1
            layer = fake.engine_layers[i]
            assert isinstance(layer, (Convolution, Deconvolution, InnerProduct))
            x = fake.tensor(fake.layer_bottoms[i][0]).detach()
            ref = reference.tensor(reference.layer_tops[j][0]).detach()
            weight = torch.as_tensor(np.asarray(weights[name][0], np.float32), device=x.device)
            scale_w, axis = layers[name]
            scale = _scale_view(scale_w, weight, axis)
            bias = layer.blobs[1].detach() if len(layer.blobs) > 1 else None
            learned, before, after = learn_rounding(layer, x, ref, weight, bias, scale, steps)
            codes[name] = learned.cpu().numpy().astype(np.int8)
            with torch.no_grad():
                layer.blobs[0].copy_((learned * scale).to(layer.blobs[0]))  # later layers see these codes
            LOGGER.info("Learned rounding of '%s': output MSE %.4g -> %.4g.", name, before, after)
        with torch.no_grad():
            fake.run(i, i)
    LOGGER.info("Learned rounding: %d layer(s) on %d calibration batch(es), %d steps each.", len(codes),
                len(data), steps)
    return codes


# -- end-to-end learned codes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeLayer:
    """A quantized layer whose INT8 codes the end-to-end refinement learns: its record factors."""

    scale_d: float
    scale_w: np.ndarray
    axis: int


@dataclass
class _Latent:
    """One layer's trained values: latent weights in code units, the float bias, their grids."""

    layer: WeightedLayer
    scale: torch.Tensor
    u: torch.Tensor
    bias: torch.Tensor | None
    bias_step: torch.Tensor | None

    def weight(self) -> torch.Tensor:
        return self.scale * ste_codes(self.u)

    def quantized_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.bias_step is None:
            return None
        return ste_bias(self.bias, self.bias_step)


def _bias_step(scale_d: float, scale_w: np.ndarray, bias: torch.Tensor) -> torch.Tensor:
    """``s_d * s_w`` per channel (the bias grid, the deploy model's ``deq_scale``) shaped like ``bias``."""
    step = deq_scale(np.float32(scale_d), np.asarray(scale_w, np.float32))
    return step.to(bias).expand(bias.numel()).reshape(bias.shape).clone()


def _graph_forward(
    net: Net, inputs: Mapping[str, torch.Tensor], latents: Mapping[str, _Latent]
) -> dict[str, torch.Tensor]:
    """The outputs of ``net`` on ``inputs`` with autograd: the layers of ``latents`` use their trained
    weights and biases, every other layer (Quant with its straight-through backward included) its own
    forward. Layers without bottoms that make only fed blobs (the data layers) are skipped."""
    values: dict[str, torch.Tensor] = dict(inputs)
    for i, layer in enumerate(net.engine_layers):
        bottoms, tops = net.layer_bottoms[i], net.layer_tops[i]
        if not bottoms and all(top in values for top in tops):
            continue
        xs = [values[name] for name in bottoms]
        latent = latents.get(net.layer_names[i])
        if latent is None:
            outs = layer.forward(xs)
        else:
            weight, bias = latent.weight(), latent.quantized_bias()
            outs = [latent.layer.apply(x, weight, bias) for x in xs]
        values.update(zip(tops, outs))
    return {name: values[name] for name in net.outputs}


def calibration_batches(data: Sequence[Mapping[str, np.ndarray]], inputs: Sequence[str], device: torch.device,
                        api: str) -> list[dict[str, torch.Tensor]]:
    """The calibration batches as tensors on ``device`` (one dict per batch)."""
    return [{name: tensor.to(device) for name, tensor in _stack([batch], inputs, api).items()}
            for batch in data]


def _latents(fake: Net, layers: Mapping[str, CodeLayer], weights: Weights) -> dict[str, _Latent]:
    """Each layer's trainable values, starting at the float weight ``w / s_w`` (so the first step's codes
    are ARQ's) and the bias the fake-quant model holds."""
    latents = {}
    for name, info in layers.items():
        layer = fake.engine_layers[fake.layer_index(name)]
        if name not in weights or not isinstance(layer, (Convolution, Deconvolution, InnerProduct)):
            continue
        weight = torch.as_tensor(np.asarray(weights[name][0], np.float32), device=fake.device)
        scale = _scale_view(info.scale_w, weight, info.axis)
        bias = bias_step = None
        if len(layer.blobs) > 1:
            bias = layer.blobs[1].detach().clone().requires_grad_(True)
            bias_step = _bias_step(info.scale_d, info.scale_w, bias)
        latents[name] = _Latent(layer, scale, (weight / scale).requires_grad_(True), bias, bias_step)
    return latents


def _snapshot(latents: Mapping[str, _Latent]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {name: (final_codes(lat.u).clone(),
                   None if lat.bias is None else lat.bias.detach().clone()) for name, lat in latents.items()}


def end_to_end(
    float_net: caffe_pb2.NetParameter,
    float_weights: caffe_pb2.NetParameter,
    fake_net: caffe_pb2.NetParameter,
    fake_weights: caffe_pb2.NetParameter,
    layers: Mapping[str, CodeLayer],
    weights: Weights,
    data: Sequence[Mapping[str, np.ndarray]],
    api: str = "save_model",
    steps: int = E2E_STEPS,
) -> tuple[Weights, dict[str, np.ndarray]]:
    """Learned INT8 codes and float biases of ``layers`` against the float model's outputs, the whole
    fake-quant model in the loop (module docstring).

    Args:
        float_net, float_weights: the folded float model (what the saved models are built from).
        fake_net, fake_weights: its fake-quant model (the Quant/DeQuant layers inserted).
        layers: the quantized layers with weights, each with its record factors.
        weights: the float weights by layer name (not changed; the result is a new mapping).
        data: the calibration batches ``{input blob: array}``.
        steps: Adam steps, each on every calibration batch (gradients summed over the batches).

    Returns:
        ``(weights, codes)``: a copy of ``weights`` whose trained layers with a bias hold the learned float
        bias, and ``{layer name: int8 codes}`` of the trained layers. The step with the lowest loss wins;
        the first step's loss is that of ARQ's codes and the record's bias, so the result is never worse
        on the calibration data.

    Raises:
        ConfigError: a batch lacks an input blob.
    """
    reference = Net(float_net, TEST, weights=float_weights)
    fake = Net(fake_net, TEST, weights=fake_weights)
    for layer in fake.engine_layers:
        for blob in layer.blobs:
            blob.requires_grad_(False)
    batches = calibration_batches(data, reference.inputs, fake.device, api)
    targets = []
    with torch.no_grad():
        for batch in batches:
            for name, value in batch.items():
                reference.set_tensor(name, value)
            reference.reshape()
            reference.run()
            targets.append({name: reference.tensor(name).detach().clone() for name in reference.outputs})
    latents = _latents(fake, layers, weights)
    groups: list[dict[str, Any]] = [{"params": [lat.u for lat in latents.values()], "lr": E2E_LR}]
    biases = [lat.bias for lat in latents.values() if lat.bias is not None]
    if biases:
        groups.append({"params": biases, "lr": E2E_BIAS_LR})
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    count = sum(next(iter(batch.values())).shape[0] for batch in batches)

    def loss_of(batch: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        outs = _graph_forward(fake, batch, latents)
        share = next(iter(batch.values())).shape[0] / count
        losses = [_mse(outs[name], target[name]) for name in target]
        return share * torch.stack(losses).sum()

    best_loss, best = math.inf, _snapshot(latents)
    first = math.nan
    progress = tqdm(range(steps + 1), desc="end-to-end refinement", disable=None)
    for step in progress:
        final = step == steps
        optimizer.zero_grad()
        total = 0.0
        with torch.set_grad_enabled(not final), full_float32(fake.device):
            for batch, target in zip(batches, targets):
                loss = loss_of(batch, target)
                if not final:
                    loss.backward()
                total += float(loss.detach())
        if step == 0:
            first = total
        if total < best_loss:  # the forward holds the hard codes: this loss is the saved model's
            best_loss, best = total, _snapshot(latents)
        progress.set_postfix(loss=f"{total:.4g}")
        if not final:
            optimizer.step()
            schedule.step()
    refined: Weights = {name: list(blobs) for name, blobs in weights.items()}
    codes: dict[str, np.ndarray] = {}
    for name, (chosen, bias) in best.items():
        codes[name] = chosen.cpu().numpy().astype(np.int8)
        if bias is not None:
            refined[name][1] = bias.cpu().numpy().astype(np.float32).reshape(refined[name][1].shape)
    LOGGER.info("End-to-end refinement: %d layer(s), %d calibration batch(es), %d steps; output MSE %.4g -> "
                "%.4g.", len(codes), len(data), steps, first, best_loss)
    return refined, codes
