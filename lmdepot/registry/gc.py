"""gc: mark-and-sweep of blobs and manifests that no tag reaches.

Pushes run without locks, so gc must not race them into a dangling version:
- roots are the manifests every tag points at, plus every manifest younger than the grace period
  (a push writes its manifest before moving the tag);
- after marking, the roots are read again and anything that appeared meanwhile is marked too;
- nothing younger than the grace period is deleted, which covers blobs a running push has
  uploaded but not yet referenced.
Manifests go before blobs, so an interrupted gc never leaves a manifest naming a deleted blob.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lmdepot.registry.version import blob_key, manifest_key


@dataclass
class GcReport:
    kept_blobs: int = 0
    kept_manifests: int = 0
    deleted: list[str] = field(default_factory=list)
    young: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    dry_run: bool = False


def _roots(reg, grace_s: float, now: float) -> set[tuple[str, str]]:
    roots = {(name, digest) for name in reg.tags.names() for digest in reg.tags.list_tags(name).values()}
    for key in reg.store.list("manifests/"):
        parts = key.split("/")
        if len(parts) != 3 or not parts[2].endswith(".json") or parts[2].startswith(".tmp."):
            continue
        mtime = reg.store.mtime(key)
        if mtime is None or now - mtime < grace_s:
            roots.add((parts[1], "sha256:" + parts[2][:-len(".json")]))
    return roots


def _mark(reg, roots: set[tuple[str, str]], live_blobs: set[str], live_manifests: set[str]) -> None:
    for name, digest in roots:
        key = manifest_key(name, digest)
        if key in live_manifests:
            continue
        live_manifests.add(key)
        for b in reg.load(name, digest).files:
            live_blobs.add(blob_key(b.digest))


def collect(reg, grace_s: float, dry_run: bool) -> GcReport:
    now = time.time()
    live_blobs: set[str] = set()
    live_manifests: set[str] = set()
    _mark(reg, _roots(reg, grace_s, now), live_blobs, live_manifests)
    candidates = [k for k in reg.store.list("manifests/") + reg.store.list("blobs/")
                  if k not in live_blobs and k not in live_manifests]
    # A tag may have moved, or a push may have finished, while we marked: mark those roots too.
    _mark(reg, _roots(reg, grace_s, now), live_blobs, live_manifests)

    report = GcReport(kept_blobs=len(live_blobs), kept_manifests=len(live_manifests), dry_run=dry_run)
    sweep = [k for k in candidates if k not in live_blobs and k not in live_manifests]
    sweep.sort(key=lambda k: not k.startswith("manifests/"))
    for key in sweep:
        info = reg.store.info(key)
        if info is None:
            continue
        mtime = reg.store.mtime(key)
        if mtime is None or time.time() - mtime < grace_s:
            report.young.append(key)
            continue
        report.deleted.append(key)
        report.deleted_bytes += int(info.get("size") or 0)
        if not dry_run:
            reg.store.delete(key)
    return report
