"""Hugging Face <-> universal checkpoint conversion and the logits check (see ``layout/hf.py`` for the mapping)."""
