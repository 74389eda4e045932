"""Evaluation of workspaces through the runtime."""

PYDOC_EVAL = "pydoc-eval"  # the held-out part of the pydoc text (convert/calib_data.py)
