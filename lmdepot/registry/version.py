"""The registry manifest of one version: what manifests/<name>/<hex>.json holds.

Canonical JSON (sorted keys, compact, files sorted by path) with no wall-clock time, so pushing
the same workspace with the same parent gives the same bytes and so the same version id, the
sha256 of those bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from lmdepot.errors import FormatError
from lmdepot.formats.manifest import check_relative_path
from lmdepot.registry.refs import DIGEST_RE
from lmdepot.registry.store import RegistryError

MEDIA_TYPE = "application/vnd.lmdepot.workspace.manifest.v1+json"


def blob_key(digest: str) -> str:
    hexd = digest.split(":", 1)[1]
    return f"blobs/sha256/{hexd[:2]}/{hexd}"


def manifest_key(name: str, digest: str) -> str:
    return f"manifests/{name}/{digest.split(':', 1)[1]}.json"


@dataclass(frozen=True)
class Blob:
    path: str
    digest: str
    size: int
    layer: int | None = None
    rank: int | None = None


@dataclass
class Version:
    files: list[Blob]
    config: str = ""
    provenance: dict = field(default_factory=dict)
    parent: str | None = None

    def to_bytes(self) -> bytes:
        body = {
            "schemaVersion": 1,
            "mediaType": MEDIA_TYPE,
            "files": [{"path": b.path, "digest": b.digest, "size": b.size, "layer": b.layer, "rank": b.rank}
                      for b in sorted(self.files, key=lambda b: b.path)],
            "config": self.config,
            "provenance": self.provenance,
            "parent": self.parent,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    def same_content(self, other: "Version") -> bool:
        return (sorted(self.files, key=lambda b: b.path), self.config, self.provenance) == \
            (sorted(other.files, key=lambda b: b.path), other.config, other.provenance)

    def for_rank(self, rank: int | None) -> list[Blob]:
        """Rank `rank`'s files plus the shared (rank-less) ones; every file when rank is None."""
        return [b for b in self.files if rank is None or b.rank is None or b.rank == rank]

    def ranks(self) -> list[int]:
        return sorted({b.rank for b in self.files if b.rank is not None})

    @classmethod
    def from_bytes(cls, raw: bytes, source: str, expect_digest: str | None = None) -> "Version":
        if expect_digest is not None:
            actual = "sha256:" + hashlib.sha256(raw).hexdigest()
            if actual != expect_digest:
                raise RegistryError(f"{source}: digest mismatch: content hashes to {actual}, "
                                    f"expected {expect_digest} (corrupt manifest)")
        try:
            body = json.loads(raw)
            if body.get("mediaType") != MEDIA_TYPE:
                raise RegistryError(f"{source}: not an lmdepot registry manifest")
            files = []
            for f in body["files"]:
                blob = Blob(check_relative_path(str(f["path"])), str(f["digest"]), int(f["size"]),
                            f.get("layer"), f.get("rank"))
                if not DIGEST_RE.match(blob.digest) or blob.size < 0:
                    raise RegistryError(f"{source}: bad entry for {blob.path}")
                files.append(blob)
            parent = body.get("parent")
            if parent is not None and not DIGEST_RE.match(parent):
                raise RegistryError(f"{source}: bad parent {parent!r}")
            return cls(files, str(body.get("config", "")), dict(body.get("provenance") or {}), parent)
        except FormatError as exc:
            raise RegistryError(f"{source}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None
