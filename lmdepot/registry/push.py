"""push: upload the blobs a store lacks, then the manifest, then move the tag.

That order is what makes a version visible only when complete: a manifest is written only after
every blob it names exists, and a tag is moved only after its manifest exists. A push killed at any
point leaves at most unreferenced blobs or an untagged manifest, which gc collects.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lmdepot.errors import LmdepotError
from lmdepot.formats.layout import MANIFEST_FILE
from lmdepot.formats.manifest import Manifest, sha256_file
from lmdepot.registry.core import WORKERS, progress
from lmdepot.registry.refs import parse_ref
from lmdepot.registry.store import RegistryError, TagConflictError
from lmdepot.registry.version import Blob, Version, blob_key, manifest_key


@dataclass
class PushResult:
    ref: str
    digest: str
    uploaded: list[Blob] = field(default_factory=list)
    skipped: list[Blob] = field(default_factory=list)
    unchanged: bool = False

    @property
    def uploaded_bytes(self) -> int:
        return sum(b.size for b in self.uploaded)


def _pause(point: str) -> None:
    """Test hook: LMDEPOT_TEST_PUSH_PAUSE=<point> stops here until stdin closes, so that a test can
    kill the push at a known point without sleeping."""
    if os.environ.get("LMDEPOT_TEST_PUSH_PAUSE") == point:
        print(f"paused at {point}", file=sys.stderr, flush=True)
        sys.stdin.read()


def _scan(workspace: Path) -> tuple[Manifest, list[Blob]]:
    """The workspace's files as blobs, each re-hashed against its manifest entry."""
    try:
        manifest = Manifest.read(workspace)
    except LmdepotError as exc:
        raise RegistryError(str(exc)) from None
    listed = {e.path for e in manifest.files} | {MANIFEST_FILE}
    for p in sorted(workspace.rglob("*")):
        rel = p.relative_to(workspace).as_posix()
        if p.is_file() and rel not in listed:
            raise RegistryError(f"{p}: file not listed in {workspace / MANIFEST_FILE}; refusing to push")

    def check(e) -> Blob:
        p = workspace / e.path
        if not p.is_file():
            raise RegistryError(f"{p}: missing (listed in the manifest)")
        if p.stat().st_size != e.size or sha256_file(p) != e.sha256:
            raise RegistryError(f"{p}: content differs from {MANIFEST_FILE}; refusing to push")
        return Blob(e.path, "sha256:" + e.sha256, e.size, e.layer, e.rank)

    with ThreadPoolExecutor(WORKERS) as pool:
        blobs = list(pool.map(check, manifest.files))
    mpath = workspace / MANIFEST_FILE
    blobs.append(Blob(MANIFEST_FILE, "sha256:" + sha256_file(mpath), mpath.stat().st_size))
    return manifest, blobs


def push(reg, workspace: str | Path, ref_text: str, show_progress: bool = True) -> PushResult:
    ref = parse_ref(ref_text)
    if ref.tag is None:
        raise RegistryError(f"push needs NAME:TAG, got {ref_text!r}")
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise RegistryError(f"{workspace}: not a directory")
    manifest, blobs = _scan(workspace)
    # Refuse before uploading anything if this backend cannot move tags safely.
    reg.tags.probe()
    config = workspace / "config.ini"
    current = reg.tags.resolve(ref.name, ref.tag).digest
    version = Version(blobs, config.read_text() if config.is_file() else "", manifest.provenance, current)
    if current is not None:
        if reg.load(ref.name, current).same_content(version):
            return PushResult(str(ref), current, skipped=blobs, unchanged=True)

    unique = {b.digest: b for b in blobs}
    result = PushResult(str(ref), version.digest)
    bar = progress(sum(b.size for b in unique.values()), f"push {ref}") if show_progress else None
    done = 0

    def upload(b: Blob) -> tuple[Blob, bool]:
        key = blob_key(b.digest)
        info = reg.store.info(key)
        if info is not None and info.get("size") == b.size:
            return b, False
        created = reg.store.create_file(key, str(workspace / b.path), b.digest)
        info = reg.store.info(key)
        # Content addressing makes a size check enough to catch a short write or a different
        # object sitting under this key; verify re-hashes fully.
        if info is None or info.get("size") != b.size:
            raise RegistryError(f"blob {b.digest} ({b.path}): store holds "
                                f"{None if info is None else info.get('size')} bytes after upload, expected {b.size}")
        return b, created

    with ThreadPoolExecutor(WORKERS) as pool:
        for b, created in pool.map(upload, unique.values()):
            (result.uploaded if created else result.skipped).append(b)
            if bar is not None:
                bar.update(b.size)
            done += 1
            if done == max(1, len(unique) // 2):
                _pause("blobs")
    if bar is not None:
        bar.close()

    reg.store.create(manifest_key(ref.name, version.digest), version.to_bytes())
    _pause("manifest")
    # CAS against the parent recorded in the manifest: a concurrent push to this tag makes this
    # one fail retryably instead of silently dropping the other's version from the parent chain.
    try:
        reg.tags.move(ref.name, ref.tag, version.digest, expect=current, action="push")
    except TagConflictError:
        # Someone pushed the very same version at the same moment: the tag already says what we
        # wanted it to say.
        if reg.tags.resolve(ref.name, ref.tag).digest != version.digest:
            raise
    return result
