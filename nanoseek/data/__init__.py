"""Data: corpus.py (synthetic and user documents), loader.py (packing), tasks/ (verifiable problems)."""
