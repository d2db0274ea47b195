"""nanoseek: DeepSeek-V3 and the R1 recipe as small, readable, tested PyTorch."""
from .config import ModelConfig, load_preset

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device=None):
    """Load an HF-format DeepSeek-V3/V2 model directory into a nanoseek `Transformer`."""
    from .checkpoint.hf import from_pretrained as _load
    return _load(path, dtype=dtype, device=device)


def save_pretrained(model, path, dtype=None, tokenizer=None, **kw):
    """Write a nanoseek `Transformer` as an HF-format directory (config.json + safetensors [+ tokenizer])
    that transformers and `from_pretrained` load."""
    from .checkpoint.hf import save_pretrained as _save
    return _save(model, path, dtype=dtype, tokenizer=tokenizer, **kw)


__all__ = ["ModelConfig", "load_preset", "from_pretrained", "save_pretrained", "__version__"]
