"""AMCT's quantization layers: the QAT retrain layers and the fake-quant model's layers.

* ``ActivationQAT`` (``retrain_data_quant_param``): ULQ activation fake quantization with two learnable
  clip blobs ``[clip_max (1), clip_min (1)]``.
* ``WeightQAT`` (``retrain_weight_quant_param``): passes its bottom through and rewrites ``blobs[0]`` with
  the ARQ fake quantization of the float shadow weight ``blobs[1]`` on every forward; the quantized layer
  convolves ``blobs[0]`` through ``param { name }`` sharing, and ``blobs[1]`` receives ``blobs[0]``'s
  gradient (straight-through estimator).
* ``Quant`` (``quant_param``), ``DeQuant`` (``dequant_param``), ``AntiQuant``: the float ("fake-quant")
  versions of the layers the saved models carry. Their backward is the identity.

The formulas live in :mod:`amct_caffe.quant` (ULQ, ClipCheck, ARQ, IFMR, rounding); these layers only
wire them to blobs and phases. Every piece of state a layer keeps is declared in its ``__init__``; the
record file's shapes are written by :class:`amct_caffe.engine.record_shapes.RecordShapesHook`, a step the
solver runs after a forward, never by a forward itself. Integer (deploy) emulation is elsewhere.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from amct_caffe.engine import distributed
from amct_caffe.engine.layers.base import TRAIN, Layer, Tensor
from amct_caffe.engine.layers.registry import register
from amct_caffe.errors import AmctError, UnsupportedLayerError
from amct_caffe.log import get_logger
from amct_caffe.model.layer_types import ACTIVATION_QAT, ANTI_QUANT, DEQUANT, QUANT, WEIGHT_QAT
from amct_caffe.proto import caffe_pb2
from amct_caffe.quant.arq import WEIGHT_CHANNEL_AXIS, arq_fake_quant
from amct_caffe.quant.ifmr import ifmr, ifmr_to_clips
from amct_caffe.quant.numerics import (
    INT16_MAX,
    INT16_MIN,
    offset_byte,
    quant_codes,
    quant_step,
    round_away,
)
from amct_caffe.quant.ulq import ULQFunction, clip_check

LOGGER = get_logger("engine.layers.quant")


def _unsupported(layer: Layer, message: str) -> UnsupportedLayerError:
    """An UnsupportedLayerError naming the layer: a valid parameter this engine does not implement."""
    return UnsupportedLayerError(f"Layer '{layer.name}' (type {layer.type_name}): {message}")


def _with_layer(layer: Layer, exc: AmctError) -> AmctError:
    """The same kind of error with the layer named in front of the message."""
    return type(exc)(f"Layer '{layer.name}' (type {layer.type_name}): {exc}")


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` forward, identity backward: the fake-quant layers' Caffe backward (copy top diff)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None]:
        return dy, None


def _straight_through(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, fn)
    return fn(x)


# ---------------------------------------------------------------------------------------------------
# ActivationQAT
# ---------------------------------------------------------------------------------------------------
@dataclass
class ClipInit:
    """Whether a pair of clip blobs holds real values: configured, loaded from a caffemodel, or set by IFMR.

    It belongs with the clip tensors, not with one layer: every ``ActivationQAT`` using the same tensors (a
    solver's test net uses the train net's, see ``Layer.blobs_shared``) holds the same ``ClipInit``, so the
    clips are initialised once, by whichever net runs first, and never again.
    """

    done: bool


@register(ACTIVATION_QAT)
class ActivationQAT(Layer):
    """ULQ activation retrain layer.

    Blobs: ``[clip_max (shape [1]), clip_min (shape [1])]``, initialised from ``clip_max``/``clip_min`` of
    the parameter. Forward, in TRAIN and TEST alike:

    1. ``input_shape`` becomes the bottom's shape (what the record file's shapes are taken from);
    2. ClipCheck of the blobs against the previous good values (``previous_clips``); the accepted values
       are written back into the blobs (as AMCT writes the blob data; in place under no_grad, and only when
       a value changes, so the blobs' version counters stay put otherwise);
    3. ``ifmr_init`` and the clips are not real yet (``clip_init.done`` false): IFMR on this batch gives
       ``(s, o)`` and ``cmin = -(o - INT8_MIN) s``, ``cmax = cmin + DATA_SPAN s`` (AMCT's GPU order), which
       also become the previous good values (AMCT keeps the parameter defaults there; restoring a flipped
       clip pair to the IFMR values instead of 3/0 is the useful reading);
    4. ``fixed_min``: the ``clip_min`` blob is set to 0;
    5. ``y = ULQFunction(x, clip_max, clip_min, fixed_min)`` -- gradients reach both blobs.

    While the net runs a shape pass (``self.reshaping``) the layer passes its bottom through and changes
    nothing. ``blobs_loaded()`` (called by ``Net.copy_from``) marks the clips as real, so a layer whose
    blobs came from a caffemodel never re-initialises; ``blobs_shared(source)`` adopts ``source``'s
    :class:`ClipInit` with its tensors.

    Attributes:
        ifmr_init, fixed_min, clip_max_init, clip_min_init: the parameter's settings.
        object_layers: the quantized layers this activation feeds (``object_layer`` split at ``-``).
        record_file_path: AMCT's record file named in the parameter ("" when none).
        clip_init: whether the clip blobs hold real values (shared with layers sharing the blobs).
        previous_clips: ClipCheck's last good ``(clip_max, clip_min)``; set by ``setup``.
        input_shape: the bottom's shape at the last real forward; None before the first.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.retrain_data_quant_param
        if not p.with_offset:
            raise _unsupported(
                self,
                "retrain_data_quant_param.with_offset: false (symmetric activations) is not supported; QAT "
                "activations are asymmetric. Remove the field or set it to true.",
            )
        self.ifmr_init = bool(p.ifmr_init)
        self.fixed_min = bool(p.fixed_min)
        self.clip_max_init = float(p.clip_max)
        self.clip_min_init = float(p.clip_min)
        if not self.ifmr_init:
            self._check_configured_clips()
        self.object_layers = [n for n in p.object_layer.split("-") if n]
        self.record_file_path = p.record_file_path
        self.clip_init = ClipInit(done=not self.ifmr_init)
        self.previous_clips: tuple[Tensor, Tensor] | None = None
        self.input_shape: tuple[int, ...] | None = None

    def _check_configured_clips(self) -> None:
        cmax, cmin = self.clip_max_init, self.clip_min_init
        if not (math.isfinite(cmax) and math.isfinite(cmin) and cmax > cmin):
            raise self.error(
                f"retrain_data_quant_param has clip_max {cmax} and clip_min {cmin}; they must be finite "
                "with clip_max > clip_min (or set ifmr_init: true to initialise them from data)."
            )
        if self.fixed_min and cmax <= 0.0:
            raise self.error(
                f"fixed_min: true needs clip_max > 0 (got {cmax}), because clip_min is held at 0."
            )

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        clip_max = caffe_pb2.FillerParameter(type="constant", value=self.clip_max_init)
        clip_min = caffe_pb2.FillerParameter(type="constant", value=self.clip_min_init)
        self.blobs = [self.new_blob([1], clip_max), self.new_blob([1], clip_min)]
        self.previous_clips = (self.blobs[0].detach().clone(), self.blobs[1].detach().clone())

    def blobs_loaded(self) -> None:
        """The net copied this layer's blobs from a caffemodel: the clips are real, never re-initialise."""
        self.clip_init.done = True

    def blobs_shared(self, source: Layer) -> None:
        """This layer now uses ``source``'s clip tensors: it shares their :class:`ClipInit` too."""
        if isinstance(source, ActivationQAT):
            self.clip_init = source.clip_init

    @property
    def clips_ready(self) -> bool:
        """True when the clip blobs hold real values (configured, loaded, shared-and-ready, or IFMR done)."""
        return self.clip_init.done

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if self.reshaping:
            return [x]
        self.input_shape = tuple(int(d) for d in x.shape)
        with torch.no_grad():
            self._update_clips(x)
        return [ULQFunction.apply(x, self.blobs[0], self.blobs[1], self.fixed_min)]

    # -- steps -----------------------------------------------------------------------------------------
    def _update_clips(self, x: Tensor) -> None:
        """Steps 2-4: ClipCheck, IFMR initialisation, fixed_min; the blobs are written in place (under
        no_grad) only where their value changes, so their version counters -- which autograd checks and
        the TEST-phase plan uses to refresh cached weights -- move only then."""
        cmax, cmin = self.blobs
        previous = self.previous_clips
        if previous is None:
            raise self.error("forward before setup: the net sets a layer up before running it.")
        result = clip_check(cmax.detach(), cmin.detach(), *previous)
        new_max, new_min = result.clip_max.reshape(cmax.shape), result.clip_min.reshape(cmin.shape)
        self.previous_clips = (result.clip_max_pre, result.clip_min_pre)
        ready = self.clip_init.done
        if not ready:
            new_max, new_min = self._ifmr_clips(x, cmax.shape)
        if self.fixed_min:
            new_min = torch.zeros_like(new_min)
        flags = torch.stack([result.flipped.any(), (new_max != cmax).any(), (new_min != cmin).any()])
        flipped, max_changed, min_changed = flags.tolist()
        if flipped and ready:
            LOGGER.warning(
                "Layer '%s': clip_max <= clip_min after the update; restored the previous values "
                "(clip_max %s, clip_min %s).",
                self.name,
                float(result.clip_max.reshape(-1)[0]),
                float(result.clip_min.reshape(-1)[0]),
            )
        if max_changed:
            cmax.copy_(new_max)
        if min_changed:
            cmin.copy_(new_min)

    def _statistics_input(self, x: Tensor) -> Tensor:
        """What IFMR initialises the clips from: this batch, or in a data-parallel TRAIN run every worker's
        batch (so all workers start from the same clips, those one worker with the whole batch would get)."""
        if self.phase == TRAIN:
            return distributed.gather(x)
        return x.detach()

    def _ifmr_clips(self, x: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Step 3: clips from IFMR on this batch; they also become the previous good values."""
        try:
            s, o = ifmr(self._statistics_input(x))
        except AmctError as exc:
            raise _with_layer(self, exc) from exc
        cmin, cmax = ifmr_to_clips(s, o)
        cmax = cmax.reshape(shape).to(self.blobs[0].dtype)
        cmin = cmin.reshape(shape).to(self.blobs[1].dtype)
        self.previous_clips = (cmax.clone(), cmin.clone())
        self.clip_init.done = True
        if not bool(x.detach().any()):
            LOGGER.warning(
                "Layer '%s': IFMR initialised the clips from an all-zero input, so they fit no real data. "
                "The net's inputs were zeros: a retrain model made from a deploy prototxt (no data layer) "
                "trains on nothing. Build the retrain model from the training prototxt with its data layers, "
                "or feed real data before the first forward.", self.name)
        LOGGER.info(
            "Layer '%s': clips initialised by IFMR: clip_max %.9g, clip_min %.9g.",
            self.name,
            float(cmax.reshape(-1)[0]),
            float(cmin.reshape(-1)[0]),
        )
        return cmax, cmin


# ---------------------------------------------------------------------------------------------------
# WeightQAT
# ---------------------------------------------------------------------------------------------------
class ShadowGradientLink:
    """The straight-through link of ``WeightQAT``: one gradient hook on the fake-quantized weight tensor
    (``blobs[0]``) that adds every incoming gradient to the owning layer's shadow weight (``blobs[1]``).

    It belongs with the weight tensor: layers using the same tensors (``Layer.blobs_shared``) hold the same
    link, so the tensor carries one hook whatever the number of nets sharing it, and the TRAIN-phase layer
    that ran last owns it. When the owner's ``blobs[0]`` becomes another tensor (weight sharing,
    ``ParamBlob.reshape``), the next :meth:`attach` moves the hook to it. The link holds the tensor and the
    owner weakly, so neither is kept alive by the other.
    """

    def __init__(self) -> None:
        self._tensor: weakref.ref[Tensor] | None = None
        self._handle: RemovableHandle | None = None
        self._owner: weakref.ref[WeightQAT] | None = None

    def attach(self, tensor: Tensor, owner: WeightQAT) -> None:
        """Route ``tensor``'s gradients to ``owner``'s shadow weight from now on."""
        if self._tensor is None or self._tensor() is not tensor:
            if self._handle is not None:
                self._handle.remove()
            self._handle = tensor.register_hook(self._route)
            self._tensor = weakref.ref(tensor)
        self._owner = weakref.ref(owner)

    def _route(self, grad: Tensor) -> None:
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner.add_shadow_grad(grad)


@register(WEIGHT_QAT)
class WeightQAT(Layer):
    """ARQ weight retrain layer.

    Blobs (both of the quantized layer's weight shape): ``[fake-quantized weight, float shadow weight]``.
    The shape comes from ``retrain_weight_quant_param``: ``[cout, cin, h, w]`` for Convolution,
    ``[cin, cout, h, w]`` for Deconvolution (its weight is ``[in, out/group, kh, kw]``; ``cout``/``cin``
    name the weight's axes 1 and 0) and ``[cout, cin]`` for InnerProduct (``h``/``w`` ignored).

    Forward (TRAIN and TEST; nothing while ``self.reshaping``): the bottom passes through unchanged, and
    ``blobs[0]`` is overwritten in place, without autograd, by ``arq_fake_quant(blobs[1])`` -- per output
    channel when ``channel_wise`` (axis 0, or 1 for Deconvolution), else per tensor. The write happens only
    when the value changes, so the tensor's version counter moves only then: the TEST-phase plan's cached
    (folded/packed) convolution weights are refreshed exactly when needed, and a forward of a net sharing
    the blobs (the solver's test net) does not invalidate a TRAIN graph awaiting its backward.

    Straight-through gradient: the quantized layer shares ``blobs[0]`` (``param { name }``), so its weight
    gradient arrives at that tensor. The layer's :class:`ShadowGradientLink` (``ste_link``) hooks the
    tensor (``Tensor.register_hook``) and adds every incoming gradient to ``blobs[1].grad`` as it is
    produced, so plain ``loss.backward()`` fills both ``blobs[0].grad`` and ``blobs[1].grad`` with the same
    values, and repeated backward passes (Caffe's ``iter_size``) accumulate in both alike. (A
    post-accumulate hook would see the running sum instead of each increment.) A TRAIN-phase forward
    attaches the link to the current ``blobs[0]``; a TEST net sharing the tensors never does, so it never
    doubles the gradient. ``blobs[0]`` has ``lr_mult: 0``, so a solver would not make it require grad; the
    layer does that itself whenever the shadow requires grad, or the quantized layer would compute no
    weight gradient at all.

    Attributes:
        layer_type, channel_wise, axis, weight_shape: the parameter's settings.
        ste_link: the straight-through link (shared with layers sharing the blobs).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.retrain_weight_quant_param
        self.layer_type = p.layer_type
        if self.layer_type not in WEIGHT_CHANNEL_AXIS:
            raise self.error(
                f"retrain_weight_quant_param.layer_type is '{self.layer_type}'; it must name the quantized "
                f"layer's type, one of {', '.join(sorted(WEIGHT_CHANNEL_AXIS))}."
            )
        if p.with_offset:
            raise _unsupported(
                self, "retrain_weight_quant_param.with_offset: true is not supported; weights are quantized "
                "symmetrically (offset_w = 0). Remove the field or set it to false."
            )
        self.channel_wise = bool(p.channel_wise)
        if self.channel_wise and self.layer_type == "InnerProduct":
            raise _unsupported(
                self, "InnerProduct weights are quantized per tensor; set "
                "retrain_weight_quant_param { channel_wise: false } (channel-wise scales are only "
                "supported for Convolution and Deconvolution)."
            )
        self.axis = WEIGHT_CHANNEL_AXIS[self.layer_type]
        self.weight_shape = self._weight_shape(p)
        self.ste_link = ShadowGradientLink()

    def _weight_shape(self, p: caffe_pb2.RetrainWeightQuantParameter) -> tuple[int, ...]:
        cout, cin = int(p.cout), int(p.cin)
        if self.layer_type == "InnerProduct":
            shape: tuple[int, ...] = (cout, cin)
        elif self.layer_type == "Deconvolution":
            shape = (cin, cout, int(p.h), int(p.w))
        else:
            shape = (cout, cin, int(p.h), int(p.w))
        if min(shape) <= 0:
            raise self.error(
                f"retrain_weight_quant_param gives the weight shape {shape}; every dim must be > 0."
            )
        return shape

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        self.blobs = [self.new_blob(self.weight_shape), self.new_blob(self.weight_shape)]

    def blobs_loaded(self) -> None:
        """Nothing to do: ``blobs[0]`` is recomputed from the shadow weight on every forward."""

    def blobs_shared(self, source: Layer) -> None:
        """This layer now uses ``source``'s tensors: it shares their straight-through link too."""
        if isinstance(source, WeightQAT):
            self.ste_link = source.ste_link

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        if self.reshaping:
            return [x]
        if self.training:
            self._claim_straight_through()
        try:
            w_hat, _ = arq_fake_quant(self.blobs[1].detach(), self.channel_wise, self.axis)
        except AmctError as exc:
            raise _with_layer(self, exc) from exc
        w = self.blobs[0]
        if not torch.equal(w, w_hat):  # write (and bump the version counter) only when it changes
            with torch.no_grad():
                w.copy_(w_hat)
        return [x]

    def _claim_straight_through(self) -> None:
        """Make ``blobs[0]`` require grad when the shadow does, and route its gradient to this layer."""
        w = self.blobs[0]
        if self.blobs[1].requires_grad and not w.requires_grad and w.is_leaf:
            w.requires_grad_(True)
        if w.requires_grad:
            self.ste_link.attach(w, self)

    def add_shadow_grad(self, grad: Tensor) -> None:
        """Accumulate ``grad`` (a gradient of ``blobs[0]``) into the shadow weight's ``.grad``."""
        shadow = self.blobs[1]
        if not shadow.requires_grad:
            return
        with torch.no_grad():
            g = grad.detach().reshape(shadow.shape).to(dtype=shadow.dtype, device=shadow.device)
            if shadow.grad is None:
                shadow.grad = g.clone()
            else:
                shadow.grad.add_(g)


# ---------------------------------------------------------------------------------------------------
# Fake-quant model layers
# ---------------------------------------------------------------------------------------------------
@register(QUANT)
class Quant(Layer):
    """Activation quantize, float emulation.

    ``quant_param.scale`` is ``1/s_d`` as float32; the layer recovers ``s_d = 1/(double)scale`` and computes
    in double precision ``q = clamp(round_away(x / s_d) + o_d, INT8_MIN, INT8_MAX)``, ``y = (q - o_d) * s_d``
    (rounded to float32 once), with ``o_d`` the first byte of ``quant_param.offset`` (two's complement).
    The offset is used whatever ``with_offset`` says, as ATC's AscendQuant plugin does. Backward: identity.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int, device: torch.device) -> None:
        super().__init__(param, phase, device)
        p = param.quant_param
        scale = float(p.scale)
        if not (math.isfinite(scale) and scale > 0.0):
            raise self.error(
                f"quant_param.scale is {scale}; it must be 1/scale_d, a finite value > 0 (set quant_param "
                "{ scale: ... })."
            )
        self.scale_d = quant_step(scale)
        self.offset_d = offset_byte(p.offset)

    def _quantize(self, x: Tensor) -> Tensor:
        q = quant_codes(x, self.scale_d, self.offset_d)
        return ((q - self.offset_d) * self.scale_d).to(x.dtype)

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return [_straight_through(bottoms[0], self._quantize)]


@register(DEQUANT)
class DeQuant(Layer):
    """Dequantize, float emulation.

    Three blobs ``[deq_scale, shift_bit, offset_w]``, each of shape ``[C]`` (the bottom's channels) when
    ``dequant_param.channel_wise`` and the bottom is 4-D, else ``[1]`` -- the shape rule that decides
    whether a caffemodel's DeQuant blobs load. Forward: the identity when every ``shift_bit`` is 0 (all QAT
    models); when every ``shift_bit`` is an integer in [1, 16], the shift-N requantisation per channel
    ``t = round_away(x / deq)``, ``t = round_away(t / 2^N)``, ``t = clamp(t, INT16_MIN, INT16_MAX)``,
    ``y = t * deq * 2^N``; anything else is an error. ``offset_w`` is not used (always 0). Backward:
    identity.
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottoms: Sequence[Tensor]) -> None:
        x = bottoms[0]
        channels = int(x.shape[1]) if self.param.dequant_param.channel_wise and x.dim() == 4 else 1
        self.blobs = [self.new_blob([channels]) for _ in range(3)]

    def _per_channel(self, blob: Tensor, x: Tensor) -> Tensor:
        if blob.numel() == 1:
            return blob.reshape(())
        if x.dim() < 2 or x.shape[1] != blob.numel():
            raise self.error(
                f"has {blob.numel()} per-channel factors but the bottom has shape {tuple(x.shape)}; the "
                "bottom's channel count must match."
            )
        return blob.reshape([1, -1] + [1] * (x.dim() - 2))

    def _shift_n(self, x: Tensor) -> Tensor:
        deq = self._per_channel(self.blobs[0].detach(), x)
        pow2 = torch.exp2(self._per_channel(self.blobs[1].detach(), x))
        t = round_away(x / deq)
        t = torch.clamp(round_away(t / pow2), INT16_MIN, INT16_MAX)
        return t * deq * pow2

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        x = bottoms[0]
        shift = self.blobs[1].detach()
        if bool((shift == 0).all()):
            return [x]
        valid = (shift >= 1) & (shift <= 16) & (shift == torch.round(shift))
        if not bool(valid.all()):
            raise self.error(
                f"shift_bit blob holds {shift.reshape(-1)[:8].tolist()}; the values must be all 0 (no "
                "shift) or all integers in [1, 16]."
            )
        deq = self.blobs[0].detach()
        if not bool((torch.isfinite(deq) & (deq > 0)).all()):
            raise self.error("the deq_scale blob must hold finite values > 0 when shift_bit is used.")
        return [_straight_through(x, self._shift_n)]


@register(ANTI_QUANT)
class AntiQuant(Layer):
    """INT8 to float on the NPU (AscendAntiQuant); the identity in the float model."""

    exact_bottoms = 1
    exact_tops = 1

    def forward(self, bottoms: Sequence[Tensor]) -> list[Tensor]:
        return [bottoms[0]]
