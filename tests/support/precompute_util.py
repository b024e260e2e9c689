"""Shared helpers of the stage-one tests: input rows, a vLLM engine sized for tests, comparing caches."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from logitcache.pipeline.scratch import toy_corpus
from logitcache.stages.precompute.run import EngineSpec, PrecomputeSettings, precompute
from logitcache.storage import open_cache
from logitcache.storage import resolve
from logitcache.storage.backends import read_shard_files, shard_checksum

# Row layout of `mixed_rows` (rows_per_shard=4 -> shards [0,4) [4,8) [8,12) [12,14)):
# shard 2 holds only bad rows, so it is written empty.
LONG_ROW = 1
MISSING_ROWS, NOT_STRING_ROWS, EMPTY_ROWS = (3, 8, 11), (5, 9), (10,)
NUM_ROWS = 14
MAX_LENGTH = 48  # good rows fit, LONG_ROW does not

# Top-K of the stage-one tests' hf engine (conftest's `hf_engine`) and of `run`'s jobs.
K = 8


def run(teacher, data, out, engine, **kw):
    """`precompute` with `engine` a name (started by the run; by each actor on Ray) or a started engine (left
    open): top-`K`, 4 rows a shard and no progress bar unless `kw` says otherwise."""
    kw = {"top_k": K, "rows_per_shard": 4, "progress": False, **kw}
    engine = EngineSpec(engine) if isinstance(engine, str) else EngineSpec.of(engine)
    return precompute(PrecomputeSettings(teacher=teacher, data=str(data), out=str(out), engine=engine, **kw))


def vllm_engine(model, **kwargs):
    """A vLLM engine on `model` sized for tests (skipped where vLLM is not installed). A small KV cache
    (prefill-only work needs little; VLLM_CPU_KVCACHE_SPACE, if set, wins) and no torch.compile: start-up
    time and memory beside other test runs."""
    pytest.importorskip("vllm")
    from logitcache.stages.precompute.engines import build_engine

    # max_model_len and tensor_parallel_size: two of vLLM's settings run for real (test_vllm_settings).
    return build_engine("vllm", str(model), max_batch_tokens=1024, max_model_len=512, tensor_parallel_size=1,
                        kv_cache_memory_bytes=256 << 20, enforce_eager=True, **kwargs)


def _good(i: int, words: list[str], long: bool = False) -> dict:
    a, b, c = " ".join(words[:4]), " ".join(words[4:8]), " ".join(words[8:12])
    reply = " ".join(words[12:] if long else words[12:16])
    return {"text": " ".join(words if long else words[:16]), "prompt": a + " " + b, "response": " " + c + " " + reply,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": a},
                         {"role": "assistant", "content": b}, {"role": "user", "content": c},
                         {"role": "assistant", "content": reply}],
            "id": i}


def mixed_rows() -> list[dict]:
    """14 rows for every input kind at once: good, one over-long, missing, non-string, empty."""
    lines = [line.split() for line in toy_corpus(NUM_ROWS, seed=7)]
    rows = []
    for i in range(NUM_ROWS):
        words = (lines[i] * 8)[:120] if i == LONG_ROW else (lines[i] * 4)[:16]
        if i in MISSING_ROWS:
            rows.append({"id": i})
        elif i in NOT_STRING_ROWS:
            rows.append({"text": 123, "prompt": 123, "response": 123, "messages": 123, "id": i})
        elif i in EMPTY_ROWS:
            rows.append({"text": "", "prompt": "", "response": "", "messages": [], "id": i})
        else:
            rows.append(_good(i, words, long=i == LONG_ROW))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# The shared reference job (conftest's `reference_cache`): 24 text rows, top-8, 2 rows a shard -> 12 shards, so
# a fault injected after a few shards lands mid-job. One thread: CPU GEMM kernels, and so the last float bit,
# depend on the thread count, and the interrupted runs compared against it must match it bit for bit.
REF_ROWS, REF_ROWS_PER_SHARD = 24, 2
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def reference_flags(teacher: str, data: Path | str, out: str | Path) -> list[str]:
    """`logitcache precompute` arguments of the reference job, writing to `out` (a path or URL). Zarr, not the
    default Parquet: the fault, repair and resume tests damage and count a shard's many files."""
    return ["precompute", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--engine", "hf",
            "--text-field", "text", "--top-k", "8", "--rows-per-shard", str(REF_ROWS_PER_SHARD), "--batch-size", "1",
            "--backend", "zarr", "--no-progress"]


