"""The backend interface: a codec between `ShardData` and bytes, and the shape those bytes take on disk.

A backend is one of two kinds, and the kind is its type, not a guess from a suffix:

* `SingleFileBackend`: a shard is one file (Parquet). Its payload is `bytes`; its checksum is the
  plain sha256 of the file, so ``sha256sum shard-00000.parquet`` checks it.
* `FolderBackend`: a shard is a folder of files (a Zarr group). Its payload is
  ``{relative path: bytes}``; its checksum is the sha256 of the sorted ``"path\\0sha256(bytes)\\n"`` lines.

Both move their bytes through fsspec only, so any filesystem works, and one read of a shard serves
both its checksum and its parse. A new backend subclasses one of the two, sets `name` and
`suffix`, implements `encode` and `decode`, is added to `backends.BACKENDS`, and passes
`logitcache.storage.testing.BackendTests`.
"""

from __future__ import annotations

import abc
import hashlib
import posixpath
from typing import ClassVar, Generic, TypeVar

from logitcache.storage.shard import ShardData

__all__ = ["Backend", "SingleFileBackend", "FolderBackend"]

Payload = TypeVar("Payload")


class Backend(abc.ABC, Generic[Payload]):
    """One storage backend. Subclass `SingleFileBackend` or `FolderBackend`, not this.

    Attributes:
        name: the name in the index's ``backend`` field and on the command line ("arrow", "zarr").
        suffix: the shard name's suffix, with its dot (".parquet", ".zarr").
    """

    name: ClassVar[str]
    suffix: ClassVar[str]

    @abc.abstractmethod
    def encode(self, shard: ShardData, *, encoding: str, attrs: dict) -> Payload:
        """Serialize a validated shard; `attrs` (JSON-able) must come back from `decode`."""

    @abc.abstractmethod
    def decode(self, payload: Payload) -> tuple[ShardData, dict]:
        """Parse a payload back into (ShardData, attrs). May raise anything on malformed bytes;
        the reader turns that into a ShardError naming the shard."""

    def check_sizes(self, payload: Payload, *, entry: dict, k: int, text_fields, where: str) -> None:
        """Refuse (`ShardError`) sizes the payload declares beyond what its index `entry` allows, before
        `decode` allocates them (`bounds.py`). The default checks nothing: a backend should override it."""

    @abc.abstractmethod
    def put(self, fs, path: str, payload: Payload) -> None:
        """Write the payload at `path` (a file or a folder), creating parents as needed."""

    @abc.abstractmethod
    def get(self, fs, path: str) -> Payload:
        """Read the payload at `path`. Raises FileNotFoundError if there is none."""

    @abc.abstractmethod
    def checksum(self, payload: Payload) -> str:
        """sha256 hex digest of the payload, as recorded in the shard's index entry."""

    @abc.abstractmethod
    def nbytes(self, payload: Payload) -> int:
        """Stored size of the payload in bytes."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.suffix})>"


class SingleFileBackend(Backend[bytes]):
    """A backend whose shard is one file; the payload is its bytes."""

    def put(self, fs, path: str, payload: bytes) -> None:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, payload)

    def get(self, fs, path: str) -> bytes:
        return fs.cat_file(path)

    def checksum(self, payload: bytes) -> str:
        return hashlib.sha256(payload).hexdigest()

    def nbytes(self, payload: bytes) -> int:
        return len(payload)


class FolderBackend(Backend[dict]):
    """A backend whose shard is a folder; the payload is ``{path relative to the folder: bytes}``."""

    def put(self, fs, path: str, payload: dict[str, bytes]) -> None:
        for folder in {posixpath.dirname(posixpath.join(path, rel)) for rel in payload}:
            fs.makedirs(folder, exist_ok=True)  # a no-op on object stores
        fs.pipe({posixpath.join(path, rel): data for rel, data in payload.items()})

    def get(self, fs, path: str) -> dict[str, bytes]:
        paths = fs.find(path)
        if not paths:
            raise FileNotFoundError(path)
        root = path.rstrip("/") + "/"
        data = fs.cat(paths)
        return {p[len(root):] if p.startswith(root) else posixpath.relpath(p, path): data[p] for p in paths}

    def checksum(self, payload: dict[str, bytes]) -> str:
        h = hashlib.sha256()
        for rel in sorted(payload):
            h.update(f"{rel}\0{hashlib.sha256(payload[rel]).hexdigest()}\n".encode())
        return h.hexdigest()

    def nbytes(self, payload: dict[str, bytes]) -> int:
        return sum(len(b) for b in payload.values())
