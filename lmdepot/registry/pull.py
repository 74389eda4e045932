"""pull: fetch a version into the local content-addressed cache and materialize a snapshot.

Cache layout: <cache>/blobs/sha256/<aa>/<hex> (verified, read-only) and
<cache>/snapshots/<name>/<hex>[.rank<R>]/ (links into blobs/). A blob enters blobs/ only through
os.replace of a per-process temp file that was hashed first, so nothing partial or corrupt is ever
visible there, a resumed pull skips what is present, and concurrent pulls of one version each end
with correct bytes (the last os.replace wins with identical content).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lmdepot.registry.core import WORKERS, progress
from lmdepot.registry.store import RegistryError
from lmdepot.registry.version import Blob, blob_key

_CHUNK = 1 << 20


@dataclass
class PullResult:
    path: Path
    digest: str
    fetched: list[Blob] = field(default_factory=list)
    cached: list[Blob] = field(default_factory=list)

    @property
    def fetched_bytes(self) -> int:
        return sum(b.size for b in self.fetched)


def _hash(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return "sha256:" + h.hexdigest(), n


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def blob(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def has(self, b: Blob) -> bool:
        p = self.blob(b.digest)
        return p.is_file() and p.stat().st_size == b.size

    def fetch(self, store, b: Blob) -> None:
        final = self.blob(b.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp.{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            try:
                store.get_file(blob_key(b.digest), str(tmp))
            except RegistryError as exc:
                raise RegistryError(f"blob {b.digest} ({b.path}): {exc}") from None
            actual, size = _hash(tmp)
            if size != b.size:
                raise RegistryError(f"blob {b.digest} ({b.path}) in the store has {size} bytes, expected "
                                    f"{b.size} (truncated or corrupt); not materialized")
            if actual != b.digest:
                raise RegistryError(f"blob {b.digest} ({b.path}) in the store is corrupt: its content "
                                    f"hashes to {actual}; not materialized")
            os.chmod(tmp, 0o444)  # snapshots hardlink it: writing through one would corrupt the cache
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def materialize(self, files: list[Blob], dst: Path) -> None:
        """Build dst from cached blobs in a temp dir renamed into place, so dst is never partial."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".tmp.{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            for b in files:
                target = tmp / b.path
                target.parent.mkdir(parents=True, exist_ok=True)
                _link(self.blob(b.digest), target)
            try:
                os.rename(tmp, dst)
            except OSError:
                if not dst.is_dir():  # anything but "another process made it first"
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _link(src: Path, dst: Path) -> None:
    # Hardlinks survive the cache being moved; symlinks work across filesystems; copy always works.
    try:
        os.link(src, dst)
        return
    except OSError:
        pass
    try:
        os.symlink(src, dst)
        return
    except OSError:
        shutil.copyfile(src, dst)


def _complete(snapshot: Path, files: list[Blob]) -> bool:
    return snapshot.is_dir() and all((snapshot / b.path).is_file()
                                     and (snapshot / b.path).stat().st_size == b.size for b in files)


def pull(reg, ref_text: str, rank: int | None = None, dst: str | Path | None = None,
         show_progress: bool = True) -> PullResult:
    ref, digest, version = reg.get(ref_text)
    if rank is not None and rank not in version.ranks():
        raise RegistryError(f"{ref}: no rank {rank}; the version has ranks {version.ranks()}")
    if dst is not None and Path(dst).exists() and (not Path(dst).is_dir() or any(Path(dst).iterdir())):
        raise RegistryError(f"{dst}: destination exists and is not an empty directory")
    files = version.for_rank(rank)
    cache = Cache(reg.cache_dir)
    result = PullResult(Path(), digest)
    unique = {b.digest: b for b in files}
    missing = [b for b in unique.values() if not cache.has(b)]
    result.cached = [b for b in unique.values() if cache.has(b)]
    bar = progress(sum(b.size for b in missing), f"pull {ref}") if show_progress else None

    def fetch(b: Blob) -> Blob:
        cache.fetch(reg.store, b)
        if bar is not None:
            bar.update(b.size)
        return b

    # Let every transfer finish even when one fails, so that a retried pull resumes with only
    # the failed blobs left to fetch.
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(fetch, b) for b in missing]
    if bar is not None:
        bar.close()
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors and not isinstance(errors[0], RegistryError):
        raise errors[0]
    if errors:
        more = f" (and {len(errors) - 1} more blobs failed)" if len(errors) > 1 else ""
        raise RegistryError(f"{ref}: {errors[0]}{more}") from None
    result.fetched = [f.result() for f in futures]

    hexd = digest.split(":", 1)[1]
    snapshot = cache.root / "snapshots" / ref.name / (hexd if rank is None else f"{hexd}.rank{rank}")
    if not _complete(snapshot, files):
        shutil.rmtree(snapshot, ignore_errors=True)  # a damaged snapshot: rebuild it from blobs
        cache.materialize(files, snapshot)
    result.path = snapshot
    if dst is not None:
        dst = Path(dst)
        if dst.exists():
            dst.rmdir()
        cache.materialize(files, dst)
        result.path = dst
    return result
