"""Stage one on a local Ray cluster (CPU, two 1-CPU actors): the actors write the cache one process writes,
with DATA and the cache on the S3 server (reached through `storage_options` only), and with a streamed
slice of a many-file Parquet dataset that each actor loads itself.

Both tests share one cluster (`ray_cluster`, module scope): starting one costs ~10 s, and an idle one
keeps using CPU, so it lives only while this file runs, and its teardown checks that every process
it started has exited.

    .venv/bin/pytest tests/stages/precompute/test_precompute_ray.py -m slow    # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import os

import pytest
import torch
from precompute_util import (MAX_LENGTH, PER_SHARD, ROWS, K, assert_same_cache, mixed_rows, run, text_rows,
                             write_jsonl, write_parquet_corpus)

from logitcache.pipeline.cli import main as cli_main
from logitcache.storage import open_cache
from logitcache.storage.errors import InvalidDataError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray local cluster at a time
# `teacher` and `hf_engine` (top-K, for the single-process runs) are conftest's fixtures; `run` is precompute_util's
# (an engine name is started by the run, by each actor on Ray).


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs, started once for this file, shut down after it; the teardown
    asserts that the processes Ray started (GCS, raylet, agents, workers) are gone."""
    ray = pytest.importorskip("ray")
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    # Ray gives a 1-CPU actor OMP_NUM_THREADS=1 (unless set); CPU GEMM kernels, and so the last
    # float bit, depend on the thread count, so the single-process references run with the actors' count.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = [p for p in me.children() if p.pid not in before]  # Ray's daemons, children of this process
    try:
        yield ray
    finally:
        spawned = list(started)
        for p in started:
            try:
                spawned += p.children(recursive=True)  # the workers, under the raylet
            except psutil.NoSuchProcess:
                pass
        ray.shutdown()
        torch.set_num_threads(threads)
        _, alive = psutil.wait_procs(spawned, timeout=60)
        assert not alive, f"Ray left processes running after shutdown: {[p.pid for p in alive]}"


def test_ray_local_cluster_equals_single_process(ray_cluster, teacher, hf_engine, s3, tmp_path):
    """Ray actors on a local cluster write the cache the single process writes. DATA and the cache are on an
    S3 server whose endpoint and credentials only `storage_options` carry (nothing in the environment), and
    the dataset revision is part of the dataset info each actor checks: both must reach the actors."""
    import s3fs
    from s3server import make_bucket, s3_options

    endpoint, _ = s3
    make_bucket(endpoint, "lc-ray")
    opts = s3_options(endpoint)
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(16))
    s3fs.S3FileSystem(**opts).put(str(data), "lc-ray/in/rows.jsonl")
    url, remote_data = "s3://lc-ray/cache", "s3://lc-ray/in/rows.jsonl"
    common = dict(text_field="text", rows_per_shard=3, batch_size=4)
    remote = dict(storage_options=opts, data_revision="v1", **common)
    run(teacher, data, tmp_path / "local", hf_engine, **common)
    # Resume semantics hold on Ray too: two shards are already there.
    run(teacher, remote_data, url, hf_engine, num_jobs=3, job_index=0, **remote)
    result = run(teacher, remote_data, url, "hf", ray=True, ray_actors=2, **remote)
    # An actor's error reaches the driver as our own error type, not wrapped by Ray.
    mixed = write_jsonl(tmp_path / "mixed.jsonl", mixed_rows())
    with pytest.raises(InvalidDataError, match=r"row 3: field 'text'"):
        run(teacher, mixed, tmp_path / "strict", "hf", ray=True, ray_actors=1, text_field="text",
            strict=True, max_length=MAX_LENGTH)
    assert result.finished and sorted(result.written) == [1, 2, 4, 5]
    cache = open_cache(url, storage_options=opts)
    assert cache.validate() == [] and cache.index["dataset"]["revision"] == "v1"
    assert_same_cache(tmp_path / "local", url, storage_options=opts)


def stream_precompute(teacher, data: str, out, *extra: str) -> None:
    """`logitcache precompute --streaming` of the first ROWS rows (hf engine, top-8), in this process."""
    argv = ["precompute", "--teacher", str(teacher), "--data", data, "--out", str(out), "--engine", "hf",
            "--text-field", "text", "--top-k", str(K), "--rows-per-shard", str(PER_SHARD), "--batch-size", "2",
            "--no-progress", "--streaming", "--max-rows", str(ROWS), *extra]
    assert cli_main(argv) == 0


def test_ray_actors_stream_the_same_slice(ray_cluster, teacher, tmp_path):
    """Ray actors load the streamed slice themselves (streaming and max_rows reach them; each checks the
    driver's dataset info) and write the cache the single process writes."""
    root = write_parquet_corpus(tmp_path / "corpus")
    stream_precompute(teacher, str(root), tmp_path / "local")
    stream_precompute(teacher, str(root), tmp_path / "ray", "--ray", "--ray-actors", "2")
    assert_same_cache(tmp_path / "local", tmp_path / "ray")
    assert open_cache(str(tmp_path / "ray")).index["dataset"]["loader"] == "stream:parquet"
