"""Evaluation commands (`mmalign eval ...`). Each evaluation lives with the part it evaluates; `cli.py` wires them."""
