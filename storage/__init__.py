"""The logitcache format: sparse teacher targets in Zarr v3 or Parquet shards, with a JSON index.

This package stands alone: a reader of a shared cache needs nothing else from logitcache.
"""

from logitcache.storage import layout
from logitcache.storage.backend_base import Backend, FolderBackend, SingleFileBackend
from logitcache.storage.backends import BACKENDS, get_backend, shard_name
from logitcache.storage.cache import Cache, open_cache
from logitcache.storage.convert import convert_cache
from logitcache.storage.encoding import COMPACT_STEP, ENCODINGS, decode_logprobs, encode_logprobs
from logitcache.storage.errors import (CacheIndexError, ConfigError, FormatVersionError, InvalidDataError,
                                       LogitCacheError, ShardError, UnsafePathError)
from logitcache.storage.fingerprint import tokenizer_fingerprint
from logitcache.storage.index import FORMAT_VERSION, chain_fingerprint, read_index
from logitcache.storage.paths import atomic_write_bytes, resolve, safe_join
from logitcache.storage.shard import ShardData
from logitcache.storage.writer import CacheWriter

__all__ = [
    "BACKENDS", "COMPACT_STEP", "ENCODINGS", "FORMAT_VERSION",
    "Backend", "SingleFileBackend", "FolderBackend", "get_backend", "layout",
    "resolve", "safe_join", "atomic_write_bytes",
    "Cache", "CacheWriter", "convert_cache", "ShardData", "open_cache", "read_index", "shard_name",
    "chain_fingerprint", "tokenizer_fingerprint", "encode_logprobs", "decode_logprobs",
    "LogitCacheError", "CacheIndexError", "ShardError", "FormatVersionError", "UnsafePathError",
    "InvalidDataError", "ConfigError",
]
