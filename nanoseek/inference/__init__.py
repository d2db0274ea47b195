"""Inference: cache.py (latent MLA cache), sampling.py, engine.py (continuous batching),
speculative.py (MTP drafts), llm.py (vLLM-shaped API), server.py (OpenAI-compatible HTTP)."""
from .llm import LLM, CompletionOutput, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
