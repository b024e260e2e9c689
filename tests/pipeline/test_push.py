"""`logitcache push` through the real `huggingface_hub` client against a loopback hub (tests/support/fake_hub.py):
the repo it leaves is a cache `open_cache` reads over hf:// and a dataset `datasets.load_dataset` reads; the
shards land before the index (a repo interrupted mid-push is no cache); a second run resumes without
committing again what the repo holds; a cache on S3 (moto on loopback) is pushed without a local copy.

    .venv/bin/python -m pytest tests/pipeline/test_push.py -q      # ~20 s
"""

import json
import os

import numpy as np
import pytest
import s3fs
from fake_hub import fake_hub

from logitcache.pipeline.cli import main
from logitcache.pipeline.commands.push import push_cache
from logitcache.storage import open_cache
from logitcache.storage.errors import CacheIndexError, ConfigError
from logitcache.storage.testing import write_synthetic_cache

SHARDS = 3


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1 (conftest); the loopback hub needs huggingface_hub online."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def write_cache(root: str, storage_options: dict | None = None, backend: str = "arrow") -> None:
    write_synthetic_cache(root, backend, encoding="compact", shards=SHARDS, per_shard=3, storage_options=storage_options)


def hub_api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token="hf_test")


def assert_repo_is_the_cache(hub, repo_id: str, source: str, storage_options=None):
    import datasets
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()  # fsspec keeps one per options, listings cached: read the repo afresh
    folder = hub.repos[repo_id]
    shards = sorted(f"shard-{j:05d}.parquet" for j in range(SHARDS))
    assert sorted(os.listdir(folder)) == sorted([*shards, "index.json", "README.md"])  # no job.json, entries/
    remote = open_cache(f"hf://datasets/{repo_id}", storage_options={"endpoint": hub.endpoint, "token": "hf_test"})
    local = open_cache(source, storage_options=storage_options)
    assert remote.validate() == [] and remote.fingerprint == local.fingerprint and len(remote) == len(local) == 9
    for i in range(len(local)):
        np.testing.assert_array_equal(remote[i]["topk_logprobs"], local[i]["topk_logprobs"])
    rows = datasets.load_dataset(folder, split="train", cache_dir=os.path.join(folder, "..", "hf-cache"))
    assert rows.num_rows == 9 and "topk_ids" in rows.column_names


def test_push_uploads_shards_then_index_and_the_repo_is_a_cache_and_a_dataset(online, tmp_path, monkeypatch):
    """Several shard commits (the client's batching, made small here), then one commit of index + card."""
    import huggingface_hub._upload_pipeline as pipeline

    cache = str(tmp_path / "cache")
    write_cache(cache)
    (tmp_path / "cache" / "job.json").write_text("{}")  # the writers' record: not shared
    monkeypatch.setattr(pipeline, "REGULAR_CONTENT_BYTES_BUDGET", 1)  # a commit per file, as a huge cache gets
    with fake_hub({}, new_repos_root=str(tmp_path / "hub")) as hub:
        card = push_cache(cache, "me/tiny-logits", api=hub_api(hub), private=True, license="apache-2.0")
        assert [added for _, added in hub.commits] == [*[[f"shard-{j:05d}.parquet"] for j in range(SHARDS)],
                                                       ["index.json", "README.md"]]
        assert ("POST", "/api/repos/create", "Bearer hf_test") in hub.requests
        assert_repo_is_the_cache(hub, "me/tiny-logits", cache)
        assert open(os.path.join(hub.repos["me/tiny-logits"], "README.md")).read() == card
        assert "license: apache-2.0" in card and "logitcache train --cache hf://datasets/me/tiny-logits" in card


def test_interrupted_push_leaves_no_cache_and_a_rerun_commits_only_what_is_missing(online, tmp_path):
    """The index commit is refused (a connection lost at the end): the repo holds shards but no index, so no
    reader takes it for a cache; the same command again commits the index and card, not the shards again."""
    cache = str(tmp_path / "cache")
    write_cache(cache)
    with fake_hub({}, new_repos_root=str(tmp_path / "hub")) as hub:
        hub.fail_commits = {2}
        with pytest.raises(Exception, match="refused by the test"):
            push_cache(cache, "me/logits", api=hub_api(hub), mass_shards=0)
        assert hub.commits == [(hub.commits[0][0], [f"shard-{j:05d}.parquet" for j in range(SHARDS)])]
        with pytest.raises(CacheIndexError):
            open_cache(f"hf://datasets/me/logits", storage_options={"endpoint": hub.endpoint, "token": "hf_test"})
        push_cache(cache, "me/logits", api=hub_api(hub), mass_shards=0)
        assert hub.commits[1][1] == ["index.json", "README.md"] and len(hub.commits) == 2
        assert_repo_is_the_cache(hub, "me/logits", cache)


