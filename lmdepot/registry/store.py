"""Object-store backends of the registry: the few primitives its safety rests on.

Every backend offers create-only writes (the first writer wins, later ones learn the key exists)
and a conditional replace. Local directories get them from link(2) and an O_EXCL lock, S3 from
If-None-Match / If-Match, memory:// from a process-wide lock (it is per-process anyway). Any other
fsspec URL gets a best-effort generic store that can hold blobs but is refused for tag moves.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from lmdepot.errors import LmdepotError


class RegistryError(LmdepotError):
    """Bad registry input or a store that cannot be used; nothing in the store was changed."""


class TagConflictError(RegistryError):
    """Another writer moved the tag first; re-reading and retrying may succeed."""

    retryable = True
    exit_code = 75  # EX_TEMPFAIL: scripts can tell "try again" from "wrong input"


_STALE_LOCK_S = 60.0
_MEM_LOCK = threading.Lock()
_RAISE = object()   # Store._call: a missing key is an error


class Store:
    """Keys are '/'-separated paths under the store root."""

    exclusive_create = True

    def __init__(self, url: str, fs, root: str):
        self.url, self.fs, self.root = url, fs, root.rstrip("/")

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _wrap(self, exc: BaseException, key: str) -> RegistryError:
        if isinstance(exc, RegistryError):
            return exc
        return RegistryError(f"store {self.url} unreachable or refusing access ({key}): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def _call(self, key: str, fn, missing=_RAISE):
        """fn() with the backend's errors as RegistryErrors; a missing key returns `missing` if given."""
        try:
            return fn()
        except FileNotFoundError:
            if missing is _RAISE:
                raise RegistryError(f"{key}: missing from store {self.url}") from None
            return missing
        except Exception as exc:
            raise self._wrap(exc, key) from None

    # --- reads ---------------------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        """Bytes of key, or None when it does not exist."""
        return self._call(key, lambda: self.fs.cat_file(self._p(key)), missing=None)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self._call(key, lambda: self.fs.cat_file(self._p(key), start=start, end=end))

    def stream(self, key: str, chunk: int = 1 << 20):
        """Chunks of key's bytes, without holding the whole object in memory."""
        f = self._call(key, lambda: self.fs.open(self._p(key), "rb"))
        with f:
            while data := self._call(key, lambda: f.read(chunk)):
                yield data

    def get_file(self, key: str, local: str) -> None:
        self._call(key, lambda: self.fs.get_file(self._p(key), local))

    def info(self, key: str) -> dict | None:
        return self._call(key, lambda: self.fs.info(self._p(key)), missing=None)

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def list(self, prefix: str) -> list[str]:
        """Every key under prefix (recursive), relative to the store root."""
        found = self._call(prefix, lambda: self.fs.find(self._p(prefix)), missing=[])
        root = self.root.strip("/") + "/"
        return sorted(k.lstrip("/")[len(root):] for k in found if k.lstrip("/").startswith(root))

    def mtime(self, key: str) -> float | None:
        info = self.info(key)
        if info is None:
            return None
        for k in ("mtime", "LastModified", "created"):
            v = info.get(k)
            if v is not None:
                return v.timestamp() if hasattr(v, "timestamp") else float(v)
        return None

    # --- writes --------------------------------------------------------------------------
    def create(self, key: str, data: bytes) -> bool:
        """Write key only if absent; False when it already exists. Readers never see part of it."""
        raise NotImplementedError

    def create_file(self, key: str, local: str, digest: str | None = None) -> bool:
        """create() from a local file; where the backend can, check it still hashes to digest."""
        return self.create(key, Path(local).read_bytes())

    def delete(self, key: str) -> None:
        self._call(key, lambda: self.fs.rm_file(self._p(key)), missing=None)

    def update_if(self, key: str, data: bytes, newer) -> bool:
        """Replace key with data if newer(current bytes or None) holds, atomically against others
        doing the same. False when the predicate said no or a concurrent writer held the key."""
        raise NotImplementedError


class LocalStore(Store):
    """A directory; also file:// URLs. Create-only through link(2), which never overwrites."""

    def _tmp(self, key: str) -> Path:
        path = Path(self._p(key))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._wrap(exc, key) from None
        return path.parent / f".tmp.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def create(self, key: str, data: bytes) -> bool:
        tmp = self._tmp(key)
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._wrap(exc, key) from None
        return self._link_in(tmp, key)

    def create_file(self, key: str, local: str, digest: str | None = None) -> bool:
        # Hash what is actually copied: the source may change between push's scan and this copy.
        tmp = self._tmp(key)
        h = hashlib.sha256()
        try:
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    dst.write(chunk)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._wrap(exc, key) from None
        if digest is not None and "sha256:" + h.hexdigest() != digest:
            tmp.unlink(missing_ok=True)
            raise RegistryError(f"{local}: changed while being pushed (no longer {digest})")
        return self._link_in(tmp, key)

    def _link_in(self, tmp: Path, key: str) -> bool:
        try:
            os.link(tmp, self._p(key))
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._wrap(exc, key) from None
        finally:
            tmp.unlink(missing_ok=True)

    def update_if(self, key: str, data: bytes, newer) -> bool:
        lock = Path(self._p(key) + ".lock")
        self._tmp(key)  # creates the parent
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # A holder killed mid-update leaves its lock behind; past this age nobody still holds it.
            try:
                if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
                    lock.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            os.write(fd, json.dumps({"pid": os.getpid(), "at": time.time()}).encode())
            os.close(fd)
            if not newer(self.read(key)):
                return False
            tmp = self._tmp(key)
            tmp.write_bytes(data)
            os.replace(tmp, self._p(key))
            return True
        finally:
            lock.unlink(missing_ok=True)


class MemoryStore(Store):
    """memory:// lives in one process, so a process-wide lock makes it exclusive."""

    def create(self, key: str, data: bytes) -> bool:
        with _MEM_LOCK:
            if self.fs.exists(self._p(key)):
                return False
            self.fs.pipe_file(self._p(key), data)
            return True

    def update_if(self, key: str, data: bytes, newer) -> bool:
        with _MEM_LOCK:
            if not newer(self.read(key)):
                return False
            self.fs.pipe_file(self._p(key), data)
            return True


class GenericStore(MemoryStore):
    """Any other fsspec backend: exists-then-write, which the exclusivity probe will catch."""

    exclusive_create = False

    def create(self, key: str, data: bytes) -> bool:
        if self.exists(key):
            return False
        self.fs.pipe_file(self._p(key), data)
        return True


def open_store(url: str) -> Store:
    import fsspec

    parsed = urlparse(url)
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" is a drive, not a scheme
    if scheme in ("", "file", "local"):
        root = os.path.abspath(os.path.expanduser(parsed.path if scheme else url))
        return LocalStore(url, fsspec.filesystem("file"), root)
    try:
        opts = {}
        if scheme in ("s3", "s3a"):
            from lmdepot.registry.s3 import s3_options

            opts = s3_options()
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as exc:
        raise RegistryError(f"cannot open store {url}: {exc}") from None
    if scheme == "memory":
        return MemoryStore(url, fs, "/" + root.strip("/"))
    if scheme in ("s3", "s3a"):
        from lmdepot.registry.s3 import S3Store

        return S3Store(url, fs, root)
    return GenericStore(url, fs, root)
