"""The names inside a cache folder, defined once: shards, their entries, and temporary files.

    index.json                            written last; its presence means "finished"
    job.json                              stage one's job record (settings every job shares)
    shard-00042.parquet | shard-00042.zarr/   a shard: `shard_name(suffix, 42)`
    entries/shard-00042.zarr.json         its entry, written once the shard is complete
    leases/job-0-of-1.json                a running job's write lease (`lease.py`); gone when it ends
    <any of the above>.tmp-1a2b3c4d       a write in progress (local disk), renamed into place

Every reader and writer, in storage and in the stages, builds and parses these names here.
"""

from __future__ import annotations

import re
import uuid

__all__ = ["INDEX_NAME", "ENTRIES_DIR", "TMP_MARKER", "SHARD_ID_DIGITS", "shard_name", "shard_id_of",
           "entry_name", "entry_shard_id", "temporary_path", "temporary_shard_id", "LEASES_DIR", "lease_name"]

INDEX_NAME = "index.json"
ENTRIES_DIR = "entries"
LEASES_DIR = "leases"
# A temporary name is the final name + TMP_MARKER + 8 hex digits; readers never open one.
TMP_MARKER = ".tmp-"
SHARD_ID_DIGITS = 5

_SHARD = r"shard-(\d{5})\.[a-z0-9]+"
_SHARD_NAME = re.compile(rf"^{_SHARD}$")
_ENTRY_NAME = re.compile(rf"^{_SHARD}\.json$")
_TEMPORARY = re.compile(rf"^{_SHARD}(?:\.json)?{re.escape(TMP_MARKER)}[0-9a-f]+$")


def shard_name(suffix: str, shard_id: int) -> str:
    """The shard's name in the cache folder, e.g. ``shard_name(".zarr", 42) == "shard-00042.zarr"``.

    Args:
        suffix: the backend's suffix, with its dot.
        shard_id: 0-based, below 10**5.
    """
    if not 0 <= shard_id < 10**SHARD_ID_DIGITS:
        raise ValueError(f"shard id {shard_id} outside [0, {10**SHARD_ID_DIGITS})")
    return f"shard-{shard_id:0{SHARD_ID_DIGITS}d}{suffix}"


def shard_id_of(name: str) -> int | None:
    """The id in a shard name (``"shard-00042.zarr"`` -> 42), or None for any other name."""
    match = _SHARD_NAME.match(name)
    return int(match.group(1)) if match else None


def entry_name(shard: str) -> str:
    """The entry file of a shard, relative to the cache root: ``entries/<shard>.json``."""
    return f"{ENTRIES_DIR}/{shard}.json"


def entry_shard_id(basename: str) -> int | None:
    """The shard id of an entry file's base name (``"shard-00042.zarr.json"`` -> 42), else None."""
    match = _ENTRY_NAME.match(basename)
    return int(match.group(1)) if match else None


def temporary_path(path: str) -> str:
    """A fresh temporary sibling of `path` (``path + ".tmp-" + 8 hex digits``)."""
    return f"{path}{TMP_MARKER}{uuid.uuid4().hex[:8]}"


def temporary_shard_id(basename: str) -> int | None:
    """The shard id of a temporary shard or entry file's base name, else None."""
    match = _TEMPORARY.match(basename)
    return int(match.group(1)) if match else None


def lease_name(num_jobs: int, job_index: int) -> str:
    """The lease file of job `job_index` of `num_jobs` under `LEASES_DIR`, e.g. ``"job-0-of-1.json"``."""
    return f"job-{job_index}-of-{num_jobs}.json"
