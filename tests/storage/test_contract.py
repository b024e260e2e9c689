"""One contract suite that every backend passes (zarr-python's StoreTests pattern).

    pytest tests/storage/test_contract.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.storage import (COMPACT_STEP, CacheIndexError, CacheWriter, ConfigError, InvalidDataError,
                                ShardData, ShardError, convert_cache, open_cache)


def assert_same_sequence(got: dict, want: dict, atol: float = 0.0) -> None:
    for key in ("input_ids", "positions", "topk_ids"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["topk_logprobs"], want["topk_logprobs"], atol=atol, rtol=0)
    for key in ("target_logprob", "tail_mass"):
        np.testing.assert_allclose(got[key], want[key], atol=max(atol, 1e-6 if atol == 0 else atol), rtol=1e-3 if atol else 1e-6)
    assert got["row_index"] == want["row_index"]
    for key in TEXT_FIELDS:
        assert got[key] == want[key]


class BackendContract:
    backend: str

    def test_roundtrip_lossless_exact(self, build_cache):
        root, written = build_cache(self.backend)
        cache = open_cache(root)
        assert len(cache) == len(written) == 12
        for i, want in enumerate(written):
            got = cache[i]
            assert got["topk_ids"].dtype == np.int32 and got["topk_logprobs"].dtype == np.float32
            np.testing.assert_array_equal(got["topk_logprobs"], want["topk_logprobs"].astype(np.float32))
            assert_same_sequence(got, want)
        assert cache[-1]["row_index"] == written[-1]["row_index"]
        with pytest.raises(IndexError):
            cache[len(written)]

    @pytest.mark.parametrize("encoding,atol", [("float16", 0.02), ("compact", COMPACT_STEP / 2 + 1e-6)])
    def test_roundtrip_lossy_within_bound(self, build_cache, encoding, atol):
        root, written = build_cache(self.backend, encoding=encoding, k=32)
        cache = open_cache(root)
        worst = max(np.abs(cache[i]["topk_logprobs"] - w["topk_logprobs"]).max() for i, w in enumerate(written))
        assert worst <= atol
        for i, want in enumerate(written):
            assert_same_sequence(cache[i], want, atol=atol)

    def test_index_contents(self, build_cache):
        root, written = build_cache(self.backend)
        index = open_cache(root).index
        assert index["format"] == "logitcache" and index["format_version"] == 1
        assert index["backend"] == self.backend
        assert index["counts"]["sequences"] == len(written)
        assert index["counts"]["tokens"] == sum(len(w["input_ids"]) for w in written)
        assert index["counts"]["positions"] == sum(len(w["positions"]) for w in written)
        assert index["counts"]["skipped"] == 1
        assert [e["rows"] for e in index["shards"]] == [[0, 4], [4, 8], [8, 12]]
        for entry in index["shards"]:
            assert entry["bytes"] > 0 and len(entry["sha256"]) == 64

    def test_iteration_in_order_and_by_shard(self, build_cache):
        root, written = build_cache(self.backend)
        cache = open_cache(root)
        assert [s["row_index"] for s in cache] == [w["row_index"] for w in written]
        seen = []
        for j, shard in cache.iter_shards(order=[2, 0, 1]):
            assert shard.num_sequences == cache.shards[j]["sequences"]
            seen += shard.row_index.tolist()
        assert sorted(seen) == list(range(12)) and seen[:4] == [8, 9, 10, 11]

    def test_sample_mode_roundtrip(self, build_cache):
        root, written = build_cache(self.backend, sample=True, encoding="compact")
        cache = open_cache(root)
        assert cache.mode == "sample"
        for i, want in enumerate(written):
            got = cache[i]
            np.testing.assert_array_equal(got["sample_counts"], want["sample_counts"])
            np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"])

    def test_validate_passes_then_catches_bitflip_and_truncation(self, build_cache):
        root, _ = build_cache(self.backend)
        cache = open_cache(root)
        assert cache.validate() == []
        files = sorted(p for p in _files(root, cache.shards[1]["name"]) if os.path.getsize(p) > 64)
        victim = files[-1]
        data = bytearray(open(victim, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(victim, "wb").write(bytes(data))
        with open(_files(root, cache.shards[2]["name"])[-1], "r+b") as f:
            f.truncate(10)
        problems = open_cache(root).validate()
        assert len(problems) == 2
        assert cache.shards[1]["name"] in problems[0] and "checksum" in problems[0]
        assert cache.shards[2]["name"] in problems[1]
        with pytest.raises(ShardError, match="checksum"):
            open_cache(root)[5]
        # Shard 0 is untouched and still readable: damage elsewhere loses nothing.
        assert open_cache(root)[0]["row_index"] == 0

    def test_missing_shard(self, build_cache, tmp_path):
        root, _ = build_cache(self.backend)
        cache = open_cache(root)
        import shutil
        target = os.path.join(root, cache.shards[0]["name"])
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        with pytest.raises(ShardError, match="missing"):
            open_cache(root)[0]

    def test_bad_values_rejected_and_nothing_lost(self, tmp_path):
        root = str(tmp_path / "c")
        rng = np.random.default_rng(1)
        w = CacheWriter(root, backend=self.backend, encoding="lossless", vocab_size=VOCAB, fingerprint="f",
                        text_fields=TEXT_FIELDS)
        good = make_sequence(rng, 0, 10, 8)
        w.write_shard(0, ShardData.from_sequences([good], text_fields=TEXT_FIELDS))
        bad_cases = {
            "NaN": lambda s: s["topk_logprobs"].__setitem__((0, 0), np.nan),
            "inf": lambda s: s["target_logprob"].__setitem__(0, -np.inf),
            "outside": lambda s: s["topk_ids"].__setitem__((0, 0), VOCAB),
            "input_ids outside": lambda s: s["input_ids"].__setitem__(0, VOCAB + 5),
            "rows": lambda s: s.__setitem__("tail_mass", s["tail_mass"][:-1]),
            "outside \\[0, len": lambda s: s.__setitem__("positions", s["positions"] + 5),
        }
        for pattern, corrupt in bad_cases.items():
            seq = make_sequence(rng, 1, 10, 8)
            corrupt(seq)
            with pytest.raises(InvalidDataError, match=pattern):
                w.write_shard(1, ShardData.from_sequences([seq], text_fields=TEXT_FIELDS))
        assert list(w.finished_shards()) == [0]
        w.finalize(metadata(8))
        assert_same_sequence(open_cache(root)[0], good)

    def test_resume_skips_finished_and_refuses_other_settings(self, tmp_path):
        root = str(tmp_path / "c")
        rng = np.random.default_rng(2)
        kw = dict(backend=self.backend, encoding="compact", vocab_size=VOCAB, text_fields=TEXT_FIELDS)
        w = CacheWriter(root, fingerprint="one", **kw)
        w.write_shard(0, ShardData.from_sequences([make_sequence(rng, 0, 9, 8)], text_fields=TEXT_FIELDS))
        assert list(CacheWriter(root, fingerprint="one", **kw).finished_shards()) == [0]
        with pytest.raises(ConfigError, match="fingerprint"):
            CacheWriter(root, fingerprint="two", **kw).finished_shards()
        with pytest.raises(CacheIndexError, match="not written yet"):
            w.finalize(metadata(8), num_shards=2)
        with pytest.raises(CacheIndexError, match="unfinished"):
            open_cache(root)

    def test_overlapping_rows_refused_at_finalize(self, tmp_path):
        root = str(tmp_path / "c")
        rng = np.random.default_rng(3)
        w = CacheWriter(root, backend=self.backend, encoding="lossless", vocab_size=VOCAB, fingerprint="f",
                        text_fields=TEXT_FIELDS)
        for j, rows in enumerate(([0, 5], [4, 8])):
            w.write_shard(j, ShardData.from_sequences([make_sequence(rng, j, 9, 8)], text_fields=TEXT_FIELDS),
                          extra={"rows": rows})
        with pytest.raises(CacheIndexError, match="overlap"):
            w.finalize(metadata(8))

    def test_convert_roundtrip_is_lossless(self, build_cache, tmp_path):
        root, written = build_cache(self.backend, encoding="compact", k=16)
        other = "arrow" if self.backend == "zarr" else "zarr"
        mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
        convert_cache(root, mid, backend=other, progress=False)
        convert_cache(mid, back, backend=self.backend, progress=False)
        a, b, c = open_cache(root), open_cache(mid), open_cache(back)
        assert b.backend == other and a.fingerprint == b.fingerprint == c.fingerprint
        assert c.index["counts"] == a.index["counts"]
        for i in range(len(a)):
            for key in ("input_ids", "positions", "topk_ids", "topk_logprobs", "target_logprob", "tail_mass"):
                np.testing.assert_array_equal(a[i][key], b[i][key])
                np.testing.assert_array_equal(a[i][key], c[i][key])
        assert [e["sha256"] for e in a.shards] == [e["sha256"] for e in c.shards]

    def test_fsspec_memory_url(self, build_cache):
        root, written = build_cache(self.backend, root=f"memory://contract-{self.backend}")
        cache = open_cache(root)
        assert len(cache) == len(written)
        assert_same_sequence(cache[3], written[3])
        assert cache.validate() == []


def _files(root: str, name: str) -> list[str]:
    path = os.path.join(root, name)
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


class TestArrow(BackendContract):
    backend = "arrow"

    def test_datasets_reads_shards_without_logitcache(self, build_cache):
        root, written = build_cache(self.backend, k=8)
        code = f"""
