"""Index schema and every bad-index case: each one is our error type, with a message that names it.

    pytest tests/storage/test_index.py
"""

import json
import os

import pytest

from logitcache.storage import CacheIndexError, FormatVersionError, LogitCacheError, UnsafePathError, open_cache
from logitcache.storage.index import chain_fingerprint


def _rewrite_index(root, mutate):
    path = os.path.join(root, "index.json")
    index = json.load(open(path))
    mutate(index)
    open(path, "w").write(json.dumps(index))


def test_missing_index_means_unfinished(tmp_path):
    with pytest.raises(CacheIndexError, match="unfinished"):
        open_cache(str(tmp_path))


def test_partial_index(build_cache):
    root, _ = build_cache("arrow")
    path = os.path.join(root, "index.json")
    raw = open(path).read()
    open(path, "w").write(raw[: len(raw) // 2])
    with pytest.raises(CacheIndexError, match="not valid JSON"):
        open_cache(root)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_format_version(build_cache, version):
    root, _ = build_cache("arrow")
    _rewrite_index(root, lambda ix: ix.__setitem__("format_version", version))
    with pytest.raises(FormatVersionError, match="format_version"):
        open_cache(root)


@pytest.mark.parametrize("name", ["../evil.parquet", "/etc/passwd", "a/../../b.parquet", "..", "a\\..\\b",
                                  "s3://other/x", "", ".hidden/../../x"])
def test_shard_names_that_escape_are_refused(build_cache, name):
    root, _ = build_cache("zarr")
    _rewrite_index(root, lambda ix: ix["shards"][0].__setitem__("name", name))
    with pytest.raises(UnsafePathError):
        open_cache(root)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda ix: ix["counts"].__setitem__("positions", 1), "counts.positions"),
    (lambda ix: ix["shards"][0].__setitem__("bytes", -1), "bytes"),
    (lambda ix: ix["shards"][1].__setitem__("name", ix["shards"][0]["name"]), "twice"),
    (lambda ix: ix.pop("tokenizer"), "tokenizer"),
    (lambda ix: ix.__setitem__("backend", "hdf5"), "backend"),
    (lambda ix: ix["sparsification"].__setitem__("mode", "full"), "mode"),
])
def test_schema_errors_name_the_field(build_cache, mutate, pattern):
    root, _ = build_cache("arrow")
    _rewrite_index(root, mutate)
    with pytest.raises(CacheIndexError, match=pattern):
        open_cache(root)


def test_index_counts_that_disagree_with_a_shard(build_cache):
    root, _ = build_cache("zarr")

    def lie(ix):  # consistent totals, wrong per-shard split: only reading the shard can tell
        ix["shards"][0]["positions"] += 1
        ix["shards"][1]["positions"] -= 1
    _rewrite_index(root, lie)
    cache = open_cache(root)
    problems = cache.validate()
    assert len(problems) == 2 and "positions" in problems[0]


def test_fingerprint_chain_is_order_sensitive():
    a = chain_fingerprint("data", {"teacher": "t"}, {"k": 32})
    assert a == chain_fingerprint("data", {"teacher": "t"}, {"k": 32})
    assert a != chain_fingerprint({"teacher": "t"}, "data", {"k": 32})
    assert a != chain_fingerprint("data", {"teacher": "t"}, {"k": 64})


def test_errors_share_one_base():
    for err in (CacheIndexError, FormatVersionError, UnsafePathError):
        assert issubclass(err, LogitCacheError)
