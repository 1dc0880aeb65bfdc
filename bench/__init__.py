"""Speed, memory and the GPU check: each file runs as `python -m bench.<name>` from the repository root."""
