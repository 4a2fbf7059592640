"""Rewrite the forks' depthwise convolutions as the ``Convolution`` with ``group`` they compute.

``ConvolutionDepthwise`` (farmingyard/caffe-mobilenet) ignores ``num_output`` and ``group``: both are the
input's channel count, so its weight ``[C, 1, kh, kw]`` is that of a ``Convolution`` with ``num_output: C``
and ``group: C``. ``DepthwiseConvolution`` (yonghenglh6) is a grouped ``Convolution`` already. The
quantization flows run this pass on the prototxt as read, before anything else, so every later pass, the
record, the deploy emulation and ATC see a plain ``Convolution`` (docs/fork-layers.md); the weights are
unchanged.

The pass works without shapes, so it takes C from ``num_output``, which public models set to the channel
count; a ``ConvolutionDepthwise`` without ``num_output`` is refused with the fix.
"""

from __future__ import annotations

from amct_caffe.errors import ConfigError
from amct_caffe.log import get_logger
from amct_caffe.model.layer_types import DEPTHWISE_CONVOLUTION_TYPES
from amct_caffe.proto import caffe_pb2

LOGGER = get_logger("passes.depthwise")


def depthwise_as_convolution(net: caffe_pb2.NetParameter, model_file: str) -> list[str]:
    """Rewrite, in place, every depthwise convolution of ``net`` as a ``Convolution`` with ``group``.

    Args:
        net: the net as read (both phases); edited in place.
        model_file: the prototxt, for messages.

    Returns:
        The names of the rewritten layers, in net order.

    Raises:
        ConfigError: a ``ConvolutionDepthwise`` without ``num_output``.
    """
    rewritten = []
    for layer in net.layer:
        if layer.type in DEPTHWISE_CONVOLUTION_TYPES:
            as_grouped_convolution(layer, None, model_file)
            rewritten.append(layer.name)
    if rewritten:
        LOGGER.info("Model '%s': depthwise convolution(s) %s are quantized as Convolution with group.",
                    model_file, rewritten)
    return rewritten


def as_grouped_convolution(layer: caffe_pb2.LayerParameter, channels: int | None, model_file: str) -> None:
    """Rewrite one depthwise layer, in place, as the ``Convolution`` it computes.

    ``DepthwiseConvolution`` computes what ``Convolution`` computes with the same ``convolution_param``: only
    its type changes. ``ConvolutionDepthwise`` ignores ``group``: it becomes ``group = num_output = C``,
    ``C`` being ``channels`` when given (e.g. its weight's axis 0), else its ``num_output``.

    Raises:
        ConfigError: a ``ConvolutionDepthwise`` without a channel count.
    """
    if layer.type != "DepthwiseConvolution":
        p = layer.convolution_param
        count = channels if channels is not None else (p.num_output if p.num_output > 0 else None)
        if count is None:
            raise ConfigError(
                f"Layer '{layer.name}' (type {layer.type}) of model '{model_file}' has no num_output and no "
                "weights to read its channel count from; it is rewritten as a Convolution with group = "
                "num_output, so set num_output to the layer's input channel count."
            )
        p.num_output = count
        p.group = count
    layer.type = "Convolution"
