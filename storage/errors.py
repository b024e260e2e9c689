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
