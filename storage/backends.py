"""The backend registry, and shard I/O through it: atomic writes, reads that say what is missing.

    backend = get_backend("zarr")                  # a ZarrBackend (a FolderBackend)
    name = shard_name("zarr", 42)                  # "shard-00042.zarr"
    sha, nbytes = write_shard_files(fs, path, "zarr", backend.encode(shard, encoding=..., attrs=...))

`BACKENDS` is the one list of backends: the index check, the CLI's choices and the docs read it.
See `backend_base` for the interface a backend implements.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

from logitcache.storage import layout
from logitcache.storage.errors import ConfigError, ShardError

if TYPE_CHECKING:
    from logitcache.storage.backend_base import Backend

__all__ = ["BACKENDS", "get_backend", "shard_name", "write_shard_files", "read_shard_files", "shard_checksum"]


class BackendRegistry(MutableMapping):
    """{name: Backend}, each declared as ``"module:Class"`` and built on first use.

    Its names cost nothing (the CLI's `--backend` choices, the index check), and a backend's module
    is imported only when that backend is used: zarr is imported by a Zarr cache, not by a Parquet job,
    `logitcache --help`, or a machine without zarr (the lent GPU machine). A `Backend` instance may be
    set directly (a third-party backend, the contract suite's test backends).
    """

    def __init__(self, declared: dict[str, str]):
        self._entries: dict[str, str | Backend] = dict(declared)

    def __getitem__(self, name: str) -> Backend:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, cls = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), cls)()
        return entry

    def __setitem__(self, name: str, backend: Backend) -> None:
        self._entries[name] = backend

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:  # without building the backend
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._entries)})"


BACKENDS = BackendRegistry({"zarr": "logitcache.storage.zarr_backend:ZarrBackend",
                            "arrow": "logitcache.storage.arrow_backend:ArrowBackend"})


def get_backend(name: str) -> Backend:
    """The backend called `name`.

    Raises:
        ConfigError: no backend has that name.
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown cache backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def shard_name(backend: str, shard_id: int) -> str:
    """Name of shard `shard_id` of a cache with this backend, e.g. ``"shard-00042.parquet"``."""
    return layout.shard_name(get_backend(backend).suffix, shard_id)


def write_shard_files(fs, path: str, backend: str, payload) -> tuple[str, int]:
    """Write a shard so that no reader ever sees it partial. Returns (sha256, total bytes).

    Local disk: write under a temporary name, then rename into place. Object stores have no atomic
    rename (it is a copy), so the shard is uploaded straight to its name after clearing any partial
    upload of an interrupted run; it becomes visible only when its entry, written after the upload,
    and then the index name it. Readers never list a cache: they open what the index names.
    """
    # Here, not at the top: `logitcache --help` reads BACKENDS' names, and this would add fsspec to it.
    from logitcache.storage.paths import atomic_rename, is_local

    impl = get_backend(backend)
    local = is_local(fs)
    target = layout.temporary_path(path) if local else path
    if not local and fs.exists(path):
        fs.rm(path, recursive=True)
    try:
        impl.put(fs, target, payload)
        if local:
            atomic_rename(fs, target, path)
    except BaseException:
        if local and fs.exists(target):
            fs.rm(target, recursive=True)
        raise
    return impl.checksum(payload), impl.nbytes(payload)


def read_shard_files(fs, path: str, backend: str):
    """Read a shard's payload (bytes for a single-file backend, {path: bytes} for a folder one).

    Raises:
        ShardError: the shard is missing (or is a folder where a file belongs, or the reverse).
    """
    try:
        return get_backend(backend).get(fs, path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise ShardError(f"{path}: shard is missing ({e.__class__.__name__})") from None


def shard_checksum(backend: str, payload) -> str:
    """The sha256 an index entry records for this payload."""
    return get_backend(backend).checksum(payload)
