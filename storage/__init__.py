"""The logitcache format: sparse teacher targets in Zarr v3 or Parquet shards, with a JSON index.

This package stands alone: a reader of a shared cache needs nothing else from logitcache.

    from logitcache.storage import open_cache, CacheWriter, ConfigError

Names are imported on first use (PEP 562), as scipy and transformers do: importing one submodule
(`logitcache.storage.head`, `.errors`) does not import zarr, pyarrow or fsspec. The lent GPU machine
has no zarr, and `logitcache --help` need not pay for the backends.
"""

import importlib

# The public names, by the submodule that defines them (one declaration: `__all__` is read from it).
_EXPORTS = {
    "layout": ("layout",),  # a submodule itself
    "backend_base": ("Backend", "SingleFileBackend", "FolderBackend"),
    "backends": ("BACKENDS", "get_backend", "shard_name"),
    "cache": ("Cache", "open_cache"),
    "convert": ("convert_cache",),
    "encoding": ("COMPACT_STEP", "ENCODINGS", "encode_logprobs", "decode_logprobs"),
    "errors": ("LogitCacheError", "CacheIndexError", "ShardError", "FormatVersionError", "UnsafePathError",
               "InvalidDataError", "ConfigError", "CacheBusyError"),
    "fingerprint": ("tokenizer_fingerprint",),
    "index": ("FORMAT_VERSION", "chain_fingerprint", "read_index"),
    "paths": ("resolve", "safe_join", "atomic_write_bytes"),
    "shard": ("ShardData",),
    "writer": ("CacheWriter",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    imported = importlib.import_module(f"{__name__}.{module}")
    value = imported if module == name else getattr(imported, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
