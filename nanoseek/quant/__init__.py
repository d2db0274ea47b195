"""Low-precision formats applied to the model from outside it: `fp8` (DeepSeek-V3's fine-grained FP8)."""
