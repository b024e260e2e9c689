"""`logitcache validate | inspect | convert` on small finished caches.

    .venv/bin/pytest tests/pipeline/test_storage_cli.py                     # without `--help` of every command (slow)
    .venv/bin/pytest tests/pipeline/test_storage_cli.py -m "slow or not slow"
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.pipeline.cli import main
from logitcache.storage import CacheWriter, ShardData, open_cache


@pytest.fixture
def cache_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = str(tmp_path / "cache")
    w = CacheWriter(root, backend="zarr", encoding="compact", vocab_size=VOCAB, fingerprint="cli",
                    text_fields=TEXT_FIELDS)
    for j in range(2):
        seqs = [make_sequence(rng, 3 * j + i, 30, 16) for i in range(3)]
        w.write_shard(j, ShardData.from_sequences(seqs, text_fields=TEXT_FIELDS), extra={"rows": [3 * j, 3 * j + 3]})
    w.finalize(metadata(16), counts={"skipped": 2})
    return root


@pytest.mark.slow
def test_help_for_every_command():
    out = subprocess.run([sys.executable, "-m", "logitcache.pipeline.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("validate", "inspect", "convert", "push"):
        assert name in out.stdout
        sub = subprocess.run([sys.executable, "-m", "logitcache.pipeline.cli", name, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "example" in sub.stdout


def test_validate_ok_then_names_the_bad_shard(cache_dir, capsys):
    assert main(["validate", cache_dir]) == 0
    assert "OK" in capsys.readouterr().out
    victim = os.path.join(cache_dir, "shard-00001.zarr", "topk_ids", "c", "0", "0")
    data = bytearray(open(victim, "rb").read())
    data[-5] ^= 0x10
    open(victim, "wb").write(bytes(data))
    assert main(["validate", cache_dir]) == 1
    out = capsys.readouterr().out
    assert "shard-00001.zarr" in out and "checksum" in out and "shard-00000" not in out


def test_validate_unfinished_cache_is_a_clear_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert "unfinished" in capsys.readouterr().err


@pytest.mark.slow  # matplotlib: ~30 s of CPU on 2 cores
def test_inspect_json_and_plot(cache_dir, tmp_path, capsys):
    png = tmp_path / "mass.png"
    assert main(["inspect", cache_dir, "--json", "--plot", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("sequences", "tokens", "positions", "bytes", "bytes_per_position", "top_k", "format"):
        assert key in summary
    assert summary["sequences"] == 6 and summary["top_k"] == 16 and summary["format"] == "zarr"
    assert summary["positions"] == 6 * 28
    assert summary["bytes_per_position"] == pytest.approx(summary["bytes"] / summary["positions"])
    cache = open_cache(cache_dir)
    mass = np.concatenate([1 - cache[i]["tail_mass"] for i in range(len(cache))])
    assert summary["topk_mass"]["mean"] == pytest.approx(float(mass.mean()), rel=1e-6)
    assert summary["other_counts"] == {"skipped": 2}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", cache_dir]) == 0
    assert "bytes/entry" in capsys.readouterr().out


def test_convert_both_ways(cache_dir, tmp_path, capsys):
    arrow, back = str(tmp_path / "arrow"), str(tmp_path / "back")
    assert main(["convert", cache_dir, arrow, "--backend", "arrow"]) == 0
    assert main(["convert", arrow, back, "--format", "zarr"]) == 0  # the old flag name still works
    a, c = open_cache(cache_dir), open_cache(back)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["topk_logprobs"], c[i]["topk_logprobs"])


def test_convert_rejects_unknown_or_missing_backend(cache_dir, tmp_path, capsys):
    # argparse's usage errors take the one error path too (tests/pipeline/test_bad_inputs.py).
    assert main(["convert", cache_dir, str(tmp_path / "x"), "--backend", "hdf5"]) == 2
    assert "logitcache convert: error: argument --backend: invalid choice: 'hdf5'" in capsys.readouterr().err
    assert main(["convert", cache_dir, str(tmp_path / "x")]) == 2
    assert "--backend is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_parquet_alias_converts_to_a_folder_datasets_loads(cache_dir, tmp_path):
    """`convert --backend parquet` (arrow's other name): the new folder is a valid cache and a dataset
    `datasets.load_dataset` reads with no arguments (its card's configs); `push` is tested in test_push.py."""
    import datasets

    parquet = str(tmp_path / "parquet")
    assert main(["convert", cache_dir, parquet, "--backend", "parquet"]) == 0
    assert open_cache(parquet).backend == "arrow" and open_cache(parquet).validate() == []
    ds = datasets.load_dataset(parquet, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 6 and "topk_logprobs" in ds.column_names
