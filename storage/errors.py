"""The library's own exception types.

Every data error raised by logitcache is a `LogitCacheError`, so callers can catch one type.
Messages name the file, shard or field at fault and what was expected.
"""

__all__ = [
    "LogitCacheError",
    "CacheIndexError",
    "ShardError",
    "FormatVersionError",
    "UnsafePathError",
    "InvalidDataError",
    "ConfigError",
    "StorageIOError",
    "CacheBusyError",
    "io_failure",
]


class LogitCacheError(Exception):
    """Base class of every error logitcache raises for bad input."""


class CacheIndexError(LogitCacheError):
    """The index is missing, partial, or does not match the format's schema."""


class ShardError(LogitCacheError):
    """A shard is missing, truncated, corrupt (checksum), or disagrees with its index entry."""


class FormatVersionError(CacheIndexError):
    """The cache was written by a format version this library cannot read."""


class UnsafePathError(CacheIndexError):
    """A path named in an index would escape the cache directory."""


class InvalidDataError(LogitCacheError, ValueError):
    """Arrays handed to the writer are malformed: wrong shapes, NaN/inf, ids out of range."""


class ConfigError(LogitCacheError, ValueError):
    """A command-line or YAML setting is invalid, or inputs do not fit together."""


class StorageIOError(LogitCacheError, OSError):
    """Reading or writing failed outside the data: a disk full, a permission denied, an object store
    that does not answer. Also an `OSError`, so code that catches those keeps working."""

    @classmethod
    def wrap(cls, error: OSError, doing: str = "") -> "StorageIOError":
        """A one-line `StorageIOError` for `error`, naming the path(s) it names and what was being done."""
        reason = error.strerror or str(error) or type(error).__name__
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        message = f"{doing + ': ' if doing else ''}{paths + ': ' if paths else ''}{reason}"
        out = cls(error.errno, message) if error.errno is not None else cls(message)
        if error.filename is not None:
            out.filename = error.filename
        return out

    def __str__(self) -> str:
        # OSError's own str() is "[Errno N] strerror"; the message alone reads better on one line.
        return self.strerror if self.strerror is not None else super().__str__()


class CacheBusyError(LogitCacheError):
    """Another live run holds the cache's (or this job's) write lease (`storage/lease.py`)."""


# Clients whose own exceptions mean "the store or network failed", not a bug in logitcache.
_NETWORK_CLIENTS = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure")


def io_failure(error: BaseException, doing: str = "") -> StorageIOError | None:
    """`error` as a `StorageIOError` when it is an I/O failure (an `OSError`, or a network client's
    own error, e.g. botocore's EndpointConnectionError); None for anything else."""
    if isinstance(error, StorageIOError):
        return error
    if isinstance(error, OSError):
        return StorageIOError.wrap(error, doing)
    if type(error).__module__.split(".")[0] in _NETWORK_CLIENTS:
        return StorageIOError(f"{doing + ': ' if doing else ''}{type(error).__name__}: {error}")
    return None
