"""Backend registry and shard I/O: every shard is {relative path: bytes} moved through fsspec.

A Parquet shard is one file (key ""); a Zarr shard is a folder of files. Both backends are pure
codecs between `ShardData` and those bytes, so any fsspec filesystem works and one read serves
both the checksum and the parse.
"""

import posixpath
import uuid

from logitcache.storage import arrow_backend, zarr_backend
from logitcache.storage.errors import ConfigError, ShardError
from logitcache.storage.paths import atomic_rename, checksum, is_local

__all__ = ["BACKENDS", "get_backend", "shard_name", "write_shard_files", "read_shard_files"]

BACKENDS = {"arrow": arrow_backend, "zarr": zarr_backend}


def get_backend(name: str):
    if name not in BACKENDS:
        raise ConfigError(f"unknown cache format {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def shard_name(backend: str, shard_id: int) -> str:
    return f"shard-{shard_id:05d}{get_backend(backend).SUFFIX}"


def write_shard_files(fs, path: str, files: dict[str, bytes]) -> tuple[str, int]:
    """Write a shard so that no reader ever sees it partial. Returns (sha256, total bytes).

    Local disk: write under a temporary name, then rename into place. Object stores have no atomic
    rename (it is a copy), so the shard is uploaded straight to its name after clearing any partial
    upload of an interrupted run; it becomes visible only when its entry, written after the upload,
    and then the index name it. Readers never list a cache: they open what the index names.
    """
    local = is_local(fs)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    if local:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    elif fs.exists(path):
        fs.rm(path, recursive=True)
    try:
        if list(files) == [""]:
            fs.pipe_file(target, files[""])
        else:
            if local:
                for folder in {posixpath.dirname(posixpath.join(target, rel)) for rel in files}:
                    fs.makedirs(folder, exist_ok=True)
            fs.pipe({posixpath.join(target, rel): data for rel, data in files.items()})
        if local:
            atomic_rename(fs, target, path)
    except BaseException:
        if local and fs.exists(target):
            fs.rm(target, recursive=True)
        raise
    return checksum(files), sum(len(b) for b in files.values())


def read_shard_files(fs, path: str, backend: str) -> dict[str, bytes]:
    """Read a shard's bytes. Raises ShardError if it is missing."""
    try:
        if get_backend(backend).SUFFIX == ".parquet":
            return {"": fs.cat_file(path)}
        paths = fs.find(path)
        if not paths:
            raise FileNotFoundError(path)
        root = path.rstrip("/") + "/"
        data = fs.cat(paths)
        return {p[len(root):] if p.startswith(root) else posixpath.relpath(p, path): data[p] for p in paths}
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise ShardError(f"{path}: shard is missing ({e.__class__.__name__})") from None
