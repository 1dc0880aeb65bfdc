"""The needle-in-a-haystack experiment's machinery; the story itself is eval_nih.py at the root."""
