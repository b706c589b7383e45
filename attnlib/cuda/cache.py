"""The on-disk cache of compiled kernels: keyed, locked, written atomically, checked on read.

Layout: ``<cache dir>/cubins/<spec name>-<key>.cubin``, each file a 48-byte header (magic,
payload length, sha256 of the payload) and the payload. A file that is short, has another
magic or fails its checksum is treated as absent and rebuilt, never loaded. Builds happen
under an exclusive ``fcntl.flock`` on ``<file>.lock``, so concurrent processes compile each
entry once; the file appears through ``os.replace`` of a finished temporary file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import struct
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; atomic replace still keeps files whole
    fcntl = None

log = logging.getLogger("attnlib")

MAGIC = b"ATNLCUB1"
_HEADER = struct.Struct("<8sQ32s")  # magic, payload length, sha256(payload)
FORMAT_VERSION = 1


def default_cache_dir() -> str:
    # expanduser: a "~" from a Dockerfile ENV, a .env file or a quoted shell value is not expanded
    # by any shell and would otherwise make a folder named "~" in the working directory
    env = os.environ.get("ATTNLIB_CACHE_DIR")
    if env:
        return os.path.expanduser(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(os.path.expanduser(xdg), "attnlib") if xdg else os.path.join(
        os.path.expanduser("~"), ".cache", "attnlib")


def cache_key(**material: Any) -> str:
    """sha256 of everything that determines a compiled binary (JSON, sorted keys)."""
    material = dict(material, cache_format=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def pack(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def unpack(blob: bytes) -> bytes | None:
    """The payload, or None when the blob is not a whole, uncorrupted entry."""
    if len(blob) < _HEADER.size:
        return None
    magic, length, digest = _HEADER.unpack_from(blob)
    payload = blob[_HEADER.size:]
    if magic != MAGIC or length != len(payload) or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


class BinaryCache:
    """Compiled binaries on disk. ``get_or_build(name, key, build)`` is the whole interface;
    ``build`` is any callable returning bytes (the NVRTC compile, or a fake in tests)."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.join(root or default_cache_dir(), "cubins")

    def path(self, name: str, key: str) -> str:
        return os.path.join(self.root, f"{name}-{key[:24]}.cubin")

    def read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            return None
        payload = unpack(blob)
        if payload is None:
            log.warning("attnlib: corrupt kernel cache entry %s; rebuilding it", path)
        return payload

    def write(self, path: str, payload: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # not tempfile.mkstemp: its files are 0600 whatever the umask, so an entry written by one
        # user (a Docker image warmed as root, a shared ATTNLIB_CACHE_DIR) could not be read by another
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pack(payload))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def lock(self, path: str) -> Iterator[None]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a+b") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def get_or_build(self, name: str, key: str, build: Callable[[], bytes]) -> tuple[bytes, str]:
        """(binary, how): how is "hit" (read from disk), "built" (compiled and stored) or
        "uncached" (compiled; the cache folder could not be written)."""
        path = self.path(name, key)
        payload = self.read(path) if os.path.exists(path) else None
        if payload is not None:
            return payload, "hit"
        built = None
        building = False
        try:
            with self.lock(path):
                # another process may have built it while this one waited for the lock
                payload = self.read(path) if os.path.exists(path) else None
                if payload is not None:
                    return payload, "hit"
                building = True
                built = build()
                building = False
                self.write(path, built)
                return built, "built"
        except OSError as e:  # read-only or full cache folder: compile, do not store
            if building:  # the build itself failed: not a cache problem, and not worth a second try
                raise
            log.warning("attnlib: kernel cache %s not writable (%s); compiling without caching", self.root, e)
            return (build() if built is None else built), "uncached"
