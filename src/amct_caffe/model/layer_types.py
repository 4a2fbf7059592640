"""The Caffe type strings of AMCT's own layers, named once.

AMCT's patched Caffe adds these layer types; the passes insert and remove them, the engine registers an
implementation for each, and the deploy emulation and the analysis code look for them.
"""

QUANT = "Quant"
DEQUANT = "DeQuant"
ANTI_QUANT = "AntiQuant"
ACTIVATION_QAT = "ActivationQAT"
WEIGHT_QAT = "WeightQAT"
IFMR = "IFMR"
SEARCH_N = "SearchN"

#: The layers a retrain (QAT) model carries.
RETRAIN_TYPES = (ACTIVATION_QAT, WEIGHT_QAT)
#: The layers of a fake-quant or deploy model.
FAKE_QUANT_TYPES = (QUANT, DEQUANT, ANTI_QUANT)
#: Every AMCT layer type: a model holding any of them has been through AMCT already.
AMCT_LAYER_TYPES = (*FAKE_QUANT_TYPES, *RETRAIN_TYPES, IFMR, SEARCH_N)

#: The forks' depthwise convolutions: ``ConvolutionDepthwise`` (num_output and group are the channel count)
#: and ``DepthwiseConvolution`` (a grouped Convolution). The quantization flows rewrite both to
#: ``Convolution`` with ``group`` (docs/fork-layers.md), the form ATC's operator list takes.
DEPTHWISE_CONVOLUTION_TYPES = ("ConvolutionDepthwise", "DepthwiseConvolution")
