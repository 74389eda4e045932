"""Names, tags and the tag history.

The history is the source of truth: moving a tag is the create-only write of history entry
generation n+1, so among racing movers exactly one wins each generation, and a winner's move is
in the log before anyone can see it. tags/<name>/<tag>.json is a pointer that trails the log by at
most a killed writer's step; resolving reads it and then probes forward for newer entries.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass

from lmdepot.registry.store import RegistryError, Store, TagConflictError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_NAME = 128
MAX_TAG = 128
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
ANY = object()
PROBE_OK = "probe/exclusive-create.json"  # no --expect: move whatever the tag points at now


def check_name(value: str, what: str = "name") -> str:
    limit = MAX_NAME if what == "name" else MAX_TAG
    if not isinstance(value, str) or len(value) > limit or not _NAME_RE.match(value) or ".." in value:
        raise RegistryError(f"invalid {what} {value!r}: use 1-{limit} characters of [a-z0-9._-], "
                            "starting with a letter or digit")
    return value


def check_digest(value: str) -> str:
    if not DIGEST_RE.match(value or ""):
        raise RegistryError(f"invalid digest {value!r}: expected sha256:<64 hex digits>")
    return value


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"


def parse_ref(text: str, tag_required: bool = True) -> Ref:
    """name:tag or name@sha256:hex (OCI reference syntax without a host)."""
    if "@" in text:
        name, digest = text.split("@", 1)
        return Ref(check_name(name), digest=check_digest(digest))
    if ":" in text:
        name, tag = text.split(":", 1)
        return Ref(check_name(name), tag=check_name(tag, "tag"))
    if tag_required:
        raise RegistryError(f"invalid reference {text!r}: expected NAME:TAG or NAME@sha256:<hex>")
    return Ref(check_name(text))


def who() -> str:
    if os.environ.get("LMDEPOT_USER"):
        return os.environ["LMDEPOT_USER"]
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def tag_key(name: str, tag: str) -> str:
    return f"tags/{name}/{tag}.json"


def history_key(name: str, tag: str, generation: int) -> str:
    return f"history/{name}/{tag}/{generation:012d}.json"


@dataclass
class TagState:
    digest: str | None  # None: never set, or removed
    generation: int


class Tags:
    def __init__(self, store: Store):
        self.store = store
        self._probed = False

    # --- backend probe -----------------------------------------------------------------------
    def probe(self) -> None:
        """Refuse to move tags unless a second create-only write of one key really fails."""
        if self._probed:
            return
        if not self.store.exclusive_create:
            raise RegistryError(
                f"store {self.store.url} has no create-only write that this lmdepot knows of (only local "
                "directories, file://, memory:// and s3:// do), so racing tag moves could be lost; "
                "refusing to move tags there")
        if self.store.read(PROBE_OK) is not None:  # probed on first use of this store
            self._probed = True
            return
        key = f"probe/{uuid.uuid4().hex}"
        try:
            first = self.store.create(key, b"first")
            second = self.store.create(key, b"second")
            kept = self.store.read(key)
        finally:
            self.store.delete(key)
        if not (first and not second and kept == b"first"):
            raise RegistryError(
                f"store {self.store.url} does not make create-only writes exclusive (a second create of "
                "one key overwrote it), so tag moves could be lost; refusing to move tags there")
        self._probed = True

    # --- reading -----------------------------------------------------------------------------
    def resolve(self, name: str, tag: str) -> TagState:
        raw = self.store.read(tag_key(name, tag))
        state = TagState(None, 0)
        if raw is not None:
            body = _load(raw, tag_key(name, tag))
            state = TagState(body.get("digest"), _generation(body, tag_key(name, tag)))
        # A mover killed between its log entry and the pointer leaves the pointer behind.
        while (entry := self._entry(name, tag, state.generation + 1)) is not None:
            state = TagState(entry["to"], entry["generation"])
        return state

    def _entry(self, name: str, tag: str, generation: int) -> dict | None:
        raw = self.store.read(history_key(name, tag, generation))
        return None if raw is None else _load(raw, history_key(name, tag, generation))

    def history(self, name: str, tag: str) -> list[dict]:
        keys = [k for k in self.store.list(f"history/{name}/{tag}/") if k.endswith(".json")]
        return [_load(self.store.read(k) or b"{}", k) for k in keys]

    def list_tags(self, name: str) -> dict[str, str]:
        """tag -> digest of every tag of name that points somewhere."""
        tags = {k.split("/")[-1][:-len(".json")] for k in self.store.list(f"tags/{name}/") if k.endswith(".json")}
        tags |= {k.split("/")[2] for k in self.store.list(f"history/{name}/") if k.count("/") == 3}
        out = {}
        for tag in sorted(tags):
            state = self.resolve(name, tag)
            if state.digest:
                out[tag] = state.digest
        return out

    def names(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self.store.list("history/") if k.count("/") == 3})

    # --- moving ------------------------------------------------------------------------------
    def move(self, name: str, tag: str, to: str | None, expect=ANY, action: str = "tag",
             retries: int = 0) -> dict:
        """Compare-and-swap tag to `to` (None removes it). With expect, the tag must point at
        expect (None: must be unset). Raises TagConflictError once `retries` retries are spent."""
        check_name(name), check_name(tag, "tag")
        self.probe()
        for attempt in range(retries + 1):
            state = self.resolve(name, tag)
            if expect is not ANY and state.digest != expect:
                wanted = f"the expected {expect}" if expect else "unset, as expected"
                raise TagConflictError(f"{name}:{tag} points at {state.digest or 'nothing'}, not {wanted}; "
                                       "re-read it and retry")
            entry = {"tag": tag, "from": state.digest, "to": to, "generation": state.generation + 1,
                     "when": _now(), "by": who(), "action": action}
            data = json.dumps(entry, sort_keys=True).encode()
            if self.store.create(history_key(name, tag, entry["generation"]), data):
                self._advance_pointer(name, tag, entry)
                return entry
        raise TagConflictError(f"{name}:{tag} was moved by another writer at the same moment; retry")

    def _advance_pointer(self, name: str, tag: str, entry: dict) -> None:
        body = json.dumps({"digest": entry["to"], "generation": entry["generation"]}, sort_keys=True).encode()

        def newer(current: bytes | None) -> bool:
            return current is None or _generation(_load(current, tag_key(name, tag)), tag_key(name, tag)) \
                < entry["generation"]

        # Losing this race is harmless: whoever holds the pointer writes a generation at least as
        # recent, and resolve() walks the log past a lagging pointer.
        for _ in range(3):
            if self.store.update_if(tag_key(name, tag), body, newer):
                return
            cur = self.store.read(tag_key(name, tag))
            if cur is not None and not newer(cur):
                return


def _load(raw: bytes, key: str) -> dict:
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not an object")
        return body
    except ValueError as exc:
        raise RegistryError(f"{key}: corrupt JSON in the store ({exc})") from None


def _generation(body: dict, key: str) -> int:
    try:
        return int(body["generation"])
    except (KeyError, TypeError, ValueError):
        raise RegistryError(f"{key}: corrupt tag pointer (no generation)") from None
