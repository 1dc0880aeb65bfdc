"""DoPE inside other engines: transformers (hf_dope.py)."""
