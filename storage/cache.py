"""`open_cache`: the reader of a finished cache.

    cache = open_cache("gs://bucket/cache")         # or a local path
    len(cache); cache.index; cache[17]["topk_ids"]  # (P, K) int32
    for seq in cache: ...                           # in order, one shard in memory at a time
    for shard_id, shard in cache.iter_shards(): ... # ShardData, flat columns
"""

import bisect
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from logitcache.storage.backends import get_backend, read_shard_files
from logitcache.storage.bounds import check_entry
from logitcache.storage.errors import LogitCacheError, ShardError, StorageIOError, io_failure
from logitcache.storage.index import read_index
from logitcache.storage.paths import resolve, safe_join
from logitcache.storage.readahead import READ_AHEAD_BYTES, READ_WORKERS, read_ahead
from logitcache.storage.shard import ShardData

__all__ = ["Cache", "open_cache"]


def open_cache(path_or_url: str, *, storage_options: dict | None = None, verify: bool = True) -> "Cache":
    """Open a finished cache for reading.

    Args:
        path_or_url: cache directory or fsspec URL (``s3://...``, ``memory://...``).
        storage_options: passed to fsspec (credentials, endpoint).
        verify: check each shard's sha256 against the index when it is read.

    Raises:
        CacheIndexError: no index (unfinished cache) or an invalid one.
        FormatVersionError: written by a format version this library cannot read.
    """
    fs, root = resolve(path_or_url, storage_options)
    try:
        index = read_index(fs, root)
    except StorageIOError as e:  # name the URL as the user gave it (with its protocol)
        raise StorageIOError(f"opening the cache {path_or_url}: {e}") from None
    return Cache(fs, root, index, url=str(path_or_url), verify=verify, storage_options=storage_options)


