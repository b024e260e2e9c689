"""`logitcache precompute --streaming --max-rows N`: a slice of a many-file Parquet dataset on a real S3
server (moto, loopback), stopped and resumed, gives the cache of one uninterrupted run, and the arrays
of a non-streaming run of the same rows; the resumed job reads fewer bytes than a whole run (counted
through fsspec, `tests/support/counting_fs.py`), since it skips the finished shards' row groups.

Ray actors streaming the same slice: tests/stages/precompute/test_precompute_ray.py.

A "stopped" job is one of `--num-jobs 3` that wrote its shards and no index; the rerun of the plain
command resumes it (SIGKILL mid-shard is covered by tests/pipeline/test_s3_precompute.py).

    .venv/bin/pytest tests/pipeline/test_streaming_precompute.py -m "slow or not slow"   # ~40 s on 2 cores
"""

import numpy as np
import pytest
from counting_fs import CountingFS
from precompute_util import FILES, PER_SHARD, ROWS, assert_same_cache, write_parquet_corpus
from s3server import make_bucket, s3_options

from logitcache.pipeline.cli import main
from logitcache.storage import open_cache

BUCKET = "lc-stream"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3):
    """(local folder, s3 URL, endpoint) of 12 Parquet files, row groups of 4 rows (one shard's)."""
    import s3fs

    endpoint, _ = s3
    root = write_parquet_corpus(tmp_path_factory.mktemp("stream-corpus"))
    make_bucket(endpoint, BUCKET)
    s3fs.S3FileSystem(**s3_options(endpoint)).put(str(root), f"{BUCKET}/corpus", recursive=True)
    return root, f"s3://{BUCKET}/corpus", endpoint


def precompute(teacher, data: str, out, *extra: str) -> None:
    argv = ["precompute", "--teacher", str(teacher), "--data", data, "--out", str(out), "--engine", "hf",
            "--text-field", "text", "--top-k", "8", "--rows-per-shard", str(PER_SHARD), "--batch-size", "2",
            "--no-progress", *extra]
    assert main(argv) == 0


def s3_flags(endpoint: str) -> list[str]:
    return ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", "key=testing",
            "--storage-option", "secret=testing"]


@pytest.mark.slow
def test_streamed_slice_on_s3_resumes_to_the_uninterrupted_cache(tiny_teacher, corpus, tmp_path):
    teacher, _ = tiny_teacher
    _, url, endpoint = corpus
    flags = ["--streaming", "--max-rows", str(ROWS), *s3_flags(endpoint)]
    precompute(teacher, url, tmp_path / "whole", *flags)
    stopped = tmp_path / "stopped"
    precompute(teacher, url, stopped, *flags, "--num-jobs", "3", "--job-index", "0")
    assert not (stopped / "index.json").exists() and len(list((stopped / "entries").glob("*.json"))) == 2
    precompute(teacher, url, stopped, *flags)  # the same command again: resumes the other 4 shards
    assert_same_cache(tmp_path / "whole", stopped)
    index = open_cache(str(stopped)).index
    assert index["dataset"]["loader"] == "stream:parquet" and index["dataset"]["num_rows"] == ROWS
    assert index["dataset"]["files_read"] == 3 and index["dataset"]["files"] == FILES

    # The same rows loaded whole: other fingerprint (the slice is hashed, not the bytes), same arrays.
    precompute(teacher, url, tmp_path / "loaded", "--split", f"train[:{ROWS}]", *s3_flags(endpoint))
    a, b = open_cache(str(tmp_path / "whole")), open_cache(str(tmp_path / "loaded"))
    assert a.fingerprint != b.fingerprint and len(a) == len(b) == ROWS
    for (_, x), (_, y) in zip(a.iter_shards(), b.iter_shards()):
        for name in ("row_index", "input_ids", "positions", "topk_ids", "topk_logprobs", "tail_mass"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


@pytest.mark.slow
def test_resumed_job_skips_finished_shards_unread(tiny_teacher, corpus, tmp_path):
    teacher, _ = tiny_teacher
    root, _, _ = corpus
    data = f"countfs://{root}"
    flags = ["--streaming", "--max-rows", str(ROWS)]
    CountingFS.fetched.clear()
    precompute(teacher, data, tmp_path / "whole", *flags)
    whole = row_group_reads()
    precompute(teacher, data, tmp_path / "part", *flags, "--num-jobs", "2", "--job-index", "0")
    CountingFS.fetched.clear()
    precompute(teacher, data, tmp_path / "part", *flags)  # resumes shards 1, 3, 5 of 6
    resumed = row_group_reads()
    assert_same_cache(tmp_path / "whole", tmp_path / "part")
    assert CountingFS.files_read() == {str(root / f"train-{f:03d}.parquet") for f in range(3)}
    # Both runs read the 3 footers; then the whole run reads 6 shards' row groups, the resumed one 3.
    assert len(whole) == 6 and len(resumed) == 3, (whole, resumed)
    assert set(resumed) < set(whole)


def row_group_reads() -> list[tuple[str, int, int]]:
    """The ranges fetched after each file's first read (its footer): the row groups' column chunks."""
    seen, out = set(), []
    for path, start, end in CountingFS.fetched:
        if path in seen:
            out.append((path, start, end))
        seen.add(path)
    return out