@contextmanager
def as_one_thread_process(env: dict | None = None):
    """Run the enclosed code as a CLI process of the reference's settings would: one torch thread and `env`
    set in `os.environ` (e.g. the AWS_* variables of an S3 endpoint); both restored after.

    A command run in this process (`cli.main`) then writes, bit for bit, what the same command writes as a
    process with `ONE_THREAD` (the shared reference is written so), without a process start-up (~10 s of
    CPU importing torch and transformers). Faults that need a process (a signal) still get one.
    """
    import torch

    env = {"TOKENIZERS_PARALLELISM": "false", **(env or {})}
    saved_env = {key: os.environ.get(key) for key in env}
    threads = torch.get_num_threads()
    os.environ.update(env)
    torch.set_num_threads(1)
    _forget_s3_clients()
    try:
        yield
    finally:
        _forget_s3_clients()
        torch.set_num_threads(threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _forget_s3_clients() -> None:
    # fsspec reuses a filesystem built with the same arguments, and an `s3://` URL with no options is
    # the same arguments whatever AWS_ENDPOINT_URL says: a process reads its environment once, so here
    # a client built for another endpoint (a stopped proxy) is dropped when the environment changes.
    import sys

    if "s3fs" in sys.modules:
        sys.modules["s3fs"].S3FileSystem.clear_instance_cache()


def run_here(argv: list[str], env: dict | None = None) -> int:
    """`logitcache <argv>` in this process, as a one-thread process would run it; returns its exit status."""
    from logitcache.pipeline import cli

    with as_one_thread_process(env):
        return cli.main(argv)


def text_rows(n: int, seed: int = 3) -> list[dict]:
    """`n` plain rows of 6-30 words (for the job-level tests)."""
    return [{"text": line} for line in toy_corpus(n, seed=seed)]


def assert_same_cache(a: str, b: str, *, storage_options: dict | None = None) -> None:
    """Same fingerprint, counts and shard list, and every shard decodes to the same arrays.

    `storage_options` are fsspec's options for opening `b` (e.g. an s3:// cache's endpoint).
    """
    ca, cb = open_cache(str(a)), open_cache(str(b), storage_options=storage_options)
    assert ca.fingerprint == cb.fingerprint
    assert ca.index["counts"] == cb.index["counts"]
    strip = lambda e: {k: v for k, v in e.items() if k not in ("bytes", "sha256")}  # noqa: E731
    assert [strip(e) for e in ca.shards] == [strip(e) for e in cb.shards]
    for (_, x), (_, y) in zip(ca.iter_shards(), cb.iter_shards()):
        for name in ("row_index", "input_ids", "token_offsets", "positions", "position_offsets", "topk_ids",
                     "topk_logprobs", "target_logprob", "tail_mass", "sample_counts"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:
                np.testing.assert_array_equal(u, v, err_msg=name)
        assert x.texts == y.texts


def assert_entries_complete(cache: str) -> int:
    """Every shard an entry names is complete (its bytes match the entry's sha256). Returns the count."""
    fs, root = resolve(str(cache))
    entries = sorted(Path(cache, "entries").glob("*.json")) if Path(cache, "entries").exists() else []
    for path in entries:
        entry = json.loads(path.read_text())
        payload = read_shard_files(fs, f"{root}/{entry['name']}", entry["backend"])
        assert shard_checksum(entry["backend"], payload) == entry["sha256"], entry["name"]
    return len(entries)


# The streaming tests' many-file Parquet dataset: 96 rows in 12 files, row groups of 4 rows (one
# shard's); their 24-row slice is 6 shards.
FILES, PER_FILE, ROWS, PER_SHARD = 12, 8, 24, 4


def write_parquet_corpus(root: Path) -> Path:
    """`root`/train-000.parquet .. train-011.parquet: columns text and id, PER_FILE rows each. Returns root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    rows = text_rows(FILES * PER_FILE, seed=5)
    for f in range(FILES):
        part = rows[f * PER_FILE:(f + 1) * PER_FILE]
        pq.write_table(pa.table({"text": [r["text"] for r in part], "id": list(range(f * PER_FILE, (f + 1) * PER_FILE))}),
                       root / f"train-{f:03d}.parquet", row_group_size=PER_SHARD)
    return root
