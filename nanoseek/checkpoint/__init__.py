"""Checkpoints: hf.py (HF format in and out, the one name-mapping table), state.py (training state)."""
