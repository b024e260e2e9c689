"""`merge`, `validate`, `inspect` and `convert` reach an S3 cache with its endpoint and credentials given only
by `--storage-option` flags: no AWS_* variable is set while they run, against the moto S3 server on loopback.
Each does its real work there (validate's OK and BAD lines, inspect's counts, merge's index of a cache two
jobs filled, convert's readable copy); the same command with the endpoint's flag alone fails for want of
credentials, so the flags carried them.

    .venv/bin/python -m pytest tests/pipeline/test_storage_option_flags.py -q
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from precompute_util import text_rows, write_jsonl
from s3server import make_bucket, s3_options

from logitcache.pipeline.cli import main
from logitcache.storage import open_cache
from logitcache.storage.testing import write_synthetic_cache

BUCKET = "lc-flags"
KEY, SECRET = "AKIAFLAGSONLY4Q7Z", "flagsOnlySecret-3e9a"  # moto takes any pair; these must not be printed
SHARDS, PER_SHARD = 3, 2


@pytest.fixture
def store(s3, monkeypatch):
    """(endpoint, the flags, the test's own fsspec options), with no AWS_* variable in the environment."""
    import s3fs

    endpoint, _ = s3
    make_bucket(endpoint, BUCKET)
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    # fsspec reuses one S3FileSystem per set of options: one made with these variables would carry them.
    s3fs.S3FileSystem.clear_instance_cache()
    flags = ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", f"key={KEY}",
             "--storage-option", f"secret={SECRET}"]
    return endpoint, flags, s3_options(endpoint)


def write_cache(url: str, options: dict) -> None:
    write_synthetic_cache(url, "arrow", encoding="compact", shards=SHARDS, per_shard=PER_SHARD, storage_options=options)


def no_credentials(command: list[str], endpoint: str, capsys) -> None:
    """The command with the endpoint but not the credentials' flags: a one-line error saying it has none."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    assert main([*command, "--storage-option", f"endpoint_url={endpoint}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"logitcache {command[0]}: error:") and err.count("\n") == 1, err
    assert "Unable to locate credentials" in err, err


def assert_nothing_printed(printed: str) -> None:
    assert KEY not in printed and SECRET not in printed


def test_validate_and_inspect_take_the_flags(store, capsys):
    endpoint, flags, options = store
    url = f"s3://{BUCKET}/vi"
    write_cache(url, options)
    capsys.readouterr()

    index = open_cache(url, storage_options=options).index
    assert main(["validate", url, *flags]) == 0
    assert capsys.readouterr().out == \
        f"OK   {SHARDS} shard(s), {SHARDS * PER_SHARD} sequences, {index['counts']['positions']} positions\n"

    assert main(["inspect", url, "--json", *flags]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert (summary["shards"], summary["sequences"], summary["positions"]) == \
        (SHARDS, SHARDS * PER_SHARD, index["counts"]["positions"])
    assert summary["topk_mass"]["mean"] is not None  # every shard was read for it
    assert_nothing_printed(printed.out + printed.err)

    # One shard's bytes changed in the bucket: validate names it.
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    shard = f"{BUCKET}/vi/shard-00001.parquet"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    assert main(["validate", url, *flags]) == 1
    printed = capsys.readouterr()
    bad = [line for line in printed.out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "00001" in bad[0], printed.out
    assert printed.out.splitlines()[-1] == f"1 of {SHARDS} shard(s) failed validation"
    assert_nothing_printed(printed.out + printed.err)

    no_credentials(["validate", url], endpoint, capsys)
    no_credentials(["inspect", url, "--json"], endpoint, capsys)


def test_convert_takes_the_flags_for_both_sides(store, capsys):
    endpoint, flags, options = store
    src, dst = f"s3://{BUCKET}/conv-src", f"s3://{BUCKET}/conv-zarr"
    write_cache(src, options)
    no_credentials(["convert", src, dst, "--backend", "zarr"], endpoint, capsys)

    assert main(["convert", src, dst, "--backend", "zarr", *flags]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"wrote {dst}: {SHARDS} shard(s)") and "backend=zarr" in printed.out
    assert_nothing_printed(printed.out + printed.err)
    a, b = open_cache(src, storage_options=options), open_cache(dst, storage_options=options)
    assert b.index["backend"] == "zarr" and b.validate(progress=False) == [] and len(b) == len(a)
    for i in range(len(a)):
        for field in ("topk_ids", "topk_logprobs", "input_ids"):
            np.testing.assert_array_equal(a[i][field], b[i][field])


def test_merge_takes_the_flags(store, tiny_teacher, tmp_path, capsys):
    endpoint, flags, options = store
    url = f"s3://{BUCKET}/merge"
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(8))
    for job in (0, 1):  # precompute reaches the bucket by the same flags
        assert main(["precompute", "--teacher", str(tiny_teacher[0]), "--engine", "hf", "--data", str(data),
                     "--text-field", "text", "--top-k", "4", "--rows-per-shard", "2", "--num-jobs", "2",
                     "--job-index", str(job), "--out", url, "--no-progress", *flags]) == 0
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    by_jobs = json.loads(fs.cat_file(f"{BUCKET}/merge/index.json"))  # the last job to finish finalized
    fs.rm_file(f"{BUCKET}/merge/index.json")  # what merge finds when no job finalized
    capsys.readouterr()
    no_credentials(["merge", url], endpoint, capsys)
    assert not fs.exists(f"{BUCKET}/merge/index.json")

    assert main(["merge", url, *flags]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"merged {url}: 4 shard(s), 8 sequences")
    assert_nothing_printed(printed.out + printed.err)
    merged = open_cache(url, storage_options=options)
    assert merged.index["shards"] == by_jobs["shards"] and merged.index["counts"] == by_jobs["counts"]
    assert merged.fingerprint == by_jobs["fingerprint"] and merged.validate(progress=False) == []
