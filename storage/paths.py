"""Filesystem helpers: fsspec resolution, safe joins, atomic writes."""

import os
import posixpath
import re

import fsspec
from fsspec.implementations.local import LocalFileSystem

from logitcache.storage.errors import UnsafePathError
from logitcache.storage.layout import temporary_path

__all__ = ["resolve", "safe_join", "atomic_write_bytes", "atomic_rename", "is_local", "NETWORK_DEFAULTS",
           "network_options", "deadline", "fsync_tree", "write_file_atomically"]

# One path component: no separators, no leading dot (rules out "." and ".."), nothing exotic.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


# An object store that accepts connections and never answers (a black-holed endpoint) would hang a
# command for half an hour under the clients' own defaults (botocore: 60 s timeouts, 5 attempts, and
# s3fs retries those 5 more times). These bound it to about attempts * (connect + read) seconds; each
# can be changed with `--storage-option read_timeout=60` and the like (S3 URLs; ignored elsewhere).
NETWORK_DEFAULTS = {"connect_timeout": 5.0, "read_timeout": 15.0, "attempts": 3}
_S3 = ("s3", "s3a")


S3_CONNECTIONS = 64


def network_options(url: str, storage_options: dict | None) -> tuple[dict, int | None]:
    """fsspec options for `url` with the network bounds applied, and s3fs's own retry count (None: leave it).

    Our keys (`NETWORK_DEFAULTS`) are taken out of `storage_options`; for S3 they become botocore's
    timeouts and its "standard" retry mode with that many attempts in all, and s3fs's outer retry loop
    is turned off (one attempt), so the attempts are counted once. A `config_kwargs` given wins.
    """
    options = dict(storage_options or {})
    bounds = {key: options.pop(key, default) for key, default in NETWORK_DEFAULTS.items()}
    if fsspec.core.split_protocol(str(url))[0] not in _S3:
        return options, None
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", float(bounds["connect_timeout"]))
    config.setdefault("read_timeout", float(bounds["read_timeout"]))
    config.setdefault("retries", {"total_max_attempts": int(bounds["attempts"]), "mode": "standard"})
    # botocore keeps 10 connections per client; a Zarr shard is ~24 objects and the reader fetches several
    # shards at once (`readahead`), so at 10 the requests queue behind each other's round trips.
    config.setdefault("max_pool_connections", S3_CONNECTIONS)
    options["config_kwargs"] = config
    return options, 1


def resolve(path_or_url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, root path without protocol) for a local path or fsspec URL, with the network
    bounds of `network_options` applied."""
    options, retries = network_options(str(path_or_url), storage_options)
    fs, root = fsspec.core.url_to_fs(str(path_or_url), **options)
    if retries is not None:
        fs.retries = retries
        # A PUT to an endpoint that never answers outlives botocore's read timeout (aiohttp waits on the
        # request's body), so small writes that must not hang pass this as fsspec's own deadline.
        config = options["config_kwargs"]
        retries = config.get("retries") or {}
        attempts = retries.get("total_max_attempts", retries.get("max_attempts", NETWORK_DEFAULTS["attempts"]))
        per_attempt = float(config.get("connect_timeout", 60)) + float(config.get("read_timeout", 60))
        fs.call_deadline = attempts * per_attempt + 5
    return fs, root.rstrip("/") or "/"


def deadline(fs) -> dict:
    """`{"timeout": seconds}` for one call of an object store resolved here (fsspec's own bound on a
    call, FSTimeoutError after it), else `{}`."""
    seconds = getattr(fs, "call_deadline", None)
    return {"timeout": seconds} if seconds else {}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def safe_join(root: str, name: str) -> str:
    """Join a relative name from an index onto the cache root, refusing anything that escapes it.

    Raises:
        UnsafePathError: `name` is absolute, empty, contains `..`, backslashes or odd characters.
    """
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or ":" in name:
        raise UnsafePathError(f"shard name {name!r} is not a relative path inside the cache")
    parts = name.split("/")
    if any(not _COMPONENT.match(p) for p in parts):
        raise UnsafePathError(f"shard name {name!r} escapes the cache or has characters outside [A-Za-z0-9._-]")
    return posixpath.join(root, name)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small file so readers see the old content or the new, never a torn one.

    Locally: write a temporary sibling, then rename over the target (atomic on POSIX).
    Object stores: a single PUT is already atomic, so write in place.
    """
    if not is_local(fs):
        fs.pipe_file(path, data, **deadline(fs))
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    fs.pipe_file(tmp, data)
    fsync_tree(tmp)
    fs.mv(tmp, path)
    fsync_folder(posixpath.dirname(path))


def write_file_atomically(path: str, data: bytes) -> None:
    """`atomic_write_bytes` for a plain local path (a checkpoint's small files): a crash leaves the old
    file or the new one, on disk, never a torn one."""
    from fsspec.implementations.local import LocalFileSystem

    atomic_write_bytes(LocalFileSystem(), os.path.abspath(path), data)


def fsync_folder(path: str) -> None:
    """Flush a folder's own entries (a rename just made in it) to the disk, not the files in it: other
    writers' temporary files come and go there (another rank's checkpoint file, another job's shard)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush a local file, or a folder with every file and folder in it, to the disk (before a rename
    publishes it, so a power cut cannot leave a named shard or index with lost blocks)."""
    if os.path.isdir(path):
        for folder, _, files in os.walk(path):
            for name in files:
                fsync_tree(os.path.join(folder, name))
            fsync_folder(folder)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_rename(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a finished shard (file or folder) from its temporary name to its final name, its bytes
    flushed to the disk before the rename and the rename flushed after it (local disks)."""
    fsync_tree(src)
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    fs.mv(src, dst, recursive=True)
    fsync_folder(posixpath.dirname(dst))

