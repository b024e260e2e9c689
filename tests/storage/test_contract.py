"""Every backend passes the contract suite `logitcache.storage.testing.BackendTests` (zarr's StoreTests
pattern), and each is readable by its own ecosystem without logitcache. A third backend written
outside the package passes the same suite by subclassing it.

    .venv/bin/python -m pytest tests/storage/test_contract.py
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from logitcache.storage import COMPACT_STEP, FolderBackend, ShardData, decode_logprobs, encode_logprobs, open_cache
from logitcache.storage.encoding import TAIL_MASS_DTYPE, scalar_dtype
from logitcache.storage.testing import BackendTests, write_synthetic_cache


class TestArrow(BackendTests):
    backend = "arrow"

    def test_datasets_reads_shards_without_logitcache(self, build_cache):
        root, written = build_cache(k=8)
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


class TestZarr(BackendTests):
    backend = "zarr"

    def test_plain_zarr_reads_shards_without_logitcache(self, build_cache):
        root, written = build_cache(k=8, encoding="compact")
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
    # The result is printed; then leave at once: a library's thread pool tearing down at interpreter
    # exit once aborted the child ("terminate called without an active exception") under load.
    code += "\nsys.stdout.flush()\nimport os; os._exit(0)\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


class NpyBackend(FolderBackend):
    """A user's own backend: one `.npy` file per array (no pickle) and a JSON file, in a folder.

    Like the built-in ones it stores the encoding's value types, so a conversion between it and
    them is bit-identical (the suite checks that).
    """

    name = "npy-test"
    suffix = ".npyd"
    _ARRAYS = ("row_index", "input_ids", "token_offsets", "positions", "position_offsets", "topk_ids",
               "topk_logprobs", "target_logprob", "tail_mass", "sample_counts", "sample_logz")

    def encode(self, shard, *, encoding, attrs):
        files = {"meta.json": json.dumps({"attrs": attrs, "texts": shard.texts}).encode()}
        for name in self._ARRAYS:
            values = getattr(shard, name)
            if values is not None:
                buf = io.BytesIO()
                if name == "topk_logprobs":
                    values = encode_logprobs(values, encoding)
                elif name == "target_logprob":
                    values = values.astype(scalar_dtype(encoding))
                elif name == "tail_mass":
                    values = values.astype(TAIL_MASS_DTYPE)
                np.save(buf, values, allow_pickle=False)
                files[f"{name}.npy"] = buf.getvalue()
        return files

    def decode(self, payload):
        meta = json.loads(payload["meta.json"])
        arrays = {name: np.load(io.BytesIO(payload[f"{name}.npy"]), allow_pickle=False) if f"{name}.npy" in payload
                  else None for name in self._ARRAYS}
        arrays["topk_logprobs"] = decode_logprobs(arrays["topk_logprobs"], meta["attrs"]["encoding"])
        for name in ("target_logprob", "tail_mass"):
            arrays[name] = arrays[name].astype(np.float32)
        return ShardData(**arrays, texts=meta["texts"]), meta["attrs"]


class TestThirdPartyBackend(BackendTests):
    backend = NpyBackend()


@pytest.mark.parametrize("backend,module", [("arrow", "logitcache.storage.arrow_backend"),
                                            ("zarr", "logitcache.storage.zarr_backend")])
def test_float16_tail_mass_of_older_caches_still_reads(tmp_path, monkeypatch, backend, module):
    """Caches written before tail_mass was float32 in every encoding hold it as float16: still readable."""
    monkeypatch.setattr(f"{module}.TAIL_MASS_DTYPE", np.dtype(np.float16))
    root = str(tmp_path / "old")
    written = write_synthetic_cache(root, backend, encoding="float16")
    cache = open_cache(root)
    for i, want in enumerate(written):
        got = cache[i]["tail_mass"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want["tail_mass"].astype(np.float16).astype(np.float32))
