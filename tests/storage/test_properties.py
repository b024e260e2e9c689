"""Property tests (hypothesis) for round-trips, and a fuzz test of the index and shard readers.

    pytest tests/storage/test_properties.py
"""

import json
import os
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.storage import (COMPACT_STEP, CacheWriter, LogitCacheError, ShardData, decode_logprobs,
                                encode_logprobs, open_cache)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(values=st.lists(st.floats(min_value=-200, max_value=0, width=32), min_size=1, max_size=64),
       encoding=st.sampled_from(["lossless", "float16", "compact"]))
def test_encoding_roundtrip_bound(values, encoding):
    lp = -np.sort(-np.array(values, dtype=np.float32))[None, :]  # top-K rows are sorted descending
    out = decode_logprobs(encode_logprobs(lp, encoding), encoding)
    bound = {"lossless": 0.0, "float16": np.abs(lp) * 2**-10 + 1e-7, "compact": COMPACT_STEP / 2 + 1e-6}[encoding]
    assert np.all(np.abs(out - lp) <= bound)
    # Re-encoding decoded values is exact: conversions never drift.
    np.testing.assert_array_equal(encode_logprobs(out, encoding), encode_logprobs(lp, encoding))


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), k=st.integers(1, 40),
       backend=st.sampled_from(["arrow", "zarr"]), encoding=st.sampled_from(["lossless", "compact"]),
       sample=st.booleans())
def test_cache_roundtrip(seed, n, k, backend, encoding, sample):
    rng = np.random.default_rng(seed)
    k = max(k, 3) if sample else k
    seqs = [make_sequence(rng, i, int(rng.integers(2, 30)), k, sample=sample) for i in range(n)]
    root = tempfile.mkdtemp()
    try:
        w = CacheWriter(root, backend=backend, encoding=encoding, vocab_size=VOCAB, fingerprint="p",
                        text_fields=TEXT_FIELDS)
        w.write_shard(0, ShardData.from_sequences(seqs, text_fields=TEXT_FIELDS))
        w.finalize(metadata(k, "sample" if sample else "topk"))
        cache = open_cache(root)
        tol = 0 if encoding == "lossless" else COMPACT_STEP / 2 + 1e-6
        for i, want in enumerate(seqs):
            got = cache[i]
            np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"])
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
            assert np.abs(got["topk_logprobs"] - want["topk_logprobs"]).max(initial=0) <= tol
    finally:
        shutil.rmtree(root)


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(max_size=400))
def test_fuzz_index_reader(blob):
    root = tempfile.mkdtemp()
    try:
        open(os.path.join(root, "index.json"), "wb").write(blob)
        try:
            open_cache(root)
        except LogitCacheError:
            pass
    finally:
        shutil.rmtree(root)


@settings(max_examples=60, deadline=None)
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                        max_leaves=20))
def test_fuzz_index_structure(doc):
    root = tempfile.mkdtemp()
    try:
        open(os.path.join(root, "index.json"), "w").write(json.dumps(doc))
        try:
            open_cache(root)
        except LogitCacheError:
            pass
    finally:
        shutil.rmtree(root)


def _fuzz_shard(backend, data):
    """Overwrite shard bytes with malformed ones; reading must raise only our errors."""
    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp()
    try:
        w = CacheWriter(root, backend=backend, encoding="compact", vocab_size=VOCAB, fingerprint="z",
                        text_fields=TEXT_FIELDS)
        w.write_shard(0, ShardData.from_sequences([make_sequence(rng, 0, 12, 4)], text_fields=TEXT_FIELDS))
        w.finalize(metadata(4))
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if "shard-00000" in os.path.join(d, f) and "entries" not in d)
        victim = files[data.draw(st.integers(0, len(files) - 1))]
        raw = bytearray(open(victim, "rb").read())
        how = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
        if how == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
        elif how == "truncate":
            raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
        else:
            raw = bytearray(data.draw(st.binary(max_size=200)))
        open(victim, "wb").write(bytes(raw))
        for verify in (True, False):  # without checksums the decoders themselves must fail cleanly
            try:
                open_cache(root, verify=verify)[0]
            except LogitCacheError:
                pass
    finally:
        shutil.rmtree(root)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), backend=st.sampled_from(["arrow", "zarr"]))
def test_fuzz_shard_reader(data, backend):
    _fuzz_shard(backend, data)


_ODD_VALUES = [None, True, False, -1, 0, 1, 2**63, 10**12, 1.5, float("nan"), "", "x", "../x", "/abs", [], {}]


def _nodes(doc, path=()):
    """Every (path, value) in a JSON document, the root included."""
    yield path, doc
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _nodes(value, (*path, key))


def _mutate(doc, rng):
    """A copy of `doc` with one node replaced, scaled, shifted or deleted."""
    doc = json.loads(json.dumps(doc))
    nodes = [p for p, _ in _nodes(doc) if p]
    path = nodes[rng.integers(len(nodes))]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    value, how = parent[path[-1]], rng.integers(4)
    if how == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    elif how == 1 and isinstance(value, int) and not isinstance(value, bool):
        parent[path[-1]] = value + int(rng.choice([-1, 1, 7]))
    elif how == 2 and isinstance(value, int) and not isinstance(value, bool):
        parent[path[-1]] = value * int(rng.choice([0, 1000, 10**9]))
    else:
        parent[path[-1]] = _ODD_VALUES[rng.integers(len(_ODD_VALUES))]
    return doc


def test_fuzz_valid_indexes_mutated(build_cache):
    """Indexes that pass the format check, then mutated one node (or two) at a time: reading every shard
    raises only our errors, and a good share of the mutants still pass the check (the fuzz reaches the
    shard readers, which a fuzz of random documents never does)."""
    rng = np.random.default_rng(int(os.environ.get("FUZZ_SEED", "0")))
    passed = 0
    for backend in ("arrow", "zarr"):
        root, _ = build_cache(backend, shards=2, per_shard=2)
        path = os.path.join(root, "index.json")
        valid = json.loads(open(path).read())
        assert [j for j, _ in open_cache(root).iter_shards()] == [0, 1]  # the base passes
        for _ in range(120):
            doc = _mutate(valid, rng)
            if rng.random() < 0.3:
                doc = _mutate(doc, rng)
            open(path, "w").write(json.dumps(doc))
            try:
                cache = open_cache(root, verify=bool(rng.integers(2)))
            except LogitCacheError:
                continue
            passed += 1
            for j in range(len(cache.shards)):
                try:
                    cache.read_shard(j)
                except LogitCacheError:
                    pass
    assert passed >= 40, passed
