"""manifest.json: every file of a workspace with its size and sha256, plus provenance.

The manifest is canonical JSON (sorted keys, files sorted by path, no wall-clock time), so two
conversions of the same source with the same options give byte-identical manifests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from lmdepot.errors import FormatError
from lmdepot.formats.layout import FORMAT_VERSION, MANIFEST_FILE, classify

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_relative_path(path: str) -> str:
    """Refuse absolute paths and `..`: a manifest must never point outside its workspace."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or path != p.as_posix():
        raise FormatError(f"manifest: unsafe file path {path!r}")
    return path


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    layer: int | None = None
    rank: int | None = None


@dataclass
class Manifest:
    files: list[FileEntry]
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # --- building --------------------------------------------------------------------------
    @classmethod
    def scan(cls, root: str | Path, provenance: dict) -> "Manifest":
        """Hash every file under root (except manifest.json itself)."""
        root = Path(root)
        entries = []
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel != MANIFEST_FILE:
                layer, rank = classify(rel)
                entries.append(FileEntry(rel, p.stat().st_size, sha256_file(p), layer, rank))
        return cls(entries, provenance)

    # --- (de)serialization -------------------------------------------------------------------
    def to_json(self) -> str:
        body = {
            "format": "lmdepot.workspace",
            "format_version": self.format_version,
            "files": [asdict(e) for e in sorted(self.files, key=lambda e: e.path)],
            "provenance": self.provenance,
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_FILE) -> "Manifest":
        try:
            body = json.loads(text)
            if body.get("format") != "lmdepot.workspace":
                raise FormatError(f"{source}: not an lmdepot workspace manifest")
            version = int(body["format_version"])
            if version > FORMAT_VERSION:
                raise FormatError(f"{source}: format_version {version} is newer than this lmdepot"
                                  f" understands ({FORMAT_VERSION}); upgrade lmdepot")
            files = []
            for e in body["files"]:
                entry = FileEntry(check_relative_path(str(e["path"])), int(e["size"]), str(e["sha256"]),
                                  e.get("layer"), e.get("rank"))
                if len(entry.sha256) != 64 or entry.size < 0:
                    raise FormatError(f"{source}: bad entry for {entry.path}")
                files.append(entry)
            return cls(files, dict(body.get("provenance", {})), version)
        except FormatError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def read(cls, workspace: str | Path) -> "Manifest":
        path = Path(workspace) / MANIFEST_FILE
        if not path.is_file():
            raise FormatError(f"{workspace}: no {MANIFEST_FILE}; not a workspace")
        return cls.from_json(path.read_text(), source=str(path))

    def write(self, workspace: str | Path) -> None:
        (Path(workspace) / MANIFEST_FILE).write_text(self.to_json())

    # --- queries ------------------------------------------------------------------------------
    def entry(self, path: str) -> FileEntry:
        for e in self.files:
            if e.path == path:
                return e
        raise FormatError(f"manifest: no entry for {path}")

    def for_rank(self, rank: int) -> list[FileEntry]:
        """Files rank `rank` needs: its own plus the shared (rank-less) ones."""
        return [e for e in self.files if e.rank is None or e.rank == rank]

    def verify(self, workspace: str | Path, entries: list[FileEntry] | None = None) -> None:
        """Re-hash files; raise FormatError naming the first missing, truncated or corrupt one."""
        root = Path(workspace)
        for e in entries if entries is not None else self.files:
            p = root / e.path
            if not p.is_file():
                raise FormatError(f"{p}: missing (listed in the manifest)")
            size = p.stat().st_size
            if size != e.size:
                raise FormatError(f"{p}: size {size} differs from the manifest's {e.size}")
            if sha256_file(p) != e.sha256:
                raise FormatError(f"{p}: sha256 differs from the manifest (corrupt file)")
        listed = {e.path for e in self.files}
        if entries is None:
            extra = [p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and p.relative_to(root).as_posix() not in listed | {MANIFEST_FILE}]
            if extra:
                raise FormatError(f"{root / extra[0]}: file not listed in the manifest")
