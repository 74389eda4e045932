"""Registry: the Python API that the CLI, the runtime and other subsystems share."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmdepot.registry.refs import ANY, Ref, Tags, check_name, parse_ref
from lmdepot.registry.store import RegistryError, open_store
from lmdepot.registry.version import Version, blob_key, manifest_key

_CHUNK = 1 << 20
WORKERS = 8


def default_registry_url() -> str:
    if os.environ.get("LMDEPOT_REGISTRY"):
        return os.environ["LMDEPOT_REGISTRY"]
    import platformdirs

    return str(Path(platformdirs.user_cache_dir("lmdepot")) / "registry")


def default_cache_dir() -> Path:
    if os.environ.get("LMDEPOT_CACHE"):
        return Path(os.environ["LMDEPOT_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmdepot"))


def progress(total: int, desc: str, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False,
                disable=os.environ.get("LMDEPOT_PROGRESS") == "0")


class Registry:
    def __init__(self, url: str | None = None, cache_dir: str | Path | None = None):
        self.url = url or default_registry_url()
        self.store = open_store(self.url)
        self.tags = Tags(self.store)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    # --- resolving -------------------------------------------------------------------------
    def resolve(self, ref: Ref | str) -> tuple[Ref, str]:
        """(ref, digest): a tag's current version, or a digest whose manifest exists."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.digest:
            if not self.store.exists(manifest_key(ref.name, ref.digest)):
                raise RegistryError(f"{ref}: no such version in {self.url}")
            return ref, ref.digest
        digest = self.tags.resolve(ref.name, ref.tag).digest
        if digest is None:
            raise RegistryError(f"{ref}: no such tag in {self.url}")
        return ref, digest

    def load(self, name: str, digest: str) -> Version:
        key = manifest_key(name, digest)
        raw = self.store.read(key)
        if raw is None:
            raise RegistryError(f"{name}@{digest}: manifest {key} is missing from {self.url}")
        return Version.from_bytes(raw, key, expect_digest=digest)

    def get(self, ref: Ref | str) -> tuple[Ref, str, Version]:
        ref, digest = self.resolve(ref)
        return ref, digest, self.load(ref.name, digest)

    def versions(self, name: str) -> list[str]:
        check_name(name)
        return ["sha256:" + k.rsplit("/", 1)[1][:-len(".json")]
                for k in self.store.list(f"manifests/{name}/") if k.endswith(".json") and "/.tmp." not in k]

    # --- commands --------------------------------------------------------------------------
    def push(self, workspace: str | Path, ref: str, **kw):
        from lmdepot.registry.push import push

        return push(self, workspace, ref, **kw)

    def pull(self, ref: str, rank: int | None = None, dst: str | Path | None = None, **kw) -> Path:
        """Local path of the materialized workspace (only rank's files and the shared ones)."""
        from lmdepot.registry.pull import pull

        return pull(self, ref, rank=rank, dst=dst, **kw).path

    def ls(self) -> dict[str, dict[str, str]]:
        out = {}
        for name in self.tags.names():
            tags = self.tags.list_tags(name)
            if tags:
                out[name] = tags
        return out

    def log(self, name: str, tag: str | None = None) -> list[dict]:
        check_name(name)
        tags = [check_name(tag, "tag")] if tag else sorted(
            {k.split("/")[2] for k in self.store.list(f"history/{name}/") if k.count("/") == 3})
        entries = [e for t in tags for e in self.tags.history(name, t)]
        if tag:  # one tag's generations are its true order, whatever the movers' clocks said
            return sorted(entries, key=lambda e: e.get("generation", 0))
        return sorted(entries, key=lambda e: (e.get("when", ""), e.get("tag", ""), e.get("generation", 0)))

    def tag(self, src: str, new_tag: str, expect=ANY, retries: int = 64) -> dict:
        """Point NAME:NEW_TAG (or NEW_TAG of src's name) at src's version."""
        ref, digest = self.resolve(src)
        if ":" in new_tag:
            target = parse_ref(new_tag)
            name, tag = target.name, target.tag
        else:
            name, tag = ref.name, check_name(new_tag, "tag")
        if name != ref.name:
            raise RegistryError(f"cannot tag {ref} as {name}:{tag}: versions belong to one name")
        return self.tags.move(name, tag, digest, expect=expect, action="tag",
                              retries=0 if expect is not ANY else retries)

    def rm(self, ref: str, expect=ANY) -> dict:
        ref = parse_ref(ref)
        if ref.digest:
            raise RegistryError("rm takes NAME:TAG, not a digest; gc removes untagged versions")
        if self.tags.resolve(ref.name, ref.tag).digest is None:
            raise RegistryError(f"{ref}: no such tag in {self.url}")
        return self.tags.move(ref.name, ref.tag, None, expect=expect, action="rm",
                              retries=0 if expect is not ANY else 64)

    def verify(self, ref: str, show_progress: bool = True) -> tuple[str, int]:
        """Re-hash every blob of a version; raise naming each corrupt or missing one."""
        ref, digest, version = self.get(ref)
        by_digest: dict[str, list] = {}
        for b in version.files:
            by_digest.setdefault(b.digest, []).append(b)
        bar = progress(sum(v[0].size for v in by_digest.values()), f"verify {ref}") if show_progress else None

        def check(d: str) -> str | None:
            b = by_digest[d][0]
            info = self.store.info(blob_key(d))
            if info is None:
                return f"blob {d} ({b.path}) is missing"
            h, n = hashlib.sha256(), 0
            for chunk in self.store.stream(blob_key(d), _CHUNK):
                h.update(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if n != b.size:
                return f"blob {d} ({b.path}) has {n} bytes, expected {b.size} (truncated or corrupt)"
            if "sha256:" + h.hexdigest() != d:
                return f"blob {d} ({b.path}) is corrupt: its content hashes to sha256:{h.hexdigest()}"
            return None

        with ThreadPoolExecutor(WORKERS) as pool:
            problems = [p for p in pool.map(check, sorted(by_digest)) if p]
        if bar is not None:
            bar.close()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise RegistryError(f"{ref}: {problems[0]}{more}")
        return digest, len(by_digest)

    def gc(self, grace_s: float = 3600.0, dry_run: bool = False):
        from lmdepot.registry.gc import collect

        return collect(self, grace_s, dry_run)