import json, sys, datasets
ds = datasets.load_dataset("parquet", data_files={os.path.join(root, '*.parquet')!r}, split="train")
assert "logitcache" not in sys.modules
row = ds[0]
print(json.dumps({{"n": len(ds), "k": len(row["topk_ids"][0]), "ids": row["topk_ids"][0], "prompt": row["prompt"]}}))
"""
        out = _run_without_logitcache(code)
        assert out["n"] == len(written) and out["k"] == 8
        assert out["ids"] == written[0]["topk_ids"][0].tolist() and out["prompt"] == written[0]["prompt"]


class TestZarr(BackendContract):
    backend = "zarr"

    def test_plain_zarr_reads_shards_without_logitcache(self, build_cache):
        root, written = build_cache(self.backend, k=8, encoding="compact")
        code = f"""
import json, sys, numpy as np, zarr
g = zarr.open_group({os.path.join(root, 'shard-00000.zarr')!r}, mode="r")
assert "logitcache" not in sys.modules
off = g["position_offsets"][:]
step = g.attrs["logitcache"]["compact_step"]
lp = -np.cumsum(g["topk_logprobs"][:], axis=1) * step   # documented compact decoding
print(json.dumps({{"ids": g["topk_ids"][off[0]:off[1]].tolist(), "lp": lp[off[0]:off[1]].tolist(),
                  "prompt": str(g["text/prompt"][0])}}))
"""
        out = _run_without_logitcache(code)
        assert out["ids"] == written[0]["topk_ids"].tolist()
        assert np.abs(np.array(out["lp"]) - written[0]["topk_logprobs"]).max() <= COMPACT_STEP / 2 + 1e-6
        assert out["prompt"] == written[0]["prompt"]


def _run_without_logitcache(code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])
