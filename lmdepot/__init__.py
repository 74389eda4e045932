"""lmdepot: convert, quantize, version and serve LLM workspaces."""

__version__ = "0.1.0"
