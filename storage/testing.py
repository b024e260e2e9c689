"""The storage contract suite, shipped with the package (zarr-python's `StoreTests` pattern).

Every backend passes the same tests. A new backend, in this repository or in a user's own code,
is tested by subclassing `BackendTests` in a pytest module:

    from logitcache.storage.testing import BackendTests

    class TestMyBackend(BackendTests):
        backend = MyBackend()        # an instance; registered in BACKENDS for each test
        # or: backend = "zarr"       # the name of a backend already in BACKENDS

Needs pytest (not a dependency of logitcache itself), so `logitcache.storage` does not import
this module. The synthetic targets here are computed from random logits the way an engine
computes them: full softmax over a vocabulary, top-K kept, tail mass the remainder.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from logitcache.storage import layout
from logitcache.storage.backend_base import Backend
from logitcache.storage.backends import BACKENDS
from logitcache.storage.cache import open_cache
from logitcache.storage.convert import convert_cache
from logitcache.storage.encoding import COMPACT_STEP
from logitcache.storage.errors import CacheIndexError, ConfigError, InvalidDataError, ShardError
from logitcache.storage.shard import ShardData
from logitcache.storage.writer import CacheWriter

__all__ = ["BackendTests", "VOCAB", "TEXT_FIELDS", "make_sequence", "index_metadata", "write_synthetic_cache",
           "assert_same_sequence"]

VOCAB = 600
TEXT_FIELDS = ("prompt", "response")


def make_sequence(rng: np.random.Generator, row: int, length: int, k: int, vocab: int = VOCAB, *,
                  sample: bool = False) -> dict:
    """One sequence's stored targets, computed from random logits the way an engine would.

    Returns:
        A dict as `Cache.__getitem__` returns it: input_ids (T,), positions (P,) (P = T - 2: position
        0 is left out, so the supervision mask is not trivial), topk_ids (P, K), topk_logprobs (P, K)
        float32, target_logprob (P,) float32, tail_mass (P,) float32, row_index, prompt, response,
        and with `sample` also sample_counts (P, K) uint16, whose last two slots are padding (-1 ids),
        and sample_logz (P,) float32.
    """
    logits = rng.standard_normal((length, vocab)) * 3.0
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    input_ids = rng.integers(0, vocab, length)
    positions = np.arange(1, length - 1)
    rows = logp[positions]
    ids = np.argsort(-rows, axis=1)[:, :k]
    lp = np.take_along_axis(rows, ids, 1).astype(np.float32)
    seq = {
        "row_index": row, "input_ids": input_ids, "positions": positions, "topk_ids": ids, "topk_logprobs": lp,
        "target_logprob": rows[np.arange(len(positions)), input_ids[positions + 1]].astype(np.float32),
        "tail_mass": -np.expm1(np.logaddexp.reduce(lp, axis=1)).astype(np.float32),
        "prompt": f"prompt {row} ünïcode", "response": f"response {row}",
    }
    if sample:  # pad the last two slots as sample mode does when fewer unique ids were drawn
        seq["sample_counts"] = rng.integers(1, 5, ids.shape).astype(np.uint16)
        seq["topk_ids"] = ids.copy()
        seq["topk_ids"][:, -2:] = -1
        seq["sample_counts"][:, -2:] = 0
        seq["topk_logprobs"] = lp.copy()
        seq["topk_logprobs"][:, -2:] = 0.0
        seq["sample_logz"] = rng.normal(0.5, 0.2, len(positions)).astype(np.float32)
    return seq


def index_metadata(k: int, mode: str = "topk", vocab: int = VOCAB) -> dict:
    """The descriptive index sections `CacheWriter.finalize` needs, for a synthetic cache."""
    return {
        "teacher": {"name_or_path": "tiny-teacher", "revision": None, "config_hash": "abc"},
        "tokenizer": {"fingerprint": "tok", "vocab_size": vocab - 8, "logits_width": vocab},
        "dataset": {"name": "synthetic", "fingerprint": "data"},
        "inputs": {"kind": "prompt_response", "columns": {"prompt": "prompt", "response": "response"},
                   "stored_fields": list(TEXT_FIELDS), "max_length": 64},
        "sparsification": {"mode": mode, "k": k, "temperature": 1.0},
        "engine": {"name": "synthetic", "version": "0"},
    }


def write_synthetic_cache(root: str, backend: str, *, encoding: str = "lossless", k: int = 8, shards: int = 3,
                          per_shard: int = 4, sample: bool = False, seed: int = 0,
                          storage_options: dict | None = None) -> list[dict]:
    """Write a finished cache of random-length synthetic sequences. Returns the sequences written.

    Shard j holds rows [j * per_shard, (j + 1) * per_shard); the index counts one skipped row.
    `storage_options` are fsspec's, for a `root` URL (s3://...).
    """
    rng = np.random.default_rng(seed)
    writer = CacheWriter(root, backend=backend, encoding=encoding, vocab_size=VOCAB,
                         fingerprint="fp-test", text_fields=TEXT_FIELDS, storage_options=storage_options)
    written = []
    for j in range(shards):
        seqs = [make_sequence(rng, j * per_shard + i, int(rng.integers(4, 40)), k, sample=sample)
                for i in range(per_shard)]
        writer.write_shard(j, ShardData.from_sequences(seqs, text_fields=TEXT_FIELDS),
                           extra={"rows": [j * per_shard, (j + 1) * per_shard]})
        written += seqs
    writer.finalize(index_metadata(k, "sample" if sample else "topk"), counts={"skipped": 1})
    return written


def assert_same_sequence(got: dict, want: dict, atol: float = 0.0) -> None:
    """`got` (read back) equals `want` (written): ids exactly, log-probs within `atol`."""
    for key in ("input_ids", "positions", "topk_ids"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["topk_logprobs"], want["topk_logprobs"], atol=atol, rtol=0)
    for key in ("target_logprob", "tail_mass"):
        np.testing.assert_allclose(got[key], want[key], atol=max(atol, 1e-6 if atol == 0 else atol),
                                   rtol=1e-3 if atol else 1e-6)
    assert got["row_index"] == want["row_index"]
    for key in TEXT_FIELDS:
        assert got[key] == want[key]


def _files(root: str, name: str) -> list[str]:
    path = os.path.join(root, name)
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


class BackendTests:
    """The contract every backend passes: round trips, integrity checks, resume, conversion, fsspec.

    Attributes:
        backend: a registered backend's name, or a `Backend` instance (registered for each test).
    """

    backend: str | Backend

    @pytest.fixture(autouse=True)
    def _registered(self, monkeypatch):
        if isinstance(self.backend, Backend):
            monkeypatch.setitem(BACKENDS, self.backend.name, self.backend)

    @property
    def name(self) -> str:
        return self.backend.name if isinstance(self.backend, Backend) else self.backend

    @property
    def suffix(self) -> str:
        return BACKENDS[self.name].suffix

    @pytest.fixture
    def build_cache(self, tmp_path):
        """Factory: (root, sequences written) of a finished synthetic cache with this backend."""

        def build(*, root: str | None = None, encoding: str = "lossless", k: int = 8, sample: bool = False, **kw):
            root = root or str(tmp_path / f"cache-{encoding}-{k}-{sample}")
            return root, write_synthetic_cache(root, self.name, encoding=encoding, k=k, sample=sample, **kw)

        return build

    def _writer(self, root: str, fingerprint: str = "f", encoding: str = "lossless") -> CacheWriter:
        return CacheWriter(root, backend=self.name, encoding=encoding, vocab_size=VOCAB, fingerprint=fingerprint,
                           text_fields=TEXT_FIELDS)

    def test_roundtrip_lossless_exact(self, build_cache):
        root, written = build_cache()
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
        root, written = build_cache(encoding=encoding, k=32)
        cache = open_cache(root)
        worst = max(np.abs(cache[i]["topk_logprobs"] - w["topk_logprobs"]).max() for i, w in enumerate(written))
        assert worst <= atol
        for i, want in enumerate(written):
            assert_same_sequence(cache[i], want, atol=atol)

    @pytest.mark.parametrize("encoding", ["lossless", "float16", "compact"])
    def test_small_tail_mass_survives_every_encoding(self, tmp_path, encoding):
        """A confident teacher's tail (1e-12 .. 1e-7) is stored as float32, not rounded to 0 (float16 would)."""
        seq = make_sequence(np.random.default_rng(5), 0, 10, 8)
        tails = np.array([1e-12, 3e-10, 1e-9, 2e-8, 3e-8, 1e-7, 0.0, 0.5], dtype=np.float32)
        seq["tail_mass"] = tails
        root = str(tmp_path / f"tiny-tails-{encoding}")
        writer = self._writer(root, encoding=encoding)
        writer.write_shard(0, ShardData.from_sequences([seq], text_fields=TEXT_FIELDS))
        writer.finalize(index_metadata(8))
        got = open_cache(root)[0]["tail_mass"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tails)

    def test_index_contents(self, build_cache):
        root, written = build_cache()
        index = open_cache(root).index
        assert index["format"] == "logitcache" and index["format_version"] == 1
        assert index["backend"] == self.name
        assert index["counts"]["sequences"] == len(written)
        assert index["counts"]["tokens"] == sum(len(w["input_ids"]) for w in written)
        assert index["counts"]["positions"] == sum(len(w["positions"]) for w in written)
        assert index["counts"]["skipped"] == 1
        assert [e["rows"] for e in index["shards"]] == [[0, 4], [4, 8], [8, 12]]
        assert [e["name"] for e in index["shards"]] == [layout.shard_name(self.suffix, j) for j in range(3)]
        for entry in index["shards"]:
            assert entry["bytes"] > 0 and len(entry["sha256"]) == 64

    def test_iteration_in_order_and_by_shard(self, build_cache):
        root, written = build_cache()
        cache = open_cache(root)
        assert [s["row_index"] for s in cache] == [w["row_index"] for w in written]
        seen = []
        for j, shard in cache.iter_shards(order=[2, 0, 1]):
            assert shard.num_sequences == cache.shards[j]["sequences"]
            seen += shard.row_index.tolist()
        assert sorted(seen) == list(range(12)) and seen[:4] == [8, 9, 10, 11]

    def test_sample_mode_roundtrip(self, build_cache):
        root, written = build_cache(sample=True, encoding="compact")
        cache = open_cache(root)
        assert cache.mode == "sample"
        for i, want in enumerate(written):
            got = cache[i]
            np.testing.assert_array_equal(got["sample_counts"], want["sample_counts"])
            np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"])
            np.testing.assert_array_equal(got["sample_logz"], want["sample_logz"])
            # The reader gives each stored id's draw log-prob, lp / tau - sample_logz (tau = 1 here), 0 at padding.
            valid = want["topk_ids"] >= 0
            np.testing.assert_allclose(got["sample_logprobs"][valid],
                                       (got["topk_logprobs"] - want["sample_logz"][:, None])[valid], rtol=1e-6)
            assert not got["sample_logprobs"][~valid].any()

    def test_validate_passes_then_catches_bitflip_and_truncation(self, build_cache):
        root, _ = build_cache()
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

    def test_undecodable_shard_is_a_shard_error(self, build_cache):
        root, _ = build_cache()
        cache = open_cache(root, verify=False)
        for path in _files(root, cache.shards[0]["name"]):
            with open(path, "r+b") as f:
                f.truncate(3)
        with pytest.raises(ShardError, match=cache.shards[0]["name"]):
            cache.read_shard(0)

    def test_missing_shard(self, build_cache):
        root, _ = build_cache()
        cache = open_cache(root)
        target = os.path.join(root, cache.shards[0]["name"])
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        with pytest.raises(ShardError, match="missing"):
            open_cache(root)[0]

    def test_bad_values_rejected_and_nothing_lost(self, tmp_path):
        root = str(tmp_path / "c")
        rng = np.random.default_rng(1)
        w = self._writer(root)
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
        assert not [p for p in os.listdir(root) if layout.TMP_MARKER in p]
        w.finalize(index_metadata(8))
        assert_same_sequence(open_cache(root)[0], good)

    def test_resume_skips_finished_and_refuses_other_settings(self, tmp_path):
        root = str(tmp_path / "c")
        rng = np.random.default_rng(2)
        w = self._writer(root, "one", "compact")
        w.write_shard(0, ShardData.from_sequences([make_sequence(rng, 0, 9, 8)], text_fields=TEXT_FIELDS))
        assert list(self._writer(root, "one", "compact").finished_shards()) == [0]
        with pytest.raises(ConfigError, match="fingerprint"):
            self._writer(root, "two", "compact").finished_shards()
        with pytest.raises(CacheIndexError, match="not written yet"):
            w.finalize(index_metadata(8), num_shards=2)
        with pytest.raises(CacheIndexError, match="unfinished"):
            open_cache(root)

    def test_stale_temporaries_removed_only_for_the_given_shards(self, tmp_path):
        root = tmp_path / "c"
        w = self._writer(str(root))
        rng = np.random.default_rng(4)
        for j in (1, 2):
            w.write_shard(j, ShardData.from_sequences([make_sequence(rng, j, 9, 8)], text_fields=TEXT_FIELDS))
        names = {j: layout.shard_name(self.suffix, j) for j in (1, 2)}
        stale = [root / f"{names[1]}{layout.TMP_MARKER}0a1b2c3d",
                 root / f"{layout.entry_name(names[1])}{layout.TMP_MARKER}00ff00ff"]
        kept = [root / f"{names[2]}{layout.TMP_MARKER}0a1b2c3d"]  # another job's write, maybe in flight
        (stale[0]).mkdir()
        (stale[0] / "part").write_bytes(b"half a shard")
        for p in (stale[1], *kept):
            p.write_bytes(b"{}")
        assert w.remove_stale_temporaries([0, 1]) == 2
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        assert sorted(w.finished_shards()) == [1, 2]  # finished shards and their entries untouched

    def test_overlapping_rows_refused_at_finalize(self, tmp_path):
        root = str(tmp_path / "c")
        rng = np.random.default_rng(3)
        w = self._writer(root)
        for j, rows in enumerate(([0, 5], [4, 8])):
            w.write_shard(j, ShardData.from_sequences([make_sequence(rng, j, 9, 8)], text_fields=TEXT_FIELDS),
                          extra={"rows": rows})
        with pytest.raises(CacheIndexError, match="overlap"):
            w.finalize(index_metadata(8))

    def test_convert_roundtrip_is_lossless(self, build_cache, tmp_path):
        root, written = build_cache(encoding="compact", k=16)
        other = next(name for name in ("zarr", "arrow", *BACKENDS) if name != self.name)
        mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
        convert_cache(root, mid, backend=other, progress=False)
        convert_cache(mid, back, backend=self.name, progress=False)
        a, b, c = open_cache(root), open_cache(mid), open_cache(back)
        assert b.backend == other and a.fingerprint == b.fingerprint == c.fingerprint
        assert c.index["counts"] == a.index["counts"]
        for i in range(len(a)):
            for key in ("input_ids", "positions", "topk_ids", "topk_logprobs", "target_logprob", "tail_mass"):
                np.testing.assert_array_equal(a[i][key], b[i][key])
                np.testing.assert_array_equal(a[i][key], c[i][key])
        assert [e["sha256"] for e in a.shards] == [e["sha256"] for e in c.shards]

    def test_fsspec_memory_url(self, build_cache, tmp_path):
        root, written = build_cache(root=f"memory://contract-{self.name}-{tmp_path.name}")
        cache = open_cache(root)
        assert len(cache) == len(written)
        assert_same_sequence(cache[3], written[3])
        assert cache.validate() == []
