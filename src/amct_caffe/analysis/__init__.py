"""Per-layer analysis of quantized models: float vs fake-quant vs deploy agreement and the report."""