class Cache:
    """A finished cache: random access by sequence, iteration in order or by shard."""

    def __init__(self, fs, root: str, index: dict, *, url: str, verify: bool = True, keep_shards: int = 2,
                 storage_options: dict | None = None):
        self._fs, self._pid, self.storage_options = fs, os.getpid(), storage_options
        self.root, self.index, self.url, self.verify = root, index, url, verify
        self.shards = index["shards"]
        # starts[j] is the global number of the first sequence in shard j.
        self._starts = np.concatenate([[0], np.cumsum([e["sequences"] for e in self.shards])]).tolist()
        self._lru: OrderedDict[int, ShardData] = OrderedDict()
        self._keep = keep_shards

    def __repr__(self) -> str:
        return (f"Cache({self.url!r}, sequences={len(self)}, shards={len(self.shards)}, "
                f"backend={self.backend!r}, mode={self.mode!r}, k={self.k})")

    @property
    def fs(self):
        """The filesystem, re-resolved after a fork: async ones (s3fs, gcsfs) refuse to run in a child
        process, and DataLoader workers are forked children."""
        if os.getpid() != self._pid:
            self._fs, self._pid = resolve(self.url, self.storage_options)[0], os.getpid()
        return self._fs

    @property
    def backend(self) -> str:
        return self.index["backend"]

    @property
    def mode(self) -> str:
        return self.index["sparsification"]["mode"]

    @property
    def k(self) -> int:
        return self.index["sparsification"]["k"]

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> dict:
        """Sequence `i` as a dict: input_ids (T,), positions (P,), topk_ids (P, K), topk_logprobs (P, K),
        target_logprob (P,), tail_mass (P,), [sample_counts (P, K)], row_index, and its text fields."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        i %= n
        j = bisect.bisect_right(self._starts, i) - 1
        return self.shard(j).sequence(i - self._starts[j])

    def __iter__(self) -> Iterator[dict]:
        for _, shard in self.iter_shards():
            for s in range(shard.num_sequences):
                yield shard.sequence(s)

    def iter_shards(self, order=None, *, read_ahead_bytes: int = READ_AHEAD_BYTES,
                    read_workers: int = READ_WORKERS) -> Iterator[tuple[int, ShardData]]:
        """Yield (shard id, ShardData) in `order` (default: index order; any iterable, read lazily).

        The next shards' bytes are fetched (and checksummed) in threads while this one is decoded and
        used: up to `read_workers` at once, holding at most `read_ahead_bytes` of them (see
        `readahead.read_ahead`; 0 reads one shard at a time). Decoded, one shard at a time.
        """
        order = range(len(self.shards)) if order is None else order
        fetched = read_ahead(self._fetch, order, size=lambda j: self.shards[j]["bytes"], budget=read_ahead_bytes,
                             workers=read_workers)
        try:
            for j, payload in fetched:
                yield j, self._decode(j, payload)
        finally:
            fetched.close()

    def shard(self, j: int) -> ShardData:
        """Shard `j`, from a small LRU so random access within a shard stays cheap."""
        if j in self._lru:
            self._lru.move_to_end(j)
            return self._lru[j]
        data = self.read_shard(j)
        self._lru[j] = data
        while len(self._lru) > self._keep:
            self._lru.popitem(last=False)
        return data

    def read_shard(self, j: int, *, verify: bool | None = None) -> ShardData:
        """Read and decode shard `j`, checking it against its index entry.

        Raises:
            ShardError: missing, checksum mismatch, undecodable, or counts that disagree with the index.
            StorageIOError: the disk or the object store failed while reading it.
        """
        return self._decode(j, self._fetch(j, verify=verify))

    def _fetch(self, j: int, *, verify: bool | None = None):
        """Shard `j`'s payload, checksummed: the part of a read that waits on the store (thread-safe)."""
        entry = self.shards[j]
        path = safe_join(self.root, entry["name"])
        backend = get_backend(self.backend)
        check_entry(entry, self.k, path)  # before reading: what it declares is bounded by its bytes
        try:
            payload = read_shard_files(self.fs, path, self.backend)
        except LogitCacheError:
            raise
        except Exception as e:  # the disk or the store failed (not the data): say which shard was being read
            failure = io_failure(e, f"reading {entry['name']} of {self.url}")
            if failure is None:
                raise
            raise failure from e
        if backend.nbytes(payload) != entry["bytes"]:
            raise ShardError(f"{path}: {backend.nbytes(payload)} bytes stored, the index says {entry['bytes']} "
                             f"(truncated or replaced)")
        if (self.verify if verify is None else verify) and backend.checksum(payload) != entry["sha256"]:
            raise ShardError(f"{path}: checksum mismatch (truncated or corrupted; expected sha256 {entry['sha256'][:16]}...)")
        return payload

    def _decode(self, j: int, payload) -> ShardData:
        entry = self.shards[j]
        path = safe_join(self.root, entry["name"])
        try:
            backend = get_backend(self.backend)
            backend.check_sizes(payload, entry=entry, k=self.k, text_fields=self.index.get("text_fields", []),
                                where=path)
            data, attrs = backend.decode(payload)
        except LogitCacheError:
            raise
        except Exception as e:  # any parse failure of untrusted bytes becomes our error
            raise ShardError(f"{path}: cannot decode shard ({e.__class__.__name__}: {e})") from None
        self._check_against_entry(data, attrs, entry, path)
        if data.sample_logz is not None:
            data.sample_temperature = float(self.index["sparsification"].get("temperature", 1.0))
        return data

    def _check_against_entry(self, data: ShardData, attrs: dict, entry: dict, path: str) -> None:
        got = {"sequences": data.num_sequences, "tokens": len(data.input_ids), "positions": len(data.positions)}
        for key, value in got.items():
            if entry[key] != value:
                raise ShardError(f"{path}: has {value} {key}, the index says {entry[key]}")
        if attrs.get("fingerprint") != self.fingerprint:
            raise ShardError(f"{path}: belongs to another cache (fingerprint {attrs.get('fingerprint')!r})")
        try:
            data.validate(vocab_size=self.index["tokenizer"]["logits_width"], where=path)
        except LogitCacheError as e:
            raise ShardError(str(e)) from None
        if data.k != self.k and self.mode == "topk":
            raise ShardError(f"{path}: K={data.k}, the index says {self.k}")

    def validate(self, *, progress: bool = False) -> list[str]:
        """Read every shard with checksums on. Returns one problem line per bad shard (empty: all good).

        `progress`: a tqdm bar on stderr, in shards."""
        from tqdm.auto import tqdm

        problems = []
        for j, entry in enumerate(tqdm(self.shards, desc="validate", unit="shard", disable=not progress)):
            try:
                self.read_shard(j, verify=True)
            except StorageIOError:
                raise  # the store failed, not the shard: no verdict on this or any later shard
            except LogitCacheError as e:
                problems.append(f"{entry['name']}: {e}")
        return problems
