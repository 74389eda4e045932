"""S3 backend: conditional PUTs through s3fs.

If-None-Match: * makes create-only writes; If-Match: <etag> makes compare-and-swap. How a lost
condition surfaces depends on the server, so all known spellings are recognised.
"""

from __future__ import annotations

import errno
import os

from lmdepot.registry.store import Store


def _is_precondition_failure(exc: BaseException) -> bool:
    """A lost conditional write, as s3fs reports it on the servers we know of."""
    if isinstance(exc, FileExistsError):  # moto, AWS
        return True
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:  # SeaweedFS: 412 as InvalidArgument
        return "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower()
    if isinstance(exc, OSError) and exc.errno == errno.EBUSY:  # 409: a concurrent conditional write
        return True
    return "PreconditionFailed" in str(exc) or "ConditionalRequestConflict" in str(exc)


class S3Store(Store):
    """Conditional PUTs: If-None-Match: * creates, If-Match: <etag> replaces."""

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")
            return True
        except Exception as exc:
            if _is_precondition_failure(exc):
                return False
            raise self._wrap(exc, key) from None

    def create_file(self, key: str, local: str, digest: str | None = None) -> bool:
        # s3fs sends If-None-Match on the single PUT and on CompleteMultipartUpload alike.
        try:
            self.fs.put_file(local, self._p(key), mode="create")
            return True
        except Exception as exc:
            if _is_precondition_failure(exc):
                return False
            raise self._wrap(exc, key) from None

    def update_if(self, key: str, data: bytes, newer) -> bool:
        # ETag first, body second: if the object changes in between, If-Match fails, never the
        # other way round.
        self.fs.invalidate_cache(self._p(key))
        info = self.info(key)
        if not newer(None if info is None else self.read(key)):
            return False
        cond = {"mode": "create"} if info is None else {"IfMatch": info["ETag"]}
        try:
            self.fs.pipe_file(self._p(key), data, **cond)
            return True
        except Exception as exc:
            if _is_precondition_failure(exc):
                return False
            raise self._wrap(exc, key) from None


def s3_options() -> dict:
    # Each process must see other processes' writes at once, so no listing cache; bounded
    # retries so that an unreachable endpoint fails in seconds rather than minutes.
    opts: dict = {"skip_instance_cache": True, "use_listings_cache": False,
                  "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2}}}
    endpoint = os.environ.get("LMDEPOT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts
