"""Rerunning `precompute` on a finished cache repairs it: a shard deleted, truncated or bit-flipped
after the cache was finished is named by `validate`, and the same command rewrites exactly the
damaged shards (missing and truncated ones by their size; bit flips with `--verify`), then the
index. The repaired cache equals the shared reference, and the intact shards are not touched.
On a local disk and on an S3 server (moto) on loopback.

    .venv/bin/python -m pytest tests/pipeline/test_repair.py -q -m "slow or not slow"    # ~40 s
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from precompute_util import assert_same_cache, reference_flags, run_here
from s3server import make_bucket, s3_options

from logitcache.pipeline import cli

DELETED, TRUNCATED, FLIPPED = "shard-00003.zarr", "shard-00005.zarr", "shard-00007.zarr"


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def stamps(cache: Path, skip: tuple[str, ...]) -> dict[str, int]:
    """{file: mtime in ns} of every file of every shard not in `skip`."""
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.glob("shard-*/**/*")
            if p.is_file() and p.relative_to(cache).parts[0] not in skip}


def validate(url: str, capsys, env: dict | None = None) -> tuple[int, str]:
    capsys.readouterr()
    rc = run_here(["validate", url], env=env)
    return rc, capsys.readouterr().out


def test_rerun_on_a_finished_local_cache_rewrites_only_the_damaged_shards(reference_cache, tmp_path, capsys):
    teacher, data, reference = reference_cache
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    shutil.rmtree(cache / DELETED)
    victim = largest_file(cache / TRUNCATED)
    victim.write_bytes(victim.read_bytes()[:-7])
    flip = largest_file(cache / FLIPPED)
    raw = bytearray(flip.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    flip.write_bytes(bytes(raw))
    untouched = stamps(cache, (DELETED, TRUNCATED, FLIPPED))

    rc, out = validate(str(cache), capsys)
    assert rc == 1, out
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert [line.split()[1].rstrip(":") for line in bad] == [DELETED, TRUNCATED, FLIPPED], out
    assert "missing" in bad[0] and "bytes stored" in bad[1] and "checksum mismatch" in bad[2]

    # The plain rerun finds the missing and the truncated shard by their sizes; a bit flip keeps the size.
    time.sleep(0.01)  # a rewrite gets a later mtime even on a coarse clock
    assert run_here(reference_flags(teacher, data, cache)) == 0
    err = capsys.readouterr().err
    assert f"{DELETED} is missing; this job rewrites it" in err and f"{TRUNCATED} is " in err
    assert FLIPPED not in err
    rc, out = validate(str(cache), capsys)
    assert rc == 1 and [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("BAD")] == [FLIPPED]

    # --verify reads every shard's sha256 and rewrites the flipped one.
    assert run_here([*reference_flags(teacher, data, cache), "--verify"]) == 0
    assert f"{FLIPPED} is checksum mismatch" in capsys.readouterr().err
    assert validate(str(cache), capsys)[0] == 0
    assert_same_cache(reference, cache)
    assert json.loads((cache / "index.json").read_text()) == json.loads((reference / "index.json").read_text())
    assert stamps(cache, (DELETED, TRUNCATED, FLIPPED)) == untouched

    # And once intact, a rerun (even --verify) does nothing at all.
    index_stamp = (cache / "index.json").stat().st_mtime_ns
    assert run_here([*reference_flags(teacher, data, cache), "--verify"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (cache / "index.json").stat().st_mtime_ns == index_stamp


@pytest.mark.slow  # ~25 s alone: a zarr cache of ~230 objects to and from the S3 server
def test_rerun_on_a_finished_s3_cache_rewrites_only_the_damaged_shards(reference_cache, s3, capsys):
    import s3fs

    teacher, data, reference = reference_cache
    endpoint, env = s3
    make_bucket(endpoint, "lc-repair")
    fs = s3fs.S3FileSystem(**s3_options(endpoint))
    url, root = "s3://lc-repair/cache", "lc-repair/cache"
    fs.put(str(reference) + "/", root, recursive=True)
    fs.rm(f"{root}/{DELETED}", recursive=True)
    key = max(fs.find(f"{root}/{FLIPPED}", detail=True).items(), key=lambda kv: kv[1]["size"])[0]
    raw = bytearray(fs.cat_file(key))
    raw[len(raw) // 2] ^= 0x10
    fs.pipe_file(key, bytes(raw))

    def modified() -> dict[str, object]:
        fs.invalidate_cache()
        return {path: info["LastModified"] for path, info in fs.find(root, detail=True).items()
                if path.startswith(f"{root}/shard-") and f"/{DELETED}/" not in path and f"/{FLIPPED}/" not in path}

    before = modified()
    rc, out = validate(url, capsys, env=env)
    assert rc == 1, out
    assert [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("BAD")] == [DELETED, FLIPPED]

    time.sleep(1.1)  # S3 times have a resolution of a second or a millisecond; a rewrite would show
    assert run_here([*reference_flags(teacher, data, url), "--verify"], env=env) == 0
    err = capsys.readouterr().err
    assert f"{DELETED} is missing" in err and f"{FLIPPED} is checksum mismatch" in err
    assert validate(url, capsys, env=env)[0] == 0
    assert_same_cache(reference, url, storage_options=s3_options(endpoint))
    assert json.loads(fs.cat_file(f"{root}/index.json")) == json.loads((reference / "index.json").read_text())
    assert modified() == before


def test_rerun_repairs_a_parquet_cache_the_default_backend(tiny_teacher, tmp_path, capsys):
    """The same repair on the default backend, where a shard is one file: deleted, truncated and bit-flipped
    shards are named by `validate`, rewritten by the rerun (the flip with `--verify`), and the cache decodes
    as it did; the intact shards are not touched."""
    from precompute_util import text_rows, write_jsonl

    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(8))
    flags = ["precompute", "--teacher", str(tiny_teacher[0]), "--data", str(data), "--engine", "hf",
             "--text-field", "text", "--top-k", "4", "--rows-per-shard", "2", "--batch-size", "2", "--no-progress"]
    reference, cache = tmp_path / "reference", tmp_path / "cache"
    assert run_here([*flags, "--out", str(reference)]) == 0
    assert sorted(p.name for p in reference.glob("shard-*")) == [f"shard-0000{i}.parquet" for i in range(4)]
    shutil.copytree(reference, cache)
    deleted, truncated, flipped = (cache / f"shard-0000{i}.parquet" for i in (0, 1, 2))
    deleted.unlink()
    truncated.write_bytes(truncated.read_bytes()[:-7])
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    flipped.write_bytes(bytes(raw))
    intact = (cache / "shard-00003.parquet").stat().st_mtime_ns

    rc, out = validate(str(cache), capsys)
    assert rc == 1 and [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("BAD")] == [
        deleted.name, truncated.name, flipped.name], out
    time.sleep(0.01)
    assert run_here([*flags, "--out", str(cache)]) == 0
    rc, out = validate(str(cache), capsys)
    assert rc == 1 and [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("BAD")] == [
        flipped.name], out
    assert run_here([*flags, "--out", str(cache), "--verify"]) == 0
    assert validate(str(cache), capsys)[0] == 0
    assert_same_cache(reference, cache)
    assert (cache / "shard-00003.parquet").stat().st_mtime_ns == intact
