"""`countfs://`: local files behind fsspec's buffered-file machinery (the one s3fs, gcsfs and HfFileSystem
use), recording every byte range fetched, so tests can assert how much of a dataset was read.

    fs = CountingFS(); fs.fetched.clear(); ...; fs.bytes_read(), fs.files_read()
"""

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem


class CountingFS(AbstractFileSystem):
    protocol = "countfs"
    fetched: list[tuple[str, int, int]] = []  # (path, start, end) of every range read, class-wide

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.local = LocalFileSystem()

    def ls(self, path, detail=True, **kwargs):
        return self.local.ls(self._strip_protocol(path), detail=detail)

    def info(self, path, **kwargs):
        return self.local.info(self._strip_protocol(path))

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        return _File(self, self._strip_protocol(path), mode, block_size=block_size or 1 << 16,
                     cache_options=cache_options, **kwargs)

    @classmethod
    def bytes_read(cls) -> int:
        return sum(end - start for _, start, end in cls.fetched)

    @classmethod
    def files_read(cls) -> set[str]:
        return {path for path, _, _ in cls.fetched}


class _File(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        CountingFS.fetched.append((self.path, start, start + len(data)))
        return data


fsspec.register_implementation("countfs", CountingFS, clobber=True)
