"""`precompute --streaming`: a slice of a many-file dataset reads only part of its bytes and files
(counted through fsspec, `tests/support/counting_fs.py`), gives the rows the non-streaming loader gives, and
plans the same shards; a stopped job resumes to the cache of one uninterrupted run.

    .venv/bin/pytest tests/stages/precompute/test_streaming.py
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from counting_fs import CountingFS

from logitcache.stages.precompute.data import load_rows
from logitcache.storage.errors import ConfigError

FILES, ROWS_PER_FILE = 40, 50  # 2,000 rows


def _text(i: int) -> str:
    return f"row {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20))


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """40 Parquet files of 50 rows in row groups of 10, with an unused 4 kB 'blob' column per row."""
    root = tmp_path_factory.mktemp("stream-parquet")
    rng = np.random.default_rng(0)
    for f in range(FILES):
        rows = range(f * ROWS_PER_FILE, (f + 1) * ROWS_PER_FILE)
        table = pa.table({"text": [_text(i) for i in rows], "id": list(rows),
                          "blob": [rng.bytes(4096) for _ in rows]})
        pq.write_table(table, root / f"train-{f:05d}.parquet", row_group_size=10, compression="none")
    return root


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-jsonl")
    for f in range(FILES):
        rows = range(f * ROWS_PER_FILE, (f + 1) * ROWS_PER_FILE)
        (root / f"part-{f:05d}.jsonl").write_text("".join(json.dumps({"text": _text(i), "id": i, "pad": "x" * 2000})
                                                          + "\n" for i in rows))
    return root


def _total_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.iterdir())


def test_parquet_slice_reads_footers_and_its_row_groups_only(parquet_dir):
    CountingFS.fetched.clear()
    rows, info = load_rows(f"countfs://{parquet_dir}", streaming=True, max_rows=120)
    planned = CountingFS.bytes_read()
    assert len(rows) == 120 and info["num_rows"] == 120 and info["loader"] == "stream:parquet"
    assert info["files_read"] == 3 and info["files"] == FILES
    assert len(CountingFS.files_read()) == 3  # the plan opened three footers of 40 files
    text = rows.select_columns(["text"])[95:120]["text"]
    assert text == [_text(i) for i in range(95, 120)]
    # Shard [95, 120): row groups 9 of file 1, 0-1 of file 2 (rows 90..119), the text column only.
    shard_bytes = CountingFS.bytes_read() - planned
    blob = 4096 * 10  # one row group's blob column, uncompressed
    assert shard_bytes < blob, shard_bytes
    assert CountingFS.bytes_read() < _total_bytes(parquet_dir) / 50
    # The same rows as the non-streaming loader's.
    whole, _ = load_rows(str(parquet_dir), split="train[:120]")
    assert rows.select_columns(["text", "id"])[0:120] == whole.select_columns(["text", "id"])[0:120]


def test_jsonl_slice_reads_only_the_files_it_reaches(jsonl_dir):
    CountingFS.fetched.clear()
    rows, info = load_rows(f"countfs://{jsonl_dir}", streaming=True, split="train[40:160]")
    assert len(rows) == 120 and info["files_read"] == 4  # rows 0..159: files 0-3
    assert rows.select_columns(["id"])[0:120]["id"] == list(range(40, 160))
    assert CountingFS.files_read() <= {str(jsonl_dir / f"part-{f:05d}.jsonl") for f in range(4)}
    # JSON lines: the plan reads the rows' bytes once (to find them), the shard read once more.
    first_four = sum((jsonl_dir / f"part-{f:05d}.jsonl").stat().st_size for f in range(4))
    assert CountingFS.bytes_read() <= 2 * first_four < _total_bytes(jsonl_dir) / 4
    whole, _ = load_rows(str(jsonl_dir), split="train[40:160]")
    assert rows[0:120]["text"] == whole[0:120]["text"]


def test_fingerprint_follows_the_slice_and_the_files(parquet_dir, tmp_path):
    a = load_rows(str(parquet_dir), streaming=True, max_rows=120)[1]["fingerprint"]
    assert a == load_rows(str(parquet_dir), streaming=True, max_rows=120)[1]["fingerprint"]
    assert a != load_rows(str(parquet_dir), streaming=True, max_rows=121)[1]["fingerprint"]
    # Files beyond the slice do not enter it: adding one at the end keeps the fingerprint.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(parquet_dir, copy)
    pq.write_table(pa.table({"text": ["late"], "id": [-1], "blob": [b""]}), copy / "train-99999.parquet")
    b = load_rows(str(copy), streaming=True, max_rows=120)[1]["fingerprint"]
    shutil.copy2(parquet_dir / "train-00000.parquet", copy / "train-00000.parquet")  # same content and mtime
    assert b == load_rows(str(copy), streaming=True, max_rows=120)[1]["fingerprint"]


@pytest.mark.parametrize("kw, match", [
    (dict(split="train[:10%]"), "percentages"),
    (dict(split="test"), "one 'train' split"),
    (dict(split="train[5:5]"), "empty"),
])
def test_streaming_refusals(parquet_dir, kw, match):
    with pytest.raises(ConfigError, match=match):
        load_rows(str(parquet_dir), streaming=True, **kw)


def test_streaming_a_hub_id_needs_a_length_and_names_the_failure():
    with pytest.raises(ConfigError, match="no length; give --max-rows"):
        load_rows("someone/huge-corpus", streaming=True)
    with pytest.raises(ConfigError, match="streaming the hub dataset failed"):  # HF_HUB_OFFLINE=1 in tests
        load_rows("someone/huge-corpus", streaming=True, max_rows=10)


def test_max_rows_without_streaming_keeps_the_first_rows(jsonl_dir):
    rows, info = load_rows(str(jsonl_dir), max_rows=7)
    assert len(rows) == 7 and info["max_rows"] == 7 and rows["id"] == list(range(7))
