"""`logitcache train` reading caches over fsspec with `--storage-option`: a cache on a real S3-compatible
server (moto, loopback) mixed with a local one, the endpoint and credentials given only as options
(no AWS_* variables in the process), and read again in a DataLoader worker process.

    .venv/bin/pytest tests/pipeline/test_train_remote.py
"""

import json
import os

import pytest
from s3server import make_bucket, s3_options
from trainkit import build_cache, text_rows, world

from logitcache.pipeline.cli import main

BUCKET = "lc-train"


@pytest.fixture(scope="module")
def remote_cache(s3):
    """(s3 URL of the world's cache, endpoint, a second local cache of other rows)."""
    import s3fs

    endpoint, _ = s3
    make_bucket(endpoint, BUCKET)
    fs = s3fs.S3FileSystem(**s3_options(endpoint))
    w = world()
    fs.put(str(w.cache), f"{BUCKET}/cache", recursive=True)
    local = build_cache(w.root / "remote_mix_b", w.teacher, w.tokenizer, text_rows(12, seed=21), per_shard=4)
    return f"s3://{BUCKET}/cache", endpoint, local


def test_train_mixes_an_s3_cache_with_options_only(remote_cache, tmp_path, monkeypatch, capsys):
    url, endpoint, local = remote_cache
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)  # the options alone must carry the endpoint and the credentials
    w = world()
    out = tmp_path / "out"
    rc = main(["train", "--student", str(w.student), "--cache", url, "--cache", str(local), "--cache-weights", "1",
               "1", "--storage-option", f"endpoint_url={endpoint}", "--storage-option", "key=testing",
               "--storage-option", "secret=testing", "--loss", "kl", "--out", str(out), "--max-steps", "3",
               "--batch-size", "4", "--num-workers", "1", "--save-steps", "1000"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "logitcache_train.json").read_text())
    # The student folder is shared: the credentials are not recorded, the endpoint is (tests/pipeline/test_secrets.py).
    assert result["settings"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>",
                                                     "client_kwargs": {"endpoint_url": endpoint}}
    counts = result["cache"]["sequences_per_cache"]
    assert sum(counts.values()) == 12 and counts[url] > 0  # sequences were read from the bucket


def test_train_without_the_endpoint_option_cannot_reach_the_bucket(remote_cache, tmp_path, monkeypatch, capsys):
    url, endpoint, _ = remote_cache
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    # A wrong endpoint (nothing listens there): a one-line library error naming the cache, no traceback.
    w = world()
    rc = main(["train", "--student", str(w.student), "--cache", url, "--storage-option", "endpoint_url=http://127.0.0.1:9",
               "--storage-option", "key=testing", "--storage-option", "secret=testing",
               "--storage-option", "config_kwargs={retries: {max_attempts: 1}, connect_timeout: 1}",
               "--out", str(tmp_path / "o"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "logitcache train: error:" in err and "Traceback" not in err
    assert "lc-train/cache/index.json" in err and "127.0.0.1:9" in err


def test_eval_reads_an_s3_cache_with_options_only(remote_cache, monkeypatch, capsys):
    url, endpoint, _ = remote_cache
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    w = world()
    rc = main(["eval", "--model", str(w.student), "--cache", url, "--storage-option", f"endpoint_url={endpoint}",
               "--storage-option", "key=testing", "--storage-option", "secret=testing", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out)
    assert result["cache"]["sequences"] == 24 and 0 <= result["cache"]["teacher_agreement"] <= 1
