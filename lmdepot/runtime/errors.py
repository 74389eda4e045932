"""Runtime user errors; the CLI prints each as one line."""

from lmdepot.errors import LmdepotError


class RuntimeLoadError(LmdepotError):
    """A workspace (or registry ref) cannot be loaded as asked."""


class RequestError(LmdepotError):
    """A generation request is invalid (e.g. a prompt longer than session_len)."""


class CacheFullError(LmdepotError):
    """The KV cache cannot hold even a single request."""
