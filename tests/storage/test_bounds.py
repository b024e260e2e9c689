"""An untrusted cache cannot exhaust memory: sizes a shard (or its index entry) declares are checked
against the index before anything is decoded (storage/bounds.py). Each forged shard comes with a
forged index whose sha256 and bytes match it, as a malicious writer would make it; each read is
refused with a one-line ShardError, and its peak Python allocation (tracemalloc, numpy included)
stays far below what the shard declares.

    .venv/bin/python -m pytest tests/storage/test_bounds.py -q
"""

import io
import json
import struct
import tracemalloc
from pathlib import Path

import numcodecs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.storage import ShardError, open_cache
from logitcache.storage.backends import read_shard_files, shard_checksum
from logitcache.storage.paths import resolve

LIMIT = 32 << 20  # bytes a refused read may allocate; every forgery declares far more


def reindex(root: str, shard: int = 0, **fields) -> None:
    """Make the index agree with shard `shard` as it now is on disk (sha256, bytes), plus `fields`."""
    index = json.loads(Path(root, "index.json").read_text())
    entry = index["shards"][shard]
    fs, base = resolve(root)
    payload = read_shard_files(fs, f"{base}/{entry['name']}", index["backend"])
    entry["sha256"] = shard_checksum(index["backend"], payload)
    entry["bytes"] = len(payload) if isinstance(payload, bytes) else sum(map(len, payload.values()))
    entry.update(fields)
    for key in ("sequences", "tokens", "positions"):  # the totals agree, as a forger would make them
        index["counts"][key] = sum(e[key] for e in index["shards"])
    Path(root, "index.json").write_text(json.dumps(index))


def refused(root: str, pattern: str) -> None:
    cache = open_cache(root)
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=pattern) as error:
            cache.read_shard(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(error.value) and "shard-00000" in str(error.value)
    assert peak < LIMIT, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_zarr_shape_beyond_the_index(build_cache):
    root, _ = build_cache("zarr")
    meta = Path(root, "shard-00000.zarr", "input_ids", "zarr.json")
    doc = json.loads(meta.read_text())
    doc["shape"] = [10**9]
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [10**9]
    meta.write_text(json.dumps(doc))
    reindex(root)
    refused(root, r"input_ids declares shape \[1000000000\]")


def test_zarr_blosc_chunk_that_declares_a_gigabyte(build_cache):
    root, _ = build_cache("zarr")
    shard = Path(root, "shard-00000.zarr", "topk_logprobs", "c", "0", "0")
    data = bytearray(shard.read_bytes())
    offset = struct.unpack_from("<Q", data, len(data) - 20)[0]  # the one inner chunk's offset
    struct.pack_into("<I", data, offset + 4, 2**31 - 1)  # its Blosc header: decompressed size
    shard.write_bytes(bytes(data))
    reindex(root)
    refused(root, "a compressed chunk declares 2147483647 bytes")


def test_zarr_text_chunk_decompression_bomb(build_cache):
    root, _ = build_cache("zarr")
    chunks = [p for p in Path(root, "shard-00000.zarr", "text").rglob("c/*") if p.is_file()]
    bomb = numcodecs.Zstd(level=19).encode(b"\0" * (256 << 20))  # 256 MiB in a few KB
    assert len(bomb) < 64 << 10
    chunks[0].write_bytes(bomb)
    reindex(root)
    refused(root, "a decompression bomb")


def test_parquet_footer_row_count_beyond_the_index(build_cache):
    root, _ = build_cache("arrow")
    reindex(root, sequences=3)  # the shard holds 4 rows
    refused(root, "footer declares 4 rows, the index 3 sequences")


def test_parquet_column_that_decompresses_beyond_the_index(build_cache):
    root, _ = build_cache("arrow")
    path = Path(root, "shard-00000.parquet")
    table = pq.read_table(path)
    text = next(name for name in table.column_names if table.schema.field(name).type == pa.string())
    bomb = table.set_column(table.column_names.index(text), text, pa.array(["a" * (16 << 20)] * table.num_rows))
    buf = io.BytesIO()
    pq.write_table(bomb, buf, compression="zstd")
    assert buf.tell() < 1 << 20
    path.write_bytes(buf.getvalue())
    reindex(root)
    refused(root, f"column chunk {text} declares")


def test_index_entry_that_claims_more_than_its_bytes_can_hold(build_cache):
    root, _ = build_cache("arrow")
    reindex(root, positions=10**9)
    refused(root, "more than 1024x its size; refused before reading")