def test_push_reads_an_s3_cache_shard_by_shard(online, s3, tmp_path, monkeypatch):
    """An s3:// cache is staged about `stage_bytes` at a time (here one shard) through a temporary folder that
    is gone afterwards; the repo equals the cache. The CLI takes the URL with credentials from the environment."""
    import tempfile

    from s3server import make_bucket, s3_options

    endpoint, env = s3
    make_bucket(endpoint, "lc-push")
    opts = s3_options(endpoint)
    write_cache("s3://lc-push/cache", storage_options=opts)
    stage_root = tmp_path / "tmp"
    stage_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(stage_root))
    with fake_hub({}, new_repos_root=str(tmp_path / "hub")) as hub:
        push_cache("s3://lc-push/cache", "me/from-s3", api=hub_api(hub), storage_options=opts, stage_bytes=1)
        assert [len(added) for _, added in hub.commits] == [1] * SHARDS + [2]  # one staged shard per upload
        assert os.listdir(stage_root) == []
        assert_repo_is_the_cache(hub, "me/from-s3", "s3://lc-push/cache", storage_options=opts)
        # Again (as after an interruption): the repo lists every shard with the index's sha256, so none is
        # fetched from the store or staged again; only the index and card are committed (unchanged: no commit).
        before = len(hub.requests)
        push_cache("s3://lc-push/cache", "me/from-s3", api=hub_api(hub), storage_options=opts, stage_bytes=1)
        posts = [path for method, path, _ in hub.requests[before:] if method == "POST"]
        assert len(hub.commits) == SHARDS + 1 and posts == ["/api/repos/create", "/api/validate-yaml",
                                                           "/api/datasets/me/from-s3/preupload/main"]
        with monkeypatch.context() as m:  # the CLI's HfApi() reads the endpoint the Hub client would
            for key, value in {**env, "HF_TOKEN": "hf_test"}.items():
                m.setenv(key, value)
            m.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
            # fsspec keeps one S3FileSystem per set of options: one an earlier test made without these
            # variables would be reused, with no credentials.
            s3fs.S3FileSystem.clear_instance_cache()
            assert main(["push", "s3://lc-push/cache", "me/from-s3-cli", "--mass-shards", "0"]) == 0
        assert_repo_is_the_cache(hub, "me/from-s3-cli", "s3://lc-push/cache", storage_options=opts)


def test_push_of_a_zarr_cache_refuses_with_the_convert_command_and_that_command_works(online, tmp_path):
    cache = str(tmp_path / "zcache")
    write_cache(cache, backend="zarr")
    with fake_hub({}, new_repos_root=str(tmp_path / "hub")) as hub:
        with pytest.raises(ConfigError) as err:
            push_cache(cache, "me/z", api=hub_api(hub))
        assert hub.requests == []  # refused before any request
        command = str(err.value).split("Convert it first: ")[1]
        assert command == f"logitcache convert {cache} {cache}-parquet --backend parquet"
        assert main(command.split()[1:]) == 0
        push_cache(f"{cache}-parquet", "me/z", api=hub_api(hub))
        assert_repo_is_the_cache(hub, "me/z", cache)
        index = json.load(open(os.path.join(hub.repos["me/z"], "index.json")))
        assert index["backend"] == "arrow"


def test_a_shard_file_the_index_does_not_name_is_refused_before_any_request(online, tmp_path):
    """The card's configs glob would make datasets read it as rows; a temporary file is simply not uploaded."""
    import shutil

    cache = tmp_path / "cache"
    write_cache(str(cache))
    (cache / "shard-00001.parquet.tmp-1a2b3c4d").write_bytes(b"partial")
    shutil.copy(cache / "shard-00000.parquet", cache / "shard-00042.parquet")
    with fake_hub({}, new_repos_root=str(tmp_path / "hub")) as hub:
        with pytest.raises(ConfigError, match="shard-00042.parquet"):
            push_cache(str(cache), "me/x", api=hub_api(hub), mass_shards=0)
        assert hub.requests == []
        (cache / "shard-00042.parquet").unlink()
        push_cache(str(cache), "me/x", api=hub_api(hub), mass_shards=0)
        assert_repo_is_the_cache(hub, "me/x", str(cache))


def test_a_damaged_shard_on_s3_is_not_published(online, s3, tmp_path):
    """Each staged shard is checked against the index's sha256 before it goes up: the push stops with a
    one-line ShardError naming it, and the repo has no index (no reader takes it for a cache)."""
    from s3server import make_bucket, s3_options

    from logitcache.storage.errors import ShardError

    endpoint, _ = s3
    make_bucket(endpoint, "lc-push-bad")
    opts = s3_options(endpoint)
    write_cache("s3://lc-push-bad/cache", storage_options=opts)
    fs = s3fs.S3FileSystem(**opts)
    raw = bytearray(fs.cat_file("lc-push-bad/cache/shard-00001.parquet"))
    raw[len(raw) // 2] ^= 0x10
    fs.pipe_file("lc-push-bad/cache/shard-00001.parquet", bytes(raw))
    with fake_hub({}, new_repos_root=str(tmp_path / "hub")) as hub:
        with pytest.raises(ShardError, match="shard-00001.parquet of s3://lc-push-bad/cache does not match"):
            push_cache("s3://lc-push-bad/cache", "me/bad", api=hub_api(hub), storage_options=opts, stage_bytes=1,
                       mass_shards=0)
        assert [added for _, added in hub.commits] == [["shard-00000.parquet"]]
        assert not os.path.exists(os.path.join(hub.repos["me/bad"], "index.json"))
