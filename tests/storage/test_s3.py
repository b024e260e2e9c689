"""Caches written and read through s3:// URLs against a real S3-compatible server on loopback.

    pytest tests/storage/test_s3.py
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from s3server import make_bucket, s3_options
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.storage import CacheWriter, ShardData, ShardError, convert_cache, open_cache


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_write_read_validate_on_s3(s3, backend, tmp_path):
    endpoint, _ = s3
    bucket = f"lc-{backend}"
    make_bucket(endpoint, bucket)
    opts = s3_options(endpoint)
    url = f"s3://{bucket}/caches/one"
    rng = np.random.default_rng(0)
    seqs = [make_sequence(rng, i, 20, 8) for i in range(6)]
    w = CacheWriter(url, backend=backend, encoding="compact", vocab_size=VOCAB, fingerprint="s3",
                    text_fields=TEXT_FIELDS, storage_options=opts)
    w.write_shard(0, ShardData.from_sequences(seqs[:3], text_fields=TEXT_FIELDS), extra={"rows": [0, 3]})
    # A second writer (a resumed job) sees shard 0 as finished.
    again = CacheWriter(url, backend=backend, encoding="compact", vocab_size=VOCAB, fingerprint="s3",
                        text_fields=TEXT_FIELDS, storage_options=opts)
    assert list(again.finished_shards()) == [0]
    again.write_shard(1, ShardData.from_sequences(seqs[3:], text_fields=TEXT_FIELDS), extra={"rows": [3, 6]})
    again.finalize(metadata(8))
    cache = open_cache(url, storage_options=opts)
    assert len(cache) == 6 and cache.validate() == []
    np.testing.assert_array_equal(cache[4]["topk_ids"], seqs[4]["topk_ids"])
    # Round-trip to local disk and back is lossless.
    local = str(tmp_path / "local")
    convert_cache(url, local, backend="arrow" if backend == "zarr" else "zarr", storage_options=opts, progress=False)
    np.testing.assert_array_equal(open_cache(local)[5]["topk_logprobs"], cache[5]["topk_logprobs"])


def test_s3_corruption_caught_by_checksum(s3):
    import s3fs

    endpoint, _ = s3
    make_bucket(endpoint, "lc-corrupt")
    opts = s3_options(endpoint)
    url = "s3://lc-corrupt/c"
    rng = np.random.default_rng(1)
    w = CacheWriter(url, backend="arrow", encoding="lossless", vocab_size=VOCAB, fingerprint="x",
                    text_fields=TEXT_FIELDS, storage_options=opts)
    w.write_shard(0, ShardData.from_sequences([make_sequence(rng, 0, 12, 4)], text_fields=TEXT_FIELDS))
    w.finalize(metadata(4))
    fs = s3fs.S3FileSystem(**opts)
    data = bytearray(fs.cat_file("lc-corrupt/c/shard-00000.parquet"))
    data[100] ^= 0xFF
    fs.pipe_file("lc-corrupt/c/shard-00000.parquet", bytes(data))
    with pytest.raises(ShardError, match="checksum"):
        open_cache(url, storage_options=opts)[0]


def test_cli_validate_reads_s3_with_env_credentials(s3):
    """The CLI takes plain s3:// URLs; credentials and endpoint come from the usual AWS variables."""
    endpoint, env = s3
    make_bucket(endpoint, "lc-cli")
    opts = s3_options(endpoint)
    rng = np.random.default_rng(2)
    w = CacheWriter("s3://lc-cli/c", backend="zarr", encoding="compact", vocab_size=VOCAB, fingerprint="y",
                    text_fields=TEXT_FIELDS, storage_options=opts)
    w.write_shard(0, ShardData.from_sequences([make_sequence(rng, 0, 12, 4)], text_fields=TEXT_FIELDS))
    w.finalize(metadata(4))
    res = subprocess.run([sys.executable, "-m", "logitcache.pipeline.cli", "validate", "s3://lc-cli/c"],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout and "1 shard" in res.stdout


def _read_in_child(cache, queue):
    queue.put(int(cache[0]["topk_ids"].sum()))


def test_cache_opened_in_parent_reads_in_forked_child(s3):
    """DataLoader workers are forked: the reader must not carry the parent's s3fs instance into them."""
    import multiprocessing as mp

    endpoint, _ = s3
    make_bucket(endpoint, "lc-fork")
    opts = s3_options(endpoint)
    rng = np.random.default_rng(3)
    w = CacheWriter("s3://lc-fork/c", backend="arrow", encoding="lossless", vocab_size=VOCAB, fingerprint="k",
                    text_fields=TEXT_FIELDS, storage_options=opts)
    seq = make_sequence(rng, 0, 12, 4)
    w.write_shard(0, ShardData.from_sequences([seq], text_fields=TEXT_FIELDS))
    w.finalize(metadata(4))
    cache = open_cache("s3://lc-fork/c", storage_options=opts)
    assert len(cache) == 1  # the parent has used its filesystem
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(cache, queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == int(seq["topk_ids"].sum())


def test_unreachable_endpoint_is_our_error():
    """No server behind the endpoint: a clear StorageIOError naming the cache, not a botocore traceback."""
    from s3server import _free_port

    from logitcache.storage.errors import StorageIOError

    opts = s3_options(f"http://127.0.0.1:{_free_port()}")
    opts["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
    with pytest.raises(StorageIOError, match="s3://nowhere/cache: .*index.json: cannot read"):
        open_cache("s3://nowhere/cache", storage_options=opts)
