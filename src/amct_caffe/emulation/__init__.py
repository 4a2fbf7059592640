"""Integer emulation of the deploy model: what the NPU computes for INT8 weights, INT32 bias and the
``Quant``/``DeQuant`` layers, as integer variants of the engine's layers."""
