"""Stage one's bookkeeping: which rows go to which shard and job, the job record, and finalizing.

Shards are fixed row ranges: shard s holds source rows [s*R, min((s+1)*R, num_rows)), R =
`rows_per_shard`, whatever rows are skipped inside it. Job j of N (`--num-jobs N
--job-index j`) owns the shards with s % N == j. Both are functions of the settings alone,
so a rerun, another job or a Ray actor computes the same shard from the same rows.

Each job writes `job.json` into the cache: everything `finalize_cache` needs besides the shard
entries (fingerprint, layout, index metadata). Jobs of one cache write identical records, so
`logitcache merge CACHE` can finalize without the original arguments.
"""

from __future__ import annotations

import hashlib
import json

from logitcache.stages.precompute.data import SKIP_REASONS
from logitcache.storage import CacheIndexError, CacheWriter, ConfigError, atomic_write_bytes, resolve, safe_join

__all__ = ["JOB_RECORD", "num_shards", "shard_rows", "owned_shards", "sequence_seed", "write_job_record",
           "read_job_record", "writer_from_record", "finalize_cache"]

JOB_RECORD = "job.json"
# Keys of a job record; `fingerprint_parts` lets a mismatch name what changed.
_RECORD_KEYS = ("fingerprint", "fingerprint_parts", "backend", "encoding", "logits_width", "text_fields",
                "num_shards", "rows_per_shard", "metadata")


def num_shards(num_rows: int, rows_per_shard: int) -> int:
    """Storage shards for a dataset of `num_rows` rows (at least 1)."""
    return max(1, -(-num_rows // rows_per_shard))


def shard_rows(shard_id: int, rows_per_shard: int, num_rows: int) -> tuple[int, int]:
    """Source rows [a, b) of shard `shard_id`."""
    a = shard_id * rows_per_shard
    return a, min(a + rows_per_shard, num_rows)


def owned_shards(total: int, num_jobs: int, job_index: int) -> list[int]:
    """Shard ids job `job_index` of `num_jobs` writes: s % num_jobs == job_index.

    Round-robin rather than contiguous blocks, so jobs finish at about the same time when
    row lengths drift through the dataset.
    """
    if num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise ConfigError(f"--job-index {job_index} must lie in [0, --num-jobs {num_jobs})")
    return [s for s in range(total) if s % num_jobs == job_index]


def sequence_seed(seed: int, row: int) -> int:
    """Sample-mode seed of the sequence from source row `row`: independent of batching and jobs."""
    return int.from_bytes(hashlib.sha256(f"logitcache-rs-kd/{seed}/{row}".encode()).digest()[:8], "little")


def write_job_record(writer: CacheWriter, record: dict) -> None:
    """Write `job.json`, or check that the one there is identical.

    Raises:
        ConfigError: the cache was started with other settings; names what differs.
    """
    assert set(record) == set(_RECORD_KEYS), sorted(record)
    existing = _read_record(writer.fs, writer.root, writer.url)
    if existing is None:
        atomic_write_bytes(writer.fs, safe_join(writer.root, JOB_RECORD),
                           json.dumps(record, indent=1, sort_keys=True).encode())
        return
    if existing != json.loads(json.dumps(record)):
        raise ConfigError(f"{writer.url} was started with other settings ({_differences(existing, record)}). "
                          "Rerun with the original settings, use another --out, or delete the cache to start over.")


def read_job_record(url: str, *, storage_options: dict | None = None) -> dict:
    """The cache's `job.json`.

    Raises:
        CacheIndexError: no record, or an unreadable one.
    """
    record = _read_record(*resolve(url, storage_options), url)
    if record is None:
        raise CacheIndexError(f"{url}: no {JOB_RECORD}; not a cache started by `logitcache precompute`")
    return record


def _read_record(fs, root: str, url: str) -> dict | None:
    path = safe_join(root, JOB_RECORD)
    try:
        record = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CacheIndexError(f"{url}/{JOB_RECORD}: unreadable job record ({e})") from None
    if not isinstance(record, dict) or set(record) != set(_RECORD_KEYS):
        raise CacheIndexError(f"{url}/{JOB_RECORD}: a job record needs exactly the keys {list(_RECORD_KEYS)}")
    return record


def writer_from_record(url: str, record: dict, *, storage_options: dict | None = None) -> CacheWriter:
    """The `CacheWriter` a job with this record writes with."""
    return CacheWriter(url, backend=record["backend"], encoding=record["encoding"],
                       vocab_size=record["logits_width"], fingerprint=record["fingerprint"],
                       text_fields=tuple(record["text_fields"]), storage_options=storage_options)


def finalize_cache(writer: CacheWriter, record: dict, *, done: dict[int, dict] | None = None) -> dict:
    """Write the index from the shard entries: counts summed over shards, engine versions and head checks gathered.

    Args:
        writer: the cache's writer (`writer_from_record`).
        record: the job record.
        done: {shard id: entry} as `writer.finished_shards()` returns it, when the caller has just
            read it; default: read here.

    Raises:
        CacheIndexError: shards are missing (named), or two shards overlap.
    """
    done = writer.finished_shards() if done is None else done
    missing = [s for s in range(record["num_shards"]) if s not in done]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise CacheIndexError(f"{writer.url}: cannot finalize, {len(missing)} of {record['num_shards']} shard(s) "
                              f"not written yet: {shown}. Run the jobs that own them (shard s belongs to "
                              f"--job-index s % N) until they finish, then merge again.")
    entries = [done[s] for s in range(record["num_shards"])]
    counts = {"rows": sum(e["rows"][1] - e["rows"][0] for e in entries),
              "truncated": sum(e["truncated"] for e in entries),
              "skipped": sum(sum(e["skipped"].values()) for e in entries)}
    for reason in SKIP_REASONS:
        counts[f"skipped_{reason}"] = sum(e["skipped"].get(reason, 0) for e in entries)
    metadata = json.loads(json.dumps(record["metadata"]))
    versions = sorted({e["engine_version"] for e in entries})
    metadata["engine"]["version"] = versions[0] if len(versions) == 1 else versions
    # Verified only if every shard's engine ran the head check (a resumed job may have skipped it).
    checks = [e.get("head_check_max_diff") for e in entries]
    metadata["engine"]["head_check_max_diff"] = max(checks) if checks and None not in checks else None
    return writer.finalize(metadata, num_shards=record["num_shards"], counts=counts, done=done)


def _differences(old: dict, new: dict) -> str:
    new = json.loads(json.dumps(new))
    if old.get("fingerprint") != new.get("fingerprint"):
        parts_old, parts_new = old.get("fingerprint_parts", {}), new.get("fingerprint_parts", {})
        changed = [k for k in sorted(set(parts_old) | set(parts_new)) if parts_old.get(k) != parts_new.get(k)]
        return "fingerprint differs in: " + "; ".join(
            f"{k}: {json.dumps(parts_old.get(k))} -> {json.dumps(parts_new.get(k))}" for k in changed)
    changed = [k for k in _RECORD_KEYS if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in changed)
