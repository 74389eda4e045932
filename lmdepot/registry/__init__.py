"""Content-addressed workspace registry on any fsspec URL; see docs/registry.md.

Importing this package stays light (no torch, no s3fs): backends and numeric code load on use.
"""

from lmdepot.registry.core import Registry
from lmdepot.registry.store import RegistryError, TagConflictError

__all__ = ["Registry", "RegistryError", "TagConflictError"]
