# Lets `pytest` import the top-level modules (model.py, entropy.py, ...) from tests/.
