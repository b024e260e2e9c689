"""Stage one and stage two on an object store: `logitcache precompute --out s3://...` killed with
SIGKILL and rerun, against a real S3-compatible server process (moto) on loopback; the finished
cache equals an uninterrupted local run, and `logitcache train --cache s3://...` reads it.

The CLI gets plain s3:// URLs; the endpoint and credentials come from the usual AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), which botocore, and so s3fs, reads by itself.

    .venv/bin/pytest tests/pipeline/test_s3_precompute.py -m slow    # all: ~1 min on 2 CPU cores

The run that is killed is a process; the rest (the rerun, `train`) run in this process as one-thread
processes would (`precompute_util.run_here`), endpoint and credentials from the environment.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from precompute_util import ONE_THREAD, REF_ROWS, REF_ROWS_PER_SHARD, assert_same_cache, reference_flags, run_here
from s3server import make_bucket, s3_options

from logitcache.storage import open_cache
from logitcache.storage.backends import read_shard_files, shard_checksum
from logitcache.storage.errors import CacheIndexError
from logitcache.storage.paths import resolve

ROWS, ROWS_PER_SHARD = REF_ROWS, REF_ROWS_PER_SHARD  # 12 zarr shards (folders of many objects): a kill lands mid-upload
BUCKET, PREFIX = "lc-precompute", "cache"
URL = f"s3://{BUCKET}/{PREFIX}"
_ENTRY = re.compile(rf"^{PREFIX}/entries/shard-\d{{5}}\.zarr\.json$")
# One thread everywhere: CPU GEMM kernels, and so the last float bit, depend on the thread count.
THREADS = ONE_THREAD
flags = reference_flags  # the shared reference job's command, to another --out


@pytest.fixture(scope="module")
def setup(tiny_teacher, reference_cache, tmp_path_factory):
    """(teacher, data, a tiny student with the teacher's tokenizer, reference cache written locally)."""
    from logitcache.pipeline.scratch import make_tiny_llama

    teacher, data, reference = reference_cache
    student = make_tiny_llama(tmp_path_factory.mktemp("s3-student"), tiny_teacher[1], hidden_size=64, num_layers=1,
                              num_heads=1, seed=1)
    return teacher, data, student, reference


def run_cli(argv: list[str], log: Path, *, env: dict) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **THREADS, **env}
    return subprocess.Popen([sys.executable, "-m", "logitcache.pipeline.cli", *argv], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def object_keys(client) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def wait_for_entries(proc: subprocess.Popen, client, at_least: int, log: Path) -> None:
    """Poll the bucket until `at_least` shard entries exist; meanwhile no index may appear."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        keys = object_keys(client)
        assert f"{PREFIX}/index.json" not in keys
        if sum(bool(_ENTRY.match(k)) for k in keys) >= at_least:
            return
        time.sleep(0.05)


def assert_entries_complete(url: str, storage_options: dict) -> int:
    """Every shard an entry names is complete on the store (its bytes match the entry's sha256)."""
    fs, root = resolve(url, storage_options)
    fs.invalidate_cache()
    entries = [p for p in fs.ls(f"{root}/entries", detail=False) if p.endswith(".json")]
    for path in entries:
        entry = json.loads(fs.cat_file(path))
        payload = read_shard_files(fs, f"{root}/{entry['name']}", entry["backend"])
        assert shard_checksum(entry["backend"], payload) == entry["sha256"], path
    return len(entries)


@pytest.mark.slow
def test_s3_kill_9_then_rerun_equals_local_and_trains(setup, s3, tmp_path, capsys):
    import boto3

    teacher, data, student, reference = setup
    endpoint, env = s3
    make_bucket(endpoint, BUCKET)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    opts = s3_options(endpoint)
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    log = tmp_path / "log"

    proc = run_cli(flags(teacher, data, URL), log, env=env)
    wait_for_entries(proc, client, rng.randint(1, 6), log)
    time.sleep(rng.uniform(0, 0.2))  # anywhere inside the next shard's upload
    assert proc.poll() is None, f"finished before the kill (seed {seed})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = assert_entries_complete(URL, opts)
    assert 1 <= written < ROWS // ROWS_PER_SHARD, f"seed {seed}"
    with pytest.raises(CacheIndexError, match="unfinished"):
        open_cache(URL, storage_options=opts)

    capsys.readouterr()
    rc = run_here(flags(teacher, data, URL), env)  # in this process: only the kill needed one
    text = capsys.readouterr().err
    assert rc == 0, text
    assert f"{written} already written" in text, f"seed {seed}"

    cache = open_cache(URL, storage_options=opts)
    assert cache.validate() == []
    # The output location is no part of the fingerprint or the index: the S3 cache is the local one.
    local = open_cache(str(reference))
    drop = lambda index: {k: v for k, v in index.items() if k != "shards"}  # noqa: E731
    assert drop(cache.index) == drop(local.index)
    assert_same_cache(reference, URL, storage_options=opts)  # shard entries, then every array
    # Nothing stray: a shard upload cut by the kill was cleared and rewritten under the same name.
    named = {e["name"] for e in cache.shards}
    for key in object_keys(client):
        rel = key[len(PREFIX) + 1:]
        assert rel in ("index.json", "job.json", "README.md") or rel.startswith("entries/") or rel.split("/")[0] in named, key

    # Stage two streams it straight from the bucket.
    result = train(student, URL, teacher, tmp_path, env=env, workers=0, capsys=capsys)
    assert result["global_step"] == 2 and cache.fingerprint in json.dumps(result["cache"]), result


@pytest.mark.slow  # shares the reference cache's setup (a precompute)
def test_train_reads_s3_with_dataloader_workers(setup, s3, tmp_path, capsys):
    """A finished local cache uploaded as is (the way one shares it) trains with DataLoader workers."""
    import s3fs

    teacher, _, student, reference = setup
    endpoint, env = s3
    make_bucket(endpoint, "lc-shared")
    opts = s3_options(endpoint)
    s3fs.S3FileSystem(**opts).put(str(reference), "lc-shared/cache", recursive=True)
    assert open_cache("s3://lc-shared/cache", storage_options=opts).validate() == []
    result = train(student, "s3://lc-shared/cache", teacher, tmp_path, env=env, workers=1, capsys=capsys)
    assert result["global_step"] == 2


@pytest.mark.slow
def test_data_from_s3_equals_the_local_file(setup, s3, tmp_path, capsys):
    """`--data s3://...` (what docker/precompute-job.yaml passes): the same rows, fingerprint and cache as the
    local file, since a data file's fingerprint is its bytes, wherever it lies. The CLI runs in this
    process (a subprocess start-up costs more than the run), credentials from the environment."""
    import s3fs

    teacher, data, _, reference = setup
    endpoint, env = s3
    make_bucket(endpoint, "lc-data")
    s3fs.S3FileSystem(**s3_options(endpoint)).put(str(data), "lc-data/in/rows.jsonl")
    assert run_here(flags(teacher, "s3://lc-data/in/rows.jsonl", str(tmp_path / "cache")), env) == 0
    cache, local = open_cache(str(tmp_path / "cache")), open_cache(str(reference))
    assert cache.index["dataset"]["source"] == "s3://lc-data/in/rows.jsonl"
    assert cache.index["dataset"]["fingerprint"] == local.index["dataset"]["fingerprint"]
    assert_same_cache(reference, tmp_path / "cache")
    # A missing object is our error, naming the URL.
    capsys.readouterr()
    assert run_here(flags(teacher, "s3://lc-data/in/nope.jsonl", str(tmp_path / "c2")), env) == 2
    assert "s3://lc-data/in/nope.jsonl: no such file" in capsys.readouterr().err


def train(student: Path, url: str, teacher: str, tmp_path: Path, *, env: dict, workers: int, capsys) -> dict:
    """`logitcache train --loss kl` for 2 steps from the cache at `url`, in this process (credentials and
    endpoint from the environment, as a process reads them); returns logitcache_train.json."""
    out = tmp_path / "student"
    capsys.readouterr()
    rc = run_here(["train", "--student", str(student), "--cache", url, "--teacher", teacher, "--loss", "kl",
                   "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1",
                   "--num-workers", str(workers)], env)
    assert rc == 0, capsys.readouterr().err
    return json.loads((out / "logitcache_train.json").read_text())
