"""Filesystem helpers: fsspec resolution, safe joins, atomic writes."""

import posixpath
import re

import fsspec
from fsspec.implementations.local import LocalFileSystem

from logitcache.storage.errors import UnsafePathError
from logitcache.storage.layout import temporary_path

__all__ = ["resolve", "safe_join", "atomic_write_bytes", "atomic_rename", "is_local"]

# One path component: no separators, no leading dot (rules out "." and ".."), nothing exotic.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def resolve(path_or_url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, root path without protocol) for a local path or fsspec URL."""
    fs, root = fsspec.core.url_to_fs(str(path_or_url), **_pool_widened(str(path_or_url), storage_options or {}))
    return fs, root.rstrip("/") or "/"


S3_CONNECTIONS = 64


def _pool_widened(url: str, options: dict) -> dict:
    """`options` with s3fs's connection pool at `S3_CONNECTIONS` unless the caller set it. botocore keeps 10
    connections per client; a Zarr shard is ~24 objects and the reader fetches several shards at once
    (`readahead`), so at 10 the requests queue behind each other's round trips."""
    if fsspec.core.split_protocol(url)[0] not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", S3_CONNECTIONS)
    return {**options, "config_kwargs": config}


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
        fs.pipe_file(path, data)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = temporary_path(path)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def atomic_rename(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a finished shard (file or folder) from its temporary name to its final name."""
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    fs.mv(src, dst, recursive=True)

