"""The DeepSeek-V3 model: rope.py (RoPE+YaRN), mla.py, moe.py, mtp.py, transformer.py."""
from .transformer import Block, Transformer

__all__ = ["Block", "Transformer"]
