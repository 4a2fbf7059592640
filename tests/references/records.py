"""AMCT's documented example of a scale/offset record file, as text (no imports: the proto tests run without
torch)."""

#: The record file example of AMCT's documentation: two layers, one with per-channel weight scales.
RECORD_EXAMPLE = """
record {
  key: "conv1"
  value {
    scale_d: 0.0213
    offset_d: -14
    scale_w: 0.00448
    scale_w: 0.00043
    offset_w: 0
    offset_w: 0
    channels: 3
    height: 224
    width: 224
  }
}
record {
  key: "res2a_branch1"
  value { scale_d: 0.0933 offset_d: -128 scale_w: 0.00017 offset_w: 0 channels: 64 height: 56 width: 56 }
}
"""
